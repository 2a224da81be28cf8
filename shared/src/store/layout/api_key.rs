//! The API key item (`KEY#<id>` / `META`): the key's record, its rate
//! window and the counters settlement adds to it.

use aws_sdk_dynamodb::types::AttributeValue;
use time::OffsetDateTime;

use super::super::StoreError;
use super::super::item::{
    Item, get_bool, get_list, get_n, get_s, invalid, list, n, opt_n, opt_s, s,
};
use super::super::usage_log::KeyUsage;
use super::{GSI1PK, GSI1SK, KEYS_INDEX, api_key, created_sort_key};
use crate::domain::key::{ApiKeyRecord, KeyId, SecretHash};
use crate::domain::{format_timestamp, parse_timestamp};

impl TryFrom<&Item> for ApiKeyRecord {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        let timestamp = |name: &str| -> Result<OffsetDateTime, StoreError> {
            parse_timestamp(get_s(item, name)?).ok_or_else(|| invalid(item, name))
        };
        Ok(ApiKeyRecord {
            id: KeyId::parse(get_s(item, "id")?).ok_or_else(|| invalid(item, "id"))?,
            name: get_s(item, "name")?.to_owned(),
            description: opt_s(item, "description")?.map(str::to_owned),
            prefix: get_s(item, "prefix")?.to_owned(),
            secret_hash: SecretHash::from_hex(get_s(item, "secret_hash")?)
                .ok_or_else(|| invalid(item, "secret_hash"))?,
            is_active: get_bool(item, "is_active")?,
            created_at: timestamp("created_at")?,
            updated_at: timestamp("updated_at")?,
            expires_at: opt_s(item, "expires_at")?
                .map(|t| parse_timestamp(t).ok_or_else(|| invalid(item, "expires_at")))
                .transpose()?,
            token_limit: opt_n(item, "token_limit")?,
            tokens_used: get_n(item, "tokens_used")?,
            tokens_reserved: get_n(item, "tokens_reserved")?,
            rate_limit_tier: get_s(item, "rate_limit_tier")?.to_owned(),
            allowed_ips: get_list(item, "allowed_ips")?
                .iter()
                .map(|net| net.parse().map_err(|_| invalid(item, "allowed_ips")))
                .collect::<Result<_, _>>()?,
            allowed_origins: get_list(item, "allowed_origins")?,
            allowed_models: get_list(item, "allowed_models")?,
            rate_window: opt_n(item, "rl_window")?
                .map(|start| Ok::<_, StoreError>((start, get_n(item, "rl_count")?)))
                .transpose()?,
        })
    }
}

impl TryFrom<&Item> for KeyUsage {
    type Error = StoreError;

    /// A key item carries its record and its counters together.
    fn try_from(item: &Item) -> Result<Self, StoreError> {
        Ok(KeyUsage {
            key: ApiKeyRecord::try_from(item)?,
            totals: super::usage::totals_of(item)?,
            first_used_at: opt_s(item, "first_used_at")?.map(str::to_owned),
            last_used_at: opt_s(item, "last_used_at")?.map(str::to_owned),
        })
    }
}

/// The `gsi1` sort key listing a key: newest first, ties broken by id.
pub(crate) fn listing_sort_key(record: &ApiKeyRecord) -> String {
    created_sort_key(&format_timestamp(record.created_at), record.id.as_str())
}

/// The item of a newly created key: no usage, no rate window yet.
pub(crate) fn new_key_item(record: &ApiKeyRecord) -> Item {
    let created = format_timestamp(record.created_at);
    let mut item = api_key(&record.id).item();
    item.insert(GSI1PK.into(), s(KEYS_INDEX));
    item.insert(GSI1SK.into(), s(listing_sort_key(record)));
    item.insert("id".into(), s(record.id.as_str()));
    item.insert("name".into(), s(&record.name));
    if let Some(description) = &record.description {
        item.insert("description".into(), s(description));
    }
    item.insert("prefix".into(), s(&record.prefix));
    item.insert("secret_hash".into(), s(record.secret_hash.to_hex()));
    item.insert("is_active".into(), AttributeValue::Bool(true));
    item.insert("created_at".into(), s(&created));
    item.insert("updated_at".into(), s(&created));
    if let Some(expires_at) = record.expires_at {
        item.insert("expires_at".into(), s(format_timestamp(expires_at)));
    }
    if let Some(limit) = record.token_limit {
        item.insert("token_limit".into(), n(limit));
    }
    item.insert("tokens_used".into(), n(0));
    item.insert("requests".into(), n(0));
    item.insert("rate_limit_tier".into(), s(&record.rate_limit_tier));
    let ips: Vec<String> = record.allowed_ips.iter().map(ToString::to_string).collect();
    item.insert("allowed_ips".into(), list(&ips));
    item.insert("allowed_origins".into(), list(&record.allowed_origins));
    item.insert("allowed_models".into(), list(&record.allowed_models));
    item
}

/// The start key resuming a key listing after the key whose listing sort
/// key is `sort_key`.
pub(crate) fn listing_start(sort_key: String, id: &KeyId) -> Item {
    let mut start = api_key(id).item();
    start.insert(GSI1PK.to_owned(), s(KEYS_INDEX));
    start.insert(GSI1SK.to_owned(), s(sort_key));
    start
}
