//! Latency at concurrency 1: non-streamed answers back to back, the same
//! with each request sent once the previous one is settled, and streamed
//! answers' time to last byte; with the relay's DynamoDB round trips,
//! capacity units and CPU per request over the same runs.

use super::round_trips::{dynamo_stats, round_trips};
use super::{Bench, Side, added};
use crate::client::Endpoint;
use crate::procfs::CpuMark;
use crate::report::Figures;
use crate::stats::percentile;

/// Non-streamed latency, back to back.
pub async fn non_streamed(
    bench: &Bench<'_>,
    direct: &Endpoint,
    sides: [Side; 2],
    f: &mut Figures,
) -> anyhow::Result<()> {
    let o = bench.options;
    let relay_base = &bench.stack.relay.base_url;
    let relay_pid = bench.stack.relay.pid;
    let dynamo_pid = bench.stack.dynamo.pid;
    let ticks = bench.ticks_per_second;
    for side in sides {
        let to = side.endpoint(bench, direct);
        let calls = if side == Side::Relay {
            Some(dynamo_stats(relay_base).await?)
        } else {
            None
        };
        let mark = CpuMark::take(&[relay_pid, dynamo_pid])?;
        let mut samples = Vec::with_capacity(o.json_requests);
        for _ in 0..o.json_requests {
            samples.push(bench.client.json(to).await?);
        }
        let side = side.name();
        f.push(&format!("lat_p50_{side}"), percentile(&samples, 50.0));
        f.push(&format!("lat_p99_{side}"), percentile(&samples, 99.0));
        if let Some(before) = calls {
            let n = o.json_requests as u64;
            let after = dynamo_stats(relay_base).await?;
            let per_request = |total: f64| total / n as f64;
            f.push(
                "ddb_calls_json_mean",
                per_request((after.round_trips - before.round_trips) as f64),
            );
            let (read, write) = after.units_since(&before);
            f.push("ddb_rcu_json_mean", per_request(read));
            f.push("ddb_wcu_json_mean", per_request(write));
            f.push("cpu_relay_c1", mark.per_request(relay_pid, n, ticks)?);
            f.push("cpu_ddb_c1", mark.per_request(dynamo_pid, n, ticks)?);
        }
    }
    added(f, "lat_p50");
    added(f, "lat_p99");
    Ok(())
}

/// The same, but each request waits until the previous one's settlement
/// is done, as in Lambda, where the settle extension holds the environment
/// until then: back to back, the previous settlement's transaction still
/// occupies DynamoDB Local (on these same two cores) when the next
/// admission arrives.
pub async fn settled(
    bench: &Bench<'_>,
    direct: &Endpoint,
    sides: [Side; 2],
    f: &mut Figures,
) -> anyhow::Result<()> {
    let requests = bench.options.json_requests / 2;
    for side in sides {
        let to = side.endpoint(bench, direct);
        let mut samples = Vec::with_capacity(requests);
        for _ in 0..requests {
            round_trips(&bench.stack.relay.base_url).await?;
            samples.push(bench.client.json(to).await?);
        }
        f.push(
            &format!("lat_settled_p50_{}", side.name()),
            percentile(&samples, 50.0),
        );
    }
    added(f, "lat_settled_p50");
    Ok(())
}

/// Streamed answers, time to last byte.
pub async fn streamed(
    bench: &Bench<'_>,
    direct: &Endpoint,
    sides: [Side; 2],
    f: &mut Figures,
) -> anyhow::Result<()> {
    let o = bench.options;
    let relay_base = &bench.stack.relay.base_url;
    for side in sides {
        let to = side.endpoint(bench, direct);
        let calls = if side == Side::Relay {
            Some(round_trips(relay_base).await?)
        } else {
            None
        };
        let mut samples = Vec::with_capacity(o.stream_requests);
        for _ in 0..o.stream_requests {
            samples.push(bench.client.stream(to).await?);
        }
        let side = side.name();
        f.push(&format!("ttlb_p50_{side}"), percentile(&samples, 50.0));
        f.push(&format!("ttlb_p99_{side}"), percentile(&samples, 99.0));
        if let Some(before) = calls {
            let after = round_trips(relay_base).await?;
            f.push(
                "ddb_calls_stream_mean",
                (after - before) as f64 / o.stream_requests as f64,
            );
        }
    }
    added(f, "ttlb_p50");
    Ok(())
}
