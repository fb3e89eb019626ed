//! Operator endpoints: audit, partition ownership, dead letters.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::audit::AuditReport;
use shared::ownership::Ownership;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::state::AppState;

/// Most dead letters one listing returns.
pub const DEAD_LETTERS_PAGE_MAX: i64 = 200;
/// Longest payload excerpt a listing shows per dead letter.
const PAYLOAD_EXCERPT_BYTES_MAX: usize = 4_096;

/// `GET /v1/admin/audit`: every invariant of the books with its figures.
pub async fn audit(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<AuditReport>, ApiError> {
    Ok(Json(shared::audit::run(&state.pool).await?))
}

/// `GET /v1/admin/partitions`: which worker owns which partition, read from PostgreSQL's locks.
pub async fn partitions(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Ownership>, ApiError> {
    Ok(Json(
        shared::ownership::current(&state.pool, state.config.common.partitions).await?,
    ))
}

#[derive(Deserialize)]
pub struct DeadLetterQuery {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    limit: Option<i64>,
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

/// `GET /v1/admin/dead-letters?after=&limit=`: archived dead letters, oldest first.
pub async fn dead_letters(
    State(state): State<AppState>,
    _admin: Admin,
    Query(query): Query<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
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
    let items: Vec<Value> = rows
        .into_iter()
        .map(|row| {
            let excerpt = &row.payload[..row.payload.len().min(PAYLOAD_EXCERPT_BYTES_MAX)];
            json!({
                "id": row.id, "routingKey": row.routing_key, "reason": row.reason,
                "payload": String::from_utf8_lossy(excerpt), "payloadBytes": row.payload.len(),
                "messageId": row.message_id, "createdAt": row.created_at, "replayedAt": row.replayed_at,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items, "nextAfter": next })))
}

/// `POST /v1/admin/dead-letters/{id}/replay`: publishes the message again to its partition.
/// If it still cannot be applied it comes back as a new dead letter.
pub async fn replay_dead_letter(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<i64>,
) -> Result<Json<Value>, ApiError> {
    let row: Option<(String, Vec<u8>, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("SELECT routing_key, payload, replayed_at FROM dead_letters WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.pool)
            .await?;
    let Some((routing_key, payload, replayed_at)) = row else {
        return Err(ApiError::not_found(
            "unknown_dead_letter",
            "no such dead letter",
        ));
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
    Ok(Json(
        json!({ "id": id, "replayed": true, "routingKey": routing_key }),
    ))
}
