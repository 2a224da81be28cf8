//! DynamoDB round-trip counting: the relay's debug counter
//! (`GET /__relay/stats`, on with `RELAY_DEBUG_STATS=1`), and the phase that
//! reads it around each request.

use std::sync::OnceLock;

use anyhow::Context;

use super::Bench;
use crate::report::Figures;
use crate::stats::percentile;

/// One client for the stats endpoint: building one per call would cost
/// milliseconds (root certificates) between measured requests.
fn stats_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap_or_default()
    })
}

/// The relay's count of DynamoDB round trips so far. The relay answers
/// once the settlements of answered requests are done, so reading it also
/// waits for them.
pub async fn round_trips(base: &str) -> anyhow::Result<u64> {
    let stats: serde_json::Value = stats_client()
        .get(format!("{base}/__relay/stats"))
        .send()
        .await?
        .error_for_status()
        .context("GET /__relay/stats (RELAY_DEBUG_STATS=1)")?
        .json()
        .await?;
    stats["dynamodb_round_trips"]
        .as_u64()
        .context("stats without dynamodb_round_trips")
}

/// The counter read around each request: the hot path's calls exactly,
/// and how often a request needs more (the key record is re-read when its
/// 10 s cache entry expires).
pub async fn calls_per_request(bench: &Bench<'_>, f: &mut Figures) -> anyhow::Result<()> {
    let o = bench.options;
    let relay = &bench.stack.relay_ep;
    let base = &bench.stack.relay.base_url;
    for (kind, streamed) in [("json", false), ("stream", true)] {
        let mut calls = Vec::with_capacity(o.counted_requests);
        for _ in 0..o.counted_requests {
            let before = round_trips(base).await?;
            if streamed {
                bench.client.stream(relay).await?;
            } else {
                bench.client.json(relay).await?;
            }
            calls.push((round_trips(base).await? - before) as f64);
        }
        f.push(
            &format!("ddb_calls_{kind}_median"),
            percentile(&calls, 50.0),
        );
        f.push(&format!("ddb_calls_{kind}_max"), percentile(&calls, 100.0));
    }
    Ok(())
}
