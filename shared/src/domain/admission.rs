//! The admission decision for one charged request (or batch), without I/O:
//! which refusal a key's state means, whether its quota admits the charge,
//! and how its rate window advances. The store states the same rules as one
//! conditional write and asks this module what a refused write meant.

use time::OffsetDateTime;

use super::budget::{
    BudgetPolicy, BudgetWrite, SpentLimit, WorstCaseOverBudget, budget_write, spent_limit,
    worst_case_over,
};
use super::epoch_seconds;
use super::flight::{Flight, Reservation};
use super::key::SecretHash;
use super::key::access::{KeyStatus, key_status};
use super::key::{ApiKeyRecord, LimitMode};
use super::price::MicroUsd;
use super::tier::window_of;
use super::tpm::{MinuteCheck, MinuteSpent, MinuteStanding, minute_of};

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionRefusal {
    #[error("no such key")]
    UnknownKey,
    #[error("wrong secret")]
    WrongSecret,
    #[error("key disabled")]
    Disabled,
    #[error("key expired")]
    Expired,
    #[error("token quota exhausted")]
    QuotaExhausted { used: u64, limit: u64 },
    /// A reservation (a batch's or a hard-mode message's worst case) does
    /// not fit what is left; `held` of what is used is reserved by
    /// messages in flight, given back when they settle.
    #[error("worst case exceeds the quota left")]
    WorstCaseExceedsQuota { worst: u64, left: u64, held: u64 },
    /// A hard-mode message's worst case does not fit a dollar limit.
    #[error("{0}")]
    WorstCaseOverBudget(WorstCaseOverBudget),
    /// The key turned hard-mode since it was read, and the request's worst
    /// case was not computed: a retry is judged afresh.
    #[error("limit mode changed")]
    LimitModeChanged,
    #[error("rate limited")]
    RateLimited { retry_after: u64 },
    /// The tier's tokens per minute are used up for the current minute
    /// (`domain::tpm`); `retry_after` is the seconds until it ends.
    #[error("tokens per minute used up")]
    TokensPerMinute {
        used: u64,
        limit: u64,
        retry_after: u64,
    },
    /// A dollar limit that applies to the request has no room left.
    #[error("{0}")]
    BudgetSpent(SpentLimit),
    /// The key's concurrent requests are all in flight.
    #[error("too many concurrent requests")]
    TooManyConcurrent { limit: u64 },
    /// More requests at once than the tier allows in a whole window.
    #[error("more requests than the tier's window holds")]
    OverTier {
        requests: u64,
        limit: u64,
        period: u64,
    },
}

/// The tier's rate limits: `requests` per fixed window of `period`
/// seconds, and optionally tokens per minute (`domain::tpm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u64,
    pub period: u64,
    /// `None`: no limit, or a charge exempt from it (a message batch).
    pub tokens_per_minute: Option<u64>,
}

/// What an admission takes from the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// Requests counted in the tier's window (a batch counts each of its own).
    pub requests: u64,
    pub quota: QuotaRule,
    /// It holds one of the key's concurrent-request leases until it is
    /// settled (a message does; a batch runs upstream, unleased).
    pub lease: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaRule {
    /// Admitted while any of the quota is left (a message's cost is known
    /// only once it is answered).
    AnyLeft,
    /// `tokens` (a worst case) must fit what is left of `limit`, the key's
    /// `token_limit` as last read (`None`: unlimited, nothing reserved);
    /// it is added to `tokens_used` (and `tokens_reserved`) in the same
    /// write, and replaced by the real figure when the usage is settled.
    Reserve { limit: Option<u64>, tokens: u64 },
}

impl Charge {
    /// One message request.
    pub const MESSAGE: Charge = Charge {
        requests: 1,
        quota: QuotaRule::AnyLeft,
        lease: true,
    };

    /// Tokens this admission adds to `tokens_used` and `tokens_reserved`.
    pub fn reserved(&self) -> u64 {
        match self.quota {
            QuotaRule::Reserve {
                limit: Some(_),
                tokens,
            } => tokens,
            _ => 0,
        }
    }
}

/// Which window to count in: the one the key item holds, or a new one.
/// The store writes it conditionally; a wrong guess costs one more round
/// trip, never a wrong count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowStep {
    /// Add to the count of the stored window starting here.
    Same(u64),
    /// Open the window starting here with this charge's requests.
    New(u64),
}

/// The write to attempt: the window step, the charge as it must be
/// stated (a reservation follows the key's stored limit), the dollar
/// limits' checks and the tokens-per-minute check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionWrite {
    pub step: WindowStep,
    pub charge: Charge,
    pub budget: BudgetWrite,
    /// The request's trace (`domain::flight`), written with it.
    pub flight: Option<Flight>,
    /// The limit mode the write was stated for, which the stored key must
    /// still have (`None`: not checked, a batch).
    pub mode: Option<LimitMode>,
    /// The current minute's token counter must be below the tier's limit.
    pub tpm: Option<MinuteCheck>,
}

/// What the dollar limits need to know of a request: the policy (default
/// limits, time zone), the models it asks for (empty: every limit
/// applies) and, for a message to a hard-mode key, its worst case.
#[derive(Debug, Clone, Copy)]
pub struct BudgetCheck<'a> {
    pub policy: &'a BudgetPolicy,
    pub models: &'a [&'a str],
    /// Computed when the key was believed hard-mode (`None` otherwise).
    pub worst: Option<WorstCase>,
}

/// The most a message could use: its tokens (prompt bound plus
/// `max_tokens`) and their cost at the dearest classes they could incur.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorstCase {
    pub tokens: u64,
    pub cost: MicroUsd,
}

/// How a write states the key's limit mode (a message's admission only:
/// batches reserve their worst case in either mode).
fn mode_of(record: Option<&ApiKeyRecord>, charge: &Charge) -> Option<LimitMode> {
    charge
        .lease
        .then(|| record.map_or(LimitMode::Soft, |r| r.limit_mode))
}

/// What is known of the key when deciding.
#[derive(Debug, Clone, Copy)]
pub enum KeyState<'a> {
    /// Nothing read yet: at most the record a cache holds, whose window
    /// and dollar limits the first write is stated from. The write's
    /// condition checks everything.
    Unread { believed: Option<&'a ApiKeyRecord> },
    /// The key item as a refused write returned it (`None`: no such key).
    Stored(Option<&'a ApiKeyRecord>),
}

/// The quota predicate, stated once: may a key that has used `used` of
/// `limit` tokens (`None`: unlimited) take this quota rule's charge? The
/// store's admission condition mirrors it
/// (`store::layout::api_key::admission_update`).
pub fn quota_admits(
    quota: QuotaRule,
    used: u64,
    limit: Option<u64>,
) -> Result<(), AdmissionRefusal> {
    let Some(limit) = limit else {
        return Ok(());
    };
    match quota {
        QuotaRule::AnyLeft if used >= limit => {
            Err(AdmissionRefusal::QuotaExhausted { used, limit })
        }
        QuotaRule::Reserve { tokens, .. } if used.saturating_add(tokens) > limit => {
            Err(AdmissionRefusal::WorstCaseExceedsQuota {
                worst: tokens,
                left: limit.saturating_sub(used),
                // What of `used` is reserved is the caller's to say.
                held: 0,
            })
        }
        _ => Ok(()),
    }
}

/// The rate window a key's next request counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowInForce {
    /// Its start (epoch seconds).
    pub start: u64,
    /// Requests already counted in it.
    pub used: u64,
    /// Whether the key item holds it (else it opens with the next request).
    pub stored: bool,
    /// Seconds until it ends.
    pub retry_after: u64,
}

/// The window in force for a key storing `stored` (start, count) at `now`:
/// the stored one while it is current, or ahead (another instance's clock
/// may be ahead: its window is then still whole); else the window `now`
/// falls in, empty.
pub fn window_in_force(
    stored: Option<(u64, u64)>,
    now: OffsetDateTime,
    period: u64,
) -> WindowInForce {
    let (window, left) = window_of(epoch_seconds(now), period);
    match stored {
        Some((start, used)) if start >= window => WindowInForce {
            start,
            used,
            stored: true,
            retry_after: if start == window { left } else { period },
        },
        _ => WindowInForce {
            start: window,
            used: 0,
            stored: false,
            retry_after: left,
        },
    }
}

/// Decides an admission: the write to attempt, or the refusal. Called
/// before the first write (`KeyState::Unread`: a guess at the window) and
/// after each refused one (`KeyState::Stored`: a final refusal, or the next
/// write, on another window or a changed limit).
///
/// Checks run in the order the refusals are reported: the charge against
/// the tier, the key's existence, its secret, its status (`key_status`),
/// its quota (`quota_admits`), its dollar limits (`budget::spent_limit`),
/// its rate window, its tokens this minute (`tpm::MinuteStanding::check`).
pub fn decide(
    state: KeyState<'_>,
    hash: &SecretHash,
    rate: RateLimit,
    mut charge: Charge,
    budget: BudgetCheck<'_>,
    now: OffsetDateTime,
) -> Result<AdmissionWrite, AdmissionRefusal> {
    if charge.requests > rate.requests {
        return Err(AdmissionRefusal::OverTier {
            requests: charge.requests,
            limit: rate.requests,
            period: rate.period,
        });
    }
    let (window, _) = window_of(epoch_seconds(now), rate.period);
    let old = match state {
        KeyState::Unread { believed } => {
            let last_window = believed.and_then(|r| r.rate_window).map(|(start, _)| start);
            let step = if last_window == Some(window) {
                WindowStep::Same(window)
            } else {
                WindowStep::New(window)
            };
            // A key believed hard whose worst case is unknown is stated
            // soft: the write fails on it, and the refusal says to retry.
            let mode = match (mode_of(believed, &charge), budget.worst) {
                (Some(LimitMode::Hard), None) => Some(LimitMode::Soft),
                (mode, _) => mode,
            };
            let worst = budget.worst.filter(|_| mode == Some(LimitMode::Hard));
            reserve_worst_tokens(&mut charge, believed.and_then(|r| r.token_limit), worst);
            let budget = budget_write(
                believed,
                budget.policy,
                budget.models,
                now,
                worst.map(|w| w.cost),
            );
            // Whatever the cache showed, the condition checks the stored
            // counter of the minute `now` falls in.
            let tpm = rate.tokens_per_minute.map(|limit| MinuteCheck {
                minute: minute_of(now).0,
                limit,
            });
            return Ok(AdmissionWrite {
                step,
                charge,
                budget,
                flight: None,
                mode,
                tpm,
            });
        }
        KeyState::Stored(None) => return Err(AdmissionRefusal::UnknownKey),
        KeyState::Stored(Some(old)) => old,
    };
    if !old.secret_hash.matches(hash) {
        return Err(AdmissionRefusal::WrongSecret);
    }
    match key_status(old, now) {
        KeyStatus::Usable => {}
        KeyStatus::Disabled => return Err(AdmissionRefusal::Disabled),
        KeyStatus::Expired => return Err(AdmissionRefusal::Expired),
    }
    let mode = mode_of(Some(old), &charge);
    let worst = match mode {
        Some(LimitMode::Hard) => Some(budget.worst.ok_or(AdmissionRefusal::LimitModeChanged)?),
        _ => None,
    };
    reserve_worst_tokens(&mut charge, old.token_limit, worst);
    let (held_tokens, _) = old.held_by_flights();
    quota_admits(charge.quota, old.tokens_used, old.token_limit).map_err(
        |refusal| match refusal {
            AdmissionRefusal::WorstCaseExceedsQuota { worst, left, .. } => {
                AdmissionRefusal::WorstCaseExceedsQuota {
                    worst,
                    left,
                    held: held_tokens,
                }
            }
            other => other,
        },
    )?;
    if let QuotaRule::Reserve { limit, .. } = &mut charge.quota {
        // The limit may have changed since it was read: the next write is
        // stated on the stored one.
        *limit = old.token_limit;
    }
    if charge.lease
        && let Some(limit) = old.max_concurrent
        && old.in_flight >= i64::try_from(limit).unwrap_or(i64::MAX)
    {
        return Err(AdmissionRefusal::TooManyConcurrent { limit });
    }
    match worst {
        Some(worst) => {
            if let Some(over) = worst_case_over(old, budget.policy, budget.models, worst.cost, now)
            {
                return Err(AdmissionRefusal::WorstCaseOverBudget(over));
            }
        }
        None => {
            if let Some(spent) = spent_limit(old, budget.policy, budget.models, now) {
                return Err(AdmissionRefusal::BudgetSpent(SpentLimit::from((
                    &spent,
                    budget.policy,
                ))));
            }
        }
    }
    let in_force = window_in_force(old.rate_window, now, rate.period);
    if in_force.used + charge.requests > rate.requests {
        return Err(AdmissionRefusal::RateLimited {
            retry_after: in_force.retry_after,
        });
    }
    let tpm = MinuteStanding::of(old, rate.tokens_per_minute, now)
        .map(|standing| standing.check())
        .transpose()
        .map_err(
            |MinuteSpent {
                 used,
                 limit,
                 retry_after,
             }| AdmissionRefusal::TokensPerMinute {
                used,
                limit,
                retry_after,
            },
        )?;
    let step = if in_force.stored {
        WindowStep::Same(in_force.start)
    } else {
        WindowStep::New(in_force.start)
    };
    Ok(AdmissionWrite {
        step,
        charge,
        budget: budget_write(
            Some(old),
            budget.policy,
            budget.models,
            now,
            worst.map(|w| w.cost),
        ),
        flight: None,
        mode,
        tpm,
    })
}

/// A hard-mode message reserves its worst-case tokens against the token
/// limit (`limit`, as read) instead of being admitted while any is left.
fn reserve_worst_tokens(charge: &mut Charge, limit: Option<u64>, worst: Option<WorstCase>) {
    if let Some(worst) = worst {
        charge.quota = QuotaRule::Reserve {
            limit,
            tokens: worst.tokens,
        };
    }
}

impl AdmissionWrite {
    /// What the write reserves (hard mode), as the request's trace records
    /// it for its settlement (or the reconciler) to give back.
    pub fn reservation(&self) -> Option<Reservation> {
        if self.mode != Some(LimitMode::Hard) {
            return None;
        }
        let reservation = Reservation {
            tokens: self.charge.reserved(),
            cost: self.budget.reserve.unwrap_or(0),
            counters: self
                .budget
                .checks
                .iter()
                .map(|(counter, _)| counter.clone())
                .collect(),
        };
        (reservation.tokens > 0 || !reservation.counters.is_empty()).then_some(reservation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::PresentedKey;

    const RATE: RateLimit = RateLimit {
        requests: 10,
        period: 60,
        tokens_per_minute: None,
    };

    static POLICY: std::sync::LazyLock<BudgetPolicy> =
        std::sync::LazyLock::new(BudgetPolicy::default);
    fn no_budget() -> BudgetCheck<'static> {
        BudgetCheck {
            policy: &POLICY,
            models: &[],
            worst: None,
        }
    }

    /// 1000 s past the epoch is 40 s into the window opened at 960.
    fn at_1000() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1000).unwrap()
    }

    fn key(used: u64, limit: Option<u64>) -> (ApiKeyRecord, SecretHash) {
        let (record, hash) = ApiKeyRecord::sample(at_1000());
        let record = ApiKeyRecord {
            token_limit: limit,
            tokens_used: used,
            rate_window: Some((960, 2)),
            ..record
        };
        (record, hash)
    }

    fn reserve(limit: Option<u64>, tokens: u64) -> Charge {
        Charge {
            requests: 1,
            quota: QuotaRule::Reserve { limit, tokens },
            lease: false,
        }
    }

    #[test]
    fn a_refused_write_is_judged_from_the_stored_key() {
        let now = at_1000();
        let other = PresentedKey::generate().hash();
        type Edit = fn(&mut ApiKeyRecord);
        /// Name, change to a usable key, charge, right secret, decision.
        type Case = (
            &'static str,
            Edit,
            Charge,
            bool,
            Result<WindowStep, AdmissionRefusal>,
        );
        let keep: Edit = |_| {};
        let cases: Vec<Case> = vec![
            (
                "usable key in the same window with room",
                keep,
                Charge::MESSAGE,
                true,
                Ok(WindowStep::Same(960)),
            ),
            (
                "wrong secret",
                keep,
                Charge::MESSAGE,
                false,
                Err(AdmissionRefusal::WrongSecret),
            ),
            (
                "disabled (even if expired too)",
                |k| {
                    k.is_active = false;
                    k.expires_at = Some(at_1000());
                },
                Charge::MESSAGE,
                true,
                Err(AdmissionRefusal::Disabled),
            ),
            (
                "expired at this very moment",
                |k| k.expires_at = Some(at_1000()),
                Charge::MESSAGE,
                true,
                Err(AdmissionRefusal::Expired),
            ),
            (
                "expiring later",
                |k| k.expires_at = Some(at_1000() + time::Duration::seconds(1)),
                Charge::MESSAGE,
                true,
                Ok(WindowStep::Same(960)),
            ),
            (
                "any left: below the limit",
                |k| (k.tokens_used, k.token_limit) = (99, Some(100)),
                Charge::MESSAGE,
                true,
                Ok(WindowStep::Same(960)),
            ),
            (
                "any left: at the limit",
                |k| (k.tokens_used, k.token_limit) = (100, Some(100)),
                Charge::MESSAGE,
                true,
                Err(AdmissionRefusal::QuotaExhausted {
                    used: 100,
                    limit: 100,
                }),
            ),
            (
                "any left: over the limit",
                |k| (k.tokens_used, k.token_limit) = (150, Some(100)),
                Charge::MESSAGE,
                true,
                Err(AdmissionRefusal::QuotaExhausted {
                    used: 150,
                    limit: 100,
                }),
            ),
            (
                "any left: unlimited",
                |k| k.tokens_used = u64::MAX,
                Charge::MESSAGE,
                true,
                Ok(WindowStep::Same(960)),
            ),
            (
                "reserve: fits below",
                |k| (k.tokens_used, k.token_limit) = (500, Some(1000)),
                reserve(Some(1000), 400),
                true,
                Ok(WindowStep::Same(960)),
            ),
            (
                "reserve: fits exactly",
                |k| (k.tokens_used, k.token_limit) = (600, Some(1000)),
                reserve(Some(1000), 400),
                true,
                Ok(WindowStep::Same(960)),
            ),
            (
                "reserve: one token over",
                |k| (k.tokens_used, k.token_limit) = (601, Some(1000)),
                reserve(Some(1000), 400),
                true,
                Err(AdmissionRefusal::WorstCaseExceedsQuota {
                    worst: 400,
                    left: 399,
                    held: 0,
                }),
            ),
            (
                "reserve: already over",
                |k| (k.tokens_used, k.token_limit) = (1200, Some(1000)),
                reserve(Some(1000), 400),
                true,
                Err(AdmissionRefusal::WorstCaseExceedsQuota {
                    worst: 400,
                    left: 0,
                    held: 0,
                }),
            ),
            (
                "reserve: unlimited",
                |k| k.tokens_used = 10_000,
                reserve(None, 400),
                true,
                Ok(WindowStep::Same(960)),
            ),
            (
                "same window, full",
                |k| k.rate_window = Some((960, 10)),
                Charge::MESSAGE,
                true,
                Err(AdmissionRefusal::RateLimited { retry_after: 20 }),
            ),
            (
                "same window, last slot",
                |k| k.rate_window = Some((960, 9)),
                Charge::MESSAGE,
                true,
                Ok(WindowStep::Same(960)),
            ),
            (
                "a window ahead on another clock, with room",
                |k| k.rate_window = Some((1020, 3)),
                Charge::MESSAGE,
                true,
                Ok(WindowStep::Same(1020)),
            ),
            (
                "a window ahead on another clock, full",
                |k| k.rate_window = Some((1020, 10)),
                Charge::MESSAGE,
                true,
                Err(AdmissionRefusal::RateLimited { retry_after: 60 }),
            ),
            (
                "an older window opens a new one",
                |k| k.rate_window = Some((900, 10)),
                Charge::MESSAGE,
                true,
                Ok(WindowStep::New(960)),
            ),
            (
                "no window yet",
                |k| k.rate_window = None,
                Charge::MESSAGE,
                true,
                Ok(WindowStep::New(960)),
            ),
            (
                "a batch larger than what is left of the window",
                |k| k.rate_window = Some((960, 2)),
                Charge {
                    requests: 9,
                    quota: QuotaRule::AnyLeft,
                    lease: false,
                },
                true,
                Err(AdmissionRefusal::RateLimited { retry_after: 20 }),
            ),
            (
                "a batch larger than the tier",
                keep,
                Charge {
                    requests: 11,
                    quota: QuotaRule::AnyLeft,
                    lease: false,
                },
                true,
                Err(AdmissionRefusal::OverTier {
                    requests: 11,
                    limit: 10,
                    period: 60,
                }),
            ),
        ];
        for (name, edit, charge, right_secret, expected) in cases {
            let (mut old, hash) = key(0, None);
            edit(&mut old);
            let hash = if right_secret { hash } else { other.clone() };
            let decided = decide(
                KeyState::Stored(Some(&old)),
                &hash,
                RATE,
                charge,
                no_budget(),
                now,
            )
            .map(|write| write.step);
            assert_eq!(decided, expected, "{name}");
        }
    }

    #[test]
    fn a_message_needs_a_free_lease_a_batch_does_not() {
        let (mut old, hash) = key(0, None);
        old.max_concurrent = Some(2);
        old.in_flight = 2;
        let decided = |charge| {
            decide(
                KeyState::Stored(Some(&old)),
                &hash,
                RATE,
                charge,
                no_budget(),
                at_1000(),
            )
        };
        assert_eq!(
            decided(Charge::MESSAGE),
            Err(AdmissionRefusal::TooManyConcurrent { limit: 2 })
        );
        assert!(decided(reserve(None, 10)).is_ok());
        old.in_flight = 1;
        let decided = decide(
            KeyState::Stored(Some(&old)),
            &hash,
            RATE,
            Charge::MESSAGE,
            no_budget(),
            at_1000(),
        );
        assert!(decided.is_ok());
    }

    #[test]
    fn a_spent_dollar_limit_refuses_requests_for_the_models_it_covers() {
        use crate::domain::budget::{DollarLimit, SpendCounter, Window};
        let (mut old, hash) = key(0, None);
        old.dollar_limits = Some(vec![DollarLimit {
            window: Window::Week,
            limit: 5_000_000,
            models: Some("claude-opus-*".into()),
        }]);
        // 1000 s past the epoch is Thursday 1970-01-01: its week began on
        // Monday 1969-12-29.
        old.spend.insert(
            SpendCounter {
                limit: "week:claude-opus-*".into(),
                period: "w1969-12-29".into(),
            },
            5_000_000,
        );
        let check = |old: &ApiKeyRecord, models: &'static [&'static str]| {
            decide(
                KeyState::Stored(Some(old)),
                &hash,
                RATE,
                Charge::MESSAGE,
                BudgetCheck {
                    policy: &POLICY,
                    models,
                    worst: None,
                },
                at_1000(),
            )
        };
        match check(&old, &["claude-opus-4-5"]) {
            Err(AdmissionRefusal::BudgetSpent(spent)) => {
                assert_eq!(
                    (spent.window, spent.limit, spent.used),
                    (Window::Week, 5_000_000, 5_000_000)
                );
            }
            other => panic!("{other:?}"),
        }
        // Sonnet is not covered: admitted, and the write states the limits
        // it was decided on.
        let write = check(&old, &["claude-sonnet-4-5"]).unwrap();
        assert_eq!(write.budget.guard, old.dollar_limits);
        assert!(write.budget.checks.is_empty());
        // One cent below the limit still admits (soft: room left admits).
        old.spend.values_mut().for_each(|used| *used -= 10_000);
        assert!(check(&old, &["claude-opus-4-5"]).is_ok());
    }

    /// A hard-mode key with a $5 weekly limit, $3.50 of it used (of which
    /// $2 is held by a request in flight), and 10,000 tokens of which
    /// 6,000 are used (2,000 of them held by that request).
    fn hard_key() -> (ApiKeyRecord, SecretHash) {
        use crate::domain::budget::{DollarLimit, SpendCounter, Window};
        let (mut old, hash) = key(6_000, Some(10_000));
        old.limit_mode = LimitMode::Hard;
        old.dollar_limits = Some(vec![DollarLimit {
            window: Window::Week,
            limit: 5_000_000,
            models: None,
        }]);
        let week = SpendCounter {
            limit: "week".into(),
            period: "w1969-12-29".into(),
        };
        old.spend.insert(week.clone(), 3_500_000);
        old.flights.push(Flight {
            request_id: "req_running".into(),
            admitted_at: at_1000(),
            model: None,
            body_bytes: 100,
            max_tokens: 100,
            path: "/v1/messages".into(),
            reservation: Some(Reservation {
                tokens: 2_000,
                cost: 2_000_000,
                counters: vec![week],
            }),
        });
        (old, hash)
    }

    fn hard_check(worst: Option<WorstCase>) -> BudgetCheck<'static> {
        BudgetCheck {
            policy: &POLICY,
            models: &[],
            worst,
        }
    }

    #[test]
    fn a_hard_mode_message_reserves_its_worst_case_where_it_fits() {
        let (old, hash) = hard_key();
        let worst = WorstCase {
            tokens: 4_000,
            cost: 1_500_000,
        };
        let decide_on = |record: &ApiKeyRecord| {
            decide(
                KeyState::Stored(Some(record)),
                &hash,
                RATE,
                Charge::MESSAGE,
                hard_check(Some(worst)),
                at_1000(),
            )
            .unwrap()
        };
        // Exactly what is left of both limits.
        let write = decide_on(&old);
        assert_eq!(write.mode, Some(LimitMode::Hard));
        assert_eq!(
            write.charge.quota,
            QuotaRule::Reserve {
                limit: Some(10_000),
                tokens: 4_000
            }
        );
        assert_eq!(write.budget.reserve, Some(1_500_000));
        let reservation = write.reservation().unwrap();
        assert_eq!((reservation.tokens, reservation.cost), (4_000, 1_500_000));
        assert_eq!(
            reservation.counters,
            vec![crate::domain::budget::SpendCounter {
                limit: "week".into(),
                period: "w1969-12-29".into(),
            }]
        );
        // The same key in soft mode reserves nothing and states soft.
        let soft = ApiKeyRecord {
            limit_mode: LimitMode::Soft,
            ..old.clone()
        };
        let write = decide_on(&soft);
        assert_eq!(
            (write.mode, write.charge.quota, write.budget.reserve),
            (Some(LimitMode::Soft), QuotaRule::AnyLeft, None)
        );
        assert_eq!(write.reservation(), None);
        // A first write from a cached hard record reserves too.
        let write = decide(
            KeyState::Unread {
                believed: Some(&old),
            },
            &hash,
            RATE,
            Charge::MESSAGE,
            hard_check(Some(worst)),
            at_1000(),
        )
        .unwrap();
        assert_eq!(write.reservation().map(|r| r.tokens), Some(4_000));
    }

    #[test]
    fn a_hard_mode_refusal_says_whether_waiting_for_requests_in_flight_helps() {
        let (old, hash) = hard_key();
        let decide_for = |tokens, cost| {
            decide(
                KeyState::Stored(Some(&old)),
                &hash,
                RATE,
                Charge::MESSAGE,
                hard_check(Some(WorstCase { tokens, cost })),
                at_1000(),
            )
        };
        // One token more than is left; it fits once the 2,000 held return.
        assert_eq!(
            decide_for(4_001, 1).unwrap_err(),
            AdmissionRefusal::WorstCaseExceedsQuota {
                worst: 4_001,
                left: 4_000,
                held: 2_000
            }
        );
        // One dollar more than is left; it fits once the $2 held return.
        match decide_for(100, 2_500_000).unwrap_err() {
            AdmissionRefusal::WorstCaseOverBudget(over) => {
                assert_eq!(
                    (over.left(), over.held, over.worst),
                    (1_500_000, 2_000_000, 2_500_000)
                );
                assert!(over.transient());
                assert_eq!(
                    over.to_string(),
                    "worst case $2.50 exceeds the $1.50 left of the $5.00 limit per week \
                     while $2.00 is reserved by this key's requests in flight; retry once they end"
                );
            }
            other => panic!("{other:?}"),
        }
        // More than the settled spend leaves: only the week's reset helps.
        match decide_for(100, 3_500_001).unwrap_err() {
            AdmissionRefusal::WorstCaseOverBudget(over) => {
                assert!(!over.transient());
                assert_eq!(
                    over.to_string(),
                    "worst case $3.500001 exceeds the $1.50 left of the $5.00 limit per week; \
                     lower max_tokens or shorten the prompt, or wait until \
                     1970-01-05T00:00:00.000Z (week calendar, UTC)"
                );
            }
            other => panic!("{other:?}"),
        }
        // A key turned hard whose worst case was not computed: retry.
        assert_eq!(
            decide(
                KeyState::Stored(Some(&old)),
                &hash,
                RATE,
                Charge::MESSAGE,
                hard_check(None),
                at_1000(),
            )
            .unwrap_err(),
            AdmissionRefusal::LimitModeChanged
        );
    }

    #[test]
    fn an_absent_key_is_unknown_and_an_over_tier_charge_is_refused_unread() {
        let (_, hash) = key(0, None);
        assert_eq!(
            decide(
                KeyState::Stored(None),
                &hash,
                RATE,
                Charge::MESSAGE,
                no_budget(),
                at_1000()
            ),
            Err(AdmissionRefusal::UnknownKey)
        );
        let big = Charge {
            requests: 11,
            quota: QuotaRule::AnyLeft,
            lease: false,
        };
        assert_eq!(
            decide(
                KeyState::Unread { believed: None },
                &hash,
                RATE,
                big,
                no_budget(),
                at_1000()
            ),
            Err(AdmissionRefusal::OverTier {
                requests: 11,
                limit: 10,
                period: 60
            })
        );
    }

    #[test]
    fn the_first_write_guesses_the_window_a_cached_record_last_showed() {
        let (cached, hash) = key(0, None);
        let first = |last_window: Option<u64>| {
            let believed = last_window.map(|start| ApiKeyRecord {
                rate_window: Some((start, 1)),
                ..cached.clone()
            });
            decide(
                KeyState::Unread {
                    believed: believed.as_ref(),
                },
                &hash,
                RATE,
                Charge::MESSAGE,
                no_budget(),
                at_1000(),
            )
            .map(|write| write.step)
        };
        assert_eq!(first(Some(960)), Ok(WindowStep::Same(960)));
        assert_eq!(first(Some(900)), Ok(WindowStep::New(960)));
        assert_eq!(first(None), Ok(WindowStep::New(960)));
    }

    #[test]
    fn a_reservation_follows_a_changed_limit() {
        let (mut old, hash) = key(700, Some(1000));
        let charge = reserve(Some(1000), 400);
        assert_eq!(
            decide(
                KeyState::Stored(Some(&old)),
                &hash,
                RATE,
                charge,
                no_budget(),
                at_1000()
            ),
            Err(AdmissionRefusal::WorstCaseExceedsQuota {
                worst: 400,
                left: 300,
                held: 0,
            })
        );
        // The admin raised the limit meanwhile: the next write states it.
        old.token_limit = Some(5000);
        let write = decide(
            KeyState::Stored(Some(&old)),
            &hash,
            RATE,
            charge,
            no_budget(),
            at_1000(),
        )
        .unwrap();
        assert_eq!(write.step, WindowStep::Same(960));
        assert_eq!(write.charge, reserve(Some(5000), 400));
        assert_eq!(write.charge.reserved(), 400);
        // ...or removed it: nothing is reserved any more.
        old.token_limit = None;
        let write = decide(
            KeyState::Stored(Some(&old)),
            &hash,
            RATE,
            charge,
            no_budget(),
            at_1000(),
        )
        .unwrap();
        assert_eq!(write.charge, reserve(None, 400));
        assert_eq!(write.charge.reserved(), 0);
    }

    #[test]
    fn a_key_at_its_tokens_per_minute_is_refused_until_the_next_minute() {
        let tpm = RateLimit {
            tokens_per_minute: Some(100),
            ..RATE
        };
        let (mut old, hash) = key(0, None);
        let judge = |old: &ApiKeyRecord, rate: RateLimit, epoch: i64| {
            decide(
                KeyState::Stored(Some(old)),
                &hash,
                rate,
                Charge::MESSAGE,
                no_budget(),
                OffsetDateTime::from_unix_timestamp(epoch).unwrap(),
            )
        };
        // One token under the limit in the minute opened at 960: admitted,
        // and the write states that minute's counter.
        old.tokens_per_minute.insert(960, 99);
        assert_eq!(
            judge(&old, tpm, 1000).map(|write| write.tpm),
            Ok(Some(MinuteCheck {
                minute: 960,
                limit: 100
            }))
        );
        // At the limit: refused until the minute ends, 20 s after 1000 s,
        // 60 s at its first second, 1 s at its last.
        old.tokens_per_minute.insert(960, 100);
        for (epoch, retry_after) in [(1000, 20), (960, 60), (1019, 1)] {
            assert_eq!(
                judge(&old, tpm, epoch),
                Err(AdmissionRefusal::TokensPerMinute {
                    used: 100,
                    limit: 100,
                    retry_after
                }),
                "at {epoch}"
            );
        }
        // The next minute starts with nothing used.
        assert_eq!(
            judge(&old, tpm, 1020).map(|write| write.tpm),
            Ok(Some(MinuteCheck {
                minute: 1020,
                limit: 100
            }))
        );
        // A tier without a tokens-per-minute limit never refuses on it.
        old.tokens_per_minute.insert(960, u64::MAX);
        assert_eq!(judge(&old, RATE, 1000).map(|write| write.tpm), Ok(None));
        // The first write, unread, checks the current minute's counter.
        let first = decide(
            KeyState::Unread { believed: None },
            &hash,
            tpm,
            Charge::MESSAGE,
            no_budget(),
            at_1000(),
        );
        assert_eq!(
            first.map(|write| write.tpm),
            Ok(Some(MinuteCheck {
                minute: 960,
                limit: 100
            }))
        );
    }

    #[test]
    fn messages_reserve_nothing() {
        assert_eq!(Charge::MESSAGE.reserved(), 0);
        assert_eq!(reserve(None, 400).reserved(), 0);
        assert_eq!(reserve(Some(1), 400).reserved(), 400);
    }

    #[test]
    fn the_window_in_force_is_the_stored_one_while_current_or_ahead() {
        // At 1000 s, 60-second windows: the current one opened at 960.
        let now = at_1000();
        let current = window_in_force(Some((960, 4)), now, 60);
        assert_eq!(
            current,
            WindowInForce {
                start: 960,
                used: 4,
                stored: true,
                retry_after: 20
            }
        );
        // Another instance's clock is ahead: its window is still whole.
        let ahead = window_in_force(Some((1020, 7)), now, 60);
        assert_eq!((ahead.start, ahead.used, ahead.retry_after), (1020, 7, 60));
        // A past window, or none: the current one, empty, not stored yet.
        for stored in [Some((900, 9)), None] {
            let fresh = window_in_force(stored, now, 60);
            assert_eq!((fresh.start, fresh.used, fresh.stored), (960, 0, false));
        }
    }
}
