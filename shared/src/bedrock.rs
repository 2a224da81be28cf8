//! Amazon Bedrock as an upstream, the only module using
//! `aws-sdk-bedrockruntime`: sends a Messages request through
//! `InvokeModel(WithResponseStream)` and answers exactly as Anthropic would
//! (status, headers, SSE or JSON bytes, error envelopes), so the proxy reads
//! a Bedrock answer like any other.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_bedrockruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::primitives::Blob;
use aws_sdk_bedrockruntime::types::{CountTokensInput, InvokeModelTokensRequest, ResponseStream};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::mpsc;

use crate::domain::bedrock::{
    self as rules, AnthropicError, BedrockRequest, BedrockRequestError, PING,
};
use crate::upstream::{BodyStream, UpstreamResponse};

/// Where the Bedrock upstream is and which models it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedrockSettings {
    pub region: String,
    /// Another endpoint than the region's (tests, VPC endpoints).
    pub endpoint_url: Option<String>,
    /// Anthropic model name → Bedrock model id or inference profile.
    pub model_map: BTreeMap<String, String>,
}

/// Why no Anthropic-shaped answer could be made.
#[derive(Debug, thiserror::Error)]
pub enum BedrockSendError {
    /// The request cannot go to Bedrock (unmapped model, not JSON): the
    /// client gets 400 `invalid_request_error` with this text.
    #[error(transparent)]
    Request(#[from] BedrockRequestError),
    /// Bedrock could not be reached or its answer could not be read.
    #[error("could not reach Bedrock: {0}")]
    Unreachable(String),
}

impl BedrockSendError {
    /// The Anthropic status and error type the client should get.
    pub fn anthropic_error(&self) -> AnthropicError {
        match self {
            BedrockSendError::Request(_) => AnthropicError {
                status: 400,
                error_type: "invalid_request_error",
            },
            BedrockSendError::Unreachable(_) => AnthropicError {
                status: 502,
                error_type: "api_error",
            },
        }
    }
}

/// An answer Bedrock gave as an error before any byte reached the client.
struct BedrockFailure {
    code: String,
    message: String,
    retry_after: Option<HeaderValue>,
}

impl BedrockFailure {
    fn of<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> Option<BedrockFailure>
    where
        R: HasHeaders,
    {
        let SdkError::ServiceError(service) = error else {
            return None;
        };
        let code = service.err().code().unwrap_or("InternalServerException");
        Some(BedrockFailure {
            code: code.to_owned(),
            message: service
                .err()
                .message()
                .unwrap_or("Bedrock returned an error")
                .to_owned(),
            retry_after: service.raw().retry_after(),
        })
    }

    fn into_response(self) -> UpstreamResponse {
        let mapped = rules::anthropic_error(&self.code);
        let mut headers = json_headers();
        if let Some(value) = self.retry_after {
            headers.insert(http::header::RETRY_AFTER, value);
        }
        let status =
            StatusCode::from_u16(mapped.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        response(
            status,
            headers,
            rules::error_body(mapped.error_type, &self.message),
        )
    }
}

/// The raw answer of a failed call, for its `retry-after`.
trait HasHeaders {
    fn retry_after(&self) -> Option<HeaderValue>;
}

impl HasHeaders for aws_smithy_runtime_api::http::Response {
    fn retry_after(&self) -> Option<HeaderValue> {
        self.headers()
            .get("retry-after")
            .and_then(|v| HeaderValue::from_str(v).ok())
    }
}

impl HasHeaders for aws_smithy_types::event_stream::RawMessage {
    fn retry_after(&self) -> Option<HeaderValue> {
        None
    }
}

fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers
}

fn response(status: StatusCode, headers: HeaderMap, body: Vec<u8>) -> UpstreamResponse {
    let body: BodyStream = Box::pin(futures_util::stream::once(
        async move { Ok(Bytes::from(body)) },
    ));
    UpstreamResponse {
        status,
        headers,
        body,
        retries: 0,
        // Named by the caller, which knows the upstream's name.
        upstream: String::new(),
    }
}

fn unreachable<E, R>(error: SdkError<E, R>) -> BedrockSendError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    // The chain names the cause (connect, timeout, credentials) without
    // any of the request.
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    BedrockSendError::Unreachable(text)
}

#[derive(Clone)]
pub struct BedrockUpstream {
    client: aws_sdk_bedrockruntime::Client,
    model_map: std::sync::Arc<BTreeMap<String, String>>,
}

impl BedrockUpstream {
    /// A Bedrock upstream with credentials from the default provider chain
    /// (the Lambda role in AWS, environment variables in tests).
    pub async fn new(settings: BedrockSettings) -> BedrockUpstream {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .load()
            .await;
        BedrockUpstream::with_sdk_config(&sdk, settings)
    }

    /// A Bedrock upstream sharing an SDK configuration already loaded;
    /// `settings.region` overrides its region.
    pub fn with_sdk_config(
        sdk: &aws_config::SdkConfig,
        settings: BedrockSettings,
    ) -> BedrockUpstream {
        // No retries inside the SDK: a throttle or an overload goes back at
        // once, so the proxy's failover (another account, another upstream)
        // decides, instead of the SDK waiting on the same one.
        let mut config = aws_sdk_bedrockruntime::config::Builder::from(sdk)
            .region(aws_config::Region::new(settings.region))
            .retry_config(aws_config::retry::RetryConfig::disabled());
        if let Some(endpoint) = settings.endpoint_url {
            config = config.endpoint_url(endpoint);
        }
        BedrockUpstream {
            client: aws_sdk_bedrockruntime::Client::from_conf(config.build()),
            model_map: std::sync::Arc::new(settings.model_map),
        }
    }

    pub fn model_map(&self) -> &BTreeMap<String, String> {
        &self.model_map
    }

    /// Sends a Messages request `body` (with the `anthropic-beta` header
    /// values `beta`) and answers as Anthropic would: a stream of SSE bytes
    /// with the relay's own ping after every `ping_every` of silence, or
    /// the message JSON; Bedrock's errors before the first byte as their
    /// Anthropic status and envelope (with Bedrock's `retry-after`, if
    /// any); an error mid-stream as Anthropic's `error` event, then the end.
    pub async fn send(
        &self,
        body: &[u8],
        beta: &[&str],
        ping_every: Duration,
    ) -> Result<UpstreamResponse, BedrockSendError> {
        let request = rules::bedrock_request(body, beta, &self.model_map)?;
        if request.streamed {
            self.send_streamed(request, ping_every).await
        } else {
            self.send_whole(request).await
        }
    }

    async fn send_whole(
        &self,
        request: BedrockRequest,
    ) -> Result<UpstreamResponse, BedrockSendError> {
        let BedrockRequest {
            model,
            model_id,
            body,
            ..
        } = request;
        let answer = self
            .client
            .invoke_model()
            .model_id(model_id)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(body))
            .send()
            .await;
        match answer {
            Ok(output) => Ok(response(
                StatusCode::OK,
                json_headers(),
                rules::with_model(output.body.into_inner(), &model),
            )),
            Err(error) => match BedrockFailure::of(&error) {
                Some(failure) => Ok(failure.into_response()),
                None => Err(unreachable(error)),
            },
        }
    }

    async fn send_streamed(
        &self,
        request: BedrockRequest,
        ping_every: Duration,
    ) -> Result<UpstreamResponse, BedrockSendError> {
        let BedrockRequest {
            model,
            model_id,
            body,
            ..
        } = request;
        let answer = self
            .client
            .invoke_model_with_response_stream()
            .model_id(model_id)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(body))
            .send()
            .await;
        let output = match answer {
            Ok(output) => output,
            Err(error) => {
                return match BedrockFailure::of(&error) {
                    Some(failure) => Ok(failure.into_response()),
                    None => Err(unreachable(error)),
                };
            }
        };
        // A pump task reads the event stream into a channel, so waiting for
        // the next event can time out (for a ping) without cancelling a read.
        let (sender, mut events) = mpsc::channel::<StreamItem>(16);
        tokio::spawn(pump(output.body, sender, model));
        // The first event decides the status: an exception before any byte
        // is answered as an Anthropic error the proxy can fail over on.
        let first = match tokio::time::timeout(ping_every, events.recv()).await {
            Err(_) => None,
            Ok(None) => Some(StreamItem::Failed(rules::error_event(
                "api_error",
                "Bedrock ended the stream without an event",
            ))),
            Ok(Some(StreamItem::Refused(failure))) => return Ok(failure.into_response()),
            Ok(Some(item)) => Some(item),
        };
        let body = futures_util::stream::unfold(
            (Some(events), first),
            move |(events, pending)| async move {
                let mut events = events?;
                let item = match pending {
                    Some(item) => item,
                    None => match tokio::time::timeout(ping_every, events.recv()).await {
                        Err(_) => {
                            return Some((Ok(Bytes::from_static(PING)), (Some(events), None)));
                        }
                        Ok(None) => return None,
                        Ok(Some(item)) => item,
                    },
                };
                match item {
                    StreamItem::Event(bytes) => {
                        Some((Ok(Bytes::from(bytes)), (Some(events), None)))
                    }
                    StreamItem::Failed(bytes) => Some((Ok(Bytes::from(bytes)), (None, None))),
                    StreamItem::Refused(failure) => {
                        let mapped = rules::anthropic_error(&failure.code);
                        let event = rules::error_event(mapped.error_type, &failure.message);
                        Some((Ok(Bytes::from(event)), (None, None)))
                    }
                }
            },
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        Ok(UpstreamResponse {
            status: StatusCode::OK,
            headers,
            body: Box::pin(body),
            retries: 0,
            upstream: String::new(),
        })
    }

    /// Counts the input tokens of a Messages `body` through Bedrock's
    /// CountTokens: `{"input_tokens": N}` as Anthropic answers, or Bedrock's
    /// error as Anthropic's envelope.
    pub async fn count_tokens(
        &self,
        body: &[u8],
        beta: &[&str],
    ) -> Result<UpstreamResponse, BedrockSendError> {
        let request = rules::bedrock_request(body, beta, &self.model_map)?;
        let input = InvokeModelTokensRequest::builder()
            .body(Blob::new(request.body.clone()))
            .build()
            .map_err(|e| BedrockSendError::Unreachable(e.to_string()))?;
        let answer = self
            .client
            .count_tokens()
            .model_id(request.model_id.as_str())
            .input(CountTokensInput::InvokeModel(input))
            .send()
            .await;
        match answer {
            Ok(output) => {
                let body =
                    serde_json::to_vec(&serde_json::json!({ "input_tokens": output.input_tokens }))
                        .unwrap_or_default();
                Ok(response(StatusCode::OK, json_headers(), body))
            }
            Err(error) => match BedrockFailure::of(&error) {
                Some(failure) => Ok(failure.into_response()),
                None => Err(unreachable(error)),
            },
        }
    }

    /// The `/v1/models` list body for the models this upstream serves, in
    /// name order. Bedrock says nothing of release dates, so `created_at`
    /// is the epoch.
    pub fn models(&self) -> serde_json::Value {
        models_list(&self.model_map)
    }
}

/// The `/v1/models` body for the names of `model_map`.
pub fn models_list(model_map: &BTreeMap<String, String>) -> serde_json::Value {
    let data: Vec<serde_json::Value> = model_map
        .keys()
        .map(|id| {
            serde_json::json!({
                "type": "model",
                "id": id,
                "display_name": id,
                "created_at": "1970-01-01T00:00:00Z",
            })
        })
        .collect();
    serde_json::json!({
        "data": data,
        "has_more": false,
        "first_id": model_map.keys().next(),
        "last_id": model_map.keys().next_back(),
    })
}

/// One step of a Bedrock stream, already rendered where it can be.
enum StreamItem {
    /// An Anthropic SSE event.
    Event(Vec<u8>),
    /// Bedrock's exception event, or an error reading the stream: ends it.
    Refused(BedrockFailure),
    /// A rendered `error` event that ends the stream.
    Failed(Vec<u8>),
}

async fn pump(
    mut receiver: aws_sdk_bedrockruntime::primitives::event_stream::EventReceiver<
        ResponseStream,
        aws_sdk_bedrockruntime::types::error::ResponseStreamError,
    >,
    sender: mpsc::Sender<StreamItem>,
    model: String,
) {
    loop {
        let next = tokio::select! {
            // The client left: stop reading Bedrock.
            () = sender.closed() => return,
            next = receiver.recv() => next,
        };
        let item = match next {
            Ok(None) => return,
            Ok(Some(ResponseStream::Chunk(part))) => {
                let bytes = part.bytes.map(Blob::into_inner).unwrap_or_default();
                match rules::sse_event(&bytes, &model) {
                    Ok(event) => StreamItem::Event(event),
                    Err(error) => {
                        tracing::warn!(%error, "unreadable Bedrock stream chunk");
                        StreamItem::Failed(rules::error_event(
                            "api_error",
                            "Bedrock sent an unreadable stream event",
                        ))
                    }
                }
            }
            Ok(Some(_)) => continue,
            Err(error) => match BedrockFailure::of(&error) {
                Some(failure) => StreamItem::Refused(failure),
                None => {
                    tracing::warn!(error = %unreachable(error), "Bedrock stream lost");
                    StreamItem::Failed(rules::error_event(
                        "api_error",
                        "the connection to Bedrock was lost",
                    ))
                }
            },
        };
        let last = !matches!(item, StreamItem::Event(_));
        if sender.send(item).await.is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_models_list_is_anthropics_shape_in_name_order() {
        let map: BTreeMap<String, String> = [
            (
                "claude-sonnet-4-5",
                "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            ),
            (
                "claude-haiku-4-5",
                "us.anthropic.claude-haiku-4-5-20251001-v1:0",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            models_list(&map).to_string(),
            r#"{"data":[{"type":"model","id":"claude-haiku-4-5","display_name":"claude-haiku-4-5","created_at":"1970-01-01T00:00:00Z"},{"type":"model","id":"claude-sonnet-4-5","display_name":"claude-sonnet-4-5","created_at":"1970-01-01T00:00:00Z"}],"has_more":false,"first_id":"claude-haiku-4-5","last_id":"claude-sonnet-4-5"}"#
        );
        assert_eq!(
            models_list(&BTreeMap::new()).to_string(),
            r#"{"data":[],"has_more":false,"first_id":null,"last_id":null}"#
        );
    }
}
