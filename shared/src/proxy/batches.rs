//! Message Batches through the relay: creation admitted like the requests it
//! holds (allowlists, file ownership, the tier window counting each request,
//! the worst case reserved against the quota), each batch owned by the key
//! that created it, and its usage recorded exactly once from its results —
//! when they are first read whole through the relay, or by the collector,
//! whichever comes first.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::body::{self, MessagesFields};
use tracing::Instrument;

use super::context::Call;
use super::{ProxyState, tier_of};
use crate::domain::admission::{BudgetCheck, Charge, QuotaRule, RateLimit};
use crate::domain::budget::BudgetCharge;
use crate::domain::key::ApiKeyRecord;
use crate::domain::key::access::model_name_problem;
use crate::domain::model_catalog::ModelAliases;
use crate::domain::price::Attribute;
use crate::domain::route::CanonicalPath;
use crate::domain::usage::BatchTally;
use crate::domain::usage::{usage_from_json, worst_prompt_tokens};
use crate::domain::{self, format_timestamp};
use crate::error::ApiError;
use crate::http::{PageParams, page_json, unknown_page_anchor};
use crate::store::admission::Terms;
use crate::store::owned::{BatchRecord, OpenBatch, PENDING_STALE, PendingReservation};
use crate::store::settlement::SettleOutcome;
use crate::upstream::{
    BodyStream, ForwardRequest, RetryPolicy, UpstreamError, client_response_headers,
};

/// Where the scheduled collector is invoked (never through the route table;
/// only an invocation marked [`ScheduledInvocation`] is served).
pub const COLLECT_PATH: &str = "/__relay/collect-batches";

/// Marks a request that the platform's scheduler made (in Lambda: an
/// EventBridge schedule), never a client: see `lambda::into_router_request`.
#[derive(Debug, Clone, Copy)]
pub struct ScheduledInvocation;

/// A batch object or page larger than this is not one the upstream sends.
const MAX_OBJECT_BYTES: usize = 4 * 1024 * 1024;
/// One results line (a whole message) is at most this long.
const MAX_RESULT_LINE: usize = 32 * 1024 * 1024;

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    requests: Vec<BatchEntry<'a>>,
}

#[derive(Deserialize)]
struct BatchEntry<'a> {
    #[allow(dead_code)]
    custom_id: String,
    #[serde(borrow)]
    params: &'a RawValue,
}

/// The upstream's answer, read whole (batch objects and pages are small).
struct Buffered {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Buffered {
    /// The answer as the client gets it, its `results_url`s pointing at the relay.
    fn into_response(self) -> Response {
        let body = if self.status.is_success() {
            rewrite_results_urls(&self.body).unwrap_or(self.body)
        } else {
            self.body
        };
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = self.status;
        *response.headers_mut() = client_response_headers(&self.headers);
        response
    }

    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

async fn send_buffered(
    state: &ProxyState,
    forward: &ForwardRequest,
    policy: RetryPolicy,
) -> Result<Buffered, UpstreamError> {
    // Plain bytes: the relay reads (and rewrites) what comes back.
    let mut forward = forward.clone();
    forward.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let response = state.0.upstream.send(&forward, policy).await?;
    let body = read_whole(response.body, MAX_OBJECT_BYTES).await;
    Ok(Buffered {
        status: response.status,
        headers: response.headers,
        body,
    })
}

/// A body read whole, up to about `limit` bytes.
pub(super) async fn read_whole(mut body: BodyStream, limit: usize) -> Bytes {
    let mut out = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        out.extend_from_slice(&chunk);
        if out.len() > limit {
            break;
        }
    }
    Bytes::from(out)
}

/// A request of the relay's own to the upstream (no client headers).
fn own_request(method: Method, path: &str, body: Bytes) -> Result<ForwardRequest, ApiError> {
    let path = CanonicalPath::parse(path)
        .map_err(|e| ApiError::internal(anyhow::anyhow!("relay-made path `{path}`: {e}")))?;
    let mut headers = HeaderMap::new();
    headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if !body.is_empty() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Ok(ForwardRequest {
        method,
        path,
        query: None,
        headers,
        body,
    })
}

/// The relay's own address for a batch's results: relative, so it works
/// behind any base URL (the SDKs resolve it against theirs).
fn results_path(batch_id: &str) -> String {
    format!("/v1/messages/batches/{batch_id}/results")
}

fn rewrite_object(object: &mut Value) {
    let id = object.get("id").and_then(Value::as_str).map(str::to_owned);
    if let (Some(id), Some(url)) = (id, object.get_mut("results_url"))
        && url.is_string()
    {
        *url = Value::String(results_path(&id));
    }
}

/// A batch object (or a page of them) with `results_url` pointing at the
/// relay instead of the upstream, where the SDKs would follow it directly.
fn rewrite_results_urls(body: &[u8]) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    match value.get_mut("data").and_then(Value::as_array_mut) {
        Some(items) => items.iter_mut().for_each(rewrite_object),
        None => rewrite_object(&mut value),
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

fn not_found(batch_id: &str) -> ApiError {
    let shown: String = batch_id.chars().take(100).collect();
    ApiError::not_found(format!("no batch `{shown}` for this API key"))
}

/// No model writes more in one answer (the 5.5 models go to 128,000).
const MAX_OUTPUT_TOKENS: u64 = 1_000_000;

/// The worst case of one request: the bound of its prompt that hard-mode
/// messages are judged on too (`worst_prompt_tokens`: the whole context
/// window when input the upstream fetches or produces cannot be counted
/// from the body), plus `max_tokens`.
fn worst_case(params: &str, max_tokens: u64, context_window: u64) -> u64 {
    worst_prompt_tokens(params.as_bytes(), context_window).saturating_add(max_tokens)
}

/// `POST /v1/messages/batches`: every request checked, the batch's worst
/// case reserved in the admission write, then the creation forwarded and
/// the batch recorded as the key's.
pub(super) async fn create(call: Call, body: Bytes) -> Result<Response, ApiError> {
    let in_force = call.state.in_force().await?;
    let (plan, body) = BatchPlan::read(&body, &in_force.aliases)?;
    // The allowlist and prices judge each real model, never an alias.
    let named: Vec<Option<&str>> = plan.models.iter().map(|m| Some(m.as_str())).collect();
    let record = call.authenticate(Some(&named)).await?;
    let prices = &in_force.prices;
    if let Some(model) = plan
        .models
        .iter()
        .find(|model| prices.refuses(model, call.at))
    {
        return Err(super::messages::unpriced(model));
    }
    call.check_file_references(&body).await?;
    // Computed for every key: its limit may be set before the admission
    // write, which then reserves against it.
    let worst = worst_case_of(plan.sized, body::context_window(&call.parts.headers)).await?;
    let models: Vec<&str> = plan.models.iter().map(String::as_str).collect();
    let reserved = reserve(&call, &record, plan.requests, &models, worst).await?;
    let pending = PendingReservation {
        request_id: call.request_id.clone(),
        key_id: call.key.id().clone(),
        reserved_tokens: reserved,
        at: domain::epoch_seconds(call.at),
    };

    // Everything after admission runs to its end even if the client hangs
    // up (a dropped request future would leave a created batch unowned).
    let state = call.state.clone();
    let forward = call.forward(body);
    let batch = BatchRecord {
        batch_id: String::new(),
        key_id: call.key.id().clone(),
        recorded_at: String::new(),
        request_count: plan.requests,
        reserved_tokens: reserved,
        client_ip: call.ip.to_string(),
        settled_at: None,
        price_attributes: plan.price_attributes,
    };
    let request_id = call.request_id.clone();
    tokio::spawn(
        async move { forward_creation(&state, &forward, batch, &pending, &request_id).await }
            .in_current_span(),
    )
    .await
    .map_err(|e| ApiError::internal(e.into()))?
}

/// What admitting a batch needs from its body, every request checked.
struct BatchPlan {
    /// Each model named, once, for the allowlist.
    models: Vec<String>,
    /// Each request's params and its `max_tokens`, for the worst case.
    sized: Vec<(String, u64)>,
    requests: u64,
    /// What changes the price of its results: US inference if any request
    /// asks for it. Results do not say which request ran where, so one
    /// such request prices the whole batch at US rates: never under.
    price_attributes: Vec<Attribute>,
}

impl BatchPlan {
    /// The plan of `body`, and `body` as it goes upstream: each request
    /// that names an alias with its `params.model` replaced by the alias's
    /// model (only those bytes change), the plan naming real models.
    fn read(body: &Bytes, aliases: &ModelAliases) -> Result<(BatchPlan, Bytes), ApiError> {
        if !super::body::is_json_object(body) {
            return Err(ApiError::bad_request("request body must be a JSON object"));
        }
        let parsed: BatchBody<'_> = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("request body is not a valid batch: {e}"))
        })?;
        if parsed.requests.is_empty() {
            return Err(ApiError::bad_request(
                "`requests` must hold at least one request",
            ));
        }
        let mut models: Vec<String> = Vec::new();
        let mut sized = Vec::with_capacity(parsed.requests.len());
        let mut price_attributes = Vec::new();
        // The rewritten body, and how much of `body` it has taken.
        let mut resolved: Vec<u8> = Vec::new();
        let mut copied = 0;
        for (index, entry) in parsed.requests.iter().enumerate() {
            let (mut model, max_tokens, attributes) = read_request(index, entry.params.get())?;
            if let Some(alias) = aliases.resolve(&model) {
                let params = entry.params.get().as_bytes();
                // The raw params borrow from `body`: their place is where they point.
                let start = (params.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
                let with_model = crate::domain::model_catalog::with_model(params, &alias.model)
                    .map_err(|e| {
                        ApiError::bad_request(format!("`requests[{index}].params`: {e}"))
                    })?;
                resolved.extend_from_slice(&body[copied..start]);
                resolved.extend_from_slice(&with_model);
                copied = start + params.len();
                model.clone_from(&alias.model);
            }
            if !models.contains(&model) {
                models.push(model);
            }
            for attribute in attributes {
                if !price_attributes.contains(&attribute) {
                    price_attributes.push(attribute);
                }
            }
            sized.push((entry.params.get().to_owned(), max_tokens));
        }
        let plan = BatchPlan {
            models,
            sized,
            requests: u64::try_from(parsed.requests.len()).unwrap_or(u64::MAX),
            price_attributes,
        };
        if copied == 0 {
            return Ok((plan, body.clone()));
        }
        resolved.extend_from_slice(&body[copied..]);
        Ok((plan, resolved.into()))
    }
}

/// One batch request's model and `max_tokens`, both required and checked,
/// and the attributes that change its price.
fn read_request(index: usize, params: &str) -> Result<(String, u64, Vec<Attribute>), ApiError> {
    let field = |name: &str| format!("requests[{index}].params.{name}");
    if !super::body::is_json_object(params.as_bytes()) {
        return Err(ApiError::bad_request(format!(
            "`requests[{index}].params` must be a JSON object"
        )));
    }
    let fields: MessagesFields = serde_json::from_str(params)
        .map_err(|e| ApiError::bad_request(format!("`requests[{index}].params`: {e}")))?;
    let attributes = fields.price_attributes();
    let model = fields
        .model
        .ok_or_else(|| ApiError::bad_request(format!("`{}` is required", field("model"))))?;
    if let Some(problem) = model_name_problem(&model) {
        return Err(ApiError::bad_request(format!(
            "{}: {problem}",
            field("model")
        )));
    }
    let max_tokens = fields
        .max_tokens
        .as_ref()
        .and_then(Value::as_u64)
        .filter(|m| (1..=MAX_OUTPUT_TOKENS).contains(m))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "`{}` is required: an integer from 1 to {MAX_OUTPUT_TOKENS}",
                field("max_tokens")
            ))
        })?;
    Ok((model, max_tokens, attributes))
}

/// The batch's worst case in tokens (tokenizing is CPU work, off the async
/// threads).
async fn worst_case_of(sized: Vec<(String, u64)>, context_window: u64) -> Result<u64, ApiError> {
    tokio::task::spawn_blocking(move || {
        sized
            .iter()
            .map(|(params, max_tokens)| worst_case(params, *max_tokens, context_window))
            .fold(0u64, u64::saturating_add)
    })
    .await
    .map_err(|e| ApiError::internal(e.into()))
}

/// The admission write of a batch: its requests counted in the tier's
/// window and its worst case reserved, with the reservation recorded as
/// pending under the request id. Returns the tokens reserved.
async fn reserve(
    call: &Call,
    record: &ApiKeyRecord,
    requests: u64,
    models: &[&str],
    worst: u64,
) -> Result<u64, ApiError> {
    let state = &call.state;
    let tier = tier_of(state, &record.rate_limit_tier).await?;
    let charge = Charge {
        requests,
        quota: QuotaRule::Reserve {
            limit: record.token_limit,
            tokens: worst,
        },
        lease: false,
    };
    Ok(state
        .0
        .store
        .admit_batch(
            call.key.id(),
            &call.key.hash(),
            Terms {
                charge,
                rate: RateLimit {
                    requests: tier.requests,
                    period: tier.period,
                    // Batches are exempt from tokens per minute: they run
                    // asynchronously upstream, outside any minute of the
                    // key's, and their tokens are not counted in one
                    // (`domain::tpm`).
                    tokens_per_minute: None,
                },
                budget: BudgetCheck {
                    policy: &state.0.budgets,
                    models,
                    // A batch reserves its worst tokens in either mode.
                    worst: None,
                },
                now: call.at,
            },
            &call.request_id,
        )
        .await?)
}

/// Whether a failed creation may still have made a batch upstream.
fn may_have_created(answer: &Result<Buffered, UpstreamError>) -> bool {
    match answer {
        Ok(buffered) => buffered.status.is_server_error(),
        Err(UpstreamError::Timeout(_)) => true,
        Err(UpstreamError::Unreachable { source, .. }) => !source.is_connect(),
        Err(_) => false,
    }
}

/// Sends an admitted creation upstream and records the new batch as the
/// key's before answering.
async fn forward_creation(
    state: &ProxyState,
    forward: &ForwardRequest,
    mut batch: BatchRecord,
    pending: &PendingReservation,
    request_id: &str,
) -> Result<Response, ApiError> {
    // A repeat after a server error could make a second batch nobody owns.
    let answer = send_buffered(state, forward, RetryPolicy::UnlessProcessed).await;
    let created = match &answer {
        Ok(buffered) if buffered.status.is_success() => buffered
            .json()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned)),
        _ => None,
    };
    let Some(batch_id) = created else {
        if may_have_created(&answer) {
            // The reservation stays pending (the collector gives it back
            // after PENDING_STALE): the upstream may have made the batch.
            tracing::error!(request_id, key_id = %batch.key_id, "batch creation ended without a clear answer; its reservation stays pending");
        } else {
            release(state, pending).await;
        }
        return match answer {
            Ok(buffered) => Ok(buffered.into_response()),
            Err(err) => Err(err.into()),
        };
    };
    batch.batch_id = batch_id.clone();
    batch.recorded_at = format_timestamp(domain::now());
    if let Err(err) = record_owned(state, || {
        state
            .0
            .store
            .record_batch(&batch, request_id, domain::now())
    })
    .await
    {
        // Not left unowned: canceled at once (its reservation stays pending
        // until the collector gives it back).
        tracing::error!(batch_id, error = %format!("{err:#}"), "could not record a new batch; canceling it");
        cancel_unowned(state, &batch_id).await;
        return Err(ApiError::unavailable(
            "the relay could not record the new batch as yours, so it was canceled; retry shortly",
            err.into(),
        ));
    }
    tracing::info!(
        batch_id,
        requests = batch.request_count,
        reserved = batch.reserved_tokens,
        "batch created"
    );
    match answer {
        Ok(buffered) => Ok(buffered.into_response()),
        Err(err) => Err(err.into()),
    }
}

/// Retries an ownership write while the host waits (the answer is held
/// until it lands: an object must never be handed out unowned).
pub(super) async fn record_owned<F, Fut>(
    state: &ProxyState,
    write: F,
) -> Result<(), crate::store::StoreError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::store::StoreError>>,
{
    let deadline = std::time::Instant::now() + state.0.config.settle_inline;
    let mut pause = Duration::from_millis(50);
    loop {
        match write().await {
            Ok(()) => return Ok(()),
            Err(crate::store::StoreError::Unavailable(err))
                if std::time::Instant::now() + pause < deadline =>
            {
                tracing::warn!(error = %format!("{err:#}"), "ownership write postponed");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(err) => return Err(err),
        }
    }
}

async fn cancel_unowned(state: &ProxyState, batch_id: &str) {
    let path = format!("/v1/messages/batches/{batch_id}/cancel");
    let Ok(request) = own_request(Method::POST, &path, Bytes::new()) else {
        return;
    };
    match send_buffered(state, &request, RetryPolicy::Retryable).await {
        Ok(answer) if answer.status.is_success() => {
            tracing::warn!(batch_id, "unowned batch canceled");
        }
        Ok(answer) => {
            tracing::error!(
                batch_id,
                status = answer.status.as_u16(),
                "unowned batch could not be canceled: cancel it by hand"
            );
        }
        Err(err) => {
            tracing::error!(batch_id, error = %err, "unowned batch could not be canceled: cancel it by hand");
        }
    }
}

/// Gives a creation's reservation back (the collector does it later if
/// the database is unavailable now).
async fn release(state: &ProxyState, pending: &PendingReservation) {
    if pending.reserved_tokens == 0 {
        return;
    }
    if let Err(err) = state.0.store.release_reservation(pending).await {
        tracing::warn!(error = %format!("{err:#}"), "reservation not released now; the collector will");
    }
}

/// The key's record of `batch_id`, or 404 (whoever else may own it).
async fn owned(call: &Call, batch_id: &str) -> Result<BatchRecord, ApiError> {
    call.authenticate(None).await?;
    call.state
        .0
        .store
        .batch(call.key.id(), batch_id)
        .await?
        .ok_or_else(|| not_found(batch_id))
}

/// `GET /v1/messages/batches/{id}` and `POST …/cancel`.
pub(super) async fn object(call: Call, batch_id: &str, body: Bytes) -> Result<Response, ApiError> {
    owned(&call, batch_id).await?;
    let answer = send_buffered(&call.state, &call.forward(body), RetryPolicy::Retryable)
        .await
        .map_err(ApiError::from)?;
    Ok(answer.into_response())
}

/// `DELETE /v1/messages/batches/{id}`: its usage is recorded first, since
/// a deleted batch's results can no longer be read.
pub(super) async fn delete(call: Call, batch_id: &str) -> Result<Response, ApiError> {
    let batch = owned(&call, batch_id).await?;
    // Forwarded only once the usage is recorded: a batch that ends while
    // its deletion is on the way would otherwise take its results along.
    if batch.settled_at.is_none()
        && let Collected::Running = settle_from_upstream(&call.state, &batch).await?
    {
        return Err(ApiError::bad_request(format!(
            "batch `{batch_id}` has not ended: cancel it and wait until it has ended to delete it"
        )));
    }
    let answer = send_buffered(
        &call.state,
        &call.forward(Bytes::new()),
        RetryPolicy::Retryable,
    )
    .await
    .map_err(ApiError::from)?;
    if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND {
        call.state
            .0
            .store
            .delete_batch_record(call.key.id(), batch_id)
            .await?;
    }
    Ok(answer.into_response())
}

/// `GET /v1/messages/batches`: the key's own batches from the relay's
/// records, each as the upstream describes it now.
pub(super) async fn list(call: Call) -> Result<Response, ApiError> {
    call.authenticate(None).await?;
    let params = PageParams::from_query(call.parts.uri.query().unwrap_or(""))?;
    let (limit, from) = params.page()?;
    let page = call
        .state
        .0
        .store
        .list_batches(call.key.id(), from, limit)
        .await?
        .ok_or_else(unknown_page_anchor)?;
    let ids: Vec<String> = page.items.iter().map(|b| b.batch_id.clone()).collect();
    let fetched: Vec<Result<Option<Value>, ApiError>> =
        futures_util::stream::iter(ids.into_iter().map(|batch_id| {
            let state = call.state.clone();
            async move { current_object(&state, &batch_id).await }
        }))
        .buffered(8)
        .collect()
        .await;
    let mut data = Vec::new();
    let mut ids = Vec::new();
    for object in fetched {
        if let Some(object) = object? {
            if let Some(id) = object.get("id").and_then(Value::as_str) {
                ids.push(id.to_owned());
            }
            data.push(object);
        }
    }
    Ok(page_json(data, &ids, page.has_more).into_response())
}

/// A batch object as the upstream describes it now (`None`: it is gone).
async fn current_object(state: &ProxyState, batch_id: &str) -> Result<Option<Value>, ApiError> {
    let path = format!("/v1/messages/batches/{batch_id}");
    let request = own_request(Method::GET, &path, Bytes::new())?;
    let answer = send_buffered(state, &request, RetryPolicy::Retryable)
        .await
        .map_err(ApiError::from)?;
    match answer.status {
        s if s.is_success() => Ok(answer.json().map(|mut object| {
            rewrite_object(&mut object);
            object
        })),
        StatusCode::NOT_FOUND => Ok(None),
        status => Err(ApiError::UpstreamFailed(format!(
            "the Anthropic API answered {status} for a batch; retry shortly"
        ))),
    }
}

/// Adds up a results body line by line as it passes: usage per model of
/// the succeeded requests, and the count of every outcome.
#[derive(Default)]
pub struct ResultsTally {
    line: Vec<u8>,
    tally: BatchTally,
    lines: u64,
    /// A line could not be read: the sum is not trustworthy.
    broken: bool,
}

#[derive(Deserialize)]
struct ResultLine<'a> {
    #[serde(borrow)]
    result: ResultBody<'a>,
}

#[derive(Deserialize)]
struct ResultBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, borrow)]
    message: Option<&'a RawValue>,
}

impl ResultsTally {
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while let Some(end) = chunk.iter().position(|b| *b == b'\n') {
            self.push(&chunk[..end]);
            let line = std::mem::take(&mut self.line);
            self.read_line(&line);
            self.line = line;
            self.line.clear();
            chunk = &chunk[end + 1..];
        }
        self.push(chunk);
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() > MAX_RESULT_LINE {
            self.broken = true;
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn read_line(&mut self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.lines += 1;
        let Ok(parsed) = serde_json::from_slice::<ResultLine<'_>>(line) else {
            self.broken = true;
            return;
        };
        match parsed.result.kind.as_str() {
            "succeeded" => {
                let usage = parsed
                    .result
                    .message
                    .and_then(|m| usage_from_json(m.get().as_bytes()));
                let Some(state) = usage else {
                    self.broken = true;
                    return;
                };
                self.tally.succeeded += 1;
                let model = state.model.unwrap_or_else(|| "unknown".into());
                let entry = self.tally.by_model.entry(model).or_default();
                entry.0 += state.usage;
                entry.1 += 1;
            }
            "errored" => self.tally.errored += 1,
            "canceled" => self.tally.canceled += 1,
            "expired" => self.tally.expired += 1,
            _ => self.broken = true,
        }
    }

    /// The whole tally, if the body held one readable line per request.
    pub fn finish(mut self, requests: u64) -> Option<BatchTally> {
        let rest = std::mem::take(&mut self.line);
        self.read_line(&rest);
        (!self.broken && self.lines == requests).then_some(self.tally)
    }
}

/// Records a batch's usage from a tally, priced at batch prices, once;
/// logs what happened.
async fn settle(
    state: &ProxyState,
    batch: &BatchRecord,
    tally: BatchTally,
) -> Result<(), ApiError> {
    let at = domain::now();
    let prices = state.prices().await?;
    let priced = tally.priced(&prices, &batch.price_attributes, at);
    // The batch's cost counts against the dollar limits in force when it
    // is settled, each limit taking the models it applies to.
    let (spend, watches) = match state.0.store.get_key(&batch.key_id).await? {
        Some(record) => {
            let costs: Vec<(&str, u64)> = priced
                .model_counters()
                .map(|(model, counters)| (model, counters.cost_micro_usd))
                .collect();
            (
                BudgetCharge::per_counter_costs(&record, &state.0.budgets, &costs, at),
                BudgetCharge::alert_watches(&record, &state.0.budgets, at),
            )
        }
        None => Default::default(),
    };
    let outcome = state
        .0
        .store
        .settle_batch(batch, &priced, &spend, at, state.0.config.log_retention)
        .await?;
    tracing::info!(batch_id = %batch.batch_id, key_id = %batch.key_id, ?outcome, tokens = priced.tally.total().billed(), "batch usage settled");
    // The budget alerts the batch's cost made due, judged from the key as
    // read before its settlement.
    if outcome == SettleOutcome::Recorded {
        let due: Vec<_> = watches
            .iter()
            .flat_map(|watch| watch.due(spend.get(&watch.counter).copied().unwrap_or(0)))
            .collect();
        if !due.is_empty() {
            super::alerting(state).send(&batch.key_id, due).await;
        }
    }
    Ok(())
}

/// Records a batch's usage once its results were read whole; else (or if
/// DynamoDB fails) the collector will.
async fn settle_at_read(state: &ProxyState, batch: &BatchRecord, tally: ResultsTally) {
    match tally.finish(batch.request_count) {
        Some(tally) => {
            if let Err(err) = settle(state, batch, tally).await {
                tracing::warn!(error = %err, "batch usage not settled at read; the collector will");
            }
        }
        None => {
            tracing::warn!(batch_id = %batch.batch_id, "batch results incomplete; the collector will settle")
        }
    }
}

/// `GET /v1/messages/batches/{id}/results`: streamed through, added up on
/// the side; a whole, well-formed body records the batch's usage before
/// the answer ends.
pub(super) async fn results(call: Call, batch_id: &str) -> Result<Response, ApiError> {
    let batch = owned(&call, batch_id).await?;
    let mut forward = call.forward(Bytes::new());
    // The tally reads plain bytes.
    forward.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let response = call
        .state
        .0
        .upstream
        .send(&forward, RetryPolicy::Retryable)
        .await
        .map_err(ApiError::from)?;
    let status = response.status;
    let headers = client_response_headers(&response.headers);
    let body = if status.is_success() && batch.settled_at.is_none() {
        let state = call.state.clone();
        // The body is read after the handler returned, outside the
        // request's span: the settlement at its end re-enters it.
        let span = tracing::Span::current();
        let stream = futures_util::stream::unfold(
            Some((response.body, ResultsTally::default(), state, batch)),
            move |current| {
                let span = span.clone();
                async move {
                    let (mut body, mut tally, state, batch) = current?;
                    match body.next().await {
                        Some(Ok(chunk)) => {
                            tally.feed(&chunk);
                            Some((Ok(chunk), Some((body, tally, state, batch))))
                        }
                        Some(Err(err)) => Some((Err(std::io::Error::other(err.to_string())), None)),
                        None => {
                            settle_at_read(&state, &batch, tally).instrument(span).await;
                            None
                        }
                    }
                }
            },
        );
        Body::from_stream(stream)
    } else {
        Body::from_stream(
            response
                .body
                .map(|chunk| chunk.map_err(|e| std::io::Error::other(e.to_string()))),
        )
    };
    let mut answer = Response::new(body);
    *answer.status_mut() = status;
    *answer.headers_mut() = headers;
    Ok(answer)
}

/// What the collector did in one pass.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CollectReport {
    pub settled: u64,
    pub still_running: u64,
    pub released_reservations: u64,
    pub abandoned: u64,
    pub failures: u64,
    /// Message requests whose settlement never came (`proxy::reconcile`).
    pub reconciled: super::reconcile::ReconcileReport,
}

/// Whether a batch's usage was recorded by [`settle_from_upstream`].
enum Collected {
    Settled,
    Running,
    Abandoned,
}

/// Reads an ended batch's results from the upstream and records its usage;
/// a batch the upstream no longer knows is charged its reservation, marked
/// estimated (its real usage cannot be known any more).
async fn settle_from_upstream(
    state: &ProxyState,
    batch: &BatchRecord,
) -> Result<Collected, ApiError> {
    let Some(object) = current_object(state, &batch.batch_id).await? else {
        tracing::error!(batch_id = %batch.batch_id, key_id = %batch.key_id, reserved = batch.reserved_tokens, "batch vanished upstream before its usage was read; its reservation is charged as an estimate");
        settle(state, batch, BatchTally::abandoned(batch.reserved_tokens)).await?;
        return Ok(Collected::Abandoned);
    };
    if object.get("processing_status").and_then(Value::as_str) != Some("ended") {
        return Ok(Collected::Running);
    }
    let results = own_request(Method::GET, &results_path(&batch.batch_id), Bytes::new())?;
    let response = state
        .0
        .upstream
        .send(&results, RetryPolicy::Retryable)
        .await
        .map_err(ApiError::from)?;
    if !response.status.is_success() {
        return Err(ApiError::UpstreamFailed(format!(
            "the Anthropic API answered {} for a batch's results",
            response.status
        )));
    }
    let mut body = response.body;
    let mut tally = ResultsTally::default();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::UpstreamFailed(format!("batch results cut: {e}")))?;
        tally.feed(&chunk);
    }
    let tally = tally.finish(batch.request_count).ok_or_else(|| {
        ApiError::UpstreamFailed("the batch's results could not be read whole".into())
    })?;
    settle(state, batch, tally).await?;
    Ok(Collected::Settled)
}

/// One pass of the collector: gives back reservations of creations that
/// died before recording their batch, and records the usage of every open
/// batch that has ended. Safe to run anywhere, any number of times at once.
pub async fn collect(state: &ProxyState) -> CollectReport {
    collect_as_of(state, domain::now()).await
}

/// [`collect`] as if it were `now` (tests age pending reservations).
pub async fn collect_as_of(state: &ProxyState, now: time::OffsetDateTime) -> CollectReport {
    let mut report = CollectReport {
        reconciled: super::reconcile::reconcile(state, now, state.0.config.reconcile_after).await,
        ..CollectReport::default()
    };
    let (open, pending) = match state.0.store.batch_queue().await {
        Ok(queue) => queue,
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), "batch collector could not read its queue");
            report.failures += 1;
            return report;
        }
    };
    let now = domain::epoch_seconds(now);
    for reservation in pending {
        if now.saturating_sub(reservation.at) < PENDING_STALE.as_secs() {
            continue;
        }
        match state.0.store.release_reservation(&reservation).await {
            Ok(true) => report.released_reservations += 1,
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "could not release a stale reservation");
                report.failures += 1;
            }
        }
    }
    for OpenBatch { batch_id, key_id } in open {
        let batch = match state.0.store.batch(&key_id, &batch_id).await {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                // Its record is gone (expired): nothing left to settle against.
                if let Err(err) = state.0.store.close_open_batch(&batch_id).await {
                    tracing::warn!(error = %format!("{err:#}"), "could not drop an orphaned queue entry");
                    report.failures += 1;
                }
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "batch collector could not read a batch");
                report.failures += 1;
                continue;
            }
        };
        match settle_from_upstream(state, &batch).await {
            Ok(Collected::Settled) => report.settled += 1,
            Ok(Collected::Running) => report.still_running += 1,
            Ok(Collected::Abandoned) => report.abandoned += 1,
            Err(err) => {
                tracing::warn!(batch_id, error = %err, "batch collector could not settle a batch");
                report.failures += 1;
            }
        }
    }
    report
}

/// The scheduled invocation of the collector (EventBridge in AWS): served
/// only to requests the platform marked as scheduled; anyone else gets the
/// route table's answer for an unknown path.
pub(super) async fn scheduled_collect(
    State(state): State<ProxyState>,
    request: axum::extract::Request,
) -> Response {
    if request.method() != Method::POST
        || request.extensions().get::<ScheduledInvocation>().is_none()
    {
        return ApiError::not_found("this relay does not serve that path (see its route table)")
            .into_response();
    }
    let report = collect(&state).await;
    tracing::info!(?report, "batch collector pass");
    axum::Json(report).into_response()
}

/// Runs the collector every `every` (relay-local's timer).
pub async fn collect_every(state: ProxyState, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let report = collect(&state).await;
        if report != CollectReport::default() {
            tracing::info!(?report, "batch collector pass");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::CONTEXT_WINDOW;

    const LINES: &str = concat!(
        r#"{"custom_id":"a","result":{"type":"succeeded","message":{"id":"m","type":"message","model":"claude-haiku-5-5","usage":{"input_tokens":10,"output_tokens":5,"cache_read_input_tokens":2}}}}"#,
        "\n",
        r#"{"custom_id":"b","result":{"type":"errored","error":{"type":"error","error":{"type":"invalid_request_error","message":"x"}}}}"#,
        "\n",
        r#"{"custom_id":"c","result":{"type":"succeeded","message":{"id":"m","type":"message","model":"claude-opus-5-5","usage":{"input_tokens":7,"output_tokens":3}}}}"#,
        "\n",
        r#"{"custom_id":"d","result":{"type":"canceled"}}"#,
        "\n",
    );

    #[test]
    fn results_add_up_per_model_however_they_are_split() {
        for size in [1, 7, 97, 4096] {
            let mut tally = ResultsTally::default();
            LINES.as_bytes().chunks(size).for_each(|c| tally.feed(c));
            let tally = tally.finish(4).unwrap();
            assert_eq!((tally.succeeded, tally.errored, tally.canceled), (2, 1, 1));
            assert_eq!(tally.total().billed(), 10 + 5 + 2 + 7 + 3, "chunk {size}");
            assert_eq!(tally.by_model["claude-opus-5-5"].0.output_tokens, 3);
        }
    }

    #[test]
    fn a_short_or_garbled_body_is_not_a_tally() {
        let mut short = ResultsTally::default();
        short.feed(LINES.as_bytes());
        assert!(short.finish(5).is_none(), "a line is missing");
        let mut garbled = ResultsTally::default();
        garbled.feed(b"{not json}\n");
        assert!(garbled.finish(1).is_none());
        let mut unterminated = ResultsTally::default();
        unterminated.feed(LINES.trim_end().as_bytes());
        assert!(
            unterminated.finish(4).is_some(),
            "the last line needs no newline"
        );
    }

    #[test]
    fn the_worst_case_bounds_what_a_request_can_cost() {
        let text = r#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"say hello to the world"}]}"#;
        let worst = worst_case(text, 100, CONTEXT_WINDOW);
        assert!((105..1000).contains(&worst), "{worst}");
        // An image counts at a fixed bound, whatever its source.
        let image = r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"file","file_id":"file_1"}}]}]}"#;
        assert!((6_000..10_000).contains(&worst_case(image, 1, CONTEXT_WINDOW)));
        // Input the upstream fetches or produces itself: the whole window.
        for params in [
            r#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"https://x/a.pdf"}}]}]}"#,
            r#"{"messages":[],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
            r#"{"messages":[],"mcp_servers":[{"type":"url","url":"https://mcp","name":"m"}]}"#,
            r#"{"messages":[],"container":"container_1"}"#,
        ] {
            assert_eq!(
                worst_case(params, 1, CONTEXT_WINDOW),
                CONTEXT_WINDOW + 1,
                "{params}"
            );
        }
        let client_tools = r#"{"messages":[],"tools":[{"name":"f","input_schema":{}},{"type":"bash_20250124","name":"bash"}]}"#;
        // Client tools are counted (with the tool-use system prompt), not
        // the window.
        assert!(worst_case(client_tools, 1, CONTEXT_WINDOW) < 5_000);
        // Never more input than the window, and no overflow.
        let huge = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "word ".repeat(300_000)
        );
        assert_eq!(worst_case(&huge, u64::MAX, CONTEXT_WINDOW), u64::MAX);
        assert_eq!(worst_case(&huge, 5, CONTEXT_WINDOW), CONTEXT_WINDOW + 5);
    }

    #[test]
    fn results_urls_point_at_the_relay() {
        let object = br#"{"id":"msgbatch_1","results_url":"https://api.anthropic.com/v1/messages/batches/msgbatch_1/results"}"#;
        let rewritten: Value =
            serde_json::from_slice(&rewrite_results_urls(object).unwrap()).unwrap();
        assert_eq!(
            rewritten["results_url"],
            "/v1/messages/batches/msgbatch_1/results"
        );
        let page =
            br#"{"data":[{"id":"b1","results_url":null},{"id":"b2","results_url":"https://x/y"}]}"#;
        let rewritten: Value =
            serde_json::from_slice(&rewrite_results_urls(page).unwrap()).unwrap();
        assert_eq!(rewritten["data"][0]["results_url"], Value::Null);
        assert_eq!(
            rewritten["data"][1]["results_url"],
            "/v1/messages/batches/b2/results"
        );
    }
}
