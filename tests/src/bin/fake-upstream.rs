//! Standalone fake Anthropic API for the Python tests (SDKs and real clients) and benchmarks:
//! serves the default message on 127.0.0.1 with usage derived from each request, until
//! interrupted; `--request-log` writes what reached it, one JSON line per request.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use relay_tests::fake_upstream::{Behavior, FakeConfig, FakeUpstream, MessageSpec};

const USAGE: &str = "usage: fake-upstream [--port N] [--api-key K] [--event-delay-ms N] [--stamp-events] [--chunks N] [--allow-authorization] [--request-log FILE]";

fn parse_args(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<FakeConfig>> {
    let mut config = FakeConfig::default();
    let mut spec = MessageSpec {
        // Deterministic yet request-dependent, so callers can predict the usage they will see.
        usage_from_request: true,
        ..MessageSpec::default()
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = || match inline.clone().or_else(|| args.next()) {
            Some(v) => Ok(v),
            None => bail!("{flag} needs a value\n{USAGE}"),
        };
        match flag.as_str() {
            "--port" => config.port = value()?.parse().context("--port")?,
            "--api-key" => config.api_key = value()?,
            "--event-delay-ms" => {
                spec.event_delay =
                    Duration::from_millis(value()?.parse().context("--event-delay-ms")?);
            }
            "--chunks" => {
                let n: usize = value()?.parse().context("--chunks")?;
                spec.chunk_split = (n > 0).then_some(n);
            }
            "--stamp-events" => spec.stamp_events = true,
            "--allow-authorization" => config.reject_authorization = false,
            "--request-log" => config.request_log = Some(value()?.into()),
            "-h" | "--help" => return Ok(None),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    config.default_behavior = Behavior::Message(spec);
    Ok(Some(config))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut stdout = std::io::stdout();
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            writeln!(stdout, "{USAGE}")?;
            return Ok(());
        }
        // A usage mistake deserves a one-line message, not an anyhow backtrace.
        Err(e) => {
            eprintln!("{e:#}");
            std::process::exit(2);
        }
    };
    let fake = FakeUpstream::start_with(config).await?;
    // Scripts wait for this exact line to learn the port, so flush it right away.
    writeln!(stdout, "listening on {}", fake.base_url())?;
    stdout.flush()?;
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    drop(fake);
    Ok(())
}
