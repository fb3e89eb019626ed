use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// How long the health check waits for the database.
const DATABASE_PROBE_TIMEOUT_MS: u64 = 1_000;

/// The gateway's health and that of its dependencies.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `UP` when every dependency is connected.
    pub status: HealthStatus,
    pub database: Connection,
    pub broker: Connection,
}

#[derive(Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum HealthStatus {
    Up,
    Down,
}

#[derive(Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Connection {
    Connected,
    Disconnected,
}

impl Connection {
    fn from_up(up: bool) -> Self {
        if up {
            Self::Connected
        } else {
            Self::Disconnected
        }
    }
}

/// Health of the gateway and its dependencies
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "The database and the broker are connected.", body = Health),
        (status = 503, description = "A dependency is down; the body names which.", body = Health),
    ),
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let database_up = tokio::time::timeout(
        Duration::from_millis(DATABASE_PROBE_TIMEOUT_MS),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await
    .is_ok_and(|result| result.is_ok());
    let broker_up = state.publisher.is_connected();
    let (status, health) = if database_up && broker_up {
        (StatusCode::OK, HealthStatus::Up)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, HealthStatus::Down)
    };
    (
        status,
        Json(Health {
            status: health,
            database: Connection::from_up(database_up),
            broker: Connection::from_up(broker_up),
        }),
    )
}
