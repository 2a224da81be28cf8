//! The upstreams: which headers cross the relay in each direction, the
//! pool of upstreams the secret names (`domain::upstream_pool`), and
//! sending a request to them in the order the proxy chose, failing over to
//! the next on a connect error, 429, 5xx or 529 and retrying with bounded
//! backoff (jitter, `retry-after` honoured), only while nothing has reached
//! the client.

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use rand::Rng;

use std::collections::HashMap;
use std::sync::Arc;

use crate::bedrock::{BedrockSendError, BedrockSettings, BedrockUpstream};
pub use crate::config::UpstreamConfig;
use crate::domain::route::CanonicalPath;
use crate::domain::upstream_pool::{
    FailureKind, PoolError, UpstreamApiKey, UpstreamKind, UpstreamPool, UpstreamSpec,
};
use crate::secrets::{SecretValues, Secrets, SecretsError};

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
    /// The upstream that answered (`UpstreamSpec::name`).
    pub upstream: String,
}

/// Where the outcome of each attempt goes: the proxy shares it with other
/// instances (`store::upstream_health`), so one instance's discovery
/// spares the others. Called as attempts fail; must not block.
pub trait HealthReport: Send + Sync {
    /// `upstream` failed in a way that says it is busy or down.
    fn failed(&self, upstream: &UpstreamSpec, kind: FailureKind, retry_after: Option<Duration>);
    /// `upstream` refused the relay's credentials, even once re-read.
    fn refused(&self, upstream: &UpstreamSpec);
}

/// Reports nowhere: requests that must go to one upstream (batches, files).
pub struct NoReport;

impl HealthReport for NoReport {
    fn failed(&self, _: &UpstreamSpec, _: FailureKind, _: Option<Duration>) {}
    fn refused(&self, _: &UpstreamSpec) {}
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
    /// The secret's upstream list is invalid (its message names the entry).
    #[error("the upstream list is invalid: {0}")]
    Pool(#[from] PoolError),
    /// No configured upstream serves the model asked for.
    #[error("no upstream serves model `{0}`")]
    NoUpstreamFor(String),
    /// The request cannot go to Bedrock as it is (an unmapped model, a
    /// body that is not an object): the message says why.
    #[error("{0}")]
    NotForBedrock(String),
    #[error("could not reach Bedrock: {0}")]
    BedrockUnreachable(String),
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
    /// The pool as last built, and the secret it was built from: rebuilt
    /// when the secret is read anew.
    pool: Arc<std::sync::Mutex<Option<PoolFrom>>>,
    bedrock: Arc<tokio::sync::Mutex<BedrockClients>>,
}

/// A pool and the secret it was built from.
type PoolFrom = (Arc<SecretValues>, Arc<UpstreamPool>);

/// Each Bedrock upstream's client, by name, with the settings it was built for.
type BedrockClients = HashMap<String, (BedrockSettings, Arc<BedrockUpstream>)>;

/// While Bedrock is silent this long, the relay sends its own `ping` event
/// (Anthropic pings about as often; Claude Code gives up after 300 s of
/// silence).
const BEDROCK_PING_EVERY: Duration = Duration::from_secs(15);

/// What one attempt at one upstream came to.
enum Attempt {
    /// An answer, whatever its status.
    Answer(UpstreamResponse),
    /// It failed before the request left: safe to send elsewhere.
    NotSent(UpstreamError),
    /// This upstream does not serve the route (Bedrock: batches, files).
    CannotServe,
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
            pool: Default::default(),
            bedrock: Default::default(),
        })
    }

    /// The upstreams the secret names (or the single `upstream_api_key`).
    pub async fn pool(&self) -> Result<Arc<UpstreamPool>, UpstreamError> {
        let secrets = self.secrets.current().await?;
        self.pool_of(&secrets)
    }

    fn pool_of(&self, secrets: &Arc<SecretValues>) -> Result<Arc<UpstreamPool>, UpstreamError> {
        let mut cached = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((from, pool)) = cached.as_ref()
            && Arc::ptr_eq(from, secrets)
        {
            return Ok(pool.clone());
        }
        let pool = secrets
            .upstream_pool(&self.config.base_url)?
            .ok_or(UpstreamError::NoCredentials)?;
        if pool.single_key_ignored {
            tracing::warn!(
                "the secret has both `upstreams` and `upstream_api_key`: the list is used"
            );
        }
        let pool = Arc::new(pool);
        *cached = Some((secrets.clone(), pool.clone()));
        Ok(pool)
    }

    /// The Anthropic upstream for what lives in one Anthropic organisation
    /// (batches and files, whose ids are scoped to it): the first Anthropic
    /// upstream of the list, whatever its health.
    pub async fn home(&self) -> Result<UpstreamSpec, UpstreamError> {
        self.pool()
            .await?
            .upstreams
            .iter()
            .find(|u| matches!(u.kind, UpstreamKind::Anthropic { .. }))
            .cloned()
            .ok_or(UpstreamError::NoCredentials)
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Sends `request` to the home upstream (`Upstream::home`), retrying
    /// connect failures and retryable statuses within the attempt and time
    /// budgets. A retryable status that cannot be retried any more is
    /// returned as it is, so the client sees the upstream's own answer (and
    /// its `retry-after`).
    pub async fn send(
        &self,
        request: &ForwardRequest,
        policy: RetryPolicy,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let home = self.home().await?;
        self.send_to(request, policy, std::slice::from_ref(&home), &NoReport)
            .await
    }

    /// Sends `request` to `candidates` in order (the proxy's choice:
    /// `domain::upstream_pool::candidates`). A connect error or a retryable
    /// status moves it to the next candidate at once, and is reported to
    /// `health`; once each was tried, the first is retried with backoff
    /// within the attempt and time budgets. A 401 (or, in a pool, a 403)
    /// re-reads the secret and tries that upstream once more with its key
    /// as read; a second one reports it refused and moves on. A Bedrock
    /// upstream answers messages, token counts and the model list.
    pub async fn send_to(
        &self,
        request: &ForwardRequest,
        policy: RetryPolicy,
        candidates: &[UpstreamSpec],
        health: &dyn HealthReport,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let started = Instant::now();
        let mut tried = vec![false; candidates.len()];
        let mut current = 0usize;
        let mut retries = 0u32;
        let mut refreshed: Option<UpstreamSpec> = None;
        loop {
            let Some(listed) = candidates.get(current) else {
                return Err(UpstreamError::NoCredentials);
            };
            // After a re-read, the upstream as the new secret has it.
            let spec = refreshed
                .as_ref()
                .filter(|r| r.name == listed.name)
                .unwrap_or(listed);
            tried[current] = true;
            // The next untried candidate, if any: failing over waits for
            // nothing; once each was tried, the first is retried.
            let next_untried = (current + 1..candidates.len()).find(|i| !tried[*i]);
            let attempt = match &spec.kind {
                UpstreamKind::Anthropic { base_url, api_key } => {
                    self.attempt_anthropic(request, base_url, api_key).await?
                }
                UpstreamKind::Bedrock { .. } => self.attempt_bedrock(request, spec).await?,
            };
            let (failure, wait) = match attempt {
                Attempt::CannotServe => match next_untried {
                    Some(next) => {
                        current = next;
                        continue;
                    }
                    None => return Err(UpstreamError::NoCredentials),
                },
                Attempt::NotSent(mut err) => {
                    health.failed(spec, FailureKind::Connect, None);
                    let wait = backoff(&self.config, retries);
                    if next_untried.is_none() && !self.may_retry(retries, started, wait) {
                        if let UpstreamError::Unreachable { attempts, .. } = &mut err {
                            *attempts = retries + 1;
                        }
                        return Err(err);
                    }
                    (FailureKind::Connect, wait)
                }
                Attempt::Answer(mut response) => {
                    response.retries = retries;
                    response.upstream.clone_from(&spec.name);
                    let status = response.status;
                    let anthropic = matches!(spec.kind, UpstreamKind::Anthropic { .. });
                    let credentials = status == StatusCode::UNAUTHORIZED
                        || (status == StatusCode::FORBIDDEN && candidates.len() > 1);
                    if anthropic && credentials {
                        // The key may have been rotated in Secrets Manager:
                        // read it again and try once more.
                        if refreshed.as_ref().is_none_or(|r| r.name != spec.name) {
                            let secrets = self.secrets.refresh().await?;
                            let pool = self.pool_of(&secrets)?;
                            if let Some(fresh) = pool.get(&spec.name) {
                                refreshed = Some(fresh.clone());
                                retries += 1;
                                continue;
                            }
                        }
                        health.refused(spec);
                        match next_untried {
                            Some(next) => {
                                current = next;
                                retries += 1;
                                continue;
                            }
                            None if status == StatusCode::UNAUTHORIZED => {
                                return Err(UpstreamError::CredentialsRejected);
                            }
                            None => return Ok(response),
                        }
                    }
                    let retry_after = retry_after(&response.headers);
                    let wait = retry_after.unwrap_or_else(|| backoff(&self.config, retries));
                    let retryable = match policy {
                        RetryPolicy::Retryable => is_retryable(status),
                        RetryPolicy::UnlessProcessed => matches!(status.as_u16(), 429 | 529),
                    };
                    let kind = FailureKind::from_status(status.as_u16()).filter(|_| retryable);
                    if let Some(kind) = kind {
                        health.failed(spec, kind, retry_after);
                    }
                    let may_go_on =
                        next_untried.is_some() || self.may_retry(retries, started, wait);
                    match kind {
                        Some(kind) if may_go_on => {
                            tracing::info!(
                                status = status.as_u16(),
                                upstream = %spec.name,
                                retry = retries + 1,
                                "retrying upstream"
                            );
                            (kind, wait)
                        }
                        _ => return Ok(response),
                    }
                }
            };
            match next_untried {
                Some(next) => {
                    tracing::info!(
                        from = %spec.name,
                        to = %candidates[next].name,
                        failure = failure.as_str(),
                        "failing over"
                    );
                    current = next;
                }
                None => {
                    current = 0;
                    tokio::time::sleep(wait).await;
                }
            }
            retries += 1;
        }
    }

    /// One attempt at an Anthropic upstream.
    async fn attempt_anthropic(
        &self,
        request: &ForwardRequest,
        base_url: &str,
        api_key: &UpstreamApiKey,
    ) -> Result<Attempt, UpstreamError> {
        let url = upstream_url(base_url, &request.path, request.query.as_deref())?;
        let mut headers = request.headers.clone();
        headers.insert(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_str(api_key.expose()).map_err(|_| UpstreamError::NoCredentials)?,
        );
        let attempt = self
            .client
            .request(request.method.clone(), url)
            .headers(headers)
            .body(request.body.clone())
            .send();
        match tokio::time::timeout(self.config.header_timeout, attempt).await {
            Err(_) => Err(UpstreamError::Timeout(self.config.header_timeout)),
            // Only failures before the request left are safe to send
            // again: anything later may already be billed upstream.
            Ok(Err(err)) if err.is_connect() => Ok(Attempt::NotSent(UpstreamError::Unreachable {
                attempts: 1,
                source: err,
            })),
            Ok(Err(err)) => Err(UpstreamError::Unreachable {
                attempts: 1,
                source: err,
            }),
            Ok(Ok(response)) => Ok(Attempt::Answer(self.wrap_response(response, 0, ""))),
        }
    }

    /// One attempt at a Bedrock upstream: messages and token counts through
    /// its runtime API, the model list from its model map.
    async fn attempt_bedrock(
        &self,
        request: &ForwardRequest,
        spec: &UpstreamSpec,
    ) -> Result<Attempt, UpstreamError> {
        let Some(bedrock) = self.bedrock(spec).await else {
            return Ok(Attempt::CannotServe);
        };
        let betas: Vec<&str> = request
            .headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .collect();
        let sent = match request.path.as_str() {
            "/v1/messages" => {
                bedrock
                    .send(&request.body, &betas, BEDROCK_PING_EVERY)
                    .await
            }
            "/v1/messages/count_tokens" => bedrock.count_tokens(&request.body, &betas).await,
            "/v1/models" => {
                let body = bedrock.models().to_string().into_bytes();
                let mut headers = HeaderMap::new();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                let body: BodyStream =
                    Box::pin(futures_util::stream::once(
                        async move { Ok(Bytes::from(body)) },
                    ));
                return Ok(Attempt::Answer(UpstreamResponse {
                    status: StatusCode::OK,
                    headers,
                    body,
                    retries: 0,
                    upstream: String::new(),
                }));
            }
            _ => return Ok(Attempt::CannotServe),
        };
        match sent {
            Ok(response) => Ok(Attempt::Answer(response)),
            Err(BedrockSendError::Request(err)) => {
                Err(UpstreamError::NotForBedrock(err.to_string()))
            }
            Err(BedrockSendError::Unreachable(cause)) => {
                Ok(Attempt::NotSent(UpstreamError::BedrockUnreachable(cause)))
            }
        }
    }

    /// The Bedrock client of `spec`, built once per settings (the pool may
    /// change them when the secret is re-read).
    async fn bedrock(&self, spec: &UpstreamSpec) -> Option<Arc<BedrockUpstream>> {
        let UpstreamKind::Bedrock {
            region,
            endpoint_url,
            model_map,
        } = &spec.kind
        else {
            return None;
        };
        let settings = BedrockSettings {
            region: region.clone(),
            endpoint_url: endpoint_url.clone(),
            model_map: model_map.clone(),
        };
        let mut clients = self.bedrock.lock().await;
        if let Some((built_for, client)) = clients.get(&spec.name)
            && *built_for == settings
        {
            return Some(client.clone());
        }
        let client = Arc::new(BedrockUpstream::new(settings.clone()).await);
        clients.insert(spec.name.clone(), (settings, client.clone()));
        Some(client)
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
        body: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let body = reqwest::Body::wrap_stream(body);
        let home = self.home().await?;
        let UpstreamKind::Anthropic { base_url, api_key } = &home.kind else {
            return Err(UpstreamError::NoCredentials);
        };
        let url = upstream_url(base_url, path, query)?;
        headers.insert(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_str(api_key.expose()).map_err(|_| UpstreamError::NoCredentials)?,
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
        Ok(self.wrap_response(response, 0, &home.name))
    }

    fn may_retry(&self, retries: u32, started: Instant, wait: Duration) -> bool {
        retries + 1 < self.config.max_attempts
            && started.elapsed() + wait < self.config.retry_budget
    }

    fn wrap_response(
        &self,
        response: reqwest::Response,
        retries: u32,
        upstream: &str,
    ) -> UpstreamResponse {
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
            upstream: upstream.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

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

    // ---- Which statuses are retried, and how long to wait ----

    #[test]
    fn only_429_529_and_the_5xx_that_did_not_process_the_request_are_retryable() {
        let retryable: Vec<u16> = (100..=599u16)
            .filter(|&code| is_retryable(StatusCode::from_u16(code).unwrap()))
            .collect();
        assert_eq!(retryable, [429, 500, 502, 503, 504, 529]);
    }

    /// A config with small, distinct backoff figures (base 100 ms, cap 60 s).
    fn config(base_url: &str) -> UpstreamConfig {
        UpstreamConfig {
            base_url: base_url.to_owned(),
            max_attempts: 3,
            retry_budget: Duration::from_secs(60),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
        }
    }

    /// The shortest and longest of many backoff draws for `retry`.
    fn backoff_range(config: &UpstreamConfig, retry: u32) -> (Duration, Duration) {
        let draws: Vec<Duration> = (0..400).map(|_| backoff(config, retry)).collect();
        (*draws.iter().min().unwrap(), *draws.iter().max().unwrap())
    }

    #[test]
    fn backoff_is_a_full_jitter_below_a_bound_that_doubles_each_retry() {
        let config = config("http://127.0.0.1:9");
        for retry in 0..=4u32 {
            let bound = Duration::from_millis(100 << retry);
            let (shortest, longest) = backoff_range(&config, retry);
            assert!(longest <= bound, "retry {retry}: {longest:?} > {bound:?}");
            // Full jitter: draws spread over the whole range, not just its
            // upper half (400 uniform draws miss either half with
            // probability 2^-400).
            assert!(shortest < bound / 2, "retry {retry}: shortest {shortest:?}");
            assert!(longest > bound / 2, "retry {retry}: longest {longest:?}");
        }
    }

    #[test]
    fn backoff_never_exceeds_its_cap_however_many_retries() {
        let mut config = config("http://127.0.0.1:9");
        config.backoff_max = Duration::from_secs(1);
        for retry in [4, 10, 31, 32, 64, u32::MAX] {
            let (_, longest) = backoff_range(&config, retry);
            assert!(longest <= config.backoff_max, "retry {retry}: {longest:?}");
            // Capped, not collapsed: the draws still reach the cap's range.
            assert!(
                longest > Duration::from_millis(500),
                "retry {retry}: {longest:?}"
            );
        }
    }

    fn with_retry_after(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_str(value).unwrap(),
        );
        headers
    }

    #[test]
    fn retry_after_in_seconds_whole_or_fractional_sets_the_wait() {
        for (value, wait) in [
            ("120", Duration::from_secs(120)),
            ("0", Duration::ZERO),
            (" 2 ", Duration::from_secs(2)),
            ("1.5", Duration::from_millis(1500)),
        ] {
            assert_eq!(retry_after(&with_retry_after(value)), Some(wait), "{value}");
        }
    }

    #[test]
    fn retry_after_other_than_non_negative_seconds_falls_back_to_backoff() {
        assert_eq!(retry_after(&HeaderMap::new()), None);
        // An HTTP-date is not read: the jittered backoff applies instead.
        for value in [
            "-1",
            "NaN",
            "inf",
            "",
            "soon",
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(retry_after(&with_retry_after(value)), None, "{value:?}");
        }
    }

    // ---- Headers in each direction ----

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        headers.iter().map(|(name, _)| name.as_str()).collect()
    }

    #[test]
    fn credentials_cookies_framing_and_gateway_headers_are_not_forwarded() {
        let stripped = [
            // The client's credentials: the upstream key is set by `send`.
            ("x-api-key", "sk-proxy-client"),
            ("authorization", "Bearer client-token"),
            ("proxy-authorization", "Basic eDp5"),
            ("cookie", "session=1"),
            // Framing the HTTP client sets again.
            ("host", "relay.example"),
            ("content-length", "12"),
            // Hop-by-hop (RFC 9110 §7.6.1).
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            // What API Gateway and CloudFront add about the caller.
            ("forwarded", "for=192.0.2.1"),
            ("via", "2.0 cloudfront"),
            ("x-real-ip", "192.0.2.1"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
            ("x-amzn-trace-id", "Root=1-abc"),
            ("x-amz-cf-id", "abc=="),
            ("cloudfront-viewer-country", "FR"),
        ];
        let kept = [
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "claude-code-20250219"),
            ("content-type", "application/json"),
            ("user-agent", "claude-cli/2.1.330 (external, sdk-cli)"),
            ("x-stainless-retry-count", "0"),
            ("x-claude-code-session-id", "6e94c738"),
            ("x-app", "cli"),
        ];
        let mut client = Vec::new();
        for (stripped, kept) in stripped.iter().zip(kept.iter().cycle()) {
            client.push(*stripped);
            client.push(*kept);
        }
        let forwarded = upstream_request_headers(&header_map(&client));
        for (name, _) in stripped {
            assert!(!forwarded.contains_key(name), "{name} was forwarded");
        }
        for (name, value) in kept {
            assert_eq!(forwarded.get(name).unwrap(), value, "{name}");
        }
    }

    #[test]
    fn forwarded_headers_keep_their_order_and_every_value() {
        let client = header_map(&[
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "a"),
            ("x-api-key", "sk-proxy-client"),
            ("content-type", "application/json"),
            ("anthropic-beta", "b"),
        ]);
        let forwarded = upstream_request_headers(&client);
        let betas: Vec<_> = forwarded.get_all("anthropic-beta").iter().collect();
        assert_eq!(betas, ["a", "b"]);
        assert_eq!(
            names(&forwarded),
            [
                "anthropic-version",
                "anthropic-beta",
                "anthropic-beta",
                "content-type",
                "accept-encoding"
            ]
        );
    }

    #[test]
    fn accept_encoding_is_narrowed_to_what_the_relay_can_decode() {
        for (client, sent) in [
            (vec![], "identity"),
            (vec!["gzip, deflate, br, zstd"], "gzip, deflate"),
            (vec!["br, zstd"], "identity"),
            (vec!["gzip;q=1.0, identity;q=0.5, *;q=0"], "gzip"),
            (vec!["br", "deflate"], "deflate"),
            (vec!["identity"], "identity"),
        ] {
            let pairs: Vec<(&str, &str)> = client.iter().map(|v| ("accept-encoding", *v)).collect();
            let forwarded = upstream_request_headers(&header_map(&pairs));
            let values: Vec<_> = forwarded.get_all("accept-encoding").iter().collect();
            assert_eq!(values, [sent], "{client:?}");
        }
    }

    #[test]
    fn upstream_identity_rate_limits_cookies_and_framing_are_not_passed_back() {
        let stripped = [
            ("anthropic-organization-id", "org-uuid"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-tokens-reset", "2025-01-01T00:00:00Z"),
            ("anthropic-ratelimit-input-tokens-limit", "400000"),
            ("set-cookie", "__cf_bm=x"),
            ("cf-ray", "8f00-SJC"),
            ("server", "cloudflare"),
            ("content-length", "123"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("trailer", "x-checksum"),
            ("upgrade", "h2c"),
        ];
        // What the client library reads: the request id, when and whether to
        // retry, and the body's type and encoding (forwarded as received).
        let kept = [
            ("request-id", "req_011"),
            ("retry-after", "30"),
            ("x-should-retry", "true"),
            ("content-type", "text/event-stream"),
            ("content-encoding", "gzip"),
            ("anthropic-beta", "claude-code-20250219"),
        ];
        let upstream: Vec<(&str, &str)> = stripped.iter().chain(kept.iter()).copied().collect();
        let passed = client_response_headers(&header_map(&upstream));
        for (name, _) in stripped {
            assert!(!passed.contains_key(name), "{name} was passed back");
        }
        let expected: Vec<&str> = kept.iter().map(|(name, _)| *name).collect();
        assert_eq!(names(&passed), expected);
        for (name, value) in kept {
            assert_eq!(passed.get(name).unwrap(), value, "{name}");
        }
    }

    // ---- `send` against a scripted upstream on 127.0.0.1 ----

    /// One scripted answer: status and `retry-after`, if any.
    type Answer = (u16, Option<&'static str>);

    /// One request as the scripted upstream received it.
    struct Seen {
        at: Instant,
        api_key: Option<HeaderValue>,
    }

    /// An upstream that gives its scripted answers in order (200 once they
    /// run out) and records when each request came and with which key.
    #[derive(Clone, Default)]
    struct Scripted {
        answers: Arc<Mutex<VecDeque<Answer>>>,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Scripted {
        /// Serves `answers`; returns the recorder and the base URL.
        async fn serve(answers: &[Answer]) -> (Scripted, String) {
            let scripted = Scripted::default();
            scripted
                .answers
                .lock()
                .unwrap()
                .extend(answers.iter().copied());
            let state = scripted.clone();
            let app = axum::Router::new().fallback(move |headers: HeaderMap| {
                let state = state.clone();
                async move {
                    state.seen.lock().unwrap().push(Seen {
                        at: Instant::now(),
                        api_key: headers.get("x-api-key").cloned(),
                    });
                    let (status, retry_after) = state
                        .answers
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((200, None));
                    let mut response = axum::response::Response::new(axum::body::Body::from("{}"));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    if let Some(seconds) = retry_after {
                        response
                            .headers_mut()
                            .insert(http::header::RETRY_AFTER, HeaderValue::from_static(seconds));
                    }
                    response
                }
            });
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            (scripted, base)
        }

        fn requests(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        fn arrivals(&self) -> Vec<Instant> {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .map(|seen| seen.at)
                .collect()
        }
    }

    const UPSTREAM_KEY: &str = "sk-ant-relay-upstream-key";

    fn upstream(config: UpstreamConfig) -> Upstream {
        let secrets = Secrets::fixed(crate::secrets::SecretValues {
            upstream_api_key: Some(UPSTREAM_KEY.to_owned()),
            upstreams: None,
            ..Default::default()
        });
        Upstream::new(config, secrets).unwrap()
    }

    fn message_request() -> ForwardRequest {
        ForwardRequest {
            method: Method::POST,
            path: CanonicalPath::parse("/v1/messages").unwrap(),
            query: None,
            headers: upstream_request_headers(&header_map(&[("x-api-key", "sk-proxy-client")])),
            body: Bytes::from_static(b"{}"),
        }
    }

    /// Sends one message request through a relay upstream configured by
    /// `adjust`, to an upstream giving `answers`.
    async fn send_to(
        answers: &[Answer],
        policy: RetryPolicy,
        adjust: impl FnOnce(&mut UpstreamConfig),
    ) -> (Result<UpstreamResponse, UpstreamError>, Scripted) {
        let (scripted, base) = Scripted::serve(answers).await;
        let mut config = config(&base);
        config.backoff_base = Duration::from_millis(1);
        adjust(&mut config);
        let result = upstream(config).send(&message_request(), policy).await;
        (result, scripted)
    }

    #[tokio::test]
    async fn retryable_statuses_are_retried_with_the_upstream_key_until_an_answer_is_final() {
        let answers = [
            (429, None),
            (500, None),
            (502, None),
            (503, None),
            (504, None),
            (529, None),
        ];
        let (result, scripted) =
            send_to(&answers, RetryPolicy::Retryable, |c| c.max_attempts = 10).await;
        let response = result.unwrap();
        assert_eq!((response.status, response.retries), (StatusCode::OK, 6));
        assert_eq!(scripted.requests(), 7);
        // Every attempt carries the relay's key, never the client's.
        for seen in scripted.seen.lock().unwrap().iter() {
            assert_eq!(seen.api_key.as_ref().unwrap(), UPSTREAM_KEY);
        }
    }

    #[tokio::test]
    async fn the_last_retryable_answer_is_returned_as_is_once_attempts_run_out() {
        let answers = [(503, None), (529, None), (429, Some("0")), (503, None)];
        let (result, scripted) = send_to(&answers, RetryPolicy::Retryable, |_| {}).await;
        let response = result.unwrap();
        assert_eq!((response.status.as_u16(), response.retries), (429, 2));
        assert_eq!(response.headers["retry-after"], "0");
        assert_eq!(scripted.requests(), 3);
    }

    #[tokio::test]
    async fn one_attempt_means_no_retry() {
        let (result, scripted) = send_to(&[(503, None)], RetryPolicy::Retryable, |c| {
            c.max_attempts = 1
        })
        .await;
        assert_eq!(result.unwrap().status.as_u16(), 503);
        assert_eq!(scripted.requests(), 1);
    }

    #[tokio::test]
    async fn answers_that_are_not_retryable_are_returned_at_once() {
        for status in [400, 404, 408, 413, 501, 505] {
            let (result, scripted) =
                send_to(&[(status, Some("0"))], RetryPolicy::Retryable, |_| {}).await;
            let response = result.unwrap();
            assert_eq!((response.status.as_u16(), response.retries), (status, 0));
            assert_eq!(scripted.requests(), 1, "{status}");
        }
    }

    #[tokio::test]
    async fn unless_processed_retries_only_429_and_529() {
        for status in [500, 502, 503, 504] {
            let (result, scripted) =
                send_to(&[(status, None)], RetryPolicy::UnlessProcessed, |_| {}).await;
            assert_eq!(result.unwrap().status.as_u16(), status);
            assert_eq!(scripted.requests(), 1, "{status} was retried");
        }
        let (result, scripted) = send_to(
            &[(429, None), (529, None)],
            RetryPolicy::UnlessProcessed,
            |_| {},
        )
        .await;
        let response = result.unwrap();
        assert_eq!((response.status, response.retries), (StatusCode::OK, 2));
        assert_eq!(scripted.requests(), 3);
    }

    #[tokio::test]
    async fn retry_after_sets_the_wait_before_the_next_attempt() {
        // The backoff alone would wait at most 1 ms.
        let (result, scripted) =
            send_to(&[(529, Some("0.3"))], RetryPolicy::Retryable, |_| {}).await;
        assert_eq!(result.unwrap().retries, 1);
        let arrivals = scripted.arrivals();
        let waited = arrivals[1] - arrivals[0];
        assert!(waited >= Duration::from_millis(300), "waited {waited:?}");
    }

    #[tokio::test]
    async fn a_wait_beyond_the_retry_budget_returns_the_answer_instead() {
        let started = Instant::now();
        let (result, scripted) = send_to(&[(429, Some("5"))], RetryPolicy::Retryable, |c| {
            c.retry_budget = Duration::from_secs(2);
        })
        .await;
        let response = result.unwrap();
        assert_eq!((response.status.as_u16(), response.retries), (429, 0));
        assert_eq!(response.headers["retry-after"], "5");
        assert_eq!(scripted.requests(), 1);
        assert!(started.elapsed() < Duration::from_secs(2), "it waited");
    }

    #[tokio::test]
    async fn connect_failures_are_retried_up_to_the_attempts() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = config(&format!("http://127.0.0.1:{port}"));
        config.backoff_base = Duration::from_millis(1);
        let error = upstream(config)
            .send(&message_request(), RetryPolicy::UnlessProcessed)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(error, UpstreamError::Unreachable { attempts: 3, .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_connection_lost_after_the_request_left_is_not_retried() {
        // Reads the request, then closes without answering: the upstream may
        // have acted on it.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut buffer = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut buffer).await;
                drop(socket);
            }
        });
        let mut config = config(&base);
        config.backoff_base = Duration::from_millis(1);
        let error = upstream(config)
            .send(&message_request(), RetryPolicy::Retryable)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(error, UpstreamError::Unreachable { attempts: 1, .. }),
            "{error:?}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_401_rereads_the_key_and_tries_once_more() {
        let (result, scripted) = send_to(&[(401, None)], RetryPolicy::Retryable, |_| {}).await;
        let response = result.unwrap();
        assert_eq!((response.status, response.retries), (StatusCode::OK, 1));
        assert_eq!(scripted.requests(), 2);

        let (result, scripted) =
            send_to(&[(401, None), (401, None)], RetryPolicy::Retryable, |_| {}).await;
        assert!(matches!(result, Err(UpstreamError::CredentialsRejected)));
        assert_eq!(scripted.requests(), 2);
    }
}
