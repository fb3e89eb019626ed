//! `chaos`: the fault-injection harness. See `chaos --help` and the README.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "Runs the gateway, workers and treasury against private PostgreSQL and RabbitMQ \
             instances, injects faults, then checks that no accepted command was lost or \
             applied twice and that the books pass the audit"
)]
struct Cli {
    #[command(flatten)]
    options: chaos::Options,
}

/// Exit code when the run itself could not be carried out (setup failed, a tool is missing).
const EXIT_HARNESS_ERROR: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::shutdown::on_signal(shutdown.clone()));
    match chaos::run(cli.options, shutdown).await {
        Ok(report) => {
            print!("{}", report.table());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("chaos: {error:#}");
            ExitCode::from(EXIT_HARNESS_ERROR)
        }
    }
}
