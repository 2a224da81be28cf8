//! The tier item (`TIER#<name>` / `META`), listed through `gsi1` `TIERS`.

use super::super::StoreError;
use super::super::item::{Item, get_n, get_s, n, opt_n, s};
use super::{GSI1PK, GSI1SK, TIERS_INDEX};
use crate::domain::tier::Tier;

impl TryFrom<&Item> for Tier {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        Ok(Tier {
            name: get_s(item, "name")?.to_owned(),
            requests: get_n(item, "requests")?,
            period: get_n(item, "period")?,
            tokens_per_minute: opt_n(item, "tokens_per_minute")?,
        })
    }
}

pub(crate) fn tier_item(tier: &Tier) -> Item {
    let mut item = super::tier(&tier.name).item();
    item.extend([
        (GSI1PK.to_owned(), s(TIERS_INDEX)),
        (GSI1SK.to_owned(), s(&tier.name)),
        ("name".to_owned(), s(&tier.name)),
        ("requests".to_owned(), n(tier.requests)),
        ("period".to_owned(), n(tier.period)),
    ]);
    if let Some(tpm) = tier.tokens_per_minute {
        item.insert("tokens_per_minute".into(), n(tpm));
    }
    item
}
