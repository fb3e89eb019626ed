use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = worker::WorkerConfig::parse();
    shared::telemetry::init(&config.common.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::shutdown::on_signal(shutdown.clone()));
    worker::run(config, shutdown).await
}
