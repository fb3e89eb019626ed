//! The report of a run: faults injected by kind, what the client sent and got, what the books
//! say, and every check with its verdict.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use crate::faults::{FaultEvent, FaultKind};
use crate::services::UnexpectedExit;
use crate::verify::{Check, Drain, Verdict};

#[derive(Debug, Clone, Default)]
pub struct ClientFigures {
    pub requests: u64,
    pub timeouts: u64,
    pub connection_errors: u64,
    pub concurrent_pairs: u64,
    pub gave_up: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub duplicates_racing: u64,
    /// The harness could rebuild the gateway's fingerprints (see the canary).
    pub racing_enabled: bool,
    pub duplicates_late: u64,
    pub duplicates_failed: u64,
    pub resolved_after_drain: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub duration_s: u64,
    pub workers: u16,
    pub partitions: u16,
    pub players: u32,
    pub faults: Vec<FaultEvent>,
    pub fault_kinds: Vec<FaultKind>,
    pub client: ClientFigures,
    pub drain: Drain,
    pub verdict: Verdict,
    pub unexpected_exits: Vec<UnexpectedExit>,
    /// Checks of the run itself (drain, recovery, process exits, fault coverage).
    pub run_checks: Vec<Check>,
    pub run_dir: PathBuf,
    pub run_dir_kept: bool,
    pub interrupted: bool,
}

impl Report {
    pub fn lost(&self) -> usize {
        self.verdict.lost.len()
    }

    pub fn applied_twice(&self) -> usize {
        self.verdict.applied_twice.len()
    }

    pub fn faults_of(&self, kind: FaultKind) -> usize {
        self.faults
            .iter()
            .filter(|fault| fault.kind == kind)
            .count()
    }

    pub fn checks(&self) -> impl Iterator<Item = &Check> {
        self.run_checks.iter().chain(&self.verdict.checks)
    }

    /// Lost 0, applied twice 0, and every check passed.
    pub fn passed(&self) -> bool {
        !self.interrupted
            && self.lost() == 0
            && self.applied_twice() == 0
            && !self.verdict.checks.is_empty()
            && self.checks().all(|check| check.passed)
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let rule = "-".repeat(72);
        let _ = writeln!(out, "{rule}");
        let _ = writeln!(
            out,
            "chaos run: {} s of load, {} players, {} workers, {} partitions, seed {}",
            self.duration_s, self.players, self.workers, self.partitions, self.seed
        );
        let _ = writeln!(out, "{rule}");
        let _ = writeln!(out, "{:<52}{:>8}  notes", "faults injected", "count");
        for kind in FaultKind::EVERY {
            if !FaultKind::ALL.contains(&kind) && !self.fault_kinds.contains(&kind) {
                continue;
            }
            let events: Vec<&FaultEvent> = self
                .faults
                .iter()
                .filter(|fault| fault.kind == kind)
                .collect();
            let mut notes = Vec::new();
            if !events.is_empty() && (kind == FaultKind::Worker || kind == FaultKind::Treasury) {
                let inside = events.iter().filter(|event| event.mid_transaction).count();
                notes.push(format!("{inside} inside a transaction"));
            }
            if let Some(worst) = events
                .iter()
                .filter_map(|event| event.recovered_after_ms)
                .max()
            {
                notes.push(format!("served again within {worst} ms"));
            }
            let _ = writeln!(
                out,
                "  {:<50}{:>8}  {}",
                kind.label(),
                events.len(),
                notes.join(", ")
            );
        }
        let client = &self.client;
        let racing_label = if client.racing_enabled {
            "duplicate deliveries (racing the request)"
        } else {
            "duplicate deliveries (racing: DISABLED, see log)"
        };
        let rows = [
            (racing_label, client.duplicates_racing),
            (
                "duplicate deliveries (of applied commands)",
                client.duplicates_late,
            ),
            (
                "client timeouts, retried with the same key",
                client.timeouts,
            ),
            (
                "connection errors/resets, retried with the same key",
                client.connection_errors,
            ),
            ("same key sent twice at once", client.concurrent_pairs),
        ];
        for (label, count) in rows {
            let _ = writeln!(out, "  {label:<50}{count:>8}");
        }
        let _ = writeln!(out, "{rule}");
        let verdict = &self.verdict;
        let sent_detail: Vec<String> = verdict
            .sent_by_kind
            .iter()
            .map(|(kind, count)| format!("{} {count}", kind.as_str()))
            .collect();
        let statuses: Vec<String> = client
            .statuses
            .iter()
            .map(|(status, count)| format!("{status}: {count}"))
            .collect();
        let _ = writeln!(out, "{:<52}{:>8}", "commands", "count");
        let _ = writeln!(
            out,
            "  {:<50}{:>8}",
            format!("sent ({})", sent_detail.join(", ")),
            verdict.commands_sent
        );
        let _ = writeln!(out, "  {:<50}{:>8}", "HTTP requests", client.requests);
        let _ = writeln!(out, "    {}", statuses.join(", "));
        let _ = writeln!(
            out,
            "  {:<50}{:>8}",
            format!("accepted (2xx; {} saw a 202)", verdict.accepted_202),
            verdict.accepted
        );
        let rows = [
            ("applied (stored outcome applied)", verdict.applied),
            ("stored refusals (409/422/404 results)", verdict.rejected),
            ("never 2xx: got a stored refusal", verdict.refused),
            (
                "never 2xx nor a result: stored anyway (once)",
                verdict.unanswered_stored,
            ),
            (
                "never 2xx nor a result: not stored",
                verdict.unanswered_not_stored,
            ),
        ];
        for (label, count) in rows {
            let _ = writeln!(out, "  {label:<50}{count:>8}");
        }
        let _ = writeln!(
            out,
            "  {:<50}{:>8}",
            "client gave up (attempts exhausted)", client.gave_up
        );
        let _ = writeln!(
            out,
            "  {:<50}{:>8}",
            "retried once more after the drain", client.resolved_after_drain
        );
        let _ = writeln!(out, "  {:<50}{:>8}", "lost (must be 0)", self.lost());
        let _ = writeln!(
            out,
            "  {:<50}{:>8}",
            "applied twice (must be 0)",
            self.applied_twice()
        );
        let _ = writeln!(out, "{rule}");
        let _ = writeln!(out, "checks");
        for check in self.checks() {
            let _ = writeln!(
                out,
                "  [{}] {}: {}",
                if check.passed { " ok " } else { "FAIL" },
                check.name,
                check.detail
            );
        }
        if self.interrupted {
            let _ = writeln!(out, "  [FAIL] the run was interrupted");
        }
        let _ = writeln!(out, "{rule}");
        let _ = writeln!(
            out,
            "verdict: {}{}",
            if self.passed() { "PASSED" } else { "FAILED" },
            if self.run_dir_kept {
                format!(
                    " (logs and request records kept in {})",
                    self.run_dir.display()
                )
            } else {
                String::new()
            }
        );
        out
    }
}
