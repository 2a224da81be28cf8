//! What an admin may set on a key, validated: the rules for names,
//! descriptions, limits, tiers, expiry and the allowlists, each refusal
//! naming its field. The HTTP shapes that carry them are `http::admin`'s.

use std::net::IpAddr;

use ipnet::IpNet;
use time::OffsetDateTime;

use super::{LimitMode, origin_host};
use crate::domain::budget::DollarLimit;
use crate::domain::parse_timestamp;

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

/// Token limits stay well inside what DynamoDB numbers and JSON doubles hold exactly.
const MAX_TOKEN_LIMIT: u64 = 1 << 53;

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
    /// `None`: the organisation default applies.
    pub dollar_limits: Option<Vec<DollarLimit>>,
    /// Most messages in flight at once (`None`: no limit).
    pub max_concurrent: Option<u64>,
    pub limit_mode: LimitMode,
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
    /// `Some(None)`: back to the organisation default.
    pub dollar_limits: Option<Option<Vec<DollarLimit>>>,
    /// `Some(None)`: no concurrency limit.
    pub max_concurrent: Option<Option<u64>>,
    pub limit_mode: Option<LimitMode>,
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
            && self.dollar_limits.is_none()
            && self.max_concurrent.is_none()
            && self.limit_mode.is_none()
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

pub fn validate_name(name: &str) -> Result<String, FieldError> {
    validate_text("name", name, MAX_NAME, true)
}

pub fn validate_description(description: &str) -> Result<String, FieldError> {
    validate_text("description", description, MAX_DESCRIPTION, false)
}

pub fn validate_token_limit(limit: u64) -> Result<u64, FieldError> {
    if limit > MAX_TOKEN_LIMIT {
        return Err(FieldError::new(
            "token_limit",
            format!("must be at most {MAX_TOKEN_LIMIT}"),
        ));
    }
    Ok(limit)
}

/// Most concurrent requests a key may be limited to.
const MAX_CONCURRENT: u64 = 10_000;

pub fn validate_max_concurrent(most: u64) -> Result<u64, FieldError> {
    if (1..=MAX_CONCURRENT).contains(&most) {
        Ok(most)
    } else {
        Err(FieldError::new(
            "max_concurrent",
            format!("must be from 1 to {MAX_CONCURRENT}"),
        ))
    }
}

pub fn validate_limit_mode(name: &str) -> Result<LimitMode, FieldError> {
    LimitMode::parse(name).ok_or_else(|| FieldError::new("limit_mode", "must be `soft` or `hard`"))
}

pub fn validate_tier_ref(tier: &str) -> Result<String, FieldError> {
    crate::domain::tier::validate_tier_name(tier)
        .map_err(|e| FieldError::new("rate_limit_tier", e.reason))?;
    Ok(tier.to_owned())
}

pub fn validate_expiry(text: &str) -> Result<OffsetDateTime, FieldError> {
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

pub fn validate_ips(entries: Vec<String>) -> Result<Vec<IpNet>, FieldError> {
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

pub fn validate_origins(entries: Vec<String>) -> Result<Vec<String>, FieldError> {
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

pub fn validate_models(entries: Vec<String>) -> Result<Vec<String>, FieldError> {
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
