//! The upstream pool: which upstreams (Anthropic accounts, Amazon Bedrock
//! Regions) the relay may forward to, validated once from the secret or the
//! environment; in which order one request tries them (priority, weight,
//! the session's affinity, health); and how long a failing one cools down.
//! Pure rules: the store keeps the shared health, the proxy forwards.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::budget::glob_matches;

/// The name the single `upstream_api_key` form's upstream goes by.
pub const DEFAULT_UPSTREAM_NAME: &str = "anthropic";
/// Names become DynamoDB keys and metric dimensions: short and plain.
pub const MAX_NAME_LEN: usize = 64;
/// More would make every request's ordering and health read longer for no
/// configuration anyone runs.
pub const MAX_UPSTREAMS: usize = 32;
/// A weight's bound keeps the arithmetic of the weighted order exact enough.
pub const MAX_WEIGHT: u32 = 1000;
/// Priority of an entry that gives none: the primary rank.
pub const DEFAULT_PRIORITY: u32 = 1;
pub const DEFAULT_WEIGHT: u32 = 1;

/// The longest cooldown a `retry-after` can ask for.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// The first cooldown without `retry-after`, doubled per consecutive failure…
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// …up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// An Anthropic API key. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamApiKey(String);

impl UpstreamApiKey {
    pub fn new(key: impl Into<String>) -> UpstreamApiKey {
        UpstreamApiKey(key.into())
    }

    /// The key itself, for the `x-api-key` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UpstreamApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpstreamApiKey(…)")
    }
}

/// How an upstream is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKind {
    /// The Anthropic API (or anything speaking it) at `base_url` (no
    /// trailing slash) with an API key.
    Anthropic {
        base_url: String,
        api_key: UpstreamApiKey,
    },
    /// Amazon Bedrock in `region`, with the function's own IAM role.
    Bedrock {
        region: String,
        /// A Bedrock runtime endpoint other than the Region's (tests, VPC
        /// endpoints).
        endpoint_url: Option<String>,
        /// Anthropic model id → Bedrock model or inference-profile id; the
        /// models this upstream can serve at all. Keys are lowercase.
        model_map: BTreeMap<String, String>,
    },
}

/// One upstream of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// Unique in the pool; `[A-Za-z0-9._-]`, at most [`MAX_NAME_LEN`].
    pub name: String,
    pub kind: UpstreamKind,
    /// Lower first: `1` is the primary rank, `2` is tried only when every
    /// healthy upstream of rank 1 has failed or does not serve the model.
    pub priority: u32,
    /// Share of the traffic within its priority, relative to the others'
    /// (1 to [`MAX_WEIGHT`]).
    pub weight: u32,
    /// Glob patterns (`*`, case-insensitive) over the model id; empty: every
    /// model (for Bedrock: every model of its map).
    pub models: Vec<String>,
}

impl UpstreamSpec {
    /// Whether this upstream serves `model` (`None`: a request naming no
    /// model, e.g. `/v1/models`, which every upstream answers).
    pub fn serves(&self, model: Option<&str>) -> bool {
        let Some(model) = model else {
            return true;
        };
        let listed = self.models.is_empty() || self.models.iter().any(|p| glob_matches(p, model));
        listed
            && match &self.kind {
                UpstreamKind::Anthropic { .. } => true,
                UpstreamKind::Bedrock { .. } => self.bedrock_model(model).is_some(),
            }
    }

    /// The Bedrock model (or inference-profile) id `model` maps to, for a
    /// Bedrock upstream.
    pub fn bedrock_model(&self, model: &str) -> Option<&str> {
        match &self.kind {
            UpstreamKind::Bedrock { model_map, .. } => model_map
                .get(&model.to_ascii_lowercase())
                .map(String::as_str),
            UpstreamKind::Anthropic { .. } => None,
        }
    }

    /// A short fingerprint of how this upstream authenticates (its key, its
    /// base URL; a Bedrock upstream's Region and endpoint). An "unusable"
    /// mark (401/403) holds the fingerprint it was made under, so it stops
    /// applying as soon as the secret is re-read with a different key for
    /// this upstream, and only for this upstream. A truncated SHA-256 of a
    /// high-entropy key reveals nothing usable about it.
    pub fn credential_version(&self) -> String {
        let mut hash = Sha256::new();
        match &self.kind {
            UpstreamKind::Anthropic { base_url, api_key } => {
                hash.update(b"anthropic\0");
                hash.update(base_url.as_bytes());
                hash.update(b"\0");
                hash.update(api_key.expose().as_bytes());
            }
            UpstreamKind::Bedrock {
                region,
                endpoint_url,
                ..
            } => {
                hash.update(b"bedrock\0");
                hash.update(region.as_bytes());
                hash.update(b"\0");
                hash.update(endpoint_url.as_deref().unwrap_or("").as_bytes());
            }
        }
        hash.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The validated pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamPool {
    /// In configuration order; never empty.
    pub upstreams: Vec<UpstreamSpec>,
    /// Both an `upstreams` list and `upstream_api_key` were given: the list
    /// is used and the key ignored (the caller says so in the log).
    pub single_key_ignored: bool,
}

impl UpstreamPool {
    pub fn names(&self) -> Vec<&str> {
        self.upstreams.iter().map(|u| u.name.as_str()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&UpstreamSpec> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// What is wrong with the configured upstreams: `at` names the entry and
/// field (`upstreams[1].region`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct PoolError {
    pub at: String,
    pub reason: String,
}

fn pool_error(at: impl Into<String>, reason: impl Into<String>) -> PoolError {
    PoolError {
        at: at.into(),
        reason: reason.into(),
    }
}

/// One entry of the `upstreams` list as written (JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamInput {
    name: String,
    kind: String,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    endpoint_url: Option<String>,
    #[serde(default)]
    model_map: Option<BTreeMap<String, String>>,
}

/// The pool from what the secret (or the environment) holds: the
/// `upstreams` list when there is one (it wins over `upstream_api_key`,
/// never merged with it), else the single key as one Anthropic upstream
/// named [`DEFAULT_UPSTREAM_NAME`] at `default_base_url`. `Ok(None)`:
/// neither is configured (proxied requests get 503, as before pools).
pub fn pool_from(
    list: Option<&serde_json::Value>,
    single_key: Option<&str>,
    default_base_url: &str,
) -> Result<Option<UpstreamPool>, PoolError> {
    let single_key = single_key.filter(|k| !k.trim().is_empty());
    let Some(list) = list else {
        return Ok(single_key.map(|key| UpstreamPool {
            upstreams: vec![UpstreamSpec {
                name: DEFAULT_UPSTREAM_NAME.to_owned(),
                kind: UpstreamKind::Anthropic {
                    base_url: default_base_url.trim_end_matches('/').to_owned(),
                    api_key: UpstreamApiKey::new(key),
                },
                priority: DEFAULT_PRIORITY,
                weight: DEFAULT_WEIGHT,
                models: Vec::new(),
            }],
            single_key_ignored: false,
        }));
    };
    let entries = list
        .as_array()
        .ok_or_else(|| pool_error("upstreams", "must be a list"))?;
    if entries.is_empty() {
        return Err(pool_error("upstreams", "must hold at least one upstream"));
    }
    if entries.len() > MAX_UPSTREAMS {
        return Err(pool_error(
            "upstreams",
            format!("holds {} upstreams, at most {MAX_UPSTREAMS}", entries.len()),
        ));
    }
    let mut upstreams: Vec<UpstreamSpec> = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let spec = validate_entry(index, entry, default_base_url)?;
        if upstreams.iter().any(|u| u.name == spec.name) {
            return Err(pool_error(
                format!("upstreams[{index}].name"),
                format!("`{}` is the name of an earlier upstream", spec.name),
            ));
        }
        upstreams.push(spec);
    }
    Ok(Some(UpstreamPool {
        upstreams,
        single_key_ignored: single_key.is_some(),
    }))
}

fn validate_entry(
    index: usize,
    entry: &serde_json::Value,
    default_base_url: &str,
) -> Result<UpstreamSpec, PoolError> {
    let at = |field: &str| format!("upstreams[{index}].{field}");
    let input: UpstreamInput = serde_path_to_error::deserialize(entry).map_err(|e| {
        let path = e.path().to_string();
        let where_ = if path == "." {
            format!("upstreams[{index}]")
        } else {
            at(&path)
        };
        // serde's "missing field"/"unknown field" messages name fields
        // only; its type errors may quote the value, which may be a key.
        let message = e.into_inner().to_string();
        let reason = if message.starts_with("missing field") || message.starts_with("unknown field")
        {
            message
        } else {
            "has the wrong type or value".to_owned()
        };
        pool_error(where_, reason)
    })?;
    let name = input.name.trim();
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(pool_error(
            at("name"),
            format!("must be 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, `.`, `_`, `-`"),
        ));
    }
    let weight = input.weight.unwrap_or(DEFAULT_WEIGHT);
    if !(1..=MAX_WEIGHT).contains(&weight) {
        return Err(pool_error(
            at("weight"),
            format!("must be between 1 and {MAX_WEIGHT}"),
        ));
    }
    if let Some(i) = input.models.iter().position(|p| p.trim().is_empty()) {
        return Err(pool_error(at(&format!("models[{i}]")), "must not be blank"));
    }
    let kind = match input.kind.trim() {
        "anthropic" => {
            for (field, given) in [
                ("region", input.region.is_some()),
                ("endpoint_url", input.endpoint_url.is_some()),
                ("model_map", input.model_map.is_some()),
            ] {
                if given {
                    return Err(pool_error(at(field), "is for kind `bedrock` only"));
                }
            }
            let api_key = input
                .api_key
                .filter(|k| !k.trim().is_empty())
                .ok_or_else(|| pool_error(at("api_key"), "must be set for kind `anthropic`"))?;
            let base_url = input
                .base_url
                .unwrap_or_else(|| default_base_url.to_owned());
            check_url(&base_url).map_err(|reason| pool_error(at("base_url"), reason))?;
            UpstreamKind::Anthropic {
                base_url: base_url.trim_end_matches('/').to_owned(),
                api_key: UpstreamApiKey::new(api_key.trim()),
            }
        }
        "bedrock" => {
            for (field, given) in [
                ("api_key", input.api_key.is_some()),
                ("base_url", input.base_url.is_some()),
            ] {
                if given {
                    return Err(pool_error(at(field), "is for kind `anthropic` only"));
                }
            }
            let region = input
                .region
                .map(|r| r.trim().to_owned())
                .filter(|r| !r.is_empty())
                .ok_or_else(|| pool_error(at("region"), "must be set for kind `bedrock`"))?;
            if region.len() > 32
                || !region
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(pool_error(
                    at("region"),
                    "is not an AWS Region name (e.g. `us-east-1`)",
                ));
            }
            if let Some(url) = &input.endpoint_url {
                check_url(url).map_err(|reason| pool_error(at("endpoint_url"), reason))?;
            }
            let map = input.model_map.unwrap_or_default();
            if map.is_empty() {
                return Err(pool_error(
                    at("model_map"),
                    "must map at least one Anthropic model id to a Bedrock model id",
                ));
            }
            let mut model_map = BTreeMap::new();
            for (model, bedrock) in map {
                let (model, bedrock) = (model.trim(), bedrock.trim());
                if model.is_empty() || bedrock.is_empty() {
                    return Err(pool_error(
                        at("model_map"),
                        "holds a blank model id".to_owned(),
                    ));
                }
                if model_map
                    .insert(model.to_ascii_lowercase(), bedrock.to_owned())
                    .is_some()
                {
                    return Err(pool_error(
                        at("model_map"),
                        format!("maps `{model}` twice (model ids are case-insensitive)"),
                    ));
                }
            }
            UpstreamKind::Bedrock {
                region,
                endpoint_url: input
                    .endpoint_url
                    .map(|u| u.trim_end_matches('/').to_owned()),
                model_map,
            }
        }
        other => {
            return Err(pool_error(
                at("kind"),
                format!(
                    "`{}` is not `anthropic` or `bedrock`",
                    other.chars().take(32).collect::<String>()
                ),
            ));
        }
    };
    Ok(UpstreamSpec {
        name: name.to_owned(),
        kind,
        priority: input.priority.unwrap_or(DEFAULT_PRIORITY),
        weight,
        models: input.models.iter().map(|p| p.trim().to_owned()).collect(),
    })
}

/// An http(s) URL with a host.
fn check_url(url: &str) -> Result<(), String> {
    let parsed: http::Uri = url.trim().parse().map_err(|_| "is not a URL".to_owned())?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
        return Err("must be an http(s) URL with a host".into());
    }
    Ok(())
}

/// Why an upstream failed an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// 429.
    RateLimited,
    /// 529.
    Overloaded,
    /// Any other 5xx.
    ServerError,
    /// No connection, or no answer in time.
    Connect,
    /// 401 or 403: the key (or the account) is refused.
    Refused,
}

impl FailureKind {
    /// The failure a status is, when it says something about the upstream
    /// rather than the request (a 400 or 404 is the client's).
    pub fn from_status(status: u16) -> Option<FailureKind> {
        match status {
            429 => Some(FailureKind::RateLimited),
            529 => Some(FailureKind::Overloaded),
            401 | 403 => Some(FailureKind::Refused),
            500..=599 => Some(FailureKind::ServerError),
            _ => None,
        }
    }

    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::RateLimited => "rate_limited",
            FailureKind::Overloaded => "overloaded",
            FailureKind::ServerError => "server_error",
            FailureKind::Connect => "connect",
            FailureKind::Refused => "refused",
        }
    }

    pub fn parse(text: &str) -> Option<FailureKind> {
        [
            FailureKind::RateLimited,
            FailureKind::Overloaded,
            FailureKind::ServerError,
            FailureKind::Connect,
            FailureKind::Refused,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }
}

/// How long an upstream that failed this way is passed over: its
/// `retry-after` when it gave one (at least a second, at most
/// [`MAX_RETRY_AFTER`]), else [`BACKOFF_BASE`] doubled for each earlier
/// consecutive failure, up to [`BACKOFF_MAX`]. `consecutive_failures`
/// counts this one (0 is taken as 1). A refusal (401/403) has no cooldown:
/// it marks the upstream unusable instead.
pub fn cooldown_after(
    failure: FailureKind,
    retry_after: Option<Duration>,
    consecutive_failures: u32,
) -> Duration {
    if failure == FailureKind::Refused {
        return Duration::ZERO;
    }
    if let Some(asked) = retry_after {
        return asked.clamp(Duration::from_secs(1), MAX_RETRY_AFTER);
    }
    let doublings = consecutive_failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_MAX)
}

/// The last failure an upstream met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastFailure {
    pub kind: FailureKind,
    pub at: OffsetDateTime,
}

/// An upstream refused its key (401/403), under this credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    pub since: OffsetDateTime,
    /// [`UpstreamSpec::credential_version`] when it was marked.
    pub credential_version: String,
}

/// What the relay's instances together know of one upstream's health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamHealth {
    /// Passed over (tried only as a last resort) until then.
    pub cooldown_until: Option<OffsetDateTime>,
    /// Failures since the upstream last stayed quiet for a while (the
    /// health item's lifetime after its cooldown): the backoff's exponent.
    pub consecutive_failures: u32,
    /// Failures recorded in that same span, for `/admin/upstreams`.
    pub failures: u64,
    pub last_failure: Option<LastFailure>,
    pub unusable: Option<Unusable>,
}

impl UpstreamHealth {
    pub fn cooling_at(&self, now: OffsetDateTime) -> bool {
        self.cooldown_until.is_some_and(|until| until > now)
    }
}

/// Every upstream's health by name; an upstream missing is healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthView {
    pub upstreams: HashMap<String, UpstreamHealth>,
}

impl HealthView {
    pub fn of(&self, name: &str) -> Option<&UpstreamHealth> {
        self.upstreams.get(name)
    }

    /// Whether `spec` refused its current key: a mark made under another
    /// credential (the secret re-read with a new key) no longer counts.
    pub fn is_unusable(&self, spec: &UpstreamSpec) -> bool {
        self.of(&spec.name)
            .and_then(|h| h.unusable.as_ref())
            .is_some_and(|mark| mark.credential_version == spec.credential_version())
    }

    /// When `name` comes out of its cooldown, if it is cooling at `now`.
    pub fn cooling_until(&self, name: &str, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.of(name)
            .filter(|h| h.cooling_at(now))
            .and_then(|h| h.cooldown_until)
    }
}

/// The order in which one request tries the pool's upstreams:
///
/// 1. only those that serve `model`, and never one whose current key was
///    refused ([`HealthView::is_unusable`]);
/// 2. the healthy ones, by priority (lower number first); within one
///    priority by weight: with a `session`, by weighted rendezvous hashing
///    of the session over the names (the same session lands on the same
///    upstream while it is healthy, on every instance, with no per-session
///    state; when it cools down only its sessions move, each to its next
///    upstream by the same hash, so a failover moves a session once rather
///    than scattering it); without, in a weighted random order drawn from
///    `random`;
/// 3. then the cooling ones, as a last resort, soonest out of cooldown
///    first.
///
/// A session comes back to its first upstream when that one's cooldown
/// ends, deliberately: without per-session state nothing tells a session
/// that moved from one that began on its new upstream, so staying would
/// mean every failure shifts its sessions for good and the weights drift
/// away from what was configured. The cost is one more cold prompt cache
/// for that session per cooldown, and it cannot flap: an upstream returns
/// only after its whole cooldown, which doubles with each consecutive
/// failure ([`cooldown_after`]).
pub fn candidates<'a>(
    pool: &'a [UpstreamSpec],
    model: Option<&str>,
    session: Option<&str>,
    health: &HealthView,
    now: OffsetDateTime,
    random: u64,
) -> Vec<&'a UpstreamSpec> {
    let usable = pool
        .iter()
        .filter(|spec| spec.serves(model) && !health.is_unusable(spec));
    let (mut cooling, mut healthy): (Vec<&UpstreamSpec>, Vec<&UpstreamSpec>) =
        usable.partition(|spec| health.cooling_until(&spec.name, now).is_some());
    let seed = match session {
        Some(session) => fnv1a(session.as_bytes()),
        None => splitmix64(random),
    };
    // Within a priority, sorted by score: descending, ties (never in
    // practice) by name so the order is total.
    let mut scored: Vec<(u32, f64, &UpstreamSpec)> = healthy
        .drain(..)
        .map(|spec| (spec.priority, rendezvous_score(seed, spec), spec))
        .collect();
    scored.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(b.1.total_cmp(&a.1))
            .then_with(|| a.2.name.cmp(&b.2.name))
    });
    cooling.sort_by_key(|spec| (health.cooling_until(&spec.name, now), spec.name.as_str()));
    scored
        .into_iter()
        .map(|(_, _, spec)| spec)
        .chain(cooling)
        .collect()
}

/// Weighted rendezvous score of `spec` for `seed`: `-weight / ln(u)` with
/// `u` uniform in (0, 1) from the hash of seed and name. The highest score
/// wins with probability `weight / Σ weights`, and ordering by it is a
/// weighted sampling without replacement (Efraimidis–Spirakis): removing
/// one upstream changes nobody's order but its own.
fn rendezvous_score(seed: u64, spec: &UpstreamSpec) -> f64 {
    let hash = splitmix64(seed ^ fnv1a(spec.name.as_bytes()));
    // 53 bits, offset by half a step: strictly inside (0, 1).
    let unit = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(spec.weight) / unit.ln()
}

/// FNV-1a: stable across processes and releases (unlike `std`'s hasher),
/// which session affinity across Lambda environments needs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64's finalizer: spreads FNV's weak low bits over the whole word.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BASE: &str = "https://api.anthropic.com";

    fn at(text: &str) -> OffsetDateTime {
        crate::domain::parse_timestamp(text).unwrap()
    }

    fn anthropic(name: &str, priority: u32, weight: u32) -> UpstreamSpec {
        UpstreamSpec {
            name: name.into(),
            kind: UpstreamKind::Anthropic {
                base_url: BASE.into(),
                api_key: UpstreamApiKey::new(format!("sk-{name}")),
            },
            priority,
            weight,
            models: Vec::new(),
        }
    }

    fn names(order: &[&UpstreamSpec]) -> Vec<String> {
        order.iter().map(|u| u.name.clone()).collect()
    }

    fn parse(list: serde_json::Value) -> Result<Option<UpstreamPool>, PoolError> {
        pool_from(Some(&list), None, BASE)
    }

    fn fails(list: serde_json::Value, expected: &str) {
        let err = parse(list).unwrap_err();
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn the_single_key_is_one_anthropic_upstream_at_the_base_url() {
        let pool = pool_from(None, Some("sk-1"), "http://127.0.0.1:9/")
            .unwrap()
            .unwrap();
        assert_eq!(
            pool.upstreams,
            [UpstreamSpec {
                name: "anthropic".into(),
                kind: UpstreamKind::Anthropic {
                    base_url: "http://127.0.0.1:9".into(),
                    api_key: UpstreamApiKey::new("sk-1"),
                },
                priority: 1,
                weight: 1,
                models: Vec::new(),
            }]
        );
        assert!(!pool.single_key_ignored);
        assert_eq!(pool_from(None, None, BASE).unwrap(), None);
        assert_eq!(pool_from(None, Some("  "), BASE).unwrap(), None);
    }

    #[test]
    fn a_list_wins_over_the_single_key_and_says_so() {
        let list = json!([{"name": "main", "kind": "anthropic", "api_key": "sk-list"}]);
        let pool = pool_from(Some(&list), Some("sk-single"), BASE)
            .unwrap()
            .unwrap();
        assert_eq!(pool.names(), ["main"]);
        assert!(pool.single_key_ignored);
    }

    #[test]
    fn a_list_of_both_kinds_reads_with_defaults() {
        let pool = parse(json!([
            {"name": "main", "kind": "anthropic", "api_key": " sk-a ", "priority": 1, "weight": 3},
            {"name": "backup.eu_1", "kind": "anthropic", "api_key": "sk-b", "base_url": "http://127.0.0.1:8/", "models": ["claude-sonnet-*"]},
            {"name": "bedrock-us", "kind": "bedrock", "region": "us-east-1", "priority": 2,
             "endpoint_url": "http://127.0.0.1:7/",
             "model_map": {"Claude-Sonnet-4-5": "us.anthropic.claude-sonnet-4-5-20250929-v1:0"}},
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(pool.upstreams[0], {
            let mut spec = anthropic("main", 1, 3);
            spec.kind = UpstreamKind::Anthropic {
                base_url: BASE.into(),
                api_key: UpstreamApiKey::new("sk-a"),
            };
            spec
        });
        assert_eq!(
            pool.upstreams[1].kind,
            UpstreamKind::Anthropic {
                base_url: "http://127.0.0.1:8".into(),
                api_key: UpstreamApiKey::new("sk-b"),
            }
        );
        assert_eq!(pool.upstreams[1].models, ["claude-sonnet-*"]);
        assert_eq!(
            (pool.upstreams[1].priority, pool.upstreams[1].weight),
            (1, 1)
        );
        assert_eq!(
            pool.upstreams[2].kind,
            UpstreamKind::Bedrock {
                region: "us-east-1".into(),
                endpoint_url: Some("http://127.0.0.1:7".into()),
                model_map: BTreeMap::from([(
                    "claude-sonnet-4-5".to_owned(),
                    "us.anthropic.claude-sonnet-4-5-20250929-v1:0".to_owned()
                )]),
            }
        );
        assert_eq!(pool.upstreams[2].priority, 2);
        assert!(!pool.single_key_ignored);
        assert_eq!(pool.get("bedrock-us").map(|u| u.weight), Some(1));
    }

    #[test]
    fn a_bad_list_fails_naming_the_entry_and_field() {
        let key = |name: &str| json!({"name": name, "kind": "anthropic", "api_key": "sk"});
        fails(json!({"name": "a"}), "upstreams: must be a list");
        fails(json!([]), "upstreams: must hold at least one upstream");
        fails(
            json!([key("a"), key("a")]),
            "upstreams[1].name: `a` is the name of an earlier upstream",
        );
        for bad in ["", "a#b", "a b", &"x".repeat(65)] {
            fails(
                json!([key(bad)]),
                "upstreams[0].name: must be 1 to 64 characters of A-Z, a-z, 0-9, `.`, `_`, `-`",
            );
        }
        fails(
            json!([key("a"), {"name": "b", "kind": "anthropic"}]),
            "upstreams[1].api_key: must be set for kind `anthropic`",
        );
        fails(
            json!([{"name": "b", "kind": "bedrock", "model_map": {"m": "n"}}]),
            "upstreams[0].region: must be set for kind `bedrock`",
        );
        fails(
            json!([{"name": "b", "kind": "bedrock", "region": "US East", "model_map": {"m": "n"}}]),
            "upstreams[0].region: is not an AWS Region name (e.g. `us-east-1`)",
        );
        fails(
            json!([{"name": "b", "kind": "bedrock", "region": "us-east-1", "model_map": {}}]),
            "upstreams[0].model_map: must map at least one Anthropic model id to a Bedrock model id",
        );
        fails(
            json!([{"name": "b", "kind": "bedrock", "region": "us-east-1"}]),
            "upstreams[0].model_map: must map at least one Anthropic model id to a Bedrock model id",
        );
        fails(
            json!([{"name": "b", "kind": "bedrock", "region": "us-east-1", "model_map": {"M": "x", "m": "y"}}]),
            "upstreams[0].model_map: maps `m` twice (model ids are case-insensitive)",
        );
        fails(
            json!([{"name": "b", "kind": "bedrock", "region": "us-east-1", "api_key": "sk", "model_map": {"m": "n"}}]),
            "upstreams[0].api_key: is for kind `anthropic` only",
        );
        fails(
            json!([{"name": "a", "kind": "anthropic", "api_key": "sk", "region": "us-east-1"}]),
            "upstreams[0].region: is for kind `bedrock` only",
        );
        fails(
            json!([{"name": "a", "kind": "openai", "api_key": "sk"}]),
            "upstreams[0].kind: `openai` is not `anthropic` or `bedrock`",
        );
        fails(
            json!([{"name": "a", "kind": "anthropic", "api_key": "sk", "weight": 0}]),
            "upstreams[0].weight: must be between 1 and 1000",
        );
        fails(
            json!([{"name": "a", "kind": "anthropic", "api_key": "sk", "base_url": "ftp://x"}]),
            "upstreams[0].base_url: must be an http(s) URL with a host",
        );
        fails(
            json!([{"name": "a", "kind": "anthropic", "api_key": "sk", "models": ["claude-*", " "]}]),
            "upstreams[0].models[1]: must not be blank",
        );
        fails(
            json!([{"kind": "anthropic", "api_key": "sk"}]),
            "upstreams[0]: missing field `name`",
        );
        // A key pasted into the wrong field is not repeated in the message.
        fails(
            json!([{"name": "a", "kind": "anthropic", "api_key": "sk", "priority": "sk-ant-secret"}]),
            "upstreams[0].priority: has the wrong type or value",
        );
        let err =
            parse(json!([{"name": "a", "kind": "anthropic", "api_key": "sk", "regoin": "x"}]))
                .unwrap_err();
        assert!(err.at.starts_with("upstreams[0]"), "{err}");
        assert!(err.reason.starts_with("unknown field `regoin`"), "{err}");
        let many: Vec<_> = (0..33).map(|i| key(&format!("u{i}"))).collect();
        fails(json!(many), "upstreams: holds 33 upstreams, at most 32");
    }

    #[test]
    fn debug_output_never_shows_a_key() {
        let pool = pool_from(None, Some("sk-ant-very-secret"), BASE)
            .unwrap()
            .unwrap();
        let shown = format!("{pool:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("UpstreamApiKey(…)"), "{shown}");
    }

    #[test]
    fn an_upstream_serves_the_models_its_patterns_and_map_allow() {
        let mut sonnet_only = anthropic("a", 1, 1);
        sonnet_only.models = vec!["claude-sonnet-*".into(), "claude-3-5-haiku-20241022".into()];
        assert!(sonnet_only.serves(Some("Claude-Sonnet-4-5")));
        assert!(sonnet_only.serves(Some("claude-3-5-haiku-20241022")));
        assert!(!sonnet_only.serves(Some("claude-opus-4-1")));
        assert!(sonnet_only.serves(None));
        assert!(anthropic("b", 1, 1).serves(Some("anything")));

        let bedrock = UpstreamSpec {
            name: "br".into(),
            kind: UpstreamKind::Bedrock {
                region: "us-east-1".into(),
                endpoint_url: None,
                model_map: BTreeMap::from([("claude-sonnet-4-5".into(), "us.sonnet".into())]),
            },
            priority: 1,
            weight: 1,
            models: Vec::new(),
        };
        assert!(bedrock.serves(Some("CLAUDE-SONNET-4-5")));
        assert_eq!(
            bedrock.bedrock_model("claude-sonnet-4-5"),
            Some("us.sonnet")
        );
        assert!(!bedrock.serves(Some("claude-opus-4-1")), "not in its map");
        assert!(bedrock.serves(None));
        assert_eq!(sonnet_only.bedrock_model("claude-sonnet-4-5"), None);
    }

    #[test]
    fn the_credential_version_follows_the_key_only() {
        let a = anthropic("a", 1, 1);
        let mut same_key_other_weight = a.clone();
        same_key_other_weight.weight = 5;
        let mut rotated = a.clone();
        rotated.kind = UpstreamKind::Anthropic {
            base_url: BASE.into(),
            api_key: UpstreamApiKey::new("sk-new"),
        };
        assert_eq!(a.credential_version().len(), 16);
        assert_eq!(
            a.credential_version(),
            same_key_other_weight.credential_version()
        );
        assert_ne!(a.credential_version(), rotated.credential_version());
        assert!(!a.credential_version().contains("sk-"));
    }

    #[test]
    fn statuses_are_failures_of_the_upstream_or_not() {
        assert_eq!(
            FailureKind::from_status(429),
            Some(FailureKind::RateLimited)
        );
        assert_eq!(FailureKind::from_status(529), Some(FailureKind::Overloaded));
        assert_eq!(
            FailureKind::from_status(500),
            Some(FailureKind::ServerError)
        );
        assert_eq!(
            FailureKind::from_status(503),
            Some(FailureKind::ServerError)
        );
        assert_eq!(FailureKind::from_status(401), Some(FailureKind::Refused));
        assert_eq!(FailureKind::from_status(403), Some(FailureKind::Refused));
        for client_error in [200, 400, 404, 413] {
            assert_eq!(FailureKind::from_status(client_error), None);
        }
        for kind in [
            FailureKind::RateLimited,
            FailureKind::Overloaded,
            FailureKind::ServerError,
            FailureKind::Connect,
            FailureKind::Refused,
        ] {
            assert_eq!(FailureKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(FailureKind::parse("other"), None);
    }

    #[test]
    fn cooldowns_honour_retry_after_within_bounds_else_back_off() {
        let secs = Duration::from_secs;
        let rate = FailureKind::RateLimited;
        assert_eq!(cooldown_after(rate, Some(secs(30)), 1), secs(30));
        assert_eq!(cooldown_after(rate, Some(secs(30)), 9), secs(30));
        assert_eq!(cooldown_after(rate, Some(secs(0)), 1), secs(1));
        assert_eq!(cooldown_after(rate, Some(secs(3600)), 1), secs(600));
        // 5 s, doubled per earlier consecutive failure, capped at 300 s.
        let backoff: Vec<u64> = (0..=8)
            .map(|n| cooldown_after(FailureKind::ServerError, None, n).as_secs())
            .collect();
        assert_eq!(backoff, [5, 5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(
            cooldown_after(FailureKind::Connect, None, u32::MAX),
            secs(300)
        );
        assert_eq!(cooldown_after(FailureKind::Overloaded, None, 2), secs(10));
        assert_eq!(
            cooldown_after(FailureKind::Refused, Some(secs(30)), 1),
            Duration::ZERO
        );
    }

    fn cooling(until: &str) -> UpstreamHealth {
        UpstreamHealth {
            cooldown_until: Some(at(until)),
            consecutive_failures: 1,
            failures: 1,
            last_failure: None,
            unusable: None,
        }
    }

    const NOW: &str = "2026-01-02T03:04:05.000Z";

    #[test]
    fn healthy_upstreams_come_first_by_priority_and_cooling_ones_last_soonest_first() {
        let pool = [
            anthropic("second", 2, 1),
            anthropic("first", 1, 1),
            anthropic("cool-late", 1, 1),
            anthropic("cool-soon", 1, 1),
            anthropic("over", 1, 1),
        ];
        let health = HealthView {
            upstreams: HashMap::from([
                ("cool-late".to_owned(), cooling("2026-01-02T03:09:00.000Z")),
                ("cool-soon".to_owned(), cooling("2026-01-02T03:05:00.000Z")),
                // A cooldown that ended is no cooldown.
                ("over".to_owned(), cooling("2026-01-02T03:04:05.000Z")),
            ]),
        };
        for random in 0..20 {
            let order = candidates(&pool, Some("m"), None, &health, at(NOW), random);
            let order = names(&order);
            assert_eq!(order.len(), 5);
            assert!(
                order[..2].contains(&"first".to_owned()) && order[..2].contains(&"over".to_owned()),
                "{order:?}"
            );
            assert_eq!(
                order[2..],
                ["second", "cool-soon", "cool-late"],
                "{order:?}"
            );
        }
    }

    #[test]
    fn only_upstreams_serving_the_model_are_candidates() {
        let mut opus = anthropic("opus", 1, 1);
        opus.models = vec!["claude-opus-*".into()];
        let mut sonnet = anthropic("sonnet", 1, 1);
        sonnet.models = vec!["claude-sonnet-*".into()];
        let pool = [opus, sonnet];
        let view = HealthView::default();
        let now = at(NOW);
        assert_eq!(
            names(&candidates(
                &pool,
                Some("claude-opus-4-1"),
                None,
                &view,
                now,
                1
            )),
            ["opus"]
        );
        assert!(candidates(&pool, Some("claude-haiku-4-5"), None, &view, now, 1).is_empty());
        assert_eq!(candidates(&pool, None, None, &view, now, 1).len(), 2);
    }

    #[test]
    fn an_upstream_that_refused_its_key_is_never_tried_until_the_key_changes() {
        let refused = anthropic("refused", 1, 1);
        let pool = [refused.clone(), anthropic("other", 2, 1)];
        let mark = |version: String| HealthView {
            upstreams: HashMap::from([(
                "refused".to_owned(),
                UpstreamHealth {
                    unusable: Some(Unusable {
                        since: at(NOW),
                        credential_version: version,
                    }),
                    ..UpstreamHealth::default()
                },
            )]),
        };
        let now = at(NOW);
        let marked = mark(refused.credential_version());
        assert!(marked.is_unusable(&refused));
        assert_eq!(
            names(&candidates(&pool, None, None, &marked, now, 7)),
            ["other"]
        );
        // The secret re-read with a new key for it: the mark was made under
        // another credential.
        let stale = mark("0123456789abcdef".into());
        assert!(!stale.is_unusable(&refused));
        assert_eq!(
            names(&candidates(&pool, None, None, &stale, now, 7)),
            ["refused", "other"]
        );
    }

    #[test]
    fn without_a_session_first_picks_follow_the_weights() {
        let pool = [
            anthropic("a", 1, 1),
            anthropic("b", 1, 2),
            anthropic("c", 1, 7),
        ];
        let view = HealthView::default();
        let now = at(NOW);
        let draws = 100_000u64;
        let mut firsts: HashMap<String, u64> = HashMap::new();
        let mut seconds: HashMap<String, u64> = HashMap::new();
        for random in 0..draws {
            let order = candidates(&pool, None, None, &view, now, random);
            assert_eq!(order.len(), 3);
            *firsts.entry(order[0].name.clone()).or_default() += 1;
            *seconds.entry(order[1].name.clone()).or_default() += 1;
        }
        // Expected 10 %, 20 %, 70 % of 100,000; a binomial's standard
        // deviation here is at most ~145, so ±1,000 is a loose bound that
        // still fails any ordering ignoring the weights (33 % each).
        for (name, share) in [("a", 10_000), ("b", 20_000), ("c", 70_000)] {
            let got = firsts[name];
            assert!(got.abs_diff(share) < 1_000, "{name}: {got} of {draws}");
        }
        // Second places, weighted sampling without replacement:
        // P(a second) = P(b first)·1/8 + P(c first)·1/3 = 0.2/8 + 0.7/3 ≈ 25.8 %.
        let a_second = seconds["a"];
        assert!(a_second.abs_diff(25_833) < 1_000, "a second: {a_second}");
    }

    #[test]
    fn a_session_stays_on_one_upstream_across_requests() {
        let pool = [
            anthropic("a", 1, 1),
            anthropic("b", 1, 1),
            anthropic("c", 1, 1),
        ];
        let view = HealthView::default();
        let now = at(NOW);
        let mut per_upstream: HashMap<String, u32> = HashMap::new();
        for session in 0..50 {
            let session = format!("session-{session}");
            let first = candidates(&pool, None, Some(&session), &view, now, 0);
            for request in 1..50u64 {
                let again = candidates(&pool, Some("m"), Some(&session), &view, now, request);
                assert_eq!(names(&again), names(&first), "{session}");
            }
            *per_upstream.entry(first[0].name.clone()).or_default() += 1;
        }
        // 50 sessions over 3 equal upstreams: ~16.7 each, standard
        // deviation ~3.3; every upstream gets a share.
        for name in ["a", "b", "c"] {
            let got = per_upstream.get(name).copied().unwrap_or_default();
            assert!((6..=28).contains(&got), "{name}: {got} sessions");
        }
    }

    #[test]
    fn when_one_of_three_fails_only_its_sessions_move_and_they_come_back() {
        let pool = [
            anthropic("a", 1, 1),
            anthropic("b", 1, 2),
            anthropic("c", 1, 1),
        ];
        let healthy = HealthView::default();
        let b_cooling = HealthView {
            upstreams: HashMap::from([("b".to_owned(), cooling("2026-01-02T03:05:00.000Z"))]),
        };
        let (now, after) = (at(NOW), at("2026-01-02T03:05:00.000Z"));
        let mut moved = 0;
        for session in 0..300 {
            let session = format!("s{session}");
            let before = candidates(&pool, None, Some(&session), &healthy, now, 0);
            let during = candidates(&pool, None, Some(&session), &b_cooling, now, 0);
            if before[0].name == "b" {
                moved += 1;
                // Moved once, to its own next upstream; b as last resort.
                assert_eq!(during[0].name, before[1].name, "{session}");
                assert_eq!(during[2].name, "b");
            } else {
                assert_eq!(during[0].name, before[0].name, "{session}");
            }
            let back = candidates(&pool, None, Some(&session), &healthy, after, 0);
            assert_eq!(names(&back), names(&before), "{session}");
        }
        // b weighs half the total: about 150 of 300 sessions start there.
        assert!((110..=190).contains(&moved), "{moved}");
    }

    #[test]
    fn sessions_fail_over_to_the_next_priority_when_their_rank_is_cooling() {
        let pool = [
            anthropic("p1", 1, 1),
            anthropic("p2-a", 2, 1),
            anthropic("p2-b", 2, 1),
        ];
        let view = HealthView {
            upstreams: HashMap::from([("p1".to_owned(), cooling("2026-01-02T03:05:00.000Z"))]),
        };
        let order = candidates(&pool, None, Some("s"), &view, at(NOW), 0);
        assert_eq!(order.len(), 3);
        assert!(order[0].name.starts_with("p2-"));
        assert_eq!(order[2].name, "p1");
    }
}
