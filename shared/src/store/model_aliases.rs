//! The model aliases admins define (see `layout::model_aliases`), replaced
//! as a whole. Nothing stored: no aliases.

use super::layout::model_aliases as layout_aliases;
use super::{Store, StoreError, classify};
use crate::domain::format_timestamp;
use crate::domain::model_catalog::ModelAliases;

/// The aliases as stored, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAliases {
    pub aliases: ModelAliases,
    pub updated_at: String,
}

impl Store {
    /// The aliases in force, if an admin stored some. A strongly consistent
    /// read: its readers cache it, and an admin's GET right after a PUT
    /// shows what was put.
    pub async fn stored_aliases(&self) -> Result<Option<StoredAliases>, StoreError> {
        let key = layout_aliases::current();
        let output = self
            .client
            .get_item()
            .table_name(self.table())
            .set_key(Some(key.item()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| classify(err).during(format!("GetItem {key}")))?;
        output
            .item
            .as_ref()
            .map(StoredAliases::try_from)
            .transpose()
    }

    /// Replaces the aliases in force with `aliases`, stored at `now`.
    pub async fn put_aliases(
        &self,
        aliases: &ModelAliases,
        now: time::OffsetDateTime,
    ) -> Result<StoredAliases, StoreError> {
        let updated_at = format_timestamp(now);
        let item = layout_aliases::aliases_item(aliases, &updated_at)?;
        self.client
            .put_item()
            .table_name(self.table())
            .set_item(Some(item))
            .send()
            .await
            .map_err(|err| {
                classify(err).during(format!("PutItem {}", layout_aliases::current()))
            })?;
        Ok(StoredAliases {
            aliases: aliases.clone(),
            updated_at,
        })
    }
}
