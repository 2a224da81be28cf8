//! The proxy's side of the upstream pool: the order in which a request
//! tries the upstreams (`domain::upstream_pool::candidates`, on the health
//! every instance shares), and telling the others what an attempt learnt.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::ProxyState;
use crate::domain::upstream_pool::{FailureKind, UpstreamSpec, candidates};
use crate::store::Store;
use crate::store::upstream_health::HealthCache;
use crate::upstream::{HealthReport, UpstreamError};

/// The upstreams a request for `model` (of Claude Code session `session`,
/// which keeps it on one upstream while that one is healthy) tries, in
/// order.
pub(super) async fn candidates_for(
    state: &ProxyState,
    model: Option<&str>,
    session: Option<&str>,
) -> Result<Vec<UpstreamSpec>, UpstreamError> {
    let pool = state.0.upstream.pool().await?;
    let health = state
        .0
        .upstream_health
        .view(&state.0.store, &pool.names())
        .await;
    let now = crate::domain::now();
    let order: Vec<UpstreamSpec> = candidates(
        &pool.upstreams,
        model,
        session,
        &health,
        now,
        rand::random(),
    )
    .into_iter()
    .cloned()
    .collect();
    if order.is_empty() {
        return Err(match model {
            Some(model) => UpstreamError::NoUpstreamFor(model.to_owned()),
            None => UpstreamError::NoCredentials,
        });
    }
    Ok(order)
}

/// Shares each failed attempt through the store (in the background: the
/// request goes on to the next upstream meanwhile).
pub(super) struct SharedHealth {
    cache: Arc<HealthCache>,
    store: Store,
}

impl SharedHealth {
    pub(super) fn of(state: &ProxyState) -> SharedHealth {
        SharedHealth {
            cache: state.0.upstream_health.clone(),
            store: state.0.store.clone(),
        }
    }
}

impl HealthReport for SharedHealth {
    fn failed(&self, upstream: &UpstreamSpec, kind: FailureKind, retry_after: Option<Duration>) {
        let (cache, store, spec) = (self.cache.clone(), self.store.clone(), upstream.clone());
        let report = async move {
            let now = crate::domain::now();
            if let Err(err) = cache
                .report_failure(&store, &spec, kind, retry_after, now)
                .await
            {
                tracing::warn!(upstream = %spec.name, error = %format!("{err:#}"), "could not share an upstream's cooldown");
            }
        };
        tokio::spawn(report.in_current_span());
    }

    fn refused(&self, upstream: &UpstreamSpec) {
        let (cache, store, spec) = (self.cache.clone(), self.store.clone(), upstream.clone());
        tracing::error!(upstream = %spec.name, "an upstream refused the relay's key: not used until the secret changes");
        let report = async move {
            let now = crate::domain::now();
            if let Err(err) = cache.report_refused(&store, &spec, now).await {
                tracing::warn!(upstream = %spec.name, error = %format!("{err:#}"), "could not share an upstream's refusal");
            }
        };
        tokio::spawn(report.in_current_span());
    }
}
