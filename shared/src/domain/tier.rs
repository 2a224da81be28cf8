//! Rate-limit tiers: how many requests a key may make per period, and
//! optionally how many tokens per minute.

use serde::{Deserialize, Serialize};

use super::key::FieldError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    pub name: String,
    pub requests: u64,
    /// Window length in seconds.
    pub period: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
}

pub const DEFAULT_TIER: &str = "basic";

/// The tier of keys that name none, or one that no longer exists.
pub fn default_tier() -> Tier {
    Tier {
        name: DEFAULT_TIER.into(),
        requests: 100,
        period: 60,
        tokens_per_minute: None,
    }
}

/// Tiers that exist without anyone creating them; a stored tier of the same
/// name overrides the built-in one.
pub fn builtin_tiers() -> Vec<Tier> {
    vec![
        default_tier(),
        Tier {
            name: "premium".into(),
            requests: 1000,
            period: 60,
            tokens_per_minute: None,
        },
    ]
}

/// The tier named `name` given what is stored under that name: the stored
/// tier, else the built-in one of that name.
pub fn named_tier(name: &str, stored: Option<Tier>) -> Option<Tier> {
    stored.or_else(|| builtin_tiers().into_iter().find(|t| t.name == name))
}

/// The tier a key naming `name` is held to: [`named_tier`], else the default
/// (tiers are never deleted, but a key could have been written by hand).
/// `Err` carries the default, to say the name was unknown.
pub fn tier_in_force(name: &str, stored: Option<Tier>) -> Result<Tier, Tier> {
    named_tier(name, stored).ok_or_else(default_tier)
}

pub fn validate_tier_name(name: &str) -> Result<(), FieldError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "name",
            "tier names are 1-32 characters of a-z, 0-9, '-' and '_'",
        ))
    }
}

impl Tier {
    /// A tier an admin defines, its name and every number checked.
    pub fn validated(
        name: &str,
        requests: u64,
        period: u64,
        tokens_per_minute: Option<u64>,
    ) -> Result<Tier, FieldError> {
        validate_tier_name(name)?;
        if !(1..=1_000_000_000).contains(&requests) {
            return Err(FieldError::new(
                "requests",
                "must be between 1 and 1000000000",
            ));
        }
        if !(1..=86_400).contains(&period) {
            return Err(FieldError::new(
                "period",
                "must be between 1 and 86400 seconds",
            ));
        }
        if let Some(tpm) = tokens_per_minute
            && !(1..=1_000_000_000_000).contains(&tpm)
        {
            return Err(FieldError::new(
                "tokens_per_minute",
                "must be between 1 and 1000000000000",
            ));
        }
        Ok(Tier {
            name: name.to_owned(),
            requests,
            period,
            tokens_per_minute,
        })
    }
}

/// The fixed rate window a moment falls in: its start (epoch seconds) and
/// the seconds left until the next one.
pub fn window_of(now_epoch: u64, period: u64) -> (u64, u64) {
    let period = period.max(1);
    let start = now_epoch - now_epoch % period;
    (start, start + period - now_epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_out_of_range_is_refused_naming_the_field() {
        let err = Tier::validated("x", 0, 60, None).unwrap_err();
        assert_eq!(err.field, "requests");
        let err = Tier::validated("x", 5, 0, None).unwrap_err();
        assert_eq!(err.field, "period");
        assert_eq!(validate_tier_name("Bad Name").unwrap_err().field, "name");
    }

    #[test]
    fn a_stored_tier_overrides_the_builtin_and_an_unknown_one_falls_back_to_the_default() {
        let stored = Tier {
            name: "premium".into(),
            requests: 7,
            period: 1,
            tokens_per_minute: None,
        };
        assert_eq!(tier_in_force("premium", Some(stored.clone())), Ok(stored));
        assert_eq!(tier_in_force("premium", None).map(|t| t.requests), Ok(1000));
        assert_eq!(tier_in_force("gone", None), Err(default_tier()));
        assert_eq!(named_tier("gone", None), None);
    }

    #[test]
    fn window_start_and_remaining_seconds() {
        assert_eq!(window_of(125, 60), (120, 55));
        assert_eq!(window_of(120, 60), (120, 60));
    }
}
