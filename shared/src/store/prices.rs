//! The price table admins store (see `layout::prices`): the one in force
//! and every version stored, written together so the history is never
//! missing the table in force. Nothing stored: the shipped table applies.

use aws_sdk_dynamodb::types::{Put, ReturnValuesOnConditionCheckFailure, TransactWriteItem};
use time::Duration;

use super::item::Item;
use super::layout::prices::{self as layout_prices, MAX_STORED_BYTES};
use super::owned::PageFrom;
use super::{Store, StoreError, classify, conflict_pause, layout, transact_put};
use crate::domain::price::PriceTable;
use crate::domain::{format_timestamp, parse_timestamp};

/// A price table as stored: the table and when it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPrices {
    pub table: PriceTable,
    /// The stored timestamp, also the version's id.
    pub updated_at: String,
}

/// What storing a table came to.
#[derive(Debug)]
pub enum PricesStored {
    Stored(StoredPrices),
    /// Its JSON is `bytes` long, over what one item holds.
    TooLarge {
        bytes: usize,
        limit: usize,
    },
}

/// One page of stored versions, newest first.
#[derive(Debug)]
pub struct VersionPage {
    pub versions: Vec<StoredPrices>,
    pub has_more: bool,
}

impl Store {
    /// The table in force, if an admin stored one. A strongly consistent
    /// read: it is cached by its readers, and an admin's GET right after a
    /// PUT shows what was put.
    pub async fn stored_prices(&self) -> Result<Option<StoredPrices>, StoreError> {
        let key = layout_prices::current();
        let output = self
            .client
            .get_item()
            .table_name(self.table())
            .set_key(Some(key.item()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| classify(err).during(format!("GetItem {key}")))?;
        output.item.as_ref().map(StoredPrices::try_from).transpose()
    }

    /// Stores `table` as the one in force and as a version, in one
    /// transaction, at `now` or just after the table in force if that was
    /// stored later (clocks differ between hosts): a version never replaces
    /// a newer one, and two stores never share a version id.
    pub async fn put_prices(
        &self,
        table: &PriceTable,
        now: time::OffsetDateTime,
    ) -> Result<PricesStored, StoreError> {
        let json = layout_prices::price_list_json(table)?;
        if json.len() > MAX_STORED_BYTES {
            return Ok(PricesStored::TooLarge {
                bytes: json.len(),
                limit: MAX_STORED_BYTES,
            });
        }
        let mut at = format_timestamp(now);
        for attempt in 0..8 {
            let current = self.current_put(&json, &at)?;
            let version = transact_put(
                self.table(),
                layout_prices::prices_item(layout_prices::version(&at), &json, &at),
                Some(layout::ITEM_ABSENT),
            )?;
            match self.transact(vec![current, version]).await? {
                Ok(()) => {
                    return Ok(PricesStored::Stored(StoredPrices {
                        table: table.clone(),
                        updated_at: at,
                    }));
                }
                Err(canceled) if canceled.failed(0) || canceled.failed(1) => {
                    // A table stored at or after `at`: store just after it.
                    let newer = canceled
                        .item(0)
                        .map(|item| layout_prices::updated_at_of(&item))
                        .transpose()?;
                    let after = newer
                        .as_deref()
                        .and_then(parse_timestamp)
                        .map_or(now, |newer| newer + Duration::milliseconds(1));
                    at = format_timestamp(after.max(crate::domain::now()));
                }
                Err(canceled) if canceled.transient() => conflict_pause(attempt).await,
                Err(canceled) => {
                    return Err(StoreError::Unexpected(anyhow::anyhow!(
                        "storing the price table: {canceled:?}"
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "storing the price table kept conflicting"
        )))
    }

    /// The put of the table in force, conditioned on no newer one, handing
    /// back the one it met when that fails.
    fn current_put(&self, json: &str, at: &str) -> Result<TransactWriteItem, StoreError> {
        Ok(TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(self.table())
                    .set_item(Some(layout_prices::prices_item(
                        layout_prices::current(),
                        json,
                        at,
                    )))
                    .condition_expression(layout_prices::OLDER_OR_ABSENT)
                    .set_expression_attribute_values(Some(layout_prices::updated_at_value(at)))
                    .return_values_on_condition_check_failure(
                        ReturnValuesOnConditionCheckFailure::AllOld,
                    )
                    .build()?,
            )
            .build())
    }

    /// A page of stored versions, newest first; `from` names versions by
    /// their `updated_at`. A page may hold fewer than `limit` versions
    /// (DynamoDB's 1 MB per query) and still say more follow.
    pub async fn price_versions(
        &self,
        from: PageFrom<'_>,
        limit: usize,
    ) -> Result<VersionPage, StoreError> {
        let partition = layout_prices::versions_partition();
        let mut query = self
            .client
            .query()
            .table_name(self.table())
            .expression_attribute_values(":p", super::item::s(partition))
            .limit(i32::try_from(limit + 1).unwrap_or(i32::MAX));
        query = match from {
            PageFrom::Newest => query
                .key_condition_expression(layout::IN_PARTITION)
                .scan_index_forward(false),
            PageFrom::After(id) => query
                .key_condition_expression(layout_prices::VERSIONS_BEFORE)
                .expression_attribute_values(
                    ":a",
                    super::item::s(layout_prices::version_sort_key(id)),
                )
                .scan_index_forward(false),
            PageFrom::Before(id) => query
                .key_condition_expression(layout_prices::VERSIONS_AFTER)
                .expression_attribute_values(
                    ":a",
                    super::item::s(layout_prices::version_sort_key(id)),
                )
                .scan_index_forward(true),
        };
        let output = query
            .send()
            .await
            .map_err(|err| classify(err).during(format!("Query of {partition}")))?;
        let mut items: Vec<Item> = output.items.unwrap_or_default();
        let has_more = items.len() > limit || output.last_evaluated_key.is_some();
        items.truncate(limit);
        if matches!(from, PageFrom::Before(_)) {
            items.reverse();
        }
        let versions = items
            .iter()
            .map(StoredPrices::try_from)
            .collect::<Result<_, _>>()?;
        Ok(VersionPage { versions, has_more })
    }
}
