//! One admitted request: a task that owns the upstream exchange from first
//! attempt to settlement, so a client that leaves mid-answer is still billed
//! exactly. The client gets bytes through a channel as they arrive.

use std::io;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::{mpsc, oneshot};

use super::tap::{UsageTap, error_type};
use super::{ProxyState, SettleTiming};
use crate::domain::usage::UsageRecord;
use crate::domain::usage::complete_with_estimate;
use crate::error::{ApiError, ErrorKind};
use crate::store::{Store, StoreError};
use crate::upstream::{ForwardRequest, RetryPolicy, UpstreamError, client_response_headers};

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

/// Starts the task and answers as soon as it knows the status.
pub(super) async fn start(
    state: ProxyState,
    forward: ForwardRequest,
    record: Option<UsageRecord>,
    streamed: bool,
    started: Instant,
) -> Response {
    let (head_tx, head_rx) = oneshot::channel();
    let (body_tx, body_rx) = mpsc::channel::<Chunk>(16);
    tokio::spawn(run(
        state, forward, record, streamed, started, head_tx, body_tx,
    ));
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

/// The relay's answer when the upstream gave none.
pub(super) fn upstream_failure(err: &UpstreamError) -> ApiError {
    match err {
        UpstreamError::Unreachable { .. } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            ErrorKind::Api,
            "the relay could not reach the Anthropic API; retry shortly",
        ),
        UpstreamError::Timeout(after) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Api,
            format!("the Anthropic API did not answer within {} seconds", after.as_secs()),
        ),
        UpstreamError::CredentialsRejected => ApiError::new(
            StatusCode::BAD_GATEWAY,
            ErrorKind::Api,
            "the Anthropic API rejected the relay's upstream key; ask your relay admin to update it",
        )
        .with_should_retry(false),
        UpstreamError::NoCredentials => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Api,
            "the relay has no upstream API key configured; ask your relay admin",
        )
        .with_should_retry(false),
        UpstreamError::Secrets(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Overloaded,
            "the relay's secret store is unavailable; retry shortly",
        ),
        UpstreamError::PathMismatch(_) => ApiError::bad_request(
            "the request path would not reach the upstream as written; send it in canonical form",
        ),
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn run(
    state: ProxyState,
    forward: ForwardRequest,
    mut record: Option<UsageRecord>,
    streamed: bool,
    started: Instant,
    head_tx: oneshot::Sender<Head>,
    body_tx: mpsc::Sender<Chunk>,
) {
    let inner = &state.0;
    let config = &inner.config;
    let upstream_config = inner.upstream.config();
    let mut head = Some(head_tx);
    let mut client = ClientSink {
        tx: Some(body_tx),
        stall_limit: upstream_config.idle_timeout,
    };

    let send = inner.upstream.send(&forward, RetryPolicy::Retryable);
    tokio::pin!(send);
    let outcome = if streamed {
        let mut tick = tokio::time::Instant::now() + config.keepalive_after;
        loop {
            tokio::select! {
                outcome = &mut send => break outcome,
                () = tokio::time::sleep_until(tick) => {
                    if let Some(tx) = head.take() {
                        let _ = tx.send(Head::Keepalive);
                    }
                    client.send(Bytes::from_static(b": keepalive\n\n")).await;
                    tick += config.keepalive_interval;
                }
            }
        }
    } else {
        send.await
    };
    let committed = head.is_none();
    let ttfb = started.elapsed();

    let mut tap = None;
    match outcome {
        Err(err) => {
            let answer = upstream_failure(&err);
            tracing::warn!(error = %err, status = answer.status.as_u16(), "no upstream answer");
            if let Some(record) = &mut record {
                record.status = answer.status.as_u16();
                record.error_type = Some(answer.kind.as_str().to_owned());
            }
            match head.take() {
                Some(tx) => {
                    let _ = tx.send(Head::Error(answer));
                }
                None => {
                    client.send(sse_error(&answer)).await;
                }
            }
        }
        Ok(response) => {
            let status = response.status;
            if let Some(record) = &mut record {
                record.status = status.as_u16();
                record.retries = response.retries;
                record.ttfb_ms = Some(millis(ttfb));
            }
            let mut usage_tap = UsageTap::new(
                header_str(&response.headers, header::CONTENT_TYPE),
                header_str(&response.headers, header::CONTENT_ENCODING),
            );
            if committed && !status.is_success() {
                // The client already has a 200: the upstream's error
                // becomes an error event, its envelope kept.
                let body = collect_bounded(response.body, 64 * 1024).await;
                let envelope = error_type(&body)
                    .map(|_| String::from_utf8_lossy(&body).into_owned())
                    .unwrap_or_else(|| {
                        ApiError::new(
                            status,
                            ErrorKind::Api,
                            format!("upstream answered {status}"),
                        )
                        .envelope()
                        .to_string()
                    });
                usage_tap.feed(&body);
                client
                    .send(Bytes::from(format!(
                        "event: error\ndata: {}\n\n",
                        envelope.replace('\n', "")
                    )))
                    .await;
            } else {
                if let Some(tx) = head.take() {
                    let _ = tx.send(Head::Upstream(
                        status,
                        client_response_headers(&response.headers),
                    ));
                }
                let charged = record.is_some();
                pump(
                    response.body,
                    &mut usage_tap,
                    &mut client,
                    charged,
                    config.disconnect_drain,
                )
                .await;
            }
            tap = Some((status, usage_tap));
        }
    }

    if let Some(mut record) = record {
        if let Some((status, usage_tap)) = tap {
            let (mut usage, error) = usage_tap.finish();
            if status.is_success() {
                // Anthropic bills a successful answer even when it was cut:
                // what it did not report is estimated (tokenizing is CPU
                // work, off the async threads), and marked so.
                if !usage.is_complete() {
                    let request_body = forward.body.clone();
                    let (usage_done, estimated) = tokio::task::spawn_blocking(move || {
                        let estimated = complete_with_estimate(&mut usage, &request_body);
                        (usage, estimated)
                    })
                    .await
                    .unwrap_or_default();
                    usage = usage_done;
                    record.estimated = estimated;
                }
                record.usage = usage.usage;
                record.error_type = usage.stream_error.clone();
                if usage.model.is_some() {
                    record.model = usage.model;
                }
            } else {
                record.error_type = error;
            }
        }
        record.latency_ms = millis(started.elapsed());
        // Dropping the sink ends the client's answer. Where the host waits
        // for after-work the answer ends first, so the settle transaction
        // (and the metrics line) add nothing to the client's latency;
        // otherwise it must land before the answer ends, because in Lambda
        // nothing runs after that.
        let _after_work = match &inner.settle_timing {
            SettleTiming::AfterAnswerEnds(in_flight) => {
                let busy = in_flight.after_work();
                drop(client);
                // Let the connection write the answer's end before this
                // task spends CPU on the metrics line and the transaction
                // (on a one-thread runtime it would otherwise wait).
                tokio::task::yield_now().await;
                Some(busy)
            }
            SettleTiming::BeforeAnswerEnds => None,
        };
        crate::metrics::emit_request(&record);
        settle(
            &inner.store,
            record,
            config.log_retention,
            config.settle_inline,
            config.settle_background,
        )
        .await;
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Moves the upstream body to the client chunk by chunk, feeding the tap.
/// If the client leaves, a charged answer is read on (for at most `drain`)
/// until its usage is known.
async fn pump(
    mut body: crate::upstream::BodyStream,
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
                    let answer = ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        ErrorKind::Api,
                        "the Anthropic API's answer was cut off; retry the request",
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

async fn collect_bounded(mut body: crate::upstream::BodyStream, limit: usize) -> Vec<u8> {
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

/// Records usage, retrying while DynamoDB is unavailable: first while the
/// host waits (bounded), then in the background; as a last resort the
/// whole record goes to the error log for reconciliation.
async fn settle(
    store: &Store,
    record: UsageRecord,
    retention: Duration,
    inline: Duration,
    background: Duration,
) {
    if settle_until(store, &record, retention, Instant::now() + inline).await {
        return;
    }
    crate::metrics::emit_event("proxy", "SettleDelayed", "store_unavailable");
    let store = store.clone();
    tokio::spawn(async move {
        if !settle_until(&store, &record, retention, Instant::now() + background).await {
            crate::metrics::emit_event("proxy", "SettleFailures", "gave_up");
            tracing::error!(
                target: "unsettled_usage",
                request_id = %record.request_id,
                key_id = %record.key_id,
                at = %crate::domain::format_timestamp(record.at),
                model = record.model.as_deref().unwrap_or(""),
                status = record.status,
                input_tokens = record.usage.input_tokens,
                output_tokens = record.usage.output_tokens,
                cache_creation_input_tokens = record.usage.cache_creation_input_tokens,
                cache_read_input_tokens = record.usage.cache_read_input_tokens,
                estimated = record.estimated,
                "usage could not be recorded; reconcile from this line"
            );
        }
    });
}

/// `true` once recorded (or found recorded before).
async fn settle_until(
    store: &Store,
    record: &UsageRecord,
    retention: Duration,
    deadline: Instant,
) -> bool {
    let mut pause = Duration::from_millis(50);
    loop {
        match store.settle(record, retention).await {
            Ok(outcome) => {
                tracing::debug!(request_id = %record.request_id, ?outcome, "settled");
                return true;
            }
            Err(StoreError::Unavailable(err)) => {
                if Instant::now() + pause > deadline {
                    tracing::warn!(request_id = %record.request_id, error = %format!("{err:#}"), "settle postponed");
                    return false;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(StoreError::Unexpected(err)) => {
                tracing::error!(request_id = %record.request_id, error = %format!("{err:#}"), "settle failed");
                return false;
            }
        }
    }
}
