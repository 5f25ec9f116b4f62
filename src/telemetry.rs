//! Logs: to stderr, level from `RUST_LOG` or the command's default.

use tracing_subscriber::EnvFilter;

/// Logs `default_level` and above (or what `RUST_LOG` says) to stderr.
pub fn init(default_level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("discus={default_level},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
