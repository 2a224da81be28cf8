//! The usage function's routes: key holders see their own consumption with
//! the key they give Claude Code. The views here also serve the admin's
//! per-key routes, so both see the same shapes.

use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::routing::{any, get};
use axum::{Json, Router};
use http::request::Parts;
use serde::{Deserialize, Serialize};
use time::{Date, Duration as TimeDuration, OffsetDateTime, Time};

use super::key_holder::{Caller, authenticate, presented_key};
use super::{ClientIp, NoParams, Page, PageParams, QueryParams, not_found, unknown_page_anchor};
use crate::domain::admission::window_in_force;
use crate::domain::budget::BudgetPolicy;
use crate::domain::day_of;
use crate::domain::key::ApiKeyRecord;
use crate::domain::key::KeyId;
use crate::domain::tpm::MinuteStanding;
use crate::domain::usage::{ClassTotals, UsageTotals};
use crate::domain::{format_timestamp, now, parse_timestamp};
use crate::error::ApiError;
use crate::http::admin::shapes::BudgetView;
use crate::store::Store;
use crate::store::usage_log::{LogQuery, LogRow};

#[derive(Clone)]
pub struct UsageApiState {
    pub store: Store,
    pub budgets: Arc<BudgetPolicy>,
}

/// The usage function's whole router, with its own fallback.
pub fn router(state: UsageApiState) -> Router {
    routes(state).fallback(not_found)
}

/// The key-holder routes, for merging into the local server.
pub fn routes(state: UsageApiState) -> Router {
    Router::new()
        .route("/api/usage", get(summary))
        .route("/api/usage/daily", get(daily))
        .route("/api/usage/logs", get(logs))
        .route("/api/usage/quota", get(quota))
        .route("/api/usage/sessions", get(sessions))
        .route("/api/usage/request-classes", get(request_classes))
        .route("/api/usage/setup", get(super::setup::setup))
        // The holder's page and files: no key (its API calls carry it).
        .merge(super::console::holder_routes())
        .route("/api/usage/", any(not_found))
        .route("/api/usage/{*rest}", any(not_found))
        .method_not_allowed_fallback(super::method_not_allowed)
        .with_state(state)
}

/// The authenticated key holder's record (same checks as the proxy, nothing
/// counted or charged).
pub struct KeyHolder(pub ApiKeyRecord);

impl FromRequestParts<UsageApiState> for KeyHolder {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &UsageApiState,
    ) -> Result<Self, ApiError> {
        let ClientIp(ip) = ClientIp::from_request_parts(parts, state).await?;
        let key = presented_key(&parts.headers)?;
        let caller = Caller::of(&parts.headers, ip);
        authenticate(&state.store, &key, &caller, None, crate::domain::now())
            .await
            .map(KeyHolder)
    }
}

async fn summary(
    State(state): State<UsageApiState>,
    KeyHolder(key): KeyHolder,
    QueryParams(NoParams {}): QueryParams<NoParams>,
) -> Result<Json<SummaryView>, ApiError> {
    summary_view(&state.store, &key.id).await.map(Json)
}

async fn daily(
    State(state): State<UsageApiState>,
    KeyHolder(key): KeyHolder,
    QueryParams(params): QueryParams<DailyParams>,
) -> Result<Json<DailyView>, ApiError> {
    daily_view(&state.store, &key.id, &params).await.map(Json)
}

async fn logs(
    State(state): State<UsageApiState>,
    KeyHolder(key): KeyHolder,
    QueryParams(params): QueryParams<LogParams>,
) -> Result<Json<LogsView>, ApiError> {
    logs_view(&state.store, &key.id, params).await.map(Json)
}

async fn quota(
    State(state): State<UsageApiState>,
    KeyHolder(key): KeyHolder,
    QueryParams(NoParams {}): QueryParams<NoParams>,
) -> Result<Json<QuotaView>, ApiError> {
    quota_view(&state.store, &state.budgets, &key.id)
        .await
        .map(Json)
}

async fn sessions(
    State(state): State<UsageApiState>,
    KeyHolder(key): KeyHolder,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<Page<SessionTotals>>, ApiError> {
    sessions_view(&state.store, &key.id, &params).await
}

async fn request_classes(
    State(state): State<UsageApiState>,
    KeyHolder(key): KeyHolder,
    QueryParams(params): QueryParams<RequestClassParams>,
) -> Result<Json<RequestClassesView>, ApiError> {
    request_classes_view(&state.store, &key.id, &params)
        .await
        .map(Json)
}

/// A set of counters as every usage view shows them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TotalsView {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// Cache writes by TTL, as the answers split them.
    pub cache_creation_5m_input_tokens: u64,
    pub cache_creation_1h_input_tokens: u64,
    /// All four token counts together.
    pub tokens: u64,
    /// What they cost, in millionths of a dollar.
    pub cost_micro_usd: u64,
    /// What prompt caching saved against the same traffic uncached, in
    /// millionths of a dollar; negative when it cost more.
    pub cache_saved_micro_usd: i64,
    /// `cache_read / (input + cache_creation + cache_read)`; null with no
    /// prompt tokens.
    pub cache_hit_ratio: Option<f64>,
    pub estimated_requests: u64,
    pub error_requests: u64,
}

impl From<&UsageTotals> for TotalsView {
    fn from(totals: &UsageTotals) -> Self {
        TotalsView {
            requests: totals.requests,
            input_tokens: totals.input_tokens,
            output_tokens: totals.output_tokens,
            cache_creation_input_tokens: totals.cache_creation_input_tokens,
            cache_read_input_tokens: totals.cache_read_input_tokens,
            cache_creation_5m_input_tokens: totals.cache_creation_5m_input_tokens,
            cache_creation_1h_input_tokens: totals.cache_creation_1h_input_tokens,
            tokens: totals.tokens(),
            cost_micro_usd: totals.cost_micro_usd,
            cache_saved_micro_usd: totals.cache_saved_micro_usd,
            cache_hit_ratio: totals.cache_hit_ratio(),
            estimated_requests: totals.estimated_requests,
            error_requests: totals.error_requests,
        }
    }
}

/// One model's share of a key's usage.
#[derive(Debug, Serialize)]
pub struct ModelTotals {
    pub model: String,
    #[serde(flatten)]
    pub totals: TotalsView,
}

/// `GET /api/usage`.
#[derive(Debug, Serialize)]
pub struct SummaryView {
    pub key_id: String,
    pub name: String,
    #[serde(flatten)]
    pub totals: TotalsView,
    pub tokens_used: u64,
    /// Share of requests whose usage was estimated.
    pub estimated_share: f64,
    pub first_used_at: Option<String>,
    pub last_used_at: Option<String>,
    /// Most tokens first.
    pub by_model: Vec<ModelTotals>,
}

/// One day's row.
#[derive(Debug, Serialize)]
pub struct DayTotals {
    pub date: String,
    #[serde(flatten)]
    pub totals: TotalsView,
    /// The day's share of each model, by model id; they add up to the
    /// row's own counters (traffic settled before per-model counters
    /// existed is in none).
    pub by_model: Vec<ModelShare>,
}

/// The counters kept per request class and per model.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ShareView {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// All four token counts together.
    pub tokens: u64,
    /// What they cost, in millionths of a dollar.
    pub cost_micro_usd: u64,
}

impl From<&ClassTotals> for ShareView {
    fn from(totals: &ClassTotals) -> Self {
        ShareView {
            requests: totals.requests,
            input_tokens: totals.input_tokens,
            output_tokens: totals.output_tokens,
            cache_creation_input_tokens: totals.cache_creation_input_tokens,
            cache_read_input_tokens: totals.cache_read_input_tokens,
            tokens: totals.tokens(),
            cost_micro_usd: totals.cost_micro_usd,
        }
    }
}

/// One model's share of a day: the model served and billed (an alias
/// counts as its model), `unknown` for requests that named none.
#[derive(Debug, Serialize)]
pub struct ModelShare {
    pub model: String,
    #[serde(flatten)]
    pub totals: ShareView,
}

impl ModelShare {
    fn rows<'a>(by_model: impl IntoIterator<Item = (&'a String, &'a ClassTotals)>) -> Vec<Self> {
        by_model
            .into_iter()
            .map(|(model, totals)| ModelShare {
                model: model.clone(),
                totals: totals.into(),
            })
            .collect()
    }
}

/// One Claude Code session's row (`x-claude-code-session-id`).
#[derive(Debug, Serialize)]
pub struct SessionTotals {
    pub session_id: String,
    pub first_used_at: String,
    pub last_used_at: String,
    #[serde(flatten)]
    pub totals: TotalsView,
    /// The session's requests by request class (those counted since
    /// per-class counters exist).
    pub by_request_class: Vec<RequestClassTotals>,
}

/// One request class's share (`x-claude-code-request-class`): `main`,
/// `subagent`, `workflow`, `compaction`, `auxiliary`, `other` (a value
/// outside those five) or `unclassified` (no class sent).
#[derive(Debug, Serialize)]
pub struct RequestClassTotals {
    pub request_class: &'static str,
    #[serde(flatten)]
    pub totals: ShareView,
}

impl RequestClassTotals {
    fn rows(by_class: &[(&'static str, ClassTotals)]) -> Vec<RequestClassTotals> {
        by_class
            .iter()
            .map(|(bucket, totals)| RequestClassTotals {
                request_class: bucket,
                totals: totals.into(),
            })
            .collect()
    }
}

/// `GET /api/usage/request-classes`.
#[derive(Debug, Serialize)]
pub struct RequestClassesView {
    pub key_id: String,
    pub from: String,
    pub to: String,
    /// Classes with traffic in the range, in the order listed above.
    pub data: Vec<RequestClassTotals>,
}

/// `GET /api/usage/daily`.
#[derive(Debug, Serialize)]
pub struct DailyView {
    pub key_id: String,
    pub days: i64,
    pub data: Vec<DayTotals>,
}

/// `GET /api/usage/logs`.
#[derive(Debug, Serialize)]
pub struct LogsView {
    pub key_id: String,
    pub data: Vec<LogRow>,
    pub has_more: bool,
    pub next_cursor: Option<String>,
}

/// `GET /api/usage/quota`.
#[derive(Debug, Serialize)]
pub struct QuotaView {
    pub key_id: String,
    pub is_active: bool,
    pub expires_at: Option<String>,
    pub token_limit: Option<u64>,
    pub tokens_used: u64,
    pub tokens_reserved: u64,
    pub remaining: Option<u64>,
    pub percent_used: Option<f64>,
    pub rate_limit_tier: TierView,
    pub rate_window: RateWindowView,
    /// The current minute's tokens under the tier's tokens-per-minute
    /// limit; `None` when the tier sets none.
    pub token_minute: Option<TokenMinuteView>,
    /// Every dollar limit in force: used, remaining, reset.
    pub budgets: Vec<BudgetView>,
    /// Messages admitted and not yet settled (the leases held), and the
    /// most the key may have at once (`null`: no limit).
    pub in_flight: u64,
    pub max_concurrent: Option<u64>,
    /// `soft` or `hard` (`domain::key::LimitMode`).
    pub limit_mode: &'static str,
    /// What requests in flight hold: hard-mode reservations (tokens and
    /// dollars, already inside `tokens_used` and each budget's `used`,
    /// given back at settlement) and concurrency leases.
    pub outstanding: OutstandingView,
}

/// What requests admitted and not yet settled hold of the key's limits.
#[derive(Debug, Serialize)]
pub struct OutstandingView {
    pub requests: u64,
    pub reserved_tokens: u64,
    pub reserved_usd: String,
    pub leases: u64,
}

/// The key's tier as the quota view shows it.
#[derive(Debug, Serialize)]
pub struct TierView {
    pub name: String,
    pub requests: u64,
    pub period: u64,
    pub tokens_per_minute: Option<u64>,
}

/// What is left of the tier's current window.
#[derive(Debug, Serialize)]
pub struct RateWindowView {
    pub requests_used: u64,
    pub requests_remaining: u64,
    pub resets_at: Option<String>,
}

/// What is left of the tier's tokens for the current minute: the tokens
/// settled for messages admitted in it (messages still being answered are
/// not in it yet).
#[derive(Debug, Serialize)]
pub struct TokenMinuteView {
    pub tokens_used: u64,
    pub tokens_remaining: u64,
    pub resets_at: Option<String>,
}

/// One of the keys that used most, in the all-keys view.
#[derive(Debug, Serialize)]
pub struct KeyTotals {
    pub key_id: String,
    pub name: Option<String>,
    #[serde(flatten)]
    pub totals: TotalsView,
}

/// `GET /admin/usage`.
#[derive(Debug, Serialize)]
pub struct AllKeysView {
    pub from: String,
    pub to: String,
    pub active_keys: usize,
    pub totals: TotalsView,
    pub top_keys: Vec<KeyTotals>,
    pub daily: Vec<DayTotals>,
}

fn no_such_key(id: &KeyId) -> ApiError {
    ApiError::not_found(format!("no API key with id `{id}`"))
}

/// `GET /api/usage`: lifetime totals, the estimated share, and per model.
pub async fn summary_view(store: &Store, id: &KeyId) -> Result<SummaryView, ApiError> {
    let (usage, by_model) = tokio::try_join!(store.key_usage(id), store.usage_by_model(id))?;
    let usage = usage.ok_or_else(|| no_such_key(id))?;
    let totals = &usage.totals;
    let estimated_share = if totals.requests == 0 {
        0.0
    } else {
        totals.estimated_requests as f64 / totals.requests as f64
    };
    let mut by_model: Vec<ModelTotals> = by_model
        .iter()
        .map(|(model, totals)| ModelTotals {
            model: model.clone(),
            totals: totals.into(),
        })
        .collect();
    by_model.sort_by_key(|row| std::cmp::Reverse(row.totals.tokens));
    Ok(SummaryView {
        key_id: id.to_string(),
        name: usage.key.name,
        totals: totals.into(),
        tokens_used: usage.key.tokens_used,
        estimated_share,
        first_used_at: usage.first_used_at,
        last_used_at: usage.last_used_at,
        by_model,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DailyParams {
    days: Option<i64>,
}

const MAX_DAYS: i64 = 366;

/// `GET /api/usage/daily?days=N`: one row per day, oldest first, days
/// without traffic as zeros.
pub async fn daily_view(
    store: &Store,
    id: &KeyId,
    params: &DailyParams,
) -> Result<DailyView, ApiError> {
    let days = params.days.unwrap_or(30);
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(ApiError::bad_request(format!(
            "query parameter `days` must be between 1 and {MAX_DAYS}"
        )));
    }
    let today = now().date();
    let first = today - TimeDuration::days(days - 1);
    let stored = store
        .daily_usage(
            id,
            &day_of(first.midnight().assume_utc()),
            &day_of(today.midnight().assume_utc()),
        )
        .await?;
    let mut rows = Vec::with_capacity(usize::try_from(days).unwrap_or(0));
    let mut date = first;
    while date <= today {
        let day = day_of(date.midnight().assume_utc());
        let row = stored.iter().find(|row| row.day == day);
        rows.push(DayTotals {
            date: day,
            totals: (&row.map(|row| row.totals).unwrap_or_default()).into(),
            by_model: row.map_or_else(Vec::new, |row| {
                ModelShare::rows(row.by_model.iter().map(|(model, totals)| (model, totals)))
            }),
        });
        date = date.next_day().unwrap_or(Date::MAX);
        if date == Date::MAX {
            break;
        }
    }
    Ok(DailyView {
        key_id: id.to_string(),
        days,
        data: rows,
    })
}

/// `GET /api/usage/sessions`: the key's Claude Code sessions, most
/// recently used first, paged as Anthropic's lists are (`limit`,
/// `after_id` / `before_id` naming a session id).
pub async fn sessions_view(
    store: &Store,
    id: &KeyId,
    params: &PageParams,
) -> Result<Json<Page<SessionTotals>>, ApiError> {
    let (limit, from) = params.page()?;
    let page = store
        .sessions(id, from, limit)
        .await?
        .ok_or_else(unknown_page_anchor)?;
    let ids: Vec<&str> = page.items.iter().map(|s| s.session_id.as_str()).collect();
    let data = page
        .items
        .iter()
        .map(|s| SessionTotals {
            session_id: s.session_id.clone(),
            first_used_at: s.first_used_at.clone(),
            last_used_at: s.last_used_at.clone(),
            totals: (&s.totals).into(),
            by_request_class: RequestClassTotals::rows(&s.by_class),
        })
        .collect();
    Ok(super::page_json(data, &ids, page.has_more))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestClassParams {
    from: Option<String>,
    to: Option<String>,
}

/// `GET /api/usage/request-classes?from=&to=`: the key's tokens, cost and
/// requests per request class over a range of days (`yyyy-mm-dd`, UTC;
/// default the last 30, at most 366), read from the day aggregates.
pub async fn request_classes_view(
    store: &Store,
    id: &KeyId,
    params: &RequestClassParams,
) -> Result<RequestClassesView, ApiError> {
    let (from, to) = day_range(params.from.as_deref(), params.to.as_deref())?;
    let (from, to) = (
        day_of(from.midnight().assume_utc()),
        day_of(to.midnight().assume_utc()),
    );
    let by_class = store.usage_by_request_class(id, &from, &to).await?;
    Ok(RequestClassesView {
        key_id: id.to_string(),
        from,
        to,
        data: RequestClassTotals::rows(&by_class),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    limit: Option<i64>,
    cursor: Option<String>,
    from: Option<String>,
    to: Option<String>,
    model: Option<String>,
}

const MAX_LOG_PAGE: i64 = 500;

/// A bound given as an RFC 3339 timestamp or a `yyyy-mm-dd` date (the
/// whole day: its first or last millisecond).
fn time_bound(name: &str, text: &str, end_of_day: bool) -> Result<String, ApiError> {
    if let Some(at) = parse_timestamp(text) {
        return Ok(format_timestamp(at));
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = Date::parse(text, &format).map_err(|_| {
        ApiError::bad_request(format!(
            "query parameter `{name}` must be an RFC 3339 timestamp or a yyyy-mm-dd date"
        ))
    })?;
    let time = if end_of_day {
        Time::from_hms_milli(23, 59, 59, 999).unwrap_or(Time::MIDNIGHT)
    } else {
        Time::MIDNIGHT
    };
    Ok(format_timestamp(OffsetDateTime::new_utc(date, time)))
}

/// `GET /api/usage/logs`: newest first, cursor pagination.
pub async fn logs_view(store: &Store, id: &KeyId, params: LogParams) -> Result<LogsView, ApiError> {
    let limit = params.limit.unwrap_or(50);
    if !(1..=MAX_LOG_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "query parameter `limit` must be between 1 and {MAX_LOG_PAGE}"
        )));
    }
    let from = match &params.from {
        Some(text) => time_bound("from", text, false)?,
        None => "0000".into(),
    };
    let to = match &params.to {
        Some(text) => time_bound("to", text, true)?,
        None => "9999".into(),
    };
    if from > to {
        return Err(ApiError::bad_request(
            "query parameter `from` is after `to`",
        ));
    }
    if let Some(model) = &params.model
        && (model.is_empty()
            || model.len() > 200
            || !model
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:@/".contains(&b)))
    {
        return Err(ApiError::bad_request(
            "query parameter `model` is not a model name",
        ));
    }
    let query = LogQuery {
        from,
        to,
        model: params.model,
        limit: usize::try_from(limit).unwrap_or(50),
        cursor: params.cursor,
    };
    let (rows, next) = store
        .usage_logs(id, &query)
        .await?
        .map_err(|e| ApiError::bad_request(format!("query parameter `cursor`: {e}")))?;
    Ok(LogsView {
        key_id: id.to_string(),
        data: rows,
        has_more: next.is_some(),
        next_cursor: next,
    })
}

/// `GET /api/usage/quota`: the token budget, the tier and what is left of
/// its current window, expiry and status.
pub async fn quota_view(
    store: &Store,
    budgets: &BudgetPolicy,
    id: &KeyId,
) -> Result<QuotaView, ApiError> {
    let key = store.get_key(id).await?.ok_or_else(|| no_such_key(id))?;
    let at = now();
    let tier = store.tier_in_force(&key.rate_limit_tier).await?;
    // The window admission counts in (`domain::admission`), as it stands.
    let window = window_in_force(key.rate_window, at, tier.period);
    let used_in_window = window.used;
    let resets_at = epoch_timestamp(window.start + tier.period);
    let remaining = key.remaining_tokens();
    let percent_used = key.token_limit.map(|limit| {
        if limit == 0 {
            100.0
        } else {
            (key.tokens_used as f64 * 100.0 / limit as f64 * 100.0).round() / 100.0
        }
    });
    let (held_tokens, held_usd) = key.held_by_flights();
    Ok(QuotaView {
        key_id: id.to_string(),
        is_active: key.is_active,
        expires_at: key.expires_at.map(format_timestamp),
        token_limit: key.token_limit,
        tokens_used: key.tokens_used,
        tokens_reserved: key.tokens_reserved,
        remaining,
        percent_used,
        rate_limit_tier: TierView {
            name: tier.name,
            requests: tier.requests,
            period: tier.period,
            tokens_per_minute: tier.tokens_per_minute,
        },
        rate_window: RateWindowView {
            requests_used: used_in_window,
            requests_remaining: tier.requests.saturating_sub(used_in_window),
            resets_at,
        },
        token_minute: MinuteStanding::of(&key, tier.tokens_per_minute, at).map(|minute| {
            TokenMinuteView {
                tokens_used: minute.used,
                tokens_remaining: minute.remaining(),
                resets_at: epoch_timestamp(minute.resets_at()),
            }
        }),
        budgets: BudgetView::all(&key, budgets, at),
        in_flight: u64::try_from(key.in_flight).unwrap_or(0),
        max_concurrent: key.max_concurrent,
        limit_mode: key.limit_mode.name(),
        outstanding: OutstandingView {
            requests: u64::try_from(key.flights.len()).unwrap_or(u64::MAX),
            reserved_tokens: held_tokens,
            reserved_usd: crate::domain::budget::usd(held_usd),
            leases: u64::try_from(key.in_flight).unwrap_or(0),
        },
    })
}

/// A moment given in epoch seconds, as the views show moments.
fn epoch_timestamp(epoch: u64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(i64::try_from(epoch).unwrap_or(0))
        .map(format_timestamp)
        .ok()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeParams {
    from: Option<String>,
    to: Option<String>,
    top: Option<i64>,
}

/// The days `from` to `to` (`yyyy-mm-dd`, UTC) a range view covers: by
/// default the 30 days to today, at most `MAX_DAYS`.
fn day_range(from: Option<&str>, to: Option<&str>) -> Result<(Date, Date), ApiError> {
    let to = match to {
        Some(text) => parse_day("to", text)?,
        None => now().date(),
    };
    let from = match from {
        Some(text) => parse_day("from", text)?,
        None => to - TimeDuration::days(29),
    };
    if from > to {
        return Err(ApiError::bad_request(
            "query parameter `from` is after `to`",
        ));
    }
    if (to - from).whole_days() >= MAX_DAYS {
        return Err(ApiError::bad_request(format!(
            "the range may span at most {MAX_DAYS} days"
        )));
    }
    Ok((from, to))
}

fn parse_day(name: &str, text: &str) -> Result<Date, ApiError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(text, &format).map_err(|_| {
        ApiError::bad_request(format!(
            "query parameter `{name}` must be a yyyy-mm-dd date"
        ))
    })
}

/// `GET /admin/usage?from=&to=&top=`: totals over all keys for a range of
/// days (default the last 30), per day, and the keys that used most. One
/// index query per day; no scan.
pub async fn all_keys_view(store: &Store, params: &RangeParams) -> Result<AllKeysView, ApiError> {
    let (from, to) = day_range(params.from.as_deref(), params.to.as_deref())?;
    let top = params.top.unwrap_or(10);
    if !(1..=100).contains(&top) {
        return Err(ApiError::bad_request(
            "query parameter `top` must be between 1 and 100",
        ));
    }
    let mut days = Vec::new();
    let mut date = from;
    while date <= to {
        days.push(day_of(date.midnight().assume_utc()));
        match date.next_day() {
            Some(next) => date = next,
            None => break,
        }
    }
    let per_day =
        futures_util::future::try_join_all(days.iter().map(|d| store.day_across_keys(d))).await?;
    let mut totals = UsageTotals::default();
    let mut per_key: std::collections::BTreeMap<String, UsageTotals> = Default::default();
    let mut daily = Vec::with_capacity(days.len());
    for (day, rows) in days.iter().zip(&per_day) {
        let mut day_totals = UsageTotals::default();
        let mut day_models = std::collections::BTreeMap::<String, ClassTotals>::new();
        for row in rows {
            day_totals.add(&row.totals);
            per_key
                .entry(row.key_id.clone())
                .or_default()
                .add(&row.totals);
            for (model, share) in &row.by_model {
                day_models.entry(model.clone()).or_default().add(share);
            }
        }
        totals.add(&day_totals);
        daily.push(DayTotals {
            date: day.clone(),
            totals: (&day_totals).into(),
            by_model: ModelShare::rows(&day_models),
        });
    }
    let active_keys = per_key.len();
    let mut ranked: Vec<(String, UsageTotals)> = per_key.into_iter().collect();
    ranked.sort_by(|a, b| b.1.tokens().cmp(&a.1.tokens()).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(usize::try_from(top).unwrap_or(10));
    let ids: Vec<KeyId> = ranked
        .iter()
        .filter_map(|(id, _)| KeyId::parse(id))
        .collect();
    let names = store.key_names(&ids).await?;
    let top_keys = ranked
        .iter()
        .map(|(id, totals)| KeyTotals {
            key_id: id.clone(),
            name: names.get(id).cloned(),
            totals: totals.into(),
        })
        .collect();
    Ok(AllKeysView {
        from: day_of(from.midnight().assume_utc()),
        to: day_of(to.midnight().assume_utc()),
        active_keys,
        totals: (&totals).into(),
        top_keys,
        daily,
    })
}
