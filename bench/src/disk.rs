//! A probe of the disk's flush latency during a measured window.
//!
//! PostgreSQL's commits and RabbitMQ's publisher confirms both wait for an `fdatasync`, so a
//! disk that stalls its flushes for a few hundred milliseconds stalls every command in flight,
//! and the open loop's p99 shows it. The probe writes a few kilobytes and flushes them at a fixed
//! interval, and keeps each second's slowest flush, so a run's slow seconds can be matched with
//! the disk's (BENCHMARKS.md, profile item 35). Put its directory on the disk the databases use.
//!
//! It adds one flush per interval to the machine's own (20 a second against several hundred
//! from the system under load), and nothing else.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::report::round3;
use crate::trace::{EventKind, Trace};

/// Time between two probe flushes. A stall longer than this is always caught.
pub const PROBE_INTERVAL_MS: u64 = 50;
/// A flush slower than this counts as a stall of the disk.
pub const STALL_MS: f64 = 100.0;
/// Bytes written before each flush: one page.
const PROBE_BYTES: usize = 4_096;
/// The probe rewrites this many pages in turn, so its file never grows past 256 KiB.
const PROBE_PAGES: u64 = 64;

/// What the probe saw over the window.
#[derive(Debug, Clone, Serialize)]
pub struct DiskProbe {
    /// The directory whose file system was probed.
    pub dir: String,
    pub interval_ms: u64,
    pub flushes: u64,
    /// The slowest flush of the window.
    pub fsync_max_ms: f64,
    /// Seconds of the window with a flush slower than [`STALL_MS`].
    pub stall_seconds: usize,
    /// The slowest flush of each second the window touches (0 for a second without one), the
    /// same seconds as the report's `latency_max_by_second_ms`.
    pub fsync_max_by_second_ms: Vec<f64>,
}

impl DiskProbe {
    /// One line for the results table.
    pub fn describe(&self) -> String {
        format!(
            "{:.1} ({} s over {STALL_MS:.0} ms)",
            self.fsync_max_ms, self.stall_seconds
        )
    }
}

/// Probes from `window_start` to `window_end` on a blocking thread, counting seconds from
/// `series_start` (the start of the latency series' first second, so both series have the same
/// seconds); None (with a warning) when the directory cannot be written, since the load's
/// figures do not depend on it.
pub fn spawn(
    dir: PathBuf,
    series_start: Instant,
    window_start: Instant,
    window_end: Instant,
    trace: Option<Arc<Trace>>,
) -> tokio::task::JoinHandle<Option<DiskProbe>> {
    tokio::task::spawn_blocking(move || {
        match probe(
            &dir,
            series_start,
            window_start,
            window_end,
            trace.as_deref(),
        ) {
            Ok(report) => Some(report),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), error = format!("{error:#}"), "disk probe failed; the run goes on without it");
                None
            }
        }
    })
}

fn probe(
    dir: &Path,
    series_start: Instant,
    window_start: Instant,
    window_end: Instant,
    trace: Option<&Trace>,
) -> anyhow::Result<DiskProbe> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!(".disk-probe-{}", uuid::Uuid::new_v4().simple()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let result = probe_file(&file, series_start, window_start, window_end, trace);
    drop(file);
    let _ = std::fs::remove_file(&path);
    let (flushes, by_second_ms) = result.with_context(|| format!("flushing {}", path.display()))?;
    let fsync_max_ms = by_second_ms.iter().copied().fold(0.0, f64::max);
    Ok(DiskProbe {
        dir: dir.display().to_string(),
        interval_ms: PROBE_INTERVAL_MS,
        flushes,
        fsync_max_ms,
        stall_seconds: by_second_ms.iter().filter(|ms| **ms > STALL_MS).count(),
        fsync_max_by_second_ms: by_second_ms,
    })
}

/// Flushes once per interval through the window; returns the number of flushes and each
/// second's slowest (seconds counted from `series_start`), in milliseconds.
fn probe_file(
    file: &File,
    series_start: Instant,
    window_start: Instant,
    window_end: Instant,
    trace: Option<&Trace>,
) -> std::io::Result<(u64, Vec<f64>)> {
    let second_of =
        |at: Instant| usize::try_from(at.saturating_duration_since(series_start).as_secs());
    // Every second the window touches, the last one included.
    let mut by_second_ms = vec![0.0_f64; second_of(window_end).map_or(0, |last| last + 1)];
    let page = [0x5a_u8; PROBE_BYTES];
    let interval = Duration::from_millis(PROBE_INTERVAL_MS);
    let mut next = window_start;
    let mut flushes: u64 = 0;
    // Bounded by time: no flush starts after the window ends.
    loop {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        let started = Instant::now();
        if started >= window_end {
            break;
        }
        let offset = (flushes % PROBE_PAGES) * PROBE_BYTES as u64;
        file.write_all_at(&page, offset)?;
        file.sync_data()?;
        let took = started.elapsed();
        if let Some(trace) = trace {
            trace.record(EventKind::Flush, started, took, 0);
        }
        let took_ms = took.as_secs_f64() * 1_000.0;
        if let Some(slowest) = second_of(started)
            .ok()
            .and_then(|second| by_second_ms.get_mut(second))
        {
            *slowest = round3(slowest.max(took_ms));
        }
        flushes += 1;
        // A stall longer than the interval skips the flushes it covered instead of bunching
        // them up afterwards.
        next += interval;
        let now = Instant::now();
        if next < now {
            next = now;
        }
    }
    Ok((flushes, by_second_ms))
}
