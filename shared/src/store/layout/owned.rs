//! What keys own upstream: batch items (`BATCH#<id>`, listed under `gsi1`
//! `BATCHES#<key>`) and file items (`FILE#<id>`, under `FILES#<key>`), and
//! the collector's queue (`BATCHQUEUE`: `OPEN#<batch id>`,
//! `PENDING#<request id>`); and the expressions on a batch item (its
//! settlement) and a file item (its ownership check).

use aws_sdk_dynamodb::types::AttributeValue;
use time::OffsetDateTime;

use super::super::StoreError;
use super::super::item::{Item, corrupt, get_n, get_s, invalid, n, opt_bool, opt_s, s};
use super::super::owned::{BatchRecord, FileRecord, OpenBatch, PendingReservation};
use super::{
    Change, GSI1PK, GSI1SK, SK, TTL_ATTRIBUTE, batch, batches_index, created_sort_key, file,
    files_index, is_open_batch, open_batch, pending,
};
use crate::domain::key::KeyId;
use crate::domain::price::Attribute;
use crate::domain::{epoch_seconds, format_timestamp};

/// Batch records outlive the upstream's 29 days of results by a day.
pub(crate) const BATCH_RETENTION_SECS: u64 = 30 * 86_400;

fn key_id(item: &Item) -> Result<KeyId, StoreError> {
    KeyId::parse(get_s(item, "key_id")?).ok_or_else(|| invalid(item, "key_id"))
}

impl TryFrom<&Item> for BatchRecord {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        Ok(BatchRecord {
            batch_id: get_s(item, "batch_id")?.to_owned(),
            key_id: key_id(item)?,
            recorded_at: get_s(item, "recorded_at")?.to_owned(),
            request_count: get_n(item, "request_count")?,
            reserved_tokens: get_n(item, "reserved_tokens")?,
            client_ip: get_s(item, "client_ip")?.to_owned(),
            settled_at: opt_s(item, "settled_at")?.map(str::to_owned),
            // Absent on batches recorded before US inference was priced.
            price_attributes: if opt_bool(item, "us_inference")?.unwrap_or(false) {
                vec![Attribute::UsInference]
            } else {
                Vec::new()
            },
        })
    }
}

impl TryFrom<&Item> for FileRecord {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        Ok(FileRecord {
            file_id: get_s(item, "file_id")?.to_owned(),
            key_id: key_id(item)?,
            recorded_at: get_s(item, "recorded_at")?.to_owned(),
            object: serde_json::from_str(get_s(item, "object")?)
                .map_err(|e| corrupt(item, "object", &format!("is not JSON: {e}")))?,
        })
    }
}

/// An item of the collector's queue.
pub(crate) enum QueueEntry {
    Open(OpenBatch),
    Pending(PendingReservation),
}

impl TryFrom<&Item> for QueueEntry {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        let key_id = key_id(item)?;
        Ok(if is_open_batch(get_s(item, SK)?) {
            QueueEntry::Open(OpenBatch {
                batch_id: get_s(item, "batch_id")?.to_owned(),
                key_id,
            })
        } else {
            QueueEntry::Pending(PendingReservation {
                request_id: get_s(item, "request_id")?.to_owned(),
                key_id,
                reserved_tokens: get_n(item, "reserved_tokens")?,
                at: get_n(item, "at")?,
            })
        })
    }
}

/// A batch's item, recorded at `now` (its expiry counts from then).
pub(crate) fn batch_item(record: &BatchRecord, now: OffsetDateTime) -> Item {
    let mut item = batch(&record.key_id, &record.batch_id).item();
    item.extend([
        (GSI1PK.to_owned(), s(batches_index(&record.key_id))),
        (
            GSI1SK.to_owned(),
            s(created_sort_key(&record.recorded_at, &record.batch_id)),
        ),
        ("batch_id".to_owned(), s(&record.batch_id)),
        ("key_id".to_owned(), s(record.key_id.as_str())),
        ("recorded_at".to_owned(), s(&record.recorded_at)),
        ("request_count".to_owned(), n(record.request_count)),
        ("reserved_tokens".to_owned(), n(record.reserved_tokens)),
        ("client_ip".to_owned(), s(&record.client_ip)),
        (
            "us_inference".to_owned(),
            AttributeValue::Bool(record.price_attributes.contains(&Attribute::UsInference)),
        ),
        (
            TTL_ATTRIBUTE.to_owned(),
            n(epoch_seconds(now) + BATCH_RETENTION_SECS),
        ),
    ]);
    item
}

/// The queue item opening a batch for the collector.
pub(crate) fn open_batch_item(record: &BatchRecord, now: OffsetDateTime) -> Item {
    let mut item = open_batch(&record.batch_id).item();
    item.extend([
        ("batch_id".to_owned(), s(&record.batch_id)),
        ("key_id".to_owned(), s(record.key_id.as_str())),
        // Outlives its batch record, whose expiry makes it an orphan the
        // collector drops.
        (
            TTL_ATTRIBUTE.to_owned(),
            n(epoch_seconds(now) + BATCH_RETENTION_SECS + 86_400),
        ),
    ]);
    item
}

/// The queue item of a reservation taken for a batch creation.
pub(crate) fn pending_item(
    id: &KeyId,
    request_id: &str,
    reserved: u64,
    now: OffsetDateTime,
) -> Item {
    let mut item = pending(request_id).item();
    item.extend([
        ("request_id".to_owned(), s(request_id)),
        ("key_id".to_owned(), s(id.as_str())),
        ("reserved_tokens".to_owned(), n(reserved)),
        ("at".to_owned(), n(epoch_seconds(now))),
        (
            TTL_ATTRIBUTE.to_owned(),
            n(epoch_seconds(now) + BATCH_RETENTION_SECS),
        ),
    ]);
    item
}

/// A file's item.
pub(crate) fn file_item(record: &FileRecord) -> Item {
    let mut item = file(&record.key_id, &record.file_id).item();
    item.extend([
        (GSI1PK.to_owned(), s(files_index(&record.key_id))),
        (
            GSI1SK.to_owned(),
            s(created_sort_key(&record.recorded_at, &record.file_id)),
        ),
        ("file_id".to_owned(), s(&record.file_id)),
        ("key_id".to_owned(), s(record.key_id.as_str())),
        ("recorded_at".to_owned(), s(&record.recorded_at)),
        ("object".to_owned(), s(record.object.to_string())),
    ]);
    item
}

/// Condition of a batch's settlement: the batch is recorded and not
/// settled yet.
pub(crate) const NOT_SETTLED: &str = "attribute_exists(pk) AND attribute_not_exists(settled_at)";

/// A batch marked settled at `at`, `tokens` billed.
pub(crate) fn batch_settled(at: OffsetDateTime, tokens: u64) -> Change {
    Change {
        expression: "SET settled_at = :at, settled_tokens = :t".into(),
        names: None,
        values: Item::from([
            (":at".to_owned(), s(format_timestamp(at))),
            (":t".to_owned(), n(tokens)),
        ]),
    }
}

/// What an ownership check reads of a file item.
pub(crate) const FILE_ID_PROJECTION: &str = "file_id";

/// The file id of an item read with [`FILE_ID_PROJECTION`].
pub(crate) fn file_id(item: &Item) -> Result<&str, StoreError> {
    get_s(item, "file_id")
}
