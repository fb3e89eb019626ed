use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default level (info).
/// Calling it twice is harmless (the second call keeps the first subscriber).
pub fn init(log_format: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,lapin=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if log_format == "json" {
        registry
            .with(fmt::layer().json().with_current_span(true))
            .try_init()
    } else {
        // Colours only on a terminal: a log file or a pipe gets plain text, which is both
        // readable there and cheaper to write (the escape codes were formatted into every span).
        registry
            .with(fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .try_init()
    };
    // A subscriber may already be installed (tests start several services in one process).
    drop(result);
}
