//! The proxy's settlement: one idempotent transaction recording the usage
//! log, the key's counters and the aggregates of each relayed request (day,
//! model, and Claude Code session when it names one; the items and updates
//! it writes: `layout::usage`, `layout::api_key`).

use std::time::Duration;

use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{TransactWriteItem, Update};
use time::OffsetDateTime;

use super::{Store, StoreError, conflict_pause, layout, transact_put, transact_update};
use crate::domain::budget::SpendCounter;
use crate::domain::day_of;
use crate::domain::key::{ApiKeyRecord, KeyId};
use crate::domain::price::MicroUsd;
use crate::domain::usage::{ClassTotals, Counters, SessionId, UNKNOWN_MODEL, UsageRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    Recorded,
    /// This request id was settled before: nothing was counted again.
    AlreadyRecorded,
    /// The key no longer exists: the log and aggregates were recorded.
    RecordedWithoutKey,
}

/// How a settlement's day counters split, besides their totals.
pub(crate) struct DayShares<'a> {
    /// The upstream that answered, if one did.
    pub upstream: Option<&'a layout::usage::UpstreamServed<'a>>,
    /// The request-class bucket all of it counts under.
    pub request_class: &'a str,
    /// Each model's share (adding up to the totals).
    pub models: &'a [(&'a str, ClassTotals)],
}

impl Store {
    /// Records one request exactly once: the usage-log item (whose absence
    /// is the transaction's condition, so a repeated settle counts nothing
    /// and answers `AlreadyRecorded`),
    /// the key's counters, the day's and the model's aggregates, and the
    /// session's when the request named a valid one (`SessionId`), in one
    /// transaction. Retries transaction conflicts itself.
    pub async fn settle(
        &self,
        record: &UsageRecord,
        retention: Duration,
    ) -> Result<SettleOutcome, StoreError> {
        let mut with_key = true;
        for attempt in 0..8 {
            let items = self.settle_items(record, retention, with_key)?;
            // No ClientRequestToken: the log item's condition already makes a
            // repeat a no-op, at any distance in time, and tells us so.
            match self.transact(items).await? {
                Ok(()) if with_key => return Ok(SettleOutcome::Recorded),
                Ok(()) => return Ok(SettleOutcome::RecordedWithoutKey),
                Err(canceled) if canceled.failed(0) => return Ok(SettleOutcome::AlreadyRecorded),
                Err(canceled) if with_key && canceled.failed(1) => with_key = false,
                Err(canceled) if canceled.transient() => conflict_pause(attempt).await,
                Err(canceled) => {
                    return Err(StoreError::Unexpected(anyhow::anyhow!(
                        "settle of {}: {canceled:?}",
                        record.request_id
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "settle of {} kept conflicting",
            record.request_id
        )))
    }

    /// Claims the budget alert of `threshold` on `counter` after a
    /// settlement (`domain::budget::alerts`): one conditional write raising
    /// the counter's alert marker, refused when a claim already reached the
    /// threshold or the settled spend has not reached `amount`. Of any
    /// number of claimants exactly one gets the key as the claim left it
    /// (its settled spend and name, for the event); the others get `None`,
    /// as does a claim on a key deleted meanwhile.
    pub async fn claim_budget_alert(
        &self,
        key_id: &KeyId,
        counter: &SpendCounter,
        threshold: u8,
        amount: MicroUsd,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let claim = layout::api_key::alert_claim(counter, threshold, amount);
        self.update_key_where(key_id, claim, layout::api_key::ALERT_CLAIM_CONDITION)
            .await
    }

    /// Drops the trace of request `request_id` from the key: it was
    /// settled, and only the trace was left (`proxy::reconcile`).
    pub async fn drop_flight(&self, key_id: &KeyId, request_id: &str) -> Result<(), StoreError> {
        let change = layout::api_key::flight_removal(request_id);
        self.update_key_where(key_id, change, layout::ITEM_EXISTS)
            .await
            .map(|_| ())
    }

    fn settle_items(
        &self,
        record: &UsageRecord,
        retention: Duration,
        with_key: bool,
    ) -> Result<Vec<TransactWriteItem>, StoreError> {
        let usage = &record.usage;
        let expires = crate::domain::epoch_seconds(record.at) + retention.as_secs();
        let log = layout::usage::request_log_item(record, expires);
        let mut items = vec![transact_put(self.table(), log, Some(layout::ITEM_ABSENT))?];

        let counters = Counters::of(record);
        if with_key {
            let billed = i64::try_from(usage.billed()).unwrap_or(i64::MAX);
            let spend = layout::api_key::KeySpend::of(
                &record.budget,
                record.cost.micro_usd,
                usage.billed(),
                &record.request_id,
            );
            // A hard-mode reservation is replaced by the real figure.
            let reserved = record
                .budget
                .reservation
                .as_ref()
                .map(|r| i64::try_from(r.tokens).unwrap_or(i64::MAX))
                .filter(|tokens| *tokens > 0);
            let change = layout::api_key::settlement(
                &counters,
                billed - reserved.unwrap_or(0),
                reserved.map(|tokens| -tokens),
                &spend,
                record.at,
            );
            items.push(self.key_counters_update(&record.key_id, change)?);
        }
        let served = record
            .upstream
            .as_deref()
            .map(|name| layout::usage::UpstreamServed {
                name,
                failed: record.error_type.is_some(),
            });
        // Every request counts under one request class (or unclassified),
        // on the day and session items written anyway.
        let bucket = record.attribution.bucket();
        let model = record.model.as_deref().unwrap_or(UNKNOWN_MODEL);
        items.push(self.day_counters_update(
            &record.key_id,
            &counters,
            record.at,
            DayShares {
                upstream: served.as_ref(),
                request_class: bucket,
                models: &[(model, ClassTotals::of(&counters))],
            },
        )?);
        items.push(self.model_counters_update(&record.key_id, model, &counters, record.at)?);
        // A session id that may not be a key is ignored: the log row still
        // carries what the client sent.
        if let Some(session) = record.session_id.as_deref().and_then(SessionId::parse) {
            let change = layout::usage::session_settlement(
                &record.key_id,
                &session,
                &counters,
                record.at,
                expires,
            );
            let change = layout::usage::with_class_counters(change, bucket, &counters);
            let item = layout::session(&record.key_id, session.as_str());
            items.push(transact_update(self.counters_item_update(item, change))?);
        }
        Ok(items)
    }

    /// The key item's share of a settlement (a `layout::api_key::settlement`).
    /// The key may have been deleted meanwhile: then this item fails its
    /// condition and the settlement retries without it.
    pub(crate) fn key_counters_update(
        &self,
        key_id: &KeyId,
        change: layout::Change,
    ) -> Result<TransactWriteItem, StoreError> {
        transact_update(
            self.counters_item_update(layout::api_key(key_id), change)
                .condition_expression(layout::ITEM_EXISTS),
        )
    }

    /// The day aggregate's share, also indexed by day for the all-keys
    /// view, and counted by upstream, request class and model too.
    pub(crate) fn day_counters_update(
        &self,
        key_id: &KeyId,
        counters: &Counters,
        at: OffsetDateTime,
        shares: DayShares<'_>,
    ) -> Result<TransactWriteItem, StoreError> {
        let day = day_of(at);
        let item = layout::day(key_id, &day);
        let change =
            layout::usage::day_settlement(key_id, &item, &day, counters, at, shares.upstream);
        let change = layout::usage::with_class_counters(change, shares.request_class, counters);
        let change = layout::usage::with_model_counters(change, shares.models);
        transact_update(self.counters_item_update(item, change))
    }

    /// A model aggregate's share.
    pub(crate) fn model_counters_update(
        &self,
        key_id: &KeyId,
        model: &str,
        counters: &Counters,
        at: OffsetDateTime,
    ) -> Result<TransactWriteItem, StoreError> {
        let change = layout::usage::model_settlement(model, counters, at);
        transact_update(self.counters_item_update(layout::model(key_id, model), change))
    }

    /// One counters update of the settle transaction (key, day or model
    /// item); the caller adds its condition.
    pub(crate) fn counters_item_update(
        &self,
        item: layout::ItemKey,
        change: layout::Change,
    ) -> UpdateBuilder {
        Update::builder()
            .table_name(self.table())
            .set_key(Some(item.item()))
            .update_expression(change.expression)
            .set_expression_attribute_names(change.names)
            .set_expression_attribute_values(Some(change.values))
    }
}
