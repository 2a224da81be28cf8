//! The proxy function: authenticates `sk-proxy-…` keys, admits the request
//! (status, allowlists, quota, rate window), forwards it upstream with the
//! real key, streams the answer back and settles its usage.

mod relay;
pub mod tap;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{Method, StatusCode, header};
use serde::Deserialize;

use crate::config::{ConfigError, number};
use crate::domain::access::{Refusal, RequestFacts, check_access};
use crate::domain::key::ApiKeyRecord;
use crate::domain::tier::Tier;
use crate::domain::{self};
use crate::error::ApiError;
use crate::http::key_auth::{invalid_key, presented_key};
use crate::http::{ClientIp, RequestId, read_limited, request_id};
use crate::in_flight::InFlight;
use crate::keys::KeyId;
use crate::store::Store;
use crate::store::proxy::AdmissionError;
use crate::ttl_cache::TtlCache;
use crate::upstream::{ForwardRequest, Upstream, upstream_request_headers};

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Lambda refuses request payloads over 6 MB; refusing them here gives
    /// the client Anthropic's 413 instead of an opaque gateway error.
    pub max_request_bytes: usize,
    pub key_cache_ttl: Duration,
    /// With no upstream headers after this long, a streamed answer is
    /// committed as 200 and kept alive with SSE comments.
    pub keepalive_after: Duration,
    pub keepalive_interval: Duration,
    /// How long to keep reading upstream for usage after the client left.
    pub disconnect_drain: Duration,
    /// Settle retries while the host waits for them (the client's answer
    /// held open, or the Lambda invocation kept alive by the extension)…
    pub settle_inline: Duration,
    /// …and after, in the background, before giving up to the log.
    pub settle_background: Duration,
    pub log_retention: Duration,
}

impl ProxyConfig {
    pub fn from_env() -> Result<ProxyConfig, ConfigError> {
        let secs = |name, default| number(name, default).map(Duration::from_secs);
        let millis = |name, default| number(name, default).map(Duration::from_millis);
        Ok(ProxyConfig {
            max_request_bytes: number("MAX_REQUEST_BYTES", 6 * 1024 * 1024)?,
            key_cache_ttl: millis("KEY_CACHE_TTL_MS", 10_000)?,
            keepalive_after: millis("STREAM_KEEPALIVE_AFTER_MS", 10_000)?,
            keepalive_interval: millis("STREAM_KEEPALIVE_INTERVAL_MS", 10_000)?,
            disconnect_drain: secs("DISCONNECT_DRAIN_SECONDS", 600)?,
            settle_inline: millis("SETTLE_INLINE_MS", 3_000)?,
            settle_background: secs("SETTLE_BACKGROUND_SECONDS", 300)?,
            log_retention: Duration::from_secs(number("LOG_RETENTION_DAYS", 30u64)? * 86_400),
        })
    }
}

/// When an answer's usage is recorded relative to the answer's end.
#[derive(Debug, Clone)]
pub enum SettleTiming {
    /// Before the client's answer ends: for a host that may be frozen as
    /// soon as it ends (Lambda when the settle extension is not registered).
    BeforeAnswerEnds,
    /// After the client has every byte, so the DynamoDB transaction is not
    /// part of its latency; counted in `InFlight`, which the host waits for
    /// (the Lambda settle extension, relay-local's shutdown).
    AfterAnswerEnds(InFlight),
}

struct Inner {
    store: Store,
    upstream: Upstream,
    config: ProxyConfig,
    settle_timing: SettleTiming,
    /// The last record each key's admission returned: its tier and allowlists
    /// (status, secret, quota and window are re-checked by the write itself).
    keys: TtlCache<KeyId, Arc<ApiKeyRecord>>,
    tiers: TtlCache<String, Tier>,
}

#[derive(Clone)]
pub struct ProxyState(Arc<Inner>);

impl ProxyState {
    pub fn new(
        store: Store,
        upstream: Upstream,
        config: ProxyConfig,
        settle_timing: SettleTiming,
    ) -> ProxyState {
        let keys = TtlCache::new(config.key_cache_ttl, 10_000);
        ProxyState(Arc::new(Inner {
            store,
            upstream,
            config,
            settle_timing,
            keys,
            tiers: TtlCache::new(Duration::from_secs(60), 1_000),
        }))
    }
}

/// The proxy's routes without a fallback (for merging).
pub fn router(state: ProxyState) -> Router {
    Router::new()
        .route("/api/hello", get(hello).head(hello))
        .fallback(relay_request)
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

/// Claude Code's connectivity check: answered here, never forwarded.
async fn hello() -> StatusCode {
    StatusCode::OK
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        ApiError::forbidden(refusal.message())
    }
}

impl From<AdmissionError> for ApiError {
    fn from(err: AdmissionError) -> Self {
        match err {
            AdmissionError::UnknownKey | AdmissionError::WrongSecret => invalid_key(),
            AdmissionError::Disabled => Refusal::Disabled.into(),
            AdmissionError::Expired => Refusal::Expired.into(),
            AdmissionError::QuotaExhausted { used, limit } => {
                // 429 is what clients expect of a spent budget; without
                // retry-after and with x-should-retry: false, Claude Code and
                // the SDKs stop instead of retrying a request that cannot pass.
                let mut err = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    crate::ErrorKind::RateLimit,
                    format!(
                        "token quota exhausted for this API key ({used} of {limit} tokens used); ask your relay admin to raise its token_limit"
                    ),
                );
                err.should_retry = Some(false);
                err
            }
            AdmissionError::RateLimited { retry_after } => ApiError::rate_limited(
                format!(
                    "rate limit of this API key's tier reached; retry in {retry_after} seconds"
                ),
                retry_after,
            ),
            AdmissionError::Store(store) => store.into(),
        }
    }
}

/// The few request fields the relay reads; everything else passes untouched.
#[derive(Deserialize)]
struct MessagesFields {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
}

/// Requests that are billed: creating a message. Everything else (token
/// counting, models, batches, unknown paths) is forwarded uncharged.
fn is_charged(method: &Method, path: &str) -> bool {
    method == Method::POST && path == "/v1/messages"
}

fn names_model(method: &Method, path: &str) -> bool {
    method == Method::POST && (path == "/v1/messages" || path == "/v1/messages/count_tokens")
}

async fn relay_request(
    State(state): State<ProxyState>,
    ClientIp(ip): ClientIp,
    request: Request,
) -> Response {
    match relay_inner(state, ip, request).await {
        Ok(response) => response,
        Err(err) => {
            crate::metrics::emit_event("proxy", "Rejections", rejection_reason(&err));
            err.into_response()
        }
    }
}

async fn relay_inner(
    state: ProxyState,
    ip: std::net::IpAddr,
    request: Request,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let at = domain::now();
    let (parts, body) = request.into_parts();
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_else(|| format!("relay_{}", uuid::Uuid::new_v4().simple()));
    let key = presented_key(&parts.headers)?;

    let max = state.0.config.max_request_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large(max));
    }
    let body = read_limited(body, max).await.map_err(|e| {
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(max)
        } else {
            e
        }
    })?;

    let path = parts.uri.path().to_owned();
    let charged = is_charged(&parts.method, &path);
    let with_model = names_model(&parts.method, &path);
    let fields = if with_model {
        Some(
            serde_json::from_slice::<MessagesFields>(&body).map_err(|e| {
                ApiError::bad_request(format!("request body is not a valid JSON object: {e}"))
            })?,
        )
    } else {
        None
    };
    let model = fields.as_ref().and_then(|f| f.model.clone());
    let facts = RequestFacts {
        ip,
        origin: parts
            .headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok()),
        model: model.as_deref(),
        names_model: with_model,
    };

    // Charged requests use the cached record for the rules and let the
    // admission write re-check what must be current; uncharged ones read
    // the key afresh (they are rare and write nothing).
    let cached = if charged {
        state.0.keys.get(key.id())
    } else {
        None
    };
    let hash = key.hash();
    let record = match cached.filter(|r| r.secret_hash.matches(&hash)) {
        Some(record) => record,
        None => {
            let record = state
                .0
                .store
                .get_key(key.id())
                .await?
                .filter(|r| r.secret_hash.matches(&hash))
                .ok_or_else(invalid_key)?;
            Arc::new(record)
        }
    };
    check_access(&record, &facts, at)?;

    if charged {
        let tier = tier_of(&state, &record.rate_limit_tier).await?;
        let admitted = state
            .0
            .store
            .admit(
                key.id(),
                &hash,
                tier.requests,
                tier.period,
                at,
                record.rate_window.map(|(start, _)| start),
            )
            .await?;
        state.0.keys.insert(key.id().clone(), Arc::new(admitted));
    }

    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    let forward = ForwardRequest {
        method: parts.method.clone(),
        path_and_query,
        headers: upstream_request_headers(&parts.headers),
        body,
    };
    let header_text = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(256).collect::<String>())
    };
    let settle = charged.then(|| crate::store::proxy::UsageRecord {
        request_id: request_id.clone(),
        key_id: key.id().clone(),
        at,
        model: model.clone(),
        method: parts.method.to_string(),
        path: path.clone(),
        status: 0,
        stream: fields.as_ref().and_then(|f| f.stream).unwrap_or(false),
        usage: Default::default(),
        estimated: false,
        latency_ms: 0,
        ttfb_ms: None,
        retries: 0,
        client_ip: ip.to_string(),
        user_agent: header_text("user-agent"),
        session_id: header_text("x-claude-code-session-id"),
        error_type: None,
    });
    let streamed = fields.as_ref().and_then(|f| f.stream).unwrap_or(false);
    Ok(relay::start(state, forward, settle, streamed, started).await)
}

/// The dashboard's name for why the relay itself refused a request.
fn rejection_reason(err: &ApiError) -> &'static str {
    match (err.status.as_u16(), err.should_retry) {
        (429, Some(false)) => "quota",
        (429, _) => "rate_limit",
        (401, _) => "authentication",
        (403, _) => "permission",
        (413, _) => "too_large",
        (400..=499, _) => "invalid_request",
        _ => "unavailable",
    }
}

fn too_large(max: usize) -> ApiError {
    ApiError::too_large(format!(
        "request body exceeds the relay's limit of {max} bytes (AWS Lambda's payload limit)"
    ))
}

/// The key's tier in force, from cache.
async fn tier_of(state: &ProxyState, name: &str) -> Result<Tier, ApiError> {
    if let Some(tier) = state.0.tiers.get(name) {
        return Ok(tier);
    }
    let tier = state.0.store.tier_in_force(name).await?;
    state.0.tiers.insert(name.to_owned(), tier.clone());
    Ok(tier)
}
