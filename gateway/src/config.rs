use clap::Parser;
use shared::config::CommonConfig;

#[derive(Debug, Clone, Parser)]
#[command(name = "gateway", about = "The wallet's HTTP gateway")]
pub struct GatewayConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Address the HTTP server listens on.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: String,

    /// Secret for signing tokens (HS256) and keying request fingerprints. When unset a random
    /// one is made at start, so tokens do not survive a restart: set it in any real deployment.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// How long a token is valid.
    #[arg(long, env = "JWT_TTL_SECONDS", default_value_t = 24 * 60 * 60)]
    pub jwt_ttl_seconds: u64,

    /// Origins allowed by CORS (the seed's web front end), comma-separated.
    #[arg(long, env = "FRONTEND_URL", default_value = "http://localhost:5173")]
    pub frontend_url: String,

    /// How long a write waits for the worker's result before answering 202.
    #[arg(long, env = "REPLY_TIMEOUT_MS", default_value_t = 5_000)]
    pub reply_timeout_ms: u64,

    /// Largest amount a player may top up in one request.
    #[arg(long, env = "TOP_UP_MAX", default_value_t = 1_000_000)]
    pub top_up_max: i64,

    /// GEMS paid to the referee and to the referrer of a signup with a referral code.
    #[arg(long, env = "REFERRAL_BONUS", default_value_t = 50)]
    pub referral_bonus: i64,

    /// Largest request body accepted.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 16 * 1024)]
    pub body_limit_bytes: usize,

    /// Most commands waiting for a worker's answer at once; past it, writes get 503.
    #[arg(long, env = "IN_FLIGHT_MAX", default_value_t = 20_000)]
    pub in_flight_max: usize,

    /// Broker channels used for publishing (each with its own reply consumer). One by default:
    /// a worker sends one reply message per channel for each group it commits, so each channel
    /// more means more reply messages for the broker (measured together with uuid's `fast-rng`:
    /// 7-9 % more commands/s end to end with one channel than with four, BENCHMARKS.md).
    #[arg(long, env = "PUBLISHER_CHANNELS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub publisher_channels: u16,

    /// Most commands the gateway publishes as one message. The commands that wait for the same
    /// partition while its last message is being confirmed go together, so under load the broker
    /// handles one message per group of commands instead of one per command. 1 publishes every
    /// command alone in the format of workers older than command batches: use it while such
    /// workers still run (deploy workers first, then gateways).
    #[arg(long, env = "PUBLISH_BATCH_MAX", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1_024))]
    pub publish_batch_max: u16,

    /// Milliseconds a busy partition's next message waits for more commands after its first
    /// one; a partition is busy while its last message carried more than one command, so a
    /// quiet partition (a lone request) never waits. Fewer, larger messages cost the broker
    /// less: measured with 6 (BENCHMARKS.md, sixth session), 5.9 commands a message instead of
    /// 2.9 and about 10 % more commands/s in the closed loop. 0 turns it off.
    #[arg(long, env = "PUBLISH_LINGER_BUSY_MS", default_value_t = 6, value_parser = clap::value_parser!(u64).range(0..=50))]
    pub publish_linger_busy_ms: u64,

    /// Longest time any request may take before it is answered 503.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// Requests a player may make per second (sustained; the same number is the burst).
    #[arg(long, env = "RATE_LIMIT_PLAYER_PER_SECOND", default_value_t = 100)]
    pub rate_limit_player_per_second: u32,

    /// Requests an API key may make per second (sustained; the same number is the burst).
    #[arg(long, env = "RATE_LIMIT_KEY_PER_SECOND", default_value_t = 5_000)]
    pub rate_limit_key_per_second: u32,

    /// Login attempts per username per minute.
    #[arg(
        long,
        env = "LOGIN_ATTEMPTS_PER_USERNAME_PER_MINUTE",
        default_value_t = 10
    )]
    pub login_attempts_per_username_per_minute: u32,

    /// Login attempts per client address per minute (the TCP peer; a proxy in front counts as
    /// one address).
    #[arg(
        long,
        env = "LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE",
        default_value_t = 600
    )]
    pub login_attempts_per_address_per_minute: u32,

    /// Upper bound of the backoff between reconnection attempts.
    #[arg(long, env = "RETRY_BACKOFF_MAX_MS", default_value_t = 5_000)]
    pub retry_backoff_max_ms: u64,
}

impl GatewayConfig {
    pub fn from_common(common: CommonConfig) -> Self {
        let mut config = Self::parse_from(["gateway"]);
        config.common = common;
        config
    }
}
