//! Helpers for tests that need their own database and broker namespace on the real servers.

use crate::config::CommonConfig;

/// Server URLs the tests use, overridable for machines where the services live elsewhere.
pub fn postgres_server_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| crate::config::DEFAULT_AMQP_URL.to_string())
}

/// A configuration with a database and a queue prefix of its own, so tests run in parallel.
/// Queues expire by themselves a while after the test stops consuming them.
pub fn isolated_config(partitions: u16) -> CommonConfig {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    let mut config = CommonConfig::with_defaults();
    config.database_url = format!("{}/wallet_test_{unique}", postgres_server_url());
    config.amqp_url = amqp_url();
    config.queue_prefix = format!("test.{}.", &unique[..12]);
    config.queue_expires_ms = Some(120_000);
    config.partitions = partitions;
    config.database_connections_max = 8;
    config
}

/// Drops a test database, disconnecting whoever still uses it.
pub async fn drop_database(database_url: &str) {
    let Some((server, name)) = database_url.rsplit_once('/') else {
        return;
    };
    let Ok(options) = crate::db::connect_options(&format!("{server}/postgres")) else {
        return;
    };
    if let Ok(pool) = sqlx::PgPool::connect_with(options).await {
        let statement = format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            name.replace('"', "")
        );
        drop(
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&pool)
                .await,
        );
        pool.close().await;
    }
}
