//! The admin API's request and answer shapes: what its JSON bodies hold
//! and what it shows of a key. The rules the inputs must meet are the
//! domain's (`domain::key::changes`, `domain::tier`).

use serde::{Deserialize, Deserializer, Serialize};

use crate::domain::budget::{
    self, BudgetPolicy, DollarLimit, LimitInput, LimitStanding, standings,
};
use crate::domain::format_timestamp;
use crate::domain::key::{ApiKeyRecord, FieldError, KeyChanges, NewKey, changes};
use crate::domain::tier::Tier;

/// What the admin API shows of a key: never the hash.
#[derive(Debug, Serialize)]
pub struct KeyView {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    pub name: String,
    pub description: Option<String>,
    pub prefix: String,
    pub is_active: bool,
    pub token_limit: Option<u64>,
    pub tokens_used: u64,
    pub tokens_reserved: u64,
    pub rate_limit_tier: String,
    pub expires_at: Option<String>,
    pub allowed_ips: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub allowed_models: Vec<String>,
    /// The key's own dollar limits; `null`: the organisation default.
    pub dollar_limits: Option<Vec<DollarLimitView>>,
    /// Every dollar limit in force, with what is used and left.
    pub budgets: Vec<BudgetView>,
    /// Most messages in flight at once (`null`: no limit).
    pub max_concurrent: Option<u64>,
    /// Messages admitted and not yet settled (leases held).
    pub in_flight: u64,
    /// `soft` or `hard`: how the token and dollar limits admit a request.
    pub limit_mode: &'static str,
    pub created_at: String,
    pub updated_at: String,
}

/// A dollar limit as set.
#[derive(Debug, Serialize)]
pub struct DollarLimitView {
    pub window: &'static str,
    /// Dollars, as a number (exact to the micro-dollar in `limit_micro_usd`).
    pub limit_usd: f64,
    pub limit_micro_usd: u64,
    pub models: Option<String>,
}

impl DollarLimitView {
    pub fn of(limit: &DollarLimit) -> DollarLimitView {
        DollarLimitView {
            window: limit.window.name(),
            limit_usd: limit.limit as f64 / 1e6,
            limit_micro_usd: limit.limit,
            models: limit.models.clone(),
        }
    }
}

/// A dollar limit in force and how it stands (admin and key-holder views).
#[derive(Debug, Serialize)]
pub struct BudgetView {
    #[serde(flatten)]
    pub limit: DollarLimitView,
    /// `key` (set on the key) or `default` (the organisation default).
    pub source: &'static str,
    pub used_micro_usd: u64,
    pub remaining_micro_usd: u64,
    /// When the current period ends; `null` for a lifetime limit or a
    /// 5-hour window not open yet (the next request opens it).
    pub resets_at: Option<String>,
    /// The time zone calendar periods are counted in.
    pub time_zone: String,
}

impl BudgetView {
    pub fn of(standing: &LimitStanding, policy: &BudgetPolicy) -> BudgetView {
        BudgetView {
            limit: DollarLimitView::of(&standing.limit),
            source: standing.source.name(),
            used_micro_usd: standing.used,
            remaining_micro_usd: standing.remaining(),
            resets_at: standing.resets_at.map(format_timestamp),
            time_zone: policy.zone.name().to_owned(),
        }
    }

    /// Every limit in force for `record` at `now`.
    pub fn all(
        record: &ApiKeyRecord,
        policy: &BudgetPolicy,
        now: time::OffsetDateTime,
    ) -> Vec<BudgetView> {
        standings(record, policy, now)
            .iter()
            .map(|s| BudgetView::of(s, policy))
            .collect()
    }
}

impl KeyView {
    /// `api_key` is set only right after creation or rotation; `budgets`
    /// as they stand under `policy` at `now`.
    pub fn of(
        record: &ApiKeyRecord,
        api_key: Option<String>,
        policy: &BudgetPolicy,
        now: time::OffsetDateTime,
    ) -> KeyView {
        KeyView {
            id: record.id.to_string(),
            api_key,
            name: record.name.clone(),
            description: record.description.clone(),
            prefix: record.prefix.clone(),
            is_active: record.is_active,
            token_limit: record.token_limit,
            tokens_used: record.tokens_used,
            tokens_reserved: record.tokens_reserved,
            rate_limit_tier: record.rate_limit_tier.clone(),
            expires_at: record.expires_at.map(format_timestamp),
            allowed_ips: record.allowed_ips.iter().map(ToString::to_string).collect(),
            allowed_origins: record.allowed_origins.clone(),
            allowed_models: record.allowed_models.clone(),
            dollar_limits: record
                .dollar_limits
                .as_ref()
                .map(|limits| limits.iter().map(DollarLimitView::of).collect()),
            budgets: BudgetView::all(record, policy, now),
            max_concurrent: record.max_concurrent,
            in_flight: u64::try_from(record.in_flight).unwrap_or(0),
            limit_mode: record.limit_mode.name(),
            created_at: format_timestamp(record.created_at),
            updated_at: format_timestamp(record.updated_at),
        }
    }
}

/// Body of `POST /admin/api-keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyInput {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub token_limit: Option<u64>,
    #[serde(default)]
    pub rate_limit_tier: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_origins: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    /// Absent or `null`: the organisation default applies; `[]`: none.
    #[serde(default)]
    pub dollar_limits: Option<Vec<DollarLimitInput>>,
    /// Most messages in flight at once; absent or `null`: no limit.
    #[serde(default)]
    pub max_concurrent: Option<u64>,
    /// `soft` (the default) or `hard` (`domain::key::LimitMode`).
    #[serde(default)]
    pub limit_mode: Option<String>,
}

/// One dollar limit as the admin API takes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DollarLimitInput {
    pub window: String,
    /// Dollars: a JSON number, read exactly (at most 6 decimals).
    pub limit_usd: f64,
    #[serde(default)]
    pub models: Option<String>,
}

/// Validates dollar limits given in `field`.
pub fn validate_dollar_limits(
    field: &str,
    inputs: Vec<DollarLimitInput>,
) -> Result<Vec<DollarLimit>, FieldError> {
    let inputs = inputs
        .into_iter()
        .map(|input| LimitInput {
            window: input.window,
            limit_usd: input.limit_usd,
            models: input.models,
        })
        .collect();
    budget::validate_limits(field, inputs)
}

/// Body of `PATCH /admin/api-keys/{id}`: absent fields stay, `null` clears
/// the nullable ones (description, token_limit, expires_at).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchKeyInput {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub description: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub token_limit: Option<Option<u64>>,
    #[serde(default)]
    pub rate_limit_tier: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
    #[serde(default)]
    pub is_active: Option<bool>,
    #[serde(default)]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_origins: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    /// `null`: back to the organisation default; `[]`: no dollar limit.
    #[serde(default, deserialize_with = "present")]
    pub dollar_limits: Option<Option<Vec<DollarLimitInput>>>,
    /// `null`: no concurrency limit.
    #[serde(default, deserialize_with = "present")]
    pub max_concurrent: Option<Option<u64>>,
    #[serde(default)]
    pub limit_mode: Option<String>,
}

/// Distinguishes "field absent" (outer `None`) from "field is null".
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

impl CreateKeyInput {
    pub fn validate(self, default_tier: &str) -> Result<NewKey, FieldError> {
        Ok(NewKey {
            name: changes::validate_name(&self.name)?,
            description: self
                .description
                .map(|d| changes::validate_description(&d))
                .transpose()?,
            token_limit: self
                .token_limit
                .map(changes::validate_token_limit)
                .transpose()?,
            rate_limit_tier: match self.rate_limit_tier {
                Some(tier) => changes::validate_tier_ref(&tier)?,
                None => default_tier.to_owned(),
            },
            expires_at: self
                .expires_at
                .map(|e| changes::validate_expiry(&e))
                .transpose()?,
            allowed_ips: changes::validate_ips(self.allowed_ips.unwrap_or_default())?,
            allowed_origins: changes::validate_origins(self.allowed_origins.unwrap_or_default())?,
            allowed_models: changes::validate_models(self.allowed_models.unwrap_or_default())?,
            dollar_limits: self
                .dollar_limits
                .map(|limits| validate_dollar_limits("dollar_limits", limits))
                .transpose()?,
            max_concurrent: self
                .max_concurrent
                .map(changes::validate_max_concurrent)
                .transpose()?,
            limit_mode: self
                .limit_mode
                .map(|m| changes::validate_limit_mode(&m))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl PatchKeyInput {
    pub fn validate(self) -> Result<KeyChanges, FieldError> {
        let changes = KeyChanges {
            name: self.name.map(|n| changes::validate_name(&n)).transpose()?,
            description: self
                .description
                .map(|d| d.map(|d| changes::validate_description(&d)).transpose())
                .transpose()?,
            token_limit: self
                .token_limit
                .map(|l| l.map(changes::validate_token_limit).transpose())
                .transpose()?,
            rate_limit_tier: self
                .rate_limit_tier
                .map(|t| changes::validate_tier_ref(&t))
                .transpose()?,
            expires_at: self
                .expires_at
                .map(|e| e.map(|e| changes::validate_expiry(&e)).transpose())
                .transpose()?,
            is_active: self.is_active,
            allowed_ips: self.allowed_ips.map(changes::validate_ips).transpose()?,
            allowed_origins: self
                .allowed_origins
                .map(changes::validate_origins)
                .transpose()?,
            allowed_models: self
                .allowed_models
                .map(changes::validate_models)
                .transpose()?,
            dollar_limits: self
                .dollar_limits
                .map(|limits| {
                    limits
                        .map(|l| validate_dollar_limits("dollar_limits", l))
                        .transpose()
                })
                .transpose()?,
            max_concurrent: self
                .max_concurrent
                .map(|m| m.map(changes::validate_max_concurrent).transpose())
                .transpose()?,
            limit_mode: self
                .limit_mode
                .map(|m| changes::validate_limit_mode(&m))
                .transpose()?,
        };
        if changes.is_empty() {
            return Err(FieldError::new("body", "names no field to change"));
        }
        Ok(changes)
    }
}

/// Body of `PUT /admin/tiers/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierInput {
    pub requests: u64,
    pub period: u64,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
}

impl TierInput {
    pub fn into_tier(self, name: &str) -> Result<Tier, FieldError> {
        Tier::validated(name, self.requests, self.period, self.tokens_per_minute)
    }
}

/// `POST /admin/login`'s answer.
#[derive(Debug, Serialize)]
pub struct TokenAnswer {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
}

/// `GET /admin/api-keys`: a page of keys, by cursor.
#[derive(Debug, Serialize)]
pub struct KeyList {
    pub data: Vec<KeyView>,
    pub has_more: bool,
    pub next_cursor: Option<String>,
}

/// `DELETE /admin/api-keys/{id}`'s answer.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub id: String,
    pub deleted: bool,
}

/// `GET /admin/tiers`.
#[derive(Debug, Serialize)]
pub struct TierList {
    pub data: Vec<Tier>,
}

/// A batch a key created, as `GET /admin/api-keys/{id}/batches` shows it.
#[derive(Debug, Serialize)]
pub struct BatchView {
    pub id: String,
    pub recorded_at: String,
    pub request_count: u64,
    pub reserved_tokens: u64,
    pub usage_recorded: bool,
    pub settled_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(json: serde_json::Value) -> Result<NewKey, FieldError> {
        serde_json::from_value::<CreateKeyInput>(json)
            .unwrap()
            .validate("basic")
    }

    #[test]
    fn create_defaults_tier_and_normalises_cidrs() {
        let key = create(
            serde_json::json!({"name": " dev ", "allowed_ips": ["10.1.2.3/8", "192.168.1.7"]}),
        )
        .unwrap();
        assert_eq!(key.name, "dev");
        assert_eq!(key.rate_limit_tier, "basic");
        let ips: Vec<String> = key.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.0.0.0/8", "192.168.1.7/32"]);
    }

    #[test]
    fn create_rejects_bad_fields_naming_them() {
        let cases = [
            (serde_json::json!({"name": ""}), "name"),
            (serde_json::json!({"name": "x".repeat(201)}), "name"),
            (serde_json::json!({"name": "a\u{0007}b"}), "name"),
            (serde_json::json!({"name": "\u{202e}lave"}), "name"),
            (
                serde_json::json!({"name": "a", "allowed_ips": ["10.0.0.0/33"]}),
                "allowed_ips",
            ),
            (
                serde_json::json!({"name": "a", "allowed_origins": ["ftp://x.com"]}),
                "allowed_origins",
            ),
            (
                serde_json::json!({"name": "a", "allowed_origins": ["exa mple.com"]}),
                "allowed_origins",
            ),
            (
                serde_json::json!({"name": "a", "allowed_models": ["claude opus"]}),
                "allowed_models",
            ),
            (
                serde_json::json!({"name": "a", "expires_at": "tomorrow"}),
                "expires_at",
            ),
            (
                serde_json::json!({"name": "a", "rate_limit_tier": "Gold Tier"}),
                "rate_limit_tier",
            ),
            (
                serde_json::json!({"name": "a", "token_limit": 1u64 << 60}),
                "token_limit",
            ),
        ];
        for (input, field) in cases {
            assert_eq!(create(input.clone()).unwrap_err().field, field, "{input}");
        }
    }

    #[test]
    fn patch_distinguishes_null_from_absent() {
        let patch: PatchKeyInput =
            serde_json::from_value(serde_json::json!({"token_limit": null})).unwrap();
        let changes = patch.validate().unwrap();
        assert_eq!(changes.token_limit, Some(None));
        assert_eq!(changes.description, None);
        let empty: PatchKeyInput = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(empty.validate().unwrap_err().field, "body");
    }
}
