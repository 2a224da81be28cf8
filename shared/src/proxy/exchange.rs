//! The respond phase: a task that owns the upstream exchange from first
//! attempt to the finish phase, so a client that leaves mid-answer is still
//! billed exactly. The client gets bytes through a channel as they arrive;
//! the task runs in the request's span.

use std::io;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::finish::{Metering, Outcome, finish, usage_record};
use super::tap::{UsageTap, error_type};
use super::{ProxyState, upstreams};
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
    /// Sent to the pool's upstreams in the order chosen for it; `None`:
    /// to the home Anthropic upstream (`Upstream::home`).
    pub pooled: Option<PoolChoice>,
}

/// What chooses a request's upstreams: the model they must serve and the
/// Claude Code session that keeps it on one of them.
pub(super) struct PoolChoice {
    pub model: Option<String>,
    pub session: Option<String>,
}

impl Exchange {
    /// A free exchange to the home upstream: forwarded and streamed back,
    /// nothing metered.
    pub(super) fn unmetered(state: ProxyState, forward: ForwardRequest, started: Instant) -> Self {
        Exchange {
            state,
            forward,
            metering: None,
            streamed: false,
            started,
            pooled: None,
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
        let upstream = &self.state.0.upstream;
        let send = async {
            match &self.pooled {
                Some(choice) => {
                    let order = upstreams::candidates_for(
                        &self.state,
                        choice.model.as_deref(),
                        choice.session.as_deref(),
                    )
                    .await?;
                    let health = upstreams::SharedHealth::of(&self.state);
                    upstream
                        .send_to(&self.forward, RetryPolicy::Retryable, &order, &health)
                        .await
                }
                None => upstream.send(&self.forward, RetryPolicy::Retryable).await,
            }
        };
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
                let limits = PumpLimits {
                    charged: self.metering.is_some(),
                    drain: self.state.0.config.disconnect_drain,
                    // The host cuts a response at its cap (API Gateway: 15
                    // minutes); a stream still running near it is ended by
                    // the relay first, cleanly and retryably.
                    deadline: tap.is_sse().then(|| {
                        tokio::time::Instant::from_std(self.started)
                            + self.state.0.config.stream_deadline
                    }),
                };
                pump(response.body, &mut tap, client, limits).await;
            }
        }
        Outcome::Answered {
            status,
            retries: response.retries,
            ttfb,
            tap: Box::new(tap),
            upstream: response.upstream,
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

/// How long `pump` goes on.
struct PumpLimits {
    /// The answer is metered: read on for its usage after the client left…
    charged: bool,
    /// …for at most this long.
    drain: Duration,
    /// A stream still running then is ended by the relay
    /// (`ProxyConfig::stream_deadline` after the request arrived).
    deadline: Option<tokio::time::Instant>,
}

/// Moves the upstream body to the client chunk by chunk, feeding the tap.
/// If the client leaves, a charged answer is read on (for at most `drain`)
/// until its usage is known. A stream that reaches the deadline is ended
/// with an `overloaded_error` event and charged what it streamed (the rest
/// of its usage estimated from the deltas seen).
async fn pump(
    mut body: BodyStream,
    tap: &mut UsageTap,
    client: &mut ClientSink,
    limits: PumpLimits,
) {
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    // The start of an event not yet whole, held back so that an event of
    // the relay's own (the cap, a cut answer) never lands inside one. A
    // client acts on an event only once it is whole, so this delays
    // nothing it could use.
    let mut partial = BytesMut::new();
    loop {
        let until = match (drain_deadline, limits.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let next = match until {
            None => body.next().await,
            Some(until) => match tokio::time::timeout_at(until, body.next()).await {
                Ok(next) => next,
                Err(_) if limits.deadline == Some(until) => {
                    end_at_the_cap(tap, client).await;
                    return;
                }
                Err(_) => {
                    tracing::warn!("gave up reading for usage after the client left");
                    return;
                }
            },
        };
        match next {
            None => {
                // A stream that ended without a blank line: as it is.
                if !partial.is_empty() {
                    client.send(partial.freeze()).await;
                }
                return;
            }
            Some(Ok(chunk)) => {
                tap.feed(&chunk);
                let ready = if tap.takes_own_events() {
                    whole_events(&mut partial, chunk)
                } else {
                    chunk
                };
                let delivered = ready.is_empty() || client.send(ready).await;
                if !delivered && drain_deadline.is_none() {
                    if !limits.charged {
                        return;
                    }
                    tracing::info!("client left mid-answer; reading on for usage");
                    drain_deadline = Some(tokio::time::Instant::now() + limits.drain);
                }
                if client.gone() && tap.usage_complete() {
                    return;
                }
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, "upstream answer cut short");
                if tap.takes_own_events() {
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

/// The whole events of what was held back and `chunk`; what follows the
/// last of them is held back in `partial`.
fn whole_events(partial: &mut BytesMut, chunk: Bytes) -> Bytes {
    if partial.is_empty() && event_end(&chunk, 0) == Some(chunk.len()) {
        return chunk;
    }
    // `partial` holds no event end: only the bytes from just before the
    // new chunk on need searching.
    let from = partial.len().saturating_sub(3);
    partial.extend_from_slice(&chunk);
    match event_end(partial, from) {
        Some(end) => partial.split_to(end).freeze(),
        None => Bytes::new(),
    }
}

/// Where the last whole event in `bytes` ends (just after the blank line
/// that ends it: `\n\n`, `\r\r` or `\r\n\r\n`), looking from `from` on.
fn event_end(bytes: &[u8], from: usize) -> Option<usize> {
    (from.max(1)..bytes.len()).rev().find_map(|i| {
        let ends = match (bytes[i - 1], bytes[i]) {
            (b'\n', b'\n') | (b'\r', b'\r') => true,
            (b'\r', b'\n') => i >= 3 && &bytes[i - 3..=i] == b"\r\n\r\n",
            _ => false,
        };
        ends.then_some(i + 1)
    })
}

/// Ends a stream that reached the host's response cap: an
/// `overloaded_error` event the clients retry (Claude Code and the SDKs
/// treat it as transient), then the end of the body. Dropping the upstream
/// body closes its connection, so the upstream stops generating.
async fn end_at_the_cap(tap: &mut UsageTap, client: &mut ClientSink) {
    tracing::warn!("streamed answer reached the response time cap: ended by the relay");
    let kind = ErrorKind::Overloaded;
    tap.relay_error(kind.as_str());
    if tap.takes_own_events() {
        let message = "the answer ran into the 15-minute limit on one response (API Gateway's) \
                       and was ended by the relay; retry, or ask for a shorter answer (a lower \
                       max_tokens; Claude Code: CLAUDE_CODE_MAX_OUTPUT_TOKENS)";
        client
            .send(Bytes::from(format!(
                "event: error\ndata: {}\n\n",
                envelope(kind, message)
            )))
            .await;
    } else {
        // A compressed stream cannot take an event of ours.
        client.abort("response time cap reached").await;
    }
}

pub(super) async fn collect_bounded(mut body: BodyStream, limit: usize) -> Vec<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_events_pass_and_the_rest_waits_for_its_end() {
        let mut partial = BytesMut::new();
        let whole = Bytes::from_static(b"event: a\ndata: {}\n\n");
        // Whole events pass as they are.
        assert_eq!(whole_events(&mut partial, whole.clone()), whole);
        // A cut event waits, whatever the line ends, and goes out whole.
        for (first, second) in [
            (&b"event: a\ndata: {\"x\""[..], &b":1}\n\nevent: b\nda"[..]),
            (b"event: a\r\ndata: {}\r\n\r", b"\nevent: b\r\nda"),
            (b"event: a\rdata: {}\r", b"\revent: b\rda"),
        ] {
            let mut partial = BytesMut::new();
            assert!(whole_events(&mut partial, Bytes::copy_from_slice(first)).is_empty());
            let out = whole_events(&mut partial, Bytes::copy_from_slice(second));
            let mut both = first.to_vec();
            both.extend_from_slice(second);
            assert!(
                [&b"\n\n"[..], b"\r\r", b"\r\n\r\n"]
                    .iter()
                    .any(|end| out.ends_with(end)),
                "{out:?}"
            );
            assert_eq!([&out[..], &partial[..]].concat(), both);
            assert!(partial.starts_with(b"event: b"), "{partial:?}");
        }
    }
}
