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
    pub fn new(window_start: Instant) -> Self {
        let now = Instant::now();
        let window_start_utc = if window_start >= now {
            chrono::Utc::now() + (window_start - now)
        } else {
            chrono::Utc::now() - (now - window_start)
        };
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
        let mut rows = self
            .rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        rows.sort_by_key(|row| row.at_us);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        writeln!(out, "kind,at_ms,took_ms,status")?;
        for row in &rows {
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

/// The file of one measurement's trace: `<dir>/<label>-<mode>-<tag>.csv`.
pub fn trace_path(dir: &Path, label: &str, mode: &str, tag: &str) -> PathBuf {
    let label: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    dir.join(format!("{label}-{mode}-{tag}.csv"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_before_the_window_are_not_kept_and_the_file_is_sorted_by_start() {
        let start = Instant::now();
        let trace = Trace::new(start + Duration::from_millis(10));
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
        let path = trace_path(&dir, "system (spawned)", "open", "abc");
        trace.write_csv(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "kind,at_ms,took_ms,status\nflush,10.000,90.000,0\nrequest,20.000,2.500,503\n"
        );
        assert!(path.ends_with("system--spawned--open-abc.csv"));
        assert_eq!(trace.left_out(), 0);
    }
}
