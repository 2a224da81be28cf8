//! Log setup: JSON lines in Lambda (CloudWatch parses them), compact text
//! locally; level from `RUST_LOG`, `info` by default.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

pub fn init() {
    let config = LogConfig::from_env();
    // A malformed filter logs at `info` rather than not at all.
    let filter = EnvFilter::try_new(&config.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init`: a second call (tests) is harmless.
    let _ = if config.json_lines {
        builder
            .json()
            .with_ansi(false)
            .with_current_span(false)
            .without_time()
            .try_init()
    } else {
        builder.compact().try_init()
    };
}
