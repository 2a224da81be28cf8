//! `make bench`: the relay (`relay-local`, release build, on DynamoDB Local)
//! against the fake Anthropic upstream served directly, phase by phase,
//! relay and direct interleaved over several repetitions; prints one
//! markdown table (medians and ranges, targets) with the criterion
//! micro-benchmarks' headline numbers.
//!
//! Everything runs on 127.0.0.1; every loop is bounded in count and time.

mod client;
mod procfs;
mod report;
mod services;
mod stats;
mod wrk;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use relay_shared::domain::key::PresentedKey;
use relay_shared::domain::usage::TokenUsage;
use relay_shared::domain::usage::UsageRecord;
use relay_shared::store::Store;

use client::{Client, Endpoint, ms};
use report::{Figures, Row, Target};
use services::{Dynamo, Service};
use stats::percentile;

/// The fake's upstream key (tests/src/fake_upstream.rs `DEFAULT_API_KEY`).
const FAKE_KEY: &str = "sk-ant-fake-upstream-key";
/// The fakes' pauses between SSE events in the streaming-delay phases: the
/// issue's 100 ms, and 10 ms, nearer real token streams, where a sender
/// that lets Nagle's algorithm wait for the client's delayed ACK (up to
/// 40 ms) shows.
const EVENT_SPACINGS_MS: [u64; 2] = [100, 10];
const TIER_REQUESTS: u64 = 1_000_000_000;
const TIER_PERIOD: u64 = 60;

struct Options {
    root: PathBuf,
    bin_dir: PathBuf,
    state_dir: PathBuf,
    criterion_dir: PathBuf,
    reps: usize,
    json_requests: usize,
    stream_requests: usize,
    store_calls: usize,
    counted_requests: usize,
    wrk_seconds: u64,
    sse_streams: usize,
}

const USAGE: &str = "usage: relay-bench [--reps N] [--quick] [--root DIR] [--bin-dir DIR] [--state-dir DIR] [--criterion-dir DIR]";

impl Options {
    fn parse() -> anyhow::Result<Options> {
        let root = std::env::current_dir()?;
        let mut options = Options {
            bin_dir: root.join("target/release"),
            state_dir: root.join(".cache/run-bench"),
            criterion_dir: root.join("target/criterion"),
            root,
            reps: 5,
            json_requests: 400,
            stream_requests: 200,
            store_calls: 100,
            counted_requests: 50,
            wrk_seconds: 6,
            sse_streams: 8,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || {
                args.next()
                    .with_context(|| format!("{arg} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--reps" => options.reps = value()?.parse().context("--reps")?,
                "--root" => options.root = PathBuf::from(value()?),
                "--bin-dir" => options.bin_dir = PathBuf::from(value()?),
                "--state-dir" => options.state_dir = PathBuf::from(value()?),
                "--criterion-dir" => options.criterion_dir = PathBuf::from(value()?),
                "--quick" => {
                    // A smoke run of the whole pipeline: not for figures.
                    options.reps = 1;
                    options.json_requests = 40;
                    options.stream_requests = 20;
                    options.store_calls = 10;
                    options.counted_requests = 10;
                    options.wrk_seconds = 1;
                    options.sse_streams = 2;
                }
                _ => bail!("unknown argument {arg}\n{USAGE}"),
            }
        }
        if !(1..=20).contains(&options.reps) {
            bail!("--reps must be between 1 and 20");
        }
        Ok(options)
    }
}

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

/// Everything one repetition of the relay needs to know about the stack.
struct Stack {
    relay: Service,
    relay_ep: Endpoint,
    /// Fake upstream behind the main relay.
    fake_behind: Service,
    /// Fake upstreams with spaced SSE events (`EVENT_SPACINGS_MS`), for the
    /// streaming-delay phases.
    fakes_spaced: Vec<Service>,
    dynamo_pid: u32,
    relay_env: Vec<(String, String)>,
    relay_key: String,
    store: Store,
}

async fn run(o: &Options) -> anyhow::Result<()> {
    let relay_bin = o.bin_dir.join("relay-local");
    let fake_bin = o.bin_dir.join("fake-upstream");
    for bin in [&relay_bin, &fake_bin] {
        if !bin.is_file() {
            bail!(
                "{} is missing: `make bench` builds it (or `cargo build --release -p relay-local` and `cargo build --release -p relay-tests --bin fake-upstream`)",
                bin.display()
            );
        }
    }
    std::fs::create_dir_all(&o.state_dir)?;
    let state_dir = std::fs::canonicalize(&o.state_dir)?;
    let started = Instant::now();
    let load_before = load_average();
    let deadline = started + Duration::from_secs(30 * 60);
    let ticks = procfs::clock_ticks_per_second() as f64;

    progress("starting DynamoDB Local");
    let dynamo = Dynamo::start(&o.root, &state_dir)?;
    let fake_behind = services::start_fake(
        &fake_bin,
        0,
        &state_dir.join("fake-behind.log"),
        "fake behind relay",
    )
    .await?;
    let mut fakes_spaced = Vec::new();
    for spacing in EVENT_SPACINGS_MS {
        fakes_spaced.push(
            services::start_fake(
                &fake_bin,
                spacing,
                &state_dir.join(format!("fake-spaced-{spacing}ms.log")),
                "fake with spaced events",
            )
            .await?,
        );
    }

    // A fresh table per run: a DynamoDB Local left running keeps old ones.
    let table = format!("relay-bench-{}", std::process::id());
    let password = format!("bench-{}", PresentedKey::generate().id());
    let relay_env: Vec<(String, String)> = [
        ("TABLE_NAME", table.as_str()),
        ("DYNAMODB_ENDPOINT", dynamo.endpoint.as_str()),
        ("ADMIN_USERNAME", "admin"),
        ("ADMIN_PASSWORD", password.as_str()),
        ("SECRET_KEY", "bench-jwt-secret-0123456789abcdef0123456789"),
        ("UPSTREAM_API_KEY", FAKE_KEY),
        ("RELAY_DEBUG_STATS", "1"),
        // As in Lambda: one EMF metrics line per request (to the log file).
        ("METRICS", "emf"),
        ("RUST_LOG", "info"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "local"),
        ("AWS_SECRET_ACCESS_KEY", "local"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("NO_PROXY", "127.0.0.1,localhost"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();

    progress("starting the relay");
    let mut env = relay_env.clone();
    env.push(("UPSTREAM_BASE_URL".into(), fake_behind.base_url.clone()));
    let (relay, first_startup) = services::start_relay(
        &relay_bin,
        &env,
        services::free_port()?,
        &state_dir.join("relay.log"),
        "relay",
    )
    .await?;
    let admin_http = reqwest::Client::builder().no_proxy().build()?;
    let relay_key = create_key(&admin_http, &relay.base_url, &password).await?;
    let store = bench_store(&dynamo.endpoint, &table);
    let relay_ep = Endpoint {
        label: "relay",
        base_url: relay.base_url.clone(),
        api_key: relay_key.clone(),
    };
    let mut figures = Figures::default();
    figures.push("startup_hello", ms(first_startup));
    figures.push("rss_idle", procfs::status_mb(relay.pid, "VmRSS")?);

    let stack = Stack {
        relay,
        relay_ep,
        fake_behind,
        fakes_spaced,
        dynamo_pid: dynamo.pid,
        relay_env,
        relay_key,
        store,
    };
    let client = Client::new()?;
    let body_len = client.body_len();
    let scripts = WrkScripts::write(&state_dir, &stack.relay_key)?;

    progress("warming up");
    warm_up(o, &stack, &client, &fake_bin, &state_dir, &scripts).await?;
    figures.push(
        "rss_idle_warm",
        procfs::status_mb(stack.relay.pid, "VmRSS")?,
    );

    for rep in 0..o.reps {
        if Instant::now() > deadline {
            bail!("the bench ran over 30 minutes; stopping");
        }
        progress(&format!("repetition {} of {}", rep + 1, o.reps));
        repetition(
            o,
            rep,
            &stack,
            &client,
            &fake_bin,
            &relay_bin,
            &state_dir,
            &scripts,
            ticks,
            &mut figures,
        )
        .await?;
    }
    figures.push("rss_after", procfs::status_mb(stack.relay.pid, "VmRSS")?);
    figures.push("rss_peak", procfs::status_mb(stack.relay.pid, "VmHWM")?);

    let text = render(o, &figures, body_len, started.elapsed(), &load_before);
    std::fs::write(state_dir.join("report.md"), &text)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    drop(stdout);

    let Stack {
        relay,
        fake_behind,
        fakes_spaced,
        ..
    } = stack;
    relay.stop().await;
    fake_behind.stop().await;
    for fake in fakes_spaced {
        fake.stop().await;
    }
    drop(dynamo);
    progress(&format!(
        "done in {:.0} s; report also in {}",
        started.elapsed().as_secs_f64(),
        state_dir.join("report.md").display()
    ));
    Ok(())
}

/// Logs in as admin, creates the `bench` tier (no throttling at c=32) and a
/// key on it; returns the key.
async fn create_key(http: &reqwest::Client, base: &str, password: &str) -> anyhow::Result<String> {
    let login: serde_json::Value = http
        .post(format!("{base}/admin/login"))
        .basic_auth("admin", Some(password))
        .send()
        .await?
        .error_for_status()
        .context("admin login")?
        .json()
        .await?;
    let token = login["access_token"]
        .as_str()
        .context("login answered no access_token")?
        .to_owned();
    http.put(format!("{base}/admin/tiers/bench"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"requests": TIER_REQUESTS, "period": TIER_PERIOD}))
        .send()
        .await?
        .error_for_status()
        .context("PUT /admin/tiers/bench")?;
    let key: serde_json::Value = http
        .post(format!("{base}/admin/api-keys"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": "make bench", "rate_limit_tier": "bench"}))
        .send()
        .await?
        .error_for_status()
        .context("POST /admin/api-keys")?
        .json()
        .await?;
    Ok(key["api_key"]
        .as_str()
        .context("key creation answered no api_key")?
        .to_owned())
}

/// A fake served directly, the side the relay is compared with.
async fn start_direct_fake(fake_bin: &Path, state_dir: &Path) -> anyhow::Result<Service> {
    services::start_fake(
        fake_bin,
        0,
        &state_dir.join("fake-direct.log"),
        "fake direct",
    )
    .await
}

/// The relay's own store code, pointed at the same table, to time its two
/// hot-path writes from outside the relay.
fn bench_store(endpoint: &str, table: &str) -> Store {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("local", "local", None, None, "bench"))
        .endpoint_url(endpoint)
        .build();
    Store::new(aws_sdk_dynamodb::Client::from_conf(config), table)
}

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

async fn round_trips(base: &str) -> anyhow::Result<u64> {
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

struct WrkScripts {
    relay: PathBuf,
    direct: PathBuf,
}

impl WrkScripts {
    fn write(dir: &Path, relay_key: &str) -> anyhow::Result<WrkScripts> {
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

fn direct_endpoint(fake: &Service) -> Endpoint {
    Endpoint {
        label: "fake direct",
        base_url: fake.base_url.clone(),
        api_key: FAKE_KEY.into(),
    }
}

async fn warm_up(
    o: &Options,
    stack: &Stack,
    client: &Client,
    fake_bin: &Path,
    state_dir: &Path,
    scripts: &WrkScripts,
) -> anyhow::Result<()> {
    let fake = start_direct_fake(fake_bin, state_dir).await?;
    let direct = direct_endpoint(&fake);
    for _ in 0..o.json_requests / 2 {
        client.json(&stack.relay_ep).await?;
        client.json(&direct).await?;
    }
    for _ in 0..o.stream_requests / 2 {
        client.stream(&stack.relay_ep).await?;
        client.stream(&direct).await?;
    }
    let seconds = Duration::from_secs(2.min(o.wrk_seconds));
    for (script, url) in [
        (&scripts.relay, &stack.relay.base_url),
        (&scripts.direct, &fake.base_url),
    ] {
        wrk::run(script, url, 32, 2, seconds)
            .await?
            .ensure_clean(&format!("warm-up wrk against {url}"))?;
    }
    fake.stop().await;
    Ok(())
}

/// CPU ticks of several processes at one moment.
struct CpuMark(Vec<(u32, u64)>);

impl CpuMark {
    fn take(pids: &[u32]) -> anyhow::Result<CpuMark> {
        pids.iter()
            .map(|&pid| Ok((pid, procfs::cpu_ticks(pid)?)))
            .collect::<anyhow::Result<_>>()
            .map(CpuMark)
    }

    /// Milliseconds of CPU per request of `pid` since this mark.
    fn per_request(&self, pid: u32, requests: u64, ticks_per_second: f64) -> anyhow::Result<f64> {
        let before = self
            .0
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, t)| *t)
            .context("pid not marked")?;
        let after = procfs::cpu_ticks(pid)?;
        Ok((after.saturating_sub(before)) as f64 * 1000.0
            / ticks_per_second
            / requests.max(1) as f64)
    }
}

#[allow(clippy::too_many_arguments)]
async fn repetition(
    o: &Options,
    rep: usize,
    stack: &Stack,
    client: &Client,
    fake_bin: &Path,
    relay_bin: &Path,
    state_dir: &Path,
    scripts: &WrkScripts,
    ticks: f64,
    f: &mut Figures,
) -> anyhow::Result<()> {
    // A fresh fake per repetition for the direct runs: it records every
    // request, and tens of thousands a second would pile up.
    let fake = start_direct_fake(fake_bin, state_dir).await?;
    let direct = direct_endpoint(&fake);
    for _ in 0..50 {
        client.json(&direct).await?;
    }
    let relay = &stack.relay_ep;
    let relay_pid = stack.relay.pid;
    // Alternate which side goes first, so drift (JIT, caches, table growth)
    // does not always favour the same one.
    let sides: [bool; 2] = if rep.is_multiple_of(2) {
        [true, false]
    } else {
        [false, true]
    };

    // Non-streamed latency at concurrency 1.
    for &via_relay in &sides {
        let to = if via_relay { relay } else { &direct };
        let calls = if via_relay {
            Some(round_trips(&stack.relay.base_url).await?)
        } else {
            None
        };
        let mark = CpuMark::take(&[relay_pid, stack.dynamo_pid])?;
        let mut samples = Vec::with_capacity(o.json_requests);
        for _ in 0..o.json_requests {
            samples.push(client.json(to).await?);
        }
        let side = if via_relay { "relay" } else { "direct" };
        f.push(&format!("lat_p50_{side}"), percentile(&samples, 50.0));
        f.push(&format!("lat_p99_{side}"), percentile(&samples, 99.0));
        if let Some(before) = calls {
            let n = o.json_requests as u64;
            let after = round_trips(&stack.relay.base_url).await?;
            f.push("ddb_calls_json_mean", (after - before) as f64 / n as f64);
            f.push("cpu_relay_c1", mark.per_request(relay_pid, n, ticks)?);
            f.push("cpu_ddb_c1", mark.per_request(stack.dynamo_pid, n, ticks)?);
        }
    }
    added(f, "lat_p50");
    added(f, "lat_p99");

    // The same, but each request waits until the previous one's settlement
    // is done, as in Lambda, where the settle extension holds the
    // environment until then: back to back, the previous settlement's
    // transaction still occupies DynamoDB Local (on these same two cores)
    // when the next admission arrives.
    for &via_relay in &sides {
        let to = if via_relay { relay } else { &direct };
        let mut samples = Vec::with_capacity(o.json_requests / 2);
        for _ in 0..o.json_requests / 2 {
            round_trips(&stack.relay.base_url).await?;
            samples.push(client.json(to).await?);
        }
        let side = if via_relay { "relay" } else { "direct" };
        f.push(
            &format!("lat_settled_p50_{side}"),
            percentile(&samples, 50.0),
        );
    }
    added(f, "lat_settled_p50");

    // Streamed answer, time to last byte, concurrency 1.
    for &via_relay in &sides {
        let to = if via_relay { relay } else { &direct };
        let calls = if via_relay {
            Some(round_trips(&stack.relay.base_url).await?)
        } else {
            None
        };
        let mut samples = Vec::with_capacity(o.stream_requests);
        for _ in 0..o.stream_requests {
            samples.push(client.stream(to).await?);
        }
        let side = if via_relay { "relay" } else { "direct" };
        f.push(&format!("ttlb_p50_{side}"), percentile(&samples, 50.0));
        f.push(&format!("ttlb_p99_{side}"), percentile(&samples, 99.0));
        if let Some(before) = calls {
            let after = round_trips(&stack.relay.base_url).await?;
            f.push(
                "ddb_calls_stream_mean",
                (after - before) as f64 / o.stream_requests as f64,
            );
        }
    }
    added(f, "ttlb_p50");

    // DynamoDB calls of each request, one at a time.
    calls_per_request(o, stack, client, f).await?;

    // The relay's two DynamoDB writes, timed from here with its own code.
    store_timing(o, stack, f).await?;

    // Throughput at concurrency 32 from wrk.
    let duration = Duration::from_secs(o.wrk_seconds);
    for &via_relay in &sides {
        let (script, url, fake_pid) = if via_relay {
            (&scripts.relay, &stack.relay.base_url, stack.fake_behind.pid)
        } else {
            (&scripts.direct, &fake.base_url, fake.pid)
        };
        let side = if via_relay { "relay" } else { "direct" };
        let calls = if via_relay {
            Some(round_trips(url).await?)
        } else {
            None
        };
        let mark = CpuMark::take(&[relay_pid, stack.dynamo_pid, fake_pid])?;
        let children = procfs::children_cpu_ticks()?;
        let result = wrk::run(script, url, 32, 2, duration).await?;
        result.ensure_clean(&format!("wrk against the {side}"))?;
        let n = result.requests;
        f.push(&format!("rps_{side}"), result.requests_per_second);
        f.push(&format!("wrk_p50_{side}"), result.p50_ms);
        f.push(&format!("wrk_p99_{side}"), result.p99_ms);
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
            f.push("cpu_ddb_c32", mark.per_request(stack.dynamo_pid, n, ticks)?);
            f.push("rss_load", procfs::status_mb(relay_pid, "VmRSS")?);
        }
    }
    fake.stop().await;

    // Start-up of a fresh relay, then event timing through it (its upstream
    // spaces SSE events) against the same fake served directly; once per
    // spacing.
    for (fake, spacing) in stack.fakes_spaced.iter().zip(EVENT_SPACINGS_MS) {
        startup_and_streaming(
            o, rep, stack, client, relay_bin, state_dir, fake, spacing, f,
        )
        .await?;
    }
    Ok(())
}

/// `<name>_added` = relay − direct of this repetition.
fn added(f: &mut Figures, name: &str) {
    let relay = f.last(&format!("{name}_relay"));
    let direct = f.last(&format!("{name}_direct"));
    if let (Some(r), Some(d)) = (relay, direct) {
        f.push(&format!("{name}_added"), r - d);
    }
}

/// The counter read around each request: the hot path's calls exactly,
/// and how often a request needs more (the key record is re-read when its
/// 10 s cache entry expires).
async fn calls_per_request(
    o: &Options,
    stack: &Stack,
    client: &Client,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let base = &stack.relay.base_url;
    for (kind, streamed) in [("json", false), ("stream", true)] {
        let mut calls = Vec::with_capacity(o.counted_requests);
        for _ in 0..o.counted_requests {
            let before = round_trips(base).await?;
            if streamed {
                client.stream(&stack.relay_ep).await?;
            } else {
                client.json(&stack.relay_ep).await?;
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

async fn store_timing(o: &Options, stack: &Stack, f: &mut Figures) -> anyhow::Result<()> {
    let key = PresentedKey::parse(&stack.relay_key).context("the bench key")?;
    let hash = key.hash();
    let mut window = None;
    let mut admits = Vec::with_capacity(o.store_calls);
    let mut settles = Vec::with_capacity(o.store_calls);
    for i in 0..o.store_calls {
        let now = relay_shared::domain::now();
        let started = Instant::now();
        let record = stack
            .store
            .admit(key.id(), &hash, TIER_REQUESTS, TIER_PERIOD, now, window)
            .await
            .map_err(|e| anyhow::anyhow!("admission: {e}"))?;
        admits.push(ms(started.elapsed()));
        window = record.rate_window.map(|(start, _)| start);
        let usage = UsageRecord {
            request_id: format!("bench_{}_{i}", PresentedKey::generate().id()),
            key_id: key.id().clone(),
            at: now,
            model: Some("claude-sonnet-4-5-20250929".into()),
            method: "POST".into(),
            path: "/v1/messages".into(),
            status: 200,
            stream: false,
            usage: TokenUsage {
                input_tokens: 512,
                output_tokens: 12,
                ..TokenUsage::default()
            },
            estimated: false,
            latency_ms: 5,
            ttfb_ms: Some(3),
            retries: 0,
            client_ip: "127.0.0.1".into(),
            user_agent: Some("relay-bench".into()),
            session_id: None,
            error_type: None,
        };
        let started = Instant::now();
        stack
            .store
            .settle(&usage, Duration::from_secs(86_400))
            .await
            .map_err(|e| anyhow::anyhow!("settle: {e:#}"))?;
        settles.push(ms(started.elapsed()));
    }
    f.push("store_admit_p50", percentile(&admits, 50.0));
    f.push("store_settle_p50", percentile(&settles, 50.0));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn startup_and_streaming(
    o: &Options,
    rep: usize,
    stack: &Stack,
    client: &Client,
    relay_bin: &Path,
    state_dir: &Path,
    fake: &Service,
    spacing_ms: u64,
    f: &mut Figures,
) -> anyhow::Result<()> {
    let mut env = stack.relay_env.clone();
    env.push(("UPSTREAM_BASE_URL".into(), fake.base_url.clone()));
    let port = services::free_port()?;
    let (relay, startup) = services::start_relay(
        relay_bin,
        &env,
        port,
        &state_dir.join(format!("relay-fresh-{rep}-{spacing_ms}ms.log")),
        "fresh relay",
    )
    .await?;
    let relay_ep = Endpoint {
        label: "fresh relay",
        base_url: relay.base_url.clone(),
        api_key: stack.relay_key.clone(),
    };
    // Calls made while starting (the table check), then by the first
    // proxied request, whose caches (key, tier) are cold.
    let startup_calls = round_trips(&relay.base_url).await?;
    let first = client.json(&relay_ep).await?;
    f.push("startup_proxied", ms(startup) + first);
    f.push("startup_hello", ms(startup));
    let stats = round_trips(&relay.base_url).await?;
    f.push("ddb_calls_cold", (stats - startup_calls) as f64);
    for _ in 0..20 {
        client.json(&relay_ep).await?;
    }

    let direct = direct_endpoint(fake);
    // Many short streams at the short spacing, a few long ones at 100 ms.
    let streams =
        o.sse_streams * usize::try_from((100 / spacing_ms.max(1)).clamp(1, 4)).unwrap_or(1);
    let mut relay_lateness = Vec::new();
    let mut direct_lateness = Vec::new();
    let mut relay_delays = Vec::new();
    let mut direct_delays = Vec::new();
    for i in 0..streams * 2 {
        let via_relay = (i + rep).is_multiple_of(2);
        let to = if via_relay { &relay_ep } else { &direct };
        let times = client.event_arrivals(to).await?;
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
        if via_relay {
            relay_lateness.extend(lateness);
            relay_delays.extend(times.stamp_delays);
        } else {
            direct_lateness.extend(lateness);
            direct_delays.extend(times.stamp_delays);
        }
        // The next stream starts once this one's settlement is done, so
        // DynamoDB Local's work for it does not land on the next events.
        if via_relay {
            round_trips(&relay.base_url).await?;
        }
    }
    for (side, lateness, delays) in [
        ("relay", &relay_lateness, &relay_delays),
        ("direct", &direct_lateness, &direct_delays),
    ] {
        for (what, samples) in [("", lateness), ("delay_", delays)] {
            f.push(
                &format!("sse{spacing_ms}_{what}p50_{side}"),
                percentile(samples, 50.0),
            );
            f.push(
                &format!("sse{spacing_ms}_{what}p99_{side}"),
                percentile(samples, 99.0),
            );
        }
    }
    added(f, &format!("sse{spacing_ms}_delay_p50"));
    added(f, &format!("sse{spacing_ms}_delay_p99"));
    relay.stop().await;
    Ok(())
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
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn render(o: &Options, f: &Figures, body_len: usize, elapsed: Duration, load: &str) -> String {
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut out = format!(
        "\n## make bench — {date}\n\nMachine: {}; load average before the run {load}. {} repetitions, relay and direct interleaved; cells are median (min–max) over repetitions. \
         Request: `POST /v1/messages?beta=true`, Claude Code headers, {body_len}-byte body; \
         c=1 phases {} non-streamed and {} streamed requests per side, c=32 phases {} s of wrk per side. Took {:.0} s.\n\n",
        machine(),
        o.reps,
        o.json_requests,
        o.stream_requests,
        o.wrk_seconds,
        elapsed.as_secs_f64(),
    );
    // (measure, relay series, direct series, target on the relay median)
    let spec: Vec<(&str, &str, &str, Option<Target>)> = vec![
        (
            "latency p50, non-streamed, c=1 (ms)",
            "lat_p50_relay",
            "lat_p50_direct",
            None,
        ),
        (
            "latency p99, non-streamed, c=1 (ms)",
            "lat_p99_relay",
            "lat_p99_direct",
            None,
        ),
        (
            "added latency p50, relay − direct (ms, incl. its DynamoDB round trips)",
            "lat_p50_added",
            "",
            Some(Target::AtMost(3.0)),
        ),
        (
            "added latency p99, relay − direct (ms)",
            "lat_p99_added",
            "",
            None,
        ),
        (
            "latency p50, c=1, each request sent once the previous one is settled (ms)",
            "lat_settled_p50_relay",
            "lat_settled_p50_direct",
            None,
        ),
        (
            "added latency p50, same (ms, as one Lambda environment serves a client)",
            "lat_settled_p50_added",
            "",
            None,
        ),
        (
            "time to last byte p50, streamed, c=1 (ms)",
            "ttlb_p50_relay",
            "ttlb_p50_direct",
            None,
        ),
        (
            "time to last byte p99, streamed, c=1 (ms)",
            "ttlb_p99_relay",
            "ttlb_p99_direct",
            None,
        ),
        (
            "throughput, non-streamed, c=32, wrk (req/s)",
            "rps_relay",
            "rps_direct",
            None,
        ),
        (
            "wrk latency p50 at c=32 (ms)",
            "wrk_p50_relay",
            "wrk_p50_direct",
            None,
        ),
        (
            "wrk latency p99 at c=32 (ms)",
            "wrk_p99_relay",
            "wrk_p99_direct",
            None,
        ),
        (
            "relay CPU per request, c=32 (ms, excl. DynamoDB Local)",
            "cpu_relay_c32",
            "",
            Some(Target::AtMost(0.25)),
        ),
        (
            "relay CPU per request, c=1 (ms)",
            "cpu_relay_c1",
            "",
            Some(Target::AtMost(0.25)),
        ),
        (
            "DynamoDB Local CPU per relayed request, c=32 (ms)",
            "cpu_ddb_c32",
            "",
            None,
        ),
        (
            "DynamoDB Local CPU per relayed request, c=1 (ms)",
            "cpu_ddb_c1",
            "",
            None,
        ),
        (
            "fake upstream CPU per request, c=32 (ms)",
            "cpu_fake_c32_relay",
            "cpu_fake_c32_direct",
            None,
        ),
        (
            "wrk's own CPU per request, c=32 (ms)",
            "cpu_wrk_relay",
            "cpu_wrk_direct",
            None,
        ),
        (
            "DynamoDB round trips of one non-streamed request, known key: median",
            "ddb_calls_json_median",
            "",
            Some(Target::AtMost(2.0)),
        ),
        (
            "DynamoDB round trips of one streamed request, known key: median",
            "ddb_calls_stream_median",
            "",
            Some(Target::AtMost(2.0)),
        ),
        (
            "DynamoDB round trips of one non-streamed request: most seen",
            "ddb_calls_json_max",
            "",
            None,
        ),
        (
            "DynamoDB round trips of one streamed request: most seen",
            "ddb_calls_stream_max",
            "",
            None,
        ),
        (
            "DynamoDB round trips per request, mean over the c=1 non-streamed phase",
            "ddb_calls_json_mean",
            "",
            None,
        ),
        (
            "DynamoDB round trips per request, mean over the c=1 streamed phase",
            "ddb_calls_stream_mean",
            "",
            None,
        ),
        (
            "DynamoDB round trips per request, mean at c=32 (incl. conflict retries)",
            "ddb_calls_c32",
            "",
            None,
        ),
        (
            "DynamoDB round trips, first request of a fresh process",
            "ddb_calls_cold",
            "",
            None,
        ),
        (
            "admission UpdateItem on DynamoDB Local, p50 (ms, relay's code, c=1)",
            "store_admit_p50",
            "",
            None,
        ),
        (
            "settlement TransactWriteItems on DynamoDB Local, p50 (ms, relay's code, c=1)",
            "store_settle_p50",
            "",
            None,
        ),
        ("relay RSS idle after start (MB)", "rss_idle", "", None),
        (
            "relay RSS idle after warm-up (MB)",
            "rss_idle_warm",
            "",
            None,
        ),
        (
            "relay RSS right after c=32 load (MB, VmRSS)",
            "rss_load",
            "",
            Some(Target::AtMost(30.0)),
        ),
        (
            "relay RSS peak over the run (MB, VmHWM)",
            "rss_peak",
            "",
            Some(Target::AtMost(30.0)),
        ),
        (
            "start-up: exec → first answered request (ms)",
            "startup_hello",
            "",
            Some(Target::AtMost(100.0)),
        ),
        (
            "start-up: exec → answering, + first proxied request (cold caches) (ms)",
            "startup_proxied",
            "",
            None,
        ),
    ];
    let mut rows: Vec<Row> = spec
        .iter()
        .map(|(measure, relay, direct, target)| {
            let series = |name: &str| (!name.is_empty()).then(|| name.to_owned());
            // Call counts: whole numbers, and means with more digits.
            let decimals = if relay.ends_with("_mean") || *relay == "ddb_calls_c32" {
                Some(3)
            } else if relay.starts_with("ddb_calls_") {
                Some(0)
            } else {
                None
            };
            Row::of(
                f,
                measure,
                series(relay).as_deref(),
                series(direct).as_deref(),
                *target,
                decimals,
            )
        })
        .collect();
    // Per spacing: relay against direct, then the two "added" figures.
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
    let micro = report::criterion_results(&o.criterion_dir);
    let micro_rows: [(&str, &str); 6] = [
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
    for (id, what) in micro_rows {
        let value = match micro.get(id) {
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
        rows.push(Row::text(&format!("criterion: {what}"), value));
    }
    out.push_str(&report::table(&rows));
    out
}
