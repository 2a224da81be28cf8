//! The proxy function: routes the request by the route table
//! (`domain::route`), authenticates `sk-proxy-…` keys, admits the request
//! (status, allowlists, quota, rate window), forwards it upstream with the
//! real key, streams the answer back and settles its usage. Batches and
//! files live in their own modules.

pub mod batches;
mod body;
mod files;
mod relay;
pub mod tap;

use std::sync::Arc;
use std::time::Duration;

use std::net::IpAddr;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use http::{Method, StatusCode, header};

use self::body::MessagesFields;
pub use crate::config::ProxyConfig;
use crate::domain::admission::AdmissionRefusal;
use crate::domain::key::ApiKeyRecord;
use crate::domain::key::access::{Refusal, RequestFacts, check_access, model_name_problem};
use crate::domain::key::{KeyId, PresentedKey};
use crate::domain::route::{CanonicalPath, Route, RouteRefusal, Treatment, is_id_segment, route};
use crate::domain::tier::Tier;
use crate::domain::{self};
use crate::error::ApiError;
use crate::http::key_holder::{invalid_key, presented_key};
use crate::http::{ClientIp, RequestId, read_limited, request_id};
use crate::in_flight::InFlight;
use crate::store::Store;
use crate::store::admission::AdmissionError;
use crate::ttl_cache::TtlCache;
use crate::upstream::{ForwardRequest, Upstream, upstream_request_headers};

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

/// The proxy's routes: every request goes through the route table
/// (`relay_request`), except the batch collector's scheduled call.
pub fn router(state: ProxyState) -> Router {
    Router::new()
        .route(batches::COLLECT_PATH, any(batches::scheduled_collect))
        .fallback(relay_request)
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        ApiError::forbidden(refusal.message())
    }
}

impl From<AdmissionRefusal> for ApiError {
    fn from(err: AdmissionRefusal) -> Self {
        match err {
            AdmissionRefusal::UnknownKey | AdmissionRefusal::WrongSecret => invalid_key(),
            AdmissionRefusal::Disabled => Refusal::Disabled.into(),
            AdmissionRefusal::Expired => Refusal::Expired.into(),
            AdmissionRefusal::QuotaExhausted { used, limit } => {
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
            AdmissionRefusal::RateLimited { retry_after } => ApiError::rate_limited(
                format!(
                    "rate limit of this API key's tier reached; retry in {retry_after} seconds"
                ),
                retry_after,
            ),
            AdmissionRefusal::WorstCaseExceedsQuota { worst, left } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                crate::ErrorKind::RateLimit,
                format!(
                    "token quota too small for this batch: its worst case is {worst} tokens (input estimate plus max_tokens of every request) and {left} are left; lower max_tokens, split the batch, or ask your relay admin to raise its token_limit"
                ),
            )
            .with_should_retry(false),
            AdmissionRefusal::OverTier {
                requests,
                limit,
                period,
            } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                crate::ErrorKind::RateLimit,
                format!(
                    "this batch holds {requests} requests, more than the {limit} per {period} seconds this API key's tier allows; split it"
                ),
            )
            .with_should_retry(false),
        }
    }
}

impl From<AdmissionError> for ApiError {
    fn from(err: AdmissionError) -> Self {
        match err {
            AdmissionError::Refused(refusal) => refusal.into(),
            AdmissionError::Store(store) => store.into(),
        }
    }
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

/// The answer when no route serves a request.
fn route_refusal(refusal: RouteRefusal) -> ApiError {
    match refusal {
        RouteRefusal::BadPath(problem) => {
            ApiError::bad_request(format!("{problem}; send the path in its canonical form"))
        }
        RouteRefusal::UnknownPath => {
            ApiError::not_found("this relay does not serve that path (see its route table)")
        }
        RouteRefusal::MethodNotAllowed(allowed) if allowed.is_empty() => ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            crate::ErrorKind::InvalidRequest,
            "this relay does not serve that method",
        ),
        RouteRefusal::MethodNotAllowed(allowed) => {
            let allowed: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                crate::ErrorKind::InvalidRequest,
                format!(
                    "method not allowed on this path; use {}",
                    allowed.join(" or ")
                ),
            )
        }
    }
}

/// One request on its way through the proxy, once its route is known.
pub(crate) struct Call {
    state: ProxyState,
    parts: http::request::Parts,
    path: CanonicalPath,
    key: PresentedKey,
    ip: IpAddr,
    at: time::OffsetDateTime,
    started: std::time::Instant,
    request_id: String,
}

impl Call {
    /// This request as it goes upstream (same method, path and query).
    fn forward(&self, body: Bytes) -> ForwardRequest {
        ForwardRequest {
            method: self.parts.method.clone(),
            path: self.path.clone(),
            query: self.parts.uri.query().map(str::to_owned),
            headers: upstream_request_headers(&self.parts.headers),
            body,
        }
    }

    /// The key's record, read afresh, if it admits this caller and each of
    /// `models` (for requests that name models).
    async fn authenticate(
        &self,
        models: Option<&[Option<&str>]>,
    ) -> Result<ApiKeyRecord, ApiError> {
        let hash = self.key.hash();
        let record = self
            .state
            .0
            .store
            .get_key(self.key.id())
            .await?
            .filter(|r| r.secret_hash.matches(&hash))
            .ok_or_else(invalid_key)?;
        self.check(&record, models)?;
        Ok(record)
    }

    /// The access rules (status, expiry, IP, origin) and, for requests
    /// that name models, the model allowlist for each of them.
    fn check(
        &self,
        record: &ApiKeyRecord,
        models: Option<&[Option<&str>]>,
    ) -> Result<(), ApiError> {
        let origin = self
            .parts
            .headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        let facts = |model, names_model| RequestFacts {
            ip: self.ip,
            origin,
            model,
            names_model,
        };
        match models {
            None => check_access(record, &facts(None, false), self.at)?,
            Some(models) => {
                for model in models {
                    check_access(record, &facts(*model, true), self.at)?;
                }
            }
        }
        Ok(())
    }

    /// Refuses a body that references a file this key does not own.
    async fn check_file_references(&self, body: &[u8]) -> Result<(), ApiError> {
        if !body::may_reference_files(body) {
            return Ok(());
        }
        let ids = body::file_ids(body)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
        if ids.is_empty() {
            return Ok(());
        }
        if ids.len() > 1000 {
            return Err(ApiError::bad_request(
                "the request references more than 1000 files",
            ));
        }
        // No upload has an id of another shape: it cannot be this key's.
        if let Some(odd) = ids.iter().find(|id| !is_id_segment(id)) {
            return Err(Refusal::FileNotOwned(odd.clone()).into());
        }
        let unowned = self
            .state
            .0
            .store
            .unowned_files(self.key.id(), &ids)
            .await?;
        match unowned.into_iter().next() {
            Some(id) => Err(Refusal::FileNotOwned(id).into()),
            None => Ok(()),
        }
    }

    fn header_text(&self, name: &str) -> Option<String> {
        self.parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(256).collect::<String>())
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
    let (route, path) = route(
        &parts.method,
        parts.uri.path(),
        &state.0.config.pass_through,
    )
    .map_err(route_refusal)?;
    match route {
        Route::Hello => return Ok(StatusCode::OK.into_response()),
        Route::Complete => {
            return Err(ApiError::not_found(
                "this relay does not serve the legacy Text Completions API (/v1/complete): its answers carry no usage to meter; use /v1/messages",
            ));
        }
        _ => {}
    }
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
    let call = Call {
        state,
        parts,
        path,
        key,
        ip,
        at,
        started,
        request_id,
    };
    if route == Route::UploadFile {
        return files::upload(call, body).await;
    }
    let body = read_limited(body, max).await.map_err(|e| {
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(max)
        } else {
            e
        }
    })?;
    match route {
        Route::Messages | Route::CountTokens => messages(call, &route, body).await,
        Route::ListModels | Route::GetModel(_) | Route::PassThrough => {
            call.authenticate(None).await?;
            let forward = call.forward(body);
            Ok(relay::start(call.state, forward, None, false, call.started).await)
        }
        Route::CreateBatch => batches::create(call, body).await,
        Route::ListBatches => batches::list(call).await,
        Route::GetBatch(id) | Route::CancelBatch(id) => batches::object(call, &id, body).await,
        Route::DeleteBatch(id) => batches::delete(call, &id).await,
        Route::BatchResults(id) => batches::results(call, &id).await,
        Route::ListFiles => files::list(call).await,
        Route::GetFile(id) | Route::FileContent(id) => files::forward(call, &id, body).await,
        Route::DeleteFile(id) => files::delete(call, &id).await,
        Route::Hello | Route::Complete | Route::UploadFile => Err(ApiError::internal(
            anyhow::anyhow!("route {route:?} reached the forwarding step"),
        )),
    }
}

/// `POST /v1/messages` (metered) and `count_tokens` (free): the model is
/// read, bounded and checked against the allowlist, file references
/// against ownership; a message is admitted in one write and settled after.
async fn messages(call: Call, route: &Route, body: Bytes) -> Result<Response, ApiError> {
    let state = call.state.clone();
    let charged = route.treatment() == Treatment::Metered;
    // serde would read the fields from an array too, in order.
    if !body::is_json_object(&body) {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    }
    let fields = serde_json::from_slice::<MessagesFields>(&body).map_err(|e| {
        ApiError::bad_request(format!("request body is not a valid JSON object: {e}"))
    })?;
    if let Some(problem) = fields.model.as_deref().and_then(model_name_problem) {
        return Err(ApiError::bad_request(problem));
    }
    let model = fields.model.clone();
    let models = [model.as_deref()];

    // Charged requests use the cached record for the rules and let the
    // admission write re-check what must be current; uncharged ones read
    // the key afresh (they are rare and write nothing).
    let hash = call.key.hash();
    let cached = if charged {
        state.0.keys.get(call.key.id())
    } else {
        None
    };
    let record = match cached.filter(|r| r.secret_hash.matches(&hash)) {
        Some(record) => {
            call.check(&record, Some(&models))?;
            record
        }
        None => Arc::new(call.authenticate(Some(&models)).await?),
    };
    call.check_file_references(&body).await?;

    if charged {
        let tier = tier_of(&state, &record.rate_limit_tier).await?;
        let admitted = state
            .0
            .store
            .admit(
                call.key.id(),
                &hash,
                tier.requests,
                tier.period,
                call.at,
                record.rate_window.map(|(start, _)| start),
            )
            .await?;
        state
            .0
            .keys
            .insert(call.key.id().clone(), Arc::new(admitted));
    }

    let streamed = fields.stream.unwrap_or(false);
    let settle = charged.then(|| crate::domain::usage::UsageRecord {
        request_id: call.request_id.clone(),
        key_id: call.key.id().clone(),
        at: call.at,
        model: model.clone(),
        method: call.parts.method.to_string(),
        path: call.path.to_string(),
        status: 0,
        stream: streamed,
        usage: Default::default(),
        estimated: false,
        latency_ms: 0,
        ttfb_ms: None,
        retries: 0,
        client_ip: call.ip.to_string(),
        user_agent: call.header_text("user-agent"),
        session_id: call.header_text("x-claude-code-session-id"),
        error_type: None,
    });
    let forward = call.forward(body);
    Ok(relay::start(state, forward, settle, streamed, call.started).await)
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
