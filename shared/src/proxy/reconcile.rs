//! The reconciler: message requests admitted whose settlement never came
//! (the process was killed, Lambda timed out) are found by the trace their
//! admission left on the key item (`domain::flight`) once they are overdue,
//! and charged an estimate, recorded as such. Exactly once: the reconciler
//! settles under the request's own id, so the usage-log row's absence is
//! the condition of its write and of any late real settlement alike. It
//! runs with the batch collector: on the EventBridge schedule in AWS, on a
//! timer in relay-local.

use std::time::Duration;

use time::OffsetDateTime;

use super::ProxyState;
use crate::domain::budget::BudgetCharge;
use crate::domain::flight::Flight;
use crate::domain::key::ApiKeyRecord;
use crate::domain::usage::UsageRecord;
use crate::store::settlement::SettleOutcome;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReconcileReport {
    /// Overdue requests charged an estimate.
    pub charged: u64,
    /// Traces of requests that had been settled after all, dropped.
    pub dropped: u64,
    pub failures: u64,
}

/// Charges every request admitted more than `overdue_after` before `now`
/// that was never settled. Reads every key (a page at a time): the keys
/// with a trace are found without an index of their own.
pub async fn reconcile(
    state: &ProxyState,
    now: OffsetDateTime,
    overdue_after: Duration,
) -> ReconcileReport {
    let mut report = ReconcileReport::default();
    let mut cursor: Option<String> = None;
    loop {
        let page = match state.0.store.list_keys(None, 100, cursor.as_deref()).await {
            Ok(Ok(page)) => page,
            Ok(Err(_)) | Err(_) => {
                tracing::warn!("reconciler could not list keys");
                report.failures += 1;
                return report;
            }
        };
        for key in &page.keys {
            for flight in key.flights.iter().filter(|f| f.overdue(now, overdue_after)) {
                charge(state, key, flight, &mut report).await;
            }
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return report,
        }
    }
}

async fn charge(
    state: &ProxyState,
    key: &ApiKeyRecord,
    flight: &Flight,
    report: &mut ReconcileReport,
) {
    let record = estimated_record(state, key, flight).await;
    match state
        .0
        .store
        .settle(&record, state.0.config.log_retention)
        .await
    {
        Ok(SettleOutcome::Recorded | SettleOutcome::RecordedWithoutKey) => {
            tracing::warn!(
                request_id = %flight.request_id,
                key_id = %key.id,
                input_tokens = record.usage.input_tokens,
                output_tokens = record.usage.output_tokens,
                "a request's settlement never came: charged an estimate"
            );
            crate::metrics::emit_event("proxy", "ReconciledRequests", "charged");
            report.charged += 1;
        }
        // Settled after all (its row exists): only the trace was left.
        Ok(SettleOutcome::AlreadyRecorded) => {
            match state.0.store.drop_flight(&key.id, &flight.request_id).await {
                Ok(()) => report.dropped += 1,
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "could not drop a settled request's trace");
                    report.failures += 1;
                }
            }
        }
        Err(err) => {
            tracing::warn!(error = %format!("{err:#}"), request_id = %flight.request_id, "could not charge an overdue request");
            report.failures += 1;
        }
    }
}

/// The usage row of a request whose answer was never read: its estimate,
/// priced and counted as of its admission.
async fn estimated_record(state: &ProxyState, key: &ApiKeyRecord, flight: &Flight) -> UsageRecord {
    let at = flight.admitted_at;
    let usage = flight.estimated_usage();
    let prices = state.prices_at_settlement().await;
    let cost = prices.cost(flight.model.as_deref(), &usage, &[], at);
    let models: Vec<&str> = flight.model.as_deref().into_iter().collect();
    UsageRecord {
        request_id: flight.request_id.clone(),
        key_id: key.id.clone(),
        at,
        model: flight.model.clone(),
        requested_model: None,
        method: "POST".into(),
        path: flight.path.clone(),
        // No answer was seen: status 0 says so on the row.
        status: 0,
        stream: false,
        usage,
        estimated: true,
        latency_ms: 0,
        ttfb_ms: None,
        retries: 0,
        client_ip: String::new(),
        user_agent: None,
        session_id: None,
        attribution: Default::default(),
        error_type: None,
        upstream: None,
        cost,
        // A hard-mode reservation is given back as the estimate replaces it.
        budget: BudgetCharge::of(key, &state.0.budgets, &models, at)
            .holding(flight.reservation.clone()),
    }
}
