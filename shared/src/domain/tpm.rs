//! Tokens per minute, the tier's optional limit on what one key's messages
//! may use in a minute: fixed one-minute windows counted on the key item,
//! whether a key has room left in the current one, and what a settlement
//! adds to and drops from those counters.
//!
//! A request's tokens are known only when it is settled, so the counter of
//! the minute a request was *admitted* in receives its billed tokens
//! (`TokenUsage::billed`) at settlement, and admission only asks whether
//! that minute's counter is still below the limit (soft: room left admits,
//! as with the token quota). The overshoot of a minute is therefore bounded
//! by what the requests admitted in it while it had room use: those in
//! flight when the counter crossed the limit, and the one that crossed it.
//! A long answer counts wholly in the minute it was admitted in.
//!
//! Message batches are exempt: they run asynchronously upstream, outside
//! any minute of the key's, and their tokens are not counted here.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::epoch_seconds;
use super::key::ApiKeyRecord;
use super::tier::window_of;

/// The window's length: a minute.
pub const MINUTE: u64 = 60;

/// The minute a moment falls in: its start (epoch seconds) and the seconds
/// until the next one begins (1 to 60).
pub fn minute_of(now: OffsetDateTime) -> (u64, u64) {
    window_of(epoch_seconds(now), MINUTE)
}

/// The tokens-per-minute check an admission write states: the counter of
/// `minute` must be below `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteCheck {
    /// The minute's start (epoch seconds).
    pub minute: u64,
    pub limit: u64,
}

/// A minute whose tokens reached the tier's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteSpent {
    pub used: u64,
    pub limit: u64,
    /// Seconds until the minute ends (1 to 60).
    pub retry_after: u64,
}

/// Where a key stands in the current minute under a tier's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteStanding {
    /// The minute's start (epoch seconds).
    pub minute: u64,
    pub used: u64,
    pub limit: u64,
    /// Seconds until the minute ends (1 to 60).
    pub resets_in: u64,
}

impl MinuteStanding {
    /// The standing of `record` at `now` under `limit` (`None`: the tier
    /// sets no tokens-per-minute limit).
    pub fn of(record: &ApiKeyRecord, limit: Option<u64>, now: OffsetDateTime) -> Option<Self> {
        let limit = limit?;
        let (minute, resets_in) = minute_of(now);
        Some(MinuteStanding {
            minute,
            used: record.tokens_per_minute.get(&minute).copied().unwrap_or(0),
            limit,
            resets_in,
        })
    }

    /// Whether a request that may bill `tokens` could use up what is left
    /// of the minute (then it is settled before its answer ends, as
    /// `budget::may_exhaust` says for the other limits).
    pub fn may_exhaust(&self, tokens: u64) -> bool {
        tokens >= self.remaining()
    }

    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }

    /// The end of the minute (epoch seconds).
    pub fn resets_at(&self) -> u64 {
        self.minute + MINUTE
    }

    /// The check of the admission write, or the refusal when the minute's
    /// counter has reached the limit (the store's condition states the
    /// same: `attribute_not_exists(counter) OR counter < limit`).
    pub fn check(&self) -> Result<MinuteCheck, MinuteSpent> {
        if self.used >= self.limit {
            return Err(MinuteSpent {
                used: self.used,
                limit: self.limit,
                retry_after: self.resets_in,
            });
        }
        Ok(MinuteCheck {
            minute: self.minute,
            limit: self.limit,
        })
    }
}

/// What a settlement does to the key's minute counters for one admitted
/// message: adds its billed tokens to the counter of the minute it was
/// admitted in (when its tier limits tokens per minute), and drops the
/// counters of earlier minutes the admitted record showed, so a key item
/// holds at most a minute or two of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MinuteCharge {
    /// The admitted minute's start (epoch seconds); `None`: not counted.
    pub add_to: Option<u64>,
    pub drop: Vec<u64>,
}

impl MinuteCharge {
    /// For a message admitted at `now` against `admitted` (the key as the
    /// admission write left it), under a tier limit `limit`.
    pub fn of(admitted: &ApiKeyRecord, limit: Option<u64>, now: OffsetDateTime) -> MinuteCharge {
        let (minute, _) = minute_of(now);
        MinuteCharge {
            add_to: limit.map(|_| minute),
            drop: stale_minutes(&admitted.tokens_per_minute, minute),
        }
    }
}

/// The counters of minutes before `minute`.
fn stale_minutes(counters: &BTreeMap<u64, u64>, minute: u64) -> Vec<u64> {
    counters.range(..minute).map(|(start, _)| *start).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(epoch).unwrap()
    }

    #[test]
    fn a_minute_ends_within_one_to_sixty_seconds() {
        assert_eq!(minute_of(at(960)), (960, 60));
        assert_eq!(minute_of(at(1000)), (960, 20));
        assert_eq!(minute_of(at(1019)), (960, 1));
    }

    #[test]
    fn a_request_may_use_up_the_minute_when_its_worst_case_reaches_what_is_left() {
        let (mut record, _) = ApiKeyRecord::sample(at(1000));
        record.tokens_per_minute = BTreeMap::from([(960, 700)]);
        let minute = MinuteStanding::of(&record, Some(1000), at(1000)).unwrap();
        assert!(minute.may_exhaust(300));
        assert!(!minute.may_exhaust(299));
        assert!(MinuteStanding::of(&record, None, at(1000)).is_none());
    }

    #[test]
    fn a_settlement_counts_in_the_admitted_minute_and_drops_earlier_ones() {
        let (mut record, _) = ApiKeyRecord::sample(at(1000));
        record.tokens_per_minute = BTreeMap::from([(840, 5), (900, 7), (960, 9), (1020, 1)]);
        let charge = MinuteCharge::of(&record, Some(100), at(1000));
        assert_eq!(
            charge,
            MinuteCharge {
                add_to: Some(960),
                drop: vec![840, 900],
            }
        );
        // No limit: nothing counted, old counters still dropped.
        let charge = MinuteCharge::of(&record, None, at(1000));
        assert_eq!(charge.add_to, None);
        assert_eq!(charge.drop, vec![840, 900]);
    }
}
