//! `bench compare`: the real system and the synchronous baseline on the same machine and the
//! same PostgreSQL server, driven by the same scenario in one run, with the ratio between them,
//! the treasury lag after the system's load stops, and the audit of both databases.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use sqlx::PgPool;

use crate::driver::{Load, measure};
use crate::procs::{Children, bin_dir, free_port};
use crate::report::{
    Machine, Report, Writeback, json_path, machine, render_table, warn_about_writeback, write_json,
};
use crate::scenario::{
    Mode, Prepared, ScenarioArgs, Target, http_client, new_run_id, prepare, run_queue_prefix,
};

/// Pause between two looks at `hot_credits` while waiting for the treasury to catch up.
const LAG_POLL_MS: u64 = 5;
/// Longest wait for the treasury to fold every credit after the load stopped.
pub const LAG_WAIT_MAX_MS: u64 = 60_000;
/// Queues of a spawned system expire this long after their last consumer left.
const SPAWNED_QUEUE_EXPIRES_MS: u32 = 300_000;
/// The spawned gateway's rate limits unless --keep-rate-limits: out of the way.
const RAISED_RATE_LIMIT: u32 = 1_000_000;
/// Pause after the setup so its background work (folding, follow-ups) settles first.
const SETTLE_MS: u64 = 1_000;
/// Most open loops one `--sweep-fractions` may ask for, so a typo cannot run for hours.
pub const SWEEP_POINTS_MAX: usize = 16;

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub scenario: ScenarioArgs,

    /// After the main run, run an open loop against each target at this fraction of the
    /// commands/s it reached (0.5: half the measured maximum); 0 skips it.
    #[arg(long, default_value_t = 0.0)]
    pub open_fraction: f64,

    /// Measured window of that open loop (default: --duration-s).
    #[arg(long)]
    pub open_duration_s: Option<f64>,

    /// After the open loops, more open loops against the system alone, one at each of these
    /// fractions of its measured commands/s (comma-separated, each above 0 and at most 1, at
    /// most 16 of them), each as long as the open loop: how latency and CPU per command change
    /// with the offered load.
    #[arg(long, value_delimiter = ',')]
    pub sweep_fractions: Vec<f64>,

    /// Start the spawned gateway with its default rate limits. By default they are raised out
    /// of the way (RATE_LIMIT_PLAYER_PER_SECOND and LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE at
    /// 1,000,000): the load driver is one client address standing in for every player, a zipf
    /// favourite makes hundreds of requests a second, and the baseline has no limits.
    #[arg(long)]
    pub keep_rate_limits: bool,

    /// Worker processes of the spawned system.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub workers: u32,

    /// PostgreSQL server for the spawned system's and baseline's databases (no database name).
    #[arg(
        long,
        env = "BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub postgres_url: String,

    /// RabbitMQ for the spawned system.
    #[arg(long, env = "AMQP_URL", default_value = shared::config::DEFAULT_AMQP_URL)]
    pub amqp_url: String,

    /// Partitions of the spawned system.
    #[arg(long, default_value_t = 16)]
    pub partitions: u16,

    /// PostgreSQL connections of the baseline server (the gateway and each worker use their
    /// default, DATABASE_CONNECTIONS_MAX=10).
    #[arg(long, default_value_t = 10)]
    pub baseline_connections: u32,

    /// Folder with the release binaries gateway, worker and treasury (default: this
    /// executable's folder).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,

    /// Drive an already running system at this URL instead of spawning one.
    #[arg(long, requires = "system_database_url")]
    pub system_url: Option<String>,

    /// The running system's database (treasury lag, audit, --setup sql).
    #[arg(long)]
    pub system_database_url: Option<String>,

    /// Drive an already running baseline server at this URL instead of spawning one.
    #[arg(long, requires = "baseline_database_url")]
    pub baseline_url: Option<String>,

    /// The running baseline's database.
    #[arg(long)]
    pub baseline_database_url: Option<String>,

    /// JWT secret of targets that are already running (spawned ones get a random one).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Keep the spawned databases afterwards (they are dropped by default).
    #[arg(long)]
    pub keep_databases: bool,

    /// Where the JSON goes (default bench-results/compare-<scenario>-<timestamp>.json).
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// How long the treasury took to fold everything after the load stopped.
#[derive(Debug, Clone, Serialize)]
pub struct TreasuryLag {
    /// Credits not yet folded when the last answer arrived.
    pub credits_at_stop: i64,
    /// Their sum (GEMS and item units together; a size, not an amount of one asset).
    pub amount_at_stop: i64,
    /// Milliseconds until `hot_credits` was empty; None when it was not within the limit.
    pub drained_ms: Option<f64>,
}

/// Polls `hot_credits` until it is empty, at most [`LAG_WAIT_MAX_MS`].
pub async fn treasury_lag(pool: &PgPool) -> anyhow::Result<TreasuryLag> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(LAG_WAIT_MAX_MS);
    let mut first = None;
    loop {
        let (count, sum): (i64, i64) =
            sqlx::query_as("SELECT count(*), coalesce(sum(amount), 0)::bigint FROM hot_credits")
                .fetch_one(pool)
                .await?;
        let (credits_at_stop, amount_at_stop) = *first.get_or_insert((count, sum));
        if count == 0 {
            return Ok(TreasuryLag {
                credits_at_stop,
                amount_at_stop,
                drained_ms: Some((started.elapsed().as_secs_f64() * 1e4).round() / 10.0),
            });
        }
        if Instant::now() >= deadline {
            return Ok(TreasuryLag {
                credits_at_stop,
                amount_at_stop,
                drained_ms: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(LAG_POLL_MS)).await;
    }
}

pub async fn connect(database_url: &str) -> anyhow::Result<PgPool> {
    let mut common = shared::config::CommonConfig::with_defaults();
    common.database_url = database_url.to_string();
    common.database_connections_max = 2;
    shared::db::connect(&common)
        .await
        .with_context(|| format!("connecting to {database_url}"))
}

#[derive(Debug, Serialize)]
pub struct OpenResult {
    pub fraction: f64,
    pub system: Report,
    pub system_treasury_lag: Option<TreasuryLag>,
    pub baseline: Report,
}

/// One open loop of the sweep: the system alone at a fraction of its measured maximum.
#[derive(Debug, Serialize)]
pub struct SweepPoint {
    pub fraction: f64,
    pub system: Report,
}

#[derive(Debug, Serialize)]
pub struct CompareResult {
    pub kind: &'static str,
    pub run_id: String,
    pub machine: Machine,
    pub scenario: String,
    pub system: Report,
    pub system_treasury_lag: Option<TreasuryLag>,
    pub baseline: Report,
    /// System commands/s divided by baseline commands/s.
    pub ratio_commands_per_s: Option<f64>,
    pub open: Option<OpenResult>,
    /// The `--sweep-fractions` open loops, in the order given.
    pub sweep: Vec<SweepPoint>,
    pub audit_passed_system: Option<bool>,
    pub audit_passed_baseline: Option<bool>,
    /// Whether this run started the system itself (then `workers` and `partitions` are its
    /// settings; against `--system-url` they say nothing about the target).
    pub system_spawned: bool,
    pub workers: u32,
    pub partitions: u16,
    pub log_dir: String,
}

/// What a run must undo: databases it created, pools it opened.
#[derive(Default)]
struct Cleanup {
    databases: Vec<String>,
    pools: Vec<PgPool>,
}

pub async fn run(args: CompareArgs) -> anyhow::Result<CompareResult> {
    args.scenario.validate()?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.open_fraction),
        "--open-fraction must be from 0 to 1"
    );
    validate_sweep(&args.sweep_fractions)?;
    anyhow::ensure!(
        args.sweep_fractions.is_empty() || args.scenario.mode == Mode::Closed,
        "--sweep-fractions needs the closed loop (--mode closed): its fractions are of the rate the closed loop measures"
    );
    let run_id = new_run_id();
    let log_dir = PathBuf::from("bench-results")
        .join("logs")
        .join(format!("compare-{run_id}"));
    let mut children = Children::new(log_dir)?;
    let mut cleanup = Cleanup::default();
    // Ctrl-C stops the run but not the cleanup: children stopped, databases dropped.
    let outcome = tokio::select! {
        outcome = run_inner(&args, &run_id, &mut children, &mut cleanup) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    children.stop_all().await;
    if args.system_url.is_none() {
        // The spawned system's queues go now rather than expiring minutes later: a quorum
        // queue's deletion costs the broker CPU, and expiring ones fell into the next run.
        let mut topology = shared::config::CommonConfig::with_defaults();
        topology.amqp_url = args.amqp_url.clone();
        topology.partitions = args.partitions;
        topology.queue_prefix = run_queue_prefix(&run_id);
        shared::testing::delete_queues(&topology).await;
    }
    for pool in cleanup.pools {
        pool.close().await;
    }
    for database_url in cleanup.databases {
        if args.keep_databases {
            println!("kept database {database_url}");
        } else {
            shared::testing::drop_database(&database_url).await;
        }
    }
    outcome
}

/// Starts the system's processes (gateway first: it creates and migrates the database).
async fn spawn_system(
    args: &CompareArgs,
    run_id: &str,
    secret: &str,
    bins: &std::path::Path,
    children: &mut Children,
    client: &reqwest::Client,
) -> anyhow::Result<Target> {
    let database_url = format!("{}/wallet_bench_{run_id}_system", args.postgres_url);
    let port = free_port()?;
    let common = vec![
        ("DATABASE_URL", database_url.clone()),
        ("AMQP_URL", args.amqp_url.clone()),
        ("PARTITIONS", args.partitions.to_string()),
        ("QUEUE_PREFIX", run_queue_prefix(run_id)),
        ("QUEUE_EXPIRES_MS", SPAWNED_QUEUE_EXPIRES_MS.to_string()),
    ];
    let mut envs = common.clone();
    if !args.keep_rate_limits {
        for limit in [
            "RATE_LIMIT_PLAYER_PER_SECOND",
            "LOGIN_ATTEMPTS_PER_ADDRESS_PER_MINUTE",
        ] {
            envs.push((limit, RAISED_RATE_LIMIT.to_string()));
        }
    }
    envs.push(("JWT_SECRET", secret.to_string()));
    envs.push(("HTTP_ADDR", format!("127.0.0.1:{port}")));
    children.spawn("gateway", &bins.join("gateway"), &[], &envs)?;
    let base_url = format!("http://127.0.0.1:{port}");
    children
        .wait_healthy(client, &format!("{base_url}/health"))
        .await?;
    children.spawn("treasury", &bins.join("treasury"), &[], &common)?;
    for index in 1..=args.workers {
        let mut envs = common.clone();
        envs.push(("WORKER_ID", format!("bench-worker-{index}")));
        children.spawn(&format!("worker-{index}"), &bins.join("worker"), &[], &envs)?;
    }
    Ok(Target {
        label: "system".to_string(),
        base_url,
        database_url: Some(database_url),
        jwt_secret: Some(secret.to_string()),
    })
}

async fn spawn_baseline(
    args: &CompareArgs,
    run_id: &str,
    secret: &str,
    children: &mut Children,
    client: &reqwest::Client,
) -> anyhow::Result<Target> {
    let database_url = format!("{}/wallet_bench_{run_id}_baseline", args.postgres_url);
    let port = free_port()?;
    let exe = std::env::current_exe().context("locating the bench executable")?;
    children.spawn(
        "baseline",
        &exe,
        &["baseline-server"],
        &[
            ("BASELINE_DATABASE_URL", database_url.clone()),
            ("BASELINE_HTTP_ADDR", format!("127.0.0.1:{port}")),
            (
                "BASELINE_DATABASE_CONNECTIONS_MAX",
                args.baseline_connections.to_string(),
            ),
            ("PARTITIONS", args.partitions.to_string()),
            ("JWT_SECRET", secret.to_string()),
        ],
    )?;
    let base_url = format!("http://127.0.0.1:{port}");
    children
        .wait_healthy(client, &format!("{base_url}/health"))
        .await?;
    Ok(Target {
        label: "baseline".to_string(),
        base_url,
        database_url: Some(database_url),
        jwt_secret: Some(secret.to_string()),
    })
}

fn running_target(
    label: &str,
    url: &str,
    database_url: Option<&String>,
    secret: Option<&String>,
) -> Target {
    Target {
        label: label.to_string(),
        base_url: url.trim_end_matches('/').to_string(),
        database_url: database_url.cloned(),
        jwt_secret: secret.cloned(),
    }
}

async fn lag_of(pool: Option<&PgPool>) -> anyhow::Result<Option<TreasuryLag>> {
    match pool {
        Some(pool) => Ok(Some(treasury_lag(pool).await?)),
        None => Ok(None),
    }
}

async fn run_inner(
    args: &CompareArgs,
    run_id: &str,
    children: &mut Children,
    cleanup: &mut Cleanup,
) -> anyhow::Result<CompareResult> {
    let spawned_secret = format!("bench-{run_id}-{}", uuid::Uuid::new_v4().simple());
    let client = http_client(Duration::from_secs(5))?;
    let bins = bin_dir(args.bin_dir.as_deref())?;

    let system = match &args.system_url {
        Some(url) => running_target(
            "system",
            url,
            args.system_database_url.as_ref(),
            args.jwt_secret.as_ref(),
        ),
        None => {
            let target =
                spawn_system(args, run_id, &spawned_secret, &bins, children, &client).await;
            cleanup.databases.push(format!(
                "{}/wallet_bench_{run_id}_system",
                args.postgres_url
            ));
            target?
        }
    };
    let baseline = match &args.baseline_url {
        Some(url) => running_target(
            "baseline",
            url,
            args.baseline_database_url.as_ref(),
            args.jwt_secret.as_ref(),
        ),
        None => {
            let target = spawn_baseline(args, run_id, &spawned_secret, children, &client).await;
            cleanup.databases.push(format!(
                "{}/wallet_bench_{run_id}_baseline",
                args.postgres_url
            ));
            target?
        }
    };
    let mut pools = Vec::new();
    for target in [&system, &baseline] {
        let pool = match &target.database_url {
            Some(url) => Some(connect(url).await?),
            None => None,
        };
        if let Some(pool) = &pool {
            cleanup.pools.push(pool.clone());
        }
        pools.push(pool);
    }
    let (system_pool, baseline_pool) = (pools[0].as_ref(), pools[1].as_ref());

    let scenario = &args.scenario;
    println!(
        "bench compare: {} (run {run_id}), logs in {}",
        scenario.scenario.name(),
        children.log_dir().display()
    );
    println!(
        "setting up {} players ({:?}) on the system, then on the baseline",
        scenario.players(),
        scenario.setup_method()
    );
    let system_prepared = Arc::new(prepare(&system, scenario).await.context("system setup")?);
    let baseline_prepared = Arc::new(
        prepare(&baseline, scenario)
            .await
            .context("baseline setup")?,
    );
    println!(
        "setup took {:.1} s on the system and {:.1} s on the baseline; measuring",
        system_prepared.setup_s, baseline_prepared.setup_s
    );
    // The setup's own credits are folded before the measurement starts.
    lag_of(system_pool).await?;
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    children.check_alive()?;

    let load = Load::from_args(scenario)?;
    let system_report = measure(&system, scenario, Arc::clone(&system_prepared), load).await?;
    let system_treasury_lag = lag_of(system_pool).await?;
    children.check_alive()?;
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let baseline_report =
        measure(&baseline, scenario, Arc::clone(&baseline_prepared), load).await?;
    children.check_alive()?;

    let open = if args.open_fraction > 0.0 && scenario.mode == Mode::Closed {
        tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
        let system_open = measure_open(
            args,
            &system,
            &system_prepared,
            system_report.commands_per_s * args.open_fraction,
        )
        .await?;
        let system_open_lag = lag_of(system_pool).await?;
        tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
        let baseline_open = measure_open(
            args,
            &baseline,
            &baseline_prepared,
            baseline_report.commands_per_s * args.open_fraction,
        )
        .await?;
        Some(OpenResult {
            fraction: args.open_fraction,
            system: system_open,
            system_treasury_lag: system_open_lag,
            baseline: baseline_open,
        })
    } else {
        None
    };
    children.check_alive()?;

    // Only with a closed loop (checked in `run`): the fractions are of the rate it measured.
    let mut sweep = Vec::new();
    for &fraction in &args.sweep_fractions {
        tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
        let report = measure_open(
            args,
            &system,
            &system_prepared,
            system_report.commands_per_s * fraction,
        )
        .await?;
        children.check_alive()?;
        sweep.push(SweepPoint {
            fraction,
            system: report,
        });
    }

    let mut audits = Vec::new();
    for pool in [system_pool, baseline_pool] {
        audits.push(match pool {
            Some(pool) => Some(shared::audit::run(pool).await?.passed),
            None => None,
        });
    }
    let ratio = (baseline_report.commands_per_s > 0.0).then(|| {
        (system_report.commands_per_s / baseline_report.commands_per_s * 100.0).round() / 100.0
    });
    let result = CompareResult {
        kind: "compare",
        run_id: run_id.to_string(),
        machine: machine(),
        scenario: scenario.scenario.name().to_string(),
        system: system_report,
        system_treasury_lag,
        baseline: baseline_report,
        ratio_commands_per_s: ratio,
        open,
        sweep,
        audit_passed_system: audits[0],
        audit_passed_baseline: audits[1],
        system_spawned: args.system_url.is_none(),
        workers: args.workers,
        partitions: args.partitions,
        log_dir: children.log_dir().display().to_string(),
    };
    print_result(&result);
    let path = json_path(
        args.json_out.as_deref(),
        &format!("compare-{}", result.scenario),
    );
    write_json(&path, &result)?;
    println!("JSON written to {}", path.display());
    Ok(result)
}

fn print_result(result: &CompareResult) {
    println!();
    println!("{}", render_table(&[&result.system, &result.baseline]));
    match result.ratio_commands_per_s {
        Some(ratio) => println!(
            "ratio system / baseline (commands/s): {ratio:.2}x  ({:.1} vs {:.1})",
            result.system.commands_per_s, result.baseline.commands_per_s
        ),
        None => println!("ratio: the baseline completed no command"),
    }
    print_lag(result.system_treasury_lag.as_ref());
    if let Some(open) = &result.open {
        println!();
        println!(
            "open loop at {:.0} % of each target's measured commands/s:",
            open.fraction * 100.0
        );
        println!("{}", render_table(&[&open.system, &open.baseline]));
        print_lag(open.system_treasury_lag.as_ref());
    }
    if !result.sweep.is_empty() {
        println!();
        println!("the system alone, open loops at fractions of its measured commands/s:");
        let reports: Vec<&Report> = result.sweep.iter().map(|point| &point.system).collect();
        println!("{}", render_table(&reports));
    }
    let verdict = |passed: Option<bool>| match passed {
        Some(true) => "passed",
        Some(false) => "FAILED",
        None => "not run (no database URL)",
    };
    println!(
        "audit: system {}, baseline {}",
        verdict(result.audit_passed_system),
        verdict(result.audit_passed_baseline)
    );
    if result.system_spawned {
        // The partitions and workers change the figures as much as the machine does (see
        // BENCHMARKS.md), so every printed result says which it ran with.
        println!(
            "system: partitions {}, worker processes {}",
            result.partitions, result.workers
        );
    }
    println!(
        "machine: {} CPUs ({}), {:.1} GiB, kernel {}, CPU reference {:.1} ms, {}",
        result.machine.cpus,
        result.machine.cpu_model,
        result.machine.memory_gib,
        result.machine.kernel,
        result.machine.cpu_reference_ms,
        result
            .machine
            .writeback
            .as_ref()
            .map_or_else(|| "writeback unknown".to_string(), Writeback::describe)
    );
    warn_about_writeback(&result.machine);
}

fn print_lag(lag: Option<&TreasuryLag>) {
    match lag {
        Some(TreasuryLag {
            credits_at_stop,
            drained_ms: Some(ms),
            ..
        }) => println!(
            "treasury lag: {credits_at_stop} credits unfolded when the load stopped, all folded {ms:.1} ms later"
        ),
        Some(TreasuryLag {
            credits_at_stop, ..
        }) => println!(
            "treasury lag: {credits_at_stop} credits unfolded when the load stopped, NOT all folded within {LAG_WAIT_MAX_MS} ms"
        ),
        None => println!("treasury lag: not measured (no system database URL)"),
    }
}

/// The scenario as an open loop offering `rate_per_s` (at least 1/s) to `target`, for
/// `--open-duration-s` (or the scenario's duration).
async fn measure_open(
    args: &CompareArgs,
    target: &Target,
    prepared: &Arc<Prepared>,
    rate_per_s: f64,
) -> anyhow::Result<Report> {
    let open_args = open_scenario(args, rate_per_s);
    let load = Load::from_args(&open_args)?;
    measure(target, &open_args, Arc::clone(prepared), load).await
}

fn open_scenario(args: &CompareArgs, rate_per_s: f64) -> ScenarioArgs {
    let mut open_args = args.scenario.clone();
    open_args.mode = Mode::Open;
    open_args.rate = Some(rate_per_s.max(1.0));
    if let Some(duration) = args.open_duration_s {
        open_args.duration_s = duration;
    }
    open_args
}

/// `--sweep-fractions`: each above 0 and at most 1, and no more than [`SWEEP_POINTS_MAX`].
fn validate_sweep(fractions: &[f64]) -> anyhow::Result<()> {
    anyhow::ensure!(
        fractions.len() <= SWEEP_POINTS_MAX,
        "--sweep-fractions takes at most {SWEEP_POINTS_MAX} fractions, not {}",
        fractions.len()
    );
    for &fraction in fractions {
        anyhow::ensure!(
            fraction > 0.0 && fraction <= 1.0,
            "--sweep-fractions: {fraction} is not above 0 and at most 1"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_fractions_are_checked() {
        assert!(validate_sweep(&[]).is_ok());
        assert!(validate_sweep(&[0.125, 0.25, 0.5, 1.0]).is_ok());
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let error = validate_sweep(&[0.25, bad]).expect_err("rejected");
            assert!(error.to_string().contains("--sweep-fractions"), "{error}");
        }
        assert_eq!(SWEEP_POINTS_MAX, 16, "the --sweep-fractions help says 16");
        assert!(validate_sweep(&[0.5; SWEEP_POINTS_MAX]).is_ok());
        assert!(validate_sweep(&[0.5; SWEEP_POINTS_MAX + 1]).is_err());
    }

    #[test]
    fn an_open_loop_offers_its_rate_for_the_open_duration() {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: CompareArgs,
        }
        let parsed = <Command as clap::Parser>::try_parse_from([
            "compare",
            "--scenario",
            "purchase-hot",
            "--duration-s",
            "60",
        ]);
        let mut args = parsed.expect("parsed").args;
        let open = open_scenario(&args, 5_600.0 * 0.125);
        assert_eq!(open.mode, Mode::Open);
        assert_eq!(open.rate, Some(700.0));
        assert_eq!(open.duration_s, 60.0);
        args.open_duration_s = Some(30.0);
        assert_eq!(open_scenario(&args, 2_800.0).duration_s, 30.0);
        // A target that completed almost nothing is still offered one command a second.
        assert_eq!(open_scenario(&args, 0.0).rate, Some(1.0));
    }
}
