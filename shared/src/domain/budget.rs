//! Dollar limits on a key: a 5-hour window (opened by the first request
//! after the previous one closed), a calendar day, week or month in the
//! relay's time zone, or a lifetime total, each optionally restricted to
//! models matching a pattern; the organisation default for keys that set
//! none; the period each limit counts in, what it has used and when it
//! resets; and what an admission must check and a settlement must add.
//!
//! Spend is kept per limit and period (`SpendCounter`): a settlement adds a
//! request's cost to the counters of the periods it was admitted in, so a
//! new period starts from nothing without a reset write. A reservation
//! (a worst case held while a request runs) can sit beside each counter.

pub mod alerts;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use time::OffsetDateTime;

use super::epoch_seconds;
use super::flight::Reservation;
use super::key::{ApiKeyRecord, FieldError};
use super::price::{MicroUsd, exact_micro_usd};

/// How long a 5-hour window lasts, in seconds.
pub const FIVE_HOURS: u64 = 5 * 3600;

/// Most dollar limits one key (or the default) may hold.
pub const MAX_LIMITS: usize = 16;

/// Largest dollar limit accepted: a billion dollars (well inside what
/// DynamoDB numbers and JSON doubles hold exactly in micro-dollars).
pub const MAX_LIMIT_USD: f64 = 1e9;

/// The period a dollar limit counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Window {
    /// Five hours from the first request after the previous window closed.
    FiveHours,
    /// A calendar day in the relay's time zone.
    Day,
    /// A calendar week (Monday to Sunday) in the relay's time zone.
    Week,
    /// A calendar month in the relay's time zone.
    Month,
    /// Every request the key ever made.
    Lifetime,
}

impl Window {
    pub const ALL: [Window; 5] = [
        Window::FiveHours,
        Window::Day,
        Window::Week,
        Window::Month,
        Window::Lifetime,
    ];

    /// The name admins write and views show.
    pub fn name(self) -> &'static str {
        match self {
            Window::FiveHours => "5h",
            Window::Day => "day",
            Window::Week => "week",
            Window::Month => "month",
            Window::Lifetime => "lifetime",
        }
    }

    pub fn parse(name: &str) -> Option<Window> {
        Window::ALL.into_iter().find(|w| w.name() == name)
    }

    /// How a refusal names it ("per day").
    fn phrase(self) -> &'static str {
        match self {
            Window::FiveHours => "per 5-hour window",
            Window::Day => "per day",
            Window::Week => "per week",
            Window::Month => "per month",
            Window::Lifetime => "in total",
        }
    }
}

/// One dollar limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DollarLimit {
    pub window: Window,
    pub limit: MicroUsd,
    /// Only requests for models matching this pattern (`*` matches any run
    /// of characters) count and are refused; `None`: every model.
    pub models: Option<String>,
}

impl DollarLimit {
    /// Names the limit among a key's limits (one per window and pattern):
    /// its counters are kept under this name.
    pub fn id(&self) -> String {
        match &self.models {
            None => self.window.name().to_owned(),
            Some(pattern) => format!("{}:{pattern}", self.window.name()),
        }
    }

    /// Whether a request for `model` counts against this limit. A request
    /// that names no model counts against every limit.
    pub fn applies_to(&self, model: Option<&str>) -> bool {
        match (&self.models, model) {
            (None, _) | (Some(_), None) => true,
            (Some(pattern), Some(model)) => glob_matches(pattern, model),
        }
    }
}

/// `*` matches any run of characters (also none); everything else matches
/// itself, ignoring ASCII case: a client that spells a model id in
/// capitals must not slip past a limit on it.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    glob_matches_exactly(&pattern.to_ascii_lowercase(), &text.to_ascii_lowercase())
}

fn glob_matches_exactly(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the pattern is the whole text.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The time zone calendar periods are counted in (an IANA name, `UTC` by
/// default).
#[derive(Debug, Clone)]
pub struct BudgetZone {
    name: String,
    zone: jiff::tz::TimeZone,
}

impl BudgetZone {
    pub fn utc() -> BudgetZone {
        BudgetZone {
            name: "UTC".to_owned(),
            zone: jiff::tz::TimeZone::UTC,
        }
    }

    /// The zone of an IANA name (`Europe/Paris`), from the bundled tz database.
    pub fn named(name: &str) -> Result<BudgetZone, String> {
        jiff::tz::TimeZone::get(name)
            .map(|zone| BudgetZone {
                name: name.to_owned(),
                zone,
            })
            .map_err(|_| format!("`{name}` is not an IANA time zone name (e.g. `Europe/Paris`)"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What applies to every key: the organisation default and the time zone.
#[derive(Debug, Clone)]
pub struct BudgetPolicy {
    /// Limits of keys that set none (`dollar_limits` absent).
    pub default_limits: Vec<DollarLimit>,
    pub zone: BudgetZone,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        BudgetPolicy {
            default_limits: Vec::new(),
            zone: BudgetZone::utc(),
        }
    }
}

/// Where a key's limits in force come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitsSource {
    /// The key's own `dollar_limits` (possibly an empty list: none at all).
    Key,
    /// The organisation default: the key sets none.
    Default,
}

impl LimitsSource {
    pub fn name(self) -> &'static str {
        match self {
            LimitsSource::Key => "key",
            LimitsSource::Default => "default",
        }
    }
}

impl BudgetPolicy {
    /// The dollar limits in force for `record`.
    pub fn limits_of<'a>(&'a self, record: &'a ApiKeyRecord) -> (&'a [DollarLimit], LimitsSource) {
        match &record.dollar_limits {
            Some(limits) => (limits, LimitsSource::Key),
            None => (&self.default_limits, LimitsSource::Default),
        }
    }
}

/// One spend counter: a limit (`DollarLimit::id`) in one of its periods.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpendCounter {
    pub limit: String,
    pub period: String,
}

/// The 5-hour window a request counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FiveHourStep {
    /// The stored window starting here (epoch seconds) is still open.
    Same(u64),
    /// None is open: this request opens one starting here.
    Open(u64),
}

impl FiveHourStep {
    pub fn start(self) -> u64 {
        match self {
            FiveHourStep::Same(start) | FiveHourStep::Open(start) => start,
        }
    }
}

/// The 5-hour window in force at `now` for a key whose last window started
/// at `stored`: it stays open five hours from its start; a request after
/// that opens the next. A window stored ahead of `now` (another instance's
/// clock) is still open.
pub fn five_hour_step(stored: Option<u64>, now: OffsetDateTime) -> FiveHourStep {
    let now = epoch_seconds(now);
    match stored {
        Some(start) if start + FIVE_HOURS > now => FiveHourStep::Same(start),
        _ => FiveHourStep::Open(now),
    }
}

/// A limit's counting period at a moment: the counter's period name and
/// when the period ends (`None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub name: String,
    pub resets_at: Option<OffsetDateTime>,
}

/// The period of `window` containing `at` in `zone`; for the 5-hour window,
/// the one starting at `five_hour_start`.
pub fn period_of(
    window: Window,
    at: OffsetDateTime,
    zone: &BudgetZone,
    five_hour_start: u64,
) -> Period {
    let instant = |ts: jiff::Timestamp| {
        OffsetDateTime::from_unix_timestamp(ts.as_second()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    };
    let local = jiff::Timestamp::from_second(at.unix_timestamp())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned_datetime(zone.zone.clone())
        .date();
    let start_of = |date: jiff::civil::Date| {
        date.to_zoned_datetime(zone.zone.clone())
            .map(|z| instant(z.timestamp()))
            .ok()
    };
    match window {
        Window::FiveHours => Period {
            name: format!("h{five_hour_start}"),
            resets_at: OffsetDateTime::from_unix_timestamp(
                i64::try_from(five_hour_start + FIVE_HOURS).unwrap_or(i64::MAX),
            )
            .ok(),
        },
        Window::Day => Period {
            name: format!("d{local}"),
            resets_at: local.tomorrow().ok().and_then(start_of),
        },
        Window::Week => {
            let monday = local
                .checked_sub(
                    jiff::Span::new().days(i64::from(local.weekday().to_monday_zero_offset())),
                )
                .unwrap_or(local);
            Period {
                name: format!("w{monday}"),
                resets_at: monday
                    .checked_add(jiff::Span::new().days(7))
                    .ok()
                    .and_then(start_of),
            }
        }
        Window::Month => {
            let first = local.first_of_month();
            Period {
                name: format!("m{:04}-{:02}", first.year(), first.month()),
                resets_at: first.last_of_month().tomorrow().ok().and_then(start_of),
            }
        }
        Window::Lifetime => Period {
            name: "all".to_owned(),
            resets_at: None,
        },
    }
}

/// One limit as it stands: what its current period has used and what is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStanding {
    pub limit: DollarLimit,
    pub source: LimitsSource,
    pub counter: SpendCounter,
    pub used: MicroUsd,
    /// When the period ends; for a 5-hour window not open yet, `None`
    /// (it opens with the next request).
    pub resets_at: Option<OffsetDateTime>,
    /// A 5-hour window not open at `now`: nothing used, nothing counted yet.
    pub not_open: bool,
}

impl LimitStanding {
    pub fn remaining(&self) -> MicroUsd {
        self.limit.limit.saturating_sub(self.used)
    }

    /// Spent: the next request it applies to is refused (soft limits admit
    /// while any room is left).
    pub fn spent(&self) -> bool {
        self.used >= self.limit.limit
    }
}

/// Every limit in force for `record` at `now`, with its standing; the
/// 5-hour window as `step` says (the one the admission wrote, or the one
/// in force).
fn standings_with(
    record: &ApiKeyRecord,
    policy: &BudgetPolicy,
    now: OffsetDateTime,
    step: FiveHourStep,
) -> Vec<LimitStanding> {
    let (limits, source) = policy.limits_of(record);
    limits
        .iter()
        .map(|limit| {
            let period = period_of(limit.window, now, &policy.zone, step.start());
            let not_open =
                limit.window == Window::FiveHours && matches!(step, FiveHourStep::Open(_));
            let counter = SpendCounter {
                limit: limit.id(),
                period: period.name,
            };
            let used = if not_open {
                0
            } else {
                record.spend.get(&counter).copied().unwrap_or(0)
            };
            LimitStanding {
                limit: limit.clone(),
                source,
                counter,
                used,
                resets_at: if not_open { None } else { period.resets_at },
                not_open,
            }
        })
        .collect()
}

/// Every limit in force for `record` at `now`, as the views show them.
pub fn standings(
    record: &ApiKeyRecord,
    policy: &BudgetPolicy,
    now: OffsetDateTime,
) -> Vec<LimitStanding> {
    standings_with(
        record,
        policy,
        now,
        five_hour_step(record.five_hour_start, now),
    )
}

/// What is left for a request for `models` (empty: every limit): the
/// tightest applicable limit and the nearest reset of any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headroom {
    /// The applicable limit with the least left, and what it has left.
    pub tightest: Option<(String, MicroUsd)>,
    /// The soonest an applicable limit's period ends.
    pub next_reset: Option<OffsetDateTime>,
}

/// The headroom `record` has at `now` under its limits for `models`.
pub fn headroom(
    record: &ApiKeyRecord,
    policy: &BudgetPolicy,
    models: &[&str],
    now: OffsetDateTime,
) -> Headroom {
    let applicable: Vec<LimitStanding> = standings(record, policy, now)
        .into_iter()
        .filter(|s| applies(&s.limit, models))
        .collect();
    Headroom {
        tightest: applicable
            .iter()
            .min_by_key(|s| s.remaining())
            .map(|s| (s.limit.id(), s.remaining())),
        next_reset: applicable.iter().filter_map(|s| s.resets_at).min(),
    }
}

/// Whether a request whose worst case is `tokens` tokens costing `cost`
/// could use up what `record` (as its admission left it) has of its token
/// quota or of a dollar limit covering `models`. Such a request's usage is
/// recorded before its answer ends, so that a client's next request, sent
/// once this answer ended, is judged on it; the others settle after their
/// answer, adding nothing to its latency.
pub fn may_exhaust(
    record: &ApiKeyRecord,
    policy: &BudgetPolicy,
    models: &[&str],
    tokens: u64,
    cost: MicroUsd,
    now: OffsetDateTime,
) -> bool {
    record.remaining_tokens().is_some_and(|left| tokens >= left)
        || standings(record, policy, now)
            .iter()
            .any(|s| applies(&s.limit, models) && cost >= s.remaining())
}

/// How the admission write states the key's dollar limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetWrite {
    /// The limits the checks were stated from: the write applies only while
    /// the key still holds them (`None`: the key sets none, the default's
    /// checks apply).
    pub guard: Option<Vec<DollarLimit>>,
    /// The 5-hour window to count in, when the key has a 5-hour limit.
    pub five_hour: Option<FiveHourStep>,
    /// Counters that must be below their limit (soft: room left admits),
    /// each with its limit.
    pub checks: Vec<(SpendCounter, MicroUsd)>,
    /// Hard mode: the worst case (micro-dollars) every checked counter must
    /// still hold below its limit, added to each of them by the same write.
    pub reserve: Option<MicroUsd>,
}

/// The admission write's dollar checks for a request for `models` (empty:
/// every limit applies), stated from `record` as known (cached, or as a
/// refused write returned it); in hard mode, `reserve` is the request's
/// worst case, reserved on every applicable counter (a 5-hour window the
/// request opens included: even an empty window must hold it).
pub fn budget_write(
    record: Option<&ApiKeyRecord>,
    policy: &BudgetPolicy,
    models: &[&str],
    now: OffsetDateTime,
    reserve: Option<MicroUsd>,
) -> BudgetWrite {
    let (limits, source) = match record {
        Some(record) => policy.limits_of(record),
        None => (policy.default_limits.as_slice(), LimitsSource::Default),
    };
    let step = five_hour_step(record.and_then(|r| r.five_hour_start), now);
    let has_five_hours = limits.iter().any(|l| l.window == Window::FiveHours);
    let checks = limits
        .iter()
        .filter(|limit| applies(limit, models))
        .filter(|limit| {
            reserve.is_some()
                || !(limit.window == Window::FiveHours && matches!(step, FiveHourStep::Open(_)))
        })
        .map(|limit| {
            let period = period_of(limit.window, now, &policy.zone, step.start());
            let counter = SpendCounter {
                limit: limit.id(),
                period: period.name,
            };
            (counter, limit.limit)
        })
        .collect();
    BudgetWrite {
        guard: (source == LimitsSource::Key).then(|| limits.to_vec()),
        five_hour: has_five_hours.then_some(step),
        checks,
        reserve,
    }
}

/// A hard-mode worst case that one of the dollar limits cannot hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorstCaseOverBudget {
    /// The limit, with what its period has used (reservations included).
    pub limit: SpentLimit,
    pub worst: MicroUsd,
    /// What requests in flight hold in reservations (at most this much of
    /// `used` is given back when they settle).
    pub held: MicroUsd,
}

impl WorstCaseOverBudget {
    /// What is left of the limit now.
    pub fn left(&self) -> MicroUsd {
        self.limit.limit.saturating_sub(self.limit.used)
    }

    /// Whether it may fit once the requests in flight settle (a wait of
    /// seconds), rather than only after the period resets.
    pub fn transient(&self) -> bool {
        let settled = self.limit.used.saturating_sub(self.held);
        self.worst <= self.limit.limit.saturating_sub(settled)
    }
}

impl fmt::Display for WorstCaseOverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let limit = &self.limit;
        write!(
            f,
            "worst case ${} exceeds the ${} left of the ${} limit {}",
            usd(self.worst),
            usd(self.left()),
            usd(limit.limit),
            limit.window.phrase()
        )?;
        if let Some(models) = &limit.models {
            write!(f, " on models `{models}`")?;
        }
        if self.transient() {
            return write!(
                f,
                " while ${} is reserved by this key's requests in flight; retry once they end",
                usd(self.held)
            );
        }
        write!(f, "; lower max_tokens or shorten the prompt")?;
        match limit.reset_phrase() {
            Some(reset) => write!(f, ", or wait until {reset}"),
            None => write!(f, ", or ask your relay admin to raise the limit"),
        }
    }
}

/// The first dollar limit applying to `models` that cannot hold a hard-mode
/// request's `worst` case on `record` (as stored) at `now`.
pub fn worst_case_over(
    record: &ApiKeyRecord,
    policy: &BudgetPolicy,
    models: &[&str],
    worst: MicroUsd,
    now: OffsetDateTime,
) -> Option<WorstCaseOverBudget> {
    let (_, held) = record.held_by_flights();
    standings(record, policy, now)
        .into_iter()
        .find(|s| applies(&s.limit, models) && s.used.saturating_add(worst) > s.limit.limit)
        .map(|s| WorstCaseOverBudget {
            limit: SpentLimit::from((&s, policy)),
            worst,
            held,
        })
}

fn applies(limit: &DollarLimit, models: &[&str]) -> bool {
    models.is_empty() || models.iter().any(|m| limit.applies_to(Some(m)))
}

/// A spent limit that refuses a request for `models`, judged on the stored
/// key (the first, in the order the limits are listed).
pub fn spent_limit(
    record: &ApiKeyRecord,
    policy: &BudgetPolicy,
    models: &[&str],
    now: OffsetDateTime,
) -> Option<LimitStanding> {
    standings(record, policy, now)
        .into_iter()
        .find(|s| applies(&s.limit, models) && s.spent())
}

/// What a settlement does to the key's spend counters for one admitted
/// request: adds its cost to each counter of a limit that applies to it,
/// and drops counters of periods that have ended (so a key item does not
/// grow with every day it is used), with their alert markers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetCharge {
    pub add_to: Vec<SpendCounter>,
    pub drop: Vec<SpendCounter>,
    /// The `add_to` counters as budget alerts judge them once the cost is
    /// settled (`alerts::AlertWatch`), from the same admitted record.
    pub alerts: Vec<alerts::AlertWatch>,
    /// The tokens-per-minute counters' share (`domain::tpm`): the other
    /// per-period counters on the key a settlement moves, carried here so
    /// one value holds all of them (set by the proxy, which knows the tier).
    pub tokens_per_minute: super::tpm::MinuteCharge,
    /// Hard mode: what the admission reserved, given back by the
    /// settlement that adds the real cost (`BudgetCharge::holding`).
    pub reservation: Option<Reservation>,
}

impl BudgetCharge {
    /// For a request for `models` (empty: every limit) admitted at `now`
    /// against `admitted`, the key as the admission write left it.
    pub fn of(
        admitted: &ApiKeyRecord,
        policy: &BudgetPolicy,
        models: &[&str],
        now: OffsetDateTime,
    ) -> BudgetCharge {
        // The admission wrote the window in force: read it back as is.
        let step = match admitted.five_hour_start {
            Some(start) => FiveHourStep::Same(start),
            None => FiveHourStep::Open(epoch_seconds(now)),
        };
        let standings = standings_with(admitted, policy, now, step);
        let current: BTreeSet<&SpendCounter> = standings.iter().map(|s| &s.counter).collect();
        let applicable: Vec<&LimitStanding> = standings
            .iter()
            .filter(|s| applies(&s.limit, models))
            .collect();
        // Counters and alert markers of ended periods (a marker outlives
        // its counter only if an earlier drop lost a race: dropped too).
        // A counter a request in flight reserved on stays until that
        // request gives its reservation back.
        let held: BTreeSet<&SpendCounter> = admitted
            .flights
            .iter()
            .filter_map(|f| f.reservation.as_ref())
            .flat_map(|r| &r.counters)
            .collect();
        let ended: BTreeSet<&SpendCounter> = admitted
            .spend
            .keys()
            .chain(admitted.budget_alerts.keys())
            .filter(|counter| !current.contains(counter) && !held.contains(counter))
            .collect();
        BudgetCharge {
            add_to: applicable.iter().map(|s| s.counter.clone()).collect(),
            drop: ended.into_iter().cloned().collect(),
            alerts: applicable
                .iter()
                .map(|s| alert_watch(admitted, s))
                .collect(),
            tokens_per_minute: Default::default(),
            reservation: None,
        }
    }

    /// The charge of a request that holds `reservation` (hard mode): its
    /// settlement gives it back, and its alerts are judged on the spend
    /// before it (the request's own reservation is not spend).
    pub fn holding(mut self, reservation: Option<Reservation>) -> BudgetCharge {
        if let Some(reservation) = &reservation {
            for watch in &mut self.alerts {
                if reservation.counters.contains(&watch.counter) {
                    watch.used_before = watch.used_before.saturating_sub(reservation.cost);
                }
            }
        }
        self.reservation = reservation;
        self
    }

    /// The counters in force for `record` at `now` (as
    /// [`BudgetCharge::per_counter_costs`] charges a batch), as budget
    /// alerts judge them.
    pub fn alert_watches(
        record: &ApiKeyRecord,
        policy: &BudgetPolicy,
        now: OffsetDateTime,
    ) -> Vec<alerts::AlertWatch> {
        let step = five_hour_step(record.five_hour_start, now);
        standings_with(record, policy, now, step)
            .iter()
            .filter(|s| !s.not_open)
            .map(|s| alert_watch(record, s))
            .collect()
    }

    /// The counters a batch's per-model costs add to: each limit's counter
    /// gets the cost of the models it applies to.
    pub fn per_counter_costs(
        admitted: &ApiKeyRecord,
        policy: &BudgetPolicy,
        costs: &[(&str, MicroUsd)],
        now: OffsetDateTime,
    ) -> BTreeMap<SpendCounter, MicroUsd> {
        let step = five_hour_step(admitted.five_hour_start, now);
        standings_with(admitted, policy, now, step)
            .into_iter()
            .filter(|s| !s.not_open)
            .map(|s| {
                let cost = costs
                    .iter()
                    .filter(|(model, _)| s.limit.applies_to(Some(model)))
                    .map(|(_, cost)| cost)
                    .sum();
                (s.counter, cost)
            })
            .filter(|(_, cost)| *cost > 0)
            .collect()
    }
}

fn alert_watch(record: &ApiKeyRecord, standing: &LimitStanding) -> alerts::AlertWatch {
    alerts::AlertWatch {
        counter: standing.counter.clone(),
        limit: standing.limit.clone(),
        used_before: standing.used,
        alerted: record
            .budget_alerts
            .get(&standing.counter)
            .copied()
            .unwrap_or(0),
        resets_at: standing.resets_at,
    }
}

/// A dollar limit as an admin writes it, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitInput {
    pub window: String,
    /// Dollars (`20`, `12.5`): exact to the micro-dollar.
    pub limit_usd: f64,
    pub models: Option<String>,
}

/// Validates the dollar limits in `field` (`dollar_limits`), each refusal
/// naming the offending entry and field.
pub fn validate_limits(
    field: &str,
    inputs: Vec<LimitInput>,
) -> Result<Vec<DollarLimit>, FieldError> {
    if inputs.len() > MAX_LIMITS {
        return Err(FieldError::new(
            field,
            format!("at most {MAX_LIMITS} dollar limits"),
        ));
    }
    let mut seen = BTreeSet::new();
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            let at = |name: &str| format!("{field}[{i}].{name}");
            let window = Window::parse(input.window.trim()).ok_or_else(|| {
                FieldError::new(at("window"), "must be one of `5h`, `day`, `week`, `month`, `lifetime`")
            })?;
            let limit = exact_micro_usd(input.limit_usd, MAX_LIMIT_USD)
                .filter(|micro| *micro > 0)
                .ok_or_else(|| {
                    FieldError::new(
                        at("limit_usd"),
                        "must be a positive number of dollars with at most 6 decimals, up to 1000000000",
                    )
                })?;
            let models = input
                .models
                .map(|pattern| {
                    let pattern = pattern.trim().to_owned();
                    let ok = !pattern.is_empty()
                        && pattern.len() <= 128
                        && pattern
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-._:@/*".contains(&b));
                    if ok {
                        Ok(pattern)
                    } else {
                        Err(FieldError::new(
                            at("models"),
                            "must be a model pattern: up to 128 of letters, digits, `-._:@/` and `*` (any run of characters)",
                        ))
                    }
                })
                .transpose()?;
            let limit = DollarLimit {
                window,
                limit,
                models,
            };
            if !seen.insert(limit.id()) {
                return Err(FieldError::new(
                    at("window"),
                    "another limit has the same window and models",
                ));
            }
            Ok(limit)
        })
        .collect()
}

/// Micro-dollars as dollars, for messages and headers (`12.5` → `12.50`,
/// sub-cent amounts kept: `0.000123`).
pub fn usd(micro: MicroUsd) -> String {
    let whole = micro / 1_000_000;
    let fraction = micro % 1_000_000;
    if fraction.is_multiple_of(10_000) {
        format!("{whole}.{:02}", fraction / 10_000)
    } else {
        let digits = format!("{fraction:06}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    }
}

/// Why a spent limit refuses: names the window, the amounts and the reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpentLimit {
    pub window: Window,
    pub models: Option<String>,
    pub limit: MicroUsd,
    pub used: MicroUsd,
    pub resets_at: Option<OffsetDateTime>,
    pub zone: String,
}

impl From<(&LimitStanding, &BudgetPolicy)> for SpentLimit {
    fn from((standing, policy): (&LimitStanding, &BudgetPolicy)) -> Self {
        SpentLimit {
            window: standing.limit.window,
            models: standing.limit.models.clone(),
            limit: standing.limit.limit,
            used: standing.used,
            resets_at: standing.resets_at,
            zone: policy.zone.name().to_owned(),
        }
    }
}

impl SpentLimit {
    /// When the limit's period resets, as a refusal says it (`None`: never).
    fn reset_phrase(&self) -> Option<String> {
        match (self.window, self.resets_at) {
            (Window::Lifetime, _) | (_, None) => None,
            (Window::FiveHours, Some(at)) => Some(format!(
                "{}, when the 5-hour window resets",
                super::format_timestamp(at)
            )),
            (_, Some(at)) => Some(format!(
                "{} ({} calendar, {})",
                super::format_timestamp(at),
                self.window.name(),
                self.zone
            )),
        }
    }
}

impl fmt::Display for SpentLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dollar limit reached: ${} of ${} {}",
            usd(self.used),
            usd(self.limit),
            self.window.phrase()
        )?;
        if let Some(models) = &self.models {
            write!(f, " on models `{models}`")?;
        }
        match (self.window, self.resets_at, self.reset_phrase()) {
            (_, _, None) => write!(f, "; ask your relay admin to raise it"),
            (Window::FiveHours, Some(at), _) => {
                write!(f, "; the window resets at {}", super::format_timestamp(at))
            }
            (_, _, Some(reset)) => write!(f, "; resets at {reset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_timestamp;

    fn at(text: &str) -> OffsetDateTime {
        parse_timestamp(text).unwrap()
    }

    fn limit(window: Window, usd: u64, models: Option<&str>) -> DollarLimit {
        DollarLimit {
            window,
            limit: usd * 1_000_000,
            models: models.map(str::to_owned),
        }
    }

    fn key(limits: Option<Vec<DollarLimit>>) -> ApiKeyRecord {
        ApiKeyRecord {
            dollar_limits: limits,
            ..ApiKeyRecord::sample(at("2026-11-28T12:00:00Z")).0
        }
    }

    fn counter(limit: &str, period: &str) -> SpendCounter {
        SpendCounter {
            limit: limit.into(),
            period: period.into(),
        }
    }

    #[test]
    fn patterns_match_with_stars_anywhere() {
        for (pattern, text, expected) in [
            ("claude-opus-*", "claude-opus-4-5-20251101", true),
            ("claude-opus-*", "claude-sonnet-4-5", false),
            ("claude-opus-*", "claude-opus-", true),
            ("*haiku*", "claude-haiku-4-5", true),
            ("claude-*-4-5", "claude-opus-4-5", true),
            ("claude-*-4-5", "claude-opus-4-5-x", false),
            ("claude-sonnet-4-5", "claude-sonnet-4-5", true),
            ("claude-sonnet-4-5", "claude-sonnet-4-50", false),
            ("a*a", "a", false),
            ("*", "", true),
            ("claude-opus-*", "CLAUDE-Opus-4-5", true),
            ("*claude-opus-*", "us.anthropic.claude-opus-4-5-v1:0", true),
        ] {
            assert_eq!(glob_matches(pattern, text), expected, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn calendar_periods_roll_over_at_utc_midnight_monday_and_month_start() {
        let utc = BudgetZone::utc();
        // Saturday 2026-11-28 23:59:59 UTC, then one second later.
        let before = at("2026-11-28T23:59:59Z");
        let after = at("2026-11-29T00:00:00Z");
        let day = period_of(Window::Day, before, &utc, 0);
        assert_eq!(day.name, "d2026-11-28");
        assert_eq!(day.resets_at, Some(after));
        assert_eq!(period_of(Window::Day, after, &utc, 0).name, "d2026-11-29");
        // The week starts on Monday 2026-11-23 and resets on Monday the 30th.
        let week = period_of(Window::Week, after, &utc, 0);
        assert_eq!(week.name, "w2026-11-23");
        assert_eq!(week.resets_at, Some(at("2026-11-30T00:00:00Z")));
        assert_eq!(
            period_of(Window::Week, at("2026-11-30T00:00:00Z"), &utc, 0).name,
            "w2026-11-30"
        );
        let month = period_of(Window::Month, at("2026-11-30T23:59:59Z"), &utc, 0);
        assert_eq!(month.name, "m2026-11");
        assert_eq!(month.resets_at, Some(at("2026-12-01T00:00:00Z")));
        let december = period_of(Window::Month, at("2026-12-31T12:00:00Z"), &utc, 0);
        assert_eq!(december.resets_at, Some(at("2027-01-01T00:00:00Z")));
        let lifetime = period_of(Window::Lifetime, after, &utc, 0);
        assert_eq!((lifetime.name.as_str(), lifetime.resets_at), ("all", None));
    }

    #[test]
    fn calendar_periods_follow_a_configured_time_zone() {
        let tokyo = BudgetZone::named("Asia/Tokyo").unwrap();
        // 15:30 UTC on Sunday the 29th is 00:30 on Monday the 30th in Tokyo
        // (UTC+9): a new day, a new week; the day resets at 15:00 UTC.
        let now = at("2026-11-29T15:30:00Z");
        let day = period_of(Window::Day, now, &tokyo, 0);
        assert_eq!(day.name, "d2026-11-30");
        assert_eq!(day.resets_at, Some(at("2026-11-30T15:00:00Z")));
        assert_eq!(period_of(Window::Week, now, &tokyo, 0).name, "w2026-11-30");
        assert_eq!(
            period_of(Window::Day, now, &BudgetZone::utc(), 0).name,
            "d2026-11-29"
        );
        // New York in November is UTC-5: its month ends at 05:00 UTC on
        // 1 December; daylight saving (8 March 2026) makes a 23-hour day.
        let new_york = BudgetZone::named("America/New_York").unwrap();
        let month = period_of(Window::Month, at("2026-12-01T04:59:59Z"), &new_york, 0);
        assert_eq!(month.name, "m2026-11");
        assert_eq!(month.resets_at, Some(at("2026-12-01T05:00:00Z")));
        let dst = period_of(Window::Day, at("2026-03-08T12:00:00Z"), &new_york, 0);
        assert_eq!(dst.resets_at, Some(at("2026-03-09T04:00:00Z")));
        assert!(BudgetZone::named("Mars/Olympus").is_err());
    }

    #[test]
    fn the_five_hour_window_opens_with_the_first_request_after_the_last_closed() {
        let opened = at("2026-11-28T09:17:00Z");
        let start = epoch_seconds(opened);
        // No window yet: this request opens one at its own moment.
        assert_eq!(five_hour_step(None, opened), FiveHourStep::Open(start));
        // Open for five hours from its start…
        assert_eq!(
            five_hour_step(Some(start), at("2026-11-28T14:16:59Z")),
            FiveHourStep::Same(start)
        );
        // …then the next request opens the next one (not at a fixed boundary).
        let later = at("2026-11-28T16:02:00Z");
        assert_eq!(
            five_hour_step(Some(start), at("2026-11-28T14:17:00Z")),
            FiveHourStep::Open(start + FIVE_HOURS)
        );
        assert_eq!(
            five_hour_step(Some(start), later),
            FiveHourStep::Open(epoch_seconds(later))
        );
        let period = period_of(Window::FiveHours, later, &BudgetZone::utc(), start);
        assert_eq!(period.name, format!("h{start}"));
        assert_eq!(period.resets_at, Some(at("2026-11-28T14:17:00Z")));
    }

    #[test]
    fn standings_show_used_left_and_reset_of_the_current_periods_only() {
        let mut record = key(Some(vec![
            limit(Window::Day, 10, None),
            limit(Window::Week, 50, Some("claude-opus-*")),
            limit(Window::FiveHours, 5, None),
        ]));
        let now = at("2026-11-28T12:00:00Z");
        record.five_hour_start = Some(epoch_seconds(at("2026-11-28T10:00:00Z")));
        record.spend = BTreeMap::from([
            (counter("day", "d2026-11-27"), 9_000_000),
            (counter("day", "d2026-11-28"), 2_500_000),
            (counter("week:claude-opus-*", "w2026-11-23"), 50_000_000),
            (
                counter("5h", &format!("h{}", record.five_hour_start.unwrap())),
                1_000_000,
            ),
        ]);
        let policy = BudgetPolicy::default();
        let standings = standings(&record, &policy, now);
        let summary: Vec<_> = standings
            .iter()
            .map(|s| (s.limit.id(), s.used, s.remaining(), s.resets_at))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "day".to_owned(),
                    2_500_000,
                    7_500_000,
                    Some(at("2026-11-29T00:00:00Z"))
                ),
                (
                    "week:claude-opus-*".to_owned(),
                    50_000_000,
                    0,
                    Some(at("2026-11-30T00:00:00Z"))
                ),
                (
                    "5h".to_owned(),
                    1_000_000,
                    4_000_000,
                    Some(at("2026-11-28T15:00:00Z"))
                ),
            ]
        );
        // The weekly Opus limit refuses Opus, not Sonnet.
        let spent = spent_limit(&record, &policy, &["claude-opus-4-5"], now).unwrap();
        assert_eq!(spent.limit.id(), "week:claude-opus-*");
        assert_eq!(
            spent_limit(&record, &policy, &["claude-sonnet-4-5"], now),
            None
        );
        // After the window closes, the 5-hour limit shows nothing used and
        // no reset: the next request opens it.
        let later = standings_of_five_hours(&record, &policy, at("2026-11-28T15:00:01Z"));
        assert_eq!(
            (later.used, later.resets_at, later.not_open),
            (0, None, true)
        );
    }

    fn standings_of_five_hours(
        record: &ApiKeyRecord,
        policy: &BudgetPolicy,
        now: OffsetDateTime,
    ) -> LimitStanding {
        standings(record, policy, now)
            .into_iter()
            .find(|s| s.limit.window == Window::FiveHours)
            .unwrap()
    }

    #[test]
    fn headroom_is_the_tightest_applicable_limit_and_the_nearest_reset() {
        let now = at("2026-11-28T12:00:00Z");
        let mut record = key(Some(vec![
            limit(Window::Month, 100, None),
            limit(Window::Day, 10, None),
            limit(Window::Week, 50, Some("claude-opus-*")),
        ]));
        record.spend = BTreeMap::from([
            (counter("month", "m2026-11"), 95_000_000),
            (counter("day", "d2026-11-28"), 1_000_000),
            (counter("week:claude-opus-*", "w2026-11-23"), 49_000_000),
        ]);
        let policy = BudgetPolicy::default();
        // Sonnet: the month has $5 left, the day $9; the day resets first.
        let sonnet = headroom(&record, &policy, &["claude-sonnet-4-5"], now);
        assert_eq!(sonnet.tightest, Some(("month".to_owned(), 5_000_000)));
        assert_eq!(sonnet.next_reset, Some(at("2026-11-29T00:00:00Z")));
        // Opus: its week has only $1 left.
        let opus = headroom(&record, &policy, &["claude-opus-4-5"], now);
        assert_eq!(
            opus.tightest,
            Some(("week:claude-opus-*".to_owned(), 1_000_000))
        );
        let none = headroom(&key(Some(vec![])), &policy, &[], now);
        assert_eq!((none.tightest, none.next_reset), (None, None));
    }

    #[test]
    fn a_request_may_exhaust_a_limit_when_its_worst_case_reaches_what_is_left() {
        let now = at("2026-11-28T12:00:00Z");
        let policy = BudgetPolicy::default();
        let mut record = key(Some(vec![limit(Window::Day, 10, Some("claude-opus-*"))]));
        record.token_limit = Some(1_000);
        record.tokens_used = 400;
        record.spend = BTreeMap::from([(counter("day:claude-opus-*", "d2026-11-28"), 9_000_000)]);
        let opus = ["claude-opus-4-5"];
        // 600 tokens are left: a worst case of 600 may use them up, 599 not.
        assert!(may_exhaust(&record, &policy, &[], 600, 0, now));
        assert!(!may_exhaust(&record, &policy, &[], 599, 0, now));
        // $1 is left of the Opus day: a $1 worst case may spend it…
        assert!(may_exhaust(&record, &policy, &opus, 1, 1_000_000, now));
        assert!(!may_exhaust(&record, &policy, &opus, 1, 999_999, now));
        // …but not for Sonnet, which the limit does not cover.
        assert!(!may_exhaust(
            &record,
            &policy,
            &["claude-sonnet-4-5"],
            1,
            5_000_000,
            now
        ));
        // Nothing limited: nothing to exhaust.
        let free = key(Some(vec![]));
        assert!(!may_exhaust(&free, &policy, &[], u64::MAX, u64::MAX, now));
    }

    #[test]
    fn the_organisation_default_applies_to_keys_that_set_none() {
        let policy = BudgetPolicy {
            default_limits: vec![limit(Window::Month, 100, None)],
            zone: BudgetZone::utc(),
        };
        let now = at("2026-11-28T12:00:00Z");
        let mut unset = key(None);
        unset.spend = BTreeMap::from([(counter("month", "m2026-11"), 100_000_000)]);
        let standing = &standings(&unset, &policy, now)[0];
        assert_eq!(
            (standing.source, standing.spent()),
            (LimitsSource::Default, true)
        );
        assert!(spent_limit(&unset, &policy, &["claude-sonnet-4-5"], now).is_some());
        let write = budget_write(Some(&unset), &policy, &["claude-sonnet-4-5"], now, None);
        assert_eq!(write.guard, None);
        assert_eq!(
            write.checks,
            vec![(counter("month", "m2026-11"), 100_000_000)]
        );
        // An explicit empty list opts the key out of the default.
        let mut opted_out = unset.clone();
        opted_out.dollar_limits = Some(vec![]);
        assert!(standings(&opted_out, &policy, now).is_empty());
        assert_eq!(spent_limit(&opted_out, &policy, &[], now), None);
        assert_eq!(
            budget_write(Some(&opted_out), &policy, &[], now, None).guard,
            Some(vec![])
        );
        // A key with its own limits ignores the default.
        let own = key(Some(vec![limit(Window::Day, 1, None)]));
        let (limits, source) = policy.limits_of(&own);
        assert_eq!((limits.len(), source), (1, LimitsSource::Key));
    }

    #[test]
    fn the_admission_checks_only_applicable_limits_in_their_current_periods() {
        let limits = vec![
            limit(Window::Day, 10, None),
            limit(Window::Week, 50, Some("claude-opus-*")),
            limit(Window::FiveHours, 5, None),
            limit(Window::Lifetime, 1000, None),
        ];
        let record = key(Some(limits.clone()));
        let now = at("2026-11-28T12:00:00Z");
        let write = budget_write(
            Some(&record),
            &BudgetPolicy::default(),
            &["claude-sonnet-4-5"],
            now,
            None,
        );
        assert_eq!(write.guard, Some(limits));
        // No 5-hour window was open: this request opens it, and nothing
        // in the new window needs checking.
        assert_eq!(
            write.five_hour,
            Some(FiveHourStep::Open(epoch_seconds(now)))
        );
        assert_eq!(
            write.checks,
            vec![
                (counter("day", "d2026-11-28"), 10_000_000),
                (counter("lifetime", "all"), 1_000_000_000),
            ]
        );
        // A key without a 5-hour limit never writes a window.
        let plain = key(Some(vec![limit(Window::Day, 10, None)]));
        assert_eq!(
            budget_write(Some(&plain), &BudgetPolicy::default(), &[], now, None).five_hour,
            None
        );
    }

    #[test]
    fn a_settlement_adds_to_applicable_counters_and_drops_ended_periods() {
        let now = at("2026-11-28T12:00:00Z");
        let mut admitted = key(Some(vec![
            limit(Window::Day, 10, None),
            limit(Window::Week, 50, Some("claude-opus-*")),
        ]));
        admitted.spend = BTreeMap::from([
            (counter("day", "d2026-11-27"), 1),
            (counter("day", "d2026-11-28"), 2),
            (counter("month", "m2026-10"), 3),
        ]);
        let policy = BudgetPolicy::default();
        let charge = BudgetCharge::of(&admitted, &policy, &["claude-sonnet-4-5"], now);
        assert_eq!(charge.add_to, vec![counter("day", "d2026-11-28")]);
        assert_eq!(
            charge.drop,
            vec![counter("day", "d2026-11-27"), counter("month", "m2026-10")]
        );
        let opus = BudgetCharge::of(&admitted, &policy, &["claude-opus-4-5"], now);
        assert_eq!(
            opus.add_to,
            vec![
                counter("day", "d2026-11-28"),
                counter("week:claude-opus-*", "w2026-11-23")
            ]
        );
        // A batch's costs go to each limit by the models it applies to.
        let costs = [("claude-opus-4-5", 700), ("claude-haiku-4-5", 30)];
        let per_counter = BudgetCharge::per_counter_costs(&admitted, &policy, &costs, now);
        assert_eq!(
            per_counter,
            BTreeMap::from([
                (counter("day", "d2026-11-28"), 730),
                (counter("week:claude-opus-*", "w2026-11-23"), 700),
            ])
        );
    }

    #[test]
    fn limits_are_validated_naming_the_entry_and_field() {
        let input = |window: &str, usd: f64, models: Option<&str>| LimitInput {
            window: window.into(),
            limit_usd: usd,
            models: models.map(str::to_owned),
        };
        let ok = validate_limits(
            "dollar_limits",
            vec![
                input("day", 20.0, None),
                input("week", 12.5, Some("claude-opus-*")),
            ],
        )
        .unwrap();
        assert_eq!(
            ok,
            vec![
                limit(Window::Day, 20, None),
                DollarLimit {
                    window: Window::Week,
                    limit: 12_500_000,
                    models: Some("claude-opus-*".into()),
                }
            ]
        );
        for (inputs, field) in [
            (
                vec![input("fortnight", 1.0, None)],
                "dollar_limits[0].window",
            ),
            (
                vec![input("day", 1.0, None), input("day", 0.0, None)],
                "dollar_limits[1].limit_usd",
            ),
            (vec![input("day", -3.0, None)], "dollar_limits[0].limit_usd"),
            (
                vec![input("day", 0.0000001, None)],
                "dollar_limits[0].limit_usd",
            ),
            (
                vec![input("day", 1.0, Some("claude opus"))],
                "dollar_limits[0].models",
            ),
            (
                vec![input("day", 1.0, None), input("day", 2.0, None)],
                "dollar_limits[1].window",
            ),
        ] {
            assert_eq!(
                validate_limits("dollar_limits", inputs).unwrap_err().field,
                field
            );
        }
        let many = (0..=MAX_LIMITS)
            .map(|i| input("day", 1.0, Some(&format!("m{i}"))))
            .collect();
        assert_eq!(
            validate_limits("dollar_limits", many).unwrap_err().field,
            "dollar_limits"
        );
    }

    #[test]
    fn dollars_print_readably() {
        // Read exactly: `price::exact_micro_usd`, tested with the price list.
        assert_eq!(exact_micro_usd(12.5, MAX_LIMIT_USD), Some(12_500_000));
        assert_eq!(exact_micro_usd(2e9, MAX_LIMIT_USD), None);
        assert_eq!(usd(20_000_000), "20.00");
        assert_eq!(usd(12_345_678), "12.345678");
        assert_eq!(usd(1_200_000), "1.20");
        assert_eq!(usd(123), "0.000123");
    }

    #[test]
    fn a_refusal_names_the_window_the_amounts_and_the_reset() {
        let spent = SpentLimit {
            window: Window::Week,
            models: Some("claude-opus-*".into()),
            limit: 50_000_000,
            used: 51_234_500,
            resets_at: Some(at("2026-11-30T00:00:00Z")),
            zone: "UTC".into(),
        };
        assert_eq!(
            spent.to_string(),
            "dollar limit reached: $51.2345 of $50.00 per week on models `claude-opus-*`; \
             resets at 2026-11-30T00:00:00.000Z (week calendar, UTC)"
        );
        let lifetime = SpentLimit {
            window: Window::Lifetime,
            models: None,
            resets_at: None,
            ..spent
        };
        assert!(
            lifetime
                .to_string()
                .ends_with("in total; ask your relay admin to raise it")
        );
    }
}
