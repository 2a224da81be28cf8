//! The model aliases' item (`MODELS` / `ALIASES`): the list admins wrote
//! (`domain::model_catalog`), as one JSON string, and when it was stored.

use super::super::StoreError;
use super::super::item::{Item, corrupt, get_s, s};
use super::super::model_aliases::StoredAliases;
use super::ItemKey;
use crate::domain::model_catalog::{ModelAlias, ModelAliases};
use crate::domain::{format_timestamp, parse_timestamp};

/// Attribute holding the aliases, as a JSON list of `ModelAlias`.
const ALIASES: &str = "aliases";
/// Attribute holding when they were stored (a timestamp).
const UPDATED_AT: &str = "updated_at";

/// The aliases in force.
pub(crate) fn current() -> ItemKey {
    ItemKey::new("MODELS", "ALIASES")
}

/// The item holding `aliases`, stored at `updated_at`.
pub(crate) fn aliases_item(aliases: &ModelAliases, updated_at: &str) -> Result<Item, StoreError> {
    let json = serde_json::to_string(aliases.as_slice())
        .map_err(|e| StoreError::Unexpected(anyhow::anyhow!("model aliases as JSON: {e}")))?;
    let mut item = current().item();
    item.extend([
        (ALIASES.to_owned(), s(json)),
        (UPDATED_AT.to_owned(), s(updated_at)),
    ]);
    Ok(item)
}

impl TryFrom<&Item> for StoredAliases {
    type Error = StoreError;

    /// Read back through the rules they were written under: a stored list
    /// that no longer meets them is reported, never half-used.
    fn try_from(item: &Item) -> Result<Self, StoreError> {
        let list: Vec<ModelAlias> = serde_json::from_str(get_s(item, ALIASES)?)
            .map_err(|e| corrupt(item, ALIASES, &format!("is not an alias list: {e}")))?;
        let aliases = ModelAliases::new(list)
            .map_err(|e| corrupt(item, ALIASES, &format!("breaks a rule: {e:?}")))?;
        let updated_at = parse_timestamp(get_s(item, UPDATED_AT)?)
            .map(format_timestamp)
            .ok_or_else(|| corrupt(item, UPDATED_AT, "is not a timestamp"))?;
        Ok(StoredAliases {
            aliases,
            updated_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_aliases_read_back_as_they_were() {
        let aliases = ModelAliases::new(vec![ModelAlias {
            alias: "claude-team".into(),
            model: "claude-sonnet-5-5".into(),
            display_name: Some("Team \"default\"".into()),
        }])
        .unwrap();
        let at = "2026-01-02T03:04:05.006Z";
        let stored = StoredAliases::try_from(&aliases_item(&aliases, at).unwrap()).unwrap();
        assert_eq!(stored.aliases, aliases);
        assert_eq!(stored.updated_at, at);
        assert_eq!(current().to_string(), "MODELS / ALIASES");
    }
}
