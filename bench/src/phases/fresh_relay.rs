//! Start-up of a fresh relay process (exec to first answer, plus its first
//! proxied request with cold caches, and that request's DynamoDB round
//! trips), then SSE event timing through it, against the same spaced-events
//! fake served directly: each event's lateness against the fake's schedule
//! and its delay from the fake's write to the client.

use anyhow::bail;

use super::round_trips::round_trips;
use super::{Bench, Side, added};
use crate::client::{Endpoint, ms};
use crate::report::Figures;
use crate::services::{self, Service};
use crate::stack;
use crate::stats::percentile;

/// One run of this phase: which repetition, and which spaced-events fake.
pub struct SpacedRun<'a> {
    pub rep: usize,
    /// The fake behind the fresh relay, also served directly.
    pub fake: &'a Service,
    /// The fake's pause between SSE events.
    pub spacing_ms: u64,
}

pub async fn run(bench: &Bench<'_>, run: &SpacedRun<'_>, f: &mut Figures) -> anyhow::Result<()> {
    let (relay, relay_ep) = start(bench, run, f).await?;
    let samples = event_timing(bench, run, &relay_ep).await?;
    samples.push(f, run.spacing_ms);
    added(f, &format!("sse{}_delay_p50", run.spacing_ms));
    added(f, &format!("sse{}_delay_p99", run.spacing_ms));
    relay.stop().await;
    Ok(())
}

/// Starts the fresh relay and records its start-up figures; returns it
/// warmed up by 20 requests.
async fn start(
    bench: &Bench<'_>,
    run: &SpacedRun<'_>,
    f: &mut Figures,
) -> anyhow::Result<(Service, Endpoint)> {
    let mut env = bench.stack.relay_env.clone();
    env.push(("UPSTREAM_BASE_URL".into(), run.fake.base_url.clone()));
    let port = services::free_port()?;
    let log = format!("relay-fresh-{}-{}ms.log", run.rep, run.spacing_ms);
    let (relay, startup) = services::start_relay(
        &bench.binaries.relay,
        &env,
        port,
        &bench.state_dir.join(log),
        "fresh relay",
    )
    .await?;
    let relay_ep = Endpoint {
        label: "fresh relay",
        base_url: relay.base_url.clone(),
        api_key: bench.stack.relay_key.clone(),
    };
    // Calls made while starting (the table check), then by the first
    // proxied request, whose caches (key, tier) are cold.
    let startup_calls = round_trips(&relay.base_url).await?;
    let first = bench.client.json(&relay_ep).await?;
    f.push("startup_proxied", ms(startup) + first);
    f.push("startup_hello", ms(startup));
    let stats = round_trips(&relay.base_url).await?;
    f.push("ddb_calls_cold", (stats - startup_calls) as f64);
    for _ in 0..20 {
        bench.client.json(&relay_ep).await?;
    }
    Ok((relay, relay_ep))
}

/// Event lateness and per-event delays (ms) of one side's streams.
#[derive(Default)]
struct SideSamples {
    lateness: Vec<f64>,
    delays: Vec<f64>,
}

/// Both sides' samples of one spacing.
#[derive(Default)]
struct EventSamples {
    relay: SideSamples,
    direct: SideSamples,
}

impl EventSamples {
    /// `sse<spacing>_{,delay_}{p50,p99}_{relay,direct}`.
    fn push(&self, f: &mut Figures, spacing_ms: u64) {
        for (side, samples) in [("relay", &self.relay), ("direct", &self.direct)] {
            for (what, values) in [("", &samples.lateness), ("delay_", &samples.delays)] {
                f.push(
                    &format!("sse{spacing_ms}_{what}p50_{side}"),
                    percentile(values, 50.0),
                );
                f.push(
                    &format!("sse{spacing_ms}_{what}p99_{side}"),
                    percentile(values, 99.0),
                );
            }
        }
    }
}

/// Streams through the fresh relay and from the fake directly, alternating.
async fn event_timing(
    bench: &Bench<'_>,
    run: &SpacedRun<'_>,
    relay_ep: &Endpoint,
) -> anyhow::Result<EventSamples> {
    let spacing_ms = run.spacing_ms;
    let direct = stack::direct_endpoint(run.fake);
    // Many short streams at the short spacing, a few long ones at 100 ms.
    let streams = bench.options.sse_streams
        * usize::try_from((100 / spacing_ms.max(1)).clamp(1, 4)).unwrap_or(1);
    let mut samples = EventSamples::default();
    for i in 0..streams * 2 {
        let side = if (i + run.rep).is_multiple_of(2) {
            Side::Relay
        } else {
            Side::Direct
        };
        let to = if side == Side::Relay {
            relay_ep
        } else {
            &direct
        };
        let times = bench.client.event_arrivals(to).await?;
        if times.arrivals.len() < 5 || times.stamp_delays.len() + 1 < times.arrivals.len() {
            bail!(
                "{} streamed {} events and {} send-time stamps",
                to.label,
                times.arrivals.len(),
                times.stamp_delays.len()
            );
        }
        let lateness = times
            .arrivals
            .iter()
            .enumerate()
            .map(|(index, at)| at - (index as u64 * spacing_ms) as f64);
        let into = match side {
            Side::Relay => &mut samples.relay,
            Side::Direct => &mut samples.direct,
        };
        into.lateness.extend(lateness);
        into.delays.extend(times.stamp_delays);
        // The next stream starts once this one's settlement is done, so
        // DynamoDB Local's work for it does not land on the next events.
        if side == Side::Relay {
            round_trips(&relay_ep.base_url).await?;
        }
    }
    Ok(samples)
}
