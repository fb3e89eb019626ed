//! The private PostgreSQL cluster and RabbitMQ node of one run, in a run directory of their own,
//! so both can be restarted without touching the machine's shared instances. A watchdog process
//! tears everything down if the harness itself dies without doing so.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::util::{run_command, say, signal_quietly, write_pgid};

/// Longest a private PostgreSQL start or stop may take (crash recovery included).
const POSTGRES_START_TIMEOUT_S: u64 = 120;
const POSTGRES_STOP_TIMEOUT_S: u64 = 60;
/// Longest the private RabbitMQ node may take to start, and to stop.
const RABBIT_START_TIMEOUT_S: u64 = 120;
const RABBIT_STOP_TIMEOUT_S: u64 = 60;
/// Longest one rabbitmqctl call may take.
const RABBITMQCTL_TIMEOUT_S: u64 = 60;
/// Pause between two probes of a node that is starting, and how long one probe may take.
const RABBIT_PROBE_INTERVAL_MS: u64 = 250;
const RABBIT_PROBE_TIMEOUT_MS: u64 = 2_000;
/// Pause between two looks at a stopping node.
const RABBIT_STOP_POLL_MS: u64 = 50;
/// How often the watchdog checks that the harness is still alive.
const WATCHDOG_INTERVAL_S: u64 = 1;

/// The operating-system user PostgreSQL runs as when the harness runs as root.
const POSTGRES_OS_USER: &str = "postgres";

/// A private PostgreSQL cluster: initdb into the run directory, started and stopped with
/// pg_ctl (as the `postgres` OS user when the harness is root, since PostgreSQL refuses root).
pub struct Postgres {
    bin_dir: PathBuf,
    dir: PathBuf,
    pub port: u16,
    as_postgres_user: bool,
}

impl Postgres {
    /// Creates the cluster (initdb, trust authentication, user `postgres`).
    pub async fn create(
        run_dir: &Path,
        bin_dir: PathBuf,
        port: u16,
        as_root: bool,
    ) -> anyhow::Result<Self> {
        let dir = run_dir.join("postgres");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if as_root {
            let mut chown = tokio::process::Command::new("chown");
            chown.arg(format!("{POSTGRES_OS_USER}:")).arg(&dir);
            run_command(chown, Duration::from_secs(10))
                .await
                .context("handing the PostgreSQL directory to the postgres user")?;
        }
        let postgres = Self {
            bin_dir,
            dir,
            port,
            as_postgres_user: as_root,
        };
        let mut initdb = postgres.command("initdb");
        initdb.arg("-D").arg(postgres.data_dir()).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_command(initdb, Duration::from_secs(POSTGRES_START_TIMEOUT_S))
            .await
            .context("initdb of the private PostgreSQL cluster")?;
        Ok(postgres)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let program = self.bin_dir.join(program);
        if self.as_postgres_user {
            let mut command = tokio::process::Command::new("runuser");
            command.args(["-u", POSTGRES_OS_USER, "--"]).arg(program);
            command
        } else {
            tokio::process::Command::new(program)
        }
    }

    /// The pg_ctl command line that stops the cluster at once, for the watchdog.
    fn immediate_stop_argv(&self) -> Vec<String> {
        let mut argv = Vec::new();
        if self.as_postgres_user {
            argv.extend(["runuser", "-u", POSTGRES_OS_USER, "--"].map(String::from));
        }
        argv.push(self.bin_dir.join("pg_ctl").display().to_string());
        argv.extend(["-D".to_string(), self.data_dir().display().to_string()]);
        argv.extend(["-m", "immediate", "stop"].map(String::from));
        argv
    }

    pub async fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_path())
            .args([
                "-w",
                "-t",
                &POSTGRES_START_TIMEOUT_S.to_string(),
                "-o",
                &options,
                "start",
            ]);
        run_command(pg_ctl, Duration::from_secs(POSTGRES_START_TIMEOUT_S + 10))
            .await
            .context("starting the private PostgreSQL")?;
        Ok(())
    }

    /// Stops the cluster: `immediate` is a crash (no checkpoint, recovery on the next start),
    /// `fast` a clean shutdown.
    pub async fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl.arg("-D").arg(self.data_dir()).args([
            "-m",
            mode,
            "-w",
            "-t",
            &POSTGRES_STOP_TIMEOUT_S.to_string(),
            "stop",
        ]);
        run_command(pg_ctl, Duration::from_secs(POSTGRES_STOP_TIMEOUT_S + 10))
            .await
            .with_context(|| format!("stopping the private PostgreSQL ({mode})"))?;
        Ok(())
    }

    /// Stops the cluster from a synchronous context (teardown on drop); failures are ignored.
    pub fn stop_now(&self) {
        let argv = self.immediate_stop_argv();
        drop(
            std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status(),
        );
    }

    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }
}

/// A private RabbitMQ node with its own name, ports, data, logs, cookie and (no) plugins.
pub struct Rabbit {
    bin_dir: PathBuf,
    dir: PathBuf,
    pids_dir: PathBuf,
    pub node: String,
    pub port: u16,
    dist_port: u16,
    child: Option<Child>,
}

impl Rabbit {
    pub fn create(
        run_dir: &Path,
        pids_dir: &Path,
        bin_dir: PathBuf,
        node: String,
        port: u16,
        dist_port: u16,
    ) -> anyhow::Result<Self> {
        let dir = run_dir.join("rabbitmq");
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        // No plugins at all: the management plugin would bind 15672, which the shared node owns.
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.default = 127.0.0.1:{port}\n"),
        )?;
        // Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        Ok(Self {
            bin_dir,
            dir,
            pids_dir: pids_dir.to_path_buf(),
            node,
            port,
            dist_port,
            child: None,
        })
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn environment(&self) -> Vec<(&'static str, String)> {
        let path = |name: &str| self.dir.join(name).display().to_string();
        vec![
            // The Erlang cookie lives in $HOME: a private one for the node and its CLI calls.
            ("HOME", self.dir.display().to_string()),
            ("RABBITMQ_NODENAME", self.node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".to_string()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".to_string()),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".to_string(),
            ),
        ]
    }

    fn ctl(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.bin_dir.join("rabbitmqctl"));
        command.envs(self.environment()).arg("-n").arg(&self.node);
        command
    }

    /// Starts the node and waits until it accepts AMQP connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))?;
        let child = std::process::Command::new(self.bin_dir.join("rabbitmq-server"))
            .envs(self.environment())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Ctrl-C in a terminal reaches the harness only, which stops
            // the node in order; the watchdog can end the whole group.
            .process_group(0)
            .spawn()
            .context("starting rabbitmq-server")?;
        write_pgid(&self.pids_dir, "rabbitmq", child.id());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(RABBIT_START_TIMEOUT_S);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "rabbitmq-server exited with {status} while starting (see {})",
                    self.dir.join("log").display()
                );
            }
            // The AMQP listener opens at the very end of the boot: a successful AMQP handshake
            // means the node serves. (rabbitmqctl is avoided here: its own Erlang VM can take
            // tens of seconds to boot on a loaded two-core machine.)
            if let Ok(Ok(connection)) = tokio::time::timeout(
                Duration::from_millis(RABBIT_PROBE_TIMEOUT_MS),
                shared::broker::connect(&self.amqp_url(), "chaos probe"),
            )
            .await
            {
                drop(connection.close(200, "probed".into()).await);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the private RabbitMQ node did not start within {RABBIT_START_TIMEOUT_S} s");
            }
            tokio::time::sleep(Duration::from_millis(RABBIT_PROBE_INTERVAL_MS)).await;
        }
    }

    /// Stops the node cleanly: SIGTERM to rabbitmq-server, which stops the broker (connections
    /// closed, queues and message stores shut down) and halts the VM. Kills the process group
    /// when that takes too long.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return Ok(());
        };
        signal_quietly("TERM", &pid.to_string());
        let deadline = Instant::now() + Duration::from_secs(RABBIT_STOP_TIMEOUT_S);
        while let Some(child) = self.child.as_mut() {
            if child.try_wait()?.is_some() {
                self.child = None;
                break;
            }
            if Instant::now() > deadline {
                self.kill_now();
                bail!(
                    "the private RabbitMQ node did not stop within {RABBIT_STOP_TIMEOUT_S} s; killed"
                );
            }
            tokio::time::sleep(Duration::from_millis(RABBIT_STOP_POLL_MS)).await;
        }
        // The script returns once the VM is gone, but the VM's helpers may linger a moment.
        signal_quietly("KILL", &format!("-{pid}"));
        Ok(())
    }

    /// Kills the node's whole process group at once (teardown on drop, or a stuck stop).
    pub fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_quietly("KILL", &format!("-{}", child.id()));
            drop(child.wait());
        }
    }

    /// Messages (ready and unacknowledged) per queue.
    pub async fn queue_depths(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut list = self.ctl();
        list.args([
            "list_queues",
            "--quiet",
            "--no-table-headers",
            "name",
            "messages",
        ]);
        let output = run_command(list, Duration::from_secs(RABBITMQCTL_TIMEOUT_S)).await?;
        let mut depths = Vec::new();
        for line in output.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(name), Some(count)) = (fields.next(), fields.next())
                && let Ok(count) = count.parse()
            {
                depths.push((name.to_string(), count));
            }
        }
        Ok(depths)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }
}

/// A shell process in its own process group that outlives the harness: when the harness dies
/// without tearing down (SIGKILL, abort), it kills every recorded process group, stops the
/// private PostgreSQL and removes the run directory unless it is to be kept.
pub struct Watchdog {
    child: Child,
}

impl Watchdog {
    pub fn spawn(
        run_dir: &Path,
        pids_dir: &Path,
        postgres: &Postgres,
        keep_dir: bool,
    ) -> anyhow::Result<Self> {
        const SCRIPT: &str = r#"
parent="$1"; interval="$2"; pids="$3"; dir="$4"; keep="$5"; shift 5
# Reparented (to init or a subreaper) means the harness is gone.
while [ "$(cut -d' ' -f4 /proc/$$/stat)" = "$parent" ]; do sleep "$interval"; done
for f in "$pids"/*.pgid; do
    # The external kill: dash's builtin takes neither "--" nor a negative pid.
    [ -f "$f" ] && env kill -KILL -- "-$(cat "$f")" 2>/dev/null
done
"$@" >/dev/null 2>&1
# Killed processes may still be closing files: retry the removal a few times.
if [ "$keep" != 1 ]; then
    for attempt in 1 2 3 4 5; do
        rm -rf "$dir" 2>/dev/null
        [ -e "$dir" ] || break
        sleep 1
    done
fi
"#;
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("chaos-watchdog")
            .arg(std::process::id().to_string())
            .arg(WATCHDOG_INTERVAL_S.to_string())
            .arg(pids_dir)
            .arg(run_dir)
            .arg(if keep_dir { "1" } else { "0" })
            .args(postgres.immediate_stop_argv())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the watchdog")?;
        Ok(Self { child })
    }

    /// The harness tore down by itself: the watchdog is not needed any more.
    pub fn dismiss(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

/// Prints where the private instances are, for people following a run.
pub fn describe(postgres: &Postgres, rabbit: &Rabbit) {
    say(format!(
        "private PostgreSQL on 127.0.0.1:{} (log {}), private RabbitMQ node {} on 127.0.0.1:{} (logs {})",
        postgres.port,
        postgres.log_path().display(),
        rabbit.node,
        rabbit.port,
        rabbit.log_dir().display()
    ));
}
