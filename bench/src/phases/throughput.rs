//! Throughput at concurrency 32 from `wrk`: requests per second and wrk's
//! latency percentiles per side, with the CPU per request of every process
//! involved (relay, DynamoDB Local, fake, wrk itself) and the relay's
//! DynamoDB round trips and memory right after the load.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::round_trips::round_trips;
use super::{Bench, Side};
use crate::procfs::{self, CpuMark};
use crate::report::Figures;
use crate::services::Service;
use crate::wrk::WrkResult;
use crate::{FAKE_KEY, client, wrk};

/// wrk's lua scripts: the bench request with the relay's key or the fake's.
pub struct WrkScripts {
    pub relay: PathBuf,
    pub direct: PathBuf,
}

impl WrkScripts {
    pub fn write(dir: &Path, relay_key: &str) -> anyhow::Result<WrkScripts> {
        let body = client::request_body(false);
        let mut headers = client::claude_code_headers();
        let scripts = WrkScripts {
            relay: dir.join("wrk-relay.lua"),
            direct: dir.join("wrk-direct.lua"),
        };
        headers.push(("x-api-key".into(), relay_key.into()));
        wrk::write_script(&scripts.relay, client::PATH, &headers, &body)?;
        headers.pop();
        headers.push(("x-api-key".into(), FAKE_KEY.into()));
        wrk::write_script(&scripts.direct, client::PATH, &headers, &body)?;
        Ok(scripts)
    }
}

/// Both sides under wrk in turn; `fake` is this repetition's direct fake.
pub async fn run(
    bench: &Bench<'_>,
    fake: &Service,
    sides: [Side; 2],
    f: &mut Figures,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs(bench.options.wrk_seconds);
    let stack = &bench.stack;
    let (relay_pid, dynamo_pid) = (stack.relay.pid, stack.dynamo.pid);
    let ticks = bench.ticks_per_second;
    for side in sides {
        let (script, url, fake_pid) = match side {
            Side::Relay => (
                &bench.scripts.relay,
                &stack.relay.base_url,
                stack.fake_behind.pid,
            ),
            Side::Direct => (&bench.scripts.direct, &fake.base_url, fake.pid),
        };
        let calls = if side == Side::Relay {
            Some(round_trips(url).await?)
        } else {
            None
        };
        let mark = CpuMark::take(&[relay_pid, dynamo_pid, fake_pid])?;
        let children = procfs::children_cpu_ticks()?;
        let result = wrk::run(script, url, 32, 2, duration).await?;
        let side = side.name();
        result.ensure_clean(&format!("wrk against the {side}"))?;
        let n = result.requests;
        push_wrk_figures(f, side, &result);
        f.push(
            &format!("cpu_fake_c32_{side}"),
            mark.per_request(fake_pid, n, ticks)?,
        );
        let wrk_ticks = procfs::children_cpu_ticks()?.saturating_sub(children);
        f.push(
            &format!("cpu_wrk_{side}"),
            wrk_ticks as f64 * 1000.0 / ticks / n.max(1) as f64,
        );
        if let Some(before) = calls {
            let after = round_trips(url).await?;
            f.push("ddb_calls_c32", (after - before) as f64 / n.max(1) as f64);
            f.push("cpu_relay_c32", mark.per_request(relay_pid, n, ticks)?);
            f.push("cpu_ddb_c32", mark.per_request(dynamo_pid, n, ticks)?);
            f.push("rss_load", procfs::status_mb(relay_pid, "VmRSS")?);
        }
    }
    Ok(())
}

fn push_wrk_figures(f: &mut Figures, side: &str, result: &WrkResult) {
    f.push(&format!("rps_{side}"), result.requests_per_second);
    f.push(&format!("wrk_p50_{side}"), result.p50_ms);
    f.push(&format!("wrk_p99_{side}"), result.p99_ms);
}
