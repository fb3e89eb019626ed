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

/// Deletes a test's queues and exchange. Tests call it when they finish: left to expire, quorum
/// queues were seen to stall RabbitMQ's new connections for up to a minute while the broker
/// deleted them, which made unrelated tests time out.
pub async fn delete_queues(config: &CommonConfig) {
    let topology = crate::broker::Topology::from_config(config);
    let Ok(connection) = crate::broker::connect(&config.amqp_url, "test cleanup").await else {
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        let mut queues: Vec<String> = (0..topology.partitions)
            .map(|partition| topology.partition_queue(partition))
            .collect();
        queues.push(topology.treasury_queue());
        queues.push(topology.dead_letter_queue());
        for queue in queues {
            drop(
                channel
                    .queue_delete(
                        queue.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await,
            );
        }
        drop(
            channel
                .exchange_delete(
                    topology.commands_exchange().as_str().into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await,
        );
        crate::broker::close_channel(&channel, "queues deleted").await;
    }
    crate::broker::close_connection(connection, "test finished").await;
}

/// Drops a test's database and deletes its queues when it goes out of scope, unless `run` did,
/// so a test that fails before its own clean-up leaves nothing behind (failed runs had left
/// dozens of `wallet_test_*` databases).
pub struct Cleanup {
    config: Option<CommonConfig>,
}

impl Cleanup {
    pub fn new(config: &CommonConfig) -> Self {
        Self {
            config: Some(config.clone()),
        }
    }

    /// Cleans up now, at the end of a test that got there.
    pub async fn run(&mut self) {
        if let Some(config) = self.config.take() {
            clean_up(&config).await;
        }
    }
}

async fn clean_up(config: &CommonConfig) {
    drop_database(&config.database_url).await;
    delete_queues(config).await;
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Some(config) = self.config.take() else {
            return;
        };
        // Dropped while a test unwinds, maybe on a runtime's thread: clean up on a thread with
        // a runtime of its own and wait for it.
        let cleanup = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(clean_up(&config));
            }
        });
        drop(cleanup.join());
    }
}
