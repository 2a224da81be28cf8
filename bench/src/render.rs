//! The printed report: its heading (date, machine, load, run size) and its
//! rows, in order: the measures over the repetitions, the SSE timing per
//! event spacing, then the criterion micro-benchmarks' headline numbers.

use std::time::Duration;

use crate::EVENT_SPACINGS_MS;
use crate::options::Options;
use crate::report::{self, Figures, Row, Target};

/// What the heading reports about the run besides the options.
pub struct Heading<'a> {
    pub body_len: usize,
    pub elapsed: Duration,
    /// `load_average()` taken before the run.
    pub load_before: &'a str,
}

/// The whole report: heading, then one markdown table.
pub fn report(o: &Options, f: &Figures, heading: &Heading<'_>) -> String {
    let mut out = heading_text(o, heading);
    let mut rows = measure_rows(f);
    rows.extend(sse_rows(f));
    rows.extend(micro_rows(o));
    out.push_str(&report::table(&rows));
    out
}

fn heading_text(o: &Options, h: &Heading<'_>) -> String {
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(
        "\n## make bench — {date}\n\nMachine: {}; load average before the run {}. {} repetitions, relay and direct interleaved; cells are median (min–max) over repetitions. \
         Request: `POST /v1/messages?beta=true`, Claude Code headers, {}-byte body, on a `{}`-mode key with dollar limits and a token limit; \
         c=1 phases {} non-streamed and {} streamed requests per side, c=32 phases {} s of wrk per side. Took {:.0} s.\n\n",
        machine(),
        h.load_before,
        o.reps,
        h.body_len,
        o.limit_mode,
        o.json_requests,
        o.stream_requests,
        o.wrk_seconds,
        h.elapsed.as_secs_f64(),
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or_else(|| "?".into(), |kb| format!("{:.1}", kb / 1024.0 / 1024.0));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores (nproc), {cpu}, {memory_gib} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// The 1-, 5- and 15-minute load averages: other work on the machine skews
/// every figure, so the report shows what it was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// One row of the main table: the relay series, the direct one (`""`: none)
/// and a target on the relay median.
struct Measure {
    measure: &'static str,
    relay: &'static str,
    direct: &'static str,
    target: Option<Target>,
}

const fn measure(measure: &'static str, relay: &'static str, direct: &'static str) -> Measure {
    Measure {
        measure,
        relay,
        direct,
        target: None,
    }
}

const fn at_most(target: f64, measure: &'static str, relay: &'static str) -> Measure {
    Measure {
        measure,
        relay,
        direct: "",
        target: Some(Target::AtMost(target)),
    }
}

/// The main table's rows, in print order.
const MEASURES: &[Measure] = &[
    measure(
        "latency p50, non-streamed, c=1 (ms)",
        "lat_p50_relay",
        "lat_p50_direct",
    ),
    measure(
        "latency p99, non-streamed, c=1 (ms)",
        "lat_p99_relay",
        "lat_p99_direct",
    ),
    at_most(
        3.0,
        "added latency p50, relay − direct (ms, incl. its DynamoDB round trips)",
        "lat_p50_added",
    ),
    measure(
        "added latency p99, relay − direct (ms)",
        "lat_p99_added",
        "",
    ),
    measure(
        "latency p50, c=1, each request sent once the previous one is settled (ms)",
        "lat_settled_p50_relay",
        "lat_settled_p50_direct",
    ),
    measure(
        "added latency p50, same (ms, as one Lambda environment serves a client)",
        "lat_settled_p50_added",
        "",
    ),
    measure(
        "time to last byte p50, streamed, c=1 (ms)",
        "ttlb_p50_relay",
        "ttlb_p50_direct",
    ),
    measure(
        "time to last byte p99, streamed, c=1 (ms)",
        "ttlb_p99_relay",
        "ttlb_p99_direct",
    ),
    measure(
        "throughput, non-streamed, c=32, wrk (req/s)",
        "rps_relay",
        "rps_direct",
    ),
    measure(
        "wrk latency p50 at c=32 (ms)",
        "wrk_p50_relay",
        "wrk_p50_direct",
    ),
    measure(
        "wrk latency p99 at c=32 (ms)",
        "wrk_p99_relay",
        "wrk_p99_direct",
    ),
    at_most(
        0.25,
        "relay CPU per request, c=32 (ms, excl. DynamoDB Local)",
        "cpu_relay_c32",
    ),
    at_most(0.25, "relay CPU per request, c=1 (ms)", "cpu_relay_c1"),
    measure(
        "DynamoDB Local CPU per relayed request, c=32 (ms)",
        "cpu_ddb_c32",
        "",
    ),
    measure(
        "DynamoDB Local CPU per relayed request, c=1 (ms)",
        "cpu_ddb_c1",
        "",
    ),
    measure(
        "fake upstream CPU per request, c=32 (ms)",
        "cpu_fake_c32_relay",
        "cpu_fake_c32_direct",
    ),
    measure(
        "wrk's own CPU per request, c=32 (ms)",
        "cpu_wrk_relay",
        "cpu_wrk_direct",
    ),
    at_most(
        2.0,
        "DynamoDB round trips of one non-streamed request, known key: median",
        "ddb_calls_json_median",
    ),
    at_most(
        2.0,
        "DynamoDB round trips of one streamed request, known key: median",
        "ddb_calls_stream_median",
    ),
    measure(
        "DynamoDB round trips of one non-streamed request: most seen",
        "ddb_calls_json_max",
        "",
    ),
    measure(
        "DynamoDB round trips of one streamed request: most seen",
        "ddb_calls_stream_max",
        "",
    ),
    measure(
        "DynamoDB round trips per request, mean over the c=1 non-streamed phase",
        "ddb_calls_json_mean",
        "",
    ),
    measure(
        "DynamoDB read capacity units of one non-streamed request, known key: median",
        "ddb_rcu_json_median",
        "",
    ),
    measure(
        "DynamoDB write capacity units of one non-streamed request, known key: median",
        "ddb_wcu_json_median",
        "",
    ),
    measure(
        "DynamoDB read capacity units per request, mean over the c=1 non-streamed phase",
        "ddb_rcu_json_mean",
        "",
    ),
    measure(
        "DynamoDB write capacity units per request, mean over the c=1 non-streamed phase",
        "ddb_wcu_json_mean",
        "",
    ),
    measure(
        "DynamoDB round trips per request, mean over the c=1 streamed phase",
        "ddb_calls_stream_mean",
        "",
    ),
    measure(
        "DynamoDB round trips per request, mean at c=32 (incl. conflict retries)",
        "ddb_calls_c32",
        "",
    ),
    measure(
        "DynamoDB round trips, first request of a fresh process",
        "ddb_calls_cold",
        "",
    ),
    measure(
        "admission UpdateItem on DynamoDB Local, p50 (ms, relay's code, c=1)",
        "store_admit_p50",
        "",
    ),
    measure(
        "settlement TransactWriteItems on DynamoDB Local, p50 (ms, relay's code, c=1)",
        "store_settle_p50",
        "",
    ),
    measure("relay RSS idle after start (MB)", "rss_idle", ""),
    measure("relay RSS idle after warm-up (MB)", "rss_idle_warm", ""),
    at_most(
        30.0,
        "relay RSS right after c=32 load (MB, VmRSS)",
        "rss_load",
    ),
    at_most(30.0, "relay RSS peak over the run (MB, VmHWM)", "rss_peak"),
    at_most(
        100.0,
        "start-up: exec → first answered request (ms)",
        "startup_hello",
    ),
    measure(
        "start-up: exec → answering, + first proxied request (cold caches) (ms)",
        "startup_proxied",
        "",
    ),
];

fn measure_rows(f: &Figures) -> Vec<Row> {
    MEASURES
        .iter()
        .map(|m| {
            let series = |name: &str| (!name.is_empty()).then(|| name.to_owned());
            // Call counts: whole numbers, and means with more digits;
            // capacity units come in halves (eventually consistent reads).
            let decimals = if m.relay.ends_with("_mean") || m.relay == "ddb_calls_c32" {
                Some(3)
            } else if m.relay.starts_with("ddb_calls_") {
                Some(0)
            } else if m.relay.starts_with("ddb_rcu_") || m.relay.starts_with("ddb_wcu_") {
                Some(1)
            } else {
                None
            };
            Row::of(
                f,
                m.measure,
                series(m.relay).as_deref(),
                series(m.direct).as_deref(),
                m.target,
                decimals,
            )
        })
        .collect()
}

/// Per spacing: relay against direct, then the two "added" figures.
fn sse_rows(f: &Figures) -> Vec<Row> {
    let mut rows = Vec::new();
    for spacing in EVENT_SPACINGS_MS {
        let label = |what: &str| format!("SSE events {spacing} ms apart: {what}");
        let series = |what: &str| format!("sse{spacing}_{what}");
        for (what, name) in [
            ("lateness vs the fake's schedule, p50 (ms)", "p50"),
            ("lateness, p99 (ms)", "p99"),
            (
                "each event's delay, fake's write → client, p50 (ms)",
                "delay_p50",
            ),
            ("each event's delay, p99 (ms)", "delay_p99"),
        ] {
            rows.push(Row::of(
                f,
                &label(what),
                Some(&series(&format!("{name}_relay"))),
                Some(&series(&format!("{name}_direct"))),
                None,
                None,
            ));
        }
        for (what, name) in [
            (
                "added per-event delay p50, relay − direct (ms)",
                "delay_p50_added",
            ),
            (
                "added per-event delay p99, relay − direct (ms)",
                "delay_p99_added",
            ),
        ] {
            rows.push(Row::of(
                f,
                &label(what),
                Some(&series(name)),
                None,
                Some(Target::AtMost(1.0)),
                None,
            ));
        }
    }
    rows
}

/// The criterion results `make bench` ran before, by benchmark id.
const MICRO: [(&str, &str); 6] = [
    (
        "sse_usage/parser_claude_code_stream",
        "SseUsageParser, Claude Code stream in 1–4 KB chunks",
    ),
    (
        "sse_usage/tap_claude_code_stream",
        "UsageTap (the proxy's per-chunk path), same stream",
    ),
    (
        "key/parse_hash_verify",
        "PresentedKey::parse + hash() + SecretHash::matches",
    ),
    ("key/parse", "PresentedKey::parse alone"),
    ("key/hash", "SHA-256 of the secret alone"),
    (
        "check_access/allowlists_pass",
        "check_access, IP/origin/model allowlists, passing",
    ),
];

fn micro_rows(o: &Options) -> Vec<Row> {
    let micro = report::criterion_results(&o.criterion_dir);
    MICRO
        .iter()
        .map(|(id, what)| {
            let value = match micro.get(*id) {
                None => "not run (cargo bench -p relay-shared)".to_owned(),
                Some(m) => match m.bytes {
                    Some(bytes) => format!(
                        "{} per {:.0} KB stream = {:.0} MB/s",
                        report::duration_text(m.median_ns),
                        bytes as f64 / 1024.0,
                        bytes as f64 / m.median_ns * 1e9 / 1e6
                    ),
                    None => report::duration_text(m.median_ns),
                },
            };
            Row::text(&format!("criterion: {what}"), value)
        })
        .collect()
}
