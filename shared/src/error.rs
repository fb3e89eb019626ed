use thiserror::Error;

/// Errors of the shared plumbing (bootstrap, broker, database).
#[derive(Debug, Error)]
pub enum SharedError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("configuration error: {0}")]
    Config(String),
}
