//! An API key's record, the admin's create/patch inputs with their
//! validation, and the allowlist rules (IP, origin, model) the proxy applies;
//! the key material (`material`) and the per-request access decision
//! (`access`) beside them.

pub mod access;
pub mod material;

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use time::OffsetDateTime;

pub use material::{KeyId, KeyParseError, PresentedKey, SecretHash, display_prefix};

use super::parse_timestamp;

const MAX_NAME: usize = 200;
const MAX_DESCRIPTION: usize = 2000;
const MAX_LIST: usize = 100;
const MAX_ENTRY: usize = 253;

/// A field that failed validation, and why; becomes a 422 naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A key as stored (the secret only as its hash).
#[derive(Debug, Clone)]
pub struct ApiKeyRecord {
    pub id: KeyId,
    pub name: String,
    pub description: Option<String>,
    pub prefix: String,
    pub secret_hash: SecretHash,
    pub is_active: bool,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub expires_at: Option<OffsetDateTime>,
    /// `None` means unlimited.
    pub token_limit: Option<u64>,
    pub tokens_used: u64,
    /// Of `tokens_used`, what batches in progress reserved for their worst
    /// case (replaced by their real usage once it is recorded).
    pub tokens_reserved: u64,
    pub rate_limit_tier: String,
    pub allowed_ips: Vec<IpNet>,
    pub allowed_origins: Vec<String>,
    pub allowed_models: Vec<String>,
    /// The proxy's fixed rate window: its start (epoch seconds) and how many
    /// requests it has admitted.
    pub rate_window: Option<(u64, u64)>,
}

impl ApiKeyRecord {
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    pub fn remaining_tokens(&self) -> Option<u64> {
        self.token_limit
            .map(|limit| limit.saturating_sub(self.tokens_used))
    }

    /// An empty allowlist allows every address.
    pub fn ip_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.allowed_ips.is_empty() || self.allowed_ips.iter().any(|net| net.contains(&ip))
    }

    /// With an origin allowlist set, a request must carry an allowed `Origin`.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        if self.allowed_origins.is_empty() {
            return true;
        }
        let Some(origin) = origin else { return false };
        let Some(host) = origin_host(origin) else {
            return false;
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        self.allowed_origins.iter().any(|entry| {
            if entry.contains("://") {
                *entry == origin
            } else if let Some(suffix) = entry.strip_prefix("*.") {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            } else {
                *entry == host
            }
        })
    }

    /// Models match exactly, or by prefix for entries ending in `*`.
    pub fn model_allowed(&self, model: Option<&str>) -> bool {
        if self.allowed_models.is_empty() {
            return true;
        }
        let Some(model) = model else { return false };
        self.allowed_models
            .iter()
            .any(|entry| match entry.strip_suffix('*') {
                Some(prefix) => model.starts_with(prefix),
                None => entry == model,
            })
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are the IPv4 address.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The lowercase host of an `Origin` header value (`scheme://host[:port]`).
fn origin_host(origin: &str) -> Option<String> {
    let (_, rest) = origin.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
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
}

/// Distinguishes "field absent" (outer `None`) from "field is null".
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// The validated form of a create request.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub description: Option<String>,
    pub token_limit: Option<u64>,
    pub rate_limit_tier: String,
    pub expires_at: Option<OffsetDateTime>,
    pub allowed_ips: Vec<IpNet>,
    pub allowed_origins: Vec<String>,
    pub allowed_models: Vec<String>,
}

/// The validated form of a patch; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyChanges {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub token_limit: Option<Option<u64>>,
    pub rate_limit_tier: Option<String>,
    pub expires_at: Option<Option<OffsetDateTime>>,
    pub is_active: Option<bool>,
    pub allowed_ips: Option<Vec<IpNet>>,
    pub allowed_origins: Option<Vec<String>>,
    pub allowed_models: Option<Vec<String>>,
}

impl KeyChanges {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.description.is_none()
            && self.token_limit.is_none()
            && self.rate_limit_tier.is_none()
            && self.expires_at.is_none()
            && self.is_active.is_none()
            && self.allowed_ips.is_none()
            && self.allowed_origins.is_none()
            && self.allowed_models.is_none()
    }
}

/// Token limits stay well inside what DynamoDB numbers and JSON doubles hold exactly.
const MAX_TOKEN_LIMIT: u64 = 1 << 53;

impl CreateKeyInput {
    pub fn validate(self, default_tier: &str) -> Result<NewKey, FieldError> {
        Ok(NewKey {
            name: validate_name(&self.name)?,
            description: self
                .description
                .map(|d| validate_description(&d))
                .transpose()?,
            token_limit: self.token_limit.map(validate_token_limit).transpose()?,
            rate_limit_tier: match self.rate_limit_tier {
                Some(tier) => validate_tier_ref(&tier)?,
                None => default_tier.to_owned(),
            },
            expires_at: self.expires_at.map(|e| validate_expiry(&e)).transpose()?,
            allowed_ips: validate_ips(self.allowed_ips.unwrap_or_default())?,
            allowed_origins: validate_origins(self.allowed_origins.unwrap_or_default())?,
            allowed_models: validate_models(self.allowed_models.unwrap_or_default())?,
        })
    }
}

impl PatchKeyInput {
    pub fn validate(self) -> Result<KeyChanges, FieldError> {
        let changes = KeyChanges {
            name: self.name.map(|n| validate_name(&n)).transpose()?,
            description: self
                .description
                .map(|d| d.map(|d| validate_description(&d)).transpose())
                .transpose()?,
            token_limit: self
                .token_limit
                .map(|l| l.map(validate_token_limit).transpose())
                .transpose()?,
            rate_limit_tier: self
                .rate_limit_tier
                .map(|t| validate_tier_ref(&t))
                .transpose()?,
            expires_at: self
                .expires_at
                .map(|e| e.map(|e| validate_expiry(&e)).transpose())
                .transpose()?,
            is_active: self.is_active,
            allowed_ips: self.allowed_ips.map(validate_ips).transpose()?,
            allowed_origins: self.allowed_origins.map(validate_origins).transpose()?,
            allowed_models: self.allowed_models.map(validate_models).transpose()?,
        };
        if changes.is_empty() {
            return Err(FieldError::new("body", "names no field to change"));
        }
        Ok(changes)
    }
}

fn validate_text(
    field: &str,
    value: &str,
    max: usize,
    required: bool,
) -> Result<String, FieldError> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    if value.chars().any(is_bidi_control) {
        return Err(FieldError::new(
            field,
            "must not contain bidirectional control characters",
        ));
    }
    Ok(value.to_owned())
}

/// Characters that reorder displayed text: a name holding them can pass
/// for another in a listing.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

fn validate_name(name: &str) -> Result<String, FieldError> {
    validate_text("name", name, MAX_NAME, true)
}

fn validate_description(description: &str) -> Result<String, FieldError> {
    validate_text("description", description, MAX_DESCRIPTION, false)
}

fn validate_token_limit(limit: u64) -> Result<u64, FieldError> {
    if limit > MAX_TOKEN_LIMIT {
        return Err(FieldError::new(
            "token_limit",
            format!("must be at most {MAX_TOKEN_LIMIT}"),
        ));
    }
    Ok(limit)
}

fn validate_tier_ref(tier: &str) -> Result<String, FieldError> {
    super::tier::validate_tier_name(tier)
        .map_err(|e| FieldError::new("rate_limit_tier", e.reason))?;
    Ok(tier.to_owned())
}

fn validate_expiry(text: &str) -> Result<OffsetDateTime, FieldError> {
    parse_timestamp(text).ok_or_else(|| {
        FieldError::new(
            "expires_at",
            "must be an RFC 3339 timestamp such as 2027-01-31T00:00:00Z",
        )
    })
}

fn check_list_len(field: &str, len: usize) -> Result<(), FieldError> {
    if len > MAX_LIST {
        return Err(FieldError::new(
            field,
            format!("must hold at most {MAX_LIST} entries"),
        ));
    }
    Ok(())
}

fn validate_ips(entries: Vec<String>) -> Result<Vec<IpNet>, FieldError> {
    check_list_len("allowed_ips", entries.len())?;
    entries
        .iter()
        .map(|entry| {
            let entry = entry.trim();
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    FieldError::new(
                        "allowed_ips",
                        format!("`{}` is not an IP address or CIDR block", shorten(entry)),
                    )
                })
        })
        .collect()
}

fn validate_origins(entries: Vec<String>) -> Result<Vec<String>, FieldError> {
    check_list_len("allowed_origins", entries.len())?;
    entries
        .iter()
        .map(|entry| {
            let normalized = entry.trim().trim_end_matches('/').to_ascii_lowercase();
            let host = match normalized.split_once("://") {
                Some((scheme, _)) if scheme != "http" && scheme != "https" => None,
                Some(_) => origin_host(&normalized),
                None => Some(normalized.strip_prefix("*.").unwrap_or(&normalized).to_owned()),
            };
            match host {
                Some(host) if normalized.len() <= MAX_ENTRY && is_hostname(&host) => Ok(normalized),
                _ => Err(FieldError::new(
                    "allowed_origins",
                    format!(
                        "`{}` is not a domain (example.com, *.example.com) or an origin (https://example.com)",
                        shorten(entry)
                    ),
                )),
            }
        })
        .collect()
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn validate_models(entries: Vec<String>) -> Result<Vec<String>, FieldError> {
    check_list_len("allowed_models", entries.len())?;
    entries
        .iter()
        .map(|entry| {
            let entry = entry.trim();
            let ok = !entry.is_empty()
                && entry.len() <= MAX_ENTRY
                && entry
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._:@/*".contains(&b));
            if ok {
                Ok(entry.to_owned())
            } else {
                Err(FieldError::new(
                    "allowed_models",
                    format!("`{}` is not a model name", shorten(entry)),
                ))
            }
        })
        .collect()
}

/// Echo at most a short piece of a rejected value.
fn shorten(value: &str) -> String {
    let mut short: String = value.chars().take(64).filter(|c| !c.is_control()).collect();
    if value.chars().count() > 64 {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::PresentedKey;

    fn record() -> ApiKeyRecord {
        let key = PresentedKey::generate();
        ApiKeyRecord {
            id: key.id().clone(),
            name: "t".into(),
            description: None,
            prefix: String::new(),
            secret_hash: key.hash(),
            is_active: true,
            created_at: crate::domain::now(),
            updated_at: crate::domain::now(),
            expires_at: None,
            token_limit: None,
            tokens_used: 0,
            tokens_reserved: 0,
            rate_limit_tier: "basic".into(),
            allowed_ips: vec![],
            allowed_origins: vec![],
            allowed_models: vec![],
            rate_window: None,
        }
    }

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

    #[test]
    fn ip_allowlist_matches_cidrs_and_mapped_addresses() {
        let mut key = record();
        assert!(key.ip_allowed("8.8.8.8".parse().unwrap()));
        key.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(key.ip_allowed("10.9.9.9".parse().unwrap()));
        assert!(key.ip_allowed("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!key.ip_allowed("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn origin_allowlist_matches_domains_wildcards_and_full_origins() {
        let mut key = record();
        key.allowed_origins = vec![
            "example.com".into(),
            "*.corp.dev".into(),
            "https://app.io".into(),
        ];
        assert!(key.origin_allowed(Some("https://example.com")));
        assert!(key.origin_allowed(Some("http://EXAMPLE.com:8080")));
        assert!(key.origin_allowed(Some("https://a.b.corp.dev")));
        assert!(!key.origin_allowed(Some("https://corp.dev")));
        assert!(!key.origin_allowed(Some("https://evilcorp.dev")));
        assert!(key.origin_allowed(Some("https://app.io")));
        assert!(!key.origin_allowed(Some("http://app.io")));
        assert!(!key.origin_allowed(Some("https://example.com.evil.net")));
        assert!(!key.origin_allowed(None));
        assert!(!key.origin_allowed(Some("null")));
    }

    #[test]
    fn model_allowlist_supports_prefix_wildcards() {
        let mut key = record();
        key.allowed_models = vec!["claude-haiku-*".into(), "claude-opus-5-5".into()];
        assert!(key.model_allowed(Some("claude-haiku-5-5")));
        assert!(key.model_allowed(Some("claude-opus-5-5")));
        assert!(!key.model_allowed(Some("claude-opus-5-6")));
        assert!(!key.model_allowed(None));
    }
}
