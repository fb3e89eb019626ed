//! Operator endpoints: audit, partition ownership, dead letters.

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use shared::audit::AuditReport;
use shared::ownership::Ownership;
use shared::results::ErrorBody;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Admin;
use crate::body::QueryParams;
use crate::error::ApiError;
use crate::openapi;
use crate::state::AppState;

/// Most dead letters one listing returns.
pub const DEAD_LETTERS_PAGE_MAX: i64 = 200;
/// Longest payload excerpt a listing shows per dead letter.
const PAYLOAD_EXCERPT_BYTES_MAX: usize = 4_096;

/// Audit the books
///
/// Every invariant of the books with its figures, checked in one snapshot.
#[utoipa::path(
    get,
    path = "/v1/admin/audit",
    tag = "admin",
    responses(
        (status = 200, description = "The audit; `passed` is false when any check fails.", body = AuditReport),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["admin"])),
)]
pub async fn audit(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<AuditReport>, ApiError> {
    Ok(Json(shared::audit::run(&state.pool).await?))
}

/// Partition owners
///
/// Which worker owns which partition, read from PostgreSQL's advisory locks.
#[utoipa::path(
    get,
    path = "/v1/admin/partitions",
    tag = "admin",
    responses(
        (status = 200, description = "Every partition with its owner (null when none), and the live workers.", body = Ownership),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["admin"])),
)]
pub async fn partitions(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Ownership>, ApiError> {
    Ok(Json(
        shared::ownership::current(&state.pool, state.config.common.partitions).await?,
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// The `nextAfter` of the previous page: dead letters with a larger id.
    #[serde(default)]
    after: Option<i64>,
    /// Dead letters per page, clamped to 1..200 (default 50).
    #[serde(default)]
    limit: Option<i64>,
}

/// An archived dead letter.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterItem {
    pub id: i64,
    /// The partition routing key it was published with; a replay goes there.
    pub routing_key: String,
    /// Why it was set aside (`undecodable message: ...`, `unknown command version 99`, ...).
    pub reason: String,
    /// The message, up to its first 4,096 bytes, as UTF-8 (invalid bytes replaced).
    pub payload: String,
    /// The message's full length.
    pub payload_bytes: usize,
    #[schema(required = true)]
    pub message_id: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When it was replayed; null while it was not.
    #[schema(required = true)]
    pub replayed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A page of dead letters, oldest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetterItem>,
    /// Pass as `after` for the next page; null on the last page.
    #[schema(required = true)]
    pub next_after: Option<i64>,
}

/// A dead letter published again.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterReplayed {
    pub id: i64,
    /// Always true.
    pub replayed: bool,
    pub routing_key: String,
}

#[derive(sqlx::FromRow)]
struct DeadLetter {
    id: i64,
    routing_key: String,
    reason: String,
    payload: Vec<u8>,
    message_id: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    replayed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Dead letters
///
/// Archived poison messages (undecodable, unknown version, or failing every retry), oldest
/// first.
#[utoipa::path(
    get,
    path = "/v1/admin/dead-letters",
    tag = "admin",
    params(DeadLetterQuery),
    responses(
        (status = 200, description = "A page of dead letters.", body = DeadLetterPage),
        (status = 400, description = "A malformed query parameter (`invalid_body`).", body = ErrorBody),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["admin"])),
)]
pub async fn dead_letters(
    State(state): State<AppState>,
    _admin: Admin,
    QueryParams(query): QueryParams<DeadLetterQuery>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let limit = query.limit.unwrap_or(50).clamp(1, DEAD_LETTERS_PAGE_MAX);
    let rows: Vec<DeadLetter> = sqlx::query_as(
        "SELECT id, routing_key, reason, payload, message_id, created_at, replayed_at
         FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(query.after.unwrap_or(0))
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|row| row.id))
        .flatten();
    let items = rows
        .into_iter()
        .map(|row| {
            let excerpt = &row.payload[..row.payload.len().min(PAYLOAD_EXCERPT_BYTES_MAX)];
            DeadLetterItem {
                id: row.id,
                routing_key: row.routing_key,
                reason: row.reason,
                payload: String::from_utf8_lossy(excerpt).into_owned(),
                payload_bytes: row.payload.len(),
                message_id: row.message_id,
                created_at: row.created_at,
                replayed_at: row.replayed_at,
            }
        })
        .collect();
    Ok(Json(DeadLetterPage {
        items,
        next_after: next,
    }))
}

/// Replay a dead letter
///
/// Publishes the message again to its partition, once. If it still cannot be applied it comes
/// back as a new dead letter.
#[utoipa::path(
    post,
    path = "/v1/admin/dead-letters/{id}/replay",
    tag = "admin",
    params(("id" = i64, Path, description = "The dead letter's id.")),
    responses(
        (status = 200, description = "Published again.", body = DeadLetterReplayed),
        (status = 401, response = openapi::Unauthorized),
        (status = 403, response = openapi::Forbidden),
        (status = 404, description = "No such dead letter (`unknown_dead_letter`).", body = ErrorBody),
        (status = 409, description = "It was already replayed (`already_replayed`).", body = ErrorBody),
        (status = 429, response = openapi::RateLimited),
        (status = 503, response = openapi::Unavailable),
    ),
    security(("playerToken" = []), ("apiKey" = ["admin"])),
)]
pub async fn replay_dead_letter(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterReplayed>, ApiError> {
    let unknown = || ApiError::not_found("unknown_dead_letter", "no such dead letter");
    let id: i64 = id.parse().map_err(|_| unknown())?;
    let row: Option<(String, Vec<u8>, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT routing_key, payload, replayed_at FROM dead_letters WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.pool)
            .await?;
    let Some((routing_key, payload, replayed_at)) = row else {
        return Err(unknown());
    };
    if replayed_at.is_some() {
        return Err(ApiError::Conflict {
            code: "already_replayed",
            message: "this dead letter was already replayed".to_string(),
        });
    }
    state.publisher.publish_raw(&routing_key, &payload).await?;
    sqlx::query("UPDATE dead_letters SET replayed_at = now() WHERE id = $1")
        .bind(id)
        .execute(&state.pool)
        .await?;
    tracing::info!(dead_letter = id, %routing_key, "replayed a dead letter");
    Ok(Json(DeadLetterReplayed {
        id,
        replayed: true,
        routing_key,
    }))
}
