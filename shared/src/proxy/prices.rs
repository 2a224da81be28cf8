//! The price table and the model aliases in force, as the proxy uses them:
//! the table admins stored (`PUT /admin/prices`), else the shipped one,
//! with `UNPRICED_MODELS` applied, and the aliases they stored (`PUT
//! /admin/model-aliases`); both read from the store together at most once
//! per `PRICE_CACHE_SECONDS` per instance, never once per request. Only an
//! instance's first message waits for the read: after that what is past
//! its TTL is still used while a background read replaces it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ProxyState;
use crate::domain::model_catalog::ModelAliases;
use crate::domain::price::{PriceTable, default_table};
use crate::error::ApiError;
use crate::store::Store;

pub(super) struct PriceCache {
    ttl: Duration,
    refuse_unpriced: bool,
    /// What was last read, and when.
    last: Mutex<Option<(Instant, Arc<InForce>)>>,
    /// Held while they are read: one read at a time, and requests that
    /// have nothing yet wait for it instead of each making their own.
    reading: Arc<tokio::sync::Mutex<()>>,
}

/// The price table and the aliases, read together.
pub(super) struct InForce {
    pub(super) prices: Arc<PriceTable>,
    pub(super) aliases: ModelAliases,
}

impl PriceCache {
    pub(super) fn new(ttl: Duration, refuse_unpriced: bool) -> PriceCache {
        PriceCache {
            ttl,
            refuse_unpriced,
            last: Mutex::new(None),
            reading: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// What was last read, if it is younger than the TTL (`fresh`) or at
    /// all.
    fn last(&self, fresh: bool) -> Option<Arc<InForce>> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(at, _)| !fresh || at.elapsed() < self.ttl)
            .map(|(_, table)| Arc::clone(table))
    }

    async fn get(self: &Arc<Self>, store: &Store) -> Result<Arc<InForce>, ApiError> {
        if let Some(table) = self.last(true) {
            return Ok(table);
        }
        if let Some(stale) = self.last(false) {
            // Past its TTL: used once more while one background read
            // replaces it, so no request waits on the store for prices.
            if let Ok(reading) = Arc::clone(&self.reading).try_lock_owned() {
                let (cache, store) = (Arc::clone(self), store.clone());
                tokio::spawn(async move {
                    let _reading = reading;
                    if let Err(err) = cache.read(&store).await {
                        tracing::warn!(error = %err, "price table and model aliases not read; using those read before");
                    }
                });
            }
            return Ok(stale);
        }
        let _reading = self.reading.lock().await;
        if let Some(table) = self.last(false) {
            return Ok(table);
        }
        Ok(self.read(store).await?)
    }

    /// Reads the table and the aliases in force (at once) and keeps them.
    async fn read(&self, store: &Store) -> Result<Arc<InForce>, crate::store::StoreError> {
        let (prices, aliases) = tokio::join!(store.stored_prices(), store.stored_aliases());
        let in_force = Arc::new(InForce {
            prices: Arc::new(PriceTable {
                refuse_unpriced: self.refuse_unpriced,
                ..prices?.map_or_else(default_table, |stored| stored.table)
            }),
            aliases: aliases?.map(|stored| stored.aliases).unwrap_or_default(),
        });
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some((Instant::now(), Arc::clone(&in_force)));
        Ok(in_force)
    }
}

impl ProxyState {
    /// The price table in force.
    pub(super) async fn prices(&self) -> Result<Arc<PriceTable>, ApiError> {
        Ok(Arc::clone(&self.in_force().await?.prices))
    }

    /// The price table and the model aliases in force.
    pub(super) async fn in_force(&self) -> Result<Arc<InForce>, ApiError> {
        self.0.prices.get(&self.0.store).await
    }

    /// The table a finished request is priced with: its usage is recorded
    /// whatever happens, so a table that cannot be read (never read on this
    /// instance, and the store unreachable) gives way to the shipped one.
    pub(super) async fn prices_at_settlement(&self) -> Arc<PriceTable> {
        match self.prices().await {
            Ok(table) => table,
            Err(err) => {
                tracing::error!(error = %err, "price table not read; pricing at the shipped prices");
                Arc::new(PriceTable {
                    refuse_unpriced: self.0.prices.refuse_unpriced,
                    ..default_table()
                })
            }
        }
    }
}
