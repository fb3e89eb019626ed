use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::state::AppState;

/// How long the health check waits for the database.
const DATABASE_PROBE_TIMEOUT_MS: u64 = 1_000;

pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database_up = tokio::time::timeout(
        Duration::from_millis(DATABASE_PROBE_TIMEOUT_MS),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await
    .is_ok_and(|result| result.is_ok());
    let broker_up = state.publisher.is_connected();
    let status = if database_up && broker_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let name = |up: bool| if up { "CONNECTED" } else { "DISCONNECTED" };
    (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "UP" } else { "DOWN" },
            "database": name(database_up),
            "broker": name(broker_up),
        })),
    )
}
