//! Configuration from environment variables. Variables name things; secret
//! values come from Secrets Manager (or, locally, from variables too).
//! Anything missing or malformed fails at start, naming the variable.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::domain::route::PassThrough;
use crate::secrets::{SecretValues, Secrets};

#[derive(Debug, thiserror::Error)]
#[error("configuration: {var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn required(name: &'static str) -> Result<String, ConfigError> {
    var(name).ok_or_else(|| ConfigError {
        var: name,
        reason: "must be set".into(),
    })
}

/// A numeric variable, or `default` when unset.
pub fn number<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, ConfigError> {
    match var(name) {
        None => Ok(default),
        Some(text) => text.trim().parse().map_err(|_| ConfigError {
            var: name,
            reason: format!("`{text}` is not a valid number"),
        }),
    }
}

/// What every function needs: where its state and secrets are.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub table_name: String,
    pub dynamodb_endpoint: Option<String>,
    pub secret_arn: Option<String>,
    pub secretsmanager_endpoint: Option<String>,
    pub secret_ttl: Duration,
}

impl CommonConfig {
    pub fn from_env() -> Result<CommonConfig, ConfigError> {
        Ok(CommonConfig {
            table_name: required("TABLE_NAME")?,
            dynamodb_endpoint: var("DYNAMODB_ENDPOINT"),
            secret_arn: var("RELAY_SECRET_ARN"),
            secretsmanager_endpoint: var("SECRETSMANAGER_ENDPOINT"),
            secret_ttl: Duration::from_secs(number("SECRET_CACHE_TTL_SECONDS", 300)?),
        })
    }

    /// Secrets Manager when `RELAY_SECRET_ARN` is set, otherwise the
    /// variables `UPSTREAM_API_KEY`, `ADMIN_PASSWORD_HASH` (or
    /// `ADMIN_PASSWORD`, hashed here) and `SECRET_KEY`.
    pub async fn secrets(&self) -> Result<Secrets, ConfigError> {
        if let Some(arn) = &self.secret_arn {
            return Ok(Secrets::from_secrets_manager(
                arn,
                self.secretsmanager_endpoint.as_deref(),
                self.secret_ttl,
                crate::secrets::MIN_REFRESH_INTERVAL,
            )
            .await);
        }
        let admin_password_hash = match (var("ADMIN_PASSWORD_HASH"), var("ADMIN_PASSWORD")) {
            (Some(hash), _) => {
                if hash.parse::<bcrypt::HashParts>().is_err() {
                    return Err(ConfigError {
                        var: "ADMIN_PASSWORD_HASH",
                        reason: "is not a bcrypt hash ($2b$…)".into(),
                    });
                }
                Some(hash)
            }
            (None, Some(password)) => Some(
                crate::admin_auth::hash_in_memory_password(&password).map_err(|e| ConfigError {
                    var: "ADMIN_PASSWORD",
                    reason: format!("could not be hashed: {e}"),
                })?,
            ),
            (None, None) => None,
        };
        Ok(Secrets::fixed(SecretValues {
            upstream_api_key: var("UPSTREAM_API_KEY"),
            admin_password_hash,
            jwt_secret: var("SECRET_KEY"),
        }))
    }
}

/// What the admin function needs beyond the common part.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub admin_username: String,
    pub jwt_ttl: Duration,
    /// Where the admin API may be called from (`ADMIN_ALLOWED_CIDRS`);
    /// empty: from every address.
    pub allowed_networks: Vec<IpNet>,
}

impl AdminConfig {
    pub fn from_env() -> Result<AdminConfig, ConfigError> {
        let jwt_ttl = number("JWT_TTL_SECONDS", 3600u64)?;
        if !(60..=86_400).contains(&jwt_ttl) {
            return Err(ConfigError {
                var: "JWT_TTL_SECONDS",
                reason: "must be between 60 and 86400".into(),
            });
        }
        Ok(AdminConfig {
            admin_username: var("ADMIN_USERNAME").unwrap_or_else(|| "admin".into()),
            jwt_ttl: Duration::from_secs(jwt_ttl),
            allowed_networks: Self::parse_allowed_networks(
                var(ADMIN_ALLOWED_CIDRS).as_deref().unwrap_or(""),
            )?,
        })
    }

    /// `ADMIN_ALLOWED_CIDRS`' syntax: CIDR blocks or single addresses,
    /// separated by commas (blank entries are skipped). Host bits are
    /// dropped (`10.1.2.3/8` is `10.0.0.0/8`), as for a key's `allowed_ips`.
    pub fn parse_allowed_networks(text: &str) -> Result<Vec<IpNet>, ConfigError> {
        text.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| ConfigError {
                        var: ADMIN_ALLOWED_CIDRS,
                        reason: format!(
                            "`{}` is not an IP address or CIDR block",
                            entry.chars().take(64).collect::<String>()
                        ),
                    })
            })
            .collect()
    }

    /// Whether the admin API answers a caller at `ip`. An IPv4-mapped IPv6
    /// address (`::ffff:10.1.2.3`, what a dual-stack socket reports for an
    /// IPv4 peer) is its IPv4 address.
    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allowed_networks.is_empty()
            || self.allowed_networks.iter().any(|net| net.contains(&ip))
    }
}

const ADMIN_ALLOWED_CIDRS: &str = "ADMIN_ALLOWED_CIDRS";

/// What the proxy function needs beyond the common part.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Lambda refuses request payloads over 6 MB; refusing them here gives
    /// the client Anthropic's 413 instead of an opaque gateway error.
    pub max_request_bytes: usize,
    pub key_cache_ttl: Duration,
    /// With no upstream headers after this long, a streamed answer is
    /// committed as 200 and kept alive with SSE comments.
    pub keepalive_after: Duration,
    pub keepalive_interval: Duration,
    /// How long to keep reading upstream for usage after the client left.
    pub disconnect_drain: Duration,
    /// Settle retries while the host waits for them (the client's answer
    /// held open, or the Lambda invocation kept alive by the extension)…
    pub settle_inline: Duration,
    /// …and after, in the background, before giving up to the log.
    pub settle_background: Duration,
    pub log_retention: Duration,
    /// Path prefixes an admin opened for unmetered pass-through.
    pub pass_through: PassThrough,
}

impl ProxyConfig {
    pub fn from_env() -> Result<ProxyConfig, ConfigError> {
        let secs = |name, default| number(name, default).map(Duration::from_secs);
        let millis = |name, default| number(name, default).map(Duration::from_millis);
        Ok(ProxyConfig {
            max_request_bytes: number("MAX_REQUEST_BYTES", 6 * 1024 * 1024)?,
            key_cache_ttl: millis("KEY_CACHE_TTL_MS", 10_000)?,
            keepalive_after: millis("STREAM_KEEPALIVE_AFTER_MS", 10_000)?,
            keepalive_interval: millis("STREAM_KEEPALIVE_INTERVAL_MS", 10_000)?,
            disconnect_drain: secs("DISCONNECT_DRAIN_SECONDS", 600)?,
            settle_inline: millis("SETTLE_INLINE_MS", 3_000)?,
            settle_background: secs("SETTLE_BACKGROUND_SECONDS", 300)?,
            log_retention: Duration::from_secs(number("LOG_RETENTION_DAYS", 30u64)? * 86_400),
            pass_through: PassThrough::parse(
                &std::env::var("PASSTHROUGH_PATH_PREFIXES").unwrap_or_default(),
            )
            .map_err(|reason| ConfigError {
                var: "PASSTHROUGH_PATH_PREFIXES",
                reason,
            })?,
        })
    }
}

/// Where and how the proxy reaches the Anthropic API.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `https://api.anthropic.com`, without a trailing slash.
    pub base_url: String,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No retry starts after this much time since the first attempt.
    pub retry_budget: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for the response headers of one attempt.
    pub header_timeout: Duration,
    /// Longest silence between two body chunks.
    pub idle_timeout: Duration,
}

impl UpstreamConfig {
    pub fn from_env() -> Result<UpstreamConfig, ConfigError> {
        let base_url = std::env::var("UPSTREAM_BASE_URL")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| "https://api.anthropic.com".into());
        let parsed: http::Uri = base_url.parse().map_err(|_| ConfigError {
            var: "UPSTREAM_BASE_URL",
            reason: format!("`{base_url}` is not a URL"),
        })?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            return Err(ConfigError {
                var: "UPSTREAM_BASE_URL",
                reason: "must be an http(s) URL with a host".into(),
            });
        }
        let max_attempts = number("UPSTREAM_MAX_ATTEMPTS", 3u32)?;
        if !(1..=10).contains(&max_attempts) {
            return Err(ConfigError {
                var: "UPSTREAM_MAX_ATTEMPTS",
                reason: "must be between 1 and 10".into(),
            });
        }
        let millis = |name, default| number(name, default).map(Duration::from_millis);
        Ok(UpstreamConfig {
            base_url: base_url.trim_end_matches('/').to_owned(),
            max_attempts,
            retry_budget: millis("UPSTREAM_RETRY_BUDGET_MS", 60_000)?,
            backoff_base: millis("UPSTREAM_BACKOFF_BASE_MS", 500)?,
            backoff_max: millis("UPSTREAM_BACKOFF_MAX_MS", 8_000)?,
            connect_timeout: millis("UPSTREAM_CONNECT_TIMEOUT_MS", 10_000)?,
            header_timeout: millis("UPSTREAM_HEADER_TIMEOUT_MS", 600_000)?,
            idle_timeout: millis("UPSTREAM_IDLE_TIMEOUT_MS", 300_000)?,
        })
    }
}
