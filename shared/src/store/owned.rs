//! What keys own upstream: message batches and files, each listed per key
//! through `gsi1` (newest first); and the batch queue the collector works
//! through: one open-batch item per batch whose usage is not recorded yet,
//! one pending item per batch creation whose reservation is not yet tied
//! to a batch (their items, and the expressions on them:
//! `layout::owned`).

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{Delete, TransactWriteItem, Update};
use time::OffsetDateTime;

use super::item::{Item, get_s, s};
use super::layout::owned::QueueEntry;
use super::settlement::SettleOutcome;
use super::{
    GSI1, Store, StoreError, classify, conflict_pause, layout, query_all, transact_put,
    transact_update,
};
use crate::domain::budget::SpendCounter;
use crate::domain::epoch_seconds;
use crate::domain::key::KeyId;
use crate::domain::price::Attribute;
use crate::domain::price::MicroUsd;
use crate::domain::usage::{Counters, PricedBatch};

/// A pending reservation outlives any request that could still claim it
/// (Lambda stops at 15 minutes); past this, the collector gives it back.
pub const PENDING_STALE: Duration = Duration::from_secs(20 * 60);

/// A batch as the relay recorded it when it was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRecord {
    pub batch_id: String,
    pub key_id: KeyId,
    /// When the relay recorded it (RFC 3339, the listing order).
    pub recorded_at: String,
    pub request_count: u64,
    /// Tokens reserved against the key's quota at admission.
    pub reserved_tokens: u64,
    pub client_ip: String,
    /// Set once its usage is recorded.
    pub settled_at: Option<String>,
    /// Request attributes that change the price of its results (beyond
    /// the batch discount): US inference if any request asked for it.
    pub price_attributes: Vec<Attribute>,
}

/// A file as the relay recorded it at upload: the upstream's file object.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRecord {
    pub file_id: String,
    pub key_id: KeyId,
    pub recorded_at: String,
    pub object: serde_json::Value,
}

/// A batch whose usage the collector still has to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBatch {
    pub batch_id: String,
    pub key_id: KeyId,
}

/// A reservation taken for a batch creation not (yet) tied to a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReservation {
    pub request_id: String,
    pub key_id: KeyId,
    pub reserved_tokens: u64,
    /// Epoch seconds of the admission.
    pub at: u64,
}

/// One page of a key's batches or files, newest first.
#[derive(Debug)]
pub struct OwnedPage<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

/// Where a page starts: Anthropic's `before_id` / `after_id`.
#[derive(Debug, Clone, Copy)]
pub enum PageFrom<'a> {
    Newest,
    /// Older than this id.
    After(&'a str),
    /// Newer than this id.
    Before(&'a str),
}

fn delete(
    table: &str,
    item: layout::ItemKey,
    condition: Option<&str>,
) -> Result<TransactWriteItem, StoreError> {
    Ok(TransactWriteItem::builder()
        .delete(
            Delete::builder()
                .table_name(table)
                .set_key(Some(item.item()))
                .set_condition_expression(condition.map(str::to_owned))
                .build()?,
        )
        .build())
}

impl Store {
    /// Records a created batch as the key's, and opens it for the collector,
    /// in one transaction that also consumes the creation's pending
    /// reservation. If the collector already gave that reservation back
    /// (the creation took longer than [`PENDING_STALE`]), the batch is
    /// recorded with nothing reserved.
    pub async fn record_batch(
        &self,
        record: &BatchRecord,
        request_id: &str,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut record = record.clone();
        for attempt in 0..8 {
            let item = layout::owned::batch_item(&record, now);
            let open = layout::owned::open_batch_item(&record, now);
            let mut items = vec![
                transact_put(self.table(), item, Some(layout::ITEM_ABSENT))?,
                transact_put(self.table(), open, None)?,
            ];
            if record.reserved_tokens > 0 {
                items.push(delete(
                    self.table(),
                    layout::pending(request_id),
                    Some(layout::ITEM_EXISTS),
                )?);
            }
            match self.transact(items).await? {
                Ok(()) => return Ok(()),
                Err(c) if c.failed(0) => {
                    // Recorded before (a retry after a lost answer).
                    return Ok(());
                }
                Err(c) if c.failed(2) => {
                    record.reserved_tokens = 0;
                }
                Err(c) if c.transient() => conflict_pause(attempt).await,
                Err(c) => {
                    return Err(StoreError::Unexpected(anyhow::anyhow!(
                        "recording batch {}: {c:?}",
                        record.batch_id
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "recording batch {} kept conflicting",
            record.batch_id
        )))
    }

    /// Gives a pending reservation back to its key, once: `false` if it was
    /// already given back or consumed.
    pub async fn release_reservation(
        &self,
        pending: &PendingReservation,
    ) -> Result<bool, StoreError> {
        let mut with_key = true;
        for attempt in 0..8 {
            let mut items = vec![delete(
                self.table(),
                layout::pending(&pending.request_id),
                Some(layout::ITEM_EXISTS),
            )?];
            if with_key {
                let change = layout::api_key::reservation_release(pending.reserved_tokens);
                items.push(transact_update(
                    Update::builder()
                        .table_name(self.table())
                        .set_key(Some(layout::api_key(&pending.key_id).item()))
                        .update_expression(change.expression)
                        .condition_expression(layout::ITEM_EXISTS)
                        .set_expression_attribute_values(Some(change.values)),
                )?);
            }
            match self.transact(items).await? {
                Ok(()) => return Ok(true),
                Err(c) if c.failed(0) => {
                    return Ok(false);
                }
                Err(c) if c.failed(1) => {
                    // The key was deleted: nothing to give back to.
                    with_key = false;
                }
                Err(c) if c.transient() => conflict_pause(attempt).await,
                Err(c) => {
                    return Err(StoreError::Unexpected(anyhow::anyhow!(
                        "releasing a reservation: {c:?}"
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "releasing a reservation kept conflicting"
        )))
    }

    /// The key's record of this batch, if the key owns it.
    pub async fn batch(
        &self,
        key: &KeyId,
        batch_id: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        self.owned_item(layout::batch(key, batch_id))
            .await?
            .as_ref()
            .map(BatchRecord::try_from)
            .transpose()
    }

    /// The key's record of this file, if the key owns it.
    pub async fn file(&self, key: &KeyId, file_id: &str) -> Result<Option<FileRecord>, StoreError> {
        self.owned_item(layout::file(key, file_id))
            .await?
            .as_ref()
            .map(FileRecord::try_from)
            .transpose()
    }

    async fn owned_item(&self, item: layout::ItemKey) -> Result<Option<Item>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(self.table())
            .set_key(Some(item.item()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| classify(err).during(format!("GetItem {item}")))?;
        Ok(output.item)
    }

    /// The ids among `file_ids` this key does not own (one batched read).
    pub async fn unowned_files(
        &self,
        key: &KeyId,
        file_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let keys: Vec<Item> = file_ids
            .iter()
            .map(|id| layout::file(key, id).item())
            .collect();
        let mut owned = std::collections::HashSet::new();
        for item in self
            .batch_get(keys, layout::owned::FILE_ID_PROJECTION, &[], true)
            .await?
        {
            owned.insert(layout::owned::file_id(&item)?.to_owned());
        }
        Ok(file_ids
            .iter()
            .filter(|id| !owned.contains(*id))
            .cloned()
            .collect())
    }

    /// Records an uploaded file as the key's.
    pub async fn record_file(&self, record: &FileRecord) -> Result<(), StoreError> {
        let item = layout::owned::file_item(record);
        // Inside a transaction, as every put the proxy makes (its IAM role
        // allows puts and deletes only there).
        self.transact_one(transact_put(self.table(), item, None)?, "recording a file")
            .await
    }

    /// Forgets a file the key deleted upstream.
    pub async fn delete_file_record(&self, key: &KeyId, file_id: &str) -> Result<(), StoreError> {
        self.delete_owned(layout::file(key, file_id)).await
    }

    /// Forgets a batch the key deleted upstream (its usage was recorded first).
    pub async fn delete_batch_record(&self, key: &KeyId, batch_id: &str) -> Result<(), StoreError> {
        self.delete_owned(layout::batch(key, batch_id)).await
    }

    async fn delete_owned(&self, item: layout::ItemKey) -> Result<(), StoreError> {
        let item = delete(self.table(), item, None)?;
        self.transact_one(item, "forgetting a batch or a file")
            .await
    }

    /// One write as a transaction of one item, retried on conflicts.
    async fn transact_one(&self, item: TransactWriteItem, what: &str) -> Result<(), StoreError> {
        for attempt in 0..8 {
            match self.transact(vec![item.clone()]).await? {
                Ok(()) => return Ok(()),
                Err(c) if c.transient() => conflict_pause(attempt).await,
                Err(c) => {
                    return Err(StoreError::Unexpected(anyhow::anyhow!("{what}: {c:?}")));
                }
            }
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "{what} kept conflicting"
        )))
    }

    /// A page of the key's batches, newest first.
    pub async fn list_batches(
        &self,
        key: &KeyId,
        from: PageFrom<'_>,
        limit: usize,
    ) -> Result<Option<OwnedPage<BatchRecord>>, StoreError> {
        self.owned_records(
            layout::batches_index(key),
            |id| layout::batch(key, id),
            from,
            limit,
        )
        .await
    }

    /// A page of the key's files, newest first.
    pub async fn list_files(
        &self,
        key: &KeyId,
        from: PageFrom<'_>,
        limit: usize,
    ) -> Result<Option<OwnedPage<FileRecord>>, StoreError> {
        self.owned_records(
            layout::files_index(key),
            |id| layout::file(key, id),
            from,
            limit,
        )
        .await
    }

    /// A page of owned records of one kind (or sessions), converted from
    /// their items; `None` when the page's anchor id is not one of the key's.
    pub(super) async fn owned_records<T>(
        &self,
        partition: String,
        item_of: impl Fn(&str) -> layout::ItemKey,
        from: PageFrom<'_>,
        limit: usize,
    ) -> Result<Option<OwnedPage<T>>, StoreError>
    where
        T: for<'a> TryFrom<&'a Item, Error = StoreError>,
    {
        let Some(page) = self.owned_page(partition, item_of, from, limit).await? else {
            return Ok(None);
        };
        let items = page
            .items
            .iter()
            .map(T::try_from)
            .collect::<Result<_, _>>()?;
        Ok(Some(OwnedPage {
            items,
            has_more: page.has_more,
        }))
    }

    /// `None` when the page's anchor id is not one of the key's.
    async fn owned_page(
        &self,
        partition: String,
        item_of: impl Fn(&str) -> layout::ItemKey,
        from: PageFrom<'_>,
        limit: usize,
    ) -> Result<Option<OwnedPage<Item>>, StoreError> {
        let anchor = match from {
            PageFrom::Newest => None,
            PageFrom::After(id) | PageFrom::Before(id) => {
                let Some(item) = self.owned_item(item_of(id)).await? else {
                    return Ok(None);
                };
                Some(get_s(&item, layout::GSI1SK)?.to_owned())
            }
        };
        let mut query = self
            .client
            .query()
            .table_name(self.table())
            .index_name(GSI1)
            .expression_attribute_values(":p", s(&partition))
            .limit(i32::try_from(limit + 1).unwrap_or(i32::MAX));
        query = match (&from, anchor) {
            (PageFrom::Before(_), Some(anchor)) => query
                .key_condition_expression(layout::IN_INDEX_PARTITION_AFTER)
                .expression_attribute_values(":a", s(anchor))
                .scan_index_forward(true),
            (_, Some(anchor)) => query
                .key_condition_expression(layout::IN_INDEX_PARTITION_BEFORE)
                .expression_attribute_values(":a", s(anchor))
                .scan_index_forward(false),
            (_, None) => query
                .key_condition_expression(layout::IN_INDEX_PARTITION)
                .scan_index_forward(false),
        };
        let output = query.send().await.map_err(|err| {
            classify(err).during(format!("Query of {GSI1} partition {partition}"))
        })?;
        let mut items = output.items.unwrap_or_default();
        let has_more = items.len() > limit;
        items.truncate(limit);
        if matches!(from, PageFrom::Before(_)) {
            items.reverse();
        }
        Ok(Some(OwnedPage { items, has_more }))
    }

    /// Every open batch and pending reservation (the collector's work).
    pub async fn batch_queue(
        &self,
    ) -> Result<(Vec<OpenBatch>, Vec<PendingReservation>), StoreError> {
        let items = query_all(
            self.client
                .query()
                .table_name(self.table())
                .key_condition_expression(layout::IN_PARTITION)
                .expression_attribute_values(":p", s(layout::queue_partition()))
                .consistent_read(true),
            layout::queue_partition(),
        )
        .await?;
        let mut open = Vec::new();
        let mut pending = Vec::new();
        for item in &items {
            match QueueEntry::try_from(item)? {
                QueueEntry::Open(batch) => open.push(batch),
                QueueEntry::Pending(reservation) => pending.push(reservation),
            }
        }
        Ok((open, pending))
    }

    /// Records a batch's usage exactly once: the batch item is marked
    /// settled (its not being settled is the condition), the usage log gets
    /// one row of kind `batch`, the key's counters take the real figures in
    /// place of the reservation, the day's and each model's aggregates are
    /// added to, and the batch leaves the queue — one transaction.
    pub async fn settle_batch(
        &self,
        batch: &BatchRecord,
        priced: &PricedBatch,
        spend: &BTreeMap<SpendCounter, MicroUsd>,
        at: OffsetDateTime,
        retention: Duration,
    ) -> Result<SettleOutcome, StoreError> {
        let mut with_key = true;
        for attempt in 0..8 {
            let items = self.batch_settle_items(batch, priced, spend, at, retention, with_key)?;
            match self.transact(items).await? {
                Ok(()) if with_key => return Ok(SettleOutcome::Recorded),
                Ok(()) => return Ok(SettleOutcome::RecordedWithoutKey),
                Err(c) if c.failed(0) => {
                    return Ok(SettleOutcome::AlreadyRecorded);
                }
                Err(c) if with_key && c.failed(2) => {
                    with_key = false;
                }
                Err(c) if c.transient() => conflict_pause(attempt).await,
                Err(c) => {
                    return Err(StoreError::Unexpected(anyhow::anyhow!(
                        "settling batch {}: {c:?}",
                        batch.batch_id
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "settling batch {} kept conflicting",
            batch.batch_id
        )))
    }

    fn batch_settle_items(
        &self,
        batch: &BatchRecord,
        priced: &PricedBatch,
        spend: &BTreeMap<SpendCounter, MicroUsd>,
        at: OffsetDateTime,
        retention: Duration,
        with_key: bool,
    ) -> Result<Vec<TransactWriteItem>, StoreError> {
        let tally = &priced.tally;
        let totals = priced.counters(batch.request_count);
        let usage = totals.usage;
        let single_model = match tally.by_model.keys().collect::<Vec<_>>().as_slice() {
            [model] => Some(model.as_str()),
            _ => None,
        };

        let settled = layout::owned::batch_settled(at, usage.billed());
        let mut items = vec![transact_update(
            Update::builder()
                .table_name(self.table())
                .set_key(Some(layout::batch(&batch.key_id, &batch.batch_id).item()))
                .update_expression(settled.expression)
                .condition_expression(layout::owned::NOT_SETTLED)
                .set_expression_attribute_values(Some(settled.values)),
        )?];

        let expires = epoch_seconds(at) + retention.as_secs();
        let flags = layout::usage::LogFlags {
            estimated: tally.estimated,
            unpriced: priced.unpriced(),
        };
        let log = layout::usage::batch_log_item(batch, at, &totals, flags, single_model, expires);
        items.push(transact_put(self.table(), log, Some(layout::ITEM_ABSENT))?);

        if with_key {
            // The real figure replaces the reservation taken at admission.
            let billed = i64::try_from(usage.billed()).unwrap_or(i64::MAX);
            let reserved = i64::try_from(batch.reserved_tokens).unwrap_or(i64::MAX);
            let spend = layout::api_key::KeySpend {
                add: spend
                    .iter()
                    .map(|(counter, cost)| (counter, i64::try_from(*cost).unwrap_or(i64::MAX)))
                    .collect(),
                drop: &[],
                flight: None,
                // Batches are exempt from tokens per minute (`domain::tpm`).
                minute: None,
                drop_minutes: &[],
            };
            let change = layout::api_key::settlement(
                &totals,
                billed - reserved,
                Some(-reserved),
                &spend,
                at,
            );
            items.push(self.key_counters_update(&batch.key_id, change)?);
        }
        // A batch names no request class: it counts as unclassified.
        items.push(self.day_counters_update(
            &batch.key_id,
            &totals,
            at,
            super::settlement::DayShares {
                upstream: None,
                request_class: crate::domain::usage::UNCLASSIFIED,
                models: &priced.day_model_shares(batch.request_count),
            },
        )?);

        // DynamoDB takes 100 items per transaction: the models past the
        // first 90 share one aggregate.
        let mut models: Vec<(String, Counters)> = Vec::new();
        for (index, (model, counters)) in priced.model_counters().enumerate() {
            if index < 90 {
                models.push((model.to_owned(), counters));
            } else if let Some((_, last)) = models.last_mut() {
                *last += counters;
            }
        }
        for (model, counters) in &models {
            items.push(self.model_counters_update(&batch.key_id, model, counters, at)?);
        }
        items.push(delete(
            self.table(),
            layout::open_batch(&batch.batch_id),
            None,
        )?);
        Ok(items)
    }

    /// Drops a queue entry whose batch record is gone.
    pub async fn close_open_batch(&self, batch_id: &str) -> Result<(), StoreError> {
        let item = delete(self.table(), layout::open_batch(batch_id), None)?;
        self.transact_one(item, "dropping a queue entry").await
    }
}
