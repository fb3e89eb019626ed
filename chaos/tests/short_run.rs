//! The short chaos run of the test suite: builds the real service binaries, runs the harness for
//! a little over a minute with every kind of fault, and requires a clean verdict: nothing lost,
//! nothing applied twice, every check and the audit passed.
//!
//! `CHAOS_TEST_DURATION_S` changes the length of the load (default below).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use chaos::faults::FaultKind;
use tokio_util::sync::CancellationToken;

/// Seconds of load: long enough for every fault kind to be injected once at the interval below.
const SHORT_RUN_DURATION_S: u64 = 75;
const SHORT_RUN_WARMUP_S: u64 = 8;
const SHORT_RUN_FAULT_INTERVAL_S: u64 = 7;
const SERVICE_BINARIES: [&str; 3] = ["gateway", "worker", "treasury"];

/// Builds the gateway, worker and treasury binaries of this workspace (cargo test builds only
/// the binaries of packages with integration tests) and returns the directory holding them.
fn build_services() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("chaos/ sits in the workspace")
        .to_path_buf();
    let mut command = Command::new(cargo);
    command
        .current_dir(&workspace)
        .args(["build", "--message-format=json-render-diagnostics"]);
    for binary in SERVICE_BINARIES {
        command.args(["-p", binary]);
    }
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    let output = command.output().expect("running cargo build");
    assert!(
        output.status.success(),
        "cargo build of the services failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut executables: HashMap<String, PathBuf> = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && let (Some(name), Some(executable)) = (
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            )
            && SERVICE_BINARIES.contains(&name)
        {
            executables.insert(name.to_string(), PathBuf::from(executable));
        }
    }
    let directory = executables
        .get("gateway")
        .and_then(|path| path.parent())
        .expect("cargo reported the gateway executable")
        .to_path_buf();
    for binary in SERVICE_BINARIES {
        assert_eq!(
            executables.get(binary).and_then(|path| path.parent()),
            Some(directory.as_path()),
            "{binary} is built next to the gateway"
        );
    }
    directory
}

#[test]
fn a_short_chaos_run_loses_nothing_and_applies_nothing_twice() {
    let bin_dir = build_services();
    let duration_s = std::env::var("CHAOS_TEST_DURATION_S")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(SHORT_RUN_DURATION_S);
    let options = chaos::Options::from_args([
        "--duration-s".to_string(),
        duration_s.to_string(),
        "--warmup-s".to_string(),
        SHORT_RUN_WARMUP_S.to_string(),
        "--fault-interval-s".to_string(),
        SHORT_RUN_FAULT_INTERVAL_S.to_string(),
        "--bin-dir".to_string(),
        bin_dir.display().to_string(),
    ])
    .expect("options");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let report = runtime
        .block_on(chaos::run(options, CancellationToken::new()))
        .expect("the harness ran");
    let table = report.table();
    println!("{table}");
    for kind in FaultKind::ALL {
        assert!(
            report.faults_of(kind) >= 1,
            "{} was never injected:\n{table}",
            kind.label()
        );
    }
    assert_eq!(report.lost(), 0, "commands lost:\n{table}");
    assert_eq!(
        report.applied_twice(),
        0,
        "commands applied twice:\n{table}"
    );
    assert!(
        report.verdict.accepted > 0,
        "nothing was accepted:\n{table}"
    );
    assert!(report.passed(), "the run failed:\n{table}");
}
