use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use bench::baseline::BaselineConfig;
use bench::compare::CompareArgs;
use bench::driver::{Load, measure};
use bench::report::{json_path, machine, render_table, warn_about_writeback, write_json};
use bench::scenario::{ScenarioArgs, Target, prepare};
use bench::worker_only::WorkerOnlyArgs;

/// mimalloc instead of glibc's allocator: allocation was a large share of the CPU profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Load driver, synchronous baseline and measurements for the wallet (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Drive a running gateway (or baseline) with a scenario and report.
    Run(RunArgs),
    /// Serve the synchronous baseline: one PostgreSQL transaction with FOR UPDATE per request.
    BaselineServer(BaselineConfig),
    /// Start the system and the baseline, run the same scenario against both, print the ratio.
    Compare(Box<CompareArgs>),
    /// Publish ready-made commands with the gateway off, then time the workers applying them.
    WorkerOnly(WorkerOnlyArgs),
    /// Read a `--trace-dir` file: its slow answers grouped into episodes, each with the slowest
    /// probe flush around it.
    TraceEpisodes(TraceEpisodesArgs),
}

#[derive(clap::Args)]
struct TraceEpisodesArgs {
    /// A CSV file written by `--trace-dir`.
    file: PathBuf,

    /// An answer slower than this is slow.
    #[arg(long, default_value_t = 50.0)]
    slow_ms: f64,

    /// Slow answers sent at most this far apart belong to the same episode.
    #[arg(long, default_value_t = 200.0)]
    gap_ms: f64,

    /// An episode with a probe flush at least this slow counts as the disk's.
    #[arg(long, default_value_t = 30.0)]
    flush_ms: f64,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    scenario: ScenarioArgs,

    /// Base URL of the gateway (or of a baseline server).
    #[arg(long, env = "BENCH_TARGET", default_value = "http://127.0.0.1:8080")]
    target: String,

    /// The target's database, needed by --setup sql and --treasury-lag.
    #[arg(long, env = "BENCH_DATABASE_URL")]
    database_url: Option<String>,

    /// The target's JWT secret, needed by --setup sql to mint tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,

    /// After the load, poll the target's `hot_credits` until it is empty and report how long
    /// that took (the real system; the baseline folds nothing).
    #[arg(long, requires = "database_url")]
    treasury_lag: bool,

    /// Name of the target in the table (default: its URL).
    #[arg(long)]
    label: Option<String>,

    /// Where the JSON goes (default bench-results/<scenario>-<timestamp>.json).
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    shared::telemetry::init("text");
    match cli.command {
        BenchCommand::Run(args) => run(args).await,
        BenchCommand::BaselineServer(config) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(shared::shutdown::on_signal(shutdown.clone()));
            bench::baseline::run(config, shutdown).await
        }
        BenchCommand::Compare(args) => bench::compare::run(*args).await.map(drop),
        BenchCommand::WorkerOnly(args) => bench::worker_only::run(args).await.map(drop),
        BenchCommand::TraceEpisodes(args) => trace_episodes(&args),
    }
}

fn trace_episodes(args: &TraceEpisodesArgs) -> anyhow::Result<()> {
    let events = bench::trace::read_csv(&args.file)?;
    let found = bench::trace::episodes(&events, args.slow_ms, args.gap_ms);
    let percent = |part: usize| 100.0 * part as f64 / found.requests.max(1) as f64;
    println!(
        "{}: {} requests, {} slower than {} ms ({:.2} %)",
        args.file.display(),
        found.requests,
        found.slow_requests,
        args.slow_ms,
        percent(found.slow_requests)
    );
    println!(
        " {:>10} {:>10} {:>8} {:>14} {:>15}",
        "first (ms)", "last (ms)", "slow", "slowest (ms)", "probe flush (ms)"
    );
    for episode in &found.episodes {
        println!(
            " {:>10.0} {:>10.0} {:>8} {:>14.1} {:>15.1}",
            episode.first_ms,
            episode.last_ms,
            episode.slow_requests,
            episode.latency_max_ms,
            episode.flush_max_ms
        );
    }
    let by_disk: usize = found
        .episodes
        .iter()
        .filter(|episode| episode.flush_max_ms >= args.flush_ms)
        .map(|episode| episode.slow_requests)
        .sum();
    println!(
        "{} of the {} slow answers ({:.2} % of all requests) fall in episodes with a probe flush of at least {} ms",
        by_disk,
        found.slow_requests,
        percent(by_disk),
        args.flush_ms
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let target = Target {
        label: args.label.clone().unwrap_or_else(|| args.target.clone()),
        base_url: args.target.trim_end_matches('/').to_string(),
        database_url: args.database_url.clone(),
        jwt_secret: args.jwt_secret.clone(),
    };
    let scenario = &args.scenario;
    println!(
        "bench run: {} against {} ({} players, setup {:?})",
        scenario.scenario.name(),
        target.base_url,
        scenario.players(),
        scenario.setup_method()
    );
    let prepared = Arc::new(prepare(&target, scenario).await?);
    println!("setup took {:.1} s", prepared.setup_s);
    let report = measure(&target, scenario, prepared, Load::from_args(scenario)?).await?;
    let treasury_lag = match args.database_url.as_ref().filter(|_| args.treasury_lag) {
        Some(url) => {
            let pool = bench::compare::connect(url).await?;
            let lag = bench::compare::treasury_lag(&pool).await;
            pool.close().await;
            Some(lag?)
        }
        None => None,
    };
    println!();
    println!("{}", render_table(&[&report]));
    if let Some(lag) = &treasury_lag {
        match lag.drained_ms {
            Some(ms) => println!(
                "treasury lag: {} credits unfolded when the load stopped, all folded {ms:.1} ms later",
                lag.credits_at_stop
            ),
            None => println!(
                "treasury lag: {} credits unfolded when the load stopped, NOT all folded in time",
                lag.credits_at_stop
            ),
        }
    }
    let machine = machine();
    warn_about_writeback(&machine);
    let path = json_path(args.json_out.as_deref(), scenario.scenario.name());
    write_json(
        &path,
        &serde_json::json!({
            "kind": "run",
            "machine": machine,
            "report": report,
            "treasury_lag": treasury_lag,
        }),
    )?;
    println!("JSON written to {}", path.display());
    Ok(())
}
