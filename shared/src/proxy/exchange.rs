//! The respond phase: a task that owns the upstream exchange from first
//! attempt to the finish phase, so a client that leaves mid-answer is still
//! billed exactly. The client gets bytes through a channel as they arrive;
//! the task runs in the request's span.

use std::io;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::ProxyState;
use super::finish::{Metering, Outcome, finish, usage_record};
use super::tap::{UsageTap, error_type};
use crate::error::{ApiError, ErrorKind, envelope};
use crate::upstream::{
    BodyStream, ForwardRequest, RetryPolicy, UpstreamError, UpstreamResponse,
    client_response_headers,
};

/// What the handler answers with, decided by the task.
enum Head {
    /// The upstream's status and (filtered) headers; its body follows.
    Upstream(StatusCode, HeaderMap),
    /// A streamed answer was slow to start: 200 and SSE keep-alives now,
    /// the upstream's events (or an error event) later.
    Keepalive,
    /// No upstream answer: the relay's own error.
    Error(ApiError),
}

type Chunk = Result<Bytes, io::Error>;

/// One exchange with the upstream, as the task runs it.
pub(super) struct Exchange {
    pub state: ProxyState,
    pub forward: ForwardRequest,
    /// How the answer is metered; `None` for a free route.
    pub metering: Option<Metering>,
    pub streamed: bool,
    pub started: Instant,
}

impl Exchange {
    /// A free exchange: forwarded and streamed back, nothing metered.
    pub(super) fn unmetered(state: ProxyState, forward: ForwardRequest, started: Instant) -> Self {
        Exchange {
            state,
            forward,
            metering: None,
            streamed: false,
            started,
        }
    }
}

/// Starts the task and answers as soon as it knows the status.
pub(super) async fn start(exchange: Exchange) -> Response {
    let (head_tx, head_rx) = oneshot::channel();
    let (body_tx, body_rx) = mpsc::channel::<Chunk>(16);
    tokio::spawn(exchange.run(head_tx, body_tx).in_current_span());
    let body = || {
        Body::from_stream(futures_util::stream::unfold(body_rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        }))
    };
    match head_rx.await {
        Ok(Head::Upstream(status, headers)) => {
            let mut response = Response::new(body());
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Ok(Head::Keepalive) => {
            let mut response = Response::new(body());
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
        Ok(Head::Error(err)) => err.into_response(),
        Err(_) => ApiError::internal(anyhow::anyhow!("relay task ended without an answer"))
            .into_response(),
    }
}

/// The client's end of the body channel; `None` once the client has gone.
struct ClientSink {
    tx: Option<mpsc::Sender<Chunk>>,
    /// A client that stops reading for this long is treated as gone.
    stall_limit: Duration,
}

impl ClientSink {
    /// Passes bytes on; `false` if the client is (now) gone.
    async fn send(&mut self, bytes: Bytes) -> bool {
        let Some(tx) = &self.tx else { return false };
        if tx.send_timeout(Ok(bytes), self.stall_limit).await.is_err() {
            self.tx = None;
        }
        self.tx.is_some()
    }

    fn gone(&self) -> bool {
        self.tx.is_none()
    }

    /// Breaks the client's connection: a truncated JSON body must not look complete.
    async fn abort(&mut self, reason: &str) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Err(io::Error::other(reason.to_owned()))).await;
        }
    }
}

fn sse_error(err: &ApiError) -> Bytes {
    Bytes::from(format!("event: error\ndata: {}\n\n", err.envelope()))
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Exchange {
    /// Sends upstream, answers the client, pumps the body, then finishes a
    /// metered request.
    async fn run(self, head_tx: oneshot::Sender<Head>, body_tx: mpsc::Sender<Chunk>) {
        let mut head = Some(head_tx);
        let mut client = ClientSink {
            tx: Some(body_tx),
            stall_limit: self.state.0.upstream.config().idle_timeout,
        };
        let sent = self.send(&mut head, &mut client).await;
        let ttfb = self.started.elapsed();
        let outcome = match sent {
            Err(err) => no_answer(err, head, &mut client).await,
            Ok(response) => self.respond(response, head, &mut client, ttfb).await,
        };
        let Exchange {
            state,
            forward,
            metering,
            started,
            ..
        } = self;
        if let Some(metering) = metering {
            let settle_first = metering.settle_before_answer_ends;
            let prices = state.prices_at_settlement().await;
            let record = usage_record(metering, outcome, forward.body, started, &prices).await;
            finish(&state, record, client, settle_first).await;
        }
    }

    /// The upstream's answer (or why there is none). A streamed answer slow
    /// to start is committed as 200 and kept alive with SSE comments.
    async fn send(
        &self,
        head: &mut Option<oneshot::Sender<Head>>,
        client: &mut ClientSink,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let config = &self.state.0.config;
        let send = self
            .state
            .0
            .upstream
            .send(&self.forward, RetryPolicy::Retryable);
        if !self.streamed {
            return send.await;
        }
        tokio::pin!(send);
        let mut tick = tokio::time::Instant::now() + config.keepalive_after;
        loop {
            tokio::select! {
                outcome = &mut send => return outcome,
                () = tokio::time::sleep_until(tick) => {
                    if let Some(tx) = head.take() {
                        let _ = tx.send(Head::Keepalive);
                    }
                    client.send(Bytes::from_static(b": keepalive\n\n")).await;
                    tick += config.keepalive_interval;
                }
            }
        }
    }

    /// Passes the upstream's answer on, reading its usage as it passes.
    async fn respond(
        &self,
        response: UpstreamResponse,
        head: Option<oneshot::Sender<Head>>,
        client: &mut ClientSink,
        ttfb: Duration,
    ) -> Outcome {
        let status = response.status;
        let mut tap = UsageTap::new(
            header_str(&response.headers, header::CONTENT_TYPE),
            header_str(&response.headers, header::CONTENT_ENCODING),
        );
        match head {
            // The client already has a 200: the upstream's error becomes an
            // error event, its envelope kept.
            None if !status.is_success() => {
                error_event(response.body, status, &mut tap, client).await;
            }
            head => {
                if let Some(tx) = head {
                    let _ = tx.send(Head::Upstream(
                        status,
                        client_response_headers(&response.headers),
                    ));
                }
                let charged = self.metering.is_some();
                let drain = self.state.0.config.disconnect_drain;
                pump(response.body, &mut tap, client, charged, drain).await;
            }
        }
        Outcome::Answered {
            status,
            retries: response.retries,
            ttfb,
            tap: Box::new(tap),
        }
    }
}

/// The relay's own answer when the upstream gave none: an error response,
/// or an SSE error event once the stream is committed.
async fn no_answer(
    err: UpstreamError,
    head: Option<oneshot::Sender<Head>>,
    client: &mut ClientSink,
) -> Outcome {
    let cause = err.to_string();
    let answer = ApiError::from(err);
    let rendering = answer.rendering();
    tracing::warn!(error = %cause, status = rendering.status.as_u16(), "no upstream answer");
    let outcome = Outcome::NoAnswer {
        status: rendering.status.as_u16(),
        error_type: rendering.kind.as_str().to_owned(),
    };
    match head {
        Some(tx) => {
            let _ = tx.send(Head::Error(answer));
        }
        None => {
            client.send(sse_error(&answer)).await;
        }
    }
    outcome
}

/// An upstream error status after the client was committed to 200.
async fn error_event(
    body: BodyStream,
    status: StatusCode,
    tap: &mut UsageTap,
    client: &mut ClientSink,
) {
    let body = collect_bounded(body, 64 * 1024).await;
    let envelope = error_type(&body)
        .map(|_| String::from_utf8_lossy(&body).into_owned())
        .unwrap_or_else(|| {
            envelope(ErrorKind::Api, &format!("upstream answered {status}")).to_string()
        });
    tap.feed(&body);
    client
        .send(Bytes::from(format!(
            "event: error\ndata: {}\n\n",
            envelope.replace('\n', "")
        )))
        .await;
}

/// Moves the upstream body to the client chunk by chunk, feeding the tap.
/// If the client leaves, a charged answer is read on (for at most `drain`)
/// until its usage is known.
async fn pump(
    mut body: BodyStream,
    tap: &mut UsageTap,
    client: &mut ClientSink,
    charged: bool,
    drain: Duration,
) {
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match drain_deadline {
            None => body.next().await,
            Some(deadline) => match tokio::time::timeout_at(deadline, body.next()).await {
                Ok(next) => next,
                Err(_) => {
                    tracing::warn!("gave up reading for usage after the client left");
                    return;
                }
            },
        };
        match next {
            None => return,
            Some(Ok(chunk)) => {
                tap.feed(&chunk);
                if !client.send(chunk).await && drain_deadline.is_none() {
                    if !charged {
                        return;
                    }
                    tracing::info!("client left mid-answer; reading on for usage");
                    drain_deadline = Some(tokio::time::Instant::now() + drain);
                }
                if client.gone() && tap.usage_complete() {
                    return;
                }
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, "upstream answer cut short");
                if tap.is_sse() {
                    let answer = ApiError::UpstreamFailed(
                        "the Anthropic API's answer was cut off; retry the request".into(),
                    );
                    client.send(sse_error(&answer)).await;
                } else {
                    client.abort("upstream answer cut short").await;
                }
                return;
            }
        }
    }
}

async fn collect_bounded(mut body: BodyStream, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= limit {
            break;
        }
    }
    out
}
