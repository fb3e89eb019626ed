//! Configuration shared by every process. Each value is an environment variable with a matching
//! `--flag`; the defaults work against a local PostgreSQL and RabbitMQ.

use clap::Args;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/wallet";
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Debug, Clone, Args)]
pub struct CommonConfig {
    /// PostgreSQL connection URL. The database is created when it does not exist.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,

    /// RabbitMQ connection URL.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub amqp_url: String,

    /// Number of command partitions. Fixed for the life of a database: every process checks it
    /// against the value stored on first start and refuses to run with another.
    #[arg(long, env = "PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,

    /// Prefix for every exchange and queue name, so several systems (or tests) share one broker.
    #[arg(long, env = "QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,

    /// When set, queues are deleted by the broker after this long without consumers. Meant for
    /// tests and throwaway environments; production queues never expire.
    #[arg(long, env = "QUEUE_EXPIRES_MS")]
    pub queue_expires_ms: Option<u32>,

    /// Maximum PostgreSQL connections of this process.
    #[arg(long, env = "DATABASE_CONNECTIONS_MAX", default_value_t = 10)]
    pub database_connections_max: u32,

    /// Initial GEMS supply issued from genesis to the treasury on first start.
    #[arg(long, env = "TREASURY_INITIAL_SUPPLY", default_value_t = 2_000_000_000)]
    pub treasury_initial_supply: i64,

    /// Where workers and the treasury serve Prometheus metrics (`/metrics`); unset serves none.
    /// The gateway serves them on its own HTTP address.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// Log format: "text" for people, "json" for log pipelines.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

impl CommonConfig {
    /// A configuration with every default, for tests and tools.
    pub fn with_defaults() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_string(),
            amqp_url: DEFAULT_AMQP_URL.to_string(),
            partitions: 16,
            queue_prefix: String::new(),
            queue_expires_ms: None,
            database_connections_max: 10,
            treasury_initial_supply: 2_000_000_000,
            metrics_addr: None,
            log_format: "text".to_string(),
        }
    }
}
