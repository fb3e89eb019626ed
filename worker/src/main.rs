use clap::Parser;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's allocator: allocation was a large share of the CPU profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = worker::WorkerConfig::parse();
    shared::telemetry::init(&config.common.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::shutdown::on_signal(shutdown.clone()));
    worker::run(config, shutdown).await
}
