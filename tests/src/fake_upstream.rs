//! A fake Anthropic API server speaking the real wire format (JSON messages, SSE streams, error
//! envelopes, rate-limit headers, the Message Batches and Files APIs), recording every request
//! and misbehaving on demand; used in-process by the integration tests and by the
//! `fake-upstream` binary.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
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
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
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
    /// Append one JSON line per request to this file (see [`RequestLogLine`]), so a test that
    /// runs the `fake-upstream` binary, and cannot call [`FakeUpstream::requests`], sees what
    /// reached the upstream and what it answered.
    pub request_log: Option<PathBuf>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            api_key: DEFAULT_API_KEY.to_owned(),
            reject_authorization: true,
            default_behavior: Behavior::default(),
            port: 0,
            request_log: None,
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
    /// Message batches in creation order.
    batches: Vec<Batch>,
    /// How long a batch created from now on stays `in_progress`.
    batch_duration: Duration,
    /// Uploaded files in creation order.
    files: Vec<StoredFile>,
    /// Delay for the answer of the next successful batch or file creation.
    hold_next_create: Option<Duration>,
}

struct Shared {
    inner: Mutex<Inner>,
    reject_authorization: bool,
    request_log: Option<Mutex<File>>,
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
        let request_log = match &config.request_log {
            Some(path) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening the request log {}", path.display()))?,
            )),
            None => None,
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                api_key: leak(&config.api_key),
                queue: VecDeque::new(),
                default: config.default_behavior,
                requests: Vec::new(),
                batches: Vec::new(),
                batch_duration: Duration::ZERO,
                files: Vec::new(),
                hold_next_create: None,
            }),
            reject_authorization: config.reject_authorization,
            request_log,
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

    /// How long batches created from now on stay `in_progress` before they end on their own;
    /// batches already created keep their duration. The default, zero, ends a batch at once.
    pub fn set_batch_duration(&self, duration: Duration) {
        self.shared.lock().batch_duration = duration;
    }

    /// End a batch now, as if its duration had passed; no effect on an ended or unknown batch.
    pub fn end_batch(&self, id: &str) {
        let now = utc_now();
        if let Some(batch) = self.shared.lock().batches.iter_mut().find(|b| b.id == id) {
            batch.end(now);
        }
    }

    /// The ids of every stored (not deleted) batch, in creation order.
    pub fn batch_ids(&self) -> Vec<String> {
        self.shared
            .lock()
            .batches
            .iter()
            .map(|b| b.id.clone())
            .collect()
    }

    /// The summed usage of a batch's succeeded results, as its results file reports them; zero
    /// for a canceled batch. `None` while the batch is in progress (no results yet) or unknown.
    pub fn batch_results_usage(&self, id: &str) -> Option<Usage> {
        let now = utc_now();
        let inner = self.shared.lock();
        let batch = inner.batches.iter().find(|b| b.id == id)?;
        batch.ended_at(now)?;
        Some(batch.succeeded_usage())
    }

    /// The ids of every stored (not deleted) file, in creation order.
    pub fn file_ids(&self) -> Vec<String> {
        self.shared
            .lock()
            .files
            .iter()
            .map(|f| f.id.clone())
            .collect()
    }

    /// Make the next successful `POST /v1/messages/batches` or `POST /v1/files` wait `delay`
    /// before answering. The request is recorded and the object created first, so it exists
    /// upstream while the client still waits (time to break the relay's database).
    pub fn hold_next_create(&self, delay: Duration) {
        self.shared.lock().hold_next_create = Some(delay);
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

/// One line of the request log ([`FakeConfig::request_log`]): a request as it reached the
/// fake, and the usage its answer reported. Bodies stay out; the model is all tests need.
#[derive(Debug, Serialize)]
pub struct RequestLogLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The body's `model`, when it is JSON and has one.
    pub model: Option<&'a str>,
    /// The body's `stream` (false when absent).
    pub stream: bool,
    pub user_agent: Option<&'a str>,
    pub status: u16,
    /// What a message answer reported (its final usage); `None` for anything else.
    pub usage: Option<LoggedUsage>,
}

/// The usage counts of a [`RequestLogLine`], named as Anthropic names them.
#[derive(Debug, Serialize)]
pub struct LoggedUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl From<Usage> for LoggedUsage {
    fn from(u: Usage) -> Self {
        LoggedUsage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_creation_input_tokens: u.cache_creation_input_tokens,
            cache_read_input_tokens: u.cache_read_input_tokens,
        }
    }
}

/// The single handler: record, answer, log.
async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let user_agent = req
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (response, body, reported) = respond(&shared, req).await;
    if let Some(log) = &shared.request_log {
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let line = RequestLogLine {
            method: &method,
            path: &path,
            query: query.as_deref(),
            model: request.get("model").and_then(Value::as_str),
            stream: request.get("stream").and_then(Value::as_bool) == Some(true),
            user_agent: user_agent.as_deref(),
            status: response.status().as_u16(),
            usage: reported.map(LoggedUsage::from),
        };
        if let Ok(mut text) = serde_json::to_string(&line) {
            text.push('\n');
            // One write per line under the lock, so concurrent requests never interleave.
            let mut file = log.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = file.write_all(text.as_bytes());
        }
    }
    response
}

/// Record, authenticate, route: the answer, the request body, and the usage a message answer
/// reports.
async fn respond(shared: &Arc<Shared>, req: Request) -> (Response, Bytes, Option<Usage>) {
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
        let response = error_response(400, "invalid_request_error", None, None);
        return (response, Bytes::new(), None);
    };
    let answer = |response| (response, body.clone(), None);
    if shared.reject_authorization && authorization_present {
        // Reaching here means the relay forwarded the client's own credentials.
        return answer(error_response(
            401,
            "authentication_error",
            Some("fake upstream: an authorization header reached the upstream"),
            None,
        ));
    }
    if !key_ok {
        return answer(error_response(401, "authentication_error", None, None));
    }

    let path = parts.uri.path();
    let method = parts.method.as_str();
    let query = parts.uri.query();
    if let Some(rest) = under(path, "/v1/messages/batches") {
        return answer(route_batches(shared, method, rest, query, &body).await);
    }
    if let Some(rest) = under(path, "/v1/files") {
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        return answer(route_files(shared, method, rest, query, content_type, &body).await);
    }
    match (method, path) {
        ("POST", "/v1/messages") => {
            let behavior = {
                let mut inner = shared.lock();
                match inner.queue.pop_front() {
                    Some(b) => b,
                    None => inner.default.clone(),
                }
            };
            let (response, usage) = answer_message(behavior, &body).await;
            (response, body, usage)
        }
        ("POST", "/v1/messages/count_tokens") => answer(json_response(
            StatusCode::OK,
            format!("{{\"input_tokens\":{}}}", body.len() / 4),
        )),
        ("GET", "/v1/models") => answer(list_response(&models_page_items(), query)),
        ("GET", _) if path.starts_with("/v1/models/") => {
            match MODELS
                .iter()
                .find(|m| path == format!("/v1/models/{}", m.0))
            {
                Some(m) => answer(json_response(StatusCode::OK, model_json(m))),
                None => answer(error_response(404, "not_found_error", None, None)),
            }
        }
        _ => answer(error_response(404, "not_found_error", None, None)),
    }
}

/// The answer to a `POST /v1/messages`, and the usage it reports when it is a message.
async fn answer_message(behavior: Behavior, body: &[u8]) -> (Response, Option<Usage>) {
    let spec = match behavior {
        Behavior::Message(spec) => spec,
        Behavior::Error {
            status,
            error_type,
            retry_after,
        } => return (error_response(status, &error_type, None, retry_after), None),
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
    match result {
        Ok(response) => (response, Some(usage)),
        Err(_) => (error_response(500, "api_error", None, None), None),
    }
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
const MODELS: [(&str, &str, &str); 6] = [
    ("claude-opus-5-5", "Claude Opus 5.5", "2026-09-16T00:00:00Z"),
    (
        "claude-sonnet-5-5",
        "Claude Sonnet 5.5",
        "2026-09-16T00:00:00Z",
    ),
    (
        "claude-haiku-5-5",
        "Claude Haiku 5.5",
        "2026-09-02T00:00:00Z",
    ),
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

/// The models as [`list_response`] pages them (`limit`, `after_id`, `before_id`), newest first.
fn models_page_items() -> Vec<(String, String)> {
    MODELS
        .iter()
        .map(|m| (m.0.to_owned(), model_json(m)))
        .collect()
}

/// The rest of `path` after `prefix` when `path` is `prefix` itself or lies below it.
fn under<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// The segments of a path remainder from [`under`]: `""` → `[]`, `"/a/b"` → `["a", "b"]`.
fn segments(rest: &str) -> Vec<&str> {
    rest.split('/').skip(1).collect()
}

/// The current UTC time, to the microsecond like Anthropic's timestamps.
fn utc_now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

/// A JSON RFC 3339 string, or `null`.
fn js_time(t: Option<OffsetDateTime>) -> String {
    match t.and_then(|t| t.format(&Rfc3339).ok()) {
        Some(t) => js(&t),
        None => "null".to_owned(),
    }
}

/// A 200 JSON answer with the headers every authenticated Anthropic answer carries.
fn api_json(json: String) -> Response {
    let headers = vec![
        ("content-type", "application/json".to_owned()),
        ("request-id", request_id()),
        ("anthropic-organization-id", ORGANIZATION_ID.to_owned()),
    ];
    build(StatusCode::OK, headers, Body::from(json))
}

fn invalid(message: &str) -> Response {
    error_response(400, "invalid_request_error", Some(message), None)
}

fn not_found(what: &str, id: &str) -> Response {
    error_response(
        404,
        "not_found_error",
        Some(&format!("{what} {id} not found")),
        None,
    )
}

/// The first value of a query parameter, undecoded (ids and numbers need no decoding).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// Anthropic's cursor page over `items`, (id, JSON object) newest first: `limit` (1..=1000,
/// default 20) items from the start, right after `after_id` or right before `before_id`;
/// `has_more` says whether items remain beyond the page in that direction. An unknown cursor
/// or a bad limit is a 400.
fn list_response(items: &[(String, String)], query: Option<&str>) -> Response {
    let limit = match query_param(query, "limit").map(str::parse::<usize>) {
        None => 20,
        Some(Ok(limit @ 1..=1000)) => limit,
        Some(_) => return invalid("limit: must be an integer between 1 and 1000"),
    };
    let position = |id: &str| items.iter().position(|(item, _)| item == id);
    let (start, end, has_more) = match (
        query_param(query, "before_id"),
        query_param(query, "after_id"),
    ) {
        (Some(_), Some(_)) => return invalid("before_id and after_id are mutually exclusive"),
        (Some(before), None) => {
            let Some(end) = position(before) else {
                return invalid(&format!("before_id: unknown id {before}"));
            };
            let start = end.saturating_sub(limit);
            (start, end, start > 0)
        }
        (None, after) => {
            let start = match after {
                None => 0,
                Some(after) => match position(after) {
                    Some(at) => at + 1,
                    None => return invalid(&format!("after_id: unknown id {after}")),
                },
            };
            let end = (start + limit).min(items.len());
            (start, end, end < items.len())
        }
    };
    let page = items.get(start..end).unwrap_or_default();
    let edge = |item: Option<&(String, String)>| item.map_or("null".to_owned(), |(id, _)| js(id));
    let data: Vec<&str> = page.iter().map(|(_, json)| json.as_str()).collect();
    api_json(format!(
        r#"{{"data":[{}],"has_more":{has_more},"first_id":{},"last_id":{}}}"#,
        data.join(","),
        edge(page.first()),
        edge(page.last())
    ))
}

/// A created object's JSON and the delay held before answering it, or why the request is
/// invalid (a 400).
type Created = Result<(String, Option<Duration>), String>;

/// Answer a create (batch or file): its 400, or its object once any held delay has passed.
async fn answer_create(created: Created) -> Response {
    match created {
        Err(message) => invalid(&message),
        Ok((json, hold)) => {
            if let Some(delay) = hold {
                tokio::time::sleep(delay).await;
            }
            api_json(json)
        }
    }
}

/// Bytes per piece of a streamed results file; deliberately not aligned to its lines.
const RESULTS_CHUNK: usize = 97;

/// A message batch as the fake stores it. Its outcome is fixed at creation: requests whose
/// `params.model` starts with `invalid` error, the others succeed, unless it is canceled.
struct Batch {
    id: String,
    created_at: OffsetDateTime,
    /// When it ends on its own; `None` if the duration overflows the calendar (never).
    ends_at: Option<OffsetDateTime>,
    /// Set by `end_batch` or a cancel, which end it before `ends_at`.
    ended_early_at: Option<OffsetDateTime>,
    cancel_initiated_at: Option<OffsetDateTime>,
    requests: Vec<BatchRequest>,
}

struct BatchRequest {
    custom_id: String,
    /// The answer to a succeeding request; `None` for an erroring one.
    message: Option<BatchMessage>,
}

struct BatchMessage {
    id: String,
    model: String,
    usage: Usage,
}

impl BatchRequest {
    fn new(custom_id: &str, params: &Value) -> BatchRequest {
        let model = params
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_MODEL);
        let message = (!model.starts_with("invalid")).then(|| {
            let len = serde_json::to_vec(params).map_or(0, |bytes| bytes.len());
            BatchMessage {
                id: format!("msg_01{}", random_id(22)),
                model: model.to_owned(),
                usage: usage_from_request(params, len),
            }
        });
        BatchRequest {
            custom_id: custom_id.to_owned(),
            message,
        }
    }

    /// This request's line of the results file, without its newline.
    fn result_line(&self, canceled: bool) -> String {
        let custom_id = js(&self.custom_id);
        match (&self.message, canceled) {
            (_, true) => format!(r#"{{"custom_id":{custom_id},"result":{{"type":"canceled"}}}}"#),
            (Some(m), false) => format!(
                concat!(
                    r#"{{"custom_id":{},"result":{{"type":"succeeded","message":{{"id":{},"#,
                    r#""type":"message","role":"assistant","model":{},"#,
                    r#""content":[{{"type":"text","text":"Hello"}}],"stop_reason":"end_turn","#,
                    r#""stop_sequence":null,"usage":{}}}}}}}"#
                ),
                custom_id,
                js(&m.id),
                js(&m.model),
                usage_json(&m.usage, m.usage.output_tokens)
            ),
            (None, false) => format!(
                concat!(
                    r#"{{"custom_id":{},"result":{{"type":"errored","error":{{"type":"error","#,
                    r#""error":{{"type":"invalid_request_error","message":"model not found"}}}}}}}}"#
                ),
                custom_id
            ),
        }
    }
}

impl Batch {
    fn ended_at(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.ended_early_at.or(self.ends_at.filter(|at| now >= *at))
    }

    fn end(&mut self, now: OffsetDateTime) {
        if self.ended_at(now).is_none() {
            self.ended_early_at = Some(now);
        }
    }

    fn canceled(&self) -> bool {
        self.cancel_initiated_at.is_some()
    }

    /// The batch object as of `now`, keys in Anthropic's order.
    fn json(&self, now: OffsetDateTime) -> String {
        let ended_at = self.ended_at(now);
        let n = self.requests.len();
        let succeeded = self.requests.iter().filter(|r| r.message.is_some()).count();
        let (status, processing, succeeded, errored, canceled) = match ended_at {
            None => ("in_progress", n, 0, 0, 0),
            Some(_) if self.canceled() => ("ended", 0, 0, 0, n),
            Some(_) => ("ended", 0, succeeded, n - succeeded, 0),
        };
        let results_url = match ended_at {
            // Absolute and pointing at the real API, exactly as Anthropic sends it.
            Some(_) => js(&format!(
                "https://api.anthropic.com/v1/messages/batches/{}/results",
                self.id
            )),
            None => "null".to_owned(),
        };
        format!(
            concat!(
                r#"{{"id":{},"type":"message_batch","processing_status":"{}","#,
                r#""request_counts":{{"processing":{},"succeeded":{},"errored":{},"canceled":{},"expired":0}},"#,
                r#""ended_at":{},"created_at":{},"expires_at":{},"archived_at":null,"#,
                r#""cancel_initiated_at":{},"results_url":{}}}"#
            ),
            js(&self.id),
            status,
            processing,
            succeeded,
            errored,
            canceled,
            js_time(ended_at),
            js_time(Some(self.created_at)),
            js_time(self.created_at.checked_add(time::Duration::DAY)),
            js_time(self.cancel_initiated_at),
            results_url
        )
    }

    /// The JSON Lines results file, one line per request in request order.
    fn results(&self) -> String {
        let canceled = self.canceled();
        self.requests
            .iter()
            .map(|r| r.result_line(canceled) + "\n")
            .collect()
    }

    fn succeeded_usage(&self) -> Usage {
        if self.canceled() {
            return Usage::default();
        }
        let mut total = Usage::default();
        for usage in self.requests.iter().filter_map(|r| r.message.as_ref()) {
            let u = &usage.usage;
            total.input_tokens += u.input_tokens;
            total.output_tokens += u.output_tokens;
            total.cache_creation_input_tokens += u.cache_creation_input_tokens;
            total.cache_read_input_tokens += u.cache_read_input_tokens;
            total.cache_5m += u.cache_5m;
            total.cache_1h += u.cache_1h;
        }
        total
    }
}

/// `/v1/messages/batches[/…]`; `rest` is the path below that prefix.
async fn route_batches(
    shared: &Shared,
    method: &str,
    rest: &str,
    query: Option<&str>,
    body: &[u8],
) -> Response {
    let now = utc_now();
    match (method, segments(rest).as_slice()) {
        ("POST", []) => answer_create(create_batch(shared, body, now)).await,
        ("GET", []) => {
            let items: Vec<(String, String)> = shared
                .lock()
                .batches
                .iter()
                .rev()
                .map(|b| (b.id.clone(), b.json(now)))
                .collect();
            list_response(&items, query)
        }
        ("GET", [id]) => match shared.lock().batches.iter().find(|b| b.id == *id) {
            Some(batch) => api_json(batch.json(now)),
            None => not_found("message batch", id),
        },
        ("POST", [id, "cancel"]) => {
            let mut inner = shared.lock();
            let Some(batch) = inner.batches.iter_mut().find(|b| b.id == *id) else {
                return not_found("message batch", id);
            };
            // Canceling an ended batch changes nothing; the real API also just answers it.
            if batch.ended_at(now).is_none() {
                batch.cancel_initiated_at = Some(now);
                batch.end(now);
            }
            api_json(batch.json(now))
        }
        ("DELETE", [id]) => {
            let mut inner = shared.lock();
            let Some(at) = inner.batches.iter().position(|b| b.id == *id) else {
                return not_found("message batch", id);
            };
            if inner.batches[at].ended_at(now).is_none() {
                return invalid(&format!(
                    "Message batch {id} is still in progress; it must end (or be canceled) \
                     before it can be deleted"
                ));
            }
            inner.batches.remove(at);
            api_json(format!(
                r#"{{"id":{},"type":"message_batch_deleted"}}"#,
                js(id)
            ))
        }
        ("GET", [id, "results"]) => {
            let results = {
                let inner = shared.lock();
                let Some(batch) = inner.batches.iter().find(|b| b.id == *id) else {
                    return not_found("message batch", id);
                };
                if batch.ended_at(now).is_none() {
                    return invalid(&format!(
                        "Message batch {id} is still in progress; results are available once it has ended"
                    ));
                }
                batch.results()
            };
            let headers = success_headers("application/binary");
            build(
                StatusCode::OK,
                headers,
                chunked_body(Bytes::from(results), RESULTS_CHUNK),
            )
        }
        _ => error_response(404, "not_found_error", None, None),
    }
}

/// Validate a `POST /v1/messages/batches` body and store the batch.
fn create_batch(shared: &Shared, body: &[u8], now: OffsetDateTime) -> Created {
    let request: Value = serde_json::from_slice(body)
        .map_err(|_| "The request body is not valid JSON".to_owned())?;
    let entries = request
        .get("requests")
        .and_then(Value::as_array)
        .filter(|entries| !entries.is_empty())
        .ok_or_else(|| "requests: must be a non-empty array".to_owned())?;
    let mut requests = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let custom_id = entry
            .get("custom_id")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("requests.{i}.custom_id: must be a string"))?;
        let params = entry
            .get("params")
            .filter(|params| params.is_object())
            .ok_or_else(|| format!("requests.{i}.params: must be an object"))?;
        requests.push(BatchRequest::new(custom_id, params));
    }
    let mut inner = shared.lock();
    let batch = Batch {
        id: format!("msgbatch_01{}", random_id(22)),
        created_at: now,
        ends_at: time::Duration::try_from(inner.batch_duration)
            .ok()
            .and_then(|d| now.checked_add(d)),
        ended_early_at: None,
        cancel_initiated_at: None,
        requests,
    };
    let json = batch.json(now);
    inner.batches.push(batch);
    Ok((json, inner.hold_next_create.take()))
}

/// `bytes` as a streamed body of `chunk`-byte pieces, each handed to hyper on its own.
fn chunked_body(bytes: Bytes, chunk: usize) -> Body {
    let chunk = chunk.max(1);
    let pieces: Vec<Bytes> = (0..bytes.len())
        .step_by(chunk)
        .map(|at| bytes.slice(at..(at + chunk).min(bytes.len())))
        .collect();
    let stream = futures_util::stream::unfold(pieces.into_iter(), |mut pieces| async move {
        let piece = pieces.next()?;
        // Return Pending once so hyper writes each piece rather than coalescing them.
        tokio::task::yield_now().await;
        Some((Ok::<_, io::Error>(piece), pieces))
    });
    Body::from_stream(stream)
}

/// An uploaded file.
struct StoredFile {
    id: String,
    filename: String,
    /// The `content-type` of the uploaded part, as sent.
    mime_type: String,
    created_at: OffsetDateTime,
    content: Bytes,
}

impl StoredFile {
    /// The file's metadata object, keys in Anthropic's order.
    fn json(&self) -> String {
        format!(
            r#"{{"id":{},"type":"file","filename":{},"mime_type":{},"size_bytes":{},"created_at":{},"downloadable":true}}"#,
            js(&self.id),
            js(&self.filename),
            js(&self.mime_type),
            self.content.len(),
            js_time(Some(self.created_at))
        )
    }
}

/// `/v1/files[/…]`; `rest` is the path below that prefix.
async fn route_files(
    shared: &Shared,
    method: &str,
    rest: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &Bytes,
) -> Response {
    match (method, segments(rest).as_slice()) {
        ("POST", []) => answer_create(create_file(shared, content_type, body)).await,
        ("GET", []) => {
            let items: Vec<(String, String)> = shared
                .lock()
                .files
                .iter()
                .rev()
                .map(|f| (f.id.clone(), f.json()))
                .collect();
            list_response(&items, query)
        }
        ("GET", [id]) => match shared.lock().files.iter().find(|f| f.id == *id) {
            Some(file) => api_json(file.json()),
            None => not_found("file", id),
        },
        ("GET", [id, "content"]) => {
            let (mime_type, content) = match shared.lock().files.iter().find(|f| f.id == *id) {
                Some(file) => (file.mime_type.clone(), file.content.clone()),
                None => return not_found("file", id),
            };
            let headers = vec![
                ("content-type", mime_type),
                ("request-id", request_id()),
                ("anthropic-organization-id", ORGANIZATION_ID.to_owned()),
            ];
            build(StatusCode::OK, headers, Body::from(content))
        }
        ("DELETE", [id]) => {
            let mut inner = shared.lock();
            let Some(at) = inner.files.iter().position(|f| f.id == *id) else {
                return not_found("file", id);
            };
            inner.files.remove(at);
            api_json(format!(r#"{{"id":{},"type":"file_deleted"}}"#, js(id)))
        }
        _ => error_response(404, "not_found_error", None, None),
    }
}

/// Parse a `POST /v1/files` upload and store its `file` part.
fn create_file(shared: &Shared, content_type: Option<&str>, body: &Bytes) -> Created {
    let parts = parse_multipart(content_type.unwrap_or_default(), body).map_err(str::to_owned)?;
    let part = parts
        .into_iter()
        .find(|part| part.name.as_deref() == Some("file"))
        .ok_or_else(|| "file: a multipart part named \"file\" is required".to_owned())?;
    let filename = part
        .filename
        .filter(|name| !name.is_empty())
        .ok_or_else(|| "file: the part has no filename".to_owned())?;
    let file = StoredFile {
        id: format!("file_011{}", random_id(22)),
        filename,
        mime_type: part
            .content_type
            .unwrap_or_else(|| "application/octet-stream".to_owned()),
        created_at: utc_now(),
        content: part.content,
    };
    let json = file.json();
    let mut inner = shared.lock();
    inner.files.push(file);
    Ok((json, inner.hold_next_create.take()))
}

/// One part of a `multipart/form-data` body.
#[derive(Debug)]
struct FormPart {
    /// `name` of its content-disposition.
    name: Option<String>,
    /// `filename*` (RFC 5987, decoded) or else `filename` of its content-disposition.
    filename: Option<String>,
    content_type: Option<String>,
    /// The raw bytes between its headers and the next delimiter.
    content: Bytes,
}

/// Split a `multipart/form-data` body (RFC 7578 / RFC 2046) into its parts. Binary-safe: a
/// part ends only at CRLF `--boundary`; the preamble and epilogue are ignored.
fn parse_multipart(content_type: &str, body: &Bytes) -> Result<Vec<FormPart>, &'static str> {
    let (media_type, params) = split_header_params(content_type);
    if !media_type.eq_ignore_ascii_case("multipart/form-data") {
        return Err("The request body must be multipart/form-data");
    }
    let boundary = param(&params, "boundary")
        .filter(|b| (1..=70).contains(&b.len()))
        .ok_or("multipart/form-data content-type without a valid boundary")?;
    let dash_boundary = [b"--", boundary.as_bytes()].concat();
    let delimiter = [b"\r\n", dash_boundary.as_slice()].concat();
    // The first delimiter either opens the body or follows a preamble's CRLF.
    let mut pos = if body.starts_with(&dash_boundary) {
        dash_boundary.len()
    } else {
        find(body, &delimiter, 0).ok_or("multipart body without its boundary")? + delimiter.len()
    };
    let mut parts = Vec::new();
    loop {
        let after = body.get(pos..).unwrap_or_default();
        // `--` right after a delimiter closes the body.
        if after.starts_with(b"--") {
            return Ok(parts);
        }
        // Otherwise optional linear whitespace, then CRLF, then the part.
        let blanks = after
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        if !after[blanks..].starts_with(b"\r\n") {
            return Err("malformed multipart boundary line");
        }
        pos += blanks + 2;
        let end = find(body, &delimiter, pos).ok_or("multipart body without a closing boundary")?;
        parts.push(parse_part(body.slice(pos..end))?);
        pos = end + delimiter.len();
    }
}

/// One part: header lines, a blank line, then the content.
fn parse_part(part: Bytes) -> Result<FormPart, &'static str> {
    let (head, content) = if part.starts_with(b"\r\n") {
        (String::new(), part.slice(2..))
    } else {
        let blank = find(&part, b"\r\n\r\n", 0).ok_or("multipart part without a header end")?;
        let head = std::str::from_utf8(&part[..blank])
            .map_err(|_| "multipart part headers are not UTF-8")?
            .to_owned();
        (head, part.slice(blank + 4..))
    };
    // Unfold obsolete continuation lines into the header they continue.
    let mut lines: Vec<String> = Vec::new();
    for line in head.split("\r\n").filter(|line| !line.is_empty()) {
        match lines.last_mut() {
            Some(previous) if line.starts_with([' ', '\t']) => previous.push_str(line),
            _ => lines.push(line.to_owned()),
        }
    }
    let mut form = FormPart {
        name: None,
        filename: None,
        content_type: None,
        content,
    };
    for line in &lines {
        let (name, value) = line
            .split_once(':')
            .ok_or("malformed multipart part header")?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-disposition") {
            let (disposition, params) = split_header_params(value);
            if !disposition.eq_ignore_ascii_case("form-data") {
                return Err("multipart part is not form-data");
            }
            form.name = param(&params, "name");
            form.filename = match param(&params, "filename*") {
                Some(extended) => Some(decode_ext_value(&extended)?),
                None => param(&params, "filename"),
            };
        } else if name.eq_ignore_ascii_case("content-type") {
            form.content_type = Some(value.to_owned());
        }
    }
    Ok(form)
}

/// `value; name=token; name="quoted \"string\""` → the value and its parameters (names
/// lowercased, quoted strings unescaped; a `;` inside quotes belongs to the string).
fn split_header_params(header: &str) -> (String, Vec<(String, String)>) {
    let mut chars = header.chars().peekable();
    let mut value = String::new();
    while let Some(c) = chars.next_if(|c| *c != ';') {
        value.push(c);
    }
    let mut params = Vec::new();
    // Each round starts on the `;` before a parameter.
    while chars.next().is_some() {
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && *c != ';') {
            name.push(c);
        }
        let mut param_value = String::new();
        if chars.next_if_eq(&'=').is_some() {
            while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => param_value.extend(chars.next()),
                        c => param_value.push(c),
                    }
                }
                // Anything between the closing quote and the next `;` is junk.
                while chars.next_if(|c| *c != ';').is_some() {}
            } else {
                while let Some(c) = chars.next_if(|c| *c != ';') {
                    param_value.push(c);
                }
                param_value = param_value.trim().to_owned();
            }
        }
        let name = name.trim().to_ascii_lowercase();
        if !name.is_empty() {
            params.push((name, param_value));
        }
    }
    (value.trim().to_owned(), params)
}

fn param(params: &[(String, String)], name: &str) -> Option<String> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

/// An RFC 5987 `charset'language'percent-encoded` value; only UTF-8 is accepted.
fn decode_ext_value(value: &str) -> Result<String, &'static str> {
    let mut fields = value.splitn(3, '\'');
    let (Some(charset), Some(_language), Some(encoded)) =
        (fields.next(), fields.next(), fields.next())
    else {
        return Err("malformed filename* parameter");
    };
    if !charset.eq_ignore_ascii_case("utf-8") {
        return Err("filename* must be UTF-8");
    }
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut rest = encoded.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = tail
                .get(..2)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("malformed percent-encoding in filename*")?;
            bytes.push(hex);
            rest = tail.get(2..).unwrap_or_default();
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| "filename* is not UTF-8")
}

/// The first index at or after `from` where `needle` (non-empty) occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|window| window == needle)
        .map(|at| at + from)
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
        assert_eq!(v["last_id"], v["data"][MODELS.len() - 1]["id"]);
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

    #[tokio::test]
    async fn models_page_like_anthropic() {
        let fake = FakeUpstream::start().await.unwrap();
        let list = |query: &str| {
            let request = api(&fake, reqwest::Method::GET, &format!("/v1/models{query}"));
            async move { json_of(request.send().await.unwrap()).await }
        };
        let ids = |page: &Value| -> Vec<String> {
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let all: Vec<String> = MODELS.iter().map(|m| m.0.to_owned()).collect();

        // What Claude Code's model discovery asks for.
        let (status, page) = list("?limit=1000").await;
        assert_eq!(status, 200);
        assert_eq!(ids(&page), all);
        assert_eq!(page["has_more"], false);
        assert_eq!(page["first_id"], "claude-opus-5-5");
        assert_eq!(page["last_id"], "claude-opus-4-1-20250805");
        assert_eq!(
            page["data"][0],
            serde_json::json!({"type": "model", "id": "claude-opus-5-5",
                "display_name": "Claude Opus 5.5", "created_at": "2026-09-16T00:00:00Z"})
        );

        let (_, first) = list("?limit=2").await;
        assert_eq!(ids(&first), all[..2]);
        assert_eq!(first["has_more"], true);
        assert_eq!(first["last_id"], all[1]);
        let (_, next) = list(&format!("?limit=2&after_id={}", all[1])).await;
        assert_eq!(ids(&next), all[2..4]);
        assert_eq!(next["has_more"], true);
        let (_, back) = list(&format!("?limit=3&before_id={}", all[4])).await;
        assert_eq!(ids(&back), all[1..4]);
        assert_eq!(back["has_more"], true);
        let (_, tail) = list(&format!("?after_id={}", all[3])).await;
        assert_eq!(ids(&tail), all[4..]);
        assert_eq!(tail["has_more"], false);

        for bad in ["?limit=0", "?limit=1001", "?after_id=claude-nope"] {
            assert_eq!(list(bad).await.0, 400, "{bad}");
        }
    }

    #[tokio::test]
    async fn request_log_has_a_line_per_request_with_the_reported_usage() {
        let dir = std::env::temp_dir().join(format!("fake-upstream-log-{}", random_id(12)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("requests.jsonl");
        let fake = FakeUpstream::start_with(FakeConfig {
            request_log: Some(path.clone()),
            ..FakeConfig::default()
        })
        .await
        .unwrap();
        fake.push(Behavior::Message(MessageSpec {
            usage: Usage::new(31, 7, 0, 0),
            ..MessageSpec::default()
        }));
        fake.push(Behavior::error(529, "overloaded_error"));
        let streamed = post(&fake, &stream_body()).send().await.unwrap();
        streamed.bytes().await.unwrap();
        assert_eq!(
            post(&fake, &plain_body()).send().await.unwrap().status(),
            529
        );
        api(&fake, reqwest::Method::GET, "/v1/models?limit=1000")
            .header("user-agent", "claude-cli/2.1.330 (external, cli)")
            .send()
            .await
            .unwrap();

        let lines: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            lines,
            [
                serde_json::json!({"method": "POST", "path": "/v1/messages", "query": "beta=true",
                    "model": "claude-test-1", "stream": true, "user_agent": null, "status": 200,
                    "usage": {"input_tokens": 31, "output_tokens": 7,
                        "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}),
                serde_json::json!({"method": "POST", "path": "/v1/messages", "query": "beta=true",
                    "model": "claude-test-1", "stream": false, "user_agent": null, "status": 529,
                    "usage": null}),
                serde_json::json!({"method": "GET", "path": "/v1/models", "query": "limit=1000",
                    "model": null, "stream": false,
                    "user_agent": "claude-cli/2.1.330 (external, cli)", "status": 200,
                    "usage": null}),
            ]
        );
    }

    fn api(fake: &FakeUpstream, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        client()
            .request(method, format!("{}{path}", fake.base_url()))
            .header("x-api-key", fake.api_key())
            .header("anthropic-version", "2023-06-01")
    }

    async fn json_of(resp: reqwest::Response) -> (u16, Value) {
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn post_batch(fake: &FakeUpstream, body: &Value) -> Value {
        let (status, v) = json_of(
            api(fake, reqwest::Method::POST, "/v1/messages/batches")
                .json(body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn get_batch(fake: &FakeUpstream, id: &str) -> (u16, Value) {
        json_of(
            api(
                fake,
                reqwest::Method::GET,
                &format!("/v1/messages/batches/{id}"),
            )
            .send()
            .await
            .unwrap(),
        )
        .await
    }

    fn batch_body() -> Value {
        serde_json::json!({"requests": [
            {"custom_id": "a", "params": {"model": "claude-test-1", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}},
            {"custom_id": "b", "params": {"model": "invalid-model", "max_tokens": 64,
                "messages": [{"role": "user", "content": "hi"}]}},
            {"custom_id": "c", "params": {"model": "claude-test-2",
                "messages": [{"role": "user", "content": "a longer question"}]}},
        ]})
    }

    fn counts(v: &Value) -> [u64; 5] {
        let c = &v["request_counts"];
        ["processing", "succeeded", "errored", "canceled", "expired"]
            .map(|k| c[k].as_u64().unwrap())
    }

    fn time_of(v: &Value) -> OffsetDateTime {
        OffsetDateTime::parse(v.as_str().unwrap(), &Rfc3339).unwrap()
    }

    async fn results(fake: &FakeUpstream, id: &str) -> reqwest::Response {
        api(
            fake,
            reqwest::Method::GET,
            &format!("/v1/messages/batches/{id}/results"),
        )
        .send()
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn batch_lifecycle_from_in_progress_to_results() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.set_batch_duration(Duration::from_secs(3600));
        let raw = api(&fake, reqwest::Method::POST, "/v1/messages/batches")
            .json(&batch_body())
            .send()
            .await
            .unwrap();
        assert_eq!(raw.status(), 200);
        assert_eq!(raw.headers()["content-type"], "application/json");
        let raw = raw.text().await.unwrap();
        assert!(raw.starts_with(r#"{"id":"msgbatch_01"#), "{raw}");
        let created: Value = serde_json::from_str(&raw).unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        assert_eq!(id.len(), "msgbatch_01".len() + 22);
        assert!(
            id["msgbatch_01".len()..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
        assert_eq!(created["type"], "message_batch");
        assert_eq!(created["processing_status"], "in_progress");
        assert_eq!(counts(&created), [3, 0, 0, 0, 0]);
        for key in [
            "ended_at",
            "archived_at",
            "cancel_initiated_at",
            "results_url",
        ] {
            assert!(created[key].is_null(), "{key}");
        }
        let created_at = time_of(&created["created_at"]);
        assert_eq!(
            time_of(&created["expires_at"]) - created_at,
            time::Duration::DAY
        );
        assert_eq!(fake.batch_ids(), [id.as_str()]);
        assert_eq!(fake.batch_results_usage(&id), None);

        let resp = results(&fake, &id).await;
        assert_eq!(resp.status(), 400, "no results while in progress");
        let (status, still) = get_batch(&fake, &id).await;
        assert_eq!((status, still), (200, created.clone()));

        fake.end_batch(&id);
        let (status, ended) = get_batch(&fake, &id).await;
        assert_eq!(status, 200);
        assert_eq!(ended["processing_status"], "ended");
        assert_eq!(counts(&ended), [0, 2, 1, 0, 0]);
        assert!(time_of(&ended["ended_at"]) >= created_at);
        assert!(ended["cancel_initiated_at"].is_null());
        assert_eq!(
            ended["results_url"],
            format!("https://api.anthropic.com/v1/messages/batches/{id}/results")
        );

        let resp = results(&fake, &id).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/binary");
        let body = resp.text().await.unwrap();
        assert!(body.ends_with('\n'));
        let lines: Vec<Value> = body
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ids: Vec<&str> = lines
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert!(body.starts_with(r#"{"custom_id":"a","result":{"type":"succeeded","#));
        let message = &lines[0]["result"]["message"];
        assert!(message["id"].as_str().unwrap().starts_with("msg_01"));
        assert_eq!(message["type"], "message");
        assert_eq!(message["model"], "claude-test-1");
        assert_eq!(message["content"][0]["text"], "Hello");
        assert_eq!(message["stop_reason"], "end_turn");
        let mut expected = Usage::default();
        let sent = batch_body();
        for (line, request) in [(&lines[0], 0), (&lines[2], 2)] {
            let params = &sent["requests"][request]["params"];
            let usage = usage_from_request(params, serde_json::to_vec(params).unwrap().len());
            let got = &line["result"]["message"]["usage"];
            assert_eq!(got["input_tokens"], usage.input_tokens);
            assert_eq!(got["output_tokens"], usage.output_tokens);
            assert_eq!(got["cache_read_input_tokens"], 0);
            expected.input_tokens += usage.input_tokens;
            expected.output_tokens += usage.output_tokens;
        }
        assert_eq!(lines[0]["result"]["message"]["usage"]["output_tokens"], 5);
        assert_eq!(lines[2]["result"]["message"]["usage"]["output_tokens"], 12);
        assert_eq!(
            lines[1],
            serde_json::json!({"custom_id": "b", "result": {"type": "errored", "error": {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "model not found"}}}})
        );
        assert_eq!(fake.batch_results_usage(&id), Some(expected));

        // Results are stable across fetches.
        let again = results(&fake, &id).await.text().await.unwrap();
        assert_eq!(again, body);
    }

    #[tokio::test]
    async fn zero_duration_batch_ends_at_once() {
        let fake = FakeUpstream::start().await.unwrap();
        let created = post_batch(&fake, &batch_body()).await;
        assert_eq!(created["processing_status"], "ended");
        assert_eq!(created["ended_at"], created["created_at"]);
        assert_eq!(counts(&created), [0, 2, 1, 0, 0]);
        let id = created["id"].as_str().unwrap();
        assert_eq!(results(&fake, id).await.status(), 200);

        fake.set_batch_duration(Duration::from_millis(150));
        let created = post_batch(&fake, &batch_body()).await;
        assert_eq!(created["processing_status"], "in_progress");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, ended) = get_batch(&fake, created["id"].as_str().unwrap()).await;
        assert_eq!(ended["processing_status"], "ended");
        assert_eq!(
            time_of(&ended["ended_at"]) - time_of(&ended["created_at"]),
            time::Duration::milliseconds(150)
        );
    }

    #[tokio::test]
    async fn canceled_batch_ends_with_every_request_canceled() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.set_batch_duration(Duration::from_secs(3600));
        let id = post_batch(&fake, &batch_body()).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let path = format!("/v1/messages/batches/{id}/cancel");
        let (status, canceled) = json_of(
            api(&fake, reqwest::Method::POST, &path)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(canceled["processing_status"], "ended");
        assert_eq!(counts(&canceled), [0, 0, 0, 3, 0]);
        assert!(!canceled["cancel_initiated_at"].is_null());
        assert_eq!(canceled["ended_at"], canceled["cancel_initiated_at"]);

        let body = results(&fake, &id).await.text().await.unwrap();
        let expected: String = ["a", "b", "c"]
            .map(|c| format!("{{\"custom_id\":\"{c}\",\"result\":{{\"type\":\"canceled\"}}}}\n"))
            .concat();
        assert_eq!(body, expected);
        assert_eq!(fake.batch_results_usage(&id), Some(Usage::default()));

        // A second cancel, or ending it, changes nothing.
        let (_, again) = json_of(
            api(&fake, reqwest::Method::POST, &path)
                .send()
                .await
                .unwrap(),
        )
        .await;
        fake.end_batch(&id);
        assert_eq!(again, canceled);
        assert_eq!(get_batch(&fake, &id).await.1, canceled);
    }

    #[tokio::test]
    async fn batch_delete_is_refused_until_it_ends() {
        let fake = FakeUpstream::start().await.unwrap();
        fake.set_batch_duration(Duration::from_secs(3600));
        let id = post_batch(&fake, &batch_body()).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let path = format!("/v1/messages/batches/{id}");
        let (status, v) = json_of(
            api(&fake, reqwest::Method::DELETE, &path)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("must end"));
        assert_eq!(fake.batch_ids(), [id.as_str()]);

        fake.end_batch(&id);
        let resp = api(&fake, reqwest::Method::DELETE, &path)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let raw = resp.text().await.unwrap();
        assert_eq!(
            raw,
            format!(r#"{{"id":"{id}","type":"message_batch_deleted"}}"#)
        );
        assert!(fake.batch_ids().is_empty());
        assert_eq!(fake.batch_results_usage(&id), None);

        for (method, path) in [
            (reqwest::Method::GET, path.clone()),
            (reqwest::Method::DELETE, path.clone()),
            (reqwest::Method::POST, format!("{path}/cancel")),
            (reqwest::Method::GET, format!("{path}/results")),
        ] {
            let (status, v) =
                json_of(api(&fake, method.clone(), &path).send().await.unwrap()).await;
            assert_eq!(status, 404, "{method} {path}");
            assert_eq!(v["error"]["type"], "not_found_error");
        }
    }

    #[tokio::test]
    async fn batch_list_is_newest_first_and_pages() {
        let fake = FakeUpstream::start().await.unwrap();
        let list = |query: &str| {
            let request = api(
                &fake,
                reqwest::Method::GET,
                &format!("/v1/messages/batches{query}"),
            );
            async move { json_of(request.send().await.unwrap()).await }
        };
        let (status, empty) = list("").await;
        assert_eq!(status, 200);
        assert_eq!(
            empty,
            serde_json::json!({"data": [], "has_more": false, "first_id": null, "last_id": null})
        );

        for _ in 0..3 {
            post_batch(&fake, &batch_body()).await;
        }
        let mut newest_first = fake.batch_ids();
        newest_first.reverse();
        let ids = |page: &Value| -> Vec<String> {
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let (_, all) = list("").await;
        assert_eq!(ids(&all), newest_first);
        assert_eq!(all["has_more"], false);
        assert_eq!(all["first_id"], newest_first[0]);
        assert_eq!(all["last_id"], newest_first[2]);
        assert_eq!(all["data"][0]["type"], "message_batch");

        let (_, first) = list("?limit=2").await;
        assert_eq!(ids(&first), newest_first[..2]);
        assert_eq!(first["has_more"], true);
        let (_, second) = list(&format!("?limit=2&after_id={}", newest_first[1])).await;
        assert_eq!(ids(&second), newest_first[2..]);
        assert_eq!(second["has_more"], false);
        let (_, back) = list(&format!("?limit=1&before_id={}", newest_first[2])).await;
        assert_eq!(ids(&back), newest_first[1..2]);
        assert_eq!(back["has_more"], true);

        for bad in ["?limit=0", "?limit=x", "?after_id=msgbatch_01nope"] {
            assert_eq!(list(bad).await.0, 400, "{bad}");
        }
    }

    #[tokio::test]
    async fn malformed_batch_bodies_are_rejected() {
        let fake = FakeUpstream::start().await.unwrap();
        let bodies = [
            serde_json::json!({}),
            serde_json::json!({"requests": []}),
            serde_json::json!({"requests": {"custom_id": "a", "params": {}}}),
            serde_json::json!({"requests": ["a"]}),
            serde_json::json!({"requests": [{"custom_id": 1, "params": {}}]}),
            serde_json::json!({"requests": [{"custom_id": "a"}]}),
            serde_json::json!({"requests": [{"custom_id": "a", "params": []}]}),
        ];
        for body in &bodies {
            let (status, v) = json_of(
                api(&fake, reqwest::Method::POST, "/v1/messages/batches")
                    .json(body)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(status, 400, "{body}");
            assert_eq!(v["error"]["type"], "invalid_request_error");
        }
        let resp = api(&fake, reqwest::Method::POST, "/v1/messages/batches")
            .body("not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert!(fake.batch_ids().is_empty());
        assert_eq!(fake.requests().len(), bodies.len() + 1, "all recorded");
    }

    #[tokio::test]
    async fn batch_and_file_routes_need_the_key_and_are_recorded() {
        let fake = FakeUpstream::start().await.unwrap();
        for path in ["/v1/messages/batches", "/v1/files"] {
            let resp = client()
                .post(format!("{}{path}", fake.base_url()))
                .header("x-api-key", "sk-ant-wrong")
                .json(&batch_body())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 401, "{path}");
        }
        assert!(fake.batch_ids().is_empty());
        let paths: Vec<String> = fake.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/v1/messages/batches", "/v1/files"]);
    }

    const BOUNDARY: &str = "----fake-boundary-7MA4YWxk";

    /// A multipart body with one `file` part (and a decoy field before it).
    fn multipart(disposition: &str, content_type: &str, content: &[u8]) -> Vec<u8> {
        let mut body = format!(
            "preamble to ignore\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n--{BOUNDARY}  \r\n"
        )
        .into_bytes();
        body.extend(format!("Content-Disposition: {disposition}\r\n").into_bytes());
        body.extend(format!("Content-Type: {content_type}\r\n\r\n").into_bytes());
        body.extend_from_slice(content);
        body.extend(format!("\r\n--{BOUNDARY}--\r\nepilogue").into_bytes());
        body
    }

    fn upload(fake: &FakeUpstream, content_type: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
        api(fake, reqwest::Method::POST, "/v1/files")
            .header("anthropic-beta", "files-api-2025-04-14")
            .header("content-type", content_type)
            .body(body)
    }

    fn form_type() -> String {
        format!("multipart/form-data; boundary=\"{BOUNDARY}\"")
    }

    /// Bytes that look like line ends, partial delimiters and headers.
    fn tricky_bytes() -> Vec<u8> {
        let mut bytes = b"\r\n\r\n--".to_vec();
        bytes.extend(format!("\r\n--{}", &BOUNDARY[..10]).into_bytes());
        bytes.extend([0, 0xff, b'\r', 0xfe, b'\n', b'\r']);
        bytes.extend(b"Content-Type: nope\r\n\r\n\r\n");
        bytes
    }

    #[tokio::test]
    async fn file_upload_round_trips_binary_bytes() {
        let fake = FakeUpstream::start().await.unwrap();
        let content = tricky_bytes();
        let body = multipart(
            r#"form-data; name="file"; filename="we\"ird; name.bin""#,
            "application/octet-stream",
            &content,
        );
        let resp = upload(&fake, &form_type(), body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let raw = resp.text().await.unwrap();
        assert!(raw.starts_with(r#"{"id":"file_011"#), "{raw}");
        let meta: Value = serde_json::from_str(&raw).unwrap();
        let id = meta["id"].as_str().unwrap().to_owned();
        assert_eq!(id.len(), "file_011".len() + 22);
        assert_eq!(meta["type"], "file");
        assert_eq!(meta["filename"], "we\"ird; name.bin");
        assert_eq!(meta["mime_type"], "application/octet-stream");
        assert_eq!(meta["size_bytes"], content.len());
        assert_eq!(meta["downloadable"], true);
        assert!(time_of(&meta["created_at"]) <= OffsetDateTime::now_utc());
        assert_eq!(fake.file_ids(), [id.as_str()]);

        let (status, got) = json_of(
            api(&fake, reqwest::Method::GET, &format!("/v1/files/{id}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, &got), (200, &meta));
        let resp = api(
            &fake,
            reqwest::Method::GET,
            &format!("/v1/files/{id}/content"),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        assert_eq!(resp.bytes().await.unwrap(), content);

        // Empty content, a plain-text type and an RFC 5987 filename.
        let body = multipart(
            "form-data; name=file; filename*=UTF-8''h%C3%A9llo%20%E2%9C%93.txt",
            "text/plain; charset=utf-8",
            b"",
        );
        let (status, meta) = json_of(upload(&fake, &form_type(), body).send().await.unwrap()).await;
        assert_eq!(status, 200, "{meta}");
        assert_eq!(meta["filename"], "héllo ✓.txt");
        assert_eq!(meta["size_bytes"], 0);
        let resp = api(
            &fake,
            reqwest::Method::GET,
            &format!("/v1/files/{}/content", meta["id"].as_str().unwrap()),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
        assert!(resp.bytes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn file_list_delete_and_unknown_ids() {
        let fake = FakeUpstream::start().await.unwrap();
        for name in ["a.txt", "b.txt", "c.txt"] {
            let body = multipart(
                &format!(r#"form-data; name="file"; filename="{name}""#),
                "text/plain",
                name.as_bytes(),
            );
            assert_eq!(
                upload(&fake, &form_type(), body)
                    .send()
                    .await
                    .unwrap()
                    .status(),
                200
            );
        }
        let ids = fake.file_ids();
        let (status, list) = json_of(
            api(&fake, reqwest::Method::GET, "/v1/files?limit=2")
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200);
        let names: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["filename"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["c.txt", "b.txt"]);
        assert_eq!(list["has_more"], true);
        assert_eq!(list["first_id"], ids[2]);
        assert_eq!(list["last_id"], ids[1]);

        let path = format!("/v1/files/{}", ids[1]);
        let resp = api(&fake, reqwest::Method::DELETE, &path)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.text().await.unwrap(),
            format!(r#"{{"id":"{}","type":"file_deleted"}}"#, ids[1])
        );
        assert_eq!(fake.file_ids(), [ids[0].clone(), ids[2].clone()]);
        for (method, path) in [
            (reqwest::Method::GET, path.clone()),
            (reqwest::Method::GET, format!("{path}/content")),
            (reqwest::Method::DELETE, path.clone()),
        ] {
            let (status, v) =
                json_of(api(&fake, method.clone(), &path).send().await.unwrap()).await;
            assert_eq!(status, 404, "{method} {path}");
            assert_eq!(v["error"]["type"], "not_found_error");
        }
    }

    #[tokio::test]
    async fn garbled_uploads_are_rejected() {
        let fake = FakeUpstream::start().await.unwrap();
        let good = || {
            multipart(
                r#"form-data; name="file"; filename="a""#,
                "text/plain",
                b"x",
            )
        };
        let unclosed = {
            let mut body = good();
            body.truncate(body.len() - "--\r\nepilogue".len() - BOUNDARY.len() - 4);
            body
        };
        let cases: Vec<(String, Vec<u8>)> = vec![
            ("application/json".to_owned(), good()),
            ("multipart/form-data".to_owned(), good()),
            ("multipart/form-data; boundary=other".to_owned(), good()),
            (form_type(), unclosed),
            (form_type(), multipart(r#"form-data; name="nope"; filename="a""#, "text/plain", b"x")),
            (form_type(), multipart(r#"form-data; name="file""#, "text/plain", b"x")),
            (form_type(), multipart(r#"attachment; name="file"; filename="a""#, "text/plain", b"x")),
            (
                form_type(),
                format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\nx\r\n--{BOUNDARY}--")
                    .into_bytes(),
            ),
        ];
        for (content_type, body) in cases {
            let (status, v) = json_of(
                upload(&fake, &content_type, body.clone())
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(
                status,
                400,
                "{content_type} {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(v["error"]["type"], "invalid_request_error");
        }
        assert!(fake.file_ids().is_empty());
    }

    #[test]
    fn header_params_keep_quoted_semicolons_and_escapes() {
        let (value, params) =
            split_header_params(r#"form-data; NAME="file";filename="a;\"b\\c" ; x=  tok "#);
        assert_eq!(value, "form-data");
        assert_eq!(
            params,
            [
                ("name".to_owned(), "file".to_owned()),
                ("filename".to_owned(), r#"a;"b\c"#.to_owned()),
                ("x".to_owned(), "tok".to_owned()),
            ]
        );
        assert_eq!(decode_ext_value("utf-8'en'%E2%9C%93").unwrap(), "✓");
        assert!(decode_ext_value("utf-8''%E2%9").is_err());
        assert!(decode_ext_value("iso-8859-1''a").is_err());
    }

    #[tokio::test]
    async fn held_create_exists_upstream_before_it_answers() {
        let fake = FakeUpstream::start().await.unwrap();
        for path in ["/v1/messages/batches", "/v1/files"] {
            fake.hold_next_create(Duration::from_millis(400));
            let request = if path == "/v1/files" {
                upload(
                    &fake,
                    &form_type(),
                    multipart(
                        r#"form-data; name="file"; filename="a""#,
                        "text/plain",
                        b"x",
                    ),
                )
            } else {
                api(&fake, reqwest::Method::POST, path).json(&batch_body())
            };
            let started = std::time::Instant::now();
            let pending = tokio::spawn(request.send());
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert!(!pending.is_finished(), "{path}");
            let created = if path == "/v1/files" {
                fake.file_ids()
            } else {
                fake.batch_ids()
            };
            assert_eq!(created.len(), 1, "{path}: created before the answer");
            let (status, v) = json_of(pending.await.unwrap().unwrap()).await;
            assert_eq!(status, 200);
            assert_eq!(v["id"], created[0]);
            assert!(started.elapsed() >= Duration::from_millis(400));

            // The hold is used up.
            let started = std::time::Instant::now();
            let resp = if path == "/v1/files" {
                let body = multipart(
                    r#"form-data; name="file"; filename="b""#,
                    "text/plain",
                    b"y",
                );
                upload(&fake, &form_type(), body).send().await.unwrap()
            } else {
                api(&fake, reqwest::Method::POST, path)
                    .json(&batch_body())
                    .send()
                    .await
                    .unwrap()
            };
            assert_eq!(resp.status(), 200);
            assert!(started.elapsed() < Duration::from_millis(300));
        }
    }
}
