//! The fault-injection harness. It starts the real processes (the gateway, two or more workers,
//! the treasury) against a private PostgreSQL cluster and a private RabbitMQ node, drives them
//! with virtual players whose every request and response is recorded, injects faults while they
//! run (SIGKILL of a worker mid-batch, of the treasury and of the gateway; restarts of RabbitMQ
//! and of PostgreSQL in immediate mode; client timeouts, resets and same-key retries; duplicate
//! deliveries), then drains the queues and checks the books against what the clients saw.
//!
//! Entry point: [`run`]. The `chaos` binary is a thin command line around it.

pub mod client;
pub mod cluster;
pub mod duplicates;
pub mod faults;
pub mod players;
pub mod records;
pub mod report;
pub mod services;
pub mod util;
pub mod verify;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shared::broker::Topology;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::{Client, FingerprintLayout, Misbehaviour, Session};
use crate::cluster::{Postgres, Rabbit, Watchdog};
use crate::duplicates::Duplicator;
use crate::faults::{FaultKind, RECOVERY_TIMEOUT_S};
use crate::records::{CommandRecord, Intent, RequestLog};
use crate::report::{ClientFigures, Report};
use crate::services::{Role, ServiceSpec, Services, SharedServices};
use crate::util::{free_ports, running_as_root, say};
use crate::verify::Check;

/// The secret the gateway signs tokens with (fixed, so tokens survive gateway restarts).
const JWT_SECRET: &str = "chaos-harness-secret-0123456789abcdef";
/// Every queue and exchange of a run carries this prefix (on a broker of its own anyway).
const QUEUE_PREFIX: &str = "chaos.";
/// The services' reconnection backoff cap: short, so recoveries are quick.
const SERVICE_RETRY_BACKOFF_MAX_MS: u64 = 1_000;
/// Longest the services may take to come up at the start.
const STARTUP_TIMEOUT_S: u64 = 120;
/// Pause between health probes at the start.
const STARTUP_PROBE_INTERVAL_MS: u64 = 250;
/// Faults stop this long before the load does, so the last one has recovered under load.
const FAULT_COOLDOWN_S: u64 = 5;
/// Longest the players take to finish their last command after the load stops.
const PLAYERS_STOP_TIMEOUT_S: u64 = 120;
/// Longest a fault still in progress when the load stops may take to finish.
const FAULTS_STOP_TIMEOUT_S: u64 = 180;
/// Late duplicates: how often, and how many applied commands are published again each time.
const LATE_DUPLICATE_INTERVAL_MS: u64 = 2_000;
const LATE_DUPLICATES_PER_ROUND: usize = 5;
/// Commands without a client-seen result that are retried once more after the drain, and how
/// many of those retries run at once.
const RESOLVE_RETRIES_MAX: usize = 2_000;
const RESOLVE_CONCURRENCY: usize = 8;
/// The drain after those retries (they only replay stored results).
const RESOLVE_DRAIN_TIMEOUT_S: u64 = 60;
/// Connections of the harness's own pool (monitoring and verification).
const MONITOR_CONNECTIONS_MAX: u32 = 4;
const MONITOR_ACQUIRE_TIMEOUT_MS: u64 = 3_000;

/// What a run does. Every field is a command-line flag of `chaos`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Seconds of load; faults are injected during it. 90 is the short run, 1800 a long one.
    #[arg(long, default_value_t = 90)]
    pub duration_s: u64,

    /// Concurrent virtual players.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub players: u32,

    /// Worker processes (at least two, so one can die while another takes over).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(2..=16))]
    pub workers: u16,

    /// PARTITIONS of the run's services.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,

    /// REPLY_TIMEOUT_MS of the gateway: low, so some commands are answered 202.
    #[arg(long, default_value_t = 1_000)]
    pub reply_timeout_ms: u64,

    /// Seconds of load before the first fault.
    #[arg(long, default_value_t = 10)]
    pub warmup_s: u64,

    /// Seconds between the starts of two faults (longer when a recovery takes longer).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub fault_interval_s: u64,

    /// Faults to inject, in turn.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = FaultKind::ALL.to_vec())]
    pub faults: Vec<FaultKind>,

    /// Attempts sent with a short client timeout (whole percent).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub short_timeout_percent: u32,

    /// Commands whose first attempt is sent twice at once with one key (whole percent).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub concurrent_percent: u32,

    /// Top-ups and purchases also published straight to their partition queue (whole percent).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub duplicate_percent: u32,

    /// Longest wait for the queues to drain at the end.
    #[arg(long, default_value_t = 180)]
    pub drain_timeout_s: u64,

    /// Seed of the players' and the schedule's randomness (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Where the gateway, worker and treasury binaries are (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,

    /// PostgreSQL's server binaries (initdb, pg_ctl).
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pub postgres_bin_dir: PathBuf,

    /// RabbitMQ's scripts (rabbitmq-server, rabbitmqctl), not the /usr/sbin wrappers.
    #[arg(long, default_value = "/usr/lib/rabbitmq/bin")]
    pub rabbitmq_bin_dir: PathBuf,

    /// Directory in which the run directory is made (default: the system's temp directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,

    /// Keep the run directory (logs, request records, data) even when the run passes.
    #[arg(long)]
    pub keep: bool,

    /// Self-test of the harness: after the drain, delete one applied top-up from the books and
    /// post another one's legs a second time. The run must then report 1 lost, 1 applied twice
    /// and a failed audit.
    #[arg(long)]
    pub sabotage: bool,

    /// Extra environment for every service, e.g. --service-env BATCH_SIZE_MAX=64.
    #[arg(long = "service-env", value_name = "KEY=VALUE")]
    pub service_env: Vec<String>,
}

#[derive(Parser)]
struct OptionsOnly {
    #[command(flatten)]
    options: Options,
}

impl Options {
    /// Options from command-line style arguments (without the program name), defaults for the
    /// rest: `Options::from_args(["--duration-s", "60"])`.
    pub fn from_args<I, T>(args: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("chaos"))
            .chain(args.into_iter().map(Into::into));
        Ok(OptionsOnly::try_parse_from(argv)?.options)
    }
}

/// Everything a run owns: the private instances, the services and the client. Dropping it
/// without [`Rig::teardown`] (a panic) kills what it can at once; the watchdog does the rest.
pub struct Rig {
    pub run_dir: PathBuf,
    pub postgres: Postgres,
    pub rabbit: tokio::sync::Mutex<Rabbit>,
    pub services: SharedServices,
    pub monitor: PgPool,
    pub client: Arc<Client>,
    canary: OnceLock<Session>,
    /// Records of the commands sent while setting up (the canary's).
    setup_records: Mutex<Vec<CommandRecord>>,
    service_names: Vec<String>,
    watchdog: Mutex<Option<Watchdog>>,
    torn_down: AtomicBool,
}

impl Rig {
    /// Stops everything in order: services (SIGTERM, then SIGKILL), RabbitMQ, PostgreSQL; then
    /// removes the run directory unless it is kept.
    pub async fn teardown(&self, keep_dir: bool) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        self.monitor.close().await;
        self.client.duplicator.close().await;
        if let Ok(mut services) = self.services.lock() {
            services.terminate_all();
        }
        if let Err(error) = self.rabbit.lock().await.stop().await {
            say(format!("stopping RabbitMQ: {error:#}"));
        }
        if let Err(error) = self.postgres.stop("fast").await {
            say(format!("stopping PostgreSQL: {error:#}"));
            self.postgres.stop_now();
        }
        if let Ok(mut watchdog) = self.watchdog.lock()
            && let Some(mut watchdog) = watchdog.take()
        {
            watchdog.dismiss();
        }
        if !keep_dir {
            drop(std::fs::remove_dir_all(&self.run_dir));
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(mut services) = self.services.lock() {
            services.kill_all();
        }
        if let Ok(mut rabbit) = self.rabbit.try_lock() {
            rabbit.kill_now();
        }
        self.postgres.stop_now();
        // The watchdog stays: it removes the run directory when the harness exits.
    }
}

/// Runs the harness once; the report says whether every check passed. `shutdown` (Ctrl-C)
/// stops the run early, tears everything down and reports it as interrupted.
pub async fn run(options: Options, shutdown: CancellationToken) -> anyhow::Result<Report> {
    util::elapsed();
    let seed = options.seed.unwrap_or_else(|| {
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|since| since.as_micros())
                .unwrap_or(0)
                % u128::from(u64::MAX),
        )
        .unwrap_or(0)
    });
    let bin_dir = match &options.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the chaos binary has no directory")?
            .to_path_buf(),
    };
    for binary in ["gateway", "worker", "treasury"] {
        let path = bin_dir.join(binary);
        if !path.is_file() {
            bail!(
                "{} not found: build the services (cargo build -p gateway -p worker -p treasury) or pass --bin-dir",
                path.display()
            );
        }
    }
    for program in [
        options.postgres_bin_dir.join("initdb"),
        options.postgres_bin_dir.join("pg_ctl"),
        options.rabbitmq_bin_dir.join("rabbitmq-server"),
        options.rabbitmq_bin_dir.join("rabbitmqctl"),
    ] {
        if !program.exists() {
            bail!(
                "{} not found (install PostgreSQL and RabbitMQ, or pass --postgres-bin-dir / --rabbitmq-bin-dir)",
                program.display()
            );
        }
    }
    let service_env = options
        .service_env
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .with_context(|| format!("--service-env {pair}: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let run_dir = make_run_dir(options.work_dir.as_deref(), seed)?;
    say(format!(
        "run directory {} (seed {seed}, services from {})",
        run_dir.display(),
        bin_dir.display()
    ));
    let rig = Arc::new(Rig::new(&options, &run_dir, &bin_dir, &service_env).await?);
    if let Err(error) = rig.start().await {
        say(format!(
            "setup failed; tearing down (the run directory {} is kept)",
            run_dir.display()
        ));
        rig.teardown(true).await;
        return Err(error);
    }
    let outcome = drive(&rig, &options, seed, &shutdown).await;
    let passed = outcome.as_ref().is_ok_and(Report::passed);
    let keep_dir = options.keep || !passed;
    say("tearing down");
    rig.teardown(keep_dir).await;
    let mut report = outcome?;
    report.run_dir = run_dir;
    report.run_dir_kept = keep_dir;
    Ok(report)
}

fn make_run_dir(work_dir: Option<&Path>, seed: u64) -> anyhow::Result<PathBuf> {
    let base = work_dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let unique = Uuid::new_v4().simple().to_string();
    let run_dir = base.join(format!(
        "chaos-{}-{seed}-{}",
        std::process::id(),
        &unique[..8]
    ));
    for sub in ["", "logs", "pids"] {
        std::fs::create_dir_all(run_dir.join(sub))
            .with_context(|| format!("creating {}", run_dir.join(sub).display()))?;
    }
    // PostgreSQL runs as another user and must reach its directory inside.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755))?;
    Ok(run_dir)
}

impl Rig {
    /// Prepares a run: the PostgreSQL cluster (initdb), the RabbitMQ node's files, the service
    /// definitions, the client and the watchdog. Nothing runs yet but the watchdog.
    async fn new(
        options: &Options,
        run_dir: &Path,
        bin_dir: &Path,
        service_env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let pids_dir = run_dir.join("pids");
        let ports = free_ports(4)?;
        let (postgres_port, amqp_port, dist_port, http_port) =
            (ports[0], ports[1], ports[2], ports[3]);
        let postgres = Postgres::create(
            run_dir,
            options.postgres_bin_dir.clone(),
            postgres_port,
            running_as_root(),
        )
        .await?;
        let watchdog = Watchdog::spawn(run_dir, &pids_dir, &postgres, options.keep)?;
        let node = format!("chaos{}x{postgres_port}@localhost", std::process::id());
        let rabbit = Rabbit::create(
            run_dir,
            &pids_dir,
            options.rabbitmq_bin_dir.clone(),
            node,
            amqp_port,
            dist_port,
        )?;
        let database_url =
            |name: &str| format!("{}/wallet?application_name={name}", postgres.server_url());
        let common = |name: &str| -> Vec<(String, String)> {
            let mut env = vec![
                ("DATABASE_URL".to_string(), database_url(name)),
                ("AMQP_URL".to_string(), rabbit.amqp_url()),
                ("PARTITIONS".to_string(), options.partitions.to_string()),
                ("QUEUE_PREFIX".to_string(), QUEUE_PREFIX.to_string()),
                (
                    "RETRY_BACKOFF_MAX_MS".to_string(),
                    SERVICE_RETRY_BACKOFF_MAX_MS.to_string(),
                ),
                ("LOG_FORMAT".to_string(), "text".to_string()),
                ("NO_COLOR".to_string(), "1".to_string()),
            ];
            env.extend(service_env.iter().cloned());
            env
        };
        let mut specs = Vec::new();
        let mut gateway_env = common("gateway");
        gateway_env.extend([
            ("HTTP_ADDR".to_string(), format!("127.0.0.1:{http_port}")),
            ("JWT_SECRET".to_string(), JWT_SECRET.to_string()),
            (
                "REPLY_TIMEOUT_MS".to_string(),
                options.reply_timeout_ms.to_string(),
            ),
        ]);
        specs.push(ServiceSpec {
            name: "gateway".to_string(),
            role: Role::Gateway,
            program: bin_dir.join("gateway"),
            env: gateway_env,
        });
        for index in 1..=options.workers {
            let name = format!("worker-{index}");
            let mut env = common(&name);
            env.push(("WORKER_ID".to_string(), name.clone()));
            specs.push(ServiceSpec {
                name,
                role: Role::Worker,
                program: bin_dir.join("worker"),
                env,
            });
        }
        specs.push(ServiceSpec {
            name: "treasury".to_string(),
            role: Role::Treasury,
            program: bin_dir.join("treasury"),
            env: common("treasury"),
        });
        let service_names: Vec<String> = specs.iter().map(|spec| spec.name.clone()).collect();
        let services = Arc::new(Mutex::new(Services::new(
            &run_dir.join("logs"),
            &pids_dir,
            specs,
        )));
        let (log, _writer) = RequestLog::start(&run_dir.join("requests.jsonl"))?;
        let topology = Topology {
            prefix: QUEUE_PREFIX.to_string(),
            partitions: options.partitions,
            queue_expires_ms: None,
        };
        let duplicator = Arc::new(Duplicator::new(rabbit.amqp_url(), topology));
        let client = Arc::new(Client::new(
            format!("http://127.0.0.1:{http_port}"),
            log,
            duplicator,
            Misbehaviour {
                short_timeout_percent: options.short_timeout_percent,
                concurrent_percent: options.concurrent_percent,
                duplicate_percent: options.duplicate_percent,
            },
        )?);
        // Lazy: the database exists only once the services created it.
        let monitor = PgPoolOptions::new()
            .max_connections(MONITOR_CONNECTIONS_MAX)
            .acquire_timeout(Duration::from_millis(MONITOR_ACQUIRE_TIMEOUT_MS))
            .connect_lazy_with(shared::db::connect_options(&database_url("chaos"))?);
        Ok(Self {
            run_dir: run_dir.to_path_buf(),
            postgres,
            rabbit: tokio::sync::Mutex::new(rabbit),
            services,
            monitor,
            client,
            canary: OnceLock::new(),
            setup_records: Mutex::new(Vec::new()),
            service_names,
            watchdog: Mutex::new(Some(watchdog)),
            torn_down: AtomicBool::new(false),
        })
    }

    /// Starts PostgreSQL, RabbitMQ and the services, waits until the gateway is healthy, and
    /// sets up the canary player.
    async fn start(&self) -> anyhow::Result<()> {
        self.postgres.start().await?;
        {
            let mut rabbit = self.rabbit.lock().await;
            rabbit.start().await?;
            cluster::describe(&self.postgres, &rabbit);
        }
        {
            let mut services = self
                .services
                .lock()
                .map_err(|_| anyhow::anyhow!("services lock poisoned"))?;
            for name in &self.service_names {
                services.start(name)?;
            }
        }
        let started = Instant::now();
        while !self.client.healthy().await {
            if started.elapsed() > Duration::from_secs(STARTUP_TIMEOUT_S) {
                bail!(
                    "the gateway did not become healthy within {STARTUP_TIMEOUT_S} s (logs in {})",
                    self.run_dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(STARTUP_PROBE_INTERVAL_MS)).await;
        }
        say(format!(
            "services up: {} ({} ms)",
            self.service_names.join(", "),
            started.elapsed().as_millis()
        ));
        let (canary, records) = canary(&self.client, &self.monitor).await?;
        if let Ok(mut setup_records) = self.setup_records.lock() {
            setup_records.extend(records);
        }
        self.canary
            .set(canary)
            .map_err(|_| anyhow::anyhow!("the canary was set up twice"))?;
        Ok(())
    }

    /// The canary player of the recovery probes.
    pub fn canary(&self) -> anyhow::Result<&Session> {
        self.canary.get().context("the canary player is not set up")
    }
}

/// Signs up the canary player (used by the recovery probes) and checks that the harness derives
/// the gateway's request fingerprints; only then can it publish exact duplicates.
async fn canary(
    client: &Client,
    monitor: &PgPool,
) -> anyhow::Result<(Session, Vec<CommandRecord>)> {
    let mut rng = StdRng::seed_from_u64(0);
    let signup = client
        .command(
            None,
            &Intent::Signup {
                username: "canary".to_string(),
                referral_code: None,
            },
            "canary-signup".to_string(),
            &mut rng,
        )
        .await;
    anyhow::ensure!(
        matches!(signup.result, Some((200, _))),
        "the canary signup failed: {:?}",
        signup.result
    );
    let session = client
        .login("canary", &mut rng)
        .await
        .context("the canary could not log in")?;
    let top_up_intent = Intent::TopUp { amount: 1 };
    let top_up = client
        .command(
            Some(&session),
            &top_up_intent,
            "canary-fingerprint".to_string(),
            &mut rng,
        )
        .await;
    anyhow::ensure!(
        matches!(top_up.result, Some((200, _))),
        "the canary top-up failed: {:?}",
        top_up.result
    );
    // Refused (the canary cannot afford it) or not, its fingerprint is stored with the result.
    let purchase_intent = Intent::Purchase {
        item: "gold_coin",
        quantity: 1,
    };
    let purchase = client
        .command(
            Some(&session),
            &purchase_intent,
            "canary-fingerprint-purchase".to_string(),
            &mut rng,
        )
        .await;
    anyhow::ensure!(
        purchase.result.is_some(),
        "the canary purchase got no result: {:?}",
        purchase.unexpected
    );
    let stored: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, fingerprint FROM commands WHERE id = ANY($1)")
            .bind([top_up.command_id, purchase.command_id])
            .fetch_all(monitor)
            .await?;
    let stored_of = |id: Uuid| {
        stored
            .iter()
            .find(|(stored_id, _)| *stored_id == id)
            .map(|(_, fingerprint)| fingerprint.clone())
    };
    let key = client::gateway_fingerprint_key(JWT_SECRET);
    let layout = FingerprintLayout::CANDIDATES.into_iter().find(|layout| {
        layout.fingerprint(&key, session.player_id, &top_up_intent) == stored_of(top_up.command_id)
            && layout.fingerprint(&key, session.player_id, &purchase_intent)
                == stored_of(purchase.command_id)
    });
    match layout {
        Some(layout) => {
            client.enable_duplicates(key, layout);
            say(format!(
                "canary ok; racing duplicate deliveries enabled (fingerprint layout {layout:?})"
            ));
        }
        None => say(
            "WARNING: the harness cannot rebuild the gateway's request fingerprints (see \
             FingerprintLayout in chaos/src/client.rs); only duplicates of applied commands, \
             rebuilt from the books, are delivered",
        ),
    }
    Ok((session, vec![signup, top_up, purchase]))
}

/// The run proper: load with faults, drain, one more retry of unresolved commands, checks.
async fn drive(
    rig: &Arc<Rig>,
    options: &Options,
    seed: u64,
    shutdown: &CancellationToken,
) -> anyhow::Result<Report> {
    let mut report = Report {
        seed,
        duration_s: options.duration_s,
        workers: options.workers,
        partitions: options.partitions,
        players: options.players,
        fault_kinds: options.faults.clone(),
        ..Report::default()
    };
    let stop_supervisor = CancellationToken::new();
    let supervisor = tokio::spawn(services::supervise(
        Arc::clone(&rig.services),
        stop_supervisor.clone(),
    ));
    let result = drive_supervised(rig, options, seed, shutdown, &mut report).await;
    stop_supervisor.cancel();
    drop(supervisor.await);
    if let Ok(services) = rig.services.lock() {
        report.unexpected_exits = services.unexpected_exits.clone();
    }
    // Per service: how often, how, and when first (a crash loop is one line).
    let mut exits: Vec<(String, usize, String, u64)> = Vec::new();
    for exit in &report.unexpected_exits {
        match exits
            .iter_mut()
            .find(|(service, ..)| *service == exit.service)
        {
            Some(entry) => entry.1 += 1,
            None => exits.push((exit.service.clone(), 1, exit.status.clone(), exit.at_ms)),
        }
    }
    report.run_checks.push(Check {
        name: "no service exited by itself",
        passed: exits.is_empty(),
        detail: if exits.is_empty() {
            "none did".to_string()
        } else {
            exits
                .iter()
                .map(|(service, count, status, first_ms)| {
                    format!(
                        "{service} exited {count} times ({status}), first at {first_ms} ms; see its log"
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
    });
    result.map(|()| report)
}

async fn drive_supervised(
    rig: &Arc<Rig>,
    options: &Options,
    seed: u64,
    shutdown: &CancellationToken,
    report: &mut Report,
) -> anyhow::Result<()> {
    let load_started = Instant::now();
    let load_ends = load_started + Duration::from_secs(options.duration_s);
    let stop_load = CancellationToken::new();
    let shared_players = Arc::new(players::Shared::default());
    say(format!(
        "load: {} players for {} s; faults {:?} every {} s from {} s",
        options.players,
        options.duration_s,
        options.faults,
        options.fault_interval_s,
        options.warmup_s
    ));
    let mut slots = tokio::task::JoinSet::new();
    for slot in 1..=options.players {
        slots.spawn(players::run_slot(
            Arc::clone(&rig.client),
            Arc::clone(&shared_players),
            slot,
            seed.wrapping_add(u64::from(slot)),
            stop_load.clone(),
        ));
    }
    let late_published = Arc::new(AtomicU64::new(0));
    let late = tokio::spawn(late_duplicates(
        Arc::clone(rig),
        seed,
        Arc::clone(&late_published),
        stop_load.clone(),
    ));
    let stop_faults = CancellationToken::new();
    let fault_rig = Arc::clone(rig);
    let kinds = options.faults.clone();
    let first_fault = load_started + Duration::from_secs(options.warmup_s);
    let last_fault = load_ends
        .checked_sub(Duration::from_secs(FAULT_COOLDOWN_S))
        .unwrap_or(load_started);
    let interval = Duration::from_secs(options.fault_interval_s);
    let fault_stop = stop_faults.clone();
    let mut fault_task = tokio::spawn(async move {
        faults::run_schedule(
            &fault_rig,
            &kinds,
            first_fault,
            interval,
            last_fault,
            fault_stop,
        )
        .await
    });

    let mut interrupted = false;
    tokio::select! {
        () = shutdown.cancelled() => interrupted = true,
        () = tokio::time::sleep_until(load_ends.into()) => {}
    }
    say(if interrupted {
        "interrupted: stopping the load"
    } else {
        "load done: stopping the players"
    });
    stop_load.cancel();
    stop_faults.cancel();
    let mut records: Vec<CommandRecord> = Vec::new();
    let players_deadline =
        tokio::time::Instant::now() + Duration::from_secs(PLAYERS_STOP_TIMEOUT_S);
    loop {
        match tokio::time::timeout_at(players_deadline, slots.join_next()).await {
            Ok(Some(Ok(mut slot_records))) => records.append(&mut slot_records),
            Ok(Some(Err(error))) => bail!("a player task failed: {error}"),
            Ok(None) => break,
            Err(_) => {
                slots.abort_all();
                bail!("the players did not stop within {PLAYERS_STOP_TIMEOUT_S} s");
            }
        }
    }
    drop(late.await);
    let (events, mut probes) =
        match tokio::time::timeout(Duration::from_secs(FAULTS_STOP_TIMEOUT_S), &mut fault_task)
            .await
        {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => bail!("the fault schedule failed: {error}"),
            Err(_) => {
                fault_task.abort();
                bail!("a fault did not finish within {FAULTS_STOP_TIMEOUT_S} s");
            }
        };
    records.append(&mut probes);
    if let Ok(mut setup_records) = rig.setup_records.lock() {
        records.append(&mut setup_records);
    }
    report.faults = events;
    let counters = &rig.client.counters;
    report.client = ClientFigures {
        requests: counters.requests.load(Ordering::Relaxed),
        timeouts: counters.timeouts.load(Ordering::Relaxed),
        connection_errors: counters.connection_errors.load(Ordering::Relaxed),
        concurrent_pairs: counters.concurrent_pairs.load(Ordering::Relaxed),
        gave_up: counters.gave_up.load(Ordering::Relaxed),
        statuses: counters
            .statuses
            .lock()
            .map(|statuses| statuses.clone())
            .unwrap_or_default(),
        duplicates_racing: rig
            .client
            .duplicator
            .published
            .load(Ordering::Relaxed)
            .saturating_sub(late_published.load(Ordering::Relaxed)),
        duplicates_late: late_published.load(Ordering::Relaxed),
        duplicates_failed: rig.client.duplicator.failed.load(Ordering::Relaxed),
        racing_enabled: rig.client.racing_duplicates_enabled(),
        resolved_after_drain: 0,
    };
    if interrupted {
        report.interrupted = true;
        return Ok(());
    }

    say(format!(
        "{} commands sent; draining (up to {} s)",
        records.len(),
        options.drain_timeout_s
    ));
    report.drain = verify::drain(
        rig,
        QUEUE_PREFIX,
        Duration::from_secs(options.drain_timeout_s),
    )
    .await;
    say(format!(
        "drain {} after {} ms (left: {:?}, unfolded credits {}, unpublished follow-ups {}, dead letters {})",
        if report.drain.drained {
            "done"
        } else {
            "NOT done"
        },
        report.drain.took_ms,
        report.drain.leftovers,
        report.drain.hot_credits,
        report.drain.outbox_unpublished,
        report.drain.dead_letters
    ));

    // Commands whose client never saw a result but that are stored: one more retry with the
    // same key must replay the stored result.
    let mut records = verify::merge(records);
    let resolved = resolve(rig, &shared_players, &mut records).await?;
    report.client.resolved_after_drain = resolved;
    if resolved > 0 {
        let again = verify::drain(
            rig,
            QUEUE_PREFIX,
            Duration::from_secs(RESOLVE_DRAIN_TIMEOUT_S),
        )
        .await;
        report.drain.drained &= again.drained;
        report.drain.dead_letters = again.dead_letters;
    }
    // Counted after the resolution retries, so the table shows everything the client did.
    report.client.requests = counters.requests.load(Ordering::Relaxed);
    if let Ok(statuses) = counters.statuses.lock() {
        report.client.statuses = statuses.clone();
    }

    if options.sabotage {
        sabotage(&rig.monitor, &records).await?;
    }
    report.verdict = verify::verify(&rig.monitor, &records).await?;
    run_checks(report, options);
    Ok(())
}

/// The checks of the run itself: drained, every fault injected and recovered from.
fn run_checks(report: &mut Report, options: &Options) {
    let drain = &report.drain;
    report.run_checks.push(Check {
        name: "queues drained, credits folded, follow-ups published",
        passed: drain.drained,
        detail: format!(
            "after {} ms; left {:?}, unfolded credits {}, unpublished follow-ups {}{}",
            drain.took_ms,
            drain.leftovers,
            drain.hot_credits,
            drain.outbox_unpublished,
            drain
                .last_error
                .as_ref()
                .map(|error| format!("; last error: {error}"))
                .unwrap_or_default()
        ),
    });
    report.run_checks.push(Check {
        name: "no command was dead-lettered",
        passed: drain.dead_letters == 0,
        detail: format!("{} dead letters", drain.dead_letters),
    });
    if options.duplicate_percent > 0 {
        let client = &report.client;
        report.run_checks.push(Check {
            name: "duplicate deliveries were injected",
            passed: client.duplicates_racing + client.duplicates_late > 0,
            detail: format!(
                "{} racing the request{}, {} of applied commands, {} publishes failed (broker down)",
                client.duplicates_racing,
                if client.racing_enabled {
                    ""
                } else {
                    " (disabled: the gateway's fingerprints could not be rebuilt)"
                },
                client.duplicates_late,
                client.duplicates_failed
            ),
        });
    }
    let not_recovered: Vec<String> = report
        .faults
        .iter()
        .filter(|fault| fault.recovered_after_ms.is_none())
        .map(|fault| {
            format!(
                "{} ({}) at {} ms: {}",
                fault.kind.label(),
                fault.target,
                fault.at_ms,
                fault
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("no command served within {RECOVERY_TIMEOUT_S} s"))
            )
        })
        .collect();
    report.run_checks.push(Check {
        name: "the system served commands again after every fault",
        passed: not_recovered.is_empty(),
        detail: if not_recovered.is_empty() {
            format!("{} faults, all recovered", report.faults.len())
        } else {
            not_recovered.join("; ")
        },
    });
    let missing: Vec<&str> = options
        .faults
        .iter()
        .collect::<HashSet<_>>()
        .into_iter()
        .filter(|kind| report.faults_of(**kind) == 0)
        .map(|kind| kind.label())
        .collect();
    report.run_checks.push(Check {
        name: "every fault kind asked for was injected",
        passed: missing.is_empty(),
        detail: if missing.is_empty() {
            "yes".to_string()
        } else {
            format!(
                "never injected: {} (run longer or lower --fault-interval-s)",
                missing.join(", ")
            )
        },
    });
}

/// Corrupts the books the way a lost and a doubled command would (see `--sabotage`).
async fn sabotage(pool: &PgPool, records: &[CommandRecord]) -> anyhow::Result<()> {
    let victims: Vec<Uuid> = records
        .iter()
        .filter(|record| {
            record.kind == records::Kind::TopUp && matches!(record.result, Some((200, _)))
        })
        .take(2)
        .map(|record| record.command_id)
        .collect();
    anyhow::ensure!(victims.len() == 2, "no two applied top-ups to sabotage");
    let mut transaction = pool.begin().await?;
    // The first one is lost: its result, journal entry and postings vanish.
    for statement in [
        "DELETE FROM postings WHERE journal_id = $1",
        "DELETE FROM journal_entries WHERE id = $1",
        "DELETE FROM commands WHERE id = $1",
    ] {
        sqlx::query(statement)
            .bind(victims[0])
            .execute(&mut *transaction)
            .await?;
    }
    // The second one is applied twice: its legs are posted again.
    sqlx::query(
        "INSERT INTO postings (journal_id, account_id, asset, amount)
         SELECT journal_id, account_id, asset, amount FROM postings WHERE journal_id = $1",
    )
    .bind(victims[1])
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    say(format!(
        "SABOTAGE: deleted top-up {} from the books, posted top-up {} twice",
        victims[0], victims[1]
    ));
    Ok(())
}

/// Publishes, every few seconds, copies of commands that were already applied.
async fn late_duplicates(
    rig: Arc<Rig>,
    seed: u64,
    published: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(LATE_DUPLICATE_INTERVAL_MS)) => {}
        }
        let mut envelopes = rig
            .client
            .duplicator
            .sample_applied(LATE_DUPLICATES_PER_ROUND, |len| rng.random_range(0..len));
        // The exact fingerprint is the one stored with the result.
        let ids: Vec<Uuid> = envelopes.iter().map(|envelope| envelope.id).collect();
        let Ok(stored) = sqlx::query_as::<_, (Uuid, String)>(
            "SELECT id, fingerprint FROM commands WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&rig.monitor)
        .await
        else {
            continue;
        };
        for envelope in &mut envelopes {
            let Some((_, fingerprint)) = stored.iter().find(|(id, _)| *id == envelope.id) else {
                continue;
            };
            envelope.fingerprint.clone_from(fingerprint);
            if rig.client.duplicator.publish(envelope).await {
                published.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Retries, once more with the same key, commands that are stored but whose client never saw
/// a result (it got 202s, timeouts or 503s, or gave up): the retry must replay the stored
/// result. Returns how many were retried.
async fn resolve(
    rig: &Rig,
    shared_players: &players::Shared,
    records: &mut [CommandRecord],
) -> anyhow::Result<usize> {
    let unresolved: Vec<Uuid> = records
        .iter()
        .filter(|record| record.result.is_none() && record.unexpected.is_empty())
        .map(|record| record.command_id)
        .collect();
    let stored: HashSet<Uuid> =
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM commands WHERE id = ANY($1)")
            .bind(&unresolved)
            .fetch_all(&rig.monitor)
            .await?
            .into_iter()
            .collect();
    let mut jobs = Vec::new();
    for (index, record) in records.iter().enumerate() {
        if jobs.len() >= RESOLVE_RETRIES_MAX {
            break;
        }
        if record.result.is_some() || !stored.contains(&record.command_id) {
            continue;
        }
        let session = match record.intent {
            Intent::Signup { .. } => None,
            _ if Some(record.player_id) == rig.canary.get().map(|canary| canary.player_id) => {
                rig.canary.get().cloned()
            }
            _ => match shared_players.session(record.player_id) {
                Some(session) => Some(session),
                None => continue,
            },
        };
        jobs.push((index, session, record.intent.clone(), record.key.clone()));
    }
    if jobs.is_empty() {
        return Ok(0);
    }
    say(format!(
        "retrying {} stored commands whose client saw no result",
        jobs.len()
    ));
    let count = jobs.len();
    let client = &rig.client;
    let retried: Vec<(usize, CommandRecord)> = futures_util::stream::iter(jobs)
        .map(|(index, session, intent, key)| async move {
            let mut rng = StdRng::seed_from_u64(u64::try_from(index).unwrap_or(0));
            let record = client
                .command(session.as_ref(), &intent, key, &mut rng)
                .await;
            (index, record)
        })
        .buffer_unordered(RESOLVE_CONCURRENCY)
        .collect()
        .await;
    for (index, retry) in retried {
        let original = records[index].clone();
        let merged = verify::merge(vec![original.clone(), retry]);
        if let Some(mut merged) = merged.into_iter().next() {
            // The retry checks convergence; it does not make the command accepted in the run.
            merged.accepted = original.accepted;
            merged.accepted_202 = original.accepted_202;
            merged.resolved_after_drain = true;
            records[index] = merged;
        }
    }
    Ok(count)
}
