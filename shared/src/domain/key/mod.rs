//! An API key's record and the allowlist rules (IP, origin, model) the
//! proxy applies; beside them the key material (`material`), the
//! per-request access decision (`access`) and what an admin may set on a
//! key, validated (`changes`).

pub mod access;
pub mod changes;
pub mod material;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use time::OffsetDateTime;

use super::budget::{DollarLimit, SpendCounter};
use super::flight::Flight;
use super::price::MicroUsd;
pub use changes::{FieldError, KeyChanges, NewKey};
pub use material::{KeyId, KeyParseError, PresentedKey, SecretHash, display_prefix};

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
    /// The key's own dollar limits (`domain::budget`); `None`: the
    /// organisation default applies, `Some(vec![])`: no dollar limit.
    pub dollar_limits: Option<Vec<DollarLimit>>,
    /// What each dollar limit's periods have spent, as stored.
    pub spend: BTreeMap<SpendCounter, MicroUsd>,
    /// The start (epoch seconds) of the key's last 5-hour window.
    pub five_hour_start: Option<u64>,
    /// Its requests admitted and not yet settled (`domain::flight`).
    pub flights: Vec<Flight>,
    /// Most of its messages admitted and not yet settled at once
    /// (`None`: no limit).
    pub max_concurrent: Option<u64>,
    /// Its messages admitted and not yet settled, as counted by admission
    /// (+1) and settlement or the reconciler (−1).
    pub in_flight: i64,
    /// The highest budget-alert threshold (percent) already sent for each
    /// spend counter (`domain::budget::alerts`); none: nothing sent yet.
    pub budget_alerts: BTreeMap<SpendCounter, u8>,
    /// Tokens settled per minute of admission (`domain::tpm`), by the
    /// minute's start (epoch seconds), as stored: the current minute and
    /// the few earlier ones the next settlement drops.
    pub tokens_per_minute: BTreeMap<u64, u64>,
    /// How its token and dollar limits admit a request (`LimitMode`).
    pub limit_mode: LimitMode,
}

/// How a key's token and dollar limits admit a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LimitMode {
    /// Admitted while every limit has room; the overshoot is bounded by
    /// what the requests already in flight use.
    #[default]
    Soft,
    /// Admitted only if its worst case fits every limit: the worst case is
    /// reserved in the admission write and replaced by the real figure at
    /// settlement, so recorded spend never exceeds a limit.
    Hard,
}

impl LimitMode {
    pub fn name(self) -> &'static str {
        match self {
            LimitMode::Soft => "soft",
            LimitMode::Hard => "hard",
        }
    }

    pub fn parse(name: &str) -> Option<LimitMode> {
        match name {
            "soft" => Some(LimitMode::Soft),
            "hard" => Some(LimitMode::Hard),
            _ => None,
        }
    }
}

impl ApiKeyRecord {
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// What its hard-mode requests in flight hold of its limits (their
    /// reservations, released when they are settled): tokens, and dollars
    /// (each request counted once, whichever counters it reserved on).
    pub fn held_by_flights(&self) -> (u64, MicroUsd) {
        self.flights
            .iter()
            .filter_map(|f| f.reservation.as_ref())
            .fold((0, 0), |(tokens, cost), r| {
                (tokens.saturating_add(r.tokens), cost.saturating_add(r.cost))
            })
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
pub(super) fn origin_host(origin: &str) -> Option<String> {
    let (_, rest) = origin.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
impl ApiKeyRecord {
    /// A usable key created at `now`, without limits or allowlists, and
    /// its secret's hash (for tests).
    pub(crate) fn sample(now: OffsetDateTime) -> (ApiKeyRecord, SecretHash) {
        let key = PresentedKey::generate();
        let record = ApiKeyRecord {
            id: key.id().clone(),
            name: "sample".into(),
            description: None,
            prefix: String::new(),
            secret_hash: key.hash(),
            is_active: true,
            created_at: now,
            updated_at: now,
            expires_at: None,
            token_limit: None,
            tokens_used: 0,
            tokens_reserved: 0,
            rate_limit_tier: "basic".into(),
            allowed_ips: vec![],
            allowed_origins: vec![],
            allowed_models: vec![],
            rate_window: None,
            dollar_limits: None,
            spend: BTreeMap::new(),
            five_hour_start: None,
            budget_alerts: BTreeMap::new(),
            flights: Vec::new(),
            tokens_per_minute: BTreeMap::new(),
            max_concurrent: None,
            in_flight: 0,
            limit_mode: LimitMode::Soft,
        };
        (record, key.hash())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ApiKeyRecord {
        ApiKeyRecord::sample(crate::domain::now()).0
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
