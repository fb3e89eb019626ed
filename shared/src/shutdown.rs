use tokio_util::sync::CancellationToken;

/// Cancels `token` on SIGTERM or Ctrl-C, so every process stops the same way: stop taking
/// work, finish (or leave unacknowledged) what is in flight, then exit.
pub async fn on_signal(token: CancellationToken) {
    let ctrl_c = async {
        drop(tokio::signal::ctrl_c().await);
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown requested");
    token.cancel();
}
