//! Where the machine's CPU went during a measured window, by process group.
//!
//! Everything of a run shares the same cores (the load driver, the gateway, the workers, the
//! treasury, PostgreSQL, RabbitMQ), and at a fixed offered rate the latency follows how busy
//! they keep the machine. So a run also reports the CPU each group used per command: a figure
//! that moves far less from run to run than a p99 does, and that says which process a change
//! made cheaper. Read from `/proc` (Linux only; elsewhere the figures are absent).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::round3;

/// Clock ticks per second of `/proc/<pid>/stat` and `/proc/stat` (USER_HZ, 100 on every Linux
/// this runs on).
const LINUX_USER_HZ: f64 = 100.0;

/// The groups in the order the table prints them.
pub const GROUPS: [&str; 8] = [
    "postgresql",
    "rabbitmq",
    "gateway",
    "worker",
    "treasury",
    "baseline",
    "driver",
    "other",
];

/// CPU seconds used so far, by process group, and by the whole machine.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    taken_at: std::time::Instant,
    /// Each process's group and CPU seconds, by pid: a process that exits between two
    /// snapshots is left out of both, one that starts counts with all it used.
    processes: BTreeMap<u32, (&'static str, f64)>,
    /// Busy time of all CPUs from `/proc/stat`: user, nice, system, irq, softirq and steal.
    machine_s: f64,
}

impl CpuSnapshot {
    /// None where `/proc` cannot be read.
    pub fn take() -> Option<Self> {
        let machine_s = machine_busy_seconds()?;
        let own_pid = std::process::id();
        let mut processes = BTreeMap::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            // A process can exit while the directory is read: skip it.
            let Some((command, seconds)) = process_stat(pid) else {
                continue;
            };
            processes.insert(pid, (group_of(pid, own_pid, &command), seconds));
        }
        Some(Self {
            taken_at: std::time::Instant::now(),
            processes,
            machine_s,
        })
    }
}

/// The CPU of a window, in cores (1.0: one core busy all the window), and per command.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    pub window_s: f64,
    /// The whole machine, including the kernel's own work (interrupts, soft interrupts).
    pub machine_cores: f64,
    pub cores_by_group: BTreeMap<String, f64>,
    /// Microseconds of CPU per command (results in the window), by group and for the machine
    /// (`machine`). Absent when no command completed.
    pub micros_per_command: BTreeMap<String, f64>,
}

impl CpuUse {
    /// The CPU used between two snapshots, spread over `commands_per_s`.
    pub fn between(before: &CpuSnapshot, after: &CpuSnapshot, commands_per_s: f64) -> Self {
        let window_s = after
            .taken_at
            .saturating_duration_since(before.taken_at)
            .as_secs_f64();
        let mut seconds_by_group: BTreeMap<String, f64> = BTreeMap::new();
        for (pid, (group, seconds_after)) in &after.processes {
            let seconds_before = match before.processes.get(pid) {
                // Same pid, same group: the same process (pids are not reused within seconds).
                Some((group_before, seconds)) if group_before == group => *seconds,
                _ => 0.0,
            };
            *seconds_by_group.entry((*group).to_string()).or_default() +=
                (seconds_after - seconds_before).max(0.0);
        }
        let per_window = |seconds: f64| {
            if window_s > 0.0 {
                seconds / window_s
            } else {
                0.0
            }
        };
        let machine_cores = per_window(after.machine_s - before.machine_s);
        let cores_by_group: BTreeMap<String, f64> = seconds_by_group
            .into_iter()
            .map(|(group, seconds)| (group, per_window(seconds)))
            .collect();
        // Microseconds come from the unrounded cores: rounding the cores to three decimals first
        // would move a slow target's figures by a microsecond or more (0.001 cores at 500/s).
        // Rounding is for the report only.
        let mut micros_per_command = BTreeMap::new();
        if commands_per_s > 0.0 {
            let micros = |cores: f64| (cores / commands_per_s * 1e6).round();
            micros_per_command.insert("machine".to_string(), micros(machine_cores));
            for (group, cores) in &cores_by_group {
                micros_per_command.insert(group.clone(), micros(*cores));
            }
        }
        Self {
            window_s: round3(window_s),
            machine_cores: round3(machine_cores),
            cores_by_group: cores_by_group
                .into_iter()
                .map(|(group, cores)| (group, round3(cores)))
                .collect(),
            micros_per_command,
        }
    }

    /// One line for the table: the machine's total, then each group's share.
    pub fn describe_micros(&self) -> String {
        let Some(machine) = self.micros_per_command.get("machine") else {
            return "n/a".to_string();
        };
        let parts: Vec<String> = GROUPS
            .iter()
            .filter_map(|group| {
                let micros = self.micros_per_command.get(*group)?;
                // Groups that did next to nothing would only widen the table.
                (*micros >= 1.0).then(|| format!("{group} {micros:.0}"))
            })
            .collect();
        format!("{machine:.0} ({})", parts.join(", "))
    }
}

/// Which group a process belongs to, by its command name (and, for `bench`, its arguments).
fn group_of(pid: u32, own_pid: u32, command: &str) -> &'static str {
    match command {
        "postgres" => "postgresql",
        // The Erlang VM and its helpers.
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "rabbitmq",
        "gateway" => "gateway",
        "worker" => "worker",
        "treasury" => "treasury",
        "bench" if pid == own_pid => "driver",
        "bench" => {
            let arguments = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let is_baseline = arguments
                .split(|byte| *byte == 0)
                .any(|argument| argument == b"baseline-server");
            if is_baseline { "baseline" } else { "other" }
        }
        _ => "other",
    }
}

/// The command name and the CPU seconds (user + system, all threads) of one process.
fn process_stat(pid: u32) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_process_stat(&stat)
}

/// The command name and CPU seconds of one line of `/proc/<pid>/stat`.
pub(crate) fn parse_process_stat(stat: &str) -> Option<(String, f64)> {
    // The command name is in parentheses and may itself hold spaces and parentheses.
    let (head, rest) = stat.rsplit_once(')')?;
    let command = head.split_once('(')?.1.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((command, (user + system) / LINUX_USER_HZ))
}

/// Busy seconds of all CPUs together since boot, from the first line of `/proc/stat`.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_busy(stat.lines().next()?)
}

fn parse_machine_busy(line: &str) -> Option<f64> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<f64> = fields.filter_map(|field| field.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|index| ticks.get(*index))
        .sum::<f64>();
    Some(busy / LINUX_USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_process_line_whose_name_has_spaces_and_parentheses() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 \
                    123 456 789";
        let (command, seconds) = parse_process_stat(line).expect("parsed");
        assert_eq!(command, "my (odd) name");
        assert!((seconds - 3.25).abs() < 1e-9, "{seconds}");
    }

    #[test]
    fn machine_busy_time_leaves_idle_and_iowait_out() {
        // user 100, nice 10, system 50, idle 1000, iowait 40, irq 5, softirq 15, steal 20.
        let line = "cpu  100 10 50 1000 40 5 15 20 0 0";
        let busy = parse_machine_busy(line).expect("parsed");
        assert!((busy - 2.0).abs() < 1e-9, "{busy}");
        assert_eq!(parse_machine_busy("cpu0 1 2 3"), None);
    }

    #[test]
    fn a_window_spreads_each_group_over_the_commands() {
        let start = std::time::Instant::now();
        let before = CpuSnapshot {
            taken_at: start,
            processes: BTreeMap::from([(10, ("postgresql", 5.0)), (11, ("worker", 1.0))]),
            machine_s: 100.0,
        };
        let after = CpuSnapshot {
            taken_at: start + std::time::Duration::from_secs(2),
            processes: BTreeMap::from([
                (10, ("postgresql", 6.0)),
                (11, ("worker", 1.5)),
                // Started during the window: all it used counts.
                (12, ("worker", 0.5)),
            ]),
            machine_s: 103.0,
        };
        let used = CpuUse::between(&before, &after, 1_000.0);
        assert_eq!(used.window_s, 2.0);
        assert_eq!(used.machine_cores, 1.5);
        assert_eq!(used.cores_by_group["postgresql"], 0.5);
        assert_eq!(used.cores_by_group["worker"], 0.5);
        assert_eq!(used.micros_per_command["machine"], 1_500.0);
        assert_eq!(used.micros_per_command["postgresql"], 500.0);
        assert_eq!(used.describe_micros(), "1500 (postgresql 500, worker 500)");
    }

    #[test]
    fn microseconds_come_from_the_unrounded_cores() {
        let start = std::time::Instant::now();
        let before = CpuSnapshot {
            taken_at: start,
            processes: BTreeMap::from([(10, ("treasury", 1.0))]),
            machine_s: 10.0,
        };
        let after = CpuSnapshot {
            taken_at: start + std::time::Duration::from_secs(1),
            processes: BTreeMap::from([(10, ("treasury", 1.0014))]),
            machine_s: 10.0014,
        };
        // 0.0014 cores at 10 commands a second is 140 µs each; the rounded 0.001 would say 100.
        let used = CpuUse::between(&before, &after, 10.0);
        assert_eq!(used.cores_by_group["treasury"], 0.001);
        assert_eq!(used.micros_per_command["treasury"], 140.0);
        assert_eq!(used.micros_per_command["machine"], 140.0);
    }

    #[test]
    fn a_snapshot_holds_this_process() {
        let snapshot = CpuSnapshot::take().expect("/proc is readable on Linux");
        let (group, _) = snapshot.processes[&std::process::id()];
        // A test binary is called `bench-<hash>`, not `bench`: it is none of the groups.
        assert_eq!(group, "other");
    }
}
