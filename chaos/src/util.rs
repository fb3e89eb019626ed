//! Small helpers: progress lines, free ports, running external commands with a deadline.

use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Time since the harness started, for progress lines and records.
pub fn elapsed() -> Duration {
    STARTED.get_or_init(Instant::now).elapsed()
}

/// Milliseconds since the harness started.
pub fn elapsed_ms() -> u64 {
    u64::try_from(elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Prints one progress line to stderr, prefixed with the time since start.
pub fn say(message: impl AsRef<str>) {
    let millis = elapsed_ms();
    eprintln!(
        "[chaos {:>5}.{}s] {}",
        millis / 1_000,
        (millis % 1_000) / 100,
        message.as_ref()
    );
}

/// Ports that nothing listens on right now. All are held until every one is chosen, so the
/// ports returned are distinct.
pub fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("binding a free port")?;
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

/// True when this process runs as root (the owner of /proc/self is the effective uid).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|metadata| metadata.uid() == 0)
}

/// Runs a command to completion within `deadline`; Ok(stdout) when it exits 0.
pub async fn run_command(
    mut command: tokio::process::Command,
    deadline: Duration,
) -> anyhow::Result<String> {
    let description = format!("{:?}", command.as_std());
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(deadline, command.output())
        .await
        .with_context(|| format!("{description} took longer than {deadline:?}"))?
        .with_context(|| format!("running {description}"))?;
    if !output.status.success() {
        bail!(
            "{description} exited with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Sends a signal to a process group (negative pid) or a process, ignoring failures: used in
/// teardown, where the target may already be gone.
pub fn signal_quietly(signal: &str, target: &str) {
    drop(
        std::process::Command::new("kill")
            .args([format!("-{signal}"), "--".to_string(), target.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status(),
    );
}

/// Writes the process group id of a child so the watchdog can end it if the harness dies.
pub fn write_pgid(pids_dir: &Path, name: &str, pid: u32) {
    drop(std::fs::write(
        pids_dir.join(format!("{name}.pgid")),
        pid.to_string(),
    ));
}
