//! A per-event trace of a measured window, for looking at what happens around one slow second.
//!
//! The report keeps percentiles and each second's slowest answer; that says a second was slow,
//! not how the slowness spread over the requests around it. With `--trace-dir`, every request of
//! the window (its intended send time, its latency, its status) and every flush of the disk probe
//! (its start, its duration) is kept and written as one CSV file per measurement, so a stall of
//! the disk can be lined up with the requests it held, millisecond by millisecond.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Most rows one trace keeps (about 24 bytes each in memory); rows past it are counted, not kept,
/// so a long closed loop cannot grow the driver without bound.
pub const TRACE_ROWS_MAX: usize = 4_000_000;

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A request: `at` is when it was meant to be sent, `took` its latency from then.
    Request,
    /// A flush of the disk probe: `at` is when it started, `took` how long it took.
    Flush,
}

impl EventKind {
    fn name(self) -> &'static str {
        match self {
            EventKind::Request => "request",
            EventKind::Flush => "flush",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Row {
    kind: EventKind,
    /// Microseconds from the window's start; events that started before it are not kept.
    at_us: u64,
    took_us: u64,
    /// The HTTP status of a request (0 when no answer came); 0 for a flush.
    status: u16,
}

/// The rows of one measurement, in the order they were recorded.
#[derive(Debug)]
pub struct Trace {
    window_start: Instant,
    /// The window's start on the wall clock, to line the trace up with the services' logs.
    window_start_utc: chrono::DateTime<chrono::Utc>,
    rows: Mutex<Vec<Row>>,
    left_out: AtomicU64,
}

impl Trace {
    /// A trace of the window that starts at `window_start`, which is `window_start_utc` on the
    /// wall clock.
    pub fn new(window_start: Instant, window_start_utc: chrono::DateTime<chrono::Utc>) -> Self {
        Self {
            window_start,
            window_start_utc,
            rows: Mutex::new(Vec::new()),
            left_out: AtomicU64::new(0),
        }
    }

    /// Keeps one event that started at `at` (events before the window's start are not kept).
    pub fn record(&self, kind: EventKind, at: Instant, took: Duration, status: u16) {
        let Some(since_start) = at.checked_duration_since(self.window_start) else {
            return;
        };
        let row = Row {
            kind,
            at_us: u64::try_from(since_start.as_micros()).unwrap_or(u64::MAX),
            took_us: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            status,
        };
        let mut rows = self
            .rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if rows.len() < TRACE_ROWS_MAX {
            rows.push(row);
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The wall-clock time that `at_ms` 0 stands for.
    pub fn window_start_utc(&self) -> chrono::DateTime<chrono::Utc> {
        self.window_start_utc
    }

    /// Rows that did not fit under [`TRACE_ROWS_MAX`].
    pub fn left_out(&self) -> u64 {
        self.left_out.load(Ordering::Relaxed)
    }

    /// Writes the rows, sorted by start, as CSV: `kind,at_ms,took_ms,status`.
    pub fn write_csv(&self, path: &Path) -> anyhow::Result<()> {
        // Sorted in place: a trace is written once, after its window, and may hold millions of
        // rows that a copy would double.
        let mut rows = self
            .rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rows.sort_by_key(|row| row.at_us);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        writeln!(out, "kind,at_ms,took_ms,status")?;
        for row in rows.iter() {
            writeln!(
                out,
                "{},{:.3},{:.3},{}",
                row.kind.name(),
                row.at_us as f64 / 1_000.0,
                row.took_us as f64 / 1_000.0,
                row.status
            )?;
        }
        out.flush()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// One row read back from a trace file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub at_ms: f64,
    pub took_ms: f64,
    pub status: u16,
}

/// Reads a file written by [`Trace::write_csv`].
pub fn read_csv(path: &Path) -> anyhow::Result<Vec<Event>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    anyhow::ensure!(
        lines.next().map(|(_, header)| header) == Some("kind,at_ms,took_ms,status"),
        "{} is not a bench trace (its first line is not kind,at_ms,took_ms,status)",
        path.display()
    );
    lines
        .map(|(index, line)| {
            parse_row(line).with_context(|| format!("{} line {}", path.display(), index + 1))
        })
        .collect()
}

fn parse_row(line: &str) -> anyhow::Result<Event> {
    let mut fields = line.split(',');
    let mut next = || fields.next().context("missing field");
    let kind = match next()? {
        "request" => EventKind::Request,
        "flush" => EventKind::Flush,
        other => anyhow::bail!("unknown kind {other:?}"),
    };
    Ok(Event {
        kind,
        at_ms: next()?.parse()?,
        took_ms: next()?.parse()?,
        status: next()?.parse()?,
    })
}

/// A run of slow answers: requests slower than the threshold whose send times lie less than the
/// gap apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    /// Send time of its first and last slow request, from the window's start.
    pub first_ms: f64,
    pub last_ms: f64,
    pub slow_requests: usize,
    pub latency_max_ms: f64,
    /// The slowest probe flush that started from `FLUSH_LEAD_MS` before the episode's first slow
    /// request to its last one (0 when none did).
    pub flush_max_ms: f64,
}

/// How long before an episode a probe flush may start and still count as its cause: a request
/// sent shortly before a stall is held by it too.
pub const FLUSH_LEAD_MS: f64 = 300.0;

/// What a trace says about its slow answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Episodes {
    pub requests: usize,
    pub slow_requests: usize,
    pub episodes: Vec<Episode>,
}

/// Groups the requests slower than `slow_ms` into episodes (`gap_ms` apart at most, by send
/// time) and finds the slowest probe flush around each.
pub fn episodes(events: &[Event], slow_ms: f64, gap_ms: f64) -> Episodes {
    let mut slow: Vec<&Event> = events
        .iter()
        .filter(|event| event.kind == EventKind::Request && event.took_ms > slow_ms)
        .collect();
    slow.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    let mut found: Vec<Episode> = Vec::new();
    for request in &slow {
        match found.last_mut() {
            Some(episode) if request.at_ms - episode.last_ms <= gap_ms => {
                episode.last_ms = request.at_ms;
                episode.slow_requests += 1;
                episode.latency_max_ms = episode.latency_max_ms.max(request.took_ms);
            }
            _ => found.push(Episode {
                first_ms: request.at_ms,
                last_ms: request.at_ms,
                slow_requests: 1,
                latency_max_ms: request.took_ms,
                flush_max_ms: 0.0,
            }),
        }
    }
    // The probe's flushes, 20 a second, picked out once rather than from every request again
    // for each episode.
    let flushes: Vec<&Event> = events
        .iter()
        .filter(|event| event.kind == EventKind::Flush)
        .collect();
    for episode in &mut found {
        episode.flush_max_ms = flushes
            .iter()
            .filter(|flush| {
                flush.at_ms >= episode.first_ms - FLUSH_LEAD_MS && flush.at_ms <= episode.last_ms
            })
            .map(|flush| flush.took_ms)
            .fold(0.0, f64::max);
    }
    Episodes {
        requests: events
            .iter()
            .filter(|event| event.kind == EventKind::Request)
            .count(),
        slow_requests: slow.len(),
        episodes: found,
    }
}

/// The file of one measurement's trace: `<dir>/<label>-<mode>-<window start, UTC>-<tag>.csv`,
/// so a directory of traces sorts by time and each names the run (its JSON's `started_at`).
pub fn trace_path(
    dir: &Path,
    label: &str,
    mode: &str,
    window_start_utc: chrono::DateTime<chrono::Utc>,
    tag: &str,
) -> PathBuf {
    let label: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    dir.join(format!(
        "{label}-{mode}-{}-{tag}.csv",
        window_start_utc.format("%Y%m%dT%H%M%SZ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(at_ms: f64, took_ms: f64) -> Event {
        Event {
            kind: EventKind::Request,
            at_ms,
            took_ms,
            status: 200,
        }
    }

    #[test]
    fn slow_requests_close_together_make_one_episode_with_the_flush_before_it() {
        let flush = Event {
            kind: EventKind::Flush,
            at_ms: 900.0,
            took_ms: 120.0,
            status: 0,
        };
        let events = [
            request(100.0, 10.0),
            flush,
            request(1_000.0, 80.0),
            request(1_150.0, 60.0),
            request(1_200.0, 20.0),
            request(5_000.0, 55.0),
        ];
        let found = episodes(&events, 50.0, 200.0);
        assert_eq!(found.requests, 5);
        assert_eq!(found.slow_requests, 3);
        assert_eq!(
            found.episodes,
            [
                Episode {
                    first_ms: 1_000.0,
                    last_ms: 1_150.0,
                    slow_requests: 2,
                    latency_max_ms: 80.0,
                    flush_max_ms: 120.0,
                },
                Episode {
                    first_ms: 5_000.0,
                    last_ms: 5_000.0,
                    slow_requests: 1,
                    latency_max_ms: 55.0,
                    flush_max_ms: 0.0,
                },
            ]
        );
    }

    #[test]
    fn rows_before_the_window_are_not_kept_and_the_file_is_sorted_by_start() {
        let start = Instant::now();
        let trace = Trace::new(start + Duration::from_millis(10), chrono::Utc::now());
        trace.record(EventKind::Request, start, Duration::from_millis(1), 200);
        trace.record(
            EventKind::Request,
            start + Duration::from_millis(30),
            Duration::from_micros(2_500),
            503,
        );
        trace.record(
            EventKind::Flush,
            start + Duration::from_millis(20),
            Duration::from_millis(90),
            0,
        );
        let dir = std::env::temp_dir().join(format!("bench-trace-{}", uuid::Uuid::new_v4()));
        let started = chrono::DateTime::parse_from_rfc3339("2026-12-07T01:02:03.5Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let path = trace_path(&dir, "system (spawned)", "open", started, "abc");
        trace.write_csv(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let read = read_csv(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "kind,at_ms,took_ms,status\nflush,10.000,90.000,0\nrequest,20.000,2.500,503\n"
        );
        assert!(path.ends_with("system--spawned--open-20261207T010203Z-abc.csv"));
        assert_eq!(
            read,
            [
                Event {
                    kind: EventKind::Flush,
                    at_ms: 10.0,
                    took_ms: 90.0,
                    status: 0
                },
                Event {
                    kind: EventKind::Request,
                    at_ms: 20.0,
                    took_ms: 2.5,
                    status: 503
                },
            ]
        );
        assert_eq!(trace.left_out(), 0);
    }
}
