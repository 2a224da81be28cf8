//! A fake Amazon Bedrock runtime on 127.0.0.1 for the AWS SDK pointed at it
//! by `endpoint_url`: `InvokeModel`, `InvokeModelWithResponseStream` (real
//! event-stream frames whose chunks carry Anthropic's streaming events, the
//! way Bedrock serves Claude) and `CountTokens`; it checks a SigV4
//! `authorization`, records what it got, and can throttle, refuse, fall
//! silent between events or fail mid-stream.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::fake_upstream::Usage;

/// What the fake answers to the next request.
#[derive(Clone, Debug)]
pub enum BedrockBehavior {
    /// A well-behaved answer (stream or JSON) with the configured usage.
    Answer,
    /// 429 `ThrottlingException`, as Bedrock throttles.
    Throttle,
    /// 400 `ValidationException` with this message.
    Invalid(String),
    /// Streams this many events, then a `modelStreamErrorException`.
    FailAfter(usize),
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct BedrockRecorded {
    /// `invoke`, `invoke-with-response-stream` or `count-tokens`.
    pub operation: String,
    /// The model id from the path, percent-decoded.
    pub model_id: String,
    /// The model's body: the request body itself, or for CountTokens the
    /// body it carries in base64.
    pub body: Value,
}

struct Inner {
    queue: VecDeque<BedrockBehavior>,
    usage: Usage,
    /// The events a stream carries instead of the generated ones.
    events: Option<Vec<String>>,
    /// Silence before each event after the first.
    gap: Duration,
    requests: Vec<BedrockRecorded>,
}

struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake Bedrock runtime; dropping it stops the server.
pub struct FakeBedrock {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeBedrock {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeBedrock {
    pub async fn start() -> anyhow::Result<FakeBedrock> {
        FakeBedrock::start_on(0).await
    }

    /// On `port` of 127.0.0.1 (0: a free one).
    pub async fn start_on(port: u16) -> anyhow::Result<FakeBedrock> {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                usage: Usage::new(25, 12, 0, 0),
                events: None,
                gap: Duration::ZERO,
                requests: Vec::new(),
            }),
        });
        let app = Router::new()
            .route("/model/{model_id}/invoke", post(invoke))
            .route(
                "/model/{model_id}/invoke-with-response-stream",
                post(invoke_stream),
            )
            .route("/model/{model_id}/count-tokens", post(count_tokens))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeBedrock {
            addr,
            shared,
            server,
        })
    }

    /// The `endpoint_url` to give the SDK.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn push(&self, behavior: BedrockBehavior) {
        self.shared.lock().queue.push_back(behavior);
    }

    pub fn set_usage(&self, usage: Usage) {
        self.shared.lock().usage = usage;
    }

    /// Streams carry these Anthropic event JSONs (one chunk each) instead.
    pub fn set_events(&self, events: Vec<String>) {
        self.shared.lock().events = Some(events);
    }

    /// Silence before each streamed event after the first.
    pub fn set_gap(&self, gap: Duration) {
        self.shared.lock().gap = gap;
    }

    pub fn requests(&self) -> Vec<BedrockRecorded> {
        self.shared.lock().requests.clone()
    }
}

/// The usage object as Anthropic writes it.
fn usage_json(usage: &Usage, output_tokens: u64) -> Value {
    json!({
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_5m,
            "ephemeral_1h_input_tokens": usage.cache_1h,
        },
        "output_tokens": output_tokens,
    })
}

/// The Anthropic streaming events of a short text answer with `usage`, the
/// last carrying Bedrock's invocation metrics as Bedrock adds them.
pub fn message_events(model_id: &str, usage: &Usage) -> Vec<String> {
    let events = [
        json!({"type": "message_start", "message": {
            "id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": model_id,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": usage_json(usage, 1)}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ", héllo ✓"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": usage.output_tokens}}),
        json!({"type": "message_stop", "amazon-bedrock-invocationMetrics": {
            "inputTokenCount": usage.input_tokens, "outputTokenCount": usage.output_tokens,
            "invocationLatency": 812, "firstByteLatency": 301,
            "cacheReadInputTokenCount": usage.cache_read_input_tokens,
            "cacheWriteInputTokenCount": usage.cache_creation_input_tokens}}),
    ];
    events.iter().map(Value::to_string).collect()
}

/// Bedrock's error answer: status, `x-amzn-errortype`, `{"message": …}`.
fn aws_error(status: StatusCode, error_type: &str, message: &str) -> Response {
    let mut response = (status, json!({ "message": message }).to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        axum::http::HeaderValue::from_static("application/json"),
    );
    if let Ok(value) = axum::http::HeaderValue::from_str(&format!(
        "{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    )) {
        headers.insert("x-amzn-errortype", value);
    }
    response
}

/// What an admitted request is to be answered with.
struct Admitted {
    behavior: BedrockBehavior,
    usage: Usage,
    events: Option<Vec<String>>,
    gap: Duration,
}

/// Checks the SigV4 signature is there and records the request; the
/// behavior to follow, or the refusal to answer.
fn admit(
    shared: &Shared,
    headers: &HeaderMap,
    operation: &str,
    model_id: String,
    body: Value,
) -> Result<Admitted, Box<Response>> {
    let signed = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256"));
    if !signed {
        return Err(Box::new(aws_error(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            "Missing Authentication Token",
        )));
    }
    let mut inner = shared.lock();
    inner.requests.push(BedrockRecorded {
        operation: operation.to_owned(),
        model_id,
        body,
    });
    let behavior = inner.queue.pop_front().unwrap_or(BedrockBehavior::Answer);
    let refusal = match &behavior {
        BedrockBehavior::Throttle => Some(aws_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        )),
        BedrockBehavior::Invalid(message) => Some(aws_error(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            message,
        )),
        _ => None,
    };
    match refusal {
        Some(response) => Err(Box::new(response)),
        None => Ok(Admitted {
            behavior,
            usage: inner.usage,
            events: inner.events.clone(),
            gap: inner.gap,
        }),
    }
}

fn json_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

async fn invoke(
    State(shared): State<Arc<Shared>>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Admitted { usage, .. } = match admit(
        &shared,
        &headers,
        "invoke",
        model_id.clone(),
        json_body(&body),
    ) {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let message = json!({
        "id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": model_id,
        "content": [{"type": "text", "text": "Hello, héllo ✓"}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": usage_json(&usage, usage.output_tokens),
    });
    ([("content-type", "application/json")], message.to_string()).into_response()
}

async fn count_tokens(
    State(shared): State<Arc<Shared>>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = json_body(&body);
    let inner_body = request["input"]["invokeModel"]["body"]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(|b| json_body(&Bytes::from(b)))
        .unwrap_or(Value::Null);
    let Admitted { usage, .. } =
        match admit(&shared, &headers, "count-tokens", model_id, inner_body) {
            Ok(admitted) => admitted,
            Err(refusal) => return *refusal,
        };
    (
        [("content-type", "application/json")],
        json!({ "inputTokens": usage.input_tokens }).to_string(),
    )
        .into_response()
}

/// One event-stream frame.
fn frame(headers: Vec<Header>, payload: Vec<u8>) -> Bytes {
    let message = Message::new_from_parts(headers, payload);
    let mut out = Vec::new();
    // Writing to a Vec cannot fail but for oversized frames, which these
    // are not.
    let _ = aws_smithy_eventstream::frame::write_message_to(&message, &mut out);
    Bytes::from(out)
}

fn string_header(name: &'static str, value: &'static str) -> Header {
    Header::new(name, HeaderValue::String(value.into()))
}

/// A `chunk` event carrying one Anthropic event's JSON, as Bedrock sends it.
fn chunk_frame(event_json: &str) -> Bytes {
    let payload = json!({
        "bytes": base64::engine::general_purpose::STANDARD.encode(event_json),
    });
    frame(
        vec![
            string_header(":event-type", "chunk"),
            string_header(":content-type", "application/json"),
            string_header(":message-type", "event"),
        ],
        payload.to_string().into_bytes(),
    )
}

fn exception_frame(exception_type: &'static str, message: &str) -> Bytes {
    frame(
        vec![
            string_header(":exception-type", exception_type),
            string_header(":content-type", "application/json"),
            string_header(":message-type", "exception"),
        ],
        json!({ "message": message }).to_string().into_bytes(),
    )
}

async fn invoke_stream(
    State(shared): State<Arc<Shared>>,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let admitted = admit(
        &shared,
        &headers,
        "invoke-with-response-stream",
        model_id.clone(),
        json_body(&body),
    );
    let Admitted {
        behavior,
        usage,
        events,
        gap,
    } = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let mut frames: Vec<Bytes> = events
        .unwrap_or_else(|| message_events(&model_id, &usage))
        .iter()
        .map(|event| chunk_frame(event))
        .collect();
    if let BedrockBehavior::FailAfter(n) = behavior {
        frames.truncate(n);
        frames.push(exception_frame(
            "modelStreamErrorException",
            "The model stream failed.",
        ));
    }
    let stream = futures_util::stream::iter(frames.into_iter().enumerate()).then(
        move |(index, frame)| async move {
            if index > 0 && !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            Ok::<Bytes, std::io::Error>(frame)
        },
    );
    (
        [("content-type", "application/vnd.amazon.eventstream")],
        Body::from_stream(stream),
    )
        .into_response()
}
