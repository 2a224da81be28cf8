//! The first phase: DynamoDB Local, the fake upstreams and the relay
//! started once for the whole run, with the bench's tier and key created
//! through the relay's admin API; and the direct fake each phase compares
//! the relay with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use relay_shared::domain::key::PresentedKey;
use relay_shared::store::Store;

use crate::client::Endpoint;
use crate::services::{self, Dynamo, Service};
use crate::{EVENT_SPACINGS_MS, FAKE_KEY, TIER_PERIOD, TIER_REQUESTS, progress};

/// The two release binaries the bench runs.
pub struct Binaries {
    pub relay: PathBuf,
    pub fake: PathBuf,
}

impl Binaries {
    /// Both binaries in `bin_dir`, or an error saying how to build them.
    pub fn locate(bin_dir: &Path) -> anyhow::Result<Binaries> {
        let binaries = Binaries {
            relay: bin_dir.join("relay-local"),
            fake: bin_dir.join("fake-upstream"),
        };
        for bin in [&binaries.relay, &binaries.fake] {
            if !bin.is_file() {
                bail!(
                    "{} is missing: `make bench` builds it (or `cargo build --release -p relay-local` and `cargo build --release -p relay-tests --bin fake-upstream`)",
                    bin.display()
                );
            }
        }
        Ok(binaries)
    }
}

/// Everything one repetition of the relay needs to know about the stack.
pub struct Stack {
    pub relay: Service,
    pub relay_ep: Endpoint,
    /// Fake upstream behind the main relay.
    pub fake_behind: Service,
    /// Fake upstreams with spaced SSE events (`EVENT_SPACINGS_MS`), for the
    /// streaming-delay phases.
    pub fakes_spaced: Vec<Service>,
    /// The relay's environment without `UPSTREAM_BASE_URL`, for the fresh
    /// relays of the start-up phase.
    pub relay_env: Vec<(String, String)>,
    pub relay_key: String,
    pub store: Store,
    /// Last, so that it is dropped (stopped) after the services.
    pub dynamo: Dynamo,
}

impl Stack {
    /// Starts everything; also returns the main relay's start-up time (exec
    /// to first answer).
    pub async fn start(
        root: &Path,
        binaries: &Binaries,
        state_dir: &Path,
        limit_mode: &str,
    ) -> anyhow::Result<(Stack, Duration)> {
        progress("starting DynamoDB Local");
        let dynamo = Dynamo::start(root, state_dir)?;
        let (fake_behind, fakes_spaced) = start_fakes(&binaries.fake, state_dir).await?;

        // A fresh table per run: a DynamoDB Local left running keeps old ones.
        let table = format!("relay-bench-{}", std::process::id());
        let password = format!("bench-{}", PresentedKey::generate().id());
        let relay_env = relay_env(&table, &dynamo.endpoint, &password);

        progress("starting the relay");
        let mut env = relay_env.clone();
        env.push(("UPSTREAM_BASE_URL".into(), fake_behind.base_url.clone()));
        let (relay, first_startup) = services::start_relay(
            &binaries.relay,
            &env,
            services::free_port()?,
            &state_dir.join("relay.log"),
            "relay",
        )
        .await?;
        let admin_http = reqwest::Client::builder().no_proxy().build()?;
        let relay_key = create_key(&admin_http, &relay.base_url, &password, limit_mode).await?;
        let store = bench_store(&dynamo.endpoint, &table);
        let relay_ep = Endpoint {
            label: "relay",
            base_url: relay.base_url.clone(),
            api_key: relay_key.clone(),
        };
        let stack = Stack {
            relay,
            relay_ep,
            fake_behind,
            fakes_spaced,
            relay_env,
            relay_key,
            store,
            dynamo,
        };
        Ok((stack, first_startup))
    }

    /// Stops the relay and the fakes, then DynamoDB Local.
    pub async fn stop(self) {
        let Stack {
            relay,
            fake_behind,
            fakes_spaced,
            dynamo,
            ..
        } = self;
        relay.stop().await;
        fake_behind.stop().await;
        for fake in fakes_spaced {
            fake.stop().await;
        }
        drop(dynamo);
    }
}

/// The fake behind the main relay, and one fake per `EVENT_SPACINGS_MS`.
async fn start_fakes(fake_bin: &Path, state_dir: &Path) -> anyhow::Result<(Service, Vec<Service>)> {
    let fake_behind = services::start_fake(
        fake_bin,
        0,
        &state_dir.join("fake-behind.log"),
        "fake behind relay",
    )
    .await?;
    let mut fakes_spaced = Vec::new();
    for spacing in EVENT_SPACINGS_MS {
        fakes_spaced.push(
            services::start_fake(
                fake_bin,
                spacing,
                &state_dir.join(format!("fake-spaced-{spacing}ms.log")),
                "fake with spaced events",
            )
            .await?,
        );
    }
    Ok((fake_behind, fakes_spaced))
}

/// The relay's environment, but for its upstream.
fn relay_env(table: &str, dynamodb_endpoint: &str, password: &str) -> Vec<(String, String)> {
    [
        ("TABLE_NAME", table),
        ("DYNAMODB_ENDPOINT", dynamodb_endpoint),
        ("ADMIN_USERNAME", "admin"),
        ("ADMIN_PASSWORD", password),
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
    .collect()
}

/// Logs in as admin, creates the `bench` tier (no throttling at c=32) and a
/// key on it in `limit_mode` with dollar limits a team would set and a
/// token limit (far from spent: the admission write checks them on every
/// request); returns the key.
async fn create_key(
    http: &reqwest::Client,
    base: &str,
    password: &str,
    limit_mode: &str,
) -> anyhow::Result<String> {
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
        .json(&serde_json::json!({
            "name": "make bench",
            "rate_limit_tier": "bench",
            "limit_mode": limit_mode,
            "token_limit": 1_000_000_000_000u64,
            "dollar_limits": [
                {"window": "5h", "limit_usd": 100_000},
                {"window": "day", "limit_usd": 1_000_000},
                {"window": "week", "limit_usd": 1_000_000, "models": "claude-opus-*"},
                {"window": "month", "limit_usd": 10_000_000}
            ]
        }))
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

/// A fake served directly, the side the relay is compared with.
pub async fn start_direct_fake(fake_bin: &Path, state_dir: &Path) -> anyhow::Result<Service> {
    services::start_fake(
        fake_bin,
        0,
        &state_dir.join("fake-direct.log"),
        "fake direct",
    )
    .await
}

pub fn direct_endpoint(fake: &Service) -> Endpoint {
    Endpoint {
        label: "fake direct",
        base_url: fake.base_url.clone(),
        api_key: FAKE_KEY.into(),
    }
}
