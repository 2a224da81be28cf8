//! The price table in force, as the proxy prices with it: the one admins
//! stored (`PUT /admin/prices`), else the shipped one, with
//! `UNPRICED_MODELS` applied; read from the store at most once per
//! `PRICE_CACHE_SECONDS` per instance, never once per request.

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
    /// Held while the table is read: requests arriving meanwhile wait for
    /// that read instead of each making their own.
    reading: tokio::sync::Mutex<()>,
}

impl PriceCache {
    pub(super) fn new(ttl: Duration, refuse_unpriced: bool) -> PriceCache {
        PriceCache {
            ttl,
            refuse_unpriced,
            last: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
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

    async fn get(&self, store: &Store) -> Result<Arc<PriceTable>, ApiError> {
        if let Some(table) = self.last(true) {
            return Ok(table);
        }
        let _reading = self.reading.lock().await;
        if let Some(table) = self.last(true) {
            return Ok(table);
        }
        match store.stored_prices().await {
            Ok(stored) => {
                let table = Arc::new(PriceTable {
                    refuse_unpriced: self.refuse_unpriced,
                    ..stored.map_or_else(default_table, |stored| stored.table)
                });
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                *last = Some((Instant::now(), Arc::clone(&table)));
                Ok(table)
            }
            // Prices change rarely: the last table read is a better answer
            // than none while the store is unreachable (read again next time).
            Err(err) => match self.last(false) {
                Some(table) => {
                    tracing::warn!(error = %err, "price table not read; using the one read before");
                    Ok(table)
                }
                None => Err(err.into()),
            },
        }
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
