//! The upstream Anthropic API: which headers cross the relay in each
//! direction, and sending a request with bounded retries (backoff with
//! jitter, `retry-after` honoured) while nothing has reached the client.

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use rand::Rng;

use crate::config::{ConfigError, number};
use crate::secrets::{Secrets, SecretsError};

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

/// Hop-by-hop headers (RFC 9110 §7.6.1) never cross a proxy.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the upstream must not see: the client's credentials,
/// cookies, framing the client library sets again, and what API Gateway and
/// CloudFront add about the caller.
fn strip_from_request(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
        || matches!(
            name,
            "host"
                | "x-api-key"
                | "authorization"
                | "cookie"
                | "content-length"
                | "accept-encoding"
                | "forwarded"
                | "via"
                | "x-real-ip"
        )
        || name.starts_with("x-forwarded-")
        || name.starts_with("x-amz")
        || name.starts_with("cloudfront-")
}

/// Response headers the client must not see: the upstream account's
/// identity and its rate-limit state, cookies, and framing.
fn strip_from_response(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
        || matches!(
            name,
            "set-cookie" | "content-length" | "anthropic-organization-id" | "cf-ray" | "server"
        )
        || name.starts_with("anthropic-ratelimit-")
}

/// The client's headers as the upstream gets them, in their order, with the
/// upstream key set and `accept-encoding` narrowed to what the relay can
/// decode on the side (usage must stay readable).
pub fn upstream_request_headers(client: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        if !strip_from_request(name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    let decodable: Vec<&str> = client
        .get_all(http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|e| e.split(';').next().unwrap_or("").trim())
        .filter(|e| matches!(e.to_ascii_lowercase().as_str(), "gzip" | "deflate"))
        .collect();
    let accept = if decodable.is_empty() {
        "identity".to_owned()
    } else {
        decodable.join(", ")
    };
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(http::header::ACCEPT_ENCODING, value);
    }
    headers
}

/// The upstream's response headers as the client gets them.
pub fn client_response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if !strip_from_response(name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// One request to forward: method, path with query, filtered headers, body.
#[derive(Debug, Clone)]
pub struct ForwardRequest {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamBodyError>> + Send>>;

/// Reading the upstream body failed (connection lost, or silent too long).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error("upstream connection lost mid-body")]
    Lost(#[source] reqwest::Error),
    #[error("upstream sent nothing for {0:?}")]
    Idle(Duration),
}

pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: BodyStream,
    /// Attempts made before this one.
    pub retries: u32,
}

/// Why no upstream response could be returned at all.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not reach the upstream after {attempts} attempt(s)")]
    Unreachable {
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the upstream rejected the relay's credentials")]
    CredentialsRejected,
    #[error("no upstream API key is configured")]
    NoCredentials,
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

/// Statuses worth another attempt: rate limited, overloaded, or a server
/// fault that did not process the request.
pub fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504 | 529)
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Full jitter: a uniform wait up to the exponential bound, so clients that
/// failed together do not retry together.
pub fn backoff(config: &UpstreamConfig, retry: u32) -> Duration {
    let bound = config
        .backoff_base
        .saturating_mul(2u32.saturating_pow(retry))
        .min(config.backoff_max);
    let millis = u64::try_from(bound.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

#[derive(Clone)]
pub struct Upstream {
    client: reqwest::Client,
    config: std::sync::Arc<UpstreamConfig>,
    secrets: Secrets,
}

impl Upstream {
    pub fn new(config: UpstreamConfig, secrets: Secrets) -> anyhow::Result<Upstream> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // Redirects would resend the upstream key elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Upstream {
            client,
            config: std::sync::Arc::new(config),
            secrets,
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Sends `request`, retrying connect failures and retryable statuses
    /// within the attempt and time budgets. A retryable status that cannot
    /// be retried any more is returned as it is, so the client sees the
    /// upstream's own answer (and its `retry-after`).
    pub async fn send(&self, request: &ForwardRequest) -> Result<UpstreamResponse, UpstreamError> {
        let started = Instant::now();
        let url = format!("{}{}", self.config.base_url, request.path_and_query);
        let mut retries = 0u32;
        let mut refreshed_key = false;
        loop {
            let secrets = if refreshed_key {
                self.secrets.refresh().await?
            } else {
                self.secrets.current().await?
            };
            let key = secrets
                .upstream_api_key
                .as_deref()
                .filter(|k| !k.is_empty())
                .ok_or(UpstreamError::NoCredentials)?;
            let mut headers = request.headers.clone();
            headers.insert(
                HeaderName::from_static("x-api-key"),
                HeaderValue::from_str(key).map_err(|_| UpstreamError::NoCredentials)?,
            );
            let attempt = self
                .client
                .request(request.method.clone(), &url)
                .headers(headers)
                .body(request.body.clone())
                .send();
            let wait = match tokio::time::timeout(self.config.header_timeout, attempt).await {
                Err(_) => return Err(UpstreamError::Timeout(self.config.header_timeout)),
                Ok(Err(err)) => {
                    // Only failures before the request left are safe to
                    // retry: anything later may already be billed upstream.
                    if !err.is_connect() {
                        return Err(UpstreamError::Unreachable {
                            attempts: retries + 1,
                            source: err,
                        });
                    }
                    let wait = backoff(&self.config, retries);
                    if !self.may_retry(retries, started, wait) {
                        return Err(UpstreamError::Unreachable {
                            attempts: retries + 1,
                            source: err,
                        });
                    }
                    wait
                }
                Ok(Ok(response)) => {
                    let status = response.status();
                    if status == StatusCode::UNAUTHORIZED {
                        // The key may have been rotated in Secrets Manager.
                        if refreshed_key {
                            return Err(UpstreamError::CredentialsRejected);
                        }
                        refreshed_key = true;
                        retries += 1;
                        continue;
                    }
                    let wait = retry_after(response.headers())
                        .unwrap_or_else(|| backoff(&self.config, retries));
                    if !is_retryable(status) || !self.may_retry(retries, started, wait) {
                        return Ok(self.wrap_response(response, retries));
                    }
                    tracing::info!(
                        status = status.as_u16(),
                        retry = retries + 1,
                        wait_ms = wait.as_millis() as u64,
                        "retrying upstream"
                    );
                    wait
                }
            };
            tokio::time::sleep(wait).await;
            retries += 1;
        }
    }

    fn may_retry(&self, retries: u32, started: Instant, wait: Duration) -> bool {
        retries + 1 < self.config.max_attempts
            && started.elapsed() + wait < self.config.retry_budget
    }

    fn wrap_response(&self, response: reqwest::Response, retries: u32) -> UpstreamResponse {
        let status = response.status();
        let headers = response.headers().clone();
        let idle = self.config.idle_timeout;
        let chunks = Box::pin(response.bytes_stream());
        // Each chunk must come within the idle timeout; after an error the
        // stream ends.
        let body = futures_util::stream::unfold(Some(chunks), move |state| async move {
            let mut chunks = state?;
            match tokio::time::timeout(idle, chunks.next()).await {
                Err(_) => Some((Err(UpstreamBodyError::Idle(idle)), None)),
                Ok(None) => None,
                Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(chunks))),
                Ok(Some(Err(err))) => Some((Err(UpstreamBodyError::Lost(err)), None)),
            }
        });
        let body: BodyStream = Box::pin(body);
        UpstreamResponse {
            status,
            headers,
            body,
            retries,
        }
    }
}
