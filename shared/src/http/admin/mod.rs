//! The admin function's routes: login, key management, tiers and prices. Everything
//! but login requires an admin JWT; every route, login included, answers only
//! callers inside `ADMIN_ALLOWED_CIDRS` when that is set. Request and answer
//! shapes are in `shapes`.

mod model_aliases;
mod prices;
pub(crate) mod shapes;
mod upstreams;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http::request::Parts;
use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::json;

pub use self::prices::{MAX_PRICE_LIST_BODY, PriceVersionView, PricesView};
pub use self::shapes::{
    BatchView, CreateKeyInput, Deleted, KeyList, KeyView, PatchKeyInput, TierInput, TierList,
    TokenAnswer,
};
use super::{
    ClientIp, JsonBody, NoParams, PageParams, QueryParams, bearer_token, method_not_allowed,
    not_found, page_json, unknown_page_anchor,
};
use crate::admin_auth::{self, Claims};
use crate::config::AdminConfig;
use crate::domain::budget::BudgetPolicy;
use crate::domain::key::{FieldError, KeyChanges};
use crate::domain::key::{KeyId, PresentedKey};
use crate::domain::tier::validate_tier_name;
use crate::domain::{self};
use crate::error::ApiError;
use crate::secrets::{SecretValues, Secrets};
use crate::store::Store;

#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub secrets: Secrets,
    pub config: Arc<AdminConfig>,
    pub budgets: Arc<BudgetPolicy>,
}

/// The admin function's whole router, with its own fallbacks.
pub fn router(state: AdminState) -> Router {
    routes(state).fallback(not_found)
}

/// The admin routes alone, for merging into the local server.
pub fn routes(state: AdminState) -> Router {
    let guard = axum::middleware::from_fn_with_state(state.clone(), only_from_allowed_networks);
    Router::new()
        .route("/admin/login", post(login))
        .route("/admin/api-keys", post(create_key).get(list_keys))
        .route(
            "/admin/api-keys/{id}",
            get(get_key).patch(patch_key).delete(delete_key),
        )
        .route("/admin/api-keys/{id}/disable", post(disable_key))
        .route("/admin/api-keys/{id}/enable", post(enable_key))
        .route("/admin/api-keys/{id}/rotate", post(rotate_key))
        .route("/admin/api-keys/{id}/usage", get(key_usage))
        .route("/admin/api-keys/{id}/usage/daily", get(key_usage_daily))
        .route("/admin/api-keys/{id}/usage/logs", get(key_usage_logs))
        .route("/admin/api-keys/{id}/usage/quota", get(key_usage_quota))
        .route(
            "/admin/api-keys/{id}/usage/sessions",
            get(key_usage_sessions),
        )
        .route(
            "/admin/api-keys/{id}/usage/request-classes",
            get(key_usage_request_classes),
        )
        .route("/admin/api-keys/{id}/batches", get(key_batches))
        .route("/admin/api-keys/{id}/files", get(key_files))
        .route("/admin/usage", get(all_usage))
        .route("/admin/metrics", get(metrics))
        .route("/admin/tiers", get(list_tiers))
        .route("/admin/tiers/{name}", put(put_tier))
        .route(
            "/admin/prices",
            get(prices::get_prices).put(prices::put_prices),
        )
        .route("/admin/prices/history", get(prices::price_history))
        .route(
            "/admin/model-aliases",
            get(model_aliases::get_aliases).put(model_aliases::put_aliases),
        )
        .route("/admin/upstreams", get(upstreams::list_upstreams))
        // The console's page and files: no token (its API calls carry one),
        // but behind the same address check as the API.
        .merge(super::console::admin_routes())
        // Unknown admin paths stay here (404), never reaching the proxy.
        .route("/admin", axum::routing::any(not_found))
        .route("/admin/", axum::routing::any(not_found))
        .route("/admin/{*rest}", axum::routing::any(not_found))
        .method_not_allowed_fallback(method_not_allowed)
        // The address check refuses callers outside ADMIN_ALLOWED_CIDRS
        // before any route, extractor or store call sees the request (the
        // request id is the composed app's outer layer, `app::App`).
        .layer(guard)
        .with_state(state)
}

/// Refuses (403) every admin route, login included, to a caller outside
/// `AdminConfig::allowed_networks`, judged by the address the platform saw
/// (`ClientIp`).
async fn only_from_allowed_networks(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Response {
    // No list: every address may call, and a router served without a
    // client address (a test's `oneshot`) still works.
    if state.config.allowed_networks.is_empty() {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let ClientIp(ip) = match ClientIp::from_request_parts(&mut parts, &state).await {
        Ok(ip) => ip,
        Err(err) => return err.into_response(),
    };
    if !state.config.admits(ip) {
        tracing::warn!(
            %ip,
            path = parts.uri.path(),
            "admin call from an address outside ADMIN_ALLOWED_CIDRS"
        );
        return ApiError::forbidden("the admin API is not reachable from this address")
            .into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

impl From<FieldError> for ApiError {
    fn from(err: FieldError) -> Self {
        ApiError::unprocessable(err.to_string())
    }
}

fn epoch_now() -> u64 {
    domain::epoch_seconds(domain::now())
}

fn jwt_secret(secrets: &SecretValues) -> Result<&str, ApiError> {
    secrets.jwt_secret.as_deref().ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!(
            "no JWT secret configured (SECRET_KEY or jwt_secret in the secret)"
        ))
    })
}

/// Proof that the request carries a valid admin JWT.
pub struct Admin(#[allow(dead_code)] Claims);

impl FromRequestParts<AdminState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        let token = bearer_token(parts).ok_or_else(|| {
            ApiError::unauthorized(
                "missing admin token: send `Authorization: Bearer <access_token>` from POST /admin/login",
            )
        })?;
        let secrets = state.secrets.current().await?;
        admin_auth::verify_token(jwt_secret(&secrets)?, token)
            .map(Admin)
            .ok_or_else(|| ApiError::unauthorized("invalid or expired admin token"))
    }
}

fn basic_challenge(err: ApiError) -> Response {
    let mut response = err.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Basic realm=\"relay-admin\""),
    );
    response
}

fn locked_out(wait: u64) -> ApiError {
    crate::metrics::emit_event("admin", "AdminLogins", "locked");
    ApiError::rate_limited(
        format!("too many failed logins from this address; try again in {wait} seconds"),
        wait,
    )
}

async fn login(
    State(state): State<AdminState>,
    ClientIp(ip): ClientIp,
    headers: http::HeaderMap,
) -> Result<Response, ApiError> {
    let now = epoch_now();
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(admin_auth::parse_basic);
    let Some((user, password)) = credentials else {
        // No password to check, so no check slot is taken; a locked-out
        // address still hears that it is locked out.
        if let Some(wait) = state.store.login_lockout(ip, now).await? {
            return Err(locked_out(wait));
        }
        return Ok(basic_challenge(ApiError::unauthorized(
            "send the admin username and password with HTTP Basic authentication",
        )));
    };
    let secrets = state.secrets.current().await?;
    let hash = secrets.admin_password_hash.clone().ok_or_else(|| {
        ApiError::internal(anyhow::anyhow!(
            "no admin password configured (ADMIN_PASSWORD_HASH or admin_password_hash in the secret)"
        ))
    })?;
    // The slot is taken before bcrypt, in one conditional write: reading
    // the lockout first and counting the failure after would let a burst
    // of concurrent guesses all be checked.
    if let Some(wait) = state.store.take_login_check(ip, now).await? {
        return Err(locked_out(wait));
    }
    let expected_user = state.config.admin_username.clone();
    let check_user = user.clone();
    let matched = tokio::task::spawn_blocking(move || {
        admin_auth::credentials_match(&expected_user, &hash, &check_user, &password)
    })
    .await
    .map_err(|e| ApiError::internal(e.into()))?;
    if !matched {
        // The slot stays taken: that is the failure counted.
        crate::metrics::emit_event("admin", "AdminLogins", "failure");
        tracing::warn!(%ip, "failed admin login");
        return Ok(basic_challenge(ApiError::unauthorized(
            "invalid username or password",
        )));
    }
    state.store.clear_login_failures(ip).await?;
    crate::metrics::emit_event("admin", "AdminLogins", "success");
    let ttl = state.config.jwt_ttl;
    let token = admin_auth::issue_token(jwt_secret(&secrets)?, &user, now, ttl)
        .map_err(ApiError::internal)?;
    Ok(Json(TokenAnswer {
        access_token: token,
        token_type: "bearer",
        expires_in: ttl.as_secs(),
    })
    .into_response())
}

fn key_id(raw: &str) -> Result<KeyId, ApiError> {
    KeyId::parse(raw).ok_or_else(|| no_such_key(raw))
}

fn no_such_key(raw: &str) -> ApiError {
    let shown: String = raw.chars().take(64).filter(|c| !c.is_control()).collect();
    ApiError::not_found(format!("no API key with id `{shown}`"))
}

/// An unknown tier is a 422 naming the field.
async fn ensure_tier_exists(store: &Store, tier: &str) -> Result<(), ApiError> {
    if store.get_tier(tier).await?.is_none() {
        return Err(FieldError::new(
            "rate_limit_tier",
            format!("unknown tier `{tier}` (GET /admin/tiers lists them)"),
        )
        .into());
    }
    Ok(())
}

async fn create_key(
    _: Admin,
    State(state): State<AdminState>,
    JsonBody(input): JsonBody<CreateKeyInput>,
) -> Result<Response, ApiError> {
    let new = input.validate(crate::domain::tier::DEFAULT_TIER)?;
    ensure_tier_exists(&state.store, &new.rate_limit_tier).await?;
    let key = PresentedKey::generate();
    let record = state.store.create_key(&key, &new, domain::now()).await?;
    tracing::info!(key_id = %record.id, "API key created");
    Ok((
        StatusCode::CREATED,
        Json(KeyView::of(
            &record,
            Some(key.expose()),
            &state.budgets,
            domain::now(),
        )),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListKeysParams {
    limit: Option<usize>,
    cursor: Option<String>,
    active: Option<bool>,
}

const MAX_PAGE: usize = 100;

async fn list_keys(
    _: Admin,
    State(state): State<AdminState>,
    QueryParams(params): QueryParams<ListKeysParams>,
) -> Result<Json<KeyList>, ApiError> {
    let limit = params.limit.unwrap_or(20);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "query parameter `limit` must be between 1 and {MAX_PAGE}"
        )));
    }
    let page = state
        .store
        .list_keys(params.active, limit, params.cursor.as_deref())
        .await?
        .map_err(|e| ApiError::bad_request(format!("query parameter `cursor`: {e}")))?;
    Ok(Json(KeyList {
        data: page
            .keys
            .iter()
            .map(|k| KeyView::of(k, None, &state.budgets, domain::now()))
            .collect(),
        has_more: page.next_cursor.is_some(),
        next_cursor: page.next_cursor,
    }))
}

async fn get_key(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = key_id(&raw)?;
    let record = state
        .store
        .get_key(&id)
        .await?
        .ok_or_else(|| no_such_key(&raw))?;
    Ok(Json(KeyView::of(&record, None, &state.budgets, domain::now())).into_response())
}

async fn patch_key(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    JsonBody(input): JsonBody<PatchKeyInput>,
) -> Result<Response, ApiError> {
    let id = key_id(&raw)?;
    let changes = input.validate()?;
    if let Some(tier) = &changes.rate_limit_tier {
        ensure_tier_exists(&state.store, tier).await?;
    }
    apply_changes(&state, &id, &raw, &changes).await
}

async fn apply_changes(
    state: &AdminState,
    id: &KeyId,
    raw: &str,
    changes: &KeyChanges,
) -> Result<Response, ApiError> {
    let record = state
        .store
        .update_key(id, changes, domain::now())
        .await?
        .ok_or_else(|| no_such_key(raw))?;
    tracing::info!(key_id = %id, "API key updated");
    Ok(Json(KeyView::of(&record, None, &state.budgets, domain::now())).into_response())
}

async fn set_active(state: &AdminState, raw: &str, active: bool) -> Result<Response, ApiError> {
    let id = key_id(raw)?;
    let changes = KeyChanges {
        is_active: Some(active),
        ..KeyChanges::default()
    };
    apply_changes(state, &id, raw, &changes).await
}

async fn disable_key(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    set_active(&state, &raw, false).await
}

async fn enable_key(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    set_active(&state, &raw, true).await
}

async fn rotate_key(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = key_id(&raw)?;
    let key = PresentedKey::rotate(&id);
    let record = state
        .store
        .rotate_key(&id, &key.hash(), domain::now())
        .await?
        .ok_or_else(|| no_such_key(&raw))?;
    tracing::info!(key_id = %id, "API key rotated");
    Ok(Json(KeyView::of(
        &record,
        Some(key.expose()),
        &state.budgets,
        domain::now(),
    ))
    .into_response())
}

async fn delete_key(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let id = key_id(&raw)?;
    if !state.store.delete_key(&id).await? {
        return Err(no_such_key(&raw));
    }
    tracing::info!(key_id = %id, "API key deleted");
    Ok(Json(Deleted {
        id: id.to_string(),
        deleted: true,
    })
    .into_response())
}

async fn list_tiers(_: Admin, State(state): State<AdminState>) -> Result<Json<TierList>, ApiError> {
    let tiers = state.store.list_tiers().await?;
    Ok(Json(TierList { data: tiers }))
}

async fn put_tier(
    _: Admin,
    State(state): State<AdminState>,
    Path(name): Path<String>,
    JsonBody(input): JsonBody<TierInput>,
) -> Result<Response, ApiError> {
    validate_tier_name(&name)?;
    let tier = input.into_tier(&name)?;
    state.store.put_tier(&tier).await?;
    tracing::info!(tier = %tier.name, "tier stored");
    Ok(Json(tier).into_response())
}

/// The key must exist for its usage to be shown (deleted keys' logs stay
/// in the table, but the admin API addresses keys).
async fn existing_key(state: &AdminState, raw: &str) -> Result<KeyId, ApiError> {
    let id = key_id(raw)?;
    state
        .store
        .get_key(&id)
        .await?
        .ok_or_else(|| no_such_key(raw))?;
    Ok(id)
}

async fn key_usage(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    QueryParams(NoParams {}): QueryParams<NoParams>,
) -> Result<Json<super::usage::SummaryView>, ApiError> {
    let id = key_id(&raw)?;
    super::usage::summary_view(&state.store, &id)
        .await
        .map(Json)
}

async fn key_usage_daily(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    QueryParams(params): QueryParams<super::usage::DailyParams>,
) -> Result<Json<super::usage::DailyView>, ApiError> {
    let id = existing_key(&state, &raw).await?;
    super::usage::daily_view(&state.store, &id, &params)
        .await
        .map(Json)
}

async fn key_usage_logs(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    QueryParams(params): QueryParams<super::usage::LogParams>,
) -> Result<Json<super::usage::LogsView>, ApiError> {
    let id = existing_key(&state, &raw).await?;
    super::usage::logs_view(&state.store, &id, params)
        .await
        .map(Json)
}

async fn key_usage_sessions(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<super::Page<super::usage::SessionTotals>>, ApiError> {
    let id = existing_key(&state, &raw).await?;
    super::usage::sessions_view(&state.store, &id, &params).await
}

async fn key_usage_request_classes(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    QueryParams(params): QueryParams<super::usage::RequestClassParams>,
) -> Result<Json<super::usage::RequestClassesView>, ApiError> {
    let id = existing_key(&state, &raw).await?;
    super::usage::request_classes_view(&state.store, &id, &params)
        .await
        .map(Json)
}

async fn key_usage_quota(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    QueryParams(NoParams {}): QueryParams<NoParams>,
) -> Result<Json<super::usage::QuotaView>, ApiError> {
    let id = key_id(&raw)?;
    super::usage::quota_view(&state.store, &state.budgets, &id)
        .await
        .map(Json)
}

/// `GET /admin/api-keys/{id}/batches`: the batches the key created through
/// the relay, as recorded (reservation, whether its usage is recorded).
async fn key_batches(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<super::Page<BatchView>>, ApiError> {
    let id = existing_key(&state, &raw).await?;
    let (limit, from) = params.page()?;
    let page = state
        .store
        .list_batches(&id, from, limit)
        .await?
        .ok_or_else(unknown_page_anchor)?;
    let ids: Vec<&str> = page.items.iter().map(|b| b.batch_id.as_str()).collect();
    let data = page
        .items
        .iter()
        .map(|b| BatchView {
            id: b.batch_id.clone(),
            recorded_at: b.recorded_at.clone(),
            request_count: b.request_count,
            reserved_tokens: b.reserved_tokens,
            usage_recorded: b.settled_at.is_some(),
            settled_at: b.settled_at.clone(),
        })
        .collect();
    Ok(page_json(data, &ids, page.has_more))
}

/// `GET /admin/api-keys/{id}/files`: the files the key uploaded through the
/// relay, as the upstream described them at upload.
async fn key_files(
    _: Admin,
    State(state): State<AdminState>,
    Path(raw): Path<String>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<super::Page<serde_json::Value>>, ApiError> {
    let id = existing_key(&state, &raw).await?;
    let (limit, from) = params.page()?;
    let page = state
        .store
        .list_files(&id, from, limit)
        .await?
        .ok_or_else(unknown_page_anchor)?;
    let ids: Vec<&str> = page.items.iter().map(|f| f.file_id.as_str()).collect();
    let data = page
        .items
        .iter()
        .map(|f| {
            let mut object = f.object.clone();
            object["recorded_at"] = json!(f.recorded_at);
            object
        })
        .collect();
    Ok(page_json(data, &ids, page.has_more))
}

async fn all_usage(
    _: Admin,
    State(state): State<AdminState>,
    QueryParams(params): QueryParams<super::usage::RangeParams>,
) -> Result<Json<super::usage::AllKeysView>, ApiError> {
    super::usage::all_keys_view(&state.store, &params)
        .await
        .map(Json)
}

async fn metrics(_: Admin, State(state): State<AdminState>) -> Result<Response, ApiError> {
    let keys = state.store.all_key_usage().await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::prometheus::render(&keys),
    )
        .into_response())
}
