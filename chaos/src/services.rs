//! The service processes (gateway, workers, treasury) as child processes: started with their own
//! environment and log file, killed with SIGKILL on purpose by the fault schedule, and restarted
//! by a supervisor when they exit on their own (which is recorded: a service should not).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::util::{elapsed_ms, say, signal_quietly, write_pgid};

/// How often the supervisor looks for services that exited on their own.
const SUPERVISE_INTERVAL_MS: u64 = 250;
/// How long a service gets to stop after SIGTERM at teardown before it is killed.
const TERMINATE_GRACE_MS: u64 = 10_000;
/// Pause between polls of a stopping process.
const STOP_POLL_MS: u64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Worker,
    Treasury,
}

/// What one service is and how it is started.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Unique name: `gateway`, `worker-1`, `treasury`; also its PostgreSQL application_name.
    pub name: String,
    pub role: Role,
    pub program: PathBuf,
    pub env: Vec<(String, String)>,
}

struct Service {
    spec: ServiceSpec,
    child: Option<Child>,
    starts: u32,
}

/// An exit nobody asked for.
#[derive(Debug, Clone)]
pub struct UnexpectedExit {
    pub service: String,
    pub at_ms: u64,
    pub status: String,
}

pub struct Services {
    logs_dir: PathBuf,
    pids_dir: PathBuf,
    services: Vec<Service>,
    pub unexpected_exits: Vec<UnexpectedExit>,
    /// While false, the supervisor leaves exited services alone (teardown).
    pub supervising: bool,
}

pub type SharedServices = Arc<Mutex<Services>>;

impl Services {
    pub fn new(logs_dir: &Path, pids_dir: &Path, specs: Vec<ServiceSpec>) -> Self {
        Self {
            logs_dir: logs_dir.to_path_buf(),
            pids_dir: pids_dir.to_path_buf(),
            services: specs
                .into_iter()
                .map(|spec| Service {
                    spec,
                    child: None,
                    starts: 0,
                })
                .collect(),
            unexpected_exits: Vec::new(),
            supervising: true,
        }
    }

    pub fn names(&self, role: Role) -> Vec<String> {
        self.services
            .iter()
            .filter(|service| service.spec.role == role)
            .map(|service| service.spec.name.clone())
            .collect()
    }

    fn find(&mut self, name: &str) -> anyhow::Result<&mut Service> {
        self.services
            .iter_mut()
            .find(|service| service.spec.name == name)
            .with_context(|| format!("no service named {name}"))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs_dir.join(format!("{name}.log"))
    }

    /// Starts a service (again). Its output is appended to its log, after a marker line.
    pub fn start(&mut self, name: &str) -> anyhow::Result<()> {
        let log_path = self.log_path(name);
        let pids_dir = self.pids_dir.clone();
        let service = self.find(name)?;
        if service.child.is_some() {
            return Ok(());
        }
        service.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        {
            use std::io::Write;
            writeln!(
                log,
                "===== chaos: start #{} of {} at {} ms =====",
                service.starts,
                service.spec.name,
                elapsed_ms()
            )?;
        }
        let child = std::process::Command::new(&service.spec.program)
            .env_clear()
            .envs(passthrough_environment())
            .envs(service.spec.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: a terminal's Ctrl-C reaches the harness only, which then stops
            // the services in order; the watchdog can end the group if the harness dies.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", service.spec.program.display()))?;
        write_pgid(&pids_dir, &service.spec.name, child.id());
        service.child = Some(child);
        Ok(())
    }

    /// SIGKILL, then reap. False when the service was not running.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<bool> {
        let service = self.find(name)?;
        let Some(mut child) = service.child.take() else {
            return Ok(false);
        };
        child.kill().ok();
        child.wait().ok();
        Ok(true)
    }

    pub fn is_running(&mut self, name: &str) -> bool {
        self.find(name)
            .map(|service| service.child.is_some())
            .unwrap_or(false)
    }

    /// Reaps services that exited on their own and starts them again.
    fn supervise(&mut self) {
        if !self.supervising {
            return;
        }
        let mut exited = Vec::new();
        for service in &mut self.services {
            if let Some(child) = service.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                service.child = None;
                exited.push((service.spec.name.clone(), status.to_string()));
            }
        }
        for (name, status) in exited {
            say(format!(
                "UNEXPECTED: {name} exited by itself ({status}); restarting it (log {})",
                self.log_path(&name).display()
            ));
            self.unexpected_exits.push(UnexpectedExit {
                service: name.clone(),
                at_ms: elapsed_ms(),
                status,
            });
            if let Err(error) = self.start(&name) {
                say(format!("could not restart {name}: {error:#}"));
            }
        }
    }

    /// Stops every service: SIGTERM, a grace period, then SIGKILL.
    pub fn terminate_all(&mut self) {
        self.supervising = false;
        for service in &mut self.services {
            if let Some(child) = service.child.as_ref() {
                signal_quietly("TERM", &child.id().to_string());
            }
        }
        let deadline = Instant::now() + Duration::from_millis(TERMINATE_GRACE_MS);
        for service in &mut self.services {
            let Some(mut child) = service.child.take() else {
                continue;
            };
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        say(format!(
                            "{} did not stop within {TERMINATE_GRACE_MS} ms of SIGTERM; killing it",
                            service.spec.name
                        ));
                        child.kill().ok();
                        child.wait().ok();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(STOP_POLL_MS)),
                }
            }
        }
    }

    /// Kills every service at once (teardown on drop).
    pub fn kill_all(&mut self) {
        self.supervising = false;
        for service in &mut self.services {
            if let Some(mut child) = service.child.take() {
                child.kill().ok();
                child.wait().ok();
            }
        }
    }
}

/// The few variables a service inherits from the harness; everything else is set explicitly,
/// so nothing in the caller's environment (a DATABASE_URL, a PARTITIONS) leaks into a run.
fn passthrough_environment() -> Vec<(String, String)> {
    ["PATH", "RUST_BACKTRACE", "RUST_LOG"]
        .iter()
        .filter_map(|key| {
            std::env::var(key)
                .ok()
                .map(|value| (key.to_string(), value))
        })
        .collect()
}

/// Runs the supervisor until `stop`.
pub async fn supervise(services: SharedServices, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(SUPERVISE_INTERVAL_MS)) => {}
        }
        if let Ok(mut services) = services.lock() {
            services.supervise();
        }
    }
}
