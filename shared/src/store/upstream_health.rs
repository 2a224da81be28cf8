//! Upstream health shared by every instance of the relay (see
//! `layout::upstream_health`): one instance's discovery that an upstream
//! is rate-limited, overloaded, down or refusing its key spares the others
//! the failed attempt. Written only when an upstream fails; read through
//! [`HealthCache`], so a request adds no round trip for it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::ReturnValue;
use time::OffsetDateTime;

use super::layout::upstream_health as layout_health;
use super::{Store, StoreError, classify};
use crate::domain::upstream_pool::{
    FailureKind, HealthView, UpstreamHealth, UpstreamSpec, cooldown_after,
};

impl Store {
    /// Records a failure of upstream `name` at `now` and cools it down
    /// until `until`: one more consecutive failure on a health item still
    /// alive, else a fresh one (the first failure after a quiet spell).
    /// Last writer wins the cooldown's end. Hands back the health as
    /// stored.
    pub async fn mark_cooldown(
        &self,
        name: &str,
        until: OffsetDateTime,
        kind: FailureKind,
        now: OffsetDateTime,
    ) -> Result<UpstreamHealth, StoreError> {
        let key = layout_health::health(name);
        let change = layout_health::another_failure(until, kind, now);
        let result = self
            .client
            .update_item()
            .table_name(self.table())
            .set_key(Some(key.item()))
            .update_expression(change.expression)
            .set_expression_attribute_names(change.names)
            .set_expression_attribute_values(Some(change.values))
            .condition_expression(layout_health::ALIVE)
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(output) => {
                let mut health = UpstreamHealth::default();
                if let Some(item) = output.attributes {
                    layout_health::health_of(&item, &mut health)?;
                }
                Ok(health)
            }
            Err(err)
                if matches!(
                    err.as_service_error(),
                    Some(UpdateItemError::ConditionalCheckFailedException(_))
                ) =>
            {
                let item = layout_health::fresh_health_item(name, until, kind, now);
                let mut health = UpstreamHealth::default();
                layout_health::health_of(&item, &mut health)?;
                self.client
                    .put_item()
                    .table_name(self.table())
                    .set_item(Some(item))
                    .send()
                    .await
                    .map_err(|err| classify(err).during(format!("PutItem {key}")))?;
                Ok(health)
            }
            Err(err) => Err(classify(err).during(format!("UpdateItem {key}"))),
        }
    }

    /// Records that upstream `name` refused its key (401/403) under
    /// `credential_version` ([`UpstreamSpec::credential_version`]): it is
    /// not tried again while it has that credential (for an hour at most).
    pub async fn mark_unusable(
        &self,
        name: &str,
        credential_version: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let key = layout_health::unusable(name);
        self.client
            .put_item()
            .table_name(self.table())
            .set_item(Some(layout_health::unusable_item(
                name,
                credential_version,
                now,
            )))
            .send()
            .await
            .map_err(|err| classify(err).during(format!("PutItem {key}")))?;
        Ok(())
    }

    /// The shared health of these upstreams at `now`, in one BatchGetItem
    /// (eventually consistent: a mark a moment old may be missed once).
    /// Upstreams with nothing recorded are absent from the view: healthy.
    pub async fn upstream_health(
        &self,
        names: &[&str],
        now: OffsetDateTime,
    ) -> Result<HealthView, StoreError> {
        let keys = names
            .iter()
            .flat_map(|name| {
                [
                    layout_health::health(name).item(),
                    layout_health::unusable(name).item(),
                ]
            })
            .collect();
        let items = self
            .batch_get(
                keys,
                layout_health::PROJECTION,
                &[(layout_health::TTL_NAME, super::layout::TTL_ATTRIBUTE)],
                false,
            )
            .await?;
        layout_health::view_of(&items, now)
    }
}

/// The shared health as one instance sees it: read from the store at most
/// once per `ttl` (a few seconds), in the background once a view exists, so
/// requests consult it for free; this instance's own marks show at once.
/// Never fails: a health read that cannot be made leaves the last view (or
/// none: every upstream healthy) in use, since health only orders the
/// upstreams and must not stop a request.
pub struct HealthCache {
    ttl: Duration,
    last: Mutex<Option<Cached>>,
    /// Held while the store is read: one read at a time.
    reading: Arc<tokio::sync::Mutex<()>>,
}

struct Cached {
    read_at: Instant,
    /// The upstreams read (the pool may change when the secret is re-read).
    names: Vec<String>,
    view: Arc<HealthView>,
}

/// A few seconds: other instances' discoveries reach this one that late at
/// worst, and each instance reads the health items at most that often.
pub const HEALTH_CACHE_TTL: Duration = Duration::from_secs(5);

impl HealthCache {
    pub fn new(ttl: Duration) -> Arc<HealthCache> {
        Arc::new(HealthCache {
            ttl,
            last: Mutex::new(None),
            reading: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The view read last for these same upstreams: `fresh` only if younger
    /// than the TTL.
    fn last(&self, names: &[&str], fresh: bool) -> Option<Arc<HealthView>> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|cached| {
                cached
                    .names
                    .iter()
                    .map(String::as_str)
                    .eq(names.iter().copied())
            })
            .filter(|cached| !fresh || cached.read_at.elapsed() < self.ttl)
            .map(|cached| Arc::clone(&cached.view))
    }

    /// The health of the pool `names` to order a request's upstreams by.
    /// Only an instance's first request (or the first after the pool
    /// changed) waits for a read; after that a view past its TTL is used
    /// while a background read replaces it.
    pub async fn view(self: &Arc<Self>, store: &Store, names: &[&str]) -> Arc<HealthView> {
        if let Some(view) = self.last(names, true) {
            return view;
        }
        if let Some(stale) = self.last(names, false) {
            if let Ok(reading) = Arc::clone(&self.reading).try_lock_owned() {
                let cache = Arc::clone(self);
                let store = store.clone();
                let owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
                tokio::spawn(async move {
                    let _reading = reading;
                    let names: Vec<&str> = owned.iter().map(String::as_str).collect();
                    cache.read(&store, &names).await;
                });
            }
            return stale;
        }
        let _reading = self.reading.lock().await;
        if let Some(view) = self.last(names, false) {
            return view;
        }
        self.read(&store.clone(), names).await
    }

    /// Reads the health and keeps it; on failure keeps (and returns) what
    /// it had, marked as read now so the store is not asked again at once.
    async fn read(&self, store: &Store, names: &[&str]) -> Arc<HealthView> {
        let read = store.upstream_health(names, crate::domain::now()).await;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let view = match read {
            Ok(view) => Arc::new(view),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "could not read the health of the upstreams; ordering them by the last view");
                last.as_ref()
                    .map_or_else(Arc::default, |cached| Arc::clone(&cached.view))
            }
        };
        *last = Some(Cached {
            read_at: Instant::now(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            view: Arc::clone(&view),
        });
        view
    }

    /// Folds this instance's own discovery into the view it holds, without
    /// waiting for the next read.
    fn note(&self, upstream: &str, change: impl FnOnce(&mut UpstreamHealth)) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = last.as_mut() {
            let mut view = HealthView::clone(&cached.view);
            change(view.upstreams.entry(upstream.to_owned()).or_default());
            cached.view = Arc::new(view);
        }
    }

    /// `spec` failed an attempt at `now` (429, 529, 5xx, no connection):
    /// cools it down for its `retry-after` or the backoff its consecutive
    /// failures call for ([`cooldown_after`]), here at once and for every
    /// instance through the store. A refusal (401/403) goes to
    /// [`HealthCache::report_refused`] instead. Hands back the cooldown's
    /// end.
    pub async fn report_failure(
        &self,
        store: &Store,
        spec: &UpstreamSpec,
        kind: FailureKind,
        retry_after: Option<Duration>,
        now: OffsetDateTime,
    ) -> Result<OffsetDateTime, StoreError> {
        let earlier = {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            last.as_ref()
                .and_then(|cached| cached.view.of(&spec.name).map(|h| h.consecutive_failures))
                .unwrap_or(0)
        };
        let pause = cooldown_after(kind, retry_after, earlier.saturating_add(1));
        let until = now + pause;
        self.note(&spec.name, |health| {
            health.cooldown_until = Some(until);
            health.consecutive_failures = health.consecutive_failures.saturating_add(1);
        });
        let stored = store.mark_cooldown(&spec.name, until, kind, now).await?;
        self.note(&spec.name, |health| {
            let unusable = health.unusable.take();
            *health = UpstreamHealth { unusable, ..stored };
        });
        Ok(until)
    }

    /// `spec` refused its key (401/403) at `now`: not tried again while it
    /// has this key, here at once and for every instance.
    pub async fn report_refused(
        &self,
        store: &Store,
        spec: &UpstreamSpec,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let credential_version = spec.credential_version();
        self.note(&spec.name, |health| {
            health.unusable = Some(crate::domain::upstream_pool::Unusable {
                since: now,
                credential_version: credential_version.clone(),
            });
        });
        store
            .mark_unusable(&spec.name, &credential_version, now)
            .await
    }
}
