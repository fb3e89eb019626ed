//! `bench worker-only`: the worker alone. With the gateway off, N ready-made command envelopes
//! (top-ups and purchases of players created in SQL) are published straight into the partition
//! queues with publisher confirms; then the worker process(es) start, and the time until every
//! command has its row in `commands` gives the applied rate.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::value::RawValue;
use shared::broker::{DELIVERY_MODE_PERSISTENT, QueueDepthProbe, Topology};
use shared::config::CommonConfig;
use shared::ids;
use shared::partition::partition_of;
use shared::wire::{AddressedCommand, COMMAND_VERSION, Command, CommandEnvelope};
use uuid::Uuid;

use crate::compare::{TreasuryLag, treasury_lag};
use crate::cpu::{CpuSnapshot, CpuUse};
use crate::procs::{Children, bin_dir};
use crate::report::{Machine, json_path, machine, write_json};
use crate::scenario::{new_run_id, run_queue_prefix};
use crate::seed::seed_players;

/// Publishes awaiting the broker's confirm at once.
pub const PUBLISH_CONFIRMS_IN_FLIGHT_MAX: usize = 2_000;
/// Pause between two looks at the progress (queue depths, then counts of `commands`) while the
/// workers apply.
const APPLY_POLL_MS: u64 = 200;
/// Longest one look at the partition queues' depths may take, connecting included.
const QUEUE_DEPTH_TIMEOUT_MS: u64 = 2_000;
/// Queues of this run expire this long after their last consumer left.
const QUEUE_EXPIRES_MS: u32 = 300_000;
/// Most commands one run may publish.
pub const COMMANDS_MAX: usize = 10_000_000;
/// The most expensive item, to fund players for every purchase they may make.
const PRICE_MAX: i64 = 50;
/// Extra GEMS each player gets beyond the expected spending.
const FUNDING_MARGIN: i64 = 1_000;
/// Largest top-up the commands carry.
const TOP_UP_AMOUNT_MAX: i64 = 1_000;

#[derive(Debug, Clone, Args)]
pub struct WorkerOnlyArgs {
    /// Commands to publish and apply.
    #[arg(long, default_value_t = 200_000)]
    pub commands: usize,

    /// Players the commands are spread over (uniformly), created in SQL with enough GEMS.
    #[arg(long, default_value_t = 10_000)]
    pub players: usize,

    /// Share of purchases (the rest are top-ups), in percent.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub purchase_percent: u8,

    /// Commands per message, grouped by partition as the gateway groups the commands waiting
    /// for the same partition (`PUBLISH_BATCH_MAX`). 1 publishes every command alone.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1_024))]
    pub commands_per_message: u16,

    /// Worker processes to start.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub workers: u32,

    /// Do not start the treasury consumer (then nudges wait in its queue and lag is not measured).
    #[arg(long)]
    pub no_treasury: bool,

    #[arg(
        long,
        env = "BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub postgres_url: String,

    #[arg(long, env = "AMQP_URL", default_value = shared::config::DEFAULT_AMQP_URL)]
    pub amqp_url: String,

    #[arg(long, default_value_t = 16)]
    pub partitions: u16,

    /// Folder with the release binaries worker and treasury (default: this executable's folder).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,

    /// Give up when the commands are not all applied within this long.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,

    /// Keep the database afterwards (dropped by default).
    #[arg(long)]
    pub keep_database: bool,

    /// Where the JSON goes (default bench-results/worker-only-<timestamp>.json).
    #[arg(long)]
    pub json_out: Option<PathBuf>,

    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Serialize)]
pub struct WorkerOnlyResult {
    pub kind: &'static str,
    pub run_id: String,
    pub machine: Machine,
    pub commands: usize,
    pub players: usize,
    pub purchase_percent: u8,
    pub commands_per_message: u16,
    pub workers: u32,
    pub partitions: u16,
    pub treasury_running: bool,
    pub publish_s: f64,
    pub publish_per_s: f64,
    /// From starting the workers until every command had its row (includes process start).
    pub applied_wall_s: f64,
    pub applied_per_s_wall: f64,
    /// From the first applied batch to the last (transaction start times in `commands`).
    pub applied_span_s: f64,
    /// Commands per second between the first and the last batch: the headline figure.
    pub applied_per_s: f64,
    pub outcomes: Vec<(String, i64)>,
    pub treasury_lag: Option<TreasuryLag>,
    pub audit_passed: bool,
    /// The machine's CPU from starting the workers until every command had its row, by
    /// process group (`crate::cpu`). None where /proc is not available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuUse>,
    pub log_dir: String,
}

pub async fn run(args: WorkerOnlyArgs) -> anyhow::Result<WorkerOnlyResult> {
    anyhow::ensure!(
        (1..=COMMANDS_MAX).contains(&args.commands),
        "--commands must be 1 to {COMMANDS_MAX}"
    );
    anyhow::ensure!(args.players >= 1, "--players must be at least 1");
    let run_id = new_run_id();
    let mut common = CommonConfig::with_defaults();
    common.database_url = format!("{}/wallet_bench_{run_id}_workers", args.postgres_url);
    common.amqp_url = args.amqp_url.clone();
    common.partitions = args.partitions;
    common.queue_prefix = run_queue_prefix(&run_id);
    common.queue_expires_ms = Some(QUEUE_EXPIRES_MS);
    common.database_connections_max = 2;
    let mut children = Children::new(
        PathBuf::from("bench-results")
            .join("logs")
            .join(format!("worker-only-{run_id}")),
    )?;
    // Ctrl-C stops the run but not the cleanup: children stopped, database dropped.
    let outcome = tokio::select! {
        outcome = run_inner(&args, &run_id, &common, &mut children) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    children.stop_all().await;
    // Its queues go now rather than expiring minutes later, in the middle of the next run.
    shared::testing::delete_queues(&common).await;
    if args.keep_database {
        println!("kept database {}", common.database_url);
    } else {
        shared::testing::drop_database(&common.database_url).await;
    }
    outcome
}

async fn run_inner(
    args: &WorkerOnlyArgs,
    run_id: &str,
    common: &CommonConfig,
    children: &mut Children,
) -> anyhow::Result<WorkerOnlyResult> {
    let bins = bin_dir(args.bin_dir.as_deref())?;
    let pool = shared::db::bootstrap(common)
        .await
        .context("preparing the database")?;
    println!(
        "worker-only (run {run_id}): creating {} players in SQL",
        args.players
    );
    let commands = i64::try_from(args.commands)?;
    let players_count = i64::try_from(args.players)?;
    let expected_purchases = commands
        .checked_mul(i64::from(args.purchase_percent))
        .map(|total| total / 100 / players_count + 1)
        .ok_or_else(|| anyhow::anyhow!("too many commands"))?;
    // Twice the expected spending at the highest price, so purchases are rarely refused.
    let balance = expected_purchases
        .checked_mul(PRICE_MAX * 2)
        .and_then(|spending| spending.checked_add(FUNDING_MARGIN))
        .ok_or_else(|| anyhow::anyhow!("the players' funding overflows"))?;
    let players = seed_players(&pool, &format!("b{run_id}p"), args.players, balance).await?;
    let player_ids: Vec<Uuid> = players.iter().map(|player| player.id).collect();

    println!("publishing {} commands with confirms", args.commands);
    let topology = Topology::from_config(common);
    let publish_started = Instant::now();
    publish_commands(args, common, &topology, &player_ids).await?;
    let publish_s = publish_started.elapsed().as_secs_f64();

    let environment = vec![
        ("DATABASE_URL", common.database_url.clone()),
        ("AMQP_URL", common.amqp_url.clone()),
        ("PARTITIONS", common.partitions.to_string()),
        ("QUEUE_PREFIX", common.queue_prefix.clone()),
        ("QUEUE_EXPIRES_MS", QUEUE_EXPIRES_MS.to_string()),
    ];
    println!("starting {} worker(s)", args.workers);
    let apply_started = Instant::now();
    let cpu_before = CpuSnapshot::take();
    if !args.no_treasury {
        children.spawn("treasury", &bins.join("treasury"), &[], &environment)?;
    }
    for index in 1..=args.workers {
        let mut envs = environment.clone();
        envs.push(("WORKER_ID", format!("bench-worker-{index}")));
        children.spawn(&format!("worker-{index}"), &bins.join("worker"), &[], &envs)?;
    }
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(u64::try_from(args.commands)?);
        bar.set_style(
            ProgressStyle::with_template(
                "applied [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    };
    let deadline = apply_started + Duration::from_secs(args.timeout_s);
    let mut probe = QueueDepthProbe::new(&common.amqp_url, "bench worker-only depths");
    let probe_timeout = Duration::from_millis(QUEUE_DEPTH_TIMEOUT_MS);
    let applied_wall_s = loop {
        children.check_alive()?;
        // Counting the rows of `commands` is a sequential scan of a table that grows to every
        // command (at 200,000 rows about 50 ms of PostgreSQL's CPU, in parallel workers), which
        // the polling would take from the worker it measures. While the partition queues still
        // hold messages not yet delivered, the count cannot have reached the total, so only the
        // broker is asked; the rows are counted once the queues are empty (or the broker does
        // not answer).
        let ready = partition_messages_ready(&mut probe, &topology, probe_timeout).await;
        let shortfall = if let Some(ready) = ready.filter(|ready| *ready > 0) {
            let waiting = ready.saturating_mul(u64::from(args.commands_per_message));
            bar.set_position(u64::try_from(commands).unwrap_or(0).saturating_sub(waiting));
            format!("{ready} messages were still waiting in the partition queues")
        } else {
            let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM commands")
                .fetch_one(&pool)
                .await?;
            bar.set_position(u64::try_from(applied).unwrap_or(0));
            if applied >= commands {
                break apply_started.elapsed().as_secs_f64();
            }
            format!("only {applied} of {commands} commands were applied")
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "{shortfall} within {} s",
            args.timeout_s
        );
        tokio::time::sleep(Duration::from_millis(APPLY_POLL_MS)).await;
    };
    let cpu_after = CpuSnapshot::take();
    bar.finish_and_clear();
    let applied_span_s: f64 = sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM max(created_at) - min(created_at)), 0)::float8 FROM commands",
    )
    .fetch_one(&pool)
    .await?;
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT outcome || ' ' || status_code, count(*) FROM commands GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    let treasury_lag = if args.no_treasury {
        None
    } else {
        Some(treasury_lag(&pool).await?)
    };
    let audit_passed = shared::audit::run(&pool).await?.passed;
    pool.close().await;
    let per_second = |seconds: f64| {
        if seconds > 0.0 {
            (args.commands as f64 / seconds * 10.0).round() / 10.0
        } else {
            0.0
        }
    };
    // Spread over the same window as `applied_per_s_wall`: from starting the workers to the
    // last command's row, so the workers' start-up and this process's polling are in it.
    let cpu = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| CpuUse::between(&before, &after, per_second(applied_wall_s)));
    let result = WorkerOnlyResult {
        kind: "worker-only",
        run_id: run_id.to_string(),
        machine: machine(),
        commands: args.commands,
        players: args.players,
        purchase_percent: args.purchase_percent,
        commands_per_message: args.commands_per_message,
        workers: args.workers,
        partitions: common.partitions,
        treasury_running: !args.no_treasury,
        publish_s: (publish_s * 1_000.0).round() / 1_000.0,
        publish_per_s: per_second(publish_s),
        applied_wall_s: (applied_wall_s * 1_000.0).round() / 1_000.0,
        applied_per_s_wall: per_second(applied_wall_s),
        applied_span_s: (applied_span_s * 1_000.0).round() / 1_000.0,
        applied_per_s: per_second(applied_span_s),
        outcomes,
        treasury_lag,
        audit_passed,
        cpu,
        log_dir: children.log_dir().display().to_string(),
    };
    print_result(&result);
    let path = json_path(args.json_out.as_deref(), "worker-only");
    write_json(&path, &result)?;
    println!("JSON written to {}", path.display());
    Ok(result)
}

/// Messages waiting in the run's partition queues, not yet delivered to a worker (the broker
/// counts a delivered message that is not acknowledged yet apart). None when the broker did not
/// answer in time or a queue is missing.
async fn partition_messages_ready(
    probe: &mut QueueDepthProbe,
    topology: &Topology,
    timeout: Duration,
) -> Option<u64> {
    let depths = probe.sample(topology, timeout, timeout).await.ok()?;
    depths
        .iter()
        .filter(|depth| depth.partition.is_some())
        .map(|depth| depth.messages.map(u64::from))
        .sum()
}

/// Publishes the commands to their partition queues, at most
/// [`PUBLISH_CONFIRMS_IN_FLIGHT_MAX`] messages awaiting their confirm.
async fn publish_commands(
    args: &WorkerOnlyArgs,
    common: &CommonConfig,
    topology: &Topology,
    players: &[Uuid],
) -> anyhow::Result<()> {
    let connection = shared::broker::connect(&common.amqp_url, "bench worker-only")
        .await
        .context("connecting to RabbitMQ")?;
    let channel = connection.create_channel().await?;
    topology
        .declare(&channel)
        .await
        .context("declaring the topology")?;
    channel
        .confirm_select(ConfirmSelectOptions { nowait: false })
        .await?;
    let exchange = topology.commands_exchange();
    let fingerprint_key = b"bench worker-only";
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let mut pending = VecDeque::with_capacity(PUBLISH_CONFIRMS_IN_FLIGHT_MAX);
    // The commands of each partition not yet published, up to --commands-per-message.
    let mut by_partition: Vec<Vec<Box<RawValue>>> =
        vec![Vec::new(); usize::from(common.partitions)];
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(u64::try_from(args.commands)?)
    };
    for number in 0..args.commands {
        let player = players[rng.random_range(0..players.len())];
        let (kind, command, fields) = if rng.random_range(0..100) < args.purchase_percent {
            let item = if rng.random_range(0..10) < 9 {
                "gold_coin"
            } else {
                "treasure_box"
            };
            (
                "purchase",
                Command::Purchase {
                    player_id: player,
                    item: item.to_string(),
                    quantity: 1,
                },
                vec![item.to_string(), "1".to_string()],
            )
        } else {
            let amount = rng.random_range(1..=TOP_UP_AMOUNT_MAX);
            (
                "top_up",
                Command::TopUp {
                    player_id: player,
                    amount,
                },
                vec![amount.to_string()],
            )
        };
        let principal = format!("player:{player}");
        let envelope = CommandEnvelope {
            v: COMMAND_VERSION,
            id: ids::command_id(&principal, &format!("worker-only-{number}")),
            fingerprint: ids::fingerprint(
                fingerprint_key,
                kind,
                &fields.iter().map(String::as_str).collect::<Vec<_>>(),
            ),
            principal,
            request_id: None,
            command,
        };
        let partition = partition_of(player, common.partitions);
        let waiting = &mut by_partition[usize::from(partition)];
        waiting.push(serde_json::value::to_raw_value(&envelope)?);
        if waiting.len() < usize::from(args.commands_per_message) {
            continue;
        }
        let message = std::mem::take(waiting);
        if pending.len() >= PUBLISH_CONFIRMS_IN_FLIGHT_MAX
            && let Some((confirm, count)) = pending.pop_front()
        {
            check_confirm(confirm).await?;
            bar.inc(count);
        }
        let confirm = publish_message(&channel, &exchange, partition, &message).await?;
        pending.push_back((confirm, message.len() as u64));
    }
    for (partition, message) in (0..common.partitions).zip(by_partition) {
        if !message.is_empty() {
            let confirm = publish_message(&channel, &exchange, partition, &message).await?;
            pending.push_back((confirm, message.len() as u64));
        }
    }
    while let Some((confirm, count)) = pending.pop_front() {
        check_confirm(confirm).await?;
        bar.inc(count);
    }
    bar.finish_and_clear();
    drop(connection.close(200, "published".into()).await);
    Ok(())
}

/// Publishes commands of one partition as one message: a plain envelope when there is one, a
/// `CommandBatch` (the gateway's format) when there are several. Nobody waits for replies.
async fn publish_message(
    channel: &lapin::Channel,
    exchange: &str,
    partition: u16,
    envelopes: &[Box<RawValue>],
) -> anyhow::Result<lapin::PublisherConfirm> {
    let properties = BasicProperties::default()
        .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
        .with_content_type("application/json".into());
    let commands = envelopes
        .iter()
        .map(|envelope| AddressedCommand {
            // Nobody waits for the replies.
            correlation_id: "".into(),
            envelope,
        })
        .collect();
    let (payload, message_type) = shared::wire::encode_commands(commands)?;
    let properties = match message_type {
        Some(message_type) => properties.with_type(message_type.into()),
        None => properties,
    };
    let routing_key = Topology::partition_routing_key(partition);
    Ok(channel
        .basic_publish(
            exchange.into(),
            routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &payload,
            properties,
        )
        .await?)
}

async fn check_confirm(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        other => anyhow::bail!("the broker did not take a command: {other:?}"),
    }
}

fn print_result(result: &WorkerOnlyResult) {
    println!();
    println!(
        " worker-only: {} commands ({} % purchases, {} per message) over {} players, {} worker(s), {} partitions, treasury {}",
        result.commands,
        result.purchase_percent,
        result.commands_per_message,
        result.players,
        result.workers,
        result.partitions,
        if result.treasury_running { "on" } else { "off" }
    );
    println!(
        " published in {:.2} s ({:.0}/s, confirmed)",
        result.publish_s, result.publish_per_s
    );
    println!(
        " applied: {:.0} commands/s between the first and the last batch ({:.2} s)",
        result.applied_per_s, result.applied_span_s
    );
    println!(
        "          {:.0} commands/s from starting the workers ({:.2} s, includes their start)",
        result.applied_per_s_wall, result.applied_wall_s
    );
    if let Some(cpu) = &result.cpu {
        println!(
            " CPU: {:.2} cores of the machine; us per command {} (from starting the workers)",
            cpu.machine_cores,
            cpu.describe_micros()
        );
    }
    let outcomes: Vec<String> = result
        .outcomes
        .iter()
        .map(|(outcome, count)| format!("{outcome}: {count}"))
        .collect();
    println!(" outcomes: {}", outcomes.join(", "));
    match &result.treasury_lag {
        Some(TreasuryLag {
            credits_at_stop,
            drained_ms: Some(ms),
            ..
        }) => println!(
            " treasury lag: {credits_at_stop} credits unfolded when the last command was applied, all folded {ms:.1} ms later"
        ),
        Some(TreasuryLag {
            credits_at_stop, ..
        }) => println!(" treasury lag: {credits_at_stop} credits NOT all folded in time"),
        None => println!(" treasury lag: not measured (treasury off)"),
    }
    println!(
        " audit: {}",
        if result.audit_passed {
            "passed"
        } else {
            "FAILED"
        }
    );
}
