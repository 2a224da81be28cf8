//! The table's item layout, in one place: every item's partition and sort
//! key, the `gsi1` partitions that list them, and (one file per item kind)
//! the conversions between domain values and items. Nothing outside this
//! module spells a key format.
//!
//! | item                 | pk                  | sk                         | gsi1pk                |
//! |----------------------|---------------------|----------------------------|-----------------------|
//! | API key              | `KEY#<id>`          | `META`                     | `KEYS`                |
//! | usage log row        | `KEY#<id>`          | `LOG#<at>#<request id>`    | `LOG#<id>#<model>`    |
//! | day aggregate        | `KEY#<id>`          | `DAY#<yyyy-mm-dd>`         | `DAY#<yyyy-mm-dd>`    |
//! | model aggregate      | `KEY#<id>`          | `MODEL#<model>`            |                       |
//! | session aggregate    | `KEY#<id>`          | `SESSION#<session id>`     | `SESSIONS#<id>`       |
//! | batch                | `KEY#<id>`          | `BATCH#<batch id>`         | `BATCHES#<id>`        |
//! | file                 | `KEY#<id>`          | `FILE#<file id>`           | `FILES#<id>`          |
//! | open batch           | `BATCHQUEUE`        | `OPEN#<batch id>`          |                       |
//! | pending reservation  | `BATCHQUEUE`        | `PENDING#<request id>`     |                       |
//! | tier                 | `TIER#<name>`       | `META`                     | `TIERS`               |
//! | login failures       | `LOGINFAIL#<ip>`    | `META`                     |                       |
//! | price table in force | `PRICES`            | `CURRENT`                  |                       |
//! | price table version  | `PRICES#VERSIONS`   | `V#<updated_at>`           |                       |
//! | model aliases        | `MODELS`            | `ALIASES`                  |                       |
//! | upstream health      | `UPSTREAM#<name>`   | `HEALTH`                   |                       |
//! | upstream refusal     | `UPSTREAM#<name>`   | `UNUSABLE`                 |                       |
//!
//! Attribute names are spelt here too, and only here: each item kind's file
//! holds its conversions and the expressions that read or change its
//! attributes (conditions, update expressions with their placeholders,
//! projections), and this file the key attributes' conditions and queries.
//! The operation modules (`admission`, `settlement`, …) choose what to run,
//! in which transaction, with which retries; `tests_spelling` checks that no
//! string of theirs names an attribute.

pub(crate) mod api_key;
pub(crate) mod login;
pub(crate) mod model_aliases;
pub(crate) mod owned;
pub(crate) mod prices;
pub(crate) mod tier;
pub(crate) mod upstream_health;
pub(crate) mod usage;

#[cfg(test)]
mod tests_spelling;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use time::OffsetDateTime;

use super::item::{Item, s};
use crate::domain::format_timestamp;
use crate::domain::key::KeyId;

pub(crate) const PK: &str = "pk";
pub(crate) const SK: &str = "sk";
pub(crate) const GSI1PK: &str = "gsi1pk";
pub(crate) const GSI1SK: &str = "gsi1sk";
/// The attribute DynamoDB expires items by (epoch seconds), as in
/// template.yaml.
pub const TTL_ATTRIBUTE: &str = "ttl";

/// Condition: the item exists.
pub(crate) const ITEM_EXISTS: &str = "attribute_exists(pk)";
/// Condition: there is no such item yet.
pub(crate) const ITEM_ABSENT: &str = "attribute_not_exists(pk)";

/// Key condition: every item of partition `:p`.
pub(crate) const IN_PARTITION: &str = "pk = :p";
/// Key condition: every item of `gsi1` partition `:p`.
pub(crate) const IN_INDEX_PARTITION: &str = "gsi1pk = :p";
/// Key condition: the items of `gsi1` partition `:p` sorted after `:a`.
pub(crate) const IN_INDEX_PARTITION_AFTER: &str = "gsi1pk = :p AND gsi1sk > :a";
/// Key condition: the items of `gsi1` partition `:p` sorted before `:a`.
pub(crate) const IN_INDEX_PARTITION_BEFORE: &str = "gsi1pk = :p AND gsi1sk < :a";

/// The sort key of an entity's own item (a key, a tier, a login counter).
const META: &str = "META";
/// The partition of the batch collector's queue.
const QUEUE: &str = "BATCHQUEUE";
const OPEN: &str = "OPEN#";
const LOG: &str = "LOG#";
/// Above every character a sort key holds: the top of a prefix range.
const TOP: char = '\u{10FFFF}';

/// An update expression with the placeholders it uses.
#[derive(Debug)]
pub(crate) struct Change {
    pub expression: String,
    /// Its `#name` placeholders; `None` when it uses none (DynamoDB refuses
    /// an empty map).
    pub names: Option<HashMap<String, String>>,
    /// Its `:value` placeholders.
    pub values: Item,
}

/// Where an item lives: its partition and sort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ItemKey {
    pub pk: String,
    pub sk: String,
}

impl ItemKey {
    fn new(pk: impl Into<String>, sk: impl Into<String>) -> ItemKey {
        ItemKey {
            pk: pk.into(),
            sk: sk.into(),
        }
    }

    /// The key as DynamoDB takes it (`GetItem`, `UpdateItem`, start keys).
    pub(crate) fn item(&self) -> Item {
        Item::from([(PK.to_owned(), s(&self.pk)), (SK.to_owned(), s(&self.sk))])
    }

    /// The key of a stored item, for messages about it.
    pub(crate) fn of(item: &Item) -> Option<ItemKey> {
        match (item.get(PK), item.get(SK)) {
            (Some(pk), Some(sk)) => Some(ItemKey::new(pk.as_s().ok()?, sk.as_s().ok()?)),
            _ => None,
        }
    }
}

impl fmt::Display for ItemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / {}", self.pk, self.sk)
    }
}

/// The partition of everything a key owns: its own item, logs, aggregates,
/// batches and files.
pub(crate) fn key_partition(id: &KeyId) -> String {
    format!("KEY#{id}")
}

pub(crate) fn api_key(id: &KeyId) -> ItemKey {
    ItemKey::new(key_partition(id), META)
}

pub(crate) fn tier(name: &str) -> ItemKey {
    ItemKey::new(format!("TIER#{name}"), META)
}

pub(crate) fn login(ip: IpAddr) -> ItemKey {
    ItemKey::new(format!("LOGINFAIL#{ip}"), META)
}

/// A usage-log row; its sort key orders a key's rows by time.
pub(crate) fn usage_log(key: &KeyId, at: OffsetDateTime, request_id: &str) -> ItemKey {
    ItemKey::new(key_partition(key), log_sort_key(at, request_id))
}

fn log_sort_key(at: OffsetDateTime, request_id: &str) -> String {
    format!("{LOG}{}#{request_id}", format_timestamp(at))
}

pub(crate) fn day(key: &KeyId, day: &str) -> ItemKey {
    ItemKey::new(key_partition(key), day_sort_key(day))
}

fn day_sort_key(day: &str) -> String {
    format!("DAY#{day}")
}

pub(crate) fn model(key: &KeyId, model: &str) -> ItemKey {
    ItemKey::new(key_partition(key), format!("MODEL#{model}"))
}

/// A Claude Code session's aggregate (the id checked by `SessionId`).
pub(crate) fn session(key: &KeyId, session: &str) -> ItemKey {
    ItemKey::new(key_partition(key), format!("SESSION#{session}"))
}

pub(crate) fn batch(key: &KeyId, batch_id: &str) -> ItemKey {
    ItemKey::new(key_partition(key), format!("BATCH#{batch_id}"))
}

pub(crate) fn file(key: &KeyId, file_id: &str) -> ItemKey {
    ItemKey::new(key_partition(key), format!("FILE#{file_id}"))
}

/// A batch whose usage the collector still has to record.
pub(crate) fn open_batch(batch_id: &str) -> ItemKey {
    ItemKey::new(QUEUE, format!("{OPEN}{batch_id}"))
}

/// A reservation taken for a batch creation not (yet) tied to a batch.
pub(crate) fn pending(request_id: &str) -> ItemKey {
    ItemKey::new(QUEUE, format!("PENDING#{request_id}"))
}

/// The partition of the collector's queue.
pub(crate) fn queue_partition() -> &'static str {
    QUEUE
}

/// `gsi1` partition of every key, newest first by [`created_sort_key`].
pub(crate) const KEYS_INDEX: &str = "KEYS";
/// `gsi1` partition of every stored tier.
pub(crate) const TIERS_INDEX: &str = "TIERS";

/// `gsi1` partition of one day's aggregates across keys.
pub(crate) fn day_index(day: &str) -> String {
    day_sort_key(day)
}

/// `gsi1` partition of a key's batches.
pub(crate) fn batches_index(key: &KeyId) -> String {
    format!("BATCHES#{key}")
}

/// `gsi1` partition of a key's sessions, most recently used first by
/// [`created_sort_key`] of their last use.
pub(crate) fn sessions_index(key: &KeyId) -> String {
    format!("SESSIONS#{key}")
}

/// `gsi1` partition of a key's files.
pub(crate) fn files_index(key: &KeyId) -> String {
    format!("FILES#{key}")
}

/// `gsi1` partition of a key's log rows for one model.
pub(crate) fn log_model_index(key: &KeyId, model: &str) -> String {
    format!("{LOG}{key}#{model}")
}

/// The `gsi1` sort key of listed keys, batches and files: creation time,
/// then id (unique, and in time order).
pub(crate) fn created_sort_key(created: &str, id: &str) -> String {
    format!("{created}#{id}")
}

/// The parts of a [`created_sort_key`].
pub(crate) fn split_created_sort_key(sort_key: &str) -> Option<(&str, &str)> {
    sort_key.rsplit_once('#')
}

/// The sort-key range of a key's model aggregates, both ends included.
pub(crate) fn model_range() -> (String, String) {
    ("MODEL#".to_owned(), format!("MODEL#{TOP}"))
}

/// The sort-key range of a key's day aggregates `from..=to`.
pub(crate) fn day_range(from: &str, to: &str) -> (String, String) {
    (day_sort_key(from), day_sort_key(to))
}

/// The sort-key range of log rows recorded `from..=to` (stored timestamps),
/// both ends included.
pub(crate) fn log_range(from: &str, to: &str) -> (String, String) {
    (format!("{LOG}{from}"), format!("{LOG}{to}{TOP}"))
}

/// Whether a sort key is a usage-log row's.
pub(crate) fn is_log_sort_key(sort_key: &str) -> bool {
    sort_key.starts_with(LOG)
}

/// Whether a queue item is an open batch (else a pending reservation).
pub(crate) fn is_open_batch(sort_key: &str) -> bool {
    sort_key.starts_with(OPEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_formats_are_the_documented_ones() {
        let key = KeyId::parse("abcdefABCDEF").unwrap();
        let at = crate::domain::parse_timestamp("2026-01-02T03:04:05.006Z").unwrap();
        assert_eq!(api_key(&key).to_string(), "KEY#abcdefABCDEF / META");
        assert_eq!(
            usage_log(&key, at, "r1").sk,
            "LOG#2026-01-02T03:04:05.006Z#r1"
        );
        assert_eq!(day(&key, "2026-01-02").sk, "DAY#2026-01-02");
        assert_eq!(model(&key, "m").sk, "MODEL#m");
        assert_eq!(session(&key, "s-1").sk, "SESSION#s-1");
        assert_eq!(sessions_index(&key), "SESSIONS#abcdefABCDEF");
        assert_eq!(batch(&key, "b").sk, "BATCH#b");
        assert_eq!(file(&key, "f").sk, "FILE#f");
        assert_eq!(open_batch("b").to_string(), "BATCHQUEUE / OPEN#b");
        assert_eq!(pending("r").to_string(), "BATCHQUEUE / PENDING#r");
        assert_eq!(tier("basic").to_string(), "TIER#basic / META");
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(login(ip).to_string(), "LOGINFAIL#127.0.0.1 / META");
        assert_eq!(log_model_index(&key, "m"), "LOG#abcdefABCDEF#m");
        assert!(is_log_sort_key(&usage_log(&key, at, "r").sk));
        assert!(is_open_batch(&open_batch("b").sk));
        assert!(!is_open_batch(&pending("r").sk));
        assert_eq!(ItemKey::of(&api_key(&key).item()), Some(api_key(&key)));
    }
}
