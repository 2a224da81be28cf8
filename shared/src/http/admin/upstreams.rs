//! `GET /admin/upstreams`: the upstreams the secret names, their health as
//! every proxy instance shares it (cooldowns, failures, refused keys) and
//! today's traffic (requests and errors each served, from the day
//! aggregates settlement keeps). Finer traffic is in the metrics
//! (`Upstream` dimension) and on each usage row.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::{Admin, AdminState};
use crate::domain::format_timestamp;
use crate::domain::upstream_pool::{HealthView, UpstreamKind, UpstreamSpec};
use crate::error::ApiError;
use crate::http::{NoParams, QueryParams};
use crate::store::usage_log::UpstreamTraffic;

#[derive(Debug, Serialize)]
pub struct UpstreamsView {
    pub upstreams: Vec<UpstreamView>,
}

/// One upstream, without its key.
#[derive(Debug, Serialize)]
pub struct UpstreamView {
    pub name: String,
    pub kind: &'static str,
    pub priority: u32,
    pub weight: u32,
    /// Patterns of the models it serves (empty: every model).
    pub models: Vec<String>,
    /// Anthropic: where it is (`null`: the proxy's `UPSTREAM_BASE_URL`).
    pub base_url: Option<String>,
    /// Bedrock: its Region and the Anthropic model ids its map serves.
    pub region: Option<String>,
    pub model_map: Option<Vec<String>>,
    pub health: HealthShown,
    /// Requests it answered today (UTC), and of them errors.
    pub today: TrafficShown,
}

#[derive(Debug, Serialize)]
pub struct TrafficShown {
    pub requests: u64,
    pub errors: u64,
}

/// How the proxies see it now.
#[derive(Debug, Serialize)]
pub struct HealthShown {
    /// `healthy`, `cooling` (passed over until `cooldown_until`) or
    /// `refused` (its key was refused: not used until the key changes).
    pub status: &'static str,
    pub cooldown_until: Option<String>,
    pub consecutive_failures: u32,
    /// Failures since it last stayed quiet for a while.
    pub failures: u64,
    pub last_failure: Option<FailureShown>,
    pub refused_since: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct FailureShown {
    /// `rate_limited`, `overloaded`, `server_error`, `connect`, `refused`.
    pub kind: &'static str,
    pub at: String,
}

pub(super) async fn list_upstreams(
    _: Admin,
    State(state): State<AdminState>,
    QueryParams(NoParams {}): QueryParams<NoParams>,
) -> Result<Json<UpstreamsView>, ApiError> {
    let secrets = state.secrets.current().await?;
    // An empty default: an entry that names no base URL shows `null`.
    let pool = secrets
        .upstream_pool("")
        .map_err(|err| ApiError::unprocessable(format!("the secret's upstream list: {err}")))?;
    let Some(pool) = pool else {
        return Ok(Json(UpstreamsView {
            upstreams: Vec::new(),
        }));
    };
    let now = crate::domain::now();
    let (names, today) = (pool.names(), crate::domain::day_of(now));
    let (health, traffic) = tokio::join!(
        state.store.upstream_health(&names, now),
        state.store.upstream_traffic(&today),
    );
    let (health, traffic) = (health?, traffic?);
    let upstreams = pool
        .upstreams
        .iter()
        .map(|spec| {
            let today = traffic.get(&spec.name).copied().unwrap_or_default();
            view(spec, &health, today, now)
        })
        .collect();
    Ok(Json(UpstreamsView { upstreams }))
}

fn view(
    spec: &UpstreamSpec,
    health: &HealthView,
    today: UpstreamTraffic,
    now: time::OffsetDateTime,
) -> UpstreamView {
    let (kind, base_url, region, model_map) = match &spec.kind {
        UpstreamKind::Anthropic { base_url, .. } => (
            "anthropic",
            Some(base_url.clone()).filter(|url| !url.is_empty()),
            None,
            None,
        ),
        UpstreamKind::Bedrock {
            region, model_map, ..
        } => (
            "bedrock",
            None,
            Some(region.clone()),
            Some(model_map.keys().cloned().collect()),
        ),
    };
    let known = health.of(&spec.name).cloned().unwrap_or_default();
    let refused = health.is_unusable(spec);
    let status = if refused {
        "refused"
    } else if known.cooling_at(now) {
        "cooling"
    } else {
        "healthy"
    };
    UpstreamView {
        name: spec.name.clone(),
        kind,
        priority: spec.priority,
        weight: spec.weight,
        models: spec.models.clone(),
        base_url,
        region,
        model_map,
        health: HealthShown {
            status,
            cooldown_until: known
                .cooldown_until
                .filter(|until| *until > now)
                .map(format_timestamp),
            consecutive_failures: known.consecutive_failures,
            failures: known.failures,
            last_failure: known.last_failure.map(|last| FailureShown {
                kind: last.kind.as_str(),
                at: format_timestamp(last.at),
            }),
            refused_since: known
                .unusable
                .filter(|_| refused)
                .map(|mark| format_timestamp(mark.since)),
        },
        today: TrafficShown {
            requests: today.requests,
            errors: today.errors,
        },
    }
}
