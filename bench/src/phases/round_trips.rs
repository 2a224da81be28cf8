//! DynamoDB round-trip and capacity counting: the relay's debug counters
//! (`GET /__relay/stats`, on with `RELAY_DEBUG_STATS=1`), and the phase that
//! reads them around each request.

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

/// What the relay's DynamoDB client has done so far: requests sent, and
/// the capacity units DynamoDB reported for them.
#[derive(Clone, Copy)]
pub struct DynamoStats {
    pub round_trips: u64,
    pub read_units: f64,
    pub write_units: f64,
}

impl DynamoStats {
    /// Read and write units consumed since `before`.
    pub fn units_since(&self, before: &DynamoStats) -> (f64, f64) {
        (
            self.read_units - before.read_units,
            self.write_units - before.write_units,
        )
    }
}

/// The relay's counts so far. The relay answers once the settlements of
/// answered requests are done, so reading them also waits for those.
pub async fn dynamo_stats(base: &str) -> anyhow::Result<DynamoStats> {
    let stats: serde_json::Value = stats_client()
        .get(format!("{base}/__relay/stats"))
        .send()
        .await?
        .error_for_status()
        .context("GET /__relay/stats (RELAY_DEBUG_STATS=1)")?
        .json()
        .await?;
    let units = |name: &str| {
        stats[name]
            .as_f64()
            .with_context(|| format!("stats without {name}"))
    };
    Ok(DynamoStats {
        round_trips: stats["dynamodb_round_trips"]
            .as_u64()
            .context("stats without dynamodb_round_trips")?,
        read_units: units("dynamodb_read_units")?,
        write_units: units("dynamodb_write_units")?,
    })
}

/// The relay's count of DynamoDB round trips so far (see [`dynamo_stats`]).
pub async fn round_trips(base: &str) -> anyhow::Result<u64> {
    Ok(dynamo_stats(base).await?.round_trips)
}

/// The counters read around each request: the hot path's calls exactly,
/// and how often a request needs more (the key record is re-read when its
/// 10 s cache entry expires); and the capacity units one non-streamed
/// request consumes (admission and settlement, the dollar limits checked).
pub async fn calls_per_request(bench: &Bench<'_>, f: &mut Figures) -> anyhow::Result<()> {
    let o = bench.options;
    let relay = &bench.stack.relay_ep;
    let base = &bench.stack.relay.base_url;
    for (kind, streamed) in [("json", false), ("stream", true)] {
        let mut calls = Vec::with_capacity(o.counted_requests);
        let mut read_units = Vec::with_capacity(o.counted_requests);
        let mut write_units = Vec::with_capacity(o.counted_requests);
        for _ in 0..o.counted_requests {
            let before = dynamo_stats(base).await?;
            if streamed {
                bench.client.stream(relay).await?;
            } else {
                bench.client.json(relay).await?;
            }
            let after = dynamo_stats(base).await?;
            calls.push((after.round_trips - before.round_trips) as f64);
            let (read, write) = after.units_since(&before);
            read_units.push(read);
            write_units.push(write);
        }
        f.push(
            &format!("ddb_calls_{kind}_median"),
            percentile(&calls, 50.0),
        );
        f.push(&format!("ddb_calls_{kind}_max"), percentile(&calls, 100.0));
        if !streamed {
            f.push("ddb_rcu_json_median", percentile(&read_units, 50.0));
            f.push("ddb_wcu_json_median", percentile(&write_units, 50.0));
        }
    }
    Ok(())
}
