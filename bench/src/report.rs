//! Recording answers while a load runs (latency histograms, counts per status) and turning them
//! into a report: a table for people and JSON for files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cpu::CpuUse;
use crate::disk::DiskProbe;

/// Largest latency the histograms hold (1 hour, in microseconds); longer ones are clamped.
pub const LATENCY_MAX_US: u64 = 3_600_000_000;
/// Precision of the histograms: three significant digits (0.1 % error).
const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;
/// Most seconds the per-second latency series holds (a day); later answers are not in it.
const SERIES_SECONDS_MAX: usize = 86_400;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP answer with this status.
    Status(u16),
    /// No HTTP answer.
    Transport(TransportError),
}

impl Outcome {
    /// The HTTP status, or 0 when no answer came.
    pub fn status_code(&self) -> u16 {
        match self {
            Outcome::Status(status) => *status,
            Outcome::Transport(_) => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportError {
    Timeout,
    Connect,
    Other,
}

impl Outcome {
    fn key(self) -> String {
        match self {
            Outcome::Status(status) => status.to_string(),
            Outcome::Transport(TransportError::Timeout) => "transport_timeout".to_string(),
            Outcome::Transport(TransportError::Connect) => "transport_connect".to_string(),
            Outcome::Transport(TransportError::Other) => "transport_other".to_string(),
        }
    }

    /// An answer that carries the command's result: applied (2xx but 202) or decided against
    /// (409 conflicts such as `insufficient_funds`, 422 refusals such as `unknown_referral_code`).
    pub fn is_result(self) -> bool {
        matches!(self, Outcome::Status(status) if is_ok(status) || status == 409 || status == 422)
    }
}

fn is_ok(status: u16) -> bool {
    (200..300).contains(&status) && status != 202
}

/// Counters the progress bar reads while the load runs.
#[derive(Default)]
pub struct LiveCounters {
    /// Requests finished, with or without an answer.
    pub done: AtomicU64,
    pub ok: AtomicU64,
    pub accepted: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

struct RecorderInner {
    all: Histogram<u64>,
    ok: Histogram<u64>,
    statuses: BTreeMap<String, u64>,
    replayed: u64,
    last_answer: Option<Instant>,
    /// The slowest latency (µs) of the answers of each second since the recorder was made.
    max_by_second_us: Vec<u64>,
}

/// Shared by every client task of one measurement.
pub struct Recorder {
    inner: Mutex<RecorderInner>,
    pub live: LiveCounters,
    created: Instant,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, HISTOGRAM_SIGNIFICANT_DIGITS)
        .unwrap_or_else(|_| unreachable!("the histogram bounds are valid constants"))
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(RecorderInner {
                all: new_histogram(),
                ok: new_histogram(),
                statuses: BTreeMap::new(),
                replayed: 0,
                last_answer: None,
                max_by_second_us: Vec::new(),
            }),
            live: LiveCounters::default(),
            created: Instant::now(),
        }
    }

    pub fn record(
        &self,
        outcome: Outcome,
        replayed: bool,
        latency: Duration,
        answered_at: Instant,
    ) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(LATENCY_MAX_US)
            .clamp(1, LATENCY_MAX_US);
        self.live.done.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Status(status) if is_ok(status) => &self.live.ok,
            Outcome::Status(202) => &self.live.accepted,
            _ => &self.live.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.all.saturating_record(micros);
        if matches!(outcome, Outcome::Status(status) if is_ok(status)) {
            inner.ok.saturating_record(micros);
        }
        *inner.statuses.entry(outcome.key()).or_insert(0) += 1;
        if replayed {
            inner.replayed += 1;
        }
        if inner.last_answer.is_none_or(|last| last < answered_at) {
            inner.last_answer = Some(answered_at);
        }
        let second = self.second_of(answered_at);
        if second < SERIES_SECONDS_MAX {
            if inner.max_by_second_us.len() <= second {
                inner.max_by_second_us.resize(second + 1, 0);
            }
            let slowest = &mut inner.max_by_second_us[second];
            *slowest = (*slowest).max(micros);
        }
    }

    /// The whole seconds from the recorder's creation to `at`: an index of the per-second series.
    fn second_of(&self, at: Instant) -> usize {
        usize::try_from(at.saturating_duration_since(self.created).as_secs()).unwrap_or(usize::MAX)
    }

    /// When the series' second holding `at` began: another per-second series counted from here
    /// has the same seconds as `latency_max_by_second_ms` (which starts at the window's).
    pub fn second_start(&self, at: Instant) -> Instant {
        self.created + Duration::from_secs(at.saturating_duration_since(self.created).as_secs())
    }

    /// An open-loop send that was not made because too many requests were outstanding.
    pub fn record_drop(&self) {
        self.live.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// The report of everything recorded, for a window that began at `window_start`.
    pub fn finish(&self, meta: RunMeta, window_start: Instant, window_end: Instant) -> Report {
        let inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The window ends when the last request sent in it was answered (or at its planned end
        // when that is later), so requests still in flight at the planned end count fully.
        let end = inner
            .last_answer
            .map_or(window_end, |last| last.max(window_end));
        let elapsed_s = end.saturating_duration_since(window_start).as_secs_f64();
        let mut counts = Counts::default();
        for (key, count) in &inner.statuses {
            match key.parse::<u16>() {
                Ok(status) => {
                    counts.answered += count;
                    if Outcome::Status(status).is_result() {
                        counts.results += count;
                    }
                    if is_ok(status) {
                        counts.ok += count;
                    } else if status == 202 {
                        counts.not_applied_in_time += count;
                    } else if (400..500).contains(&status) {
                        counts.client_errors += count;
                    } else if status >= 500 {
                        counts.server_errors += count;
                    }
                }
                Err(_) => counts.transport_errors += count,
            }
        }
        counts.dropped = self.live.dropped.load(Ordering::Relaxed);
        counts.replayed = inner.replayed;
        counts.sent = counts.answered + counts.transport_errors;
        let per_second = |count: u64| {
            if elapsed_s > 0.0 {
                count as f64 / elapsed_s
            } else {
                0.0
            }
        };
        // The series starts at the window's first whole second, as the recorded requests do.
        let first_second = self.second_of(window_start);
        let latency_max_by_second_ms = inner
            .max_by_second_us
            .iter()
            .skip(first_second)
            .map(|micros| round3(*micros as f64 / 1_000.0))
            .collect();
        Report {
            driver_cpu_cores: None,
            cpu: None,
            disk: None,
            latency_max_by_second_ms,
            commands_per_s: round2(per_second(counts.results)),
            ok_per_s: round2(per_second(counts.ok)),
            answers_per_s: round2(per_second(counts.answered)),
            elapsed_s: round3(elapsed_s),
            latency_ms: LatencySummary::of(&inner.all),
            latency_ok_ms: LatencySummary::of(&inner.ok),
            statuses: inner.statuses.clone(),
            counts,
            meta,
        }
    }
}

/// What was run, to say so next to the figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunMeta {
    pub label: String,
    pub target: String,
    pub scenario: String,
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offered_rate_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outstanding_max: Option<usize>,
    pub players: usize,
    pub setup: String,
    pub setup_s: f64,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub started_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Requests sent in the measured window (answered or failed without an answer).
    pub sent: u64,
    /// Requests that got an HTTP answer.
    pub answered: u64,
    /// Answers carrying the command's result: 2xx but 202, 409 and 422.
    pub results: u64,
    /// 2xx but 202.
    pub ok: u64,
    /// 202: accepted, but not applied within the gateway's reply timeout.
    pub not_applied_in_time: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub transport_errors: u64,
    /// Open loop: sends skipped because the outstanding-request limit was reached.
    pub dropped: u64,
    /// Answers marked `Idempotent-Replayed: true`: the stored result of an earlier command, not a
    /// new one (a healthy run has none: every request carries a fresh key).
    pub replayed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencySummary {
    fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |micros: u64| round3(micros as f64 / 1_000.0);
        Self {
            count: histogram.len(),
            mean: round3(histogram.mean() / 1_000.0),
            p50: ms(histogram.value_at_quantile(0.50)),
            p95: ms(histogram.value_at_quantile(0.95)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        }
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

pub(crate) fn round3(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

/// One measurement's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub meta: RunMeta,
    /// CPU the load driver itself used while the load ran, in cores (1.0: one core busy), since
    /// it shares the machine with what it measures. None where /proc is not available.
    pub driver_cpu_cores: Option<f64>,
    /// The whole machine's CPU during the measured window, by process group, in cores and per
    /// command (`crate::cpu`). None where /proc is not available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuUse>,
    /// The disk's flush latency over the measured window (`crate::disk`). None when the probe
    /// was turned off or could not write its file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskProbe>,
    /// From the start of the window to the last answer of a request sent in it.
    pub elapsed_s: f64,
    /// Results (applied or decided commands) per second.
    pub commands_per_s: f64,
    pub ok_per_s: f64,
    pub answers_per_s: f64,
    pub counts: Counts,
    /// Every request, whatever its status, including failures without an answer (measured to
    /// the failure). Open loop: from the intended send time.
    pub latency_ms: LatencySummary,
    /// Only 2xx answers but 202.
    pub latency_ok_ms: LatencySummary,
    /// The slowest answer of each second of the window (by answer time; 0 for a second without
    /// answers), to tell a steady tail from a few stalls.
    pub latency_max_by_second_ms: Vec<f64>,
    /// Answers per status code, and failures without an answer (`transport_*`).
    pub statuses: BTreeMap<String, u64>,
}

/// Renders reports side by side: one column per report, one row per figure.
pub fn render_table(columns: &[&Report]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, value: &dyn Fn(&Report) -> String| {
        rows.push((name.to_string(), columns.iter().map(|r| value(r)).collect()));
    };
    row("target", &|r| r.meta.label.clone());
    row("scenario", &|r| r.meta.scenario.clone());
    row(
        "load",
        &|r| match (r.meta.clients, r.meta.offered_rate_per_s) {
            (Some(clients), _) => format!("closed, {clients} clients"),
            (None, Some(rate)) => format!("open, {rate:.0}/s offered"),
            _ => r.meta.mode.clone(),
        },
    );
    row("players / setup", &|r| {
        format!(
            "{} / {} ({:.1} s)",
            r.meta.players, r.meta.setup, r.meta.setup_s
        )
    });
    row("measured window (s)", &|r| format!("{:.2}", r.elapsed_s));
    row("commands/s (results)", &|r| {
        format!("{:.1}", r.commands_per_s)
    });
    row("ok/s (2xx but 202)", &|r| format!("{:.1}", r.ok_per_s));
    row("sent", &|r| r.counts.sent.to_string());
    row("ok", &|r| r.counts.ok.to_string());
    row("202 not applied in time", &|r| {
        r.counts.not_applied_in_time.to_string()
    });
    row("4xx", &|r| r.counts.client_errors.to_string());
    row("5xx", &|r| r.counts.server_errors.to_string());
    row("no answer (transport)", &|r| {
        r.counts.transport_errors.to_string()
    });
    row("dropped (open loop)", &|r| r.counts.dropped.to_string());
    row("replays (not new)", &|r| r.counts.replayed.to_string());
    row("load driver CPU (cores)", &|r| {
        r.driver_cpu_cores
            .map_or_else(|| "n/a".to_string(), |cores| format!("{cores:.2}"))
    });
    row("machine CPU (cores)", &|r| {
        r.cpu.as_ref().map_or_else(
            || "n/a".to_string(),
            |cpu| format!("{:.2}", cpu.machine_cores),
        )
    });
    row("CPU us/command (by process)", &|r| {
        r.cpu
            .as_ref()
            .map_or_else(|| "n/a".to_string(), CpuUse::describe_micros)
    });
    row("disk flush max ms (probe)", &|r| {
        r.disk
            .as_ref()
            .map_or_else(|| "n/a".to_string(), DiskProbe::describe)
    });
    row("latency p50 ms", &|r| format!("{:.2}", r.latency_ms.p50));
    row("latency p95 ms", &|r| format!("{:.2}", r.latency_ms.p95));
    row("latency p99 ms", &|r| format!("{:.2}", r.latency_ms.p99));
    row("latency max ms", &|r| format!("{:.2}", r.latency_ms.max));
    row("ok-only p99 ms", &|r| format!("{:.2}", r.latency_ok_ms.p99));
    row("by status", &|r| {
        r.statuses
            .iter()
            .map(|(status, count)| format!("{status}:{count}"))
            .collect::<Vec<_>>()
            .join(" ")
    });
    let name_width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns.len())
        .map(|column| {
            rows.iter()
                .map(|(_, values)| values[column].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let rule: String = std::iter::once(name_width + 2)
        .chain(widths.iter().map(|width| width + 2))
        .map(|width| "-".repeat(width))
        .collect::<Vec<_>>()
        .join("+");
    for (index, (name, values)) in rows.iter().enumerate() {
        let _ = write!(out, " {name:<name_width$} ");
        for (value, width) in values.iter().zip(&widths) {
            let _ = write!(out, "| {value:>width$} ");
        }
        out.push('\n');
        if index == 0 {
            out.push_str(&rule);
            out.push('\n');
        }
    }
    out
}

/// CPU time (user + system) this process has used so far, from /proc/self/stat.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    crate::cpu::parse_process_stat(&stat).map(|(_, seconds)| seconds)
}

/// The machine the figures were taken on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    /// Milliseconds one core takes for a fixed integer workload (best of three), taken when the
    /// report is made: machines of the same name differ from day to day,
    /// and one machine drifts within a day, so this tells a slower machine from a slower build.
    pub cpu_reference_ms: f64,
    /// When the kernel starts writing dirty page cache back on its own. None where /proc/sys/vm
    /// cannot be read.
    pub writeback: Option<Writeback>,
}

/// Above this much dirty page cache before background writeback starts, a run is warned that
/// the disk's flushes will stall (BENCHMARKS.md, profile item 51).
pub const WRITEBACK_THRESHOLD_WARN_MIB: f64 = 64.0;

/// The kernel's background writeback settings. PostgreSQL leaves the pages of its growing
/// tables dirty in the page cache, about 5 MB/s at 4,000 purchases/s; with the defaults of a
/// machine with much memory they build up for 30 s and are then written back in one burst of
/// around 100 MB, which holds up every `fdatasync` of PostgreSQL's and RabbitMQ's logs for
/// 50-250 ms (BENCHMARKS.md, profile item 51; `scripts/tune-host.sh`).
#[derive(Debug, Clone, Serialize)]
pub struct Writeback {
    /// `vm.dirty_background_bytes`; 0 when the ratio applies instead.
    pub dirty_background_bytes: u64,
    /// `vm.dirty_background_ratio`, in percent of the memory that can hold dirty pages.
    pub dirty_background_ratio: u64,
    /// `vm.dirty_expire_centisecs`: how old a dirty page gets before it is written back anyway.
    pub dirty_expire_centisecs: u64,
    /// The threshold in MiB: the bytes, or the ratio of all memory (an upper bound, since the
    /// kernel takes the ratio of the memory that is free or holds page cache).
    pub threshold_mib: f64,
}

impl Writeback {
    fn read(memory_kib: f64) -> Option<Self> {
        let read = |name: &str| -> Option<u64> {
            std::fs::read_to_string(format!("/proc/sys/vm/{name}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let dirty_background_bytes = read("dirty_background_bytes")?;
        let dirty_background_ratio = read("dirty_background_ratio")?;
        let dirty_expire_centisecs = read("dirty_expire_centisecs")?;
        Some(Self::new(
            dirty_background_bytes,
            dirty_background_ratio,
            dirty_expire_centisecs,
            memory_kib,
        ))
    }

    fn new(
        dirty_background_bytes: u64,
        dirty_background_ratio: u64,
        dirty_expire_centisecs: u64,
        memory_kib: f64,
    ) -> Self {
        let threshold_mib = if dirty_background_bytes > 0 {
            dirty_background_bytes as f64 / 1_048_576.0
        } else {
            memory_kib / 1_024.0 * dirty_background_ratio as f64 / 100.0
        };
        Self {
            dirty_background_bytes,
            dirty_background_ratio,
            dirty_expire_centisecs,
            threshold_mib: round2(threshold_mib),
        }
    }

    /// A warning for a run on a machine whose writeback starts late, None otherwise.
    pub fn warning(&self) -> Option<String> {
        (self.threshold_mib > WRITEBACK_THRESHOLD_WARN_MIB).then(|| {
            format!(
                "warning: the kernel lets up to {:.0} MiB of dirty page cache build up before it \
                 writes it back, so its bursts of writeback will stall the disk's flushes and set \
                 the latency tail (BENCHMARKS.md, profile item 51); scripts/tune-host.sh lowers \
                 the threshold to 4 MiB",
                self.threshold_mib
            )
        })
    }

    /// One phrase for the machine line.
    pub fn describe(&self) -> String {
        format!("writeback from {:.0} MiB dirty", self.threshold_mib)
    }
}

/// Rounds of the reference workload: 99 ms on the sixth session's Intel Xeon (2026-12-01).
const CPU_REFERENCE_ROUNDS: u64 = 100_000_000;

/// The best of three timings of a fixed, single-threaded integer workload (FNV-1a steps over a
/// counter), in milliseconds.
fn cpu_reference_ms() -> f64 {
    (0..3)
        .map(|_| {
            let started = Instant::now();
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for round in 0..std::hint::black_box(CPU_REFERENCE_ROUNDS) {
                hash = (hash ^ round).wrapping_mul(0x0000_0100_0000_01b3);
            }
            std::hint::black_box(hash);
            started.elapsed().as_secs_f64() * 1_000.0
        })
        .fold(f64::INFINITY, f64::min)
}

pub fn machine() -> Machine {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
        .unwrap_or_default();
    let memory_kib: f64 = read("/proc/meminfo")
        .lines()
        .find(|line| line.starts_with("MemTotal:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0.0);
    Machine {
        hostname: read("/etc/hostname").trim().to_string(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model,
        memory_gib: round2(memory_kib / 1_048_576.0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpu_reference_ms: round2(cpu_reference_ms()),
        writeback: Writeback::read(memory_kib),
    }
}

/// Prints the machine's writeback warning, if it has one, on standard error.
pub fn warn_about_writeback(machine: &Machine) {
    if let Some(warning) = machine.writeback.as_ref().and_then(Writeback::warning) {
        eprintln!("{warning}");
    }
}

/// `bench-results/<name>-<UTC timestamp>.json` unless the caller chose a path.
pub fn json_path(chosen: Option<&Path>, name: &str) -> PathBuf {
    chosen.map_or_else(
        || {
            PathBuf::from("bench-results").join(format!(
                "{name}-{}.json",
                chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
            ))
        },
        Path::to_path_buf,
    )
}

/// Writes `value` as pretty JSON, creating the folder when needed.
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> RunMeta {
        RunMeta {
            label: "t".into(),
            target: "http://x".into(),
            scenario: "purchase-hot".into(),
            mode: "closed".into(),
            clients: Some(2),
            offered_rate_per_s: None,
            outstanding_max: None,
            players: 1,
            setup: "http".into(),
            setup_s: 0.0,
            warmup_s: 0.0,
            duration_s: 1.0,
            started_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn cpu_time_is_read_from_proc() {
        let seconds = process_cpu_seconds().expect("/proc/self/stat");
        assert!(seconds >= 0.0);
    }

    #[test]
    fn counts_and_percentiles() {
        let recorder = Recorder::new();
        let start = Instant::now();
        for millis in 1..=100u64 {
            recorder.record(
                Outcome::Status(200),
                millis == 1,
                Duration::from_millis(millis),
                start + Duration::from_millis(millis),
            );
        }
        recorder.record(Outcome::Status(202), false, Duration::from_secs(5), start);
        recorder.record(Outcome::Status(409), false, Duration::from_millis(1), start);
        recorder.record(Outcome::Status(503), false, Duration::from_millis(1), start);
        recorder.record(
            Outcome::Transport(TransportError::Timeout),
            false,
            Duration::from_secs(30),
            start,
        );
        recorder.record_drop();
        let report = recorder.finish(meta(), start, start + Duration::from_secs(1));
        assert_eq!(report.counts.ok, 100);
        assert_eq!(report.counts.results, 101);
        assert_eq!(report.counts.not_applied_in_time, 1);
        assert_eq!(report.counts.client_errors, 1);
        assert_eq!(report.counts.server_errors, 1);
        assert_eq!(report.counts.transport_errors, 1);
        assert_eq!(report.counts.answered, 103);
        assert_eq!(report.counts.sent, 104);
        assert_eq!(report.counts.dropped, 1);
        assert_eq!(report.counts.replayed, 1);
        assert!((report.latency_ok_ms.p50 - 50.0).abs() < 0.1);
        assert!((report.latency_ok_ms.max - 100.0).abs() < 0.1);
        assert!((report.commands_per_s - 101.0).abs() < 0.01);
        let table = render_table(&[&report, &report]);
        assert!(table.contains("commands/s"));
        assert!(table.contains("transport_timeout:1"));
    }

    #[test]
    fn writeback_is_warned_about_when_it_starts_late() {
        // The kernel's defaults on a 23.5 GiB machine: 10 % of memory.
        let defaults = Writeback::new(0, 10, 3_000, 24_641_536.0);
        assert!((defaults.threshold_mib - 2_406.4).abs() < 0.01);
        assert!(defaults.warning().is_some());
        // What scripts/tune-host.sh sets: 4 MiB, whatever the ratio says.
        let tuned = Writeback::new(4_194_304, 10, 3_000, 24_641_536.0);
        assert!((tuned.threshold_mib - 4.0).abs() < f64::EPSILON);
        assert_eq!(tuned.warning(), None);
        assert_eq!(tuned.describe(), "writeback from 4 MiB dirty");
    }

    #[test]
    fn the_machine_carries_a_cpu_reference_time() {
        let machine = machine();
        assert!(machine.cpu_reference_ms.is_finite());
        assert!(machine.cpu_reference_ms > 0.0);
    }
}
