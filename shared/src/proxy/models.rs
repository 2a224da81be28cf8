//! `GET /v1/models` and `GET /v1/models/{id}`, answered by the relay: the
//! upstream's model list (read through the pool, kept per instance for
//! `MODEL_LIST_TTL`) filtered by the key's `allowed_models`, with the
//! aliases admins defined (`domain::model_catalog`). Claude Code's model
//! discovery reads this list and gives up after 3 seconds: after an
//! instance's first list, no request waits for the upstream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};

use super::ProxyState;
use super::context::Call;
use super::exchange::collect_bounded;
use super::upstreams::{SharedHealth, candidates_for};
use crate::domain::model_catalog::{ModelEntry, ModelsQuery, UpstreamModelsPage, key_models, page};
use crate::domain::route::CanonicalPath;
use crate::error::ApiError;
use crate::upstream::{ForwardRequest, RetryPolicy};

/// How long an instance keeps the upstream's list before reading it again.
pub(super) const MODEL_LIST_TTL: Duration = Duration::from_secs(300);
/// The most pages of 1,000 models read from an upstream (a list longer
/// than that is not a model list).
const MOST_PAGES: usize = 5;
/// The largest page body read.
const MOST_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// The API version the list is asked with when the client named none.
const DEFAULT_API_VERSION: &str = "2023-06-01";

/// The upstream's model list as last read, and when.
#[derive(Default)]
pub(super) struct UpstreamModels {
    last: Mutex<Option<(Instant, Arc<Vec<ModelEntry>>)>>,
    /// Held while the list is read: one read at a time per instance.
    reading: tokio::sync::Mutex<()>,
}

impl UpstreamModels {
    fn last(&self, fresh: bool) -> Option<Arc<Vec<ModelEntry>>> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(at, _)| !fresh || at.elapsed() < MODEL_LIST_TTL)
            .map(|(_, list)| Arc::clone(list))
    }
}

/// Answers `GET /v1/models` (`id` `None`) or `GET /v1/models/{id}` for the
/// key the call presents.
pub(super) async fn answer(call: Call, id: Option<&str>) -> Result<Response, ApiError> {
    let record = call.authenticate(None).await?;
    let state = &call.state;
    let (in_force, upstream) = tokio::join!(state.in_force(), upstream_models(&call));
    let (in_force, upstream) = (in_force?, upstream?);
    let pool = state.0.upstream.pool().await?;
    let served = |model: &str| pool.upstreams.iter().any(|u| u.serves(Some(model)));
    let models = key_models(&upstream, &in_force.aliases, &record, served);
    match id {
        Some(id) => match models.into_iter().find(|m| m.id == id) {
            Some(model) => Ok(Json(model).into_response()),
            None => Err(ApiError::not_found(format!(
                "model: {}",
                id.chars().take(256).collect::<String>()
            ))),
        },
        None => {
            let query: ModelsQuery = call
                .parts
                .uri
                .query()
                .map(serde_urlencoded::from_str)
                .transpose()
                .map_err(|e| ApiError::bad_request(format!("query: {e}")))?
                .unwrap_or_default();
            let page = page(&models, &query).map_err(ApiError::bad_request)?;
            Ok(Json(page).into_response())
        }
    }
}

/// The upstream's list: as kept if fresh; else read again, the stale one
/// serving if that fails (the list changes rarely, and a model picker
/// should not go blank because an upstream blinked).
async fn upstream_models(call: &Call) -> Result<Arc<Vec<ModelEntry>>, ApiError> {
    let kept = &call.state.0.models;
    if let Some(list) = kept.last(true) {
        return Ok(list);
    }
    let _reading = kept.reading.lock().await;
    if let Some(list) = kept.last(true) {
        return Ok(list);
    }
    match read_upstream_models(&call.state, &call.parts.headers).await {
        Ok(list) => {
            let list = Arc::new(list);
            let mut last = kept.last.lock().unwrap_or_else(|e| e.into_inner());
            *last = Some((Instant::now(), Arc::clone(&list)));
            Ok(list)
        }
        Err(err) => match kept.last(false) {
            Some(stale) => {
                tracing::warn!(error = %err, "model list not read again; using the one read before");
                Ok(stale)
            }
            None => Err(err),
        },
    }
}

/// Every page of the list, from the upstreams in the pool's order (a
/// Bedrock upstream answers from its model map).
async fn read_upstream_models(
    state: &ProxyState,
    client: &HeaderMap,
) -> Result<Vec<ModelEntry>, ApiError> {
    let order = candidates_for(state, None, None).await?;
    let health = SharedHealth::of(state);
    let path = CanonicalPath::parse("/v1/models")
        .map_err(|e| ApiError::internal(anyhow::anyhow!("model list path: {e:?}")))?;
    let mut headers = HeaderMap::new();
    let version = client
        .get("anthropic-version")
        .cloned()
        .unwrap_or(HeaderValue::from_static(DEFAULT_API_VERSION));
    headers.insert("anthropic-version", version);
    let mut models = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..MOST_PAGES {
        let query = match &after {
            Some(id) => format!("limit=1000&after_id={}", urlencode(id)),
            None => "limit=1000".to_owned(),
        };
        let request = ForwardRequest {
            method: Method::GET,
            path: path.clone(),
            query: Some(query),
            headers: headers.clone(),
            body: Bytes::new(),
        };
        let response = state
            .0
            .upstream
            .send_to(&request, RetryPolicy::Retryable, &order, &health)
            .await?;
        if !response.status.is_success() {
            return Err(ApiError::UpstreamFailed(format!(
                "the upstream's model list answered {}",
                response.status
            )));
        }
        let body = collect_bounded(response.body, MOST_PAGE_BYTES).await;
        let page: UpstreamModelsPage = serde_json::from_slice(&body).map_err(|e| {
            ApiError::UpstreamFailed(format!("the upstream's model list is unreadable: {e}"))
        })?;
        let more = page.has_more;
        let last = page
            .last_id
            .or_else(|| page.data.last().map(|m| m.id.clone()));
        models.extend(page.data);
        match last {
            Some(last) if more => after = Some(last),
            _ => break,
        }
    }
    Ok(models)
}

/// A model id as a query value.
fn urlencode(id: &str) -> String {
    serde_urlencoded::to_string([("v", id)])
        .map(|pair| pair["v=".len()..].to_owned())
        .unwrap_or_default()
}
