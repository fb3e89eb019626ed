//! The worker: consumes partition queues and applies their commands in batches, each batch one
//! PostgreSQL transaction, then publishes what the batch owes (replies, follow-ups, treasury
//! nudges) and acknowledges. Only the worker writes player balances.

pub mod apply;
mod consumer;
mod group;
mod nudges;
mod ownership;
mod replies;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use shared::backoff::Backoff;
use shared::broker::Topology;
use shared::config::CommonConfig;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "worker",
    about = "Applies wallet commands from the partition queues"
)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Largest number of commands in one partition batch: applied in one transaction on its
    /// own, or as one part of a group. It only binds when a partition has a backlog (under live
    /// load a batch holds a few commands). Then 512 rather than 256 lets fewer partitions fill a
    /// group: measured with the worker alone (BENCHMARKS.md, tenth session), groups of 1,980
    /// commands instead of 1,249 and a median of 19.0k commands/s instead of 16.7k.
    #[arg(long, env = "BATCH_SIZE_MAX", default_value_t = 512, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub batch_size_max: u16,

    /// Longest wait for more commands after the first one of a batch arrived. With 0 a batch is
    /// whatever has already arrived, never waiting: under load the commands that arrive while
    /// one batch is applied make the next one, so batches still grow with the load. Measured
    /// (BENCHMARKS.md): one client's p50 went from 6.5 ms (2 ms wait) to 4.3 ms, with the same
    /// closed-loop throughput.
    #[arg(long, env = "BATCH_WAIT_MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub batch_wait_ms: u64,

    /// Group commit: the batches this worker's partitions have ready at the same moment are
    /// applied in one transaction, up to this many commands (a group stops taking batches once
    /// it holds that many). 0 turns it off: every partition commits its own batches.
    #[arg(long, env = "GROUP_COMMANDS_MAX", default_value_t = 2_048, value_parser = clap::value_parser!(u32).range(0..=16_384))]
    pub group_commands_max: u32,

    /// How many group transactions this worker may run at once: while one commits, the next
    /// applies. See GROUP_OVERLAP_COMMANDS_MIN for when a second one starts.
    #[arg(long, env = "GROUP_COMMITTERS", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub group_committers: u8,

    /// A group starts while another committer is busy only when it holds at least this many
    /// commands; a smaller one waits until no other committer is busy, gathering what arrives.
    /// Under a steady load this keeps groups large (two small transactions cost more than one
    /// larger one on a busy machine); with a backlog two large groups overlap.
    #[arg(long, env = "GROUP_OVERLAP_COMMANDS_MIN", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=16_384))]
    pub group_overlap_commands_min: u16,

    /// Once no other group is being applied, how long a group waits at most for the partitions
    /// the last group answered to hand their next batch (or say they have none). Without it a
    /// partition takes part in every other group only: the next group starts the moment the
    /// last one ends, while its partitions are still acknowledging (BENCHMARKS.md, profile item
    /// 23). 0 never waits.
    #[arg(long, env = "GROUP_RETURN_WAIT_US", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub group_return_wait_us: u64,

    /// How often unpublished follow-ups are looked for and republished.
    #[arg(long, env = "OUTBOX_SWEEP_INTERVAL_MS", default_value_t = 2_000)]
    pub outbox_sweep_interval_ms: u64,

    /// Follow-ups younger than this are left to the worker that wrote them.
    #[arg(long, env = "OUTBOX_SWEEP_AGE_MS", default_value_t = 5_000)]
    pub outbox_sweep_age_ms: u64,

    /// The treasury hears of committed hot credits at most once per this interval from each
    /// worker (one nudge for every batch committed meanwhile); 0 sends one per batch.
    #[arg(long, env = "TREASURY_NUDGE_INTERVAL_MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    pub treasury_nudge_interval_ms: u64,

    /// Upper bound of the backoff between retries when PostgreSQL or RabbitMQ is unavailable.
    #[arg(long, env = "RETRY_BACKOFF_MAX_MS", default_value_t = 5_000)]
    pub retry_backoff_max_ms: u64,

    /// How often the worker compares what it owns with its fair share of the partitions.
    #[arg(long, env = "REBALANCE_INTERVAL_MS", default_value_t = 1_000)]
    pub rebalance_interval_ms: u64,

    /// Name of this worker in logs and on the broker; defaults to host and process id.
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
}

impl WorkerConfig {
    pub fn from_common(common: CommonConfig) -> Self {
        let mut config = Self::parse_from(["worker"]);
        config.common = common;
        config
    }

    fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|name| name.trim().to_string())
                .unwrap_or_else(|_| "worker".to_string());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Runs the worker until `shutdown` is cancelled. Reconnects to PostgreSQL and RabbitMQ by
/// itself; an in-flight batch finishes (or is left unacknowledged) before it returns.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let worker_id = config.worker_id();
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
    tracing::info!(%worker_id, partitions = config.common.partitions, "worker started");
    shared::metrics::install_and_serve(config.common.metrics_addr.clone(), &shutdown);

    backoff.reset();
    while !shutdown.is_cancelled() {
        match run_connected(&config, &worker_id, &pool, &topology, &shutdown).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "broker connection lost; reconnecting"
                );
                if !backoff.sleep(&shutdown).await {
                    break;
                }
            }
        }
    }
    pool.close().await;
    tracing::info!(%worker_id, "worker stopped");
    Ok(())
}

/// One broker connection's life: the partitions this worker owns (rebalanced every tick) and
/// the outbox sweep. Returns Ok on shutdown and Err when the broker or the lock session failed;
/// either way every partition is released first.
async fn run_connected(
    config: &WorkerConfig,
    worker_id: &str,
    pool: &sqlx::PgPool,
    topology: &Topology,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let connection =
        shared::broker::connect(&config.common.amqp_url, &format!("worker {worker_id}"))
            .await
            .context("connecting to RabbitMQ")?;
    let setup = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    topology
        .declare(&setup)
        .await
        .context("declaring the topology")?;
    drop(setup.close(200, "declared".into()).await);
    let mut locks = ownership::LockSession::connect(&config.common, worker_id).await?;

    let stop = shutdown.child_token();
    let sweep_channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    // The channels of the long-running tasks, closed before the connection at the end.
    let mut task_channels = vec![sweep_channel.clone()];
    let sweep = tokio::spawn(consumer::sweep_outbox(
        pool.clone(),
        sweep_channel,
        topology.clone(),
        Duration::from_millis(config.outbox_sweep_interval_ms),
        Duration::from_millis(config.outbox_sweep_age_ms),
        stop.clone(),
    ));
    // Treasury nudges go on their own channel, without publisher confirms, coalesced (see
    // `nudges`).
    let nudge_channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    task_channels.push(nudge_channel.clone());
    let (nudges, nudger) = nudges::Nudges::spawn(
        nudge_channel,
        topology.clone(),
        Duration::from_millis(config.treasury_nudge_interval_ms),
        stop.clone(),
    );
    let context = std::sync::Arc::new(apply::ApplyContext::new(topology.partitions));
    let (group, committers) = if config.group_commands_max == 0 {
        (None, Vec::new())
    } else {
        let mut channels = Vec::with_capacity(usize::from(config.group_committers));
        for _ in 0..config.group_committers {
            channels.push(
                connection
                    .create_channel()
                    .await
                    .context("opening a channel")?,
            );
        }
        task_channels.extend(channels.iter().cloned());
        let (group, committers) = group::Committers {
            pool: pool.clone(),
            nudges: nudges.clone(),
            topology: topology.clone(),
            context: std::sync::Arc::clone(&context),
            commands_max: usize::try_from(config.group_commands_max).unwrap_or(usize::MAX),
            overlap_commands_min: usize::from(config.group_overlap_commands_min),
            return_wait: Duration::from_micros(config.group_return_wait_us),
        }
        .spawn(channels)
        .await
        .context("starting the group committers")?;
        (Some(group), committers)
    };
    let mut owned = ownership::OwnedPartitions::default();
    let spawn_partition = |partition: u16, channel: lapin::Channel, stop: CancellationToken| {
        let partition_consumer = consumer::PartitionConsumer {
            pool: pool.clone(),
            channel,
            nudges: nudges.clone(),
            topology: topology.clone(),
            partition,
            batch_size_max: usize::from(config.batch_size_max),
            batch_wait: Duration::from_millis(config.batch_wait_ms),
            retry_backoff_max_ms: config.retry_backoff_max_ms,
            consumer_tag: format!("{worker_id}/p{partition}"),
            context: std::sync::Arc::clone(&context),
            group: group.clone(),
        };
        tokio::spawn(partition_consumer.run(stop))
    };
    let mut tick = tokio::time::interval(Duration::from_millis(config.rebalance_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            _ = tick.tick() => {}
        }
        if let Some(failure) = owned.take_failure().await {
            break Err(failure.context("a partition consumer failed"));
        }
        if sweep.is_finished() {
            break Err(anyhow::anyhow!("the outbox sweep stopped"));
        }
        if nudger.is_finished() {
            break Err(anyhow::anyhow!("the treasury nudges stopped"));
        }
        if committers.iter().any(tokio::task::JoinHandle::is_finished) {
            break Err(anyhow::anyhow!("a group committer stopped"));
        }
        let target = match locks.fair_share(topology.partitions).await {
            Ok(target) => target,
            Err(error) => break Err(error.context("the ownership lock session failed")),
        };
        if let Err(error) = owned
            .rebalance(
                &mut locks,
                target,
                topology.partitions,
                worker_id,
                |partition, stop| {
                    let connection = &connection;
                    let spawn_partition = &spawn_partition;
                    async move {
                        let channel = connection
                            .create_channel()
                            .await
                            .context("opening a channel")?;
                        Ok(spawn_partition(partition, channel, stop))
                    }
                },
            )
            .await
        {
            break Err(error);
        }
    };
    stop.cancel();
    owned.release_all().await;
    // The committers end once no partition can hand them a batch any more.
    drop(group);
    for committer in committers {
        match committer.await {
            Ok(Err(error)) => {
                tracing::warn!(error = format!("{error:#}"), "a group committer failed")
            }
            Err(error) => tracing::warn!(%error, "a group committer panicked"),
            Ok(Ok(())) => {}
        }
    }
    // Closing the lock session releases every advisory lock this worker still holds.
    locks.close().await;
    drop(sweep.await);
    drop(nudges);
    drop(nudger.await);
    // Together, so that a broker that stopped answering costs one close timeout, not one each.
    futures_util::future::join_all(
        task_channels
            .iter()
            .map(|channel| shared::broker::close_channel(channel, "worker stopping")),
    )
    .await;
    shared::broker::close_connection(connection, "worker stopping").await;
    match outcome {
        Err(error) if !shutdown.is_cancelled() => Err(error),
        _ => Ok(()),
    }
}
