use std::sync::Arc;

use sqlx::PgPool;

use crate::auth::{Passwords, Tokens};
use crate::config::GatewayConfig;
use crate::publisher::Publisher;

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub publisher: Arc<Publisher>,
    pub tokens: Arc<Tokens>,
    pub passwords: Arc<Passwords>,
    pub config: Arc<GatewayConfig>,
    pub api_keys: Arc<crate::api_keys::KeyCache>,
    pub limits: Arc<crate::limits::Limits>,
    /// Key for request fingerprints (HMAC), derived from the JWT secret.
    pub fingerprint_key: Arc<Vec<u8>>,
}
