//! Standalone fake Bedrock runtime for the Python SDK tests: answers every
//! model with the given usage on 127.0.0.1, in Bedrock's event-stream
//! framing, until interrupted.

use std::io::Write as _;

use anyhow::{Context as _, bail};
use relay_tests::fake_bedrock::FakeBedrock;
use relay_tests::fake_upstream::Usage;

const USAGE: &str = "usage: fake-bedrock [--port N] [--usage INPUT,OUTPUT]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut port = 0u16;
    let mut usage = Usage::new(25, 12, 0, 0);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--port" => port = value()?.parse().context("--port")?,
            "--usage" => {
                let text = value()?;
                let (input, output) = text.split_once(',').context("--usage INPUT,OUTPUT")?;
                usage = Usage::new(input.parse()?, output.parse()?, 0, 0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let fake = FakeBedrock::start_on(port).await?;
    fake.set_usage(usage);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", fake.endpoint_url())?;
    stdout.flush()?;
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    drop(fake);
    Ok(())
}
