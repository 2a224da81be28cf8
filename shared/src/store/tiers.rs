//! Rate-limit tier items (see `layout`); built-in tiers apply
//! until an admin stores one of the same name.

use super::{Store, StoreError, classify, layout};
use crate::domain::tier::{Tier, builtin_tiers, named_tier, tier_in_force};

impl Store {
    /// The tier stored under `name`, if any (built-in tiers are not stored).
    async fn stored_tier(&self, name: &str) -> Result<Option<Tier>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(self.table())
            .set_key(Some(layout::tier(name).item()))
            .send()
            .await
            .map_err(|err| classify(err).during(format!("GetItem {}", layout::tier(name))))?;
        output.item.as_ref().map(Tier::try_from).transpose()
    }

    /// A stored tier, or the built-in one of that name.
    pub async fn get_tier(&self, name: &str) -> Result<Option<Tier>, StoreError> {
        Ok(named_tier(name, self.stored_tier(name).await?))
    }

    /// The tier a key named `name` is held to (`domain::tier::tier_in_force`).
    pub async fn tier_in_force(&self, name: &str) -> Result<Tier, StoreError> {
        Ok(
            tier_in_force(name, self.stored_tier(name).await?).unwrap_or_else(|default| {
                tracing::warn!(tier = name, "key names an unknown tier; using the default");
                default
            }),
        )
    }

    /// Every tier, built-in ones included, sorted by name. Tiers are few (an
    /// admin creates them by hand).
    pub async fn list_tiers(&self) -> Result<Vec<Tier>, StoreError> {
        let mut tiers = builtin_tiers();
        for item in self.index_partition(layout::TIERS_INDEX.to_owned()).await? {
            let stored = Tier::try_from(&item)?;
            tiers.retain(|t| t.name != stored.name);
            tiers.push(stored);
        }
        tiers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tiers)
    }

    /// Creates or replaces a tier.
    pub async fn put_tier(&self, tier: &Tier) -> Result<(), StoreError> {
        let item = layout::tier::tier_item(tier);
        self.client
            .put_item()
            .table_name(self.table())
            .set_item(Some(item))
            .send()
            .await
            .map_err(|err| classify(err).during(format!("PutItem {}", layout::tier(&tier.name))))?;
        Ok(())
    }
}
