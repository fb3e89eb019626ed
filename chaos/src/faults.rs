//! The fault schedule: SIGKILL of a worker (timed to land inside a batch transaction), of the
//! treasury consumer and of the gateway, each restarted; restarts of RabbitMQ and of PostgreSQL
//! (immediate mode). After each fault the harness measures how long the system takes to serve
//! a command end to end again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Rig;
use crate::records::CommandRecord;
use crate::records::Intent;
use crate::services::Role;
use crate::util::{elapsed_ms, say};

/// Pause between a SIGKILL and the restart of the killed process.
const RESTART_DELAY_MS: u64 = 500;
/// How long RabbitMQ and PostgreSQL stay down before they are started again.
const BROKER_DOWN_MS: u64 = 1_000;
const DATABASE_DOWN_MS: u64 = 1_000;
/// How long PostgreSQL stays down in the overlapping outage.
const DATABASE_OUTAGE_MS: u64 = 5_000;
/// How long the harness waits for a worker (or the treasury) to be inside a transaction before
/// it kills it anyway.
const MID_TRANSACTION_WAIT_MS: u64 = 3_000;
/// Longest the system may take to serve a command end to end after a fault.
pub const RECOVERY_TIMEOUT_S: u64 = 90;
/// Pause between health probes while recovering.
const HEALTH_PROBE_INTERVAL_MS: u64 = 200;
/// Most faults one run injects (a run of days at the least interval stays below it).
const FAULTS_PER_RUN_MAX: usize = 100_000;
/// Least time between the end of one fault's recovery and the next fault.
const FAULT_GAP_MIN_MS: u64 = 2_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum FaultKind {
    /// SIGKILL a worker, inside a batch transaction when one can be caught.
    Worker,
    /// SIGKILL the treasury consumer.
    Treasury,
    /// SIGKILL the gateway.
    Gateway,
    /// Stop and start the RabbitMQ node.
    Rabbitmq,
    /// Stop PostgreSQL in immediate mode (a crash) and start it.
    Postgres,
    /// SIGKILL the RabbitMQ node (a broker crash) and start it. Not in the default schedule.
    RabbitmqKill,
    /// Overlapping faults: PostgreSQL crashes (immediate mode) and stays down for a few seconds,
    /// during which the gateway and a worker are killed and started again. Not in the default
    /// schedule.
    DatabaseOutage,
}

impl FaultKind {
    /// Every kind, in the order of the schedule. The broker restart, the slowest (its Erlang VM
    /// boots in seconds to tens of seconds on a loaded two-core machine), comes last so a short
    /// run still reaches every kind.
    pub const ALL: [FaultKind; 5] = [
        FaultKind::Worker,
        FaultKind::Treasury,
        FaultKind::Gateway,
        FaultKind::Postgres,
        FaultKind::Rabbitmq,
    ];

    /// Every kind, the default schedule's first.
    pub const EVERY: [FaultKind; 7] = [
        FaultKind::Worker,
        FaultKind::Treasury,
        FaultKind::Gateway,
        FaultKind::Postgres,
        FaultKind::Rabbitmq,
        FaultKind::RabbitmqKill,
        FaultKind::DatabaseOutage,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FaultKind::RabbitmqKill => "RabbitMQ crash (SIGKILL)",
            FaultKind::DatabaseOutage => "PostgreSQL outage + gateway/worker restarts",
            FaultKind::Worker => "worker SIGKILL",
            FaultKind::Treasury => "treasury SIGKILL",
            FaultKind::Gateway => "gateway SIGKILL",
            FaultKind::Rabbitmq => "RabbitMQ restart",
            FaultKind::Postgres => "PostgreSQL restart (immediate)",
        }
    }
}

/// One injected fault and how the system came back.
#[derive(Debug, Clone)]
pub struct FaultEvent {
    pub kind: FaultKind,
    pub target: String,
    pub at_ms: u64,
    /// For kills: the process was inside a database transaction when it died.
    pub mid_transaction: bool,
    /// Time from the restart until a command was served end to end again.
    pub recovered_after_ms: Option<u64>,
    pub error: Option<String>,
}

/// Runs faults one after another from `first_at` until `last_at`, cycling through `kinds`.
/// Returns the faults and the records of the recovery probes.
pub async fn run_schedule(
    rig: &Rig,
    kinds: &[FaultKind],
    first_at: Instant,
    interval: Duration,
    last_at: Instant,
    stop: CancellationToken,
) -> (Vec<FaultEvent>, Vec<CommandRecord>) {
    let mut events = Vec::new();
    let mut probes = Vec::new();
    let mut next = first_at;
    let mut worker_turn = 0usize;
    let probe_counter = AtomicU32::new(0);
    for index in 0..FAULTS_PER_RUN_MAX {
        if kinds.is_empty() || next > last_at {
            break;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(next.into()) => {}
        }
        let kind = kinds[index % kinds.len()];
        let mut event = FaultEvent {
            kind,
            target: String::new(),
            at_ms: elapsed_ms(),
            mid_transaction: false,
            recovered_after_ms: None,
            error: None,
        };
        let restarted = inject(rig, kind, &mut worker_turn, &mut event).await;
        match restarted {
            Ok(restarted_at) => {
                let (recovered, mut records) = recover(rig, &probe_counter).await;
                probes.append(&mut records);
                event.recovered_after_ms = recovered.map(|at| {
                    u64::try_from(at.saturating_duration_since(restarted_at).as_millis())
                        .unwrap_or(u64::MAX)
                });
                match event.recovered_after_ms {
                    Some(ms) => say(format!(
                        "fault {}: {} ({}) served commands again {ms} ms after the restart",
                        index + 1,
                        kind.label(),
                        event.target
                    )),
                    None => say(format!(
                        "FAULT {}: {} ({}): NOT RECOVERED within {RECOVERY_TIMEOUT_S} s",
                        index + 1,
                        kind.label(),
                        event.target
                    )),
                }
            }
            Err(error) => {
                say(format!(
                    "fault {}: {} failed to inject: {error:#}",
                    index + 1,
                    kind.label()
                ));
                event.error = Some(format!("{error:#}"));
            }
        }
        rig.client.log.note(
            "fault",
            json!({
                "kind": kind.label(), "target": event.target, "at_ms": event.at_ms,
                "mid_transaction": event.mid_transaction,
                "recovered_after_ms": event.recovered_after_ms, "error": event.error,
            }),
        );
        events.push(event);
        next = (next + interval).max(Instant::now() + Duration::from_millis(FAULT_GAP_MIN_MS));
    }
    (events, probes)
}

/// Injects one fault and brings the victim back; returns when it was restarted.
async fn inject(
    rig: &Rig,
    kind: FaultKind,
    worker_turn: &mut usize,
    event: &mut FaultEvent,
) -> anyhow::Result<Instant> {
    match kind {
        FaultKind::Worker | FaultKind::Treasury | FaultKind::Gateway => {
            let role = match kind {
                FaultKind::Worker => Role::Worker,
                FaultKind::Treasury => Role::Treasury,
                _ => Role::Gateway,
            };
            let names = rig
                .services
                .lock()
                .map_err(|_| anyhow::anyhow!("services lock poisoned"))?
                .names(role);
            anyhow::ensure!(!names.is_empty(), "no {role:?} to kill");
            let name = if role == Role::Gateway {
                names[0].clone()
            } else {
                // The victim is whichever process is caught inside a transaction (for workers:
                // one that is applying a batch, so it owns partitions); in turn when none is.
                let caught = wait_until_in_transaction(rig, &names).await;
                event.mid_transaction = caught.is_some();
                caught.unwrap_or_else(|| {
                    *worker_turn += 1;
                    names[*worker_turn % names.len()].clone()
                })
            };
            event.target.clone_from(&name);
            let killed = rig
                .services
                .lock()
                .map_err(|_| anyhow::anyhow!("services lock poisoned"))?
                .kill(&name)?;
            say(format!(
                "fault: SIGKILL {name}{}{}",
                if event.mid_transaction {
                    " inside a transaction"
                } else {
                    ""
                },
                if killed { "" } else { " (it was not running)" }
            ));
            tokio::time::sleep(Duration::from_millis(RESTART_DELAY_MS)).await;
            rig.services
                .lock()
                .map_err(|_| anyhow::anyhow!("services lock poisoned"))?
                .start(&name)?;
            Ok(Instant::now())
        }
        FaultKind::Rabbitmq => {
            event.target = "rabbitmq".to_string();
            let mut rabbit = rig.rabbit.lock().await;
            say("fault: stopping RabbitMQ");
            let stopped = rabbit.stop().await;
            say("fault: RabbitMQ stopped");
            tokio::time::sleep(Duration::from_millis(BROKER_DOWN_MS)).await;
            rabbit.start().await?;
            say("fault: RabbitMQ is back");
            stopped?;
            Ok(Instant::now())
        }
        FaultKind::DatabaseOutage => {
            event.target = "postgres+gateway+worker".to_string();
            say("fault: stopping PostgreSQL in immediate mode for an outage");
            let stopped = rig.postgres.stop("immediate").await;
            let outage_ends = Instant::now() + Duration::from_millis(DATABASE_OUTAGE_MS);
            let (gateway, worker) = {
                let services = rig
                    .services
                    .lock()
                    .map_err(|_| anyhow::anyhow!("services lock poisoned"))?;
                (
                    services.names(Role::Gateway).first().cloned(),
                    services.names(Role::Worker).first().cloned(),
                )
            };
            for name in [gateway, worker].into_iter().flatten() {
                tokio::time::sleep(Duration::from_millis(RESTART_DELAY_MS)).await;
                let mut services = rig
                    .services
                    .lock()
                    .map_err(|_| anyhow::anyhow!("services lock poisoned"))?;
                services.kill(&name)?;
                services.start(&name)?;
                say(format!(
                    "fault: SIGKILL {name} and start it while PostgreSQL is down"
                ));
            }
            tokio::time::sleep_until(outage_ends.into()).await;
            rig.postgres.start().await?;
            say("fault: PostgreSQL is back after the outage");
            stopped?;
            Ok(Instant::now())
        }
        FaultKind::RabbitmqKill => {
            event.target = "rabbitmq".to_string();
            let mut rabbit = rig.rabbit.lock().await;
            say("fault: SIGKILL RabbitMQ");
            rabbit.kill_now();
            tokio::time::sleep(Duration::from_millis(BROKER_DOWN_MS)).await;
            rabbit.start().await?;
            say("fault: RabbitMQ is back (after a crash)");
            Ok(Instant::now())
        }
        FaultKind::Postgres => {
            event.target = "postgres".to_string();
            say("fault: stopping PostgreSQL in immediate mode");
            let stopped = rig.postgres.stop("immediate").await;
            tokio::time::sleep(Duration::from_millis(DATABASE_DOWN_MS)).await;
            rig.postgres.start().await?;
            say("fault: PostgreSQL is back (after crash recovery)");
            stopped?;
            Ok(Instant::now())
        }
    }
}

/// Polls pg_stat_activity until one of the services has a transaction open (a batch being
/// applied, a fold in progress) and returns its name; None when none was caught within the wait.
async fn wait_until_in_transaction(rig: &Rig, application_names: &[String]) -> Option<String> {
    let deadline = Instant::now() + Duration::from_millis(MID_TRANSACTION_WAIT_MS);
    while Instant::now() < deadline {
        let open: Result<Option<String>, _> = sqlx::query_scalar(
            "SELECT application_name FROM pg_stat_activity
             WHERE application_name = ANY($1) AND xact_start IS NOT NULL AND state <> 'idle'
             LIMIT 1",
        )
        .bind(application_names)
        .fetch_optional(&rig.monitor)
        .await;
        match open {
            Ok(Some(name)) => return Some(name),
            Ok(None) => tokio::task::yield_now().await,
            Err(_) => tokio::time::sleep(Duration::from_millis(HEALTH_PROBE_INTERVAL_MS)).await,
        }
    }
    None
}

/// Waits until the gateway is healthy and a top-up of the canary player is applied end to end;
/// returns when that happened (None when not within the recovery timeout).
async fn recover(rig: &Rig, probe_counter: &AtomicU32) -> (Option<Instant>, Vec<CommandRecord>) {
    let deadline = Instant::now() + Duration::from_secs(RECOVERY_TIMEOUT_S);
    let mut records = Vec::new();
    let mut rng = StdRng::seed_from_u64(u64::from(probe_counter.load(Ordering::Relaxed)));
    while Instant::now() < deadline && !rig.client.healthy().await {
        tokio::time::sleep(Duration::from_millis(HEALTH_PROBE_INTERVAL_MS)).await;
    }
    let key = format!(
        "probe-{}",
        probe_counter.fetch_add(1, Ordering::Relaxed) + 1
    );
    let Ok(canary) = rig.canary() else {
        return (None, records);
    };
    while Instant::now() < deadline {
        let record = rig
            .client
            .command(
                Some(canary),
                &Intent::TopUp { amount: 1 },
                key.clone(),
                &mut rng,
            )
            .await;
        let served = matches!(record.result, Some((200, _)));
        records.push(record);
        if served {
            return (Some(Instant::now()), records);
        }
    }
    (None, records)
}
