//! The last phase of a metered request: its usage record, built once from
//! what admission knew (`Metering`) and what the exchange saw (`Outcome`);
//! the answer ended before or after the record is written, as the host
//! needs (`SettleTiming`); then settled: retried while DynamoDB is
//! unavailable, first while the host waits, then in the background, and as
//! a last resort logged whole for reconciliation.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::alerts::Alerting;
use super::context::Call;
use super::tap::UsageTap;
use super::{ProxyState, SettleTiming};
use crate::domain::budget::BudgetCharge;
use crate::domain::key::KeyId;
use crate::domain::price::{Attribute, PriceTable};
use crate::domain::usage::{AnswerUsage, complete_with_estimate};
use crate::domain::usage::{Attribution, UsageRecord};
use crate::store::settlement::SettleOutcome;
use crate::store::{Store, StoreError};

/// What is known of a metered request when it is admitted.
#[derive(Debug, Clone)]
pub(crate) struct Metering {
    pub request_id: String,
    pub key_id: KeyId,
    pub at: time::OffsetDateTime,
    /// The model the request named, an alias resolved (the answer's own
    /// name wins).
    pub model: Option<String>,
    /// The alias the client asked for, if it named one.
    pub requested_model: Option<String>,
    pub method: String,
    pub path: String,
    pub stream: bool,
    pub client_ip: String,
    pub user_agent: Option<String>,
    pub session_id: Option<String>,
    /// The agent and request class the client named, sanitised.
    pub attribution: Attribution,
    /// Request attributes that change its price (US inference).
    pub price_attributes: Vec<Attribute>,
    /// The dollar limits' counters its cost goes to.
    pub budget: BudgetCharge,
    /// Its worst case may use up a limit: its usage is recorded before its
    /// answer ends (`domain::budget::may_exhaust`), whatever the host's
    /// settle timing.
    pub settle_before_answer_ends: bool,
}

impl Metering {
    pub(super) fn of(
        call: &Call,
        model: Option<String>,
        stream: bool,
        price_attributes: Vec<Attribute>,
        budget: BudgetCharge,
    ) -> Metering {
        Metering {
            request_id: call.request_id.clone(),
            key_id: call.key.id().clone(),
            at: call.at,
            model,
            requested_model: None,
            method: call.parts.method.to_string(),
            path: call.path.to_string(),
            stream,
            client_ip: call.ip.to_string(),
            user_agent: call.header_text("user-agent"),
            // Set by admission: the header's, or the body's.
            session_id: None,
            attribution: Attribution::of(|name| {
                call.parts.headers.get(name).and_then(|v| v.to_str().ok())
            }),
            price_attributes,
            budget,
            settle_before_answer_ends: false,
        }
    }
}

/// What the exchange saw of the upstream's answer.
pub(super) enum Outcome {
    /// The upstream gave no answer; the relay answered `status` itself.
    NoAnswer { status: u16, error_type: String },
    /// The upstream answered `status` (after `retries` retries, its headers
    /// `ttfb` after the start); the tap holds what its body said.
    Answered {
        status: http::StatusCode,
        retries: u32,
        ttfb: Duration,
        tap: Box<UsageTap>,
        /// The upstream that answered.
        upstream: String,
    },
}

/// The usage record of a finished exchange. A successful answer is billed
/// even when cut: what it did not report is estimated from the request
/// (`request_body`) and marked so; tokenizing is CPU work, so it runs off
/// the async threads.
pub(super) async fn usage_record(
    metering: Metering,
    outcome: Outcome,
    request_body: bytes::Bytes,
    started: Instant,
    prices: &PriceTable,
) -> UsageRecord {
    let upstream = match &outcome {
        Outcome::Answered { upstream, .. } => Some(upstream.clone()),
        Outcome::NoAnswer { .. } => None,
    };
    let (status, retries, ttfb_ms, answer, error_type) = match outcome {
        Outcome::NoAnswer { status, error_type } => (status, 0, None, None, Some(error_type)),
        Outcome::Answered {
            status,
            retries,
            ttfb,
            tap,
            ..
        } => {
            let (usage, error) = tap.finish();
            if status.is_success() {
                let error = usage.stream_error.clone();
                (
                    status.as_u16(),
                    retries,
                    Some(millis(ttfb)),
                    Some(usage),
                    error,
                )
            } else {
                (status.as_u16(), retries, Some(millis(ttfb)), None, error)
            }
        }
    };
    let (usage, estimated) = match answer {
        Some(usage) if !usage.is_complete() => estimate(usage, request_body).await,
        Some(usage) => (usage, false),
        None => (AnswerUsage::default(), false),
    };
    let Metering {
        request_id,
        key_id,
        at,
        model,
        requested_model,
        method,
        path,
        stream,
        client_ip,
        user_agent,
        session_id,
        attribution,
        price_attributes,
        budget,
        settle_before_answer_ends: _,
    } = metering;
    let model = usage.model.or(model);
    // Priced at the request's moment, from the usage the answer reported
    // (or its estimate: then the cost is an estimate too, as flagged).
    let cost = prices.cost(model.as_deref(), &usage.usage, &price_attributes, at);
    UsageRecord {
        request_id,
        key_id,
        at,
        model,
        requested_model,
        method,
        path,
        status,
        stream,
        usage: usage.usage,
        estimated,
        latency_ms: millis(started.elapsed()),
        ttfb_ms,
        retries,
        client_ip,
        user_agent,
        session_id,
        attribution,
        error_type,
        upstream,
        cost,
        budget,
    }
}

async fn estimate(mut usage: AnswerUsage, request_body: bytes::Bytes) -> (AnswerUsage, bool) {
    tokio::task::spawn_blocking(move || {
        let estimated = complete_with_estimate(&mut usage, &request_body);
        (usage, estimated)
    })
    .await
    .unwrap_or_default()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Records the usage. Dropping the sink ends the client's answer. Where the
/// host waits for after-work the answer ends first, so the settle
/// transaction (and the metrics line) add nothing to the client's latency;
/// otherwise it must land before the answer ends, because in Lambda nothing
/// runs after that.
///
/// `answer` is what keeps the client's answer open (the exchange's body
/// sender): dropping it ends the answer.
///
/// A request that may have used up a limit (`settle_first`) is recorded
/// before its answer ends on every host: a client that sends its next
/// request once this answer ended is then judged on this one's usage.
pub(super) async fn finish<A>(
    state: &ProxyState,
    record: UsageRecord,
    answer: A,
    settle_first: bool,
) {
    let inner = &state.0;
    let _after_work = match &inner.settle_timing {
        SettleTiming::AfterAnswerEnds(in_flight) if !settle_first => {
            let busy = in_flight.after_work();
            drop(answer);
            // Let the connection write the answer's end before this task
            // spends CPU on the metrics line and the transaction (on a
            // one-thread runtime it would otherwise wait).
            tokio::task::yield_now().await;
            Some(busy)
        }
        SettleTiming::AfterAnswerEnds(_) | SettleTiming::BeforeAnswerEnds => None,
    };
    crate::metrics::emit_request(&record);
    let config = &inner.config;
    let policy = SettlePolicy {
        retention: config.log_retention,
        inline: config.settle_inline,
        background: config.settle_background,
    };
    settle(&inner.store, record, policy, super::alerting(state)).await;
}

/// How long settlement retries, and how long the log keeps the record.
#[derive(Debug, Clone, Copy)]
struct SettlePolicy {
    pub retention: Duration,
    /// Retrying while the host waits (bounded)…
    pub inline: Duration,
    /// …then in the background, before giving up to the log.
    pub background: Duration,
}

/// Records usage, retrying while DynamoDB is unavailable: first while the
/// host waits (bounded), then in the background (in this request's span);
/// as a last resort the whole record goes to the error log. Once recorded,
/// sends the budget alerts its cost made due.
async fn settle(store: &Store, record: UsageRecord, policy: SettlePolicy, alerting: Alerting) {
    if let Some(outcome) = settle_until(
        store,
        &record,
        policy.retention,
        Instant::now() + policy.inline,
    )
    .await
    {
        send_alerts(&alerting, &record, outcome).await;
        return;
    }
    crate::metrics::emit_event("proxy", "SettleDelayed", "store_unavailable");
    let store = store.clone();
    let deadline = Instant::now() + policy.background;
    tokio::spawn(
        async move {
            match settle_until(&store, &record, policy.retention, deadline).await {
                Some(outcome) => send_alerts(&alerting, &record, outcome).await,
                None => {
                    crate::metrics::emit_event("proxy", "SettleFailures", "gave_up");
                    log_unsettled(&record);
                }
            }
        }
        .in_current_span(),
    );
}

/// The budget alerts a newly recorded request's cost made due (none in the
/// common case: then nothing is written or sent).
async fn send_alerts(alerting: &Alerting, record: &UsageRecord, outcome: SettleOutcome) {
    if outcome != SettleOutcome::Recorded {
        return;
    }
    let due: Vec<_> = record
        .budget
        .alerts
        .iter()
        .flat_map(|watch| watch.due(record.cost.micro_usd))
        .collect();
    if !due.is_empty() {
        alerting.send(&record.key_id, due).await;
    }
}

fn log_unsettled(record: &UsageRecord) {
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

/// The outcome once recorded (or found recorded before); `None` if not.
async fn settle_until(
    store: &Store,
    record: &UsageRecord,
    retention: Duration,
    deadline: Instant,
) -> Option<SettleOutcome> {
    let mut pause = Duration::from_millis(50);
    loop {
        match store.settle(record, retention).await {
            Ok(outcome) => {
                tracing::debug!(?outcome, "settled");
                return Some(outcome);
            }
            Err(StoreError::Unavailable(err)) => {
                if Instant::now() + pause > deadline {
                    tracing::warn!(error = %format!("{err:#}"), "settle postponed");
                    return None;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(StoreError::Unexpected(err)) => {
                tracing::error!(error = %format!("{err:#}"), "settle failed");
                return None;
            }
        }
    }
}
