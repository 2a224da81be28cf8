//! The price table's items: the table in force (`PRICES` / `CURRENT`) and
//! every version stored (`PRICES#VERSIONS` / `V#<updated_at>`), each
//! holding the table as admins wrote it (`domain::price_list`), as one JSON
//! string, and when it was stored.

use super::super::StoreError;
use super::super::item::{Item, corrupt, get_s, s};
use super::super::prices::StoredPrices;
use super::ItemKey;
use crate::domain::price::PriceTable;
use crate::domain::price_list::PriceList;
use crate::domain::{format_timestamp, parse_timestamp};

/// Attribute holding the table, as JSON in `PriceList`'s shape.
const PRICE_LIST: &str = "price_list";
/// Attribute holding when the table was stored (a timestamp).
const UPDATED_AT: &str = "updated_at";

/// The stored JSON's largest size: well under DynamoDB's 400 KB per item.
pub(crate) const MAX_STORED_BYTES: usize = 350_000;

const VERSION: &str = "V#";

/// Condition of the current item's put: none yet, or one stored before
/// `:at` (a version never replaces a newer one).
pub(crate) const OLDER_OR_ABSENT: &str = "attribute_not_exists(pk) OR updated_at < :at";
/// Key condition: the versions of partition `:p` older than `:a`.
pub(crate) const VERSIONS_BEFORE: &str = "pk = :p AND sk < :a";
/// Key condition: the versions of partition `:p` newer than `:a`.
pub(crate) const VERSIONS_AFTER: &str = "pk = :p AND sk > :a";

/// The table in force.
pub(crate) fn current() -> ItemKey {
    ItemKey::new("PRICES", "CURRENT")
}

/// The partition of the stored versions.
pub(crate) fn versions_partition() -> &'static str {
    "PRICES#VERSIONS"
}

/// The version stored at `updated_at` (a stored timestamp: its id).
pub(crate) fn version(updated_at: &str) -> ItemKey {
    ItemKey::new(versions_partition(), version_sort_key(updated_at))
}

/// A version's sort key; they sort by time.
pub(crate) fn version_sort_key(updated_at: &str) -> String {
    format!("{VERSION}{updated_at}")
}

/// The JSON of a table, as stored.
pub(crate) fn price_list_json(table: &PriceTable) -> Result<String, StoreError> {
    serde_json::to_string(&PriceList::of(table))
        .map_err(|e| StoreError::Unexpected(anyhow::anyhow!("price table as JSON: {e}")))
}

/// The item at `key` holding `json` (from [`price_list_json`]), stored at
/// `updated_at`.
pub(crate) fn prices_item(key: ItemKey, json: &str, updated_at: &str) -> Item {
    let mut item = key.item();
    item.extend([
        (PRICE_LIST.to_owned(), s(json)),
        (UPDATED_AT.to_owned(), s(updated_at)),
    ]);
    item
}

/// The `:at` value of [`OLDER_OR_ABSENT`].
pub(crate) fn updated_at_value(updated_at: &str) -> Item {
    Item::from([(":at".to_owned(), s(updated_at))])
}

/// When a stored item's table was stored.
pub(crate) fn updated_at_of(item: &Item) -> Result<String, StoreError> {
    let text = get_s(item, UPDATED_AT)?;
    parse_timestamp(text)
        .map(format_timestamp)
        .ok_or_else(|| corrupt(item, UPDATED_AT, "is not a timestamp"))
}

impl TryFrom<&Item> for StoredPrices {
    type Error = StoreError;

    /// Read back through the rules it was written under: a stored table
    /// that no longer meets them is reported, never half-used.
    fn try_from(item: &Item) -> Result<Self, StoreError> {
        let json = get_s(item, PRICE_LIST)?;
        let list: PriceList = serde_json::from_str(json)
            .map_err(|e| corrupt(item, PRICE_LIST, &format!("is not a price list: {e}")))?;
        let table = list
            .validate()
            .map_err(|e| corrupt(item, PRICE_LIST, &format!("breaks a rule: {e}")))?;
        Ok(StoredPrices {
            table,
            updated_at: updated_at_of(item)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::price::default_table;

    #[test]
    fn a_stored_table_reads_back_as_it_was() {
        let table = default_table();
        let at = "2026-01-02T03:04:05.006Z";
        let json = price_list_json(&table).unwrap();
        let item = prices_item(current(), &json, at);
        let stored = StoredPrices::try_from(&item).unwrap();
        assert_eq!(stored.table, table);
        assert_eq!(stored.updated_at, at);
        assert!(json.len() < MAX_STORED_BYTES / 10);
    }

    #[test]
    fn key_formats_are_the_documented_ones() {
        assert_eq!(current().to_string(), "PRICES / CURRENT");
        assert_eq!(
            version("2026-01-02T03:04:05.006Z").to_string(),
            "PRICES#VERSIONS / V#2026-01-02T03:04:05.006Z"
        );
    }
}
