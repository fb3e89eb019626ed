//! Smoke test of the benchmark: each scenario, briefly (twice half a second on one setup),
//! against an in-process system (gateway, worker and treasury on their own database and queue
//! prefix) and against the in-process baseline server (on a database of its own). Behaviour
//! only, never speed: the runs complete, requests are answered, nothing is a 4xx, a 5xx, a
//! replay or unanswered, the treasury catches up, and the audit passes on both databases.

mod common;

use std::sync::Arc;

use bench::driver::{Load, measure};
use bench::report::Report;
use bench::scenario::{ScenarioArgs, Target, prepare};
use clap::Parser;
use common::{start_baseline, start_system};

fn scenario(args: &[&str]) -> ScenarioArgs {
    // The disk probe's file goes to the temporary directory, not into the crate's folder.
    let probe_dir = std::env::temp_dir().display().to_string();
    ScenarioArgs::parse_from(
        [
            "scenario",
            "--no-progress",
            "--duration-s",
            "0.5",
            "--disk-probe-dir",
            &probe_dir,
        ]
        .into_iter()
        .chain(args.iter().copied()),
    )
}

/// Prepares one scenario and measures it twice on the same setup (as `compare` does with its
/// open loop after the closed one), checking what any healthy run must show.
async fn run_scenario(target: &Target, args: &ScenarioArgs) -> Report {
    let prepared = Arc::new(prepare(target, args).await.expect("setup"));
    let load = Load::from_args(args).unwrap();
    let mut last = None;
    for measurement in 1..=2 {
        let report = measure(target, args, Arc::clone(&prepared), load)
            .await
            .expect("measurement");
        let context = format!(
            "{} {} {} #{measurement}: {:?}",
            target.label, report.meta.scenario, report.meta.mode, report.statuses
        );
        assert!(report.counts.answered > 0, "nothing answered: {context}");
        assert!(report.counts.results > 0, "no command result: {context}");
        assert_eq!(report.counts.server_errors, 0, "5xx: {context}");
        // Players are funded far beyond what one second can spend, names and keys are fresh in
        // every measurement and referral codes exist: any 4xx or replay means the bench or the
        // target misbehaves.
        assert_eq!(report.counts.client_errors, 0, "4xx: {context}");
        assert_eq!(report.counts.replayed, 0, "replays: {context}");
        assert_eq!(report.counts.transport_errors, 0, "no answer: {context}");
        assert_eq!(
            report.counts.answered, report.latency_ms.count,
            "one latency per answer: {context}"
        );
        assert!(report.latency_ms.max >= report.latency_ms.p50, "{context}");
        // The disk probe flushed through the window: one slowest flush per started second.
        let disk = report.disk.as_ref().expect("a disk probe report");
        assert!(disk.flushes > 0, "no probe flush: {context}");
        assert_eq!(disk.fsync_max_by_second_ms.len(), 1, "{context}");
        assert!(disk.fsync_max_ms > 0.0, "{context}");
        last = Some(report);
    }
    last.expect("two measurements")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_against_the_system_and_the_baseline() {
    shared::telemetry::init("text");
    let system = start_system().await;
    let baseline = start_baseline().await;
    let runs = [
        scenario(&[
            "--scenario",
            "purchase-hot",
            "--players",
            "4",
            "--clients",
            "4",
        ]),
        scenario(&[
            "--scenario",
            "purchase-hot",
            "--players",
            "20",
            "--setup",
            "sql",
            "--mode",
            "open",
            "--rate",
            "50",
        ]),
        scenario(&["--scenario", "zipf", "--players", "300", "--clients", "8"]),
        scenario(&[
            "--scenario",
            "signup-referral",
            "--players",
            "2",
            "--clients",
            "2",
        ]),
    ];
    for args in &runs {
        for running in [&system, &baseline] {
            let report = run_scenario(&running.target, args).await;
            eprintln!("{}", bench::report::render_table(&[&report]));
            if let Some(rate) = args.rate {
                assert_eq!(report.counts.dropped, 0, "{:?}", report.counts);
                // About rate × duration sends, each answered.
                assert!(report.counts.sent as f64 >= rate * args.duration_s * 0.5);
            }
        }
    }
    // The treasury folds every hot credit once the load stops.
    let lag = bench::compare::treasury_lag(&system.pool).await.unwrap();
    assert!(
        lag.drained_ms.is_some(),
        "treasury never caught up: {lag:?}"
    );
    for running in [&system, &baseline] {
        let report = shared::audit::run(&running.pool).await.expect("audit ran");
        assert!(
            report.passed,
            "audit of the {} failed: {}",
            running.target.label,
            serde_json::to_string_pretty(&report).unwrap()
        );
    }
    // The baseline updates hot balances in each request's transaction: the only credits left
    // unfolded there are the two SQL seeds' (one chunk each), written after it started.
    let unfolded: i64 = sqlx::query_scalar("SELECT count(*) FROM hot_credits")
        .fetch_one(&baseline.pool)
        .await
        .unwrap();
    assert_eq!(unfolded, 2, "the baseline wrote hot credits");
    system.stop().await;
    baseline.stop().await;
}
