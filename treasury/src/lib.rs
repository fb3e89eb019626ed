//! The treasury consumer: folds the credits owed to hot system accounts into their cached
//! balances, in batches, exactly once. Workers never lock a hot account; they write hot credits
//! in their own transaction and nudge this consumer. Folding a credit deletes its row, so a
//! redelivered nudge finds nothing left to fold.

mod dead_letters;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use shared::backoff::Backoff;
use shared::broker::Topology;
use shared::config::CommonConfig;
use shared::db::is_transient;
use shared::wire::TreasuryMessage;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Parser)]
#[command(name = "treasury", about = "Folds hot-account credits into balances")]
pub struct TreasuryConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Largest number of nudges folded in one transaction.
    #[arg(long, env = "TREASURY_BATCH_SIZE_MAX", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub treasury_batch_size_max: u16,

    /// Longest wait for more nudges after the first one of a batch arrived.
    #[arg(long, env = "TREASURY_BATCH_WAIT_MS", default_value_t = 20)]
    pub treasury_batch_wait_ms: u64,

    /// How often credits whose nudge never arrived are folded anyway.
    #[arg(long, env = "TREASURY_SWEEP_INTERVAL_MS", default_value_t = 1_000)]
    pub treasury_sweep_interval_ms: u64,

    /// How often the depth of every queue is sampled for the `wallet_queue_messages` metric.
    #[arg(long, env = "QUEUE_DEPTH_INTERVAL_MS", default_value_t = 5_000)]
    pub queue_depth_interval_ms: u64,

    /// Upper bound of the backoff between retries when PostgreSQL or RabbitMQ is unavailable.
    #[arg(long, env = "RETRY_BACKOFF_MAX_MS", default_value_t = 5_000)]
    pub retry_backoff_max_ms: u64,
}

impl TreasuryConfig {
    pub fn from_common(common: CommonConfig) -> Self {
        let mut config = Self::parse_from(["treasury"]);
        config.common = common;
        config
    }
}

/// Credits older than this are folded by the sweep even without a nudge.
const SWEEP_AGE_MS: i64 = 500;
/// Most credits one sweep folds, so one transaction stays short.
const SWEEP_CREDITS_MAX: i64 = 20_000;

/// Folds the given credits: deletes them and adds their sums to the hot balances, in one
/// statement. Returns how many credits were folded (0 for a redelivered nudge).
pub async fn fold_credits(
    transaction: &mut Transaction<'_, Postgres>,
    credit_ids: &[i64],
) -> Result<u64, sqlx::Error> {
    let folded: i64 = sqlx::query_scalar(
        "WITH folded AS (
             DELETE FROM hot_credits WHERE id = ANY($1) RETURNING account_id, amount
         ), sums AS (
             SELECT account_id, sum(amount)::bigint AS delta, count(*) AS credits
             FROM folded GROUP BY account_id
         ), updated AS (
             UPDATE accounts AS a SET balance = a.balance + s.delta, version = a.version + 1
             FROM sums s WHERE a.id = s.account_id
             RETURNING s.credits
         )
         SELECT coalesce(sum(credits), 0)::bigint FROM updated",
    )
    .bind(credit_ids)
    .fetch_one(&mut **transaction)
    .await?;
    Ok(u64::try_from(folded).unwrap_or(0))
}

/// Folds credits that have waited longer than the sweep age, whatever became of their nudge.
pub async fn sweep(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut transaction = pool.begin().await?;
    let stale: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM hot_credits
         WHERE created_at < now() - make_interval(secs => $1::float8 / 1000)
         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(SWEEP_AGE_MS as f64)
    .bind(SWEEP_CREDITS_MAX)
    .fetch_all(&mut *transaction)
    .await?;
    let folded = fold_credits(&mut transaction, &stale).await?;
    transaction.commit().await?;
    Ok(folded)
}

/// Credits not yet folded: how many, and their signed sum.
pub async fn lag(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as("SELECT count(*), coalesce(sum(amount), 0)::bigint FROM hot_credits")
        .fetch_one(pool)
        .await
}

/// Runs the treasury consumer until `shutdown` is cancelled.
pub async fn run(config: TreasuryConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(config.retry_backoff_max_ms);
    let Some(pool) = shared::db::bootstrap_with_retry(
        &config.common,
        shared::db::Planner::PointLookups,
        config.retry_backoff_max_ms,
        &shutdown,
    )
    .await
    else {
        return Ok(());
    };
    let topology = Topology::from_config(&config.common);
    tracing::info!("treasury started");
    shared::metrics::install_and_serve(config.common.metrics_addr.clone(), &shutdown);
    let archiver = tokio::spawn(dead_letters::run_archiver(
        config.common.amqp_url.clone(),
        pool.clone(),
        topology.clone(),
        config.retry_backoff_max_ms,
        shutdown.clone(),
    ));
    let depth_sampler = tokio::spawn(run_queue_depths(
        config.common.amqp_url.clone(),
        topology.clone(),
        Duration::from_millis(
            config
                .queue_depth_interval_ms
                .max(QUEUE_DEPTH_INTERVAL_MIN_MS),
        ),
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn(run_sweep(
        pool.clone(),
        Duration::from_millis(config.treasury_sweep_interval_ms),
        shutdown.clone(),
    ));
    backoff.reset();
    while !shutdown.is_cancelled() {
        match consume(&config, &pool, &topology, &shutdown).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "treasury consumer lost its connection; reconnecting"
                );
                if !backoff.sleep(&shutdown).await {
                    break;
                }
            }
        }
    }
    drop(sweeper.await);
    drop(archiver.await);
    drop(depth_sampler.await);
    pool.close().await;
    tracing::info!("treasury stopped");
    Ok(())
}

/// Queue depths are never sampled more often than this, whatever the configuration says.
const QUEUE_DEPTH_INTERVAL_MIN_MS: u64 = 500;
/// One sample of every queue's depth (connecting included) gives up after this long.
const QUEUE_DEPTH_TIMEOUT_MS: u64 = 3_000;

/// Publishes every queue's depth as metrics from this process (one per deployment).
async fn run_queue_depths(
    amqp_url: String,
    topology: Topology,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut probe = shared::broker::QueueDepthProbe::new(&amqp_url, "treasury-queue-depths");
    let timeout = Duration::from_millis(QUEUE_DEPTH_TIMEOUT_MS);
    loop {
        match probe.sample(&topology, timeout, timeout).await {
            Ok(depths) => shared::broker::record_queue_depths(&depths),
            Err(error) => tracing::debug!(%error, "could not sample queue depths"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
    }
    probe.close("treasury stopping").await;
}

async fn run_sweep(pool: PgPool, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match sweep(&pool).await {
            Ok(0) => {}
            Ok(folded) => {
                metrics::counter!("wallet_treasury_credits_folded_total").increment(folded);
                tracing::debug!(folded, "treasury sweep folded credits");
            }
            Err(error) => tracing::warn!(%error, "treasury sweep failed"),
        }
        match lag(&pool).await {
            Ok((credits, amount)) => {
                metrics::gauge!("wallet_treasury_lag_credits").set(credits as f64);
                metrics::gauge!("wallet_treasury_lag_amount").set(amount as f64);
            }
            Err(error) => tracing::warn!(%error, "could not measure the treasury lag"),
        }
    }
}

async fn consume(
    config: &TreasuryConfig,
    pool: &PgPool,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let connection = shared::broker::connect(&config.common.amqp_url, "treasury")
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    topology
        .declare(&channel)
        .await
        .context("declaring the topology")?;
    let batch_size_max = usize::from(config.treasury_batch_size_max);
    // Prefetch two batches so the next one is on its way while this one commits.
    channel
        .basic_qos(
            u16::try_from(batch_size_max * 2).unwrap_or(u16::MAX),
            BasicQosOptions { global: false },
        )
        .await
        .context("setting prefetch")?;
    let queue = topology.treasury_queue();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "treasury".into(),
            // Manual acknowledgement after the fold commits; the queue's single active consumer
            // keeps one treasury folding at a time (two would still be correct, only slower).
            BasicConsumeOptions {
                no_local: false,
                no_ack: false,
                exclusive: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
        .context("consuming the treasury queue")?;
    let batch_wait = Duration::from_millis(config.treasury_batch_wait_ms);
    let mut backoff = Backoff::new(config.retry_backoff_max_ms);
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        let Some(first) = first else {
            anyhow::bail!("the treasury consumer was cancelled by the broker");
        };
        let mut batch = vec![first.context("receiving a delivery")?];
        let deadline = tokio::time::Instant::now() + batch_wait;
        while batch.len() < batch_size_max {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(delivery)) => batch.push(delivery.context("receiving a delivery")?),
                Ok(None) | Err(_) => break,
            }
        }
        let mut credit_ids: Vec<i64> = Vec::new();
        let mut request_ids: Vec<String> = Vec::new();
        for delivery in &batch {
            match serde_json::from_slice::<TreasuryMessage>(&delivery.data) {
                Ok(message) => {
                    credit_ids.extend(message.credit_ids);
                    request_ids.extend(message.request_ids);
                }
                Err(error) => {
                    // A nudge only names credits that the sweep folds anyway, so an unreadable
                    // one loses nothing; it is logged and acknowledged with its batch.
                    tracing::warn!(%error, "unreadable treasury message");
                }
            }
        }
        backoff.reset();
        loop {
            let attempt = async {
                let mut transaction = pool.begin().await?;
                let folded = fold_credits(&mut transaction, &credit_ids).await?;
                transaction.commit().await?;
                Ok::<u64, sqlx::Error>(folded)
            };
            match attempt.await {
                Ok(folded) => {
                    metrics::counter!("wallet_treasury_credits_folded_total").increment(folded);
                    // The request ids follow each command from its HTTP request through the
                    // worker to here (LOG_FORMAT=json makes them searchable; RUST_LOG=debug).
                    tracing::debug!(
                        nudges = batch.len(),
                        folded,
                        request_ids = ?request_ids,
                        "treasury batch folded"
                    );
                    break;
                }
                Err(error) if is_transient(&error) => {
                    tracing::warn!(%error, "database unavailable; treasury paused");
                    if !backoff.sleep(shutdown).await {
                        // Unacknowledged nudges return to the queue when the channel closes.
                        shared::broker::close_connection(connection, "treasury stopping").await;
                        return Ok(());
                    }
                }
                Err(error) => {
                    // Folding only adds committed sums; a data error here (an overflowing hot
                    // balance) needs an operator. The credits stay unfolded and the audit
                    // still balances; the nudges are acknowledged so the queue does not clog.
                    tracing::error!(%error, "treasury could not fold credits");
                    break;
                }
            }
        }
        if let Some(last) = batch.last() {
            channel
                .basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .context("acknowledging treasury nudges")?;
        }
    }
    shared::broker::close_connection(connection, "treasury stopping").await;
    Ok(())
}
