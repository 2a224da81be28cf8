//! The upstream Anthropic API: which headers cross the relay in each
//! direction, and sending a request with bounded retries (backoff with
//! jitter, `retry-after` honoured) while nothing has reached the client.

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use rand::Rng;

pub use crate::config::UpstreamConfig;
use crate::domain::route::CanonicalPath;
use crate::secrets::{Secrets, SecretsError};

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

/// One request to forward: method, the canonical path the route was decided
/// on, the query as the client sent it, filtered headers, body.
#[derive(Debug, Clone)]
pub struct ForwardRequest {
    pub method: Method,
    pub path: CanonicalPath,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Which failures may be retried for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Connect failures and every retryable status (messages, reads).
    Retryable,
    /// Only what proves the upstream did not act: connect failures, 429 and
    /// 529. For creations (a batch) whose repeat would make a second object.
    UnlessProcessed,
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
    /// The URL the HTTP client would send differs from the path the route
    /// was decided on: refused rather than sent.
    #[error("the upstream URL would not carry the path `{0}` as decided")]
    PathMismatch(String),
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

/// The URL for `path` (canonical) and `query` under `base_url`, checked to
/// carry exactly that path once parsed the way the HTTP client parses it:
/// what is forwarded is what the route was decided on.
pub fn upstream_url(
    base_url: &str,
    path: &CanonicalPath,
    query: Option<&str>,
) -> Result<reqwest::Url, UpstreamError> {
    let mismatch = || UpstreamError::PathMismatch(path.to_string());
    let base = reqwest::Url::parse(base_url).map_err(|_| mismatch())?;
    let prefix = base.path().trim_end_matches('/');
    let text = match query {
        Some(query) => format!("{}{path}?{query}", base_url.trim_end_matches('/')),
        None => format!("{}{path}", base_url.trim_end_matches('/')),
    };
    let url = reqwest::Url::parse(&text).map_err(|_| mismatch())?;
    let sent = url.path().strip_prefix(prefix).ok_or_else(mismatch)?;
    if sent != path.as_str() || url.fragment().is_some() {
        return Err(mismatch());
    }
    Ok(url)
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
    pub async fn send(
        &self,
        request: &ForwardRequest,
        policy: RetryPolicy,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let started = Instant::now();
        let url = upstream_url(
            &self.config.base_url,
            &request.path,
            request.query.as_deref(),
        )?;
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
                .request(request.method.clone(), url.clone())
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
                    let retryable = match policy {
                        RetryPolicy::Retryable => is_retryable(status),
                        RetryPolicy::UnlessProcessed => matches!(status.as_u16(), 429 | 529),
                    };
                    if !retryable || !self.may_retry(retries, started, wait) {
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

    /// Sends a request whose body streams from the client (a file upload):
    /// one attempt, since the body cannot be read twice. A 401 still makes
    /// the next request re-read the upstream key.
    pub async fn send_streamed(
        &self,
        method: Method,
        path: &CanonicalPath,
        query: Option<&str>,
        mut headers: HeaderMap,
        body: reqwest::Body,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let url = upstream_url(&self.config.base_url, path, query)?;
        let secrets = self.secrets.current().await?;
        let key = secrets
            .upstream_api_key
            .as_deref()
            .filter(|k| !k.is_empty())
            .ok_or(UpstreamError::NoCredentials)?;
        headers.insert(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_str(key).map_err(|_| UpstreamError::NoCredentials)?,
        );
        let attempt = self
            .client
            .request(method, url)
            .headers(headers)
            .body(body)
            .send();
        let response = match tokio::time::timeout(self.config.header_timeout, attempt).await {
            Err(_) => return Err(UpstreamError::Timeout(self.config.header_timeout)),
            Ok(Err(err)) => {
                return Err(UpstreamError::Unreachable {
                    attempts: 1,
                    source: err,
                });
            }
            Ok(Ok(response)) => response,
        };
        if response.status() == StatusCode::UNAUTHORIZED {
            // The key may have been rotated: the next request reads it again.
            let _ = self.secrets.refresh().await;
            return Err(UpstreamError::CredentialsRejected);
        }
        Ok(self.wrap_response(response, 0))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Request targets built from the pieces that make paths ambiguous:
    /// dots, slashes, backslashes, percent-escapes in both cases, the
    /// reserved characters, and the segments of the routes themselves.
    fn target() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("\\".to_owned()),
            Just("%".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%2f".to_owned()),
            Just("%2F".to_owned()),
            Just("%5C".to_owned()),
            Just("%00".to_owned()),
            Just("%41".to_owned()),
            Just("%C3%A9".to_owned()),
            Just("v1".to_owned()),
            Just("messages".to_owned()),
            Just("batches".to_owned()),
            Just("files".to_owned()),
            Just("msgbatch_01x".to_owned()),
            Just(";".to_owned()),
            Just(":".to_owned()),
            Just("@".to_owned()),
            Just("~".to_owned()),
            Just("?".to_owned()),
            Just("#".to_owned()),
            Just("=".to_owned()),
            Just("&".to_owned()),
            Just("'".to_owned()),
            Just("\t".to_owned()),
            Just(" ".to_owned()),
            Just("é".to_owned()),
            "[a-z0-9_-]{1,4}",
        ];
        prop::collection::vec(piece, 0..10).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The path the route is decided on is exactly the path the HTTP
        /// client sends, for every target the relay accepts, behind a base
        /// URL with or without a path prefix.
        #[test]
        fn the_decided_path_is_the_forwarded_path(target in target()) {
            // What the server hands the router: the target as hyper parses it.
            let Ok(uri) = target.parse::<http::Uri>() else { return Ok(()) };
            let Ok(path) = CanonicalPath::parse(uri.path()) else { return Ok(()) };
            for base in ["https://api.anthropic.com", "http://127.0.0.1:9", "https://gw.example/anthropic/"] {
                let url = upstream_url(base, &path, uri.query())
                    .map_err(|e| TestCaseError::fail(format!("{target}: {e}")))?;
                let prefix = reqwest::Url::parse(base).unwrap().path().trim_end_matches('/').to_owned();
                prop_assert_eq!(url.path(), format!("{prefix}{}", path.as_str()));
                prop_assert!(url.fragment().is_none());
            }
            // And the route table reads the same path again the same way.
            let decided = crate::domain::route::route(
                &Method::POST,
                path.as_str(),
                &crate::domain::route::PassThrough::default(),
            );
            let again = crate::domain::route::route(
                &Method::POST,
                uri.path(),
                &crate::domain::route::PassThrough::default(),
            );
            prop_assert_eq!(decided, again);
        }

        /// Canonical paths are fixed points of URL parsing: a URL parser
        /// that would change a path finds no canonical path to change.
        #[test]
        fn url_parsing_never_rewrites_a_canonical_path(target in target()) {
            if let Ok(path) = CanonicalPath::parse(&target) {
                let url = reqwest::Url::parse(&format!("https://h{target}")).unwrap();
                prop_assert_eq!(url.path(), path.as_str());
            }
        }
    }

    #[test]
    fn dot_segment_and_encoded_variants_of_metered_paths_are_refused_before_forwarding() {
        for target in [
            "/v1/./messages",
            "/v1/x/../messages",
            "/v1/%2e/messages",
            "/v1/x/%2e%2e/messages",
            "/v1/messages/./batches",
            "/v1//messages",
            "/v1\\messages",
        ] {
            assert!(CanonicalPath::parse(target).is_err(), "{target}");
        }
    }
}
