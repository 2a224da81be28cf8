//! Budget alerts: which thresholds (50 %, 80 %, 100 % of a dollar limit) a
//! settled cost crossed, and the event that says so. One alert per
//! threshold, limit and period: the highest threshold sent is kept beside
//! the period's spend counter (a marker, `ApiKeyRecord::budget_alerts`) and
//! a new period starts with none.
//!
//! Whether a threshold is due is judged without a read: from the spend the
//! admission write returned (`used_before`, everything settled before this
//! request) plus this request's cost. Requests running at once each see
//! the others' cost missing, so together they may cross a threshold that
//! none of them sees crossed; then the next request's `used_before`
//! (which holds all of their settled spend) makes it due. The bound: an
//! alert is late by at most the requests that were in flight together,
//! never lost while the key is used, and never sent twice (the claim on
//! the marker, `store::settlement`, decides).

use time::OffsetDateTime;

use super::{DollarLimit, SpendCounter, usd};
use crate::domain::format_timestamp;
use crate::domain::key::KeyId;
use crate::domain::price::MicroUsd;

/// The thresholds alerted, in percent of the limit, in ascending order.
pub const THRESHOLDS: [u8; 3] = [50, 80, 100];

/// `percent` % of `limit`, rounded up: spend at or over it has reached the
/// threshold.
pub fn threshold_amount(limit: MicroUsd, percent: u8) -> MicroUsd {
    let amount = (u128::from(limit) * u128::from(percent)).div_ceil(100);
    u64::try_from(amount).unwrap_or(u64::MAX)
}

/// The thresholds due once `cost` is added to `used_before` against
/// `limit`, when thresholds up to `alerted` were sent already (0: none):
/// every threshold reached that is above `alerted`, ascending.
pub fn due_thresholds(
    limit: MicroUsd,
    used_before: MicroUsd,
    cost: MicroUsd,
    alerted: u8,
) -> Vec<u8> {
    let estimate = used_before.saturating_add(cost);
    THRESHOLDS
        .into_iter()
        .filter(|&threshold| threshold > alerted && estimate >= threshold_amount(limit, threshold))
        .collect()
}

/// One spend counter a request is charged to, as alerts judge it: its
/// limit, what it had used when the request was admitted, and the highest
/// threshold already sent for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertWatch {
    pub counter: SpendCounter,
    pub limit: DollarLimit,
    pub used_before: MicroUsd,
    /// The highest threshold sent for this counter (0: none).
    pub alerted: u8,
    /// When the counter's period ends (`None`: never).
    pub resets_at: Option<OffsetDateTime>,
}

impl AlertWatch {
    /// The thresholds a settled `cost` on this counter made due.
    pub fn due(&self, cost: MicroUsd) -> Vec<DueAlert> {
        due_thresholds(self.limit.limit, self.used_before, cost, self.alerted)
            .into_iter()
            .map(|threshold| DueAlert {
                watch: self.clone(),
                threshold,
            })
            .collect()
    }
}

/// A threshold that may have been crossed: to be claimed, then sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueAlert {
    pub watch: AlertWatch,
    pub threshold: u8,
}

impl DueAlert {
    /// The spend at which the threshold is reached: the claim requires the
    /// stored counter to be there.
    pub fn amount(&self) -> MicroUsd {
        threshold_amount(self.watch.limit.limit, self.threshold)
    }
}

/// The event sent when a key's spend in a period reaches a threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetAlert {
    pub key_id: KeyId,
    pub key_name: Option<String>,
    pub limit: DollarLimit,
    pub counter: SpendCounter,
    pub threshold_percent: u8,
    /// The counter as stored when the alert was claimed.
    pub used: MicroUsd,
    pub resets_at: Option<OffsetDateTime>,
    /// The time zone calendar periods are counted in.
    pub time_zone: String,
    pub at: OffsetDateTime,
}

/// The event's `type`: subscribers may route on it.
pub const EVENT_TYPE: &str = "relay.budget_threshold";

impl BudgetAlert {
    /// The event as subscribers receive it (the SNS message).
    pub fn to_json(&self) -> serde_json::Value {
        let mut event = serde_json::json!({
            "type": EVENT_TYPE,
            "key_id": self.key_id.as_str(),
        });
        if let Some(name) = &self.key_name {
            event["key_name"] = name.as_str().into();
        }
        let rest = serde_json::json!({
            "window": self.limit.window.name(),
            "models": self.limit.models,
            "threshold_percent": self.threshold_percent,
            "limit_micro_usd": self.limit.limit,
            "used_micro_usd": self.used,
            "period": self.counter.period,
            "resets_at": self.resets_at.map(format_timestamp),
            "time_zone": self.time_zone,
            "at": format_timestamp(self.at),
        });
        if let (Some(event), serde_json::Value::Object(rest)) = (event.as_object_mut(), rest) {
            event.extend(rest);
        }
        event
    }

    /// A short readable subject line (SNS: at most 100 printable ASCII
    /// characters; an e-mail subscriber sees it as the mail's subject).
    pub fn subject(&self) -> String {
        let name = self.key_name.as_deref().unwrap_or(self.key_id.as_str());
        let name: String = name
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(40)
            .collect();
        let models = if self.limit.models.is_some() {
            " (some models)"
        } else {
            ""
        };
        let subject = format!(
            "Relay budget: key {name} at {}% of ${} per {}{models}",
            self.threshold_percent,
            usd(self.limit.limit),
            self.limit.window.name()
        );
        subject.chars().take(100).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BudgetCharge, BudgetPolicy, BudgetZone, FIVE_HOURS, Window, epoch_seconds};
    use super::*;
    use crate::domain::key::{ApiKeyRecord, PresentedKey};
    use crate::domain::parse_timestamp;
    use std::collections::BTreeMap;

    const LIMIT: MicroUsd = 10_000_000;

    /// Percent of the $10 limit, in micro-dollars.
    fn pct(percent: u64) -> MicroUsd {
        LIMIT * percent / 100
    }

    #[test]
    fn crossing_half_the_limit_is_due_once_at_fifty() {
        assert_eq!(due_thresholds(LIMIT, pct(40), pct(15), 0), [50]);
    }

    #[test]
    fn staying_between_thresholds_is_due_nothing() {
        assert_eq!(due_thresholds(LIMIT, pct(55), pct(5), 50), [] as [u8; 0]);
    }

    #[test]
    fn one_cost_crossing_two_thresholds_makes_both_due_in_order() {
        assert_eq!(due_thresholds(LIMIT, pct(60), pct(40), 50), [80, 100]);
        // Past the limit (a soft limit admits while room is left).
        assert_eq!(due_thresholds(LIMIT, pct(60), pct(90), 50), [80, 100]);
    }

    #[test]
    fn a_threshold_already_sent_is_not_due_again() {
        assert_eq!(due_thresholds(LIMIT, pct(85), pct(20), 80), [100]);
        assert_eq!(due_thresholds(LIMIT, pct(100), pct(1), 100), [] as [u8; 0]);
        // The marker only ever rises: a later 50 is not due after 80.
        assert_eq!(due_thresholds(LIMIT, pct(40), pct(45), 80), [] as [u8; 0]);
    }

    #[test]
    fn a_threshold_is_reached_at_exactly_its_share_rounded_up() {
        assert_eq!(due_thresholds(LIMIT, pct(50) - 1, 0, 0), [] as [u8; 0]);
        assert_eq!(due_thresholds(LIMIT, pct(50) - 1, 1, 0), [50]);
        // 50 % of 3 µ$ is 1.5 µ$: 1 has not reached it, 2 has.
        assert_eq!(threshold_amount(3, 50), 2);
        assert_eq!(due_thresholds(3, 1, 0, 0), [] as [u8; 0]);
        assert_eq!(due_thresholds(3, 2, 0, 0), [50]);
        // The largest limit (a billion dollars) does not overflow.
        const LARGEST: u64 = 1_000_000_000 * 1_000_000;
        assert_eq!(threshold_amount(LARGEST, 80), LARGEST / 10 * 8);
    }

    fn at(text: &str) -> OffsetDateTime {
        parse_timestamp(text).unwrap()
    }

    fn counter(limit: &str, period: &str) -> SpendCounter {
        SpendCounter {
            limit: limit.into(),
            period: period.into(),
        }
    }

    fn key_with(limits: Vec<DollarLimit>) -> ApiKeyRecord {
        ApiKeyRecord {
            dollar_limits: Some(limits),
            ..ApiKeyRecord::sample(at("2026-11-28T12:00:00Z")).0
        }
    }

    fn day_limit() -> DollarLimit {
        DollarLimit {
            window: Window::Day,
            limit: LIMIT,
            models: None,
        }
    }

    #[test]
    fn the_charge_watches_each_applicable_counter_with_its_spend_and_marker() {
        let opus_week = DollarLimit {
            window: Window::Week,
            limit: 50_000_000,
            models: Some("claude-opus-*".into()),
        };
        let mut admitted = key_with(vec![day_limit(), opus_week]);
        admitted.spend = BTreeMap::from([(counter("day", "d2026-11-28"), pct(85))]);
        admitted.budget_alerts = BTreeMap::from([(counter("day", "d2026-11-28"), 80)]);
        let now = at("2026-11-28T12:00:00Z");
        let charge = BudgetCharge::of(
            &admitted,
            &BudgetPolicy::default(),
            &["claude-sonnet-4-5"],
            now,
        );
        assert_eq!(
            charge.alerts,
            vec![AlertWatch {
                counter: counter("day", "d2026-11-28"),
                limit: day_limit(),
                used_before: pct(85),
                alerted: 80,
                resets_at: Some(at("2026-11-29T00:00:00Z")),
            }]
        );
        let due: Vec<u8> = charge.alerts[0]
            .due(pct(20))
            .iter()
            .map(|d| d.threshold)
            .collect();
        assert_eq!(due, [100]);
    }

    #[test]
    fn a_new_period_starts_without_markers_and_the_ended_ones_are_dropped() {
        let mut admitted = key_with(vec![day_limit()]);
        // Yesterday reached 100 %; today nothing is spent or sent yet.
        admitted.spend = BTreeMap::from([(counter("day", "d2026-11-27"), LIMIT)]);
        admitted.budget_alerts = BTreeMap::from([
            (counter("day", "d2026-11-27"), 100),
            // A marker whose counter is already gone goes too.
            (counter("month", "m2026-10"), 50),
        ]);
        let now = at("2026-11-28T00:00:01Z");
        let charge = BudgetCharge::of(&admitted, &BudgetPolicy::default(), &[], now);
        let watch = &charge.alerts[0];
        assert_eq!(
            (&watch.counter, watch.used_before, watch.alerted),
            (&counter("day", "d2026-11-28"), 0, 0)
        );
        let due: Vec<u8> = watch.due(pct(55)).iter().map(|d| d.threshold).collect();
        assert_eq!(due, [50]);
        assert_eq!(
            charge.drop,
            vec![counter("day", "d2026-11-27"), counter("month", "m2026-10")]
        );
    }

    #[test]
    fn a_batch_watches_the_counters_in_force_when_it_is_settled() {
        let five_hours = DollarLimit {
            window: Window::FiveHours,
            limit: LIMIT,
            models: None,
        };
        let mut record = key_with(vec![day_limit(), five_hours]);
        let now = at("2026-11-28T12:00:00Z");
        // The 5-hour window closed: nothing of it is in force to alert on.
        record.five_hour_start = Some(epoch_seconds(now) - FIVE_HOURS - 1);
        record.spend = BTreeMap::from([(counter("day", "d2026-11-28"), pct(70))]);
        record.budget_alerts = BTreeMap::from([(counter("day", "d2026-11-28"), 50)]);
        let policy = BudgetPolicy {
            default_limits: vec![],
            zone: BudgetZone::utc(),
        };
        let watches = BudgetCharge::alert_watches(&record, &policy, now);
        assert_eq!(watches.len(), 1);
        assert_eq!((watches[0].used_before, watches[0].alerted), (pct(70), 50));
    }

    #[test]
    fn the_event_names_the_key_limit_threshold_and_period() {
        let key = PresentedKey::generate();
        let alert = BudgetAlert {
            key_id: key.id().clone(),
            key_name: Some("ci-bot\n\u{e9}t\u{e9}".into()),
            limit: DollarLimit {
                window: Window::Day,
                limit: LIMIT,
                models: Some("claude-opus-*".into()),
            },
            counter: counter("day:claude-opus-*", "d2026-11-28"),
            threshold_percent: 80,
            used: 8_250_000,
            resets_at: Some(at("2026-11-29T00:00:00Z")),
            time_zone: "UTC".into(),
            at: at("2026-11-28T12:00:00Z"),
        };
        assert_eq!(
            alert.to_json(),
            serde_json::json!({
                "type": "relay.budget_threshold",
                "key_id": key.id().as_str(),
                "key_name": "ci-bot\n\u{e9}t\u{e9}",
                "window": "day",
                "models": "claude-opus-*",
                "threshold_percent": 80,
                "limit_micro_usd": 10_000_000,
                "used_micro_usd": 8_250_000,
                "period": "d2026-11-28",
                "resets_at": "2026-11-29T00:00:00.000Z",
                "time_zone": "UTC",
                "at": "2026-11-28T12:00:00.000Z",
            })
        );
        assert_eq!(
            alert.subject(),
            "Relay budget: key ci-bott at 80% of $10.00 per day (some models)"
        );
    }
}
