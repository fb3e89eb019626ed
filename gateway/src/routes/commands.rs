//! Submitting commands (the one write path) and reading their status.

use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use shared::ids;
use shared::results::ErrorBody;
use shared::wire::{COMMAND_VERSION, Command, CommandEnvelope};
use utoipa::{ToResponse, ToSchema};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, current_request_id};
use crate::publisher::PublishOutcome;
use crate::state::AppState;

/// Longest Idempotency-Key accepted.
pub const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 255;

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
pub static COMMAND_ID: HeaderName = HeaderName::from_static("x-command-id");

/// The request's Idempotency-Key, or a fresh one when the client sent none (the response
/// says which key was used, so the client can retry with it).
pub struct IdempotencyKey(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(&IDEMPOTENCY_KEY) {
            None => Ok(Self(Uuid::new_v4().to_string())),
            Some(value) => {
                let key = value
                    .to_str()
                    .ok()
                    .map(str::trim)
                    .filter(|key| {
                        !key.is_empty()
                            && key.len() <= IDEMPOTENCY_KEY_LENGTH_MAX
                            && key.bytes().all(|byte| byte.is_ascii_graphic())
                    })
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_LENGTH_MAX} visible ASCII characters"
                        ))
                    })?;
                Ok(Self(key.to_string()))
            }
        }
    }
}

/// Publishes a command and answers with its result, or 202 when the worker did not answer in
/// time. `fields` are the request's canonical fields for the fingerprint.
pub async fn submit(
    state: &AppState,
    key: IdempotencyKey,
    principal: String,
    fields: &[&str],
    build: impl FnOnce(Uuid) -> Command,
) -> Result<Response, ApiError> {
    let command_id = ids::command_id(&principal, &key.0);
    submit_as(state, key, principal, command_id, fields, build).await
}

/// Like `submit`, with a command id chosen by the caller: for commands that must happen at most
/// once whoever asks (a reversal of a journal entry), whatever the Idempotency-Key.
pub async fn submit_as(
    state: &AppState,
    key: IdempotencyKey,
    principal: String,
    command_id: Uuid,
    fields: &[&str],
    build: impl FnOnce(Uuid) -> Command,
) -> Result<Response, ApiError> {
    let command = build(command_id);
    let kind = command.kind();
    let envelope = CommandEnvelope {
        v: COMMAND_VERSION,
        id: command_id,
        fingerprint: ids::fingerprint(&state.fingerprint_key, kind, fields),
        principal: principal.clone(),
        request_id: current_request_id(),
        command,
    };
    let outcome = state
        .publisher
        .publish(
            &envelope,
            Duration::from_millis(state.config.reply_timeout_ms),
        )
        .await?;
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&key.0) {
        headers.insert(IDEMPOTENCY_KEY.clone(), value);
    }
    if let Ok(value) = HeaderValue::from_str(&command_id.to_string()) {
        headers.insert(COMMAND_ID.clone(), value);
    }
    match outcome {
        PublishOutcome::Replied(reply) => {
            let status =
                StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            headers.insert(
                IDEMPOTENT_REPLAYED.clone(),
                HeaderValue::from_static(if reply.replay { "true" } else { "false" }),
            );
            Ok((status, headers, Json(reply.body)).into_response())
        }
        PublishOutcome::Accepted => {
            // Recorded so that polling says "pending" rather than "unknown" until the result is
            // stored. If the database is down this is skipped: the command is safe in the queue.
            if let Err(error) = sqlx::query(
                "INSERT INTO command_receipts (id, principal, kind) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(command_id)
            .bind(&principal)
            .bind(kind)
            .execute(&state.pool)
            .await
            {
                tracing::warn!(%error, %command_id, "could not record the receipt of a pending command");
            }
            let location = format!("/v1/commands/{command_id}");
            if let Ok(value) = HeaderValue::from_str(&location) {
                headers.insert(header::LOCATION, value);
            }
            Ok((
                StatusCode::ACCEPTED,
                headers,
                Json(Accepted {
                    command_id,
                    status: PendingStatus::Pending,
                    location,
                }),
            )
                .into_response())
        }
    }
}

/// The body of a 202: the command is safe in the queue and will be applied; poll `location`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    pub command_id: Uuid,
    pub status: PendingStatus,
    /// `/v1/commands/{commandId}`.
    pub location: String,
}

/// A command that is accepted but whose result is not stored yet.
#[derive(Serialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum PendingStatus {
    Pending,
}

/// The worker did not answer in time: the command is accepted, not lost, and will be applied;
/// its status and result are at `Location`. A retry with the same Idempotency-Key is safe.
#[derive(ToResponse)]
#[response(headers(
    ("Location" = String, description = "`/v1/commands/{id}`: poll it for the result."),
    ("Idempotency-Key" = String, description = "The key used (generated when the request had none)."),
    ("X-Command-Id" = Uuid, description = "The command's id."),
))]
#[allow(dead_code)]
pub struct CommandAccepted(Accepted);

/// A command's status: its stored result, or pending.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum CommandStatus {
    Stored(StoredStatus),
    Pending(PendingCommandStatus),
}

/// A command whose result is stored.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredStatus {
    pub command_id: Uuid,
    /// `signup`, `top_up`, `bonus`, `purchase`, `gift`, `gift_delivery`, `reversal`,
    /// `referrer_bonus`.
    pub kind: String,
    /// `applied` or `rejected`.
    pub status: String,
    /// The HTTP status the command answered with.
    pub status_code: i16,
    #[schema(schema_with = crate::openapi::command_result_schema)]
    pub result: Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A command that was accepted (202) and whose result is not stored yet.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingCommandStatus {
    pub command_id: Uuid,
    pub kind: String,
    pub status: PendingStatus,
    pub accepted_at: chrono::DateTime<chrono::Utc>,
}

#[derive(sqlx::FromRow)]
struct StoredCommand {
    principal: String,
    kind: String,
    outcome: String,
    status_code: i16,
    body: sqlx::types::Json<Value>,
    created_at: chrono::DateTime<chrono::Utc>,
}

/// Status and result of a command
///
/// The command's owner (the player or API key that sent it, or the player a signup created) or
/// an admin sees it; to anyone else it does not exist.
#[utoipa::path(
    get,
    path = "/v1/commands/{id}",
    tag = "commands",
    params(("id" = String, Path, description = "The command id (`X-Command-Id`, or the end of a 202's `Location`).")),
    responses(
        (status = 200, description = "The stored result, or pending.", body = CommandStatus),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, description = "No such command, or not the caller's (`unknown_command`).", body = ErrorBody),
        (status = 429, response = crate::openapi::RateLimited),
        (status = 503, response = crate::openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = [])),
)]
pub async fn command_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CommandStatus>, ApiError> {
    let not_found = || ApiError::not_found("unknown_command", "no such command");
    let id: Uuid = id.parse().map_err(|_| not_found())?;
    let (owners, is_admin) = match &caller {
        Caller::Player(principal) => (
            vec![
                principal.command_principal(),
                format!("signup:{}", principal.username.to_lowercase()),
            ],
            principal.is_admin(),
        ),
        Caller::Key(key) => (vec![caller.command_principal()], key.has_scope("admin")),
    };
    let stored: Option<StoredCommand> = sqlx::query_as(
        "SELECT principal, kind, outcome, status_code, body, created_at FROM commands WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.pool)
    .await?;
    if let Some(stored) = stored {
        if !is_admin && !owners.contains(&stored.principal) {
            return Err(not_found());
        }
        return Ok(Json(CommandStatus::Stored(StoredStatus {
            command_id: id,
            kind: stored.kind,
            status: stored.outcome,
            status_code: stored.status_code,
            result: stored.body.0,
            created_at: stored.created_at,
        })));
    }
    let receipt: Option<(String, String, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT principal, kind, created_at FROM command_receipts WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.pool)
            .await?;
    match receipt {
        Some((owner, kind, created_at)) if is_admin || owners.contains(&owner) => {
            Ok(Json(CommandStatus::Pending(PendingCommandStatus {
                command_id: id,
                kind,
                status: PendingStatus::Pending,
                accepted_at: created_at,
            })))
        }
        _ => Err(not_found()),
    }
}
