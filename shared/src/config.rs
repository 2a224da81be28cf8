//! Configuration from environment variables: the one table of every
//! variable the relay reads (`VARIABLES`: name, default, meaning; the
//! README's configuration table is rendered from it) and the one reader
//! (`Env`). Variables name things; secret values come from Secrets Manager
//! (or, locally, from variables too). Anything missing or malformed fails at
//! start, naming the variable.

use crate::domain::budget::{BudgetPolicy, BudgetZone};
use std::collections::HashMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::domain::route::PassThrough;
use crate::metrics::DEFAULT_NAMESPACE;
use crate::secrets::{SecretValues, Secrets};

#[derive(Debug, thiserror::Error)]
#[error("configuration: {var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

/// One environment variable the relay reads.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub unset: WhenUnset,
    pub meaning: &'static str,
}

/// What an unset (or blank) variable means.
#[derive(Debug, Clone, Copy)]
pub enum WhenUnset {
    /// This value is used, parsed as a set value would be.
    Default(&'static str),
    /// No value stands in; the text says what happens instead.
    Otherwise(&'static str),
}

/// Declares each variable as a constant named like the variable, and
/// `VARIABLES`, the table of them all, in this order.
macro_rules! variables {
    ($($name:ident = $unset:expr, $meaning:expr;)*) => {
        $(
            pub const $name: Variable = Variable {
                name: stringify!($name),
                unset: $unset,
                meaning: $meaning,
            };
        )*
        /// Every variable the relay reads, in the README's order.
        pub const VARIABLES: &[Variable] = &[$($name),*];
    };
}

use WhenUnset::{Default, Otherwise};

variables! {
    TABLE_NAME = Otherwise("required (`relay-local` locally)"),
        "the DynamoDB table";
    DYNAMODB_ENDPOINT = Otherwise("unset (AWS); `relay-local` requires it"),
        "DynamoDB Local's address";
    RELAY_SECRET_ARN = Otherwise("unset: `UPSTREAM_API_KEY`, `ADMIN_PASSWORD_HASH` or `ADMIN_PASSWORD`, `SECRET_KEY`"),
        "Secrets Manager secret with `upstream_api_key` or `upstreams` (the upstream list, which wins when both are set), `admin_password_hash`, `jwt_secret`";
    SECRETSMANAGER_ENDPOINT = Otherwise("unset"),
        "a Secrets Manager emulator's address (moto)";
    SECRET_CACHE_TTL_SECONDS = Default("300"),
        "how long the secret is cached in-process";
    UPSTREAM_API_KEY = Otherwise("unset: proxied requests get 503"),
        "without `RELAY_SECRET_ARN`: the Anthropic API key requests are forwarded with (ignored when `UPSTREAMS` or `UPSTREAMS_FILE` is set)";
    UPSTREAMS = Otherwise("unset: `UPSTREAM_API_KEY` alone"),
        "without `RELAY_SECRET_ARN`: the upstream pool as a JSON list (as the secret's `upstreams`: `name`, `kind` `anthropic` or `bedrock`, `priority` (lower first, default 1), `weight` (default 1), `models` patterns; `base_url`, `api_key`; `region`, `endpoint_url`, `model_map`)";
    UPSTREAMS_FILE = Otherwise("unset"),
        "instead of `UPSTREAMS`: a JSON file holding that list (or an object with it as `upstreams`)";
    ADMIN_PASSWORD_HASH = Otherwise("unset: `ADMIN_PASSWORD`"),
        "without `RELAY_SECRET_ARN`: bcrypt hash of the admin password";
    ADMIN_PASSWORD = Otherwise("unset: no admin login (`make local` generates one)"),
        "without `RELAY_SECRET_ARN` and `ADMIN_PASSWORD_HASH`: the admin password, hashed at start";
    SECRET_KEY = Otherwise("unset: no admin tokens (`make local` generates one)"),
        "without `RELAY_SECRET_ARN`: the key admin tokens (JWT) are signed with";
    ADMIN_USERNAME = Default("admin"),
        "admin login";
    JWT_TTL_SECONDS = Default("3600"),
        "admin token lifetime, 60 to 86400";
    ADMIN_ALLOWED_CIDRS = Otherwise("empty: every address"),
        "CIDR blocks or single IPs, comma-separated, that may call `/admin*` (login included); others get 403 `permission_error`";
    UPSTREAM_BASE_URL = Default("https://api.anthropic.com"),
        "where requests go with `upstream_api_key`, and an `anthropic` upstream's default `base_url`";
    UPSTREAM_MAX_ATTEMPTS = Default("3"),
        "attempts per request, the first included, 1 to 10";
    UPSTREAM_RETRY_BUDGET_MS = Default("60000"),
        "no retry starts after this long since the first attempt";
    UPSTREAM_BACKOFF_BASE_MS = Default("500"),
        "bound of the first retry's jittered wait, doubled at each retry";
    UPSTREAM_BACKOFF_MAX_MS = Default("8000"),
        "largest bound of the wait between attempts";
    UPSTREAM_CONNECT_TIMEOUT_MS = Default("10000"),
        "wait for a connection to the upstream";
    UPSTREAM_HEADER_TIMEOUT_MS = Default("600000"),
        "wait for the response headers of one attempt";
    UPSTREAM_IDLE_TIMEOUT_MS = Default("300000"),
        "longest silence between two body chunks";
    STREAM_KEEPALIVE_AFTER_MS = Default("10000"),
        "a streamed answer with no upstream headers after this long is committed as 200 and kept alive";
    STREAM_KEEPALIVE_INTERVAL_MS = Default("10000"),
        "time between two keep-alive comments of such an answer";
    STREAM_CAP_SECONDS = Default("900"),
        "the longest a response may last on the host (API Gateway cuts streamed responses at 15 minutes)";
    STREAM_CAP_MARGIN_SECONDS = Default("30"),
        "the relay ends a streamed answer itself this long before the cap, with an `overloaded_error` event (retryable) instead of a torn connection";
    MAX_REQUEST_BYTES = Default("6291456"),
        "request body limit";
    KEY_CACHE_TTL_MS = Default("10000"),
        "in-process cache of key records";
    DISCONNECT_DRAIN_SECONDS = Default("600"),
        "how long to keep reading the upstream for usage after the client left";
    SETTLE_INLINE_MS = Default("3000"),
        "usage-settle retries while the host waits for them (answer or invocation held open)";
    SETTLE_BACKGROUND_SECONDS = Default("300"),
        "usage-settle retries after that, in the background, before giving up to the log";
    LOG_RETENTION_DAYS = Default("30"),
        "usage-log TTL";
    PASSTHROUGH_PATH_PREFIXES = Otherwise("none"),
        "path prefixes forwarded unmetered and unowned (Routes)";
    UNPRICED_MODELS = Default("charge"),
        "a model the price table does not price: `charge` it the fallback prices (the dearest shipped; recorded as unpriced) or `refuse` it (403) before forwarding";
    PRICE_CACHE_SECONDS = Default("60"),
        "how long the proxy keeps the price table (`PUT /admin/prices`) and the model aliases (`PUT /admin/model-aliases`) before reading them again";
    RECONCILE_AFTER_SECONDS = Default("900"),
        "a message request admitted this long ago and never settled (the process died) is charged an estimate by the scheduled reconciler";
    BUDGET_TIME_ZONE = Default("UTC"),
        "IANA time zone of the dollar limits' calendar days, weeks (from Monday) and months";
    DEFAULT_DOLLAR_LIMITS = Otherwise("none"),
        "organisation default dollar limits of keys that set none, as the admin API's `dollar_limits` JSON (e.g. `[{\"window\":\"month\",\"limit_usd\":100}]`)";
    BUDGET_ALERT_TOPIC_ARN = Otherwise("unset: budget alerts are logged (target `budget_alert`)"),
        "SNS topic budget alerts (50, 80 and 100 % of a dollar limit, once per limit and period) are published to";
    SNS_ENDPOINT = Otherwise("unset"),
        "an SNS emulator's address (moto)";
    METRICS = Otherwise("on in Lambda, off elsewhere"),
        "`emf` to print EMF lines outside Lambda, `off` to silence them";
    METRICS_NAMESPACE = Default(DEFAULT_NAMESPACE),
        "CloudWatch namespace of the metrics";
    RUST_LOG = Default("info"),
        "log filter (`tracing_subscriber` `EnvFilter` syntax)";
    AWS_LAMBDA_FUNCTION_NAME = Otherwise("set by Lambda"),
        "set: logs are JSON lines and metrics are on";
    PORT = Default("8080"),
        "`relay-local` only: its port on 127.0.0.1";
    BATCH_COLLECT_INTERVAL_SECONDS = Default("300"),
        "`relay-local` only: how often the batch collector runs (in AWS: the schedule)";
    RELAY_DEBUG_STATS = Otherwise("off"),
        "`relay-local` only: `1` serves `GET /__relay/stats` (DynamoDB round trips and capacity units, for `make bench`; every DynamoDB request then asks for its consumed capacity)";
}

/// The configuration table as the README shows it (a markdown table).
pub fn variables_markdown() -> String {
    let mut out = String::from("| variable | meaning | default |\n|---|---|---|\n");
    for variable in VARIABLES {
        let unset = match variable.unset {
            Default(value) => format!("`{value}`"),
            Otherwise(text) => text.to_owned(),
        };
        out.push_str(&format!(
            "| `{}` | {} | {unset} |\n",
            variable.name, variable.meaning
        ));
    }
    out
}

/// Where variables are read from: the process environment, or (in tests)
/// fixed values. Blank values count as unset.
pub struct Env {
    fixed: Option<HashMap<&'static str, String>>,
}

impl Env {
    pub fn process() -> Env {
        Env { fixed: None }
    }

    /// Only these values, as if the environment held nothing else.
    pub fn fixed(values: &[(&'static str, &str)]) -> Env {
        Env {
            fixed: Some(
                values
                    .iter()
                    .map(|(name, value)| (*name, (*value).to_owned()))
                    .collect(),
            ),
        }
    }

    /// The one reader of the environment: `variable`'s value, if set and
    /// not blank.
    pub fn text(&self, variable: &Variable) -> Option<String> {
        let value = match &self.fixed {
            None => std::env::var(variable.name).ok(),
            Some(values) => values.get(variable.name).cloned(),
        };
        value.filter(|v| !v.trim().is_empty())
    }

    /// The value, or the table's default.
    pub fn text_or_default(&self, variable: &Variable) -> Result<String, ConfigError> {
        match (self.text(variable), variable.unset) {
            (Some(value), _) => Ok(value),
            (None, Default(value)) => Ok(value.to_owned()),
            (None, Otherwise(_)) => Err(must_be_set(variable)),
        }
    }

    pub fn required(&self, variable: &Variable) -> Result<String, ConfigError> {
        self.text(variable).ok_or_else(|| must_be_set(variable))
    }

    /// A numeric variable, or the table's default when unset.
    pub fn number<T: FromStr>(&self, variable: &Variable) -> Result<T, ConfigError> {
        let text = self.text_or_default(variable)?;
        text.trim().parse().map_err(|_| ConfigError {
            var: variable.name,
            reason: format!("`{text}` is not a valid number"),
        })
    }

    fn millis(&self, variable: &Variable) -> Result<Duration, ConfigError> {
        self.number(variable).map(Duration::from_millis)
    }

    fn seconds(&self, variable: &Variable) -> Result<Duration, ConfigError> {
        self.number(variable).map(Duration::from_secs)
    }

    /// Whether this process runs in AWS Lambda.
    pub fn in_lambda(&self) -> bool {
        self.text(&AWS_LAMBDA_FUNCTION_NAME).is_some()
    }
}

fn must_be_set(variable: &Variable) -> ConfigError {
    ConfigError {
        var: variable.name,
        reason: "must be set".into(),
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
    /// The organisation default dollar limits and the calendar's time zone.
    pub budgets: BudgetPolicy,
}

impl CommonConfig {
    pub fn from_env() -> Result<CommonConfig, ConfigError> {
        CommonConfig::read(&Env::process())
    }

    pub fn read(env: &Env) -> Result<CommonConfig, ConfigError> {
        Ok(CommonConfig {
            table_name: env.required(&TABLE_NAME)?,
            dynamodb_endpoint: env.text(&DYNAMODB_ENDPOINT),
            secret_arn: env.text(&RELAY_SECRET_ARN),
            secretsmanager_endpoint: env.text(&SECRETSMANAGER_ENDPOINT),
            secret_ttl: env.seconds(&SECRET_CACHE_TTL_SECONDS)?,
            budgets: budget_policy(env)?,
        })
    }

    /// Secrets Manager when `RELAY_SECRET_ARN` is set, otherwise the
    /// variables `UPSTREAM_API_KEY`, `ADMIN_PASSWORD_HASH` (or
    /// `ADMIN_PASSWORD`, hashed here) and `SECRET_KEY`, read from `env`
    /// (the configuration holds no secret values: it is `Debug`).
    pub async fn secrets(&self, env: &Env) -> Result<Secrets, ConfigError> {
        if let Some(arn) = &self.secret_arn {
            return Ok(Secrets::from_secrets_manager(
                arn,
                self.secretsmanager_endpoint.as_deref(),
                self.secret_ttl,
                crate::secrets::MIN_REFRESH_INTERVAL,
            )
            .await);
        }
        secret_values(env).map(Secrets::fixed)
    }
}

/// `BUDGET_TIME_ZONE` and `DEFAULT_DOLLAR_LIMITS`, validated as the admin
/// API validates a key's limits.
fn budget_policy(env: &Env) -> Result<BudgetPolicy, ConfigError> {
    let zone_name = env.text_or_default(&BUDGET_TIME_ZONE)?;
    let zone = BudgetZone::named(zone_name.trim()).map_err(|reason| ConfigError {
        var: BUDGET_TIME_ZONE.name,
        reason,
    })?;
    let default_limits = match env.text(&DEFAULT_DOLLAR_LIMITS) {
        None => Vec::new(),
        Some(text) => {
            let inputs = serde_json::from_str(&text).map_err(|e| ConfigError {
                var: DEFAULT_DOLLAR_LIMITS.name,
                reason: format!("is not a JSON list of dollar limits: {e}"),
            })?;
            crate::http::admin::shapes::validate_dollar_limits(DEFAULT_DOLLAR_LIMITS.name, inputs)
                .map_err(|e| ConfigError {
                var: DEFAULT_DOLLAR_LIMITS.name,
                reason: e.to_string(),
            })?
        }
    };
    Ok(BudgetPolicy {
        default_limits,
        zone,
    })
}

/// `UPSTREAMS` or `UPSTREAMS_FILE`: the upstream list as JSON, checked
/// here so a mistake fails at start naming the variable, the entry and the
/// field. A file may hold the list or an object with it as `upstreams`
/// (the secret's shape).
pub fn upstream_list(env: &Env) -> Result<Option<serde_json::Value>, ConfigError> {
    let (variable, text) = match (env.text(&UPSTREAMS), env.text(&UPSTREAMS_FILE)) {
        (Some(_), Some(_)) => {
            return Err(ConfigError {
                var: UPSTREAMS_FILE.name,
                reason: "set only one of `UPSTREAMS` and `UPSTREAMS_FILE`".into(),
            });
        }
        (Some(text), None) => (&UPSTREAMS, text),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path.trim()).map_err(|e| ConfigError {
                var: UPSTREAMS_FILE.name,
                reason: format!("`{}` could not be read: {e}", path.trim()),
            })?;
            (&UPSTREAMS_FILE, text)
        }
        (None, None) => return Ok(None),
    };
    let fail = |reason: String| ConfigError {
        var: variable.name,
        reason,
    };
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(format!("is not JSON: {e}")))?;
    if let Some(list) = value.get_mut("upstreams") {
        value = list.take();
    }
    let base_url = UpstreamConfig::read(env)?.base_url;
    crate::domain::upstream_pool::pool_from(Some(&value), None, &base_url)
        .map_err(|e| fail(e.to_string()))?;
    Ok(Some(value))
}

/// The secrets as variables (local use).
fn secret_values(env: &Env) -> Result<SecretValues, ConfigError> {
    let admin_password_hash = match (env.text(&ADMIN_PASSWORD_HASH), env.text(&ADMIN_PASSWORD)) {
        (Some(hash), _) => {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(ConfigError {
                    var: ADMIN_PASSWORD_HASH.name,
                    reason: "is not a bcrypt hash ($2b$…)".into(),
                });
            }
            Some(hash)
        }
        (None, Some(password)) => Some(
            crate::admin_auth::hash_in_memory_password(&password).map_err(|e| ConfigError {
                var: ADMIN_PASSWORD.name,
                reason: format!("could not be hashed: {e}"),
            })?,
        ),
        (None, None) => None,
    };
    Ok(SecretValues {
        upstream_api_key: env.text(&UPSTREAM_API_KEY),
        upstreams: upstream_list(env)?,
        admin_password_hash,
        jwt_secret: env.text(&SECRET_KEY),
    })
}

/// What the admin function needs beyond the common part.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub admin_username: String,
    pub jwt_ttl: Duration,
    /// Where the admin API may be called from (`ADMIN_ALLOWED_CIDRS`);
    /// empty: from every address.
    pub allowed_networks: Vec<IpNet>,
    /// `UNPRICED_MODELS`, shown with the price table (the proxy applies it).
    pub refuse_unpriced_models: bool,
}

impl AdminConfig {
    pub fn from_env() -> Result<AdminConfig, ConfigError> {
        AdminConfig::read(&Env::process())
    }

    pub fn read(env: &Env) -> Result<AdminConfig, ConfigError> {
        let jwt_ttl: u64 = env.number(&JWT_TTL_SECONDS)?;
        if !(60..=86_400).contains(&jwt_ttl) {
            return Err(ConfigError {
                var: JWT_TTL_SECONDS.name,
                reason: "must be between 60 and 86400".into(),
            });
        }
        Ok(AdminConfig {
            admin_username: env.text_or_default(&ADMIN_USERNAME)?,
            jwt_ttl: Duration::from_secs(jwt_ttl),
            allowed_networks: Self::parse_allowed_networks(
                env.text(&ADMIN_ALLOWED_CIDRS).as_deref().unwrap_or(""),
            )?,
            refuse_unpriced_models: refuse_unpriced_models(env)?,
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
                        var: ADMIN_ALLOWED_CIDRS.name,
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
    /// A streamed answer still running this long after its request arrived
    /// is ended by the relay (the host's cap less a margin).
    pub stream_deadline: Duration,
    /// Settle retries while the host waits for them (the client's answer
    /// held open, or the Lambda invocation kept alive by the extension)…
    pub settle_inline: Duration,
    /// …and after, in the background, before giving up to the log.
    pub settle_background: Duration,
    pub log_retention: Duration,
    /// Path prefixes an admin opened for unmetered pass-through.
    pub pass_through: PassThrough,
    /// Refuse, rather than charge the fallback for, models without a price.
    pub refuse_unpriced_models: bool,
    /// How long the price table read from the store is used before it is
    /// read again.
    pub price_cache_ttl: Duration,
    /// Where budget alerts go.
    pub budget_alerts: AlertTarget,
    /// When an admitted request that never settled is charged an estimate.
    pub reconcile_after: Duration,
}

/// `STREAM_CAP_SECONDS` less `STREAM_CAP_MARGIN_SECONDS`: when the relay
/// ends a streamed answer itself.
fn stream_deadline(env: &Env) -> Result<Duration, ConfigError> {
    let cap = env.seconds(&STREAM_CAP_SECONDS)?;
    let margin = env.seconds(&STREAM_CAP_MARGIN_SECONDS)?;
    cap.checked_sub(margin)
        .filter(|deadline| !deadline.is_zero())
        .ok_or_else(|| ConfigError {
            var: STREAM_CAP_MARGIN_SECONDS.name,
            reason: format!("must be less than STREAM_CAP_SECONDS ({})", cap.as_secs()),
        })
}

/// `UNPRICED_MODELS`: whether a model without a price is refused.
fn refuse_unpriced_models(env: &Env) -> Result<bool, ConfigError> {
    match env.text_or_default(&UNPRICED_MODELS)?.trim() {
        "charge" => Ok(false),
        "refuse" => Ok(true),
        other => Err(ConfigError {
            var: UNPRICED_MODELS.name,
            reason: format!(
                "`{}` is not `charge` or `refuse`",
                other.chars().take(32).collect::<String>()
            ),
        }),
    }
}

/// Where budget alerts are published: an SNS topic, or (none) the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertTarget {
    pub topic_arn: Option<String>,
    /// An SNS emulator's address; `None`: AWS.
    pub sns_endpoint: Option<String>,
}

impl ProxyConfig {
    pub fn from_env() -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::read(&Env::process())
    }

    pub fn read(env: &Env) -> Result<ProxyConfig, ConfigError> {
        Ok(ProxyConfig {
            max_request_bytes: env.number(&MAX_REQUEST_BYTES)?,
            key_cache_ttl: env.millis(&KEY_CACHE_TTL_MS)?,
            keepalive_after: env.millis(&STREAM_KEEPALIVE_AFTER_MS)?,
            keepalive_interval: env.millis(&STREAM_KEEPALIVE_INTERVAL_MS)?,
            disconnect_drain: env.seconds(&DISCONNECT_DRAIN_SECONDS)?,
            stream_deadline: stream_deadline(env)?,
            settle_inline: env.millis(&SETTLE_INLINE_MS)?,
            settle_background: env.seconds(&SETTLE_BACKGROUND_SECONDS)?,
            log_retention: Duration::from_secs(env.number::<u64>(&LOG_RETENTION_DAYS)? * 86_400),
            pass_through: PassThrough::parse(
                env.text(&PASSTHROUGH_PATH_PREFIXES)
                    .as_deref()
                    .unwrap_or(""),
            )
            .map_err(|reason| ConfigError {
                var: PASSTHROUGH_PATH_PREFIXES.name,
                reason,
            })?,
            refuse_unpriced_models: refuse_unpriced_models(env)?,
            price_cache_ttl: env.seconds(&PRICE_CACHE_SECONDS)?,
            budget_alerts: AlertTarget {
                topic_arn: env.text(&BUDGET_ALERT_TOPIC_ARN),
                sns_endpoint: env.text(&SNS_ENDPOINT),
            },
            reconcile_after: env.seconds(&RECONCILE_AFTER_SECONDS)?,
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
        UpstreamConfig::read(&Env::process())
    }

    pub fn read(env: &Env) -> Result<UpstreamConfig, ConfigError> {
        let base_url = env.text_or_default(&UPSTREAM_BASE_URL)?;
        let parsed: http::Uri = base_url.parse().map_err(|_| ConfigError {
            var: UPSTREAM_BASE_URL.name,
            reason: format!("`{base_url}` is not a URL"),
        })?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
            return Err(ConfigError {
                var: UPSTREAM_BASE_URL.name,
                reason: "must be an http(s) URL with a host".into(),
            });
        }
        let max_attempts: u32 = env.number(&UPSTREAM_MAX_ATTEMPTS)?;
        if !(1..=10).contains(&max_attempts) {
            return Err(ConfigError {
                var: UPSTREAM_MAX_ATTEMPTS.name,
                reason: "must be between 1 and 10".into(),
            });
        }
        Ok(UpstreamConfig {
            base_url: base_url.trim_end_matches('/').to_owned(),
            max_attempts,
            retry_budget: env.millis(&UPSTREAM_RETRY_BUDGET_MS)?,
            backoff_base: env.millis(&UPSTREAM_BACKOFF_BASE_MS)?,
            backoff_max: env.millis(&UPSTREAM_BACKOFF_MAX_MS)?,
            connect_timeout: env.millis(&UPSTREAM_CONNECT_TIMEOUT_MS)?,
            header_timeout: env.millis(&UPSTREAM_HEADER_TIMEOUT_MS)?,
            idle_timeout: env.millis(&UPSTREAM_IDLE_TIMEOUT_MS)?,
        })
    }
}

/// Whether and where CloudWatch metrics (EMF lines) are printed.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub namespace: String,
}

impl MetricsConfig {
    /// Never fails: metrics are not worth refusing to start for.
    pub fn from_env() -> MetricsConfig {
        MetricsConfig::read(&Env::process())
    }

    pub fn read(env: &Env) -> MetricsConfig {
        let mode = env.text(&METRICS).unwrap_or_default();
        MetricsConfig {
            enabled: mode == "emf" || (env.in_lambda() && mode != "off"),
            // A variable with a default always has a value.
            namespace: env.text_or_default(&METRICS_NAMESPACE).unwrap_or_default(),
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// JSON lines (CloudWatch parses them) in Lambda, compact text locally.
    pub json_lines: bool,
    /// `RUST_LOG`, or `info`.
    pub filter: String,
}

impl LogConfig {
    pub fn from_env() -> LogConfig {
        LogConfig::read(&Env::process())
    }

    pub fn read(env: &Env) -> LogConfig {
        LogConfig {
            json_lines: env.in_lambda(),
            filter: env.text_or_default(&RUST_LOG).unwrap_or_default(),
        }
    }
}

/// What `relay-local` reads beyond the functions' configuration. No
/// `Debug`: it holds secrets.
#[derive(Clone)]
pub struct LocalConfig {
    pub port: u16,
    pub table_name: String,
    pub dynamodb_endpoint: String,
    /// Unset: `relay-local` makes up a password and prints it.
    pub admin_password: Option<String>,
    /// Unset: `relay-local` makes up a JWT secret.
    pub jwt_secret: Option<String>,
    pub upstream_api_key: Option<String>,
    /// `UPSTREAMS` or `UPSTREAMS_FILE`, checked ([`upstream_list`]).
    pub upstreams: Option<serde_json::Value>,
    /// How often the batch collector runs, at least a second.
    pub batch_collect_interval: Duration,
    /// Whether to serve `GET /__relay/stats` for `make bench`.
    pub debug_stats: bool,
}

impl LocalConfig {
    pub fn from_env() -> Result<LocalConfig, ConfigError> {
        LocalConfig::read(&Env::process())
    }

    pub fn read(env: &Env) -> Result<LocalConfig, ConfigError> {
        let port = env.number(&PORT)?;
        let dynamodb_endpoint = env.text(&DYNAMODB_ENDPOINT).ok_or_else(|| ConfigError {
            var: DYNAMODB_ENDPOINT.name,
            reason: "must be set (make local starts DynamoDB Local and sets it)".into(),
        })?;
        let batch_collect_interval: u64 = env.number(&BATCH_COLLECT_INTERVAL_SECONDS)?;
        Ok(LocalConfig {
            port,
            table_name: env
                .text(&TABLE_NAME)
                .unwrap_or_else(|| "relay-local".into()),
            dynamodb_endpoint,
            admin_password: env.text(&ADMIN_PASSWORD),
            jwt_secret: env.text(&SECRET_KEY),
            upstream_api_key: env.text(&UPSTREAM_API_KEY),
            upstreams: upstream_list(env)?,
            batch_collect_interval: Duration::from_secs(batch_collect_interval.max(1)),
            debug_stats: env.text(&RELAY_DEBUG_STATS).as_deref() == Some("1"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn nothing_set() -> Env {
        Env::fixed(&[])
    }

    #[test]
    fn unset_variables_give_the_documented_defaults() {
        let proxy = ProxyConfig::read(&nothing_set()).unwrap();
        assert_eq!(proxy.max_request_bytes, 6 * 1024 * 1024);
        assert_eq!(proxy.key_cache_ttl, Duration::from_secs(10));
        assert_eq!(proxy.keepalive_after, Duration::from_secs(10));
        assert_eq!(proxy.keepalive_interval, Duration::from_secs(10));
        assert_eq!(proxy.disconnect_drain, Duration::from_secs(600));
        assert_eq!(proxy.stream_deadline, Duration::from_secs(870));
        assert_eq!(proxy.settle_inline, Duration::from_secs(3));
        assert_eq!(proxy.settle_background, Duration::from_secs(300));
        assert_eq!(proxy.log_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(proxy.price_cache_ttl, Duration::from_secs(60));

        let upstream = UpstreamConfig::read(&nothing_set()).unwrap();
        assert_eq!(upstream.base_url, "https://api.anthropic.com");
        assert_eq!(upstream.max_attempts, 3);
        assert_eq!(upstream.retry_budget, Duration::from_secs(60));
        assert_eq!(upstream.backoff_base, Duration::from_millis(500));
        assert_eq!(upstream.backoff_max, Duration::from_secs(8));
        assert_eq!(upstream.connect_timeout, Duration::from_secs(10));
        assert_eq!(upstream.header_timeout, Duration::from_secs(600));
        assert_eq!(upstream.idle_timeout, Duration::from_secs(300));

        let admin = AdminConfig::read(&nothing_set()).unwrap();
        assert_eq!(admin.admin_username, "admin");
        assert_eq!(admin.jwt_ttl, Duration::from_secs(3600));
        assert!(admin.allowed_networks.is_empty());
        assert!(!admin.refuse_unpriced_models);

        let metrics = MetricsConfig::read(&nothing_set());
        assert!(!metrics.enabled, "off outside Lambda");
        assert_eq!(metrics.namespace, "ClaudeRelay");
        let log = LogConfig::read(&nothing_set());
        assert!(!log.json_lines);
        assert_eq!(log.filter, "info");

        let local = LocalConfig::read(&Env::fixed(&[(
            "DYNAMODB_ENDPOINT",
            "http://127.0.0.1:8000",
        )]))
        .unwrap();
        assert_eq!(local.port, 8080);
        assert_eq!(local.table_name, "relay-local");
        assert_eq!(local.batch_collect_interval, Duration::from_secs(300));
        assert!(!local.debug_stats);
    }

    #[test]
    fn every_numeric_default_parses() {
        for variable in VARIABLES {
            if let Default(value) = variable.unset
                && value.starts_with(|c: char| c.is_ascii_digit())
            {
                assert!(
                    nothing_set().number::<u64>(variable).is_ok(),
                    "{}: default `{value}`",
                    variable.name
                );
            }
        }
    }

    #[test]
    fn blank_values_count_as_unset() {
        let env = Env::fixed(&[("ADMIN_USERNAME", "  "), ("UPSTREAM_MAX_ATTEMPTS", "")]);
        assert_eq!(AdminConfig::read(&env).unwrap().admin_username, "admin");
        assert_eq!(UpstreamConfig::read(&env).unwrap().max_attempts, 3);
    }

    fn says(err: ConfigError, var: &str, reason: &str) {
        assert_eq!(err.var, var);
        assert_eq!(err.to_string(), format!("configuration: {var}: {reason}"));
    }

    #[test]
    fn malformed_values_fail_naming_the_variable() {
        let env = Env::fixed;
        says(
            CommonConfig::read(&nothing_set()).unwrap_err(),
            "TABLE_NAME",
            "must be set",
        );
        says(
            CommonConfig::read(&env(&[
                ("TABLE_NAME", "t"),
                ("SECRET_CACHE_TTL_SECONDS", "soon"),
            ]))
            .unwrap_err(),
            "SECRET_CACHE_TTL_SECONDS",
            "`soon` is not a valid number",
        );
        says(
            UpstreamConfig::read(&env(&[("UPSTREAM_MAX_ATTEMPTS", "11")])).unwrap_err(),
            "UPSTREAM_MAX_ATTEMPTS",
            "must be between 1 and 10",
        );
        says(
            UpstreamConfig::read(&env(&[("UPSTREAM_BASE_URL", "ftp://example.com")])).unwrap_err(),
            "UPSTREAM_BASE_URL",
            "must be an http(s) URL with a host",
        );
        says(
            ProxyConfig::read(&env(&[("MAX_REQUEST_BYTES", "6 MB")])).unwrap_err(),
            "MAX_REQUEST_BYTES",
            "`6 MB` is not a valid number",
        );
        says(
            ProxyConfig::read(&env(&[
                ("STREAM_CAP_SECONDS", "60"),
                ("STREAM_CAP_MARGIN_SECONDS", "60"),
            ]))
            .unwrap_err(),
            "STREAM_CAP_MARGIN_SECONDS",
            "must be less than STREAM_CAP_SECONDS (60)",
        );
        says(
            AdminConfig::read(&env(&[("JWT_TTL_SECONDS", "59")])).unwrap_err(),
            "JWT_TTL_SECONDS",
            "must be between 60 and 86400",
        );
        says(
            AdminConfig::read(&env(&[("ADMIN_ALLOWED_CIDRS", "10.0.0.0/33")])).unwrap_err(),
            "ADMIN_ALLOWED_CIDRS",
            "`10.0.0.0/33` is not an IP address or CIDR block",
        );
        says(
            LocalConfig::read(&nothing_set()).err().unwrap(),
            "DYNAMODB_ENDPOINT",
            "must be set (make local starts DynamoDB Local and sets it)",
        );
        says(
            LocalConfig::read(&env(&[("DYNAMODB_ENDPOINT", "http://x"), ("PORT", "http")]))
                .err()
                .unwrap(),
            "PORT",
            "`http` is not a valid number",
        );
        says(
            secret_values(&env(&[("ADMIN_PASSWORD_HASH", "plain")])).unwrap_err(),
            "ADMIN_PASSWORD_HASH",
            "is not a bcrypt hash ($2b$…)",
        );
    }

    #[test]
    fn the_upstream_list_comes_from_the_variable_or_a_file_and_is_checked_at_start() {
        let list = r#"[{"name": "main", "kind": "anthropic", "api_key": "sk-a"}]"#;
        let values = secret_values(&Env::fixed(&[
            ("UPSTREAMS", list),
            ("UPSTREAM_API_KEY", "sk-single"),
        ]))
        .unwrap();
        let pool = values
            .upstream_pool("https://api.anthropic.com")
            .unwrap()
            .unwrap();
        assert_eq!(pool.names(), ["main"]);
        assert!(pool.single_key_ignored, "the list wins over the single key");

        let dir = std::env::temp_dir().join(format!("relay-upstreams-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("upstreams.json");
        std::fs::write(&file, format!(r#"{{"upstreams": {list}}}"#)).unwrap();
        let path = file.to_string_lossy().into_owned();
        let from_file = upstream_list(&Env::fixed(&[("UPSTREAMS_FILE", &path)])).unwrap();
        assert_eq!(from_file, serde_json::from_str(list).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(upstream_list(&nothing_set()).unwrap(), None);
        says(
            upstream_list(&Env::fixed(&[
                ("UPSTREAMS", list),
                ("UPSTREAMS_FILE", &path),
            ]))
            .unwrap_err(),
            "UPSTREAMS_FILE",
            "set only one of `UPSTREAMS` and `UPSTREAMS_FILE`",
        );
        says(
            upstream_list(&Env::fixed(&[(
                "UPSTREAMS",
                r#"[{"name": "b", "kind": "bedrock", "region": "us-east-1", "model_map": {}}]"#,
            )]))
            .unwrap_err(),
            "UPSTREAMS",
            "upstreams[0].model_map: must map at least one Anthropic model id to a Bedrock model id",
        );
        let err = upstream_list(&Env::fixed(&[("UPSTREAMS", "[{")])).unwrap_err();
        assert_eq!(err.var, "UPSTREAMS");
        assert!(err.reason.starts_with("is not JSON"), "{err}");
        let err =
            upstream_list(&Env::fixed(&[("UPSTREAMS_FILE", "/nonexistent/u.json")])).unwrap_err();
        assert_eq!(err.var, "UPSTREAMS_FILE");
        // An `anthropic` upstream without a base URL goes where the single
        // key would.
        let values = secret_values(&Env::fixed(&[
            ("UPSTREAMS", list),
            ("UPSTREAM_BASE_URL", "http://127.0.0.1:9"),
        ]))
        .unwrap();
        let pool = values.upstream_pool("http://127.0.0.1:9").unwrap().unwrap();
        assert!(matches!(
            &pool.upstreams[0].kind,
            crate::domain::upstream_pool::UpstreamKind::Anthropic { base_url, .. } if base_url == "http://127.0.0.1:9"
        ));
    }

    #[test]
    fn the_secret_holds_an_upstream_list_beside_the_other_values() {
        let values: SecretValues = serde_json::from_str(
            r#"{"upstream_api_key": "sk-single", "jwt_secret": "j",
                "upstreams": [{"name": "b", "kind": "bedrock", "region": "eu-west-1",
                               "model_map": {"claude-sonnet-4-5": "eu.anthropic.claude-sonnet-4-5-20250929-v1:0"}}]}"#,
        )
        .unwrap();
        let pool = values
            .upstream_pool("https://api.anthropic.com")
            .unwrap()
            .unwrap();
        assert_eq!(pool.names(), ["b"]);
        // A broken list does not stop the rest of the secret from reading.
        let broken: SecretValues =
            serde_json::from_str(r#"{"jwt_secret": "j", "upstreams": [{"name": "x"}]}"#).unwrap();
        assert_eq!(broken.jwt_secret.as_deref(), Some("j"));
        assert_eq!(
            broken
                .upstream_pool("https://api.anthropic.com")
                .unwrap_err()
                .to_string(),
            "upstreams[0]: missing field `kind`"
        );
        let single: SecretValues = serde_json::from_str(r#"{"upstream_api_key": "sk"}"#).unwrap();
        assert_eq!(
            single
                .upstream_pool("https://api.anthropic.com")
                .unwrap()
                .unwrap()
                .names(),
            ["anthropic"]
        );
    }

    #[test]
    fn metrics_are_on_in_lambda_unless_turned_off() {
        let lambda = [("AWS_LAMBDA_FUNCTION_NAME", "relay-proxy")];
        assert!(MetricsConfig::read(&Env::fixed(&lambda)).enabled);
        assert!(!MetricsConfig::read(&Env::fixed(&[lambda[0], ("METRICS", "off")])).enabled);
        assert!(MetricsConfig::read(&Env::fixed(&[("METRICS", "emf")])).enabled);
        assert!(LogConfig::read(&Env::fixed(&lambda)).json_lines);
    }

    /// Every `.rs` file under `dir`, recursively.
    fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path.file_name().is_some_and(|name| name != "target") {
                    rust_files(&path, found);
                }
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                found.push(path);
            }
        }
    }

    #[test]
    fn only_this_module_reads_the_environment() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR"));
        let this_file = shared.join("src/config.rs");
        let mut files = Vec::new();
        for dir in ["src", "../functions", "../infra/local-server/src"] {
            rust_files(&shared.join(dir), &mut files);
        }
        assert!(files.len() > 20, "the walk found the sources: {files:?}");
        // `env::var` covers `var`, `var_os`, `vars` and `vars_os`, however
        // imported; EnvFilter's own constructors read `RUST_LOG`.
        let readers = ["env::var", "from_default_env", "EnvFilter::from_env"];
        let offenders: Vec<String> = files
            .iter()
            .filter(|path| **path != this_file)
            .flat_map(|path| {
                let text = std::fs::read_to_string(path).unwrap();
                readers
                    .iter()
                    .filter(|reader| text.contains(*reader))
                    .map(|reader| format!("{}: {reader}", path.display()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(
            offenders.is_empty(),
            "read variables through config::Env (and list them in config::VARIABLES), not directly:\n{}",
            offenders.join("\n")
        );
    }

    #[test]
    fn readme_lists_every_variable_the_code_reads() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .expect("README.md has a Configuration section");
        let listed: Vec<&str> = section
            .lines()
            .skip_while(|line| !line.starts_with('|'))
            .take_while(|line| line.starts_with('|'))
            .skip(2)
            .filter_map(|row| row.split('`').nth(1))
            .collect();
        let read: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        let missing: Vec<&&str> = read.iter().filter(|name| !listed.contains(name)).collect();
        let unread: Vec<&&str> = listed.iter().filter(|name| !read.contains(name)).collect();
        assert!(
            missing.is_empty() && unread.is_empty(),
            "README's configuration table: missing {missing:?}, not read by the code {unread:?}"
        );
        assert!(
            section.contains(&variables_markdown()),
            "README.md's configuration table must be exactly what variables_markdown() renders:\n{}",
            variables_markdown()
        );
    }

    #[test]
    fn variable_names_are_unique() {
        let mut names: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), VARIABLES.len());
    }
}
