//! `spawn_app()`: the relay's merged app (as relay-local composes it) served on
//! a free loopback port against its own fresh DynamoDB Local table and its
//! own fake upstream, so every test starts from nothing and tests run in
//! parallel.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{self, Poll, ready};
use std::time::Duration;

use anyhow::Context;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use relay_shared::app::App;
use relay_shared::config::{self, AdminConfig, Env, ProxyConfig, UpstreamConfig};
use relay_shared::domain::budget::BudgetPolicy;
use relay_shared::domain::key::KeyId;
use relay_shared::in_flight::InFlight;
use relay_shared::proxy::{self, SettleTiming};
use relay_shared::secrets::{SecretValues, Secrets};
use relay_shared::store::Store;
use serde_json::{Value, json};

use crate::fake_upstream::FakeUpstream;

pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "correct horse battery staple";

/// bcrypt at the lowest cost: the tests check the flow, not the cost.
pub fn admin_password_hash() -> anyhow::Result<String> {
    static HASH: OnceLock<String> = OnceLock::new();
    if let Some(hash) = HASH.get() {
        return Ok(hash.clone());
    }
    let hash = bcrypt::hash(ADMIN_PASSWORD, 4)?;
    Ok(HASH.get_or_init(|| hash).clone())
}

/// DynamoDB Local's address, which `make test` exports.
pub fn dynamodb_endpoint() -> anyhow::Result<String> {
    Env::process().text(&config::DYNAMODB_ENDPOINT).context(
        "DYNAMODB_ENDPOINT is not set: run the integration tests with `make test`, which starts DynamoDB Local",
    )
}

/// A DynamoDB client for DynamoDB Local with fixed local credentials (the
/// ambient credential chain would go looking for an instance profile).
pub fn dynamodb_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "relay-tests"))
        .endpoint_url(endpoint)
        .timeout_config(relay_shared::store::timeouts())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// Knobs a test may turn; the defaults are production's, except timings
/// shortened so failure tests finish quickly.
#[derive(Clone)]
pub struct AppOptions {
    pub upstream: UpstreamConfig,
    pub proxy: ProxyConfig,
    /// Secrets other than the fixed test ones (e.g. Secrets Manager on moto).
    pub secrets: Option<Secrets>,
    /// A DynamoDB other than the shared one `make test` started.
    pub dynamodb_endpoint: Option<String>,
    /// Usage is settled after each answer ends (as relay-local does); most
    /// tests read usage right after an answer, so by default each body's
    /// end is held back until the settlements running then are done.
    /// Tests of the ordering itself turn this off.
    pub hold_answers_until_settled: bool,
    /// The admin routes' `ADMIN_ALLOWED_CIDRS`, in that variable's syntax;
    /// empty (the default): every address.
    pub admin_allowed_cidrs: String,
    /// The organisation default dollar limits and time zone
    /// (`DEFAULT_DOLLAR_LIMITS`, `BUDGET_TIME_ZONE`); none and UTC.
    pub budgets: BudgetPolicy,
    /// The secret's `upstreams` list (the pool); none: the app's own fake,
    /// as the single `upstream_api_key`.
    pub upstreams: Option<Value>,
    /// The table of another app (two instances of one relay); none: a new one.
    pub table: Option<String>,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            upstream: UpstreamConfig {
                base_url: String::new(),
                max_attempts: 3,
                retry_budget: Duration::from_secs(10),
                backoff_base: Duration::from_millis(20),
                backoff_max: Duration::from_millis(200),
                connect_timeout: Duration::from_secs(2),
                header_timeout: Duration::from_secs(20),
                idle_timeout: Duration::from_secs(20),
            },
            proxy: ProxyConfig {
                max_request_bytes: 6 * 1024 * 1024,
                key_cache_ttl: Duration::from_secs(10),
                keepalive_after: Duration::from_secs(10),
                keepalive_interval: Duration::from_secs(10),
                disconnect_drain: Duration::from_secs(30),
                stream_deadline: Duration::from_secs(870),
                settle_inline: Duration::from_secs(3),
                settle_background: Duration::from_secs(30),
                log_retention: Duration::from_secs(30 * 86_400),
                pass_through: Default::default(),
                refuse_unpriced_models: false,
                price_cache_ttl: Duration::from_secs(60),
                budget_alerts: Default::default(),
                reconcile_after: Duration::from_secs(900),
            },
            secrets: None,
            dynamodb_endpoint: None,
            hold_answers_until_settled: true,
            admin_allowed_cidrs: String::new(),
            budgets: BudgetPolicy::default(),
            upstreams: None,
            table: None,
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub base_url: String,
    pub store: Store,
    pub upstream: FakeUpstream,
    pub http: reqwest::Client,
    pub jwt_secret: String,
    /// The settlements still running after their answers ended.
    pub in_flight: InFlight,
    /// The proxy's state, to run the batch collector as its schedule would.
    pub proxy: proxy::ProxyState,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub async fn spawn_app() -> anyhow::Result<TestApp> {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(options: AppOptions) -> anyhow::Result<TestApp> {
    let upstream = FakeUpstream::start().await?;
    let endpoint = match &options.dynamodb_endpoint {
        Some(endpoint) => endpoint.clone(),
        None => dynamodb_endpoint()?,
    };
    let table = options
        .table
        .clone()
        .unwrap_or_else(|| format!("relay-test-{}", uuid::Uuid::new_v4().simple()));
    let store = Store::new(dynamodb_client(&endpoint), table);
    store
        .ensure_table()
        .await
        .context("creating the test table")?;

    let jwt_secret = format!("jwt-{}", uuid::Uuid::new_v4().simple());
    let secrets = options.secrets.clone().unwrap_or_else(|| {
        Secrets::fixed(SecretValues {
            upstream_api_key: Some(upstream.api_key().to_owned()),
            upstreams: options.upstreams.clone(),
            admin_password_hash: admin_password_hash().ok(),
            jwt_secret: Some(jwt_secret.clone()),
        })
    });
    let mut upstream_config = options.upstream.clone();
    upstream_config.base_url = upstream.base_url();
    // What a function's `main` builds from the environment, here on the
    // test's own table, secrets and configuration.
    let relay = App::new(store.clone(), secrets).with_budgets(options.budgets.clone());
    let in_flight = InFlight::new();
    let proxy_state = relay.proxy_state(
        upstream_config,
        options.proxy.clone(),
        SettleTiming::AfterAnswerEnds(in_flight.clone()),
    )?;
    let admin = AdminConfig {
        admin_username: ADMIN_USER.into(),
        jwt_ttl: Duration::from_secs(3600),
        allowed_networks: AdminConfig::parse_allowed_networks(&options.admin_allowed_cidrs)?,
        refuse_unpriced_models: options.proxy.refuse_unpriced_models,
    };
    // relay-local's app: every function on one port.
    let mut app = relay.local_router(admin, proxy_state.clone(), axum::Router::new());
    if options.hold_answers_until_settled {
        app = app.layer(axum::middleware::from_fn_with_state(
            in_flight.clone(),
            hold_until_settled,
        ));
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // As relay-local: no Nagle delay on small final writes.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = tokio::spawn(async move {
        let _ = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await;
    });
    Ok(TestApp {
        addr,
        base_url: format!("http://{addr}"),
        store,
        upstream,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?,
        jwt_secret,
        in_flight,
        proxy: proxy_state,
        server,
    })
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub async fn admin_token(&self) -> anyhow::Result<String> {
        let response = self
            .http
            .post(self.url("/admin/login"))
            .basic_auth(ADMIN_USER, Some(ADMIN_PASSWORD))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 200,
            "login failed: {}",
            response.status()
        );
        let body: Value = response.json().await?;
        body["access_token"]
            .as_str()
            .map(str::to_owned)
            .context("no access_token")
    }

    /// Creates a key with these fields; returns its record (with `api_key`).
    pub async fn create_key(&self, fields: Value) -> anyhow::Result<Value> {
        let token = self.admin_token().await?;
        let response = self
            .http
            .post(self.url("/admin/api-keys"))
            .bearer_auth(token)
            .json(&fields)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 201,
            "create failed: {}",
            response.status()
        );
        Ok(response.json().await?)
    }

    /// A fresh key named "test"; returns (id, full key).
    pub async fn new_key(&self) -> anyhow::Result<(String, String)> {
        self.new_key_with(json!({"name": "test"})).await
    }

    /// A fresh key with these creation fields; returns (id, full key).
    pub async fn new_key_with(&self, fields: Value) -> anyhow::Result<(String, String)> {
        let key = self.create_key(fields).await?;
        Ok((
            key["id"].as_str().context("id")?.to_owned(),
            key["api_key"].as_str().context("api_key")?.to_owned(),
        ))
    }

    pub async fn key_record(
        &self,
        id: &str,
    ) -> anyhow::Result<relay_shared::domain::key::ApiKeyRecord> {
        let id = KeyId::parse(id).context("bad id")?;
        self.store.get_key(&id).await?.context("no such key")
    }

    /// Raw items of a key's partition whose sort key starts with `prefix`.
    pub async fn items(&self, id: &str, prefix: &str) -> anyhow::Result<Vec<RawItem>> {
        key_items(&self.store, id, prefix).await
    }

    /// `POST /v1/messages` with the key holder's `key`: a short request for
    /// `model` (64 output tokens at most), ready to send (or to adjust).
    pub fn message(&self, key: &str, model: &str) -> reqwest::RequestBuilder {
        self.http
            .post(self.url("/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({
                "model": model,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "hi"}]
            }))
    }

    /// `GET /api/usage/quota` as the holder of `key`.
    pub async fn quota(&self, key: &str) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(self.url("/api/usage/quota"))
            .header("x-api-key", key)
            .send()
            .await?;
        Ok(response.error_for_status()?.json().await?)
    }

    /// Waits (up to 10 s) until `count` usage logs exist for the key.
    pub async fn wait_for_logs(&self, id: &str, count: usize) -> anyhow::Result<Vec<RawItem>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.items(id, "LOG#").await?;
            if logs.len() >= count || std::time::Instant::now() > deadline {
                return Ok(logs);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A number attribute of a raw item (0 when absent).
pub fn num(item: &RawItem, name: &str) -> u64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A string attribute of a raw item.
pub fn text<'a>(item: &'a RawItem, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

/// One stored item, as DynamoDB returns it.
pub type RawItem = std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>;

/// Raw items of a key's partition in `store` whose sort key starts with
/// `prefix` (a consistent read).
pub async fn key_items(store: &Store, id: &str, prefix: &str) -> anyhow::Result<Vec<RawItem>> {
    use aws_sdk_dynamodb::types::AttributeValue;
    let output = store
        .client()
        .query()
        .table_name(store.table())
        .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
        .expression_attribute_values(":pk", AttributeValue::S(format!("KEY#{id}")))
        .expression_attribute_values(":prefix", AttributeValue::S(prefix.to_owned()))
        .consistent_read(true)
        .send()
        .await?;
    Ok(output.items.unwrap_or_default())
}

/// Ends each answer's body only once no settlement is running, so a test
/// that has read an answer whole can read its usage at once.
async fn hold_until_settled(
    axum::extract::State(in_flight): axum::extract::State<InFlight>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    next.run(request).await.map(|body| {
        axum::body::Body::new(HeldUntilSettled {
            body,
            in_flight,
            body_ended: false,
            settled: None,
        })
    })
}

/// A body whose end (never its bytes or length) waits for `InFlight::idle`.
struct HeldUntilSettled {
    body: axum::body::Body,
    in_flight: InFlight,
    body_ended: bool,
    settled: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl http_body::Body for HeldUntilSettled {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if !this.body_ended {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(frame) => return Poll::Ready(Some(frame)),
                None => this.body_ended = true,
            }
        }
        let in_flight = this.in_flight.clone();
        let settled = this
            .settled
            .get_or_insert_with(|| Box::pin(async move { in_flight.idle().await }));
        ready!(settled.as_mut().poll(cx));
        Poll::Ready(None)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
