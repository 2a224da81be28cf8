//! The one error type the relay answers with. Each variant knows where the
//! fault lies (the client, the upstream, the relay itself) and whether a
//! retry can help; one `match` (`ApiError::rendering`) turns that into the
//! HTTP status, Anthropic's error type, `retry-after`, `x-should-retry` and
//! the dashboard's rejection reason.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde_json::json;

/// Anthropic's `error.type` values (the ones clients branch on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    Permission,
    NotFound,
    RequestTooLarge,
    RateLimit,
    Api,
    Overloaded,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::Permission => "permission_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::RateLimit => "rate_limit_error",
            ErrorKind::Api => "api_error",
            ErrorKind::Overloaded => "overloaded_error",
        }
    }
}

/// Where the fault lies (pingora's error sources, at this scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request: it must change before it can pass.
    Downstream,
    /// The Anthropic API gave no usable answer.
    Upstream,
    /// The relay or one of its own dependencies (DynamoDB, Secrets Manager).
    Internal,
}

/// What a client should do about the error; SDKs and Claude Code obey
/// `x-should-retry` over their own status rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// `retry-after: <seconds>`: the same request can pass after that.
    After(u64),
    /// `x-should-retry: false`: the same request cannot pass.
    Never,
    /// No header: the client's own rules for the status apply.
    ClientRules,
}

/// An error the relay itself answers with.
///
/// Client mistakes carry a message that says what was wrong; internal errors
/// say only "internal error" to the client and keep their cause for the log.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 415: the body is not in the media type the route reads.
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    /// 405: the path exists, the method does not.
    #[error("method not allowed: {0}")]
    MethodNotAllowed(String),
    /// 422: well-formed, but its content breaks a rule (a field out of
    /// range, an unknown tier).
    #[error("unprocessable: {0}")]
    Unprocessable(String),
    /// 401: no valid credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// 403: valid credentials that may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 404.
    #[error("not found: {0}")]
    NotFound(String),
    /// 413: over the relay's (Lambda's) payload limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// 429 that passes after a wait: a tier's window, the login lockout.
    #[error("rate limited: {message}")]
    RateLimited { message: String, retry_after: u64 },
    /// 429 that no wait fixes: a spent quota, a worst case that cannot fit.
    #[error("quota: {0}")]
    QuotaExhausted(String),
    /// 429 that waits for a period's reset: a spent dollar limit (its
    /// message names the window and the reset; no `retry-after`: the wait
    /// can be days).
    #[error("budget: {0}")]
    BudgetSpent(String),
    /// 502: the upstream could not be reached.
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    /// 504: the upstream did not answer in time.
    #[error("upstream timeout after {0:?}")]
    UpstreamTimeout(Duration),
    /// 502: the upstream refused the relay's own credentials; only an
    /// admin can fix that.
    #[error("upstream rejected the relay's credentials")]
    UpstreamCredentialsRejected,
    /// 503: no upstream credentials are configured.
    #[error("no upstream credentials")]
    NoUpstreamCredentials,
    /// 502: the upstream answered, but not usably (cut, unreadable, an
    /// unexpected status for a relay-side call).
    #[error("upstream failed: {0}")]
    UpstreamFailed(String),
    /// 503: a dependency of the relay is unavailable; retry shortly.
    #[error("unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: anyhow::Error,
    },
    /// 500: a bug or an unexpected failure; the client learns nothing of it.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// Everything an error's answer is made of, derived in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rendering {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub retry: Retry,
    pub side: Side,
    /// The `Reason` dimension of the `Rejections` metric.
    pub reason: &'static str,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    pub fn unprocessable(message: impl Into<String>) -> Self {
        ApiError::Unprocessable(message.into())
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::Unauthenticated(message.into())
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::Forbidden(message.into())
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::NotFound(message.into())
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        ApiError::TooLarge(message.into())
    }

    /// A refusal that passes after a wait. Its `retry-after` is at most
    /// [`MOST_RETRY_AFTER`] seconds, however long the wait really is (the
    /// message says that): Claude Code stops retrying at once on a longer
    /// one, and a transient throttle should be waited out.
    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        ApiError::RateLimited {
            message: message.into(),
            retry_after: retry_after.clamp(1, MOST_RETRY_AFTER),
        }
    }

    pub fn unavailable(message: impl Into<String>, source: anyhow::Error) -> Self {
        ApiError::Unavailable {
            message: message.into(),
            source,
        }
    }

    pub fn internal(source: anyhow::Error) -> Self {
        ApiError::Internal(source)
    }

    /// A relay key that does not match a stored one: nothing says which
    /// part was wrong.
    pub fn invalid_key() -> Self {
        ApiError::unauthorized("invalid API key")
    }

    /// The one mapping from error to answer.
    pub fn rendering(&self) -> Rendering {
        use ErrorKind as K;
        use Side::{Downstream, Internal, Upstream};
        let (status, kind, retry, side, reason) = match self {
            ApiError::BadRequest(_) => (
                StatusCode::BAD_REQUEST,
                K::InvalidRequest,
                Retry::ClientRules,
                Downstream,
                "invalid_request",
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                K::InvalidRequest,
                Retry::ClientRules,
                Downstream,
                "invalid_request",
            ),
            ApiError::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                K::InvalidRequest,
                Retry::ClientRules,
                Downstream,
                "invalid_request",
            ),
            ApiError::Unprocessable(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                K::InvalidRequest,
                Retry::ClientRules,
                Downstream,
                "invalid_request",
            ),
            ApiError::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                K::Authentication,
                Retry::ClientRules,
                Downstream,
                "authentication",
            ),
            // A disabled or expired key, a model or address not allowed:
            // no retry changes that.
            ApiError::Forbidden(_) => (
                StatusCode::FORBIDDEN,
                K::Permission,
                Retry::Never,
                Downstream,
                "permission",
            ),
            ApiError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                K::NotFound,
                Retry::ClientRules,
                Downstream,
                "invalid_request",
            ),
            ApiError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                K::RequestTooLarge,
                Retry::ClientRules,
                Downstream,
                "too_large",
            ),
            ApiError::RateLimited { retry_after, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                K::RateLimit,
                Retry::After(*retry_after),
                Downstream,
                "rate_limit",
            ),
            // 429 is what clients expect of a spent budget; with
            // x-should-retry: false and no retry-after, Claude Code and the
            // SDKs stop instead of retrying a request that cannot pass.
            ApiError::QuotaExhausted(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                K::RateLimit,
                Retry::Never,
                Downstream,
                "quota",
            ),
            ApiError::BudgetSpent(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                K::RateLimit,
                Retry::Never,
                Downstream,
                "budget",
            ),
            ApiError::UpstreamUnreachable => (
                StatusCode::BAD_GATEWAY,
                K::Api,
                Retry::ClientRules,
                Upstream,
                "unavailable",
            ),
            ApiError::UpstreamTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                K::Api,
                Retry::ClientRules,
                Upstream,
                "unavailable",
            ),
            ApiError::UpstreamCredentialsRejected => (
                StatusCode::BAD_GATEWAY,
                K::Api,
                Retry::Never,
                Upstream,
                "unavailable",
            ),
            ApiError::NoUpstreamCredentials => (
                StatusCode::SERVICE_UNAVAILABLE,
                K::Api,
                Retry::Never,
                Upstream,
                "unavailable",
            ),
            ApiError::UpstreamFailed(_) => (
                StatusCode::BAD_GATEWAY,
                K::Api,
                Retry::ClientRules,
                Upstream,
                "unavailable",
            ),
            ApiError::Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                K::Overloaded,
                Retry::After(1),
                Internal,
                "unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                K::Api,
                Retry::ClientRules,
                Internal,
                "unavailable",
            ),
        };
        Rendering {
            status,
            kind,
            retry,
            side,
            reason,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.rendering().status
    }

    pub fn kind(&self) -> ErrorKind {
        self.rendering().kind
    }

    /// What the client reads in the envelope.
    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::Unprocessable(m)
            | ApiError::Unauthenticated(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::TooLarge(m)
            | ApiError::QuotaExhausted(m)
            | ApiError::BudgetSpent(m)
            | ApiError::UpstreamFailed(m)
            | ApiError::RateLimited { message: m, .. }
            | ApiError::Unavailable { message: m, .. } => m.clone(),
            ApiError::UpstreamUnreachable => {
                "the relay could not reach the Anthropic API; retry shortly".into()
            }
            ApiError::UpstreamTimeout(after) => format!(
                "the Anthropic API did not answer within {} seconds",
                after.as_secs()
            ),
            ApiError::UpstreamCredentialsRejected => "the Anthropic API rejected the relay's upstream key; ask your relay admin to update it".into(),
            ApiError::NoUpstreamCredentials => {
                "the relay has no upstream API key configured; ask your relay admin".into()
            }
            ApiError::Internal(_) => "internal error".into(),
        }
    }

    /// The JSON envelope Anthropic clients parse.
    pub fn envelope(&self) -> serde_json::Value {
        envelope(self.kind(), &self.message())
    }

    /// The cause kept for the log, never shown to the client.
    fn cause(&self) -> Option<&anyhow::Error> {
        match self {
            ApiError::Unavailable { source, .. } | ApiError::Internal(source) => Some(source),
            _ => None,
        }
    }
}

/// Anthropic's error envelope for `kind` and `message` (also what the relay
/// puts in an SSE `error` event once a stream has begun).
pub fn envelope(kind: ErrorKind, message: &str) -> serde_json::Value {
    json!({"type": "error", "error": {"type": kind.as_str(), "message": message}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let rendering = self.rendering();
        if let Some(source) = self.cause() {
            // The whole chain goes to the log, never to the client.
            tracing::error!(
                status = rendering.status.as_u16(),
                side = ?rendering.side,
                error = format!("{source:#}"),
                "request failed"
            );
        }
        let mut response = (rendering.status, axum::Json(self.envelope())).into_response();
        let headers = response.headers_mut();
        match rendering.retry {
            Retry::After(seconds) => {
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            Retry::Never => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            Retry::ClientRules => {}
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        match err {
            crate::store::StoreError::Unavailable(source) => {
                ApiError::unavailable("the relay's database is unavailable; retry shortly", source)
            }
            crate::store::StoreError::Unexpected(source) => ApiError::internal(source),
        }
    }
}

impl From<crate::upstream::UpstreamError> for ApiError {
    fn from(err: crate::upstream::UpstreamError) -> Self {
        use crate::upstream::UpstreamError as U;
        match err {
            U::Unreachable { .. } => ApiError::UpstreamUnreachable,
            U::Timeout(after) => ApiError::UpstreamTimeout(after),
            U::CredentialsRejected => ApiError::UpstreamCredentialsRejected,
            U::NoCredentials | U::Pool(_) => ApiError::NoUpstreamCredentials,
            U::NotForBedrock(message) => ApiError::bad_request(message),
            U::BedrockUnreachable(_) => ApiError::UpstreamUnreachable,
            U::NoUpstreamFor(model) => ApiError::bad_request(format!(
                "no upstream of this relay serves model `{}`",
                model.chars().take(256).collect::<String>()
            )),
            U::Secrets(err) => err.into(),
            U::PathMismatch(_) => ApiError::bad_request(
                "the request path would not reach the upstream as written; send it in canonical form",
            ),
        }
    }
}

/// One answer for the secret store's failures, whoever read it (the proxy
/// for the upstream key, admin for the password hash and JWT secret).
impl From<crate::secrets::SecretsError> for ApiError {
    fn from(err: crate::secrets::SecretsError) -> Self {
        match err {
            crate::secrets::SecretsError::Unavailable(source) => ApiError::unavailable(
                "the relay's secret store is unavailable; retry shortly",
                source,
            ),
            other => ApiError::internal(other.into()),
        }
    }
}

impl From<crate::domain::key::access::Refusal> for ApiError {
    fn from(refusal: crate::domain::key::access::Refusal) -> Self {
        ApiError::forbidden(refusal.message())
    }
}

/// The longest `retry-after` of a transient refusal: Claude Code waits and
/// retries up to this, and gives up at once beyond it.
pub const MOST_RETRY_AFTER: u64 = 60;

/// Seconds a hard-mode request refused only for what requests in flight
/// reserve is told to wait: most answers settle within that.
const RESERVATION_RETRY_AFTER: u64 = 5;

impl From<crate::domain::admission::AdmissionRefusal> for ApiError {
    fn from(refusal: crate::domain::admission::AdmissionRefusal) -> Self {
        use crate::domain::admission::AdmissionRefusal as A;
        match refusal {
            A::UnknownKey | A::WrongSecret => ApiError::invalid_key(),
            A::Disabled => crate::domain::key::access::Refusal::Disabled.into(),
            A::Expired => crate::domain::key::access::Refusal::Expired.into(),
            A::QuotaExhausted { used, limit } => ApiError::QuotaExhausted(format!(
                "token quota exhausted for this API key ({used} of {limit} tokens used); ask your relay admin to raise its token_limit"
            )),
            A::RateLimited { retry_after } => ApiError::rate_limited(
                format!(
                    "rate limit of this API key's tier reached; retry in {retry_after} seconds"
                ),
                retry_after,
            ),
            A::TokensPerMinute {
                used,
                limit,
                retry_after,
            } => ApiError::rate_limited(
                format!(
                    "tokens-per-minute limit of this API key's tier reached ({used} of {limit} tokens this minute); retry in {retry_after} seconds"
                ),
                retry_after,
            ),
            // Reservations of requests in flight come back when they
            // settle: a worst case that fits once they do is worth a retry.
            A::WorstCaseExceedsQuota { worst, left, held }
                if worst <= left.saturating_add(held) =>
            {
                ApiError::rate_limited(
                    format!(
                        "worst case of {worst} tokens (input estimate plus max_tokens) exceeds the {left} left of this API key's token_limit while {held} are reserved by its requests in flight; retry in {RESERVATION_RETRY_AFTER} seconds"
                    ),
                    RESERVATION_RETRY_AFTER,
                )
            }
            A::WorstCaseExceedsQuota { worst, left, .. } => ApiError::QuotaExhausted(format!(
                "worst case of {worst} tokens (input estimate plus max_tokens, of every request for a batch) exceeds the {left} left of this API key's token_limit; lower max_tokens, shorten the prompt or split the batch, or ask your relay admin to raise the token_limit"
            )),
            A::WorstCaseOverBudget(over) if over.transient() => ApiError::rate_limited(
                format!("{over}; retry in {RESERVATION_RETRY_AFTER} seconds"),
                RESERVATION_RETRY_AFTER,
            ),
            A::WorstCaseOverBudget(over) => ApiError::BudgetSpent(over.to_string()),
            A::LimitModeChanged => ApiError::rate_limited(
                "this API key's limit mode changed while the request was admitted; retry in 1 second",
                1,
            ),
            A::BudgetSpent(spent) => ApiError::BudgetSpent(spent.to_string()),
            // A lease comes back when a request in flight settles: soon.
            A::TooManyConcurrent { limit } => ApiError::rate_limited(
                format!(
                    "this API key already has {limit} requests in flight, its concurrency limit; retry in 2 seconds"
                ),
                2,
            ),
            A::OverTier {
                requests,
                limit,
                period,
            } => ApiError::QuotaExhausted(format!(
                "this batch holds {requests} requests, more than the {limit} per {period} seconds this API key's tier allows; split it"
            )),
        }
    }
}

impl From<crate::store::admission::AdmissionError> for ApiError {
    fn from(err: crate::store::admission::AdmissionError) -> Self {
        match err {
            crate::store::admission::AdmissionError::Refused(refusal) => refusal.into(),
            crate::store::admission::AdmissionError::Store(store) => store.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// One row per variant: what the client and the dashboard see.
    fn expected(
        err: &ApiError,
    ) -> (
        u16,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
        Side,
    ) {
        match err {
            ApiError::BadRequest(_) => (
                400,
                "invalid_request_error",
                None,
                None,
                "invalid_request",
                Side::Downstream,
            ),
            ApiError::UnsupportedMediaType(_) => (
                415,
                "invalid_request_error",
                None,
                None,
                "invalid_request",
                Side::Downstream,
            ),
            ApiError::MethodNotAllowed(_) => (
                405,
                "invalid_request_error",
                None,
                None,
                "invalid_request",
                Side::Downstream,
            ),
            ApiError::Unprocessable(_) => (
                422,
                "invalid_request_error",
                None,
                None,
                "invalid_request",
                Side::Downstream,
            ),
            ApiError::Unauthenticated(_) => (
                401,
                "authentication_error",
                None,
                None,
                "authentication",
                Side::Downstream,
            ),
            ApiError::Forbidden(_) => (
                403,
                "permission_error",
                None,
                Some("false"),
                "permission",
                Side::Downstream,
            ),
            ApiError::NotFound(_) => (
                404,
                "not_found_error",
                None,
                None,
                "invalid_request",
                Side::Downstream,
            ),
            ApiError::TooLarge(_) => (
                413,
                "request_too_large",
                None,
                None,
                "too_large",
                Side::Downstream,
            ),
            ApiError::RateLimited { .. } => (
                429,
                "rate_limit_error",
                Some("30"),
                None,
                "rate_limit",
                Side::Downstream,
            ),
            ApiError::QuotaExhausted(_) => (
                429,
                "rate_limit_error",
                None,
                Some("false"),
                "quota",
                Side::Downstream,
            ),
            ApiError::BudgetSpent(_) => (
                429,
                "rate_limit_error",
                None,
                Some("false"),
                "budget",
                Side::Downstream,
            ),
            ApiError::UpstreamUnreachable => {
                (502, "api_error", None, None, "unavailable", Side::Upstream)
            }
            ApiError::UpstreamTimeout(_) => {
                (504, "api_error", None, None, "unavailable", Side::Upstream)
            }
            ApiError::UpstreamCredentialsRejected => (
                502,
                "api_error",
                None,
                Some("false"),
                "unavailable",
                Side::Upstream,
            ),
            ApiError::NoUpstreamCredentials => (
                503,
                "api_error",
                None,
                Some("false"),
                "unavailable",
                Side::Upstream,
            ),
            ApiError::UpstreamFailed(_) => {
                (502, "api_error", None, None, "unavailable", Side::Upstream)
            }
            ApiError::Unavailable { .. } => (
                503,
                "overloaded_error",
                Some("1"),
                None,
                "unavailable",
                Side::Internal,
            ),
            ApiError::Internal(_) => (500, "api_error", None, None, "unavailable", Side::Internal),
        }
    }

    fn every_variant() -> Vec<ApiError> {
        vec![
            ApiError::bad_request("bad"),
            ApiError::UnsupportedMediaType("json only".into()),
            ApiError::MethodNotAllowed("use POST".into()),
            ApiError::unprocessable("field"),
            ApiError::unauthorized("who"),
            ApiError::forbidden("no"),
            ApiError::not_found("gone"),
            ApiError::too_large("big"),
            ApiError::rate_limited("slow down", 30),
            ApiError::QuotaExhausted("spent".into()),
            ApiError::BudgetSpent("spent today".into()),
            ApiError::UpstreamUnreachable,
            ApiError::UpstreamTimeout(Duration::from_secs(600)),
            ApiError::UpstreamCredentialsRejected,
            ApiError::NoUpstreamCredentials,
            ApiError::UpstreamFailed("cut".into()),
            ApiError::unavailable("db down", anyhow::anyhow!("dynamodb xyz")),
            ApiError::internal(anyhow::anyhow!("table xyz broke")),
        ]
    }

    #[tokio::test]
    async fn every_variant_renders_its_status_type_retry_headers_and_reason() {
        for err in every_variant() {
            let (status, kind, retry_after, should_retry, reason, side) = expected(&err);
            let rendering = err.rendering();
            assert_eq!(rendering.reason, reason, "{err:?}");
            assert_eq!(rendering.side, side, "{err:?}");
            let message = err.message();
            let label = format!("{err:?}");
            let response = err.into_response();
            assert_eq!(response.status().as_u16(), status, "{label}");
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            assert_eq!(header("retry-after").as_deref(), retry_after, "{label}");
            assert_eq!(header("x-should-retry").as_deref(), should_retry, "{label}");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                json,
                json!({"type": "error", "error": {"type": kind, "message": message}}),
                "{label}"
            );
        }
    }

    #[test]
    fn a_rate_limit_never_asks_for_a_zero_second_wait() {
        assert_eq!(
            ApiError::rate_limited("now", 0).rendering().retry,
            Retry::After(1)
        );
    }

    #[tokio::test]
    async fn internal_and_unavailable_errors_hide_their_cause() {
        for err in [
            ApiError::internal(anyhow::anyhow!("table xyz broke")),
            ApiError::unavailable(
                "the relay's database is unavailable",
                anyhow::anyhow!("xyz timed out"),
            ),
        ] {
            let response = err.into_response();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(!String::from_utf8_lossy(&body).contains("xyz"));
        }
    }

    #[test]
    fn the_secret_store_fails_the_same_way_for_the_proxy_and_admin() {
        use crate::secrets::SecretsError;
        use crate::upstream::UpstreamError;
        let unavailable = || SecretsError::Unavailable(anyhow::anyhow!("timeout"));
        let malformed = || SecretsError::Malformed {
            arn: "arn:secret".into(),
            source: serde_json::from_str::<serde_json::Value>("{").unwrap_err(),
        };
        for err in [
            ApiError::from(unavailable()),
            ApiError::from(UpstreamError::Secrets(unavailable())),
        ] {
            // Transient: retried after a second.
            assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(err.rendering().retry, Retry::After(1));
        }
        for err in [
            ApiError::from(malformed()),
            ApiError::from(UpstreamError::Secrets(malformed())),
        ] {
            // A broken secret is the admin's to fix: no retry helps.
            assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(err.message(), "internal error");
        }
    }

    #[test]
    fn a_worst_case_refusal_is_transient_only_when_reservations_in_flight_cause_it() {
        use crate::domain::admission::AdmissionRefusal as A;
        use crate::domain::budget::{SpentLimit, Window, WorstCaseOverBudget};
        let tokens =
            |worst, left, held| ApiError::from(A::WorstCaseExceedsQuota { worst, left, held });
        assert!(matches!(
            tokens(4_001, 4_000, 1),
            ApiError::RateLimited { retry_after: 5, .. }
        ));
        assert!(matches!(
            tokens(4_002, 4_000, 1),
            ApiError::QuotaExhausted(_)
        ));
        let dollars = |held| {
            ApiError::from(A::WorstCaseOverBudget(WorstCaseOverBudget {
                limit: SpentLimit {
                    window: Window::Day,
                    models: None,
                    limit: 5_000_000,
                    used: 4_000_000,
                    resets_at: None,
                    zone: "UTC".into(),
                },
                worst: 2_000_000,
                held,
            }))
        };
        assert!(matches!(
            dollars(1_000_000),
            ApiError::RateLimited { retry_after: 5, .. }
        ));
        assert!(matches!(dollars(999_999), ApiError::BudgetSpent(_)));
    }

    /// Each way admission refuses, as the client sees it: a transient
    /// refusal has an integer `retry-after` of 1 to 60 seconds and no
    /// `x-should-retry: false`; a final one has `x-should-retry: false` and
    /// no `retry-after`.
    #[tokio::test]
    async fn each_admission_refusal_says_whether_to_retry_and_when() {
        use crate::domain::admission::AdmissionRefusal as A;
        use crate::domain::budget::{SpentLimit, Window, WorstCaseOverBudget};
        let spent = SpentLimit {
            window: Window::Day,
            models: None,
            limit: 5_000_000,
            used: 5_000_000,
            resets_at: None,
            zone: "UTC".into(),
        };
        let over = |held| {
            A::WorstCaseOverBudget(WorstCaseOverBudget {
                limit: SpentLimit {
                    used: 4_000_000,
                    ..spent.clone()
                },
                worst: 2_000_000,
                held,
            })
        };
        let transient = [
            A::RateLimited { retry_after: 20 },
            // An hour-long tier window still says at most a minute.
            A::RateLimited { retry_after: 3_000 },
            A::TokensPerMinute {
                used: 10,
                limit: 10,
                retry_after: 17,
            },
            A::TooManyConcurrent { limit: 2 },
            A::WorstCaseExceedsQuota {
                worst: 10,
                left: 5,
                held: 5,
            },
            over(1_000_000),
            A::LimitModeChanged,
        ];
        let finals = [
            A::QuotaExhausted {
                used: 10,
                limit: 10,
            },
            A::WorstCaseExceedsQuota {
                worst: 10,
                left: 5,
                held: 4,
            },
            A::BudgetSpent(spent.clone()),
            over(0),
            A::OverTier {
                requests: 20,
                limit: 10,
                period: 60,
            },
            A::Disabled,
            A::Expired,
        ];
        for refusal in transient {
            let response = ApiError::from(refusal.clone()).into_response();
            let headers = response.headers();
            let retry_after: u64 = headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{refusal:?}: an integer retry-after"));
            assert!(
                (1..=60).contains(&retry_after),
                "{refusal:?}: {retry_after}"
            );
            assert!(headers.get("x-should-retry").is_none(), "{refusal:?}");
        }
        for refusal in finals {
            let response = ApiError::from(refusal.clone()).into_response();
            let headers = response.headers();
            assert!(headers.get("retry-after").is_none(), "{refusal:?}");
            assert_eq!(headers["x-should-retry"], "false", "{refusal:?}");
        }
    }
}
