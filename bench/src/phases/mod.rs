//! The measured phases of one repetition, in the order they run, each in
//! its own module, and what they share: the bench's context, the side
//! (relay or fake direct) a run goes to, and the relay − direct figures.

pub mod fresh_relay;
pub mod latency;
pub mod round_trips;
pub mod store_timing;
pub mod throughput;
pub mod warm_up;

use std::path::PathBuf;

use crate::EVENT_SPACINGS_MS;
use crate::client::{Client, Endpoint};
use crate::options::Options;
use crate::report::Figures;
use crate::stack::{self, Binaries, Stack};
use throughput::WrkScripts;

/// What every phase reads: the options, the running stack, the bench's own
/// client and files.
pub struct Bench<'a> {
    pub options: &'a Options,
    pub stack: Stack,
    pub client: Client,
    pub binaries: Binaries,
    pub state_dir: PathBuf,
    pub scripts: WrkScripts,
    /// Clock ticks per second of /proc's CPU times.
    pub ticks_per_second: f64,
}

/// Where one run of a phase sends its requests.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Relay,
    Direct,
}

impl Side {
    /// The suffix of the side's figures.
    pub fn name(self) -> &'static str {
        match self {
            Side::Relay => "relay",
            Side::Direct => "direct",
        }
    }

    /// The two sides in this repetition's order: alternating which goes
    /// first, so drift (JIT, caches, table growth) does not always favour
    /// the same one.
    pub fn in_order(rep: usize) -> [Side; 2] {
        if rep.is_multiple_of(2) {
            [Side::Relay, Side::Direct]
        } else {
            [Side::Direct, Side::Relay]
        }
    }

    /// The main relay's endpoint, or `direct`.
    pub fn endpoint<'e>(self, bench: &'e Bench<'_>, direct: &'e Endpoint) -> &'e Endpoint {
        match self {
            Side::Relay => &bench.stack.relay_ep,
            Side::Direct => direct,
        }
    }
}

/// One repetition: every measured phase, relay and direct interleaved.
pub async fn repetition(bench: &Bench<'_>, rep: usize, f: &mut Figures) -> anyhow::Result<()> {
    // A fresh fake per repetition for the direct runs: it records every
    // request, and tens of thousands a second would pile up.
    let fake = stack::start_direct_fake(&bench.binaries.fake, &bench.state_dir).await?;
    let direct = stack::direct_endpoint(&fake);
    for _ in 0..50 {
        bench.client.json(&direct).await?;
    }
    let sides = Side::in_order(rep);
    latency::non_streamed(bench, &direct, sides, f).await?;
    latency::settled(bench, &direct, sides, f).await?;
    latency::streamed(bench, &direct, sides, f).await?;
    round_trips::calls_per_request(bench, f).await?;
    store_timing::run(bench, f).await?;
    throughput::run(bench, &fake, sides, f).await?;
    fake.stop().await;

    // Start-up of a fresh relay, then event timing through it (its upstream
    // spaces SSE events) against the same fake served directly; once per
    // spacing.
    for (fake, spacing_ms) in bench.stack.fakes_spaced.iter().zip(EVENT_SPACINGS_MS) {
        let run = fresh_relay::SpacedRun {
            rep,
            fake,
            spacing_ms,
        };
        fresh_relay::run(bench, &run, f).await?;
    }
    Ok(())
}

/// `<name>_added` = relay − direct of this repetition.
pub fn added(f: &mut Figures, name: &str) {
    let relay = f.last(&format!("{name}_relay"));
    let direct = f.last(&format!("{name}_direct"));
    if let (Some(r), Some(d)) = (relay, direct) {
        f.push(&format!("{name}_added"), r - d);
    }
}
