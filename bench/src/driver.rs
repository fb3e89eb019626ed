//! The load: closed loop (N clients, each sending as soon as its previous request was answered)
//! and open loop (sends scheduled at fixed intervals; latency counted from the intended send time,
//! so a slow server cannot hide its queueing by slowing the client down: no coordinated omission).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cpu::{CpuSnapshot, CpuUse};
use crate::http1::Http1Client;
use crate::report::{Outcome, Recorder, Report, RunMeta, process_cpu_seconds};
use crate::scenario::{Mode, PlannedRequest, Prepared, ScenarioArgs, Target, new_run_id};
use crate::trace::{EventKind, Trace, trace_path};

/// How often the progress bar is redrawn.
const PROGRESS_TICK_MS: u64 = 250;
/// The open-loop scheduler sleeps at least this long between rounds of sends (tokio's timer has
/// millisecond resolution; sends due meanwhile go out together, each with its own intended time).
const OPEN_LOOP_TICK_US: u64 = 500;

/// The load to apply to one target.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    Closed { clients: usize },
    Open { rate: f64, outstanding_max: usize },
}

impl Load {
    pub fn from_args(args: &ScenarioArgs) -> anyhow::Result<Self> {
        Ok(match args.mode {
            Mode::Closed => Load::Closed {
                clients: usize::try_from(args.clients)?,
            },
            Mode::Open => Load::Open {
                rate: args
                    .rate
                    .ok_or_else(|| anyhow::anyhow!("--mode open needs --rate"))?,
                outstanding_max: usize::try_from(args.outstanding_max)?,
            },
        })
    }
}

struct Sender {
    client: Http1Client,
}

impl Sender {
    /// The outcome, and whether the answer was a replay of an earlier command.
    async fn send(&self, request: PlannedRequest) -> (Outcome, bool) {
        match self
            .client
            .post(
                request.path,
                &request.key,
                request.authorization,
                request.body,
            )
            .await
        {
            Ok((status, replayed)) => (Outcome::Status(status), replayed),
            Err(error) => (Outcome::Transport(error), false),
        }
    }
}

/// Where a measured request's outcome goes: the report's recorder and, with `--trace-dir`, the
/// trace.
struct Sink {
    recorder: Arc<Recorder>,
    trace: Option<Arc<Trace>>,
}

impl Sink {
    /// Records a request of the window, meant to be sent at `sent_at` and answered at
    /// `answered_at`.
    fn record(&self, outcome: Outcome, replayed: bool, sent_at: Instant, answered_at: Instant) {
        let latency = answered_at - sent_at;
        if let Some(trace) = &self.trace {
            trace.record(EventKind::Request, sent_at, latency, outcome.status_code());
        }
        self.recorder
            .record(outcome, replayed, latency, answered_at);
    }
}

/// Runs the load against a prepared target and reports the measured window.
pub async fn measure(
    target: &Target,
    args: &ScenarioArgs,
    prepared: Arc<Prepared>,
    load: Load,
) -> anyhow::Result<Report> {
    args.validate()?;
    // One idle connection kept per client (closed loop) or per request that may be outstanding
    // (open loop), so the measured window opens no connections once warmed up.
    let connections_max = match load {
        Load::Closed { clients } => clients,
        Load::Open {
            outstanding_max, ..
        } => outstanding_max,
    };
    let sender = Arc::new(Sender {
        client: Http1Client::new(
            &target.base_url,
            Duration::from_millis(args.request_timeout_ms),
            connections_max,
        )?,
    });
    let recorder = Arc::new(Recorder::new());
    // Keys and names of this measurement, distinct from any other on the same setup.
    let tag: Arc<str> = Arc::from(new_run_id());
    let warmup = Duration::from_secs_f64(args.warmup_s);
    let duration = Duration::from_secs_f64(args.duration_s);
    let started_at = chrono::Utc::now();
    let cpu_before = process_cpu_seconds();
    let start = Instant::now();
    let window_start = start + warmup;
    let window_end = window_start + duration;
    let progress = progress_bar(args, &target.label, warmup + duration);
    let trace = args
        .trace_dir
        .as_ref()
        .map(|_| Arc::new(Trace::new(window_start, started_at + warmup)));
    let sink = Arc::new(Sink {
        recorder: Arc::clone(&recorder),
        trace: trace.clone(),
    });
    // The machine's CPU by process group over the measured window only (not the warm-up, not
    // the requests still being answered after it).
    let cpu_window = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        let before = CpuSnapshot::take();
        tokio::time::sleep_until(window_end.into()).await;
        before.zip(CpuSnapshot::take())
    });
    let disk_probe = (!args.no_disk_probe).then(|| {
        crate::disk::spawn(
            args.disk_probe_dir.clone(),
            recorder.second_start(window_start),
            window_start,
            window_end,
            trace.clone(),
        )
    });
    let ticker = tokio::spawn(tick_progress(
        progress.clone(),
        Arc::clone(&recorder),
        start,
        window_end,
    ));
    match load {
        Load::Closed { clients } => {
            closed_loop(
                &sender,
                &prepared,
                &sink,
                &tag,
                clients,
                window_start,
                window_end,
            )
            .await;
        }
        Load::Open {
            rate,
            outstanding_max,
        } => {
            open_loop(
                &sender,
                &prepared,
                &sink,
                &tag,
                rate,
                outstanding_max,
                start,
                window_start,
                window_end,
            )
            .await;
        }
    }
    ticker.abort();
    progress.finish_and_clear();
    let wall_s = start.elapsed().as_secs_f64();
    let driver_cpu_cores = match (cpu_before, process_cpu_seconds()) {
        (Some(before), Some(after)) if wall_s > 0.0 => {
            Some(((after - before) / wall_s * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let (clients, offered_rate_per_s, outstanding_max, mode) = match load {
        Load::Closed { clients } => (Some(clients), None, None, "closed"),
        Load::Open {
            rate,
            outstanding_max,
        } => (None, Some(rate), Some(outstanding_max), "open"),
    };
    let meta = RunMeta {
        label: target.label.clone(),
        target: target.base_url.clone(),
        scenario: prepared.scenario.name().to_string(),
        mode: mode.to_string(),
        clients,
        offered_rate_per_s,
        outstanding_max,
        players: prepared.players.len(),
        setup: format!("{:?}", prepared.setup).to_lowercase(),
        setup_s: (prepared.setup_s * 10.0).round() / 10.0,
        warmup_s: args.warmup_s,
        duration_s: args.duration_s,
        started_at,
    };
    let mut report = recorder.finish(meta, window_start, window_end);
    report.driver_cpu_cores = driver_cpu_cores;
    if let Ok(Some((before, after))) = cpu_window.await {
        report.cpu = Some(CpuUse::between(&before, &after, report.commands_per_s));
    }
    if let Some(disk_probe) = disk_probe {
        report.disk = disk_probe.await.ok().flatten();
    }
    if let (Some(trace), Some(dir)) = (trace, args.trace_dir.as_ref()) {
        let path = trace_path(dir, &target.label, mode, trace.window_start_utc(), &tag);
        // The figures do not depend on the trace: a file that cannot be written costs the
        // trace, not the run.
        match trace.write_csv(&path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                window_start = %trace.window_start_utc().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                left_out = trace.left_out(),
                "trace written"
            ),
            Err(error) => tracing::warn!(
                path = %path.display(),
                error = format!("{error:#}"),
                "trace not written; the run goes on without it"
            ),
        }
    }
    Ok(report)
}

async fn closed_loop(
    sender: &Arc<Sender>,
    prepared: &Arc<Prepared>,
    sink: &Arc<Sink>,
    tag: &Arc<str>,
    clients: usize,
    window_start: Instant,
    window_end: Instant,
) {
    let sequence = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let sender = Arc::clone(sender);
        let prepared = Arc::clone(prepared);
        let sink = Arc::clone(sink);
        let sequence = Arc::clone(&sequence);
        let tag = Arc::clone(tag);
        tasks.spawn(async move {
            let mut rng = StdRng::from_rng(&mut rand::rng());
            // Bounded by time: no client starts a request after the window ends.
            loop {
                let sent_at = Instant::now();
                if sent_at >= window_end {
                    break;
                }
                let number = sequence.fetch_add(1, Ordering::Relaxed);
                let request = prepared.next_request(&mut rng, &tag, number);
                let (outcome, replayed) = sender.send(request).await;
                let answered_at = Instant::now();
                if sent_at >= window_start {
                    sink.record(outcome, replayed, sent_at, answered_at);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn open_loop(
    sender: &Arc<Sender>,
    prepared: &Arc<Prepared>,
    sink: &Arc<Sink>,
    tag: &str,
    rate: f64,
    outstanding_max: usize,
    start: Instant,
    window_start: Instant,
    window_end: Instant,
) {
    let outstanding = Arc::new(Semaphore::new(outstanding_max));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = ((window_end - start).as_secs_f64() * rate).floor();
    // Every send has a number; its intended time is start + number × interval.
    let total = if total.is_finite() && total >= 0.0 {
        total as u64
    } else {
        0
    };
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let mut tasks = JoinSet::new();
    let mut next: u64 = 0;
    while next < total {
        let now = Instant::now();
        while next < total {
            let intended = start + interval.mul_f64(next as f64);
            if intended > now {
                break;
            }
            let in_window = intended >= window_start;
            match Arc::clone(&outstanding).try_acquire_owned() {
                Ok(permit) => {
                    let request = prepared.next_request(&mut rng, tag, next);
                    let sender = Arc::clone(sender);
                    let sink = Arc::clone(sink);
                    tasks.spawn(async move {
                        let (outcome, replayed) = sender.send(request).await;
                        let answered_at = Instant::now();
                        if in_window {
                            sink.record(outcome, replayed, intended, answered_at);
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    if in_window {
                        sink.recorder.record_drop();
                    }
                }
            }
            next += 1;
        }
        // Finished tasks are reaped as we go, so the set stays as small as the outstanding limit.
        while tasks.try_join_next().is_some() {}
        let due = start + interval.mul_f64(next as f64);
        let floor = Instant::now() + Duration::from_micros(OPEN_LOOP_TICK_US);
        tokio::time::sleep_until(due.max(floor).into()).await;
    }
    while tasks.join_next().await.is_some() {}
}

fn progress_bar(args: &ScenarioArgs, label: &str, total: Duration) -> ProgressBar {
    if args.no_progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(u64::try_from(total.as_millis()).unwrap_or(u64::MAX));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(format!("{label} {}", args.scenario.name()));
    bar
}

async fn tick_progress(
    bar: ProgressBar,
    recorder: Arc<Recorder>,
    start: Instant,
    window_end: Instant,
) {
    let mut last_done = 0;
    let mut last_at = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(PROGRESS_TICK_MS)).await;
        let now = Instant::now();
        let live = &recorder.live;
        let done = live.done.load(Ordering::Relaxed);
        let rate = (done - last_done) as f64 / (now - last_at).as_secs_f64().max(1e-3);
        last_done = done;
        last_at = now;
        bar.set_position(
            u64::try_from(now.min(window_end).duration_since(start).as_millis()).unwrap_or(0),
        );
        bar.set_message(format!(
            "{rate:>7.0}/s  ok {}  202 {}  errors {}  dropped {}",
            live.ok.load(Ordering::Relaxed),
            live.accepted.load(Ordering::Relaxed),
            live.failed.load(Ordering::Relaxed),
            live.dropped.load(Ordering::Relaxed),
        ));
    }
}
