//! A fake Anthropic API server speaking the real wire format (JSON messages, SSE streams, error
//! envelopes, rate-limit headers), recording every request and misbehaving on demand; used
//! in-process by the integration tests and by the `fake-upstream` binary.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The upstream key the fake accepts unless configured otherwise.
pub const DEFAULT_API_KEY: &str = "sk-ant-fake-upstream-key";
/// Model echoed back when the request names none.
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5-20250929";
/// Value of the `anthropic-organization-id` header the relay must strip.
pub const ORGANIZATION_ID: &str = "9b6c7d1e-4f2a-4c3b-8e5d-0a1b2c3d4e5f";

const THINKING_CHUNKS: [&str; 2] = [
    "The user greets me in several languages; ",
    "a short friendly reply fits.",
];
const SIGNATURE: &str = "EqQBCkgIBxABGAIiQFakeSignatureForRelayTests0123456789abcdefABCDEF==";
const TOOL_NAME: &str = "get_weather";
// Real tool streams open with an empty partial_json and split the JSON mid-token.
const TOOL_JSON_CHUNKS: [&str; 3] = [
    "",
    "{\"location\": \"San Fra",
    "ncisco, CA\", \"unit\": \"celsius\"}",
];
const TOOL_INPUT: &str = r#"{"location":"San Francisco, CA","unit":"celsius"}"#;

/// Token counts reported by a fake message.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// `usage.cache_creation.ephemeral_5m_input_tokens`.
    pub cache_5m: u64,
    /// `usage.cache_creation.ephemeral_1h_input_tokens`.
    pub cache_1h: u64,
}

impl Usage {
    /// Input, output, cache-creation and cache-read counts; no 5m/1h split.
    pub fn new(input: u64, output: u64, cache_creation: u64, cache_read: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: cache_creation,
            cache_read_input_tokens: cache_read,
            ..Usage::default()
        }
    }
}

/// What a successful `POST /v1/messages` answers, and how badly it behaves while doing so.
#[derive(Clone, Debug)]
pub struct MessageSpec {
    pub usage: Usage,
    /// One `text_delta` per entry; joined for the non-streaming answer. Empty: no text block.
    pub text_chunks: Vec<String>,
    /// Put a thinking block (thinking_delta + signature_delta) first.
    pub thinking: bool,
    /// Put a tool_use block (input_json_delta) last; the stop reason becomes `tool_use`.
    pub tool_use: bool,
    /// Number of `message_delta` events; their cumulative `output_tokens` never decrease and the
    /// last equals `usage.output_tokens`. 0 is treated as 1.
    pub usage_steps: usize,
    /// Write the SSE byte stream in pieces of this many bytes, flushing each one.
    pub chunk_split: Option<usize>,
    /// Pause before each SSE event after the first.
    pub event_delay: Duration,
    /// Before each event after a pause, an SSE comment with the wall-clock
    /// time it was written (`: sent_at_us <µs since the epoch>`), so a
    /// client on the same machine can measure each event's delay to it.
    pub stamp_events: bool,
    /// Pause before sending the response headers.
    pub first_byte_delay: Duration,
    /// Abort the connection after this many events (no clean end of the chunked body).
    pub cut_after_events: Option<usize>,
    /// After this many events send an in-stream `overloaded_error` event and end the stream.
    pub error_event_after: Option<usize>,
    /// gzip the body and set `content-encoding: gzip` (streaming: flushed per event).
    pub gzip: bool,
    /// Also put input and cache counts in `message_delta.usage` (newer API shape).
    pub extra_usage_in_delta: bool,
    /// Ignore `usage` and derive it from the request: input = body length / 4,
    /// output = min(max_tokens, 12) (max_tokens defaults to 12), no cache.
    pub usage_from_request: bool,
}

impl Default for MessageSpec {
    fn default() -> Self {
        Self {
            usage: Usage {
                input_tokens: 25,
                output_tokens: 12,
                ..Usage::default()
            },
            text_chunks: ["Hello", ", ", "world", "! ", "héllo ✓ 🌍"]
                .into_iter()
                .map(String::from)
                .collect(),
            thinking: false,
            tool_use: false,
            usage_steps: 1,
            chunk_split: None,
            event_delay: Duration::ZERO,
            stamp_events: false,
            first_byte_delay: Duration::ZERO,
            cut_after_events: None,
            error_event_after: None,
            gzip: false,
            extra_usage_in_delta: false,
            usage_from_request: false,
        }
    }
}

/// How the fake answers one `POST /v1/messages`.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Answer like Anthropic: streaming if the request body has "stream": true, JSON otherwise.
    Message(MessageSpec),
    /// Answer with this HTTP status and an error envelope of this type, with optional
    /// retry-after seconds.
    Error {
        status: u16,
        error_type: String,
        retry_after: Option<u64>,
    },
    /// Accept the request and never answer (hold the connection open until the server stops).
    Hang,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior::Message(MessageSpec::default())
    }
}

impl Behavior {
    /// Shorthand for an error answer without retry-after.
    pub fn error(status: u16, error_type: &str) -> Self {
        Behavior::Error {
            status,
            error_type: error_type.to_owned(),
            retry_after: None,
        }
    }
}

/// How to start a [`FakeUpstream`].
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// The only `x-api-key` accepted.
    pub api_key: String,
    /// Answer 401 to any request carrying an `authorization` header, so tests notice when the
    /// relay leaks the client's credentials upstream.
    pub reject_authorization: bool,
    /// Behavior when the queue is empty.
    pub default_behavior: Behavior,
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_owned(),
            reject_authorization: true,
            default_behavior: Behavior::default(),
            port: 0,
        }
    }
}

/// One request exactly as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// The raw query string (without `?`).
    pub query: Option<String>,
    /// In received order (repeated names stay together), names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of a header, name matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Result<Value> {
        serde_json::from_slice(&self.body)
    }
}

struct Inner {
    // `&'static` so `FakeUpstream::api_key` can hand out a plain `&str` while `set_api_key`
    // rotates it through `&self`; each rotation leaks a few bytes, which tests can afford.
    api_key: &'static str,
    queue: VecDeque<Behavior>,
    default: Behavior,
    requests: Vec<RecordedRequest>,
}

struct Shared {
    inner: Mutex<Inner>,
    reject_authorization: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock must not take every later assertion down.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake Anthropic API on 127.0.0.1. Dropping it stops the server and aborts every
/// open connection, including hanging and half-streamed ones.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<io::Result<()>>,
    kill: watch::Sender<bool>,
}

impl FakeUpstream {
    /// Start on a free port with the default key and behavior.
    pub async fn start() -> anyhow::Result<FakeUpstream> {
        Self::start_with(FakeConfig::default()).await
    }

    /// Start with an explicit configuration.
    pub async fn start_with(config: FakeConfig) -> anyhow::Result<FakeUpstream> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, config.port))
            .await
            .with_context(|| format!("binding fake upstream to 127.0.0.1:{}", config.port))?;
        let addr = listener.local_addr()?;
        let (kill, kill_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                api_key: leak(&config.api_key),
                queue: VecDeque::new(),
                default: config.default_behavior,
                requests: Vec::new(),
            }),
            reject_authorization: config.reject_authorization,
        });
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let listener = KillSwitchListener {
            inner: listener,
            kill: kill_rx,
        };
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(FakeUpstream {
            addr,
            shared,
            server,
            kill,
        })
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `x-api-key` currently accepted.
    pub fn api_key(&self) -> &str {
        self.shared.lock().api_key
    }

    /// Rotate the accepted upstream key.
    pub fn set_api_key(&self, key: &str) {
        self.shared.lock().api_key = leak(key);
    }

    /// Queue a behavior for the next `POST /v1/messages` (FIFO).
    pub fn push(&self, behavior: Behavior) {
        self.shared.lock().queue.push_back(behavior);
    }

    /// Behavior used once the queue is empty.
    pub fn set_default(&self, behavior: Behavior) {
        self.shared.lock().default = behavior;
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.server.abort();
        // Aborting the accept loop leaves the per-connection tasks running; this trips the kill
        // switch inside every accepted socket so they end too.
        self.kill.send_replace(true);
    }
}

fn leak(key: &str) -> &'static str {
    if key == DEFAULT_API_KEY {
        return DEFAULT_API_KEY;
    }
    Box::leak(key.to_owned().into_boxed_str())
}

/// Wraps the TCP listener so every connection can be killed when the fake stops: axum spawns
/// connections on their own tasks, which aborting the server task does not reach.
struct KillSwitchListener {
    inner: TcpListener,
    kill: watch::Receiver<bool>,
}

impl axum::serve::Listener for KillSwitchListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Tiny chunk_split writes must leave at once rather than wait on Nagle.
                    let _ = stream.set_nodelay(true);
                    return (KillableStream::new(stream, self.kill.clone()), addr);
                }
                // Transient (e.g. out of file descriptors): back off rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A TCP stream whose reads and writes fail once the kill switch trips. hyper keeps a read
/// pending while it waits for a handler (to notice client EOF), so even a hanging request's
/// connection wakes up and is dropped.
struct KillableStream {
    inner: TcpStream,
    killed: Pin<Box<dyn Future<Output = ()> + Send>>,
    dead: bool,
}

impl KillableStream {
    fn new(inner: TcpStream, mut kill: watch::Receiver<bool>) -> Self {
        let killed = Box::pin(async move {
            // An error means the sender is gone, i.e. the fake was dropped: also a kill.
            let _ = kill.wait_for(|killed| *killed).await;
        });
        Self {
            inner,
            killed,
            dead: false,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        // The boxed future must not be polled again once it has completed.
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "fake upstream stopped",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The single handler: record, authenticate, route.
async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await;
    let recorded = RecordedRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.as_ref().cloned().unwrap_or_default(),
    };
    let authorization_present = recorded.header("authorization").is_some();
    let key_ok = {
        let mut inner = shared.lock();
        let ok = recorded.header("x-api-key") == Some(inner.api_key);
        inner.requests.push(recorded);
        ok
    };
    let Ok(body) = body else {
        return error_response(400, "invalid_request_error", None, None);
    };
    if shared.reject_authorization && authorization_present {
        // Reaching here means the relay forwarded the client's own credentials.
        return error_response(
            401,
            "authentication_error",
            Some("fake upstream: an authorization header reached the upstream"),
            None,
        );
    }
    if !key_ok {
        return error_response(401, "authentication_error", None, None);
    }

    let path = parts.uri.path();
    match (parts.method.as_str(), path) {
        ("POST", "/v1/messages") => {
            let behavior = {
                let mut inner = shared.lock();
                match inner.queue.pop_front() {
                    Some(b) => b,
                    None => inner.default.clone(),
                }
            };
            answer_message(behavior, &body).await
        }
        ("POST", "/v1/messages/count_tokens") => json_response(
            StatusCode::OK,
            format!("{{\"input_tokens\":{}}}", body.len() / 4),
        ),
        ("GET", "/v1/models") => json_response(StatusCode::OK, models_list()),
        ("GET", _) if path.starts_with("/v1/models/") => {
            match MODELS
                .iter()
                .find(|m| path == format!("/v1/models/{}", m.0))
            {
                Some(m) => json_response(StatusCode::OK, model_json(m)),
                None => error_response(404, "not_found_error", None, None),
            }
        }
        _ => error_response(404, "not_found_error", None, None),
    }
}

async fn answer_message(behavior: Behavior, body: &[u8]) -> Response {
    let spec = match behavior {
        Behavior::Message(spec) => spec,
        Behavior::Error {
            status,
            error_type,
            retry_after,
        } => return error_response(status, &error_type, None, retry_after),
        Behavior::Hang => return std::future::pending().await,
    };
    if !spec.first_byte_delay.is_zero() {
        tokio::time::sleep(spec.first_byte_delay).await;
    }
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL);
    let usage = if spec.usage_from_request {
        usage_from_request(&request, body.len())
    } else {
        spec.usage
    };
    let message = MessageParts {
        id: format!("msg_01{}", random_id(22)),
        tool_id: format!("toolu_01{}", random_id(22)),
        model,
        usage,
        spec: &spec,
    };
    let result = if request.get("stream").and_then(Value::as_bool) == Some(true) {
        stream_response(&message)
    } else {
        plain_response(&message)
    };
    result.unwrap_or_else(|_| error_response(500, "api_error", None, None))
}

/// The deterministic usage rule of the binary; see [`MessageSpec::usage_from_request`].
pub fn usage_from_request(request: &Value, body_len: usize) -> Usage {
    let max_tokens = request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(12);
    Usage {
        input_tokens: body_len as u64 / 4,
        output_tokens: max_tokens.min(12),
        ..Usage::default()
    }
}

struct MessageParts<'a> {
    id: String,
    tool_id: String,
    model: &'a str,
    usage: Usage,
    spec: &'a MessageSpec,
}

impl MessageParts<'_> {
    fn stop_reason(&self) -> &'static str {
        if self.spec.tool_use {
            "tool_use"
        } else {
            "end_turn"
        }
    }
}

/// A JSON string literal.
fn js(s: &str) -> String {
    Value::from(s).to_string()
}

// JSON is written by hand rather than through serde_json::json! so keys come out in Anthropic's
// order (serde_json sorts them), in case the relay scans bytes rather than parsing.
fn usage_json(u: &Usage, output_tokens: u64) -> String {
    format!(
        concat!(
            r#"{{"input_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{},"#,
            r#""cache_creation":{{"ephemeral_5m_input_tokens":{},"ephemeral_1h_input_tokens":{}}},"#,
            r#""output_tokens":{},"service_tier":"standard"}}"#
        ),
        u.input_tokens,
        u.cache_creation_input_tokens,
        u.cache_read_input_tokens,
        u.cache_5m,
        u.cache_1h,
        output_tokens
    )
}

fn plain_response(m: &MessageParts<'_>) -> io::Result<Response> {
    let mut content = Vec::new();
    if m.spec.thinking {
        content.push(format!(
            r#"{{"type":"thinking","thinking":{},"signature":{}}}"#,
            js(&THINKING_CHUNKS.concat()),
            js(SIGNATURE)
        ));
    }
    if !m.spec.text_chunks.is_empty() {
        content.push(format!(
            r#"{{"type":"text","text":{}}}"#,
            js(&m.spec.text_chunks.concat())
        ));
    }
    if m.spec.tool_use {
        content.push(format!(
            r#"{{"type":"tool_use","id":{},"name":{},"input":{}}}"#,
            js(&m.tool_id),
            js(TOOL_NAME),
            TOOL_INPUT
        ));
    }
    let json = format!(
        r#"{{"id":{},"type":"message","role":"assistant","model":{},"content":[{}],"stop_reason":{},"stop_sequence":null,"usage":{}}}"#,
        js(&m.id),
        js(m.model),
        content.join(","),
        js(m.stop_reason()),
        usage_json(&m.usage, m.usage.output_tokens)
    );
    let mut headers = success_headers("application/json");
    let body = if m.spec.gzip {
        headers.push(("content-encoding", "gzip".to_owned()));
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(json.as_bytes())?;
        enc.finish()?
    } else {
        json.into_bytes()
    };
    Ok(build(StatusCode::OK, headers, Body::from(body)))
}

fn sse(event: &str, data: &str) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// Every event of a complete, well-behaved stream, already framed.
fn stream_events(m: &MessageParts<'_>) -> Vec<String> {
    let spec = m.spec;
    let mut events = vec![sse(
        "message_start",
        &format!(
            r#"{{"type":"message_start","message":{{"id":{},"type":"message","role":"assistant","model":{},"content":[],"stop_reason":null,"stop_sequence":null,"usage":{}}}}}"#,
            js(&m.id),
            js(m.model),
            usage_json(&m.usage, 1)
        ),
    )];
    // Anthropic sends its ping right after the first content_block_start; the space inside is
    // verbatim from the real stream.
    let ping = sse("ping", r#"{"type": "ping"}"#);
    let mut pinged = false;
    let mut index = 0usize;
    let mut block = |start: String, deltas: Vec<String>, events: &mut Vec<String>| {
        events.push(sse(
            "content_block_start",
            &format!(r#"{{"type":"content_block_start","index":{index},"content_block":{start}}}"#),
        ));
        if !pinged {
            events.push(ping.clone());
            pinged = true;
        }
        for delta in deltas {
            events.push(sse(
                "content_block_delta",
                &format!(r#"{{"type":"content_block_delta","index":{index},"delta":{delta}}}"#),
            ));
        }
        events.push(sse(
            "content_block_stop",
            &format!(r#"{{"type":"content_block_stop","index":{index}}}"#),
        ));
        index += 1;
    };
    if spec.thinking {
        let mut deltas: Vec<String> = THINKING_CHUNKS
            .iter()
            .map(|t| format!(r#"{{"type":"thinking_delta","thinking":{}}}"#, js(t)))
            .collect();
        deltas.push(format!(
            r#"{{"type":"signature_delta","signature":{}}}"#,
            js(SIGNATURE)
        ));
        block(
            r#"{"type":"thinking","thinking":"","signature":""}"#.to_owned(),
            deltas,
            &mut events,
        );
    }
    if !spec.text_chunks.is_empty() {
        let deltas = spec
            .text_chunks
            .iter()
            .map(|t| format!(r#"{{"type":"text_delta","text":{}}}"#, js(t)))
            .collect();
        block(
            r#"{"type":"text","text":""}"#.to_owned(),
            deltas,
            &mut events,
        );
    }
    if spec.tool_use {
        let deltas = TOOL_JSON_CHUNKS
            .iter()
            .map(|p| format!(r#"{{"type":"input_json_delta","partial_json":{}}}"#, js(p)))
            .collect();
        block(
            format!(
                r#"{{"type":"tool_use","id":{},"name":{},"input":{{}}}}"#,
                js(&m.tool_id),
                js(TOOL_NAME)
            ),
            deltas,
            &mut events,
        );
    }
    if !pinged {
        events.push(ping);
    }
    let steps = spec.usage_steps.max(1) as u64;
    let u = &m.usage;
    for step in 1..=steps {
        // Cumulative, as the real API reports it: a relay that sums deltas over-counts.
        let output = u.output_tokens * step / steps;
        let usage = if spec.extra_usage_in_delta {
            format!(
                r#"{{"input_tokens":{},"cache_creation_input_tokens":{},"cache_read_input_tokens":{},"output_tokens":{output}}}"#,
                u.input_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens
            )
        } else {
            format!(r#"{{"output_tokens":{output}}}"#)
        };
        events.push(sse(
            "message_delta",
            &format!(
                r#"{{"type":"message_delta","delta":{{"stop_reason":{},"stop_sequence":null}},"usage":{usage}}}"#,
                js(m.stop_reason())
            ),
        ));
    }
    events.push(sse("message_stop", r#"{"type":"message_stop"}"#));
    events
}

/// One step of a streamed body.
enum Piece {
    Delay(Duration),
    /// Return Pending once so hyper flushes what it has before the next piece.
    Yield,
    Data(Bytes),
    /// The `sent_at_us` comment, rendered when it is written.
    Stamp,
    /// Make the body fail, which makes hyper abort the connection mid-body.
    Abort,
}

fn stream_response(m: &MessageParts<'_>) -> io::Result<Response> {
    let spec = m.spec;
    let mut events = stream_events(m);
    if let Some(n) = spec.error_event_after {
        events.truncate(n);
        events.push(sse(
            "error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ));
    }
    if let Some(n) = spec.cut_after_events {
        events.truncate(n);
    }

    // Segments of the wire stream; the bool marks the start of an event (delays go there).
    let mut segments: Vec<(Vec<u8>, bool)> = Vec::with_capacity(events.len() + 1);
    if spec.gzip {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        for event in &events {
            enc.write_all(event.as_bytes())?;
            // Sync flush per event so a client can decode each event as it arrives.
            enc.flush()?;
            segments.push((std::mem::take(enc.get_mut()), true));
        }
        if spec.cut_after_events.is_none() {
            segments.push((enc.finish()?, false));
        }
    } else {
        segments.extend(events.into_iter().map(|e| (e.into_bytes(), true)));
    }

    let mut pieces = Vec::new();
    let mut started = false;
    let mut delay_due = |starts_event: bool, pieces: &mut Vec<Piece>| {
        if starts_event {
            if started && !spec.event_delay.is_zero() {
                pieces.push(Piece::Delay(spec.event_delay));
            }
            started = true;
        }
    };
    match spec.chunk_split {
        Some(n) if n > 0 => {
            let mut wire = Vec::new();
            let mut starts = Vec::new();
            for (bytes, starts_event) in segments {
                if starts_event {
                    starts.push(wire.len());
                }
                wire.extend_from_slice(&bytes);
            }
            let wire = Bytes::from(wire);
            let mut next_start = starts.iter().peekable();
            for offset in (0..wire.len()).step_by(n) {
                let end = (offset + n).min(wire.len());
                // The delay precedes the piece in which an event begins.
                let mut begins = false;
                while next_start.next_if(|&&s| s < end).is_some() {
                    begins = true;
                }
                delay_due(begins, &mut pieces);
                pieces.push(Piece::Data(wire.slice(offset..end)));
                pieces.push(Piece::Yield);
            }
        }
        _ => {
            for (bytes, starts_event) in segments {
                delay_due(starts_event, &mut pieces);
                if spec.stamp_events && matches!(pieces.last(), Some(Piece::Delay(_))) {
                    pieces.push(Piece::Stamp);
                }
                pieces.push(Piece::Data(Bytes::from(bytes)));
            }
        }
    }
    if spec.cut_after_events.is_some() {
        // Let hyper write out the events before the failure tears the connection down.
        pieces.push(Piece::Yield);
        pieces.push(Piece::Abort);
    }

    let stream = futures_util::stream::unfold(pieces.into_iter(), |mut pieces| async move {
        loop {
            match pieces.next()? {
                Piece::Delay(d) => tokio::time::sleep(d).await,
                Piece::Yield => tokio::task::yield_now().await,
                Piece::Data(bytes) => return Some((Ok(bytes), pieces)),
                Piece::Stamp => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    let stamp = format!(": sent_at_us {}\n\n", now.as_micros());
                    return Some((Ok(Bytes::from(stamp)), pieces));
                }
                Piece::Abort => {
                    let err = io::Error::new(io::ErrorKind::ConnectionAborted, "fake cut");
                    return Some((Err(err), pieces));
                }
            }
        }
    });
    let mut headers = success_headers("text/event-stream; charset=utf-8");
    headers.push(("cache-control", "no-cache".to_owned()));
    if spec.gzip {
        headers.push(("content-encoding", "gzip".to_owned()));
    }
    Ok(build(StatusCode::OK, headers, Body::from_stream(stream)))
}

fn success_headers(content_type: &str) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("content-type", content_type.to_owned()),
        ("request-id", request_id()),
        ("anthropic-organization-id", ORGANIZATION_ID.to_owned()),
    ];
    headers.extend(ratelimit_headers());
    headers
}

fn ratelimit_headers() -> Vec<(&'static str, String)> {
    let reset = "2030-01-01T00:00:00Z".to_owned();
    vec![
        ("anthropic-ratelimit-requests-limit", "4000".to_owned()),
        ("anthropic-ratelimit-requests-remaining", "3999".to_owned()),
        ("anthropic-ratelimit-requests-reset", reset.clone()),
        (
            "anthropic-ratelimit-input-tokens-limit",
            "400000".to_owned(),
        ),
        (
            "anthropic-ratelimit-input-tokens-remaining",
            "399000".to_owned(),
        ),
        ("anthropic-ratelimit-input-tokens-reset", reset.clone()),
        (
            "anthropic-ratelimit-output-tokens-limit",
            "80000".to_owned(),
        ),
        (
            "anthropic-ratelimit-output-tokens-remaining",
            "79000".to_owned(),
        ),
        ("anthropic-ratelimit-output-tokens-reset", reset.clone()),
        ("anthropic-ratelimit-tokens-limit", "480000".to_owned()),
        ("anthropic-ratelimit-tokens-remaining", "478000".to_owned()),
        ("anthropic-ratelimit-tokens-reset", reset),
    ]
}

fn default_error_message(error_type: &str) -> &'static str {
    match error_type {
        "invalid_request_error" => "Invalid request",
        "authentication_error" => "invalid x-api-key",
        "permission_error" => {
            "Your API key does not have permission to use the specified resource."
        }
        "not_found_error" => "Not found",
        "request_too_large" => "Request exceeds the maximum allowed number of bytes.",
        "rate_limit_error" => "Number of request tokens has exceeded your per-minute rate limit",
        "api_error" => "Internal server error",
        "overloaded_error" => "Overloaded",
        _ => "Error",
    }
}

/// An Anthropic error envelope with `request-id` (and `retry-after` when given).
fn error_response(
    status: u16,
    error_type: &str,
    message: Option<&str>,
    retry_after: Option<u64>,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let request_id = request_id();
    let body = format!(
        r#"{{"type":"error","error":{{"type":{},"message":{}}},"request_id":{}}}"#,
        js(error_type),
        js(message.unwrap_or_else(|| default_error_message(error_type))),
        js(&request_id)
    );
    let mut headers = vec![
        ("content-type", "application/json".to_owned()),
        ("request-id", request_id),
    ];
    if status == StatusCode::TOO_MANY_REQUESTS {
        headers.extend(ratelimit_headers());
    }
    if let Some(secs) = retry_after {
        headers.push(("retry-after", secs.to_string()));
    }
    build(status, headers, Body::from(body))
}

fn json_response(status: StatusCode, json: String) -> Response {
    let headers = vec![
        ("content-type", "application/json".to_owned()),
        ("request-id", request_id()),
    ];
    build(status, headers, Body::from(json))
}

fn build(status: StatusCode, headers: Vec<(&'static str, String)>, body: Body) -> Response {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// (id, display_name, created_at), newest first like the real listing.
const MODELS: [(&str, &str, &str); 3] = [
    (
        "claude-haiku-4-5-20251001",
        "Claude Haiku 4.5",
        "2025-10-15T00:00:00Z",
    ),
    (
        "claude-sonnet-4-5-20250929",
        "Claude Sonnet 4.5",
        "2025-09-29T00:00:00Z",
    ),
    (
        "claude-opus-4-1-20250805",
        "Claude Opus 4.1",
        "2025-08-05T00:00:00Z",
    ),
];

fn model_json(m: &(&str, &str, &str)) -> String {
    format!(
        r#"{{"type":"model","id":{},"display_name":{},"created_at":{}}}"#,
        js(m.0),
        js(m.1),
        js(m.2)
    )
}

fn models_list() -> String {
    let data: Vec<String> = MODELS.iter().map(model_json).collect();
    format!(
        r#"{{"data":[{}],"has_more":false,"first_id":{},"last_id":{}}}"#,
        data.join(","),
        js(MODELS[0].0),
        js(MODELS[MODELS.len() - 1].0)
    )
}

fn request_id() -> String {
    format!("req_011C{}", random_id(20))
}

/// Alphanumeric id of roughly Anthropic's shape (base62-looking, mixed case).
fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        for b in uuid::Uuid::new_v4().as_bytes() {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{SseDecoder, SseEvent, parse_sse};
    use futures_util::StreamExt as _;
    use std::io::Read as _;

    fn client() -> reqwest::Client {
        reqwest::Client::builder().build().unwrap()
    }

    fn post(fake: &FakeUpstream, body: &Value) -> reqwest::RequestBuilder {
        client()
            .post(format!("{}/v1/messages?beta=true", fake.base_url()))
            .header("x-api-key", fake.api_key())
            .header("anthropic-version", "2023-06-01")
            .json(body)
    }

    fn stream_body() -> Value {
        serde_json::json!({"model": "claude-test-1", "max_tokens": 64, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]})
    }

    fn plain_body() -> Value {
        serde_json::json!({"model": "claude-test-1", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]})
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    /// Structural checks every complete fake stream must pass; returns the concatenated text.
    fn check_stream(events: &[SseEvent]) -> String {
        assert!(!events.is_empty());
        let mut text = String::new();
        for ev in events {
            let name = ev.event.as_deref().expect("every event has an event: line");
            assert!(ev.has_data, "{name} has a data: line");
            let data = ev.json().expect("data is JSON");
            assert_eq!(data["type"], name, "event name matches data.type");
            if data["delta"]["type"] == "text_delta" {
                text.push_str(data["delta"]["text"].as_str().unwrap());
            }
        }
        assert_eq!(events[0].event.as_deref(), Some("message_start"));
        assert_eq!(
            events.last().unwrap().event.as_deref(),
            Some("message_stop")
        );
        text
    }

    #[tokio::test]
    async fn non_streaming_message_has_anthropic_shape() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.push(Behavior::Message(MessageSpec {
            usage: Usage {
                input_tokens: 100,
                output_tokens: 7,
                cache_creation_input_tokens: 30,
                cache_read_input_tokens: 40,
                cache_5m: 10,
                cache_1h: 20,
            },
            ..MessageSpec::default()
        }));
        let resp = post(&fake, &plain_body()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let h = resp.headers().clone();
        assert_eq!(h["content-type"], "application/json");
        assert!(h["request-id"].to_str().unwrap().starts_with("req_"));
        assert_eq!(h["anthropic-organization-id"], ORGANIZATION_ID);
        assert!(h.contains_key("anthropic-ratelimit-requests-remaining"));
        let raw = resp.text().await.unwrap();
        assert!(raw.starts_with(r#"{"id":"msg_"#), "{raw}");
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["role"], "assistant");
        assert_eq!(v["model"], "claude-test-1");
        assert_eq!(v["content"][0]["type"], "text");
        assert_eq!(v["content"][0]["text"], "Hello, world! héllo ✓ 🌍");
        assert_eq!(v["stop_reason"], "end_turn");
        assert!(v["stop_sequence"].is_null());
        let u = &v["usage"];
        assert_eq!(u["input_tokens"], 100);
        assert_eq!(u["output_tokens"], 7);
        assert_eq!(u["cache_creation_input_tokens"], 30);
        assert_eq!(u["cache_read_input_tokens"], 40);
        assert_eq!(u["cache_creation"]["ephemeral_5m_input_tokens"], 10);
        assert_eq!(u["cache_creation"]["ephemeral_1h_input_tokens"], 20);
        assert_eq!(u["service_tier"], "standard");
    }

    #[tokio::test]
    async fn streaming_split_into_7_byte_chunks_reassembles() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.push(Behavior::Message(MessageSpec {
            chunk_split: Some(7),
            thinking: true,
            tool_use: true,
            usage_steps: 3,
            ..MessageSpec::default()
        }));
        let resp = post(&fake, &stream_body()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream; charset=utf-8"
        );
        assert_eq!(resp.headers()["cache-control"], "no-cache");
        let mut chunks = resp.bytes_stream();
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        let mut reads = 0;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= 7 * 64, "pieces are small");
            reads += 1;
            events.extend(decoder.push(&chunk));
        }
        assert!(reads > 1, "body arrived in several reads");
        assert!(!decoder.has_partial_event());
        let text = check_stream(&events);
        assert_eq!(text, "Hello, world! héllo ✓ 🌍");

        let names: Vec<_> = events.iter().map(|e| e.event.clone().unwrap()).collect();
        assert_eq!(names[1], "content_block_start");
        assert_eq!(names[2], "ping");
        let data: Vec<Value> = events.iter().map(|e| e.json().unwrap()).collect();
        assert_eq!(data[0]["message"]["model"], "claude-test-1");
        assert_eq!(data[0]["message"]["usage"]["input_tokens"], 25);
        assert_eq!(data[0]["message"]["usage"]["output_tokens"], 1);
        assert_eq!(data[1]["content_block"]["type"], "thinking");
        let delta_types: Vec<&str> = data
            .iter()
            .filter_map(|d| d["delta"]["type"].as_str())
            .collect();
        for t in [
            "thinking_delta",
            "signature_delta",
            "text_delta",
            "input_json_delta",
        ] {
            assert!(delta_types.contains(&t), "{t}");
        }
        let json: String = data
            .iter()
            .filter_map(|d| d["delta"]["partial_json"].as_str())
            .collect();
        let input: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(input["unit"], "celsius");
        let outputs: Vec<u64> = data
            .iter()
            .filter(|d| d["type"] == "message_delta")
            .map(|d| d["usage"]["output_tokens"].as_u64().unwrap())
            .collect();
        assert_eq!(outputs, [4, 8, 12]);
        let last_delta = data.iter().rfind(|d| d["type"] == "message_delta").unwrap();
        assert_eq!(last_delta["delta"]["stop_reason"], "tool_use");
        assert!(last_delta["usage"].get("input_tokens").is_none());
    }

    #[tokio::test]
    async fn default_stream_is_exactly_anthropic_sequence() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.push(Behavior::Message(MessageSpec {
            extra_usage_in_delta: true,
            ..MessageSpec::default()
        }));
        let body = post(&fake, &stream_body())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let events = parse_sse(&body);
        check_stream(&events);
        let names: Vec<_> = events.iter().map(|e| e.event.clone().unwrap()).collect();
        let mut expected = vec!["message_start", "content_block_start", "ping"];
        expected.extend(["content_block_delta"; 5]);
        expected.extend(["content_block_stop", "message_delta", "message_stop"]);
        assert_eq!(names, expected);
        let delta = events[9].json().unwrap();
        assert_eq!(
            delta["delta"],
            serde_json::json!({"stop_reason": "end_turn", "stop_sequence": null})
        );
        assert_eq!(delta["usage"]["output_tokens"], 12);
        assert_eq!(delta["usage"]["input_tokens"], 25);
        assert_eq!(delta["usage"]["cache_read_input_tokens"], 0);
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.starts_with("event: message_start\ndata: {\"type\":\"message_start\""));
        assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    }

    #[tokio::test]
    async fn cut_after_events_breaks_the_body() {
        let fake = FakeUpstream::start().await.unwrap();
        for split in [None, Some(13)] {
            fake.push(Behavior::Message(MessageSpec {
                cut_after_events: Some(4),
                chunk_split: split,
                ..MessageSpec::default()
            }));
            let resp = post(&fake, &stream_body()).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut chunks = resp.bytes_stream();
            let mut decoder = SseDecoder::new();
            let mut events = Vec::new();
            let mut failed = false;
            while let Some(chunk) = chunks.next().await {
                match chunk {
                    Ok(c) => events.extend(decoder.push(&c)),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed, "client must see a read error, not a clean end");
            assert_eq!(events.len(), 4, "the events before the cut arrived");
        }
        // The non-incremental API fails too.
        fake.push(Behavior::Message(MessageSpec {
            cut_after_events: Some(2),
            ..MessageSpec::default()
        }));
        let resp = post(&fake, &stream_body()).send().await.unwrap();
        assert!(resp.bytes().await.is_err());
    }

    #[tokio::test]
    async fn in_stream_error_event_ends_stream() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.push(Behavior::Message(MessageSpec {
            error_event_after: Some(3),
            ..MessageSpec::default()
        }));
        let body = post(&fake, &stream_body())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let events = parse_sse(&body);
        assert_eq!(events.len(), 4);
        let last = events[3].json().unwrap();
        assert_eq!(events[3].event.as_deref(), Some("error"));
        assert_eq!(last["type"], "error");
        assert_eq!(last["error"]["type"], "overloaded_error");
    }

    #[tokio::test]
    async fn error_behavior_with_retry_after() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.push(Behavior::Error {
            status: 529,
            error_type: "overloaded_error".into(),
            retry_after: Some(3),
        });
        fake.push(Behavior::error(429, "rate_limit_error"));
        let resp = post(&fake, &stream_body()).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 529);
        assert_eq!(resp.headers()["retry-after"], "3");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");
        assert!(v["request_id"].as_str().unwrap().starts_with("req_"));

        let resp = post(&fake, &plain_body()).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 429);
        assert!(resp.headers().get("retry-after").is_none());
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");

        // Queue drained: back to the default behavior.
        let resp = post(&fake, &plain_body()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn hang_never_answers_and_dies_with_the_server() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.set_default(Behavior::Hang);
        let err = post(&fake, &plain_body())
            .timeout(Duration::from_millis(300))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");

        // Without a client timeout, stopping the fake must release the request.
        let pending = tokio::spawn(post(&fake, &plain_body()).send());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!pending.is_finished());
        drop(fake);
        let result = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("connection closed when the fake stopped")
            .unwrap();
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn delays_are_honoured() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.push(Behavior::Message(MessageSpec {
            first_byte_delay: Duration::from_millis(150),
            event_delay: Duration::from_millis(20),
            chunk_split: Some(1),
            ..MessageSpec::default()
        }));
        let started = std::time::Instant::now();
        let resp = post(&fake, &stream_body()).send().await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(150));
        let body = resp.bytes().await.unwrap();
        // 10 events, 9 gaps.
        assert!(started.elapsed() >= Duration::from_millis(150 + 9 * 20));
        check_stream(&parse_sse(&body));
    }

    #[tokio::test]
    async fn stamped_events_carry_their_send_time() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.push(Behavior::Message(MessageSpec {
            event_delay: Duration::from_millis(5),
            stamp_events: true,
            ..MessageSpec::default()
        }));
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros();
        let body = post(&fake, &stream_body())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let stamps: Vec<u128> = text
            .lines()
            .filter_map(|line| line.strip_prefix(": sent_at_us "))
            .map(|us| us.parse().unwrap())
            .collect();
        // A stamp before every event after a pause, in order; comments are
        // invisible to an SSE reader.
        let events = parse_sse(&body);
        check_stream(&events);
        assert_eq!(stamps.len(), events.len() - 1);
        assert!(stamps.windows(2).all(|w| w[1] >= w[0] + 4_000));
        assert!(stamps[0] > before);
    }

    #[tokio::test]
    async fn gzip_bodies() {
        let fake = FakeUpstream::start().await.unwrap();
        let gz = Behavior::Message(MessageSpec {
            gzip: true,
            ..MessageSpec::default()
        });
        fake.push(gz.clone());
        let resp = post(&fake, &plain_body()).send().await.unwrap();
        assert_eq!(resp.headers()["content-encoding"], "gzip");
        let v: Value = serde_json::from_slice(&gunzip(&resp.bytes().await.unwrap())).unwrap();
        assert_eq!(v["usage"]["output_tokens"], 12);

        fake.push(gz);
        let resp = post(&fake, &stream_body()).send().await.unwrap();
        assert_eq!(resp.headers()["content-encoding"], "gzip");
        let body = gunzip(&resp.bytes().await.unwrap());
        check_stream(&parse_sse(&body));
    }

    #[tokio::test]
    async fn usage_from_request_rule() {
        let fake = FakeUpstream::start().await.unwrap();
        let spec = MessageSpec {
            usage_from_request: true,
            ..MessageSpec::default()
        };
        fake.set_default(Behavior::Message(spec));
        let body = serde_json::json!({"model": "m", "max_tokens": 5, "messages": []});
        let len = serde_json::to_vec(&body).unwrap().len() as u64;
        let v: Value = post(&fake, &body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["usage"]["input_tokens"], len / 4);
        assert_eq!(v["usage"]["output_tokens"], 5);
        let body = serde_json::json!({"model": "m", "messages": []});
        let v: Value = post(&fake, &body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["usage"]["output_tokens"], 12);
    }

    #[tokio::test]
    async fn rejects_wrong_key_and_authorization_header() {
        let fake = FakeUpstream::start().await.unwrap();
        assert_eq!(fake.api_key(), DEFAULT_API_KEY);
        let url = format!("{}/v1/messages", fake.base_url());
        let resp = client()
            .post(&url)
            .header("x-api-key", "sk-ant-wrong")
            .json(&plain_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");

        let resp = post(&fake, &plain_body())
            .header("authorization", "Bearer client-token")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);

        let resp = client()
            .post(&url)
            .json(&plain_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "missing key");

        // Rejected requests are recorded but do not consume the queue.
        fake.push(Behavior::error(500, "api_error"));
        fake.set_api_key("sk-ant-rotated");
        assert_eq!(fake.api_key(), "sk-ant-rotated");
        let resp = client()
            .post(&url)
            .header("x-api-key", DEFAULT_API_KEY)
            .json(&plain_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "old key no longer works");
        let resp = post(&fake, &plain_body()).send().await.unwrap();
        assert_eq!(resp.status(), 500, "queued behavior still there");
        assert_eq!(fake.requests().len(), 5);

        let lenient = FakeUpstream::start_with(FakeConfig {
            reject_authorization: false,
            ..FakeConfig::default()
        })
        .await
        .unwrap();
        let resp = post(&lenient, &plain_body())
            .header("authorization", "Bearer x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn records_requests_in_order_with_raw_query_and_body() {
        let fake = FakeUpstream::start().await.unwrap();
        let raw = br#"{"model":"m","max_tokens":3,"messages":[]}"#;
        let resp = client()
            .post(format!("{}/v1/messages?beta=true", fake.base_url()))
            .header("X-Api-Key", fake.api_key())
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "a-1")
            .header("anthropic-beta", "b-2")
            .header("content-type", "application/json")
            .body(raw.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = client()
            .get(format!("{}/v1/models", fake.base_url()))
            .header("x-api-key", fake.api_key())
            .send()
            .await
            .unwrap();

        let reqs = fake.requests();
        assert_eq!(reqs.len(), 2);
        let r = &reqs[0];
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.query.as_deref(), Some("beta=true"));
        assert_eq!(&r.body[..], raw);
        assert_eq!(r.header("X-API-KEY"), Some(DEFAULT_API_KEY));
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(pos("x-api-key") < pos("anthropic-version"));
        assert!(pos("anthropic-version") < pos("anthropic-beta"));
        assert!(pos("anthropic-beta") < pos("content-type"));
        let betas: Vec<&str> = r
            .headers
            .iter()
            .filter(|(n, _)| n == "anthropic-beta")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(betas, ["a-1", "b-2"]);
        assert_eq!(reqs[1].method, "GET");
        assert_eq!(reqs[1].query, None);
        fake.clear_requests();
        assert!(fake.requests().is_empty());
    }

    #[tokio::test]
    async fn count_tokens_models_and_404() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.set_default(Behavior::Hang); // built-ins must not consult the queue/default
        let base = fake.base_url();
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
        let v: Value = client()
            .post(format!("{base}/v1/messages/count_tokens"))
            .header("x-api-key", fake.api_key())
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v, serde_json::json!({"input_tokens": body.len() / 4}));

        let v: Value = client()
            .get(format!("{base}/v1/models"))
            .header("x-api-key", fake.api_key())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["has_more"], false);
        assert_eq!(v["data"][0]["type"], "model");
        assert_eq!(v["first_id"], v["data"][0]["id"]);
        assert_eq!(v["last_id"], v["data"][2]["id"]);
        let id = v["data"][1]["id"].as_str().unwrap();
        let one: Value = client()
            .get(format!("{base}/v1/models/{id}"))
            .header("x-api-key", fake.api_key())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(one, v["data"][1]);

        for (method, path) in [("GET", "/v1/nope"), ("GET", "/v1/messages"), ("POST", "/")] {
            let resp = client()
                .request(method.parse().unwrap(), format!("{base}{path}"))
                .header("x-api-key", fake.api_key())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 404, "{method} {path}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["type"], "not_found_error");
        }
    }
}
