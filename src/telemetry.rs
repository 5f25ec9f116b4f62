//! Logs: to stderr, as text for people or JSON for collectors; the level from `--log-level`,
//! else `RUST_LOG`, else the command's default.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
#[error("--log-level {level:?}: {source}")]
pub struct LogLevelError {
    level: String,
    source: tracing_subscriber::filter::ParseError,
}

/// Starts logging. A bare level (`debug`) applies to discus; other crates log warnings.
pub fn init(
    format: LogFormat,
    level: Option<&str>,
    default_level: &str,
) -> Result<(), LogLevelError> {
    let filter = match level {
        Some(level) => filter(level).map_err(|source| LogLevelError {
            level: level.to_owned(),
            source,
        })?,
        None => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new(format!("discus={default_level},warn"))),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Another part (a test harness) may have installed a subscriber already.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

fn filter(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let bare =
        ["error", "warn", "info", "debug", "trace"].contains(&level.to_ascii_lowercase().as_str());
    if bare {
        EnvFilter::try_new(format!("discus={level},warn"))
    } else {
        EnvFilter::try_new(level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_level_applies_to_discus_and_a_filter_is_taken_as_it_is() {
        assert_eq!(
            filter("debug").expect("valid").to_string(),
            "discus=debug,warn"
        );
        assert_eq!(
            filter("discus=trace,kube=info").expect("valid").to_string(),
            "discus=trace,kube=info"
        );
        assert!(filter("discus=loud").is_err());
    }
}
