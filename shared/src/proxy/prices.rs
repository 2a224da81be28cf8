//! The price table in force, as the proxy prices with it: the one admins
//! stored (`PUT /admin/prices`), else the shipped one, with
//! `UNPRICED_MODELS` applied; read from the store at most once per
//! `PRICE_CACHE_SECONDS` per instance, never once per request. Only an
//! instance's first priced request waits for the read: after that a table
//! past its TTL is still used while a background read replaces it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ProxyState;
use crate::domain::price::{PriceTable, default_table};
use crate::error::ApiError;
use crate::store::Store;

pub(super) struct PriceCache {
    ttl: Duration,
    refuse_unpriced: bool,
    /// The table last read, and when.
    last: Mutex<Option<(Instant, Arc<PriceTable>)>>,
    /// Held while the table is read: one read at a time, and requests that
    /// have no table yet wait for it instead of each making their own.
    reading: Arc<tokio::sync::Mutex<()>>,
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

    /// The table last read, if it is younger than the TTL (`fresh`) or at
    /// all.
    fn last(&self, fresh: bool) -> Option<Arc<PriceTable>> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(at, _)| !fresh || at.elapsed() < self.ttl)
            .map(|(_, table)| Arc::clone(table))
    }

    async fn get(self: &Arc<Self>, store: &Store) -> Result<Arc<PriceTable>, ApiError> {
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
                        tracing::warn!(error = %err, "price table not read; using the one read before");
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

    /// Reads the table in force and keeps it.
    async fn read(&self, store: &Store) -> Result<Arc<PriceTable>, crate::store::StoreError> {
        let stored = store.stored_prices().await?;
        let table = Arc::new(PriceTable {
            refuse_unpriced: self.refuse_unpriced,
            ..stored.map_or_else(default_table, |stored| stored.table)
        });
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some((Instant::now(), Arc::clone(&table)));
        Ok(table)
    }
}

impl ProxyState {
    /// The price table in force.
    pub(super) async fn prices(&self) -> Result<Arc<PriceTable>, ApiError> {
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
