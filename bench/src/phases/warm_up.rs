//! Warm-up before the first repetition: both sides' c=1 and c=32 paths
//! exercised once, unmeasured, so that caches, connections and allocators
//! are in their steady state when measuring starts.

use std::time::Duration;

use super::Bench;
use crate::{stack, wrk};

pub async fn run(bench: &Bench<'_>) -> anyhow::Result<()> {
    let o = bench.options;
    let client = &bench.client;
    let relay = &bench.stack.relay_ep;
    let fake = stack::start_direct_fake(&bench.binaries.fake, &bench.state_dir).await?;
    let direct = stack::direct_endpoint(&fake);
    for _ in 0..o.json_requests / 2 {
        client.json(relay).await?;
        client.json(&direct).await?;
    }
    for _ in 0..o.stream_requests / 2 {
        client.stream(relay).await?;
        client.stream(&direct).await?;
    }
    let seconds = Duration::from_secs(2.min(o.wrk_seconds));
    for (script, url) in [
        (&bench.scripts.relay, &bench.stack.relay.base_url),
        (&bench.scripts.direct, &fake.base_url),
    ] {
        wrk::run(script, url, 32, 2, seconds)
            .await?
            .ensure_clean(&format!("warm-up wrk against {url}"))?;
    }
    fake.stop().await;
    Ok(())
}
