//! Budget alerts after a settlement: the thresholds its cost made due
//! (`domain::budget::alerts`), each claimed on the key item and published
//! by whoever won the claim. Runs in the settle task, after the answer,
//! and only when a threshold is due: most settlements do nothing here.

use std::sync::Arc;

use crate::alerts::AlertPublisher;
use crate::domain::budget::BudgetPolicy;
use crate::domain::budget::alerts::{BudgetAlert, DueAlert};
use crate::domain::key::KeyId;
use crate::store::Store;

/// What sending an alert needs; cheap to clone into a background task.
#[derive(Clone)]
pub(super) struct Alerting {
    pub store: Store,
    pub publisher: AlertPublisher,
    pub budgets: Arc<BudgetPolicy>,
}

impl Alerting {
    /// Claims and publishes each of `due` (ascending per counter, so an 80
    /// goes out before a 100 crossed by the same cost).
    ///
    /// At most once: the claim is written before the publish, so a publish
    /// that fails after a won claim is not retried (another settlement
    /// cannot win it again); it is logged as an error with the whole event,
    /// for someone to forward by hand. A claim that fails on DynamoDB
    /// leaves the marker as it was, so the next settlement of the key tries
    /// again.
    pub async fn send(&self, key_id: &KeyId, due: Vec<DueAlert>) {
        for alert in due {
            let watch = &alert.watch;
            let claimed = self
                .store
                .claim_budget_alert(key_id, &watch.counter, alert.threshold, alert.amount())
                .await;
            let record = match claimed {
                Ok(Some(record)) => record,
                Ok(None) => {
                    tracing::debug!(
                        counter = %watch.counter.limit,
                        threshold = alert.threshold,
                        "budget alert already sent, or its spend not settled"
                    );
                    continue;
                }
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), threshold = alert.threshold, "budget alert not claimed; the next settlement retries");
                    continue;
                }
            };
            let event = BudgetAlert {
                key_id: key_id.clone(),
                used: record
                    .spend
                    .get(&watch.counter)
                    .copied()
                    .unwrap_or_else(|| alert.amount()),
                key_name: Some(record.name),
                limit: watch.limit.clone(),
                counter: watch.counter.clone(),
                threshold_percent: alert.threshold,
                resets_at: watch.resets_at,
                time_zone: self.budgets.zone.name().to_owned(),
                at: crate::domain::now(),
            };
            match self.publisher.publish(&event).await {
                Ok(()) => crate::metrics::emit_event("proxy", "BudgetAlerts", "sent"),
                Err(err) => {
                    crate::metrics::emit_event("proxy", "BudgetAlerts", "publish_failed");
                    tracing::error!(
                        target: "budget_alert",
                        error = %format!("{err:#}"),
                        event = %event.to_json(),
                        "budget alert claimed but not published (sent at most once: not retried)"
                    );
                }
            }
        }
    }
}
