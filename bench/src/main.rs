//! `make bench`: the relay (`relay-local`, release build, on DynamoDB Local)
//! against the fake Anthropic upstream served directly, phase by phase,
//! relay and direct interleaved over several repetitions; prints one
//! markdown table (medians and ranges, targets) with the criterion
//! micro-benchmarks' headline numbers.
//!
//! Everything runs on 127.0.0.1; every loop is bounded in count and time.
//! Codemap: `options` (arguments), `stack` (the processes started once),
//! `phases` (warm-up and every measured scenario, one module each),
//! `render` (the printed table's rows), with `client`, `wrk`, `procfs`,
//! `services`, `stats` and `report` as their tools.

mod client;
mod options;
mod phases;
mod procfs;
mod render;
mod report;
mod services;
mod stack;
mod stats;
mod wrk;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use client::{Client, ms};
use options::Options;
use phases::Bench;
use phases::throughput::WrkScripts;
use report::Figures;
use stack::{Binaries, Stack};

/// The fake's upstream key (tests/src/fake_upstream.rs `DEFAULT_API_KEY`).
const FAKE_KEY: &str = "sk-ant-fake-upstream-key";
/// The fakes' pauses between SSE events in the streaming-delay phases: the
/// issue's 100 ms, and 10 ms, nearer real token streams, where a sender
/// that lets Nagle's algorithm wait for the client's delayed ACK (up to
/// 40 ms) shows.
const EVENT_SPACINGS_MS: [u64; 2] = [100, 10];
/// The bench tier's limit: no throttling at c=32.
const TIER_REQUESTS: u64 = 1_000_000_000;
const TIER_PERIOD: u64 = 60;
/// The whole run's time bound, checked before each repetition.
const RUN_LIMIT: Duration = Duration::from_secs(30 * 60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse()?;
    // Ctrl-C ends the run through the normal drops: children are killed and
    // DynamoDB Local is stopped by its PID.
    tokio::select! {
        result = run(&options) => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

fn progress(message: &str) {
    let _ = writeln!(std::io::stderr(), "bench: {message}");
}

async fn run(o: &Options) -> anyhow::Result<()> {
    let binaries = Binaries::locate(&o.bin_dir)?;
    std::fs::create_dir_all(&o.state_dir)?;
    let state_dir = std::fs::canonicalize(&o.state_dir)?;
    let started = Instant::now();
    let load_before = render::load_average();
    let deadline = started + RUN_LIMIT;
    let ticks_per_second = procfs::clock_ticks_per_second() as f64;

    let (stack, first_startup) =
        Stack::start(&o.root, &binaries, &state_dir, &o.limit_mode).await?;
    let mut figures = Figures::default();
    figures.push("startup_hello", ms(first_startup));
    figures.push("rss_idle", procfs::status_mb(stack.relay.pid, "VmRSS")?);
    let client = Client::new()?;
    let body_len = client.body_len();
    let scripts = WrkScripts::write(&state_dir, &stack.relay_key)?;
    let bench = Bench {
        options: o,
        stack,
        client,
        binaries,
        state_dir,
        scripts,
        ticks_per_second,
    };

    progress("warming up");
    phases::warm_up::run(&bench).await?;
    figures.push(
        "rss_idle_warm",
        procfs::status_mb(bench.stack.relay.pid, "VmRSS")?,
    );
    for rep in 0..o.reps {
        if Instant::now() > deadline {
            bail!("the bench ran over 30 minutes; stopping");
        }
        progress(&format!("repetition {} of {}", rep + 1, o.reps));
        phases::repetition(&bench, rep, &mut figures).await?;
    }
    let relay_pid = bench.stack.relay.pid;
    figures.push("rss_after", procfs::status_mb(relay_pid, "VmRSS")?);
    figures.push("rss_peak", procfs::status_mb(relay_pid, "VmHWM")?);

    let heading = render::Heading {
        body_len,
        elapsed: started.elapsed(),
        load_before: &load_before,
    };
    let text = render::report(o, &figures, &heading);
    publish(&bench.state_dir, &text)?;
    bench.stack.stop().await;
    progress(&format!(
        "done in {:.0} s; report also in {}",
        started.elapsed().as_secs_f64(),
        bench.state_dir.join("report.md").display()
    ));
    Ok(())
}

/// The report to `<state dir>/report.md` and to stdout.
fn publish(state_dir: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(state_dir.join("report.md"), text)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
