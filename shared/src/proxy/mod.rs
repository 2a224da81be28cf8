//! The proxy function. Every request runs through named phases over one
//! request context (`context::Call`):
//!
//! 1. **route and identify** (`context::begin`): the route table
//!    (`domain::route`) decides what is served; the presented key is
//!    parsed (nothing is read from the store yet);
//! 2. **authenticate and admit** (`messages`, `batches`, `files`): the key's
//!    record and access rules (`http::key_holder`), file ownership, and for
//!    metered routes the admission write;
//! 3. **build the upstream request** (`Call::forward`);
//! 4. **respond and pump** (`exchange`): the answer streams to the client
//!    as it arrives, its usage read on the way;
//! 5. **finish** (`finish`): the usage record is built once, the answer
//!    ended before or after it is written as the host needs, and settled.

mod alerts;
pub mod batches;
mod body;
mod context;
mod exchange;
mod files;
mod finish;
mod messages;
mod models;
mod prices;
pub mod reconcile;
mod standing;
pub mod tap;
mod upstreams;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use tracing::Instrument;

use self::context::{Begun, Call};
use self::exchange::Exchange;
use self::prices::PriceCache;
use crate::alerts::AlertPublisher;
pub use crate::config::ProxyConfig;
use crate::domain::budget::BudgetPolicy;
use crate::domain::key::{ApiKeyRecord, KeyId};
use crate::domain::route::Route;
use crate::domain::tier::Tier;
use crate::error::ApiError;
use crate::http::ClientIp;
use crate::in_flight::InFlight;
use crate::store::Store;
use crate::store::upstream_health::{HEALTH_CACHE_TTL, HealthCache};
use crate::ttl_cache::TtlCache;
use crate::upstream::Upstream;

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
    /// What requests cost (`domain::price`), through `ProxyState::prices`.
    prices: Arc<PriceCache>,
    /// The organisation's default dollar limits and time zone.
    budgets: Arc<BudgetPolicy>,
    /// Where budget alerts go (an SNS topic, or the log).
    alerts: AlertPublisher,
    /// The upstreams' health as every instance shares it.
    upstream_health: Arc<HealthCache>,
    /// The upstream's model list, for `/v1/models`.
    models: models::UpstreamModels,
}

#[derive(Clone)]
pub struct ProxyState(Arc<Inner>);

impl ProxyState {
    pub fn new(
        store: Store,
        upstream: Upstream,
        config: ProxyConfig,
        budgets: Arc<BudgetPolicy>,
        settle_timing: SettleTiming,
    ) -> ProxyState {
        let keys = TtlCache::new(config.key_cache_ttl, 10_000);
        let prices = Arc::new(PriceCache::new(
            config.price_cache_ttl,
            config.refuse_unpriced_models,
        ));
        let alerts = AlertPublisher::new(&config.budget_alerts);
        ProxyState(Arc::new(Inner {
            alerts,
            store,
            upstream,
            config,
            settle_timing,
            keys,
            tiers: TtlCache::new(Duration::from_secs(60), 1_000),
            prices,
            budgets,
            upstream_health: HealthCache::new(HEALTH_CACHE_TTL),
            models: models::UpstreamModels::default(),
        }))
    }
}

/// The proxy's routes: every request goes through the route table
/// (`relay_request`), except the batch collector's scheduled call. The
/// request-id layer is the composition root's (`app.rs`).
pub fn router(state: ProxyState) -> Router {
    Router::new()
        .route(batches::COLLECT_PATH, any(batches::scheduled_collect))
        .fallback(relay_request)
        .with_state(state)
}

async fn relay_request(
    State(state): State<ProxyState>,
    ClientIp(ip): ClientIp,
    request: Request,
) -> Response {
    let answer = match context::begin(state, ip, request) {
        Ok(Begun::Answered(response)) => Ok(response),
        Ok(Begun::Call(call, route, body)) => serve(*call, route, body).await,
        Err(err) => Err(err),
    };
    answer.unwrap_or_else(|err| {
        crate::metrics::emit_event("proxy", "Rejections", err.rendering().reason);
        err.into_response()
    })
}

/// Phases 2 to 5 for the route at hand; the answer carries what the key
/// has left (`standing`), as the request last saw the key.
async fn serve(call: Call, route: Route, body: Body) -> Result<Response, ApiError> {
    let (seen, state, at) = (call.seen.clone(), call.state.clone(), call.at);
    let mut response = serve_route(call, route, body).await?;
    if let Some(seen) = seen.take() {
        let models: Vec<&str> = seen.models.iter().map(String::as_str).collect();
        let headers = standing::headers(&seen.record, &state.0.budgets, &models, at);
        response.headers_mut().extend(headers);
    }
    Ok(response)
}

async fn serve_route(call: Call, route: Route, body: Body) -> Result<Response, ApiError> {
    if route == Route::UploadFile {
        return files::upload(call, body).await;
    }
    let body = call.read_body(body).await?;
    match route {
        // hyper drops this future when the client leaves; once admitted,
        // a message must still be forwarded, read and settled (or its
        // lease, reservation and trace would wait 15 minutes for the
        // reconciler, and it would be charged an estimate of an answer
        // never asked for): admission and the exchange's start run in a
        // task of their own.
        Route::Messages | Route::CountTokens => {
            let task = async move { messages::messages(call, &route, body).await };
            tokio::spawn(task.in_current_span())
                .await
                .map_err(|e| ApiError::internal(e.into()))?
        }
        Route::ListModels => models::answer(call, None).await,
        Route::GetModel(id) => models::answer(call, Some(&id)).await,
        // What is opened to pass through goes to the home upstream.
        Route::PassThrough => {
            call.authenticate(None).await?;
            let forward = call.forward(body);
            Ok(exchange::start(Exchange::unmetered(call.state, forward, call.started)).await)
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

/// What sending budget alerts needs, for a settle task.
fn alerting(state: &ProxyState) -> alerts::Alerting {
    alerts::Alerting {
        store: state.0.store.clone(),
        publisher: state.0.alerts.clone(),
        budgets: state.0.budgets.clone(),
    }
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
