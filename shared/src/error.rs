//! The one error type the relay answers with: it knows its HTTP status and its
//! Anthropic error type, and renders Anthropic's error envelope.

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

/// An error the relay itself answers with.
///
/// Client mistakes carry a message that says what was wrong; internal errors
/// say only "internal error" to the client and keep their cause for the log.
#[derive(Debug, thiserror::Error)]
#[error("{status} {}: {message}", kind.as_str())]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorKind,
    pub message: String,
    /// Seconds after which a retry may succeed (`retry-after`).
    pub retry_after: Option<u64>,
    /// `x-should-retry`: SDKs and Claude Code obey it over their own status rules.
    pub should_retry: Option<bool>,
    #[source]
    pub source: Option<anyhow::Error>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: None,
            should_retry: None,
            source: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest, message)
    }

    /// A well-formed request whose content breaks a rule (a field out of range, an unknown tier).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::InvalidRequest,
            message,
        )
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorKind::Authentication, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorKind::Permission, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RequestTooLarge,
            message,
        )
    }

    pub fn rate_limited(message: impl Into<String>, retry_after: u64) -> Self {
        let mut err = Self::new(StatusCode::TOO_MANY_REQUESTS, ErrorKind::RateLimit, message);
        err.retry_after = Some(retry_after.max(1));
        err
    }

    /// A dependency of the relay (DynamoDB, Secrets Manager) is unavailable:
    /// 503 so clients retry, with the cause kept for the log.
    pub fn unavailable(message: impl Into<String>, source: anyhow::Error) -> Self {
        let mut err = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Overloaded,
            message,
        );
        err.retry_after = Some(1);
        err.source = Some(source);
        err
    }

    /// A bug or an unexpected failure: the client learns nothing of the cause.
    pub fn internal(source: anyhow::Error) -> Self {
        let mut err = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Api,
            "internal error",
        );
        err.source = Some(source);
        err
    }

    pub fn with_source(mut self, source: anyhow::Error) -> Self {
        self.source = Some(source);
        self
    }

    pub fn with_should_retry(mut self, should_retry: bool) -> Self {
        self.should_retry = Some(should_retry);
        self
    }

    /// The JSON envelope Anthropic clients parse.
    pub fn envelope(&self) -> serde_json::Value {
        json!({"type": "error", "error": {"type": self.kind.as_str(), "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(source) = &self.source {
            // The whole chain goes to the log, never to the client.
            if self.status.is_server_error() {
                tracing::error!(
                    status = self.status.as_u16(),
                    error = format!("{source:#}"),
                    "request failed"
                );
            } else {
                tracing::warn!(
                    status = self.status.as_u16(),
                    error = format!("{source:#}"),
                    "request rejected"
                );
            }
        }
        let mut response = (self.status, axum::Json(self.envelope())).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(should_retry) = self.should_retry {
            headers.insert(
                "x-should-retry",
                HeaderValue::from_static(if should_retry { "true" } else { "false" }),
            );
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn quota_error_renders_anthropic_envelope_with_retry_headers() {
        let err = ApiError::rate_limited("quota exhausted", 30).with_should_retry(false);
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "30");
        assert_eq!(response.headers()["x-should-retry"], "false");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            json!({"type":"error","error":{"type":"rate_limit_error","message":"quota exhausted"}})
        );
    }

    #[tokio::test]
    async fn internal_error_hides_its_cause() {
        let response = ApiError::internal(anyhow::anyhow!("table xyz broke")).into_response();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains("xyz"));
    }
}
