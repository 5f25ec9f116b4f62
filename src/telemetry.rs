//! Logs: human-readable on a terminal, JSON lines otherwise, level from `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Logs for command-line use: warnings and errors to stderr unless `RUST_LOG` says otherwise.
pub fn init_for_cli() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}
