//! Database bootstrap: create the database when missing, run the migrations, check the partition
//! count and issue the initial supply. Every step is safe to run from several processes at once
//! and to run again.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{PgPool, Postgres};

use crate::SharedError;
use crate::config::CommonConfig;
use crate::domain::{GEMS, GENESIS_JOURNAL_ID, GENESIS_OWNER_ID, TREASURY_OWNER_ID};

/// How long a caller waits for a pooled connection before the request fails as unavailable.
pub const POOL_ACQUIRE_TIMEOUT_MS: u64 = 3_000;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connection options from a URL. The local server has TLS on with a self-signed certificate,
/// so a loopback URL that does not choose an sslmode gets `disable` instead of `prefer`.
pub fn connect_options(database_url: &str) -> Result<PgConnectOptions, SharedError> {
    let options = PgConnectOptions::from_str(database_url)?;
    let loopback = matches!(
        options.get_host(),
        "127.0.0.1" | "localhost" | "::1" | "[::1]"
    ) || options.get_host().starts_with('/');
    if loopback && !database_url.contains("sslmode=") {
        Ok(options.ssl_mode(PgSslMode::Disable))
    } else {
        Ok(options)
    }
}

/// Creates the database if it does not exist. Two processes racing here is fine: the loser
/// sees "already exists" and carries on.
pub async fn ensure_database(database_url: &str) -> Result<(), SharedError> {
    let url = with_loopback_sslmode(database_url);
    if Postgres::database_exists(&url).await? {
        return Ok(());
    }
    match Postgres::create_database(&url).await {
        Ok(()) => Ok(()),
        Err(sqlx::Error::Database(error))
            if matches!(error.code().as_deref(), Some("42P04" | "23505")) =>
        {
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

fn with_loopback_sslmode(database_url: &str) -> String {
    let loopback = database_url.contains("@127.0.0.1")
        || database_url.contains("@localhost")
        || database_url.contains("@[::1]");
    if loopback && !database_url.contains("sslmode=") {
        let separator = if database_url.contains('?') { '&' } else { '?' };
        format!("{database_url}{separator}sslmode=disable")
    } else {
        database_url.to_string()
    }
}

/// How a process's database sessions plan their queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planner {
    /// PostgreSQL's defaults: the gateway, whose reads include the audit's full scans.
    Default,
    /// Sequential scans off, for the worker and the treasury, whose every statement reads or
    /// writes rows by key. Their prepared statements get a generic plan from their sixth run
    /// on, kept for the life of the connection; made while a table is still small (a fresh
    /// database, the first seconds of load), that plan scans the whole table and keeps doing
    /// so as it grows: the profile of the purchase-hot benchmark showed the worker's dedup read
    /// scanning every stored result of `commands` on every batch (a sixth of the machine's
    /// CPU). With sequential scans off the planner takes the index path it has for each of
    /// those statements, however small the table was when the plan was made.
    ///
    /// JIT compilation is off too: with sequential scans off, every plan that still has one
    /// (a tiny table without a useful index) carries the planner's disable cost, far above
    /// `jit_above_cost`, so PostgreSQL compiled such statements with LLVM on every execution
    /// (the profile showed libLLVM in the database's samples). Point lookups never need JIT.
    PointLookups,
}

pub async fn connect(config: &CommonConfig) -> Result<PgPool, SharedError> {
    connect_with_planner(config, Planner::Default).await
}

pub async fn connect_with_planner(
    config: &CommonConfig,
    planner: Planner,
) -> Result<PgPool, SharedError> {
    let mut options = connect_options(&config.database_url)?;
    if planner == Planner::PointLookups {
        // Sent in the startup packet: no extra round trip.
        options = options.options([("enable_seqscan", "off"), ("jit", "off")]);
    }
    let pool = PgPoolOptions::new()
        .max_connections(config.database_connections_max)
        .acquire_timeout(Duration::from_millis(POOL_ACQUIRE_TIMEOUT_MS))
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Everything a process needs from the database before it serves: the database, the schema,
/// the partition count and the initial supply.
pub async fn bootstrap(config: &CommonConfig) -> Result<PgPool, SharedError> {
    bootstrap_with_planner(config, Planner::Default).await
}

/// `bootstrap` with sessions that plan as `planner` says.
pub async fn bootstrap_with_planner(
    config: &CommonConfig,
    planner: Planner,
) -> Result<PgPool, SharedError> {
    ensure_database(&config.database_url).await?;
    let pool = connect_with_planner(config, planner).await?;
    // sqlx takes an advisory lock around migrations, so concurrent starts apply them once.
    MIGRATOR.run(&pool).await?;
    check_partitions(&pool, config.partitions).await?;
    issue_initial_supply(&pool, config.treasury_initial_supply).await?;
    Ok(pool)
}

/// `bootstrap`, retried with backoff until it succeeds; None when `shutdown` came first.
pub async fn bootstrap_with_retry(
    config: &CommonConfig,
    planner: Planner,
    retry_backoff_max_ms: u64,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<PgPool> {
    let mut backoff = crate::backoff::Backoff::new(retry_backoff_max_ms);
    loop {
        match bootstrap_with_planner(config, planner).await {
            Ok(pool) => return Some(pool),
            Err(error) => {
                tracing::warn!(%error, "database not ready; retrying");
                if !backoff.sleep(shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// The partition count is fixed once per database: commands already queued are routed by it.
async fn check_partitions(pool: &PgPool, partitions: u16) -> Result<(), SharedError> {
    sqlx::query(
        "INSERT INTO settings (key, value) VALUES ('partitions', $1) ON CONFLICT DO NOTHING",
    )
    .bind(partitions.to_string())
    .execute(pool)
    .await?;
    let stored: String = sqlx::query_scalar("SELECT value FROM settings WHERE key = 'partitions'")
        .fetch_one(pool)
        .await?;
    if stored != partitions.to_string() {
        return Err(SharedError::Config(format!(
            "PARTITIONS is {partitions} but this database was created with {stored}; \
             partitions cannot change while commands are routed by them"
        )));
    }
    Ok(())
}

/// Issues the initial GEMS supply from genesis to the treasury, once per database. The journal
/// id is fixed, so a second start (or a concurrent one) inserts nothing.
async fn issue_initial_supply(pool: &PgPool, supply: i64) -> Result<(), SharedError> {
    if supply <= 0 {
        return Err(SharedError::Config(
            "TREASURY_INITIAL_SUPPLY must be positive".to_string(),
        ));
    }
    let mut transaction = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO journal_entries (id, kind, details) VALUES ($1, 'genesis', json_build_object('supply', $2::bigint))
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(GENESIS_JOURNAL_ID)
    .bind(supply)
    .execute(&mut *transaction)
    .await?
    .rows_affected();
    if inserted == 1 {
        // genesis is not hot, so its balance moves with its posting; the treasury's leg is a hot
        // credit that the treasury consumer folds like any other.
        sqlx::query(
            "WITH genesis AS (SELECT id FROM accounts WHERE owner_id = $1 AND asset = $3),
                  treasury AS (SELECT id FROM accounts WHERE owner_id = $2 AND asset = $3),
                  posted AS (
                      INSERT INTO postings (journal_id, account_id, asset, amount)
                      SELECT $4, genesis.id, $3, -$5::bigint FROM genesis
                      UNION ALL
                      SELECT $4, treasury.id, $3, $5::bigint FROM treasury
                  ),
                  credited AS (
                      INSERT INTO hot_credits (account_id, amount) SELECT id, $5::bigint FROM treasury
                  )
             UPDATE accounts SET balance = balance - $5::bigint, version = version + 1
             WHERE owner_id = $1 AND asset = $3",
        )
        .bind(GENESIS_OWNER_ID)
        .bind(TREASURY_OWNER_ID)
        .bind(GEMS)
        .bind(GENESIS_JOURNAL_ID)
        .bind(supply)
        .execute(&mut *transaction)
        .await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// True when the error is worth retrying unchanged later: the connection, the pool, the server
/// shutting down, or a serialization conflict. Anything else is a problem with the data.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(database_error) => matches!(
            database_error.code().as_deref().map(|code| &code[..2]),
            // 08 connection, 40 serialization/deadlock, 53 resources, 57 operator intervention
            // (shutdown), 58 system error.
            Some("08" | "40" | "53" | "57" | "58")
        ),
        _ => false,
    }
}
