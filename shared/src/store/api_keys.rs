//! API key items (their layout and the expressions on them:
//! `layout::api_key`), listed newest first through `gsi1`.

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use time::OffsetDateTime;

use super::item::{Item, s};
use super::{GSI1, Store, StoreError, classify, layout};
use crate::domain::key::{ApiKeyRecord, KeyChanges, NewKey};
use crate::domain::key::{KeyId, PresentedKey, SecretHash, display_prefix};
use crate::domain::parse_timestamp;

/// One page of a key listing and the opaque cursor of the next one.
#[derive(Debug)]
pub struct KeyPage {
    pub keys: Vec<ApiKeyRecord>,
    pub next_cursor: Option<String>,
}

/// A listing cursor that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("cursor is not one this API returned")]
pub struct BadCursor;

fn encode_cursor(sort_key: &str) -> String {
    URL_SAFE_NO_PAD.encode(sort_key)
}

fn decode_cursor(cursor: &str) -> Result<(String, KeyId), BadCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| BadCursor)?;
    let sort_key = String::from_utf8(bytes).map_err(|_| BadCursor)?;
    let (created, id) = layout::split_created_sort_key(&sort_key).ok_or(BadCursor)?;
    parse_timestamp(created).ok_or(BadCursor)?;
    let id = KeyId::parse(id).ok_or(BadCursor)?;
    Ok((sort_key, id))
}

impl Store {
    /// Stores a new key; fails (never overwrites) if the id is taken.
    pub async fn create_key(
        &self,
        key: &PresentedKey,
        new: &NewKey,
        now: OffsetDateTime,
    ) -> Result<ApiKeyRecord, StoreError> {
        let record = ApiKeyRecord {
            id: key.id().clone(),
            name: new.name.clone(),
            description: new.description.clone(),
            prefix: display_prefix(key.id()),
            secret_hash: key.hash(),
            is_active: true,
            created_at: now,
            updated_at: now,
            expires_at: new.expires_at,
            token_limit: new.token_limit,
            tokens_used: 0,
            tokens_reserved: 0,
            rate_limit_tier: new.rate_limit_tier.clone(),
            allowed_ips: new.allowed_ips.clone(),
            allowed_origins: new.allowed_origins.clone(),
            allowed_models: new.allowed_models.clone(),
            rate_window: None,
            dollar_limits: new.dollar_limits.clone(),
            spend: Default::default(),
            five_hour_start: None,
            budget_alerts: Default::default(),
            flights: Vec::new(),
            max_concurrent: new.max_concurrent,
            in_flight: 0,
            limit_mode: new.limit_mode,
            tokens_per_minute: Default::default(),
        };
        let item = layout::api_key::new_key_item(&record);
        self.client
            .put_item()
            .table_name(self.table())
            .set_item(Some(item))
            .condition_expression(layout::ITEM_ABSENT)
            .send()
            .await
            .map_err(|err| {
                classify(err).during(format!("PutItem {}", layout::api_key(key.id())))
            })?;
        Ok(record)
    }

    /// The key with this id, if it exists. Strongly consistent, so a key
    /// just disabled or rotated is seen as such.
    pub async fn get_key(&self, id: &KeyId) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.key_item(id)
            .await?
            .as_ref()
            .map(ApiKeyRecord::try_from)
            .transpose()
    }

    /// The key's item as stored (record and counters), read consistently.
    pub(crate) async fn key_item(&self, id: &KeyId) -> Result<Option<Item>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(self.table())
            .set_key(Some(layout::api_key(id).item()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| classify(err).during(format!("GetItem {}", layout::api_key(id))))?;
        Ok(output.item)
    }

    /// Keys newest first, `limit` at a time, optionally only active or only
    /// inactive ones. The cursor is opaque to callers.
    pub async fn list_keys(
        &self,
        active: Option<bool>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Result<KeyPage, BadCursor>, StoreError> {
        let mut start_key = match cursor.map(decode_cursor).transpose() {
            Ok(start) => start.map(|(sort_key, id)| layout::api_key::listing_start(sort_key, &id)),
            Err(bad) => return Ok(Err(bad)),
        };
        let mut keys = Vec::with_capacity(limit + 1);
        // With a filter DynamoDB may return short pages; keep reading until
        // one more than a page is in hand (that extra proves a next page).
        loop {
            let mut query = self
                .client
                .query()
                .table_name(self.table())
                .index_name(GSI1)
                .key_condition_expression(layout::IN_INDEX_PARTITION)
                .expression_attribute_values(":p", s(layout::KEYS_INDEX))
                .scan_index_forward(false)
                .limit(i32::try_from(limit + 1 - keys.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start_key.take());
            if let Some(active) = active {
                query = query
                    .filter_expression(layout::api_key::ACTIVE_IS)
                    .expression_attribute_values(":a", AttributeValue::Bool(active));
            }
            let output = query.send().await.map_err(|err| {
                classify(err).during(format!("Query of {GSI1} partition {}", layout::KEYS_INDEX))
            })?;
            for item in output.items() {
                keys.push(ApiKeyRecord::try_from(item)?);
            }
            start_key = output.last_evaluated_key;
            if keys.len() > limit || start_key.is_none() {
                break;
            }
        }
        let next_cursor = if keys.len() > limit {
            keys.truncate(limit);
            keys.last()
                .map(|k| encode_cursor(&layout::api_key::listing_sort_key(k)))
        } else {
            None
        };
        Ok(Ok(KeyPage { keys, next_cursor }))
    }

    /// Applies validated changes; `None` if there is no such key.
    pub async fn update_key(
        &self,
        id: &KeyId,
        changes: &KeyChanges,
        now: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.update_existing(id, layout::api_key::patch(changes, now))
            .await
    }

    /// Replaces the secret's hash: the old key stops working at once.
    pub async fn rotate_key(
        &self,
        id: &KeyId,
        new_hash: &SecretHash,
        now: OffsetDateTime,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.update_existing(id, layout::api_key::rotation(new_hash, now))
            .await
    }

    /// Applies `change` to the key, if it exists.
    async fn update_existing(
        &self,
        id: &KeyId,
        change: layout::Change,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.update_key_where(id, change, layout::ITEM_EXISTS).await
    }

    /// Applies `change` to the key if `condition` holds: the key as the
    /// change left it, or `None` (the condition failed).
    pub(super) async fn update_key_where(
        &self,
        id: &KeyId,
        change: layout::Change,
        condition: &str,
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let result = self
            .client
            .update_item()
            .table_name(self.table())
            .set_key(Some(layout::api_key(id).item()))
            .update_expression(change.expression)
            .condition_expression(condition)
            .set_expression_attribute_names(change.names)
            .set_expression_attribute_values((!change.values.is_empty()).then_some(change.values))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(output) => output
                .attributes
                .as_ref()
                .map(ApiKeyRecord::try_from)
                .transpose(),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(None)
            }
            Err(err) => Err(classify(err).during(format!("UpdateItem {}", layout::api_key(id)))),
        }
    }

    /// Deletes the key; `false` if there was none. Its usage history stays.
    pub async fn delete_key(&self, id: &KeyId) -> Result<bool, StoreError> {
        let output = self
            .client
            .delete_item()
            .table_name(self.table())
            .set_key(Some(layout::api_key(id).item()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|err| classify(err).during(format!("DeleteItem {}", layout::api_key(id))))?;
        Ok(output.attributes.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let cursor = encode_cursor("2026-01-01T00:00:00.000Z#abcdefABCDEF");
        let (sort_key, id) = decode_cursor(&cursor).unwrap();
        assert_eq!(sort_key, "2026-01-01T00:00:00.000Z#abcdefABCDEF");
        assert_eq!(id.as_str(), "abcdefABCDEF");
        assert!(decode_cursor("!!!").is_err());
        assert!(decode_cursor(&encode_cursor("no-hash")).is_err());
        assert!(decode_cursor(&encode_cursor("notatime#abcdefABCDEF")).is_err());
    }
}
