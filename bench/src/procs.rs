//! Child processes of `compare` and `worker-only`: the release binaries of the system and the
//! baseline server, each with its log file, stopped with SIGTERM (then SIGKILL) at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// How long a child may take to stop after SIGTERM before it is killed.
pub const STOP_WAIT_MS: u64 = 15_000;
/// How long a spawned server may take to answer its health check.
pub const HEALTH_WAIT_MS: u64 = 60_000;
/// Pause between health checks.
const HEALTH_POLL_MS: u64 = 100;

struct Running {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The children of one run. Dropping it kills whatever is still running.
pub struct Children {
    running: Vec<Running>,
    log_dir: PathBuf,
}

impl Children {
    pub fn new(log_dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        Ok(Self {
            running: Vec::new(),
            log_dir,
        })
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Starts `program args` with `envs` added to the environment, output to `<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, String)],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            program.is_file(),
            "{} does not exist: build it first (cargo build --release --workspace)",
            program.display()
        );
        let log = self.log_dir.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .envs(envs.iter().map(|(key, value)| (*key, value.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        tracing::info!(name, pid = child.id(), log = %log.display(), "started");
        self.running.push(Running {
            name: name.to_string(),
            child,
            log,
        });
        Ok(())
    }

    /// Fails naming the first child that exited, with the end of its log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for running in &mut self.running {
            if let Some(status) = running.child.try_wait()? {
                let log = std::fs::read_to_string(&running.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                anyhow::bail!(
                    "{} exited ({status}); last lines of {}:\n{}",
                    running.name,
                    running.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }

    /// Waits until `url` answers 200, failing early when a child exits.
    pub async fn wait_healthy(
        &mut self,
        client: &reqwest::Client,
        url: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(HEALTH_WAIT_MS);
        while Instant::now() < deadline {
            self.check_alive()?;
            if let Ok(response) = client.get(url).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(HEALTH_POLL_MS)).await;
        }
        anyhow::bail!("{url} did not answer 200 within {HEALTH_WAIT_MS} ms")
    }

    /// SIGTERM to every child, then waits; SIGKILL for any still running after the wait.
    pub async fn stop_all(&mut self) {
        for running in &self.running {
            if let Some(pid) = running.child.id() {
                // `kill` the command: the crate forbids unsafe code, so no libc::kill here.
                let sent = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                if let Err(error) = sent {
                    tracing::warn!(%error, name = running.name, "could not send SIGTERM");
                }
            }
        }
        for running in &mut self.running {
            let waited =
                tokio::time::timeout(Duration::from_millis(STOP_WAIT_MS), running.child.wait())
                    .await;
            if waited.is_err() {
                tracing::warn!(
                    name = running.name,
                    "did not stop after SIGTERM; killing it"
                );
                drop(running.child.kill().await);
            }
        }
        self.running.clear();
    }
}

/// Where the system's binaries are: next to this executable unless told otherwise.
pub fn bin_dir(chosen: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = chosen {
        return Ok(dir.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("the bench executable has no folder"))?
        .to_path_buf();
    if dir.ends_with("debug") {
        tracing::warn!(
            "running the debug build: the system's debug binaries are far slower; use target/release/bench"
        );
    }
    Ok(dir)
}

/// A free port on the loopback interface (bound then released, so a race is possible but rare).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
