//! A request in flight: the trace its admission write leaves on the key
//! item (`flight|<request id>`), removed by its settlement. A request whose
//! settlement never arrives (the process was killed, Lambda timed out) is
//! found by the reconciler once it is overdue and charged an estimate,
//! exactly once: the usage log row of its request id is the condition of
//! both the real settlement and the reconciler's.

use std::time::Duration;

use time::OffsetDateTime;

use super::budget::SpendCounter;
use super::epoch_seconds;
use super::price::MicroUsd;
use super::usage::TokenUsage;

/// How long after its admission a request is sure to have ended: Lambda
/// stops an invocation after 15 minutes at most.
pub const OVERDUE_AFTER: Duration = Duration::from_secs(15 * 60);

/// The trace of one admitted message request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flight {
    pub request_id: String,
    /// When it was admitted: the periods it counts in, and (to the
    /// millisecond, as the usage log keys it) the moment its usage row is
    /// recorded under, by its settlement or the reconciler alike.
    pub admitted_at: OffsetDateTime,
    /// The model it asked for.
    pub model: Option<String>,
    /// The size of its body, for the estimate of its prompt.
    pub body_bytes: u64,
    /// Its `max_tokens` (0 when it named none).
    pub max_tokens: u64,
    /// The path it was sent to (for the usage row).
    pub path: String,
    /// What a hard-mode admission reserved for its worst case (stated by
    /// the admission write itself), given back by its settlement.
    pub reservation: Option<Reservation>,
}

/// A hard-mode request's worst case, held on the key's limits while it
/// runs: added to `tokens_used` (and `tokens_reserved`) and to each spend
/// counter named, and replaced by the real figures when it is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub tokens: u64,
    pub cost: MicroUsd,
    pub counters: Vec<SpendCounter>,
}

impl Flight {
    /// Whether a settlement can no longer be on its way at `now`: admitted
    /// longer than `after` ago.
    pub fn overdue(&self, now: OffsetDateTime, after: Duration) -> bool {
        epoch_seconds(now).saturating_sub(epoch_seconds(self.admitted_at)) >= after.as_secs()
    }

    /// What it is charged when its answer's usage was never read: its body
    /// as prompt at four bytes a token (what the tokenizers average on
    /// Claude Code's traffic) and all of its `max_tokens` (what it may have
    /// written), recorded as estimated.
    ///
    /// A hard-mode request is never charged more than it reserved (its
    /// reservation is what its limits were checked against): the estimate
    /// is cut to the reserved tokens, output first, each priced at most at
    /// the class its reservation was priced at.
    pub fn estimated_usage(&self) -> TokenUsage {
        let mut input = (self.body_bytes / 4).max(1);
        let mut output = self.max_tokens;
        if let Some(reservation) = &self.reservation {
            output = output.min(reservation.tokens);
            input = input.min(reservation.tokens - output);
        }
        TokenUsage {
            input_tokens: input,
            output_tokens: output,
            ..TokenUsage::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flight() -> Flight {
        Flight {
            request_id: "req_1".into(),
            admitted_at: OffsetDateTime::from_unix_timestamp(1_000_000).unwrap(),
            model: Some("claude-sonnet-4-5".into()),
            body_bytes: 4_003,
            max_tokens: 512,
            path: "/v1/messages".into(),
            reservation: None,
        }
    }

    #[test]
    fn a_flight_is_overdue_once_no_answer_can_still_be_running() {
        let at = |secs: i64| OffsetDateTime::from_unix_timestamp(secs).unwrap();
        assert!(!flight().overdue(at(1_000_000 + 899), OVERDUE_AFTER));
        assert!(flight().overdue(at(1_000_000 + 900), OVERDUE_AFTER));
        // A clock behind the admitting one never makes it overdue early.
        assert!(!flight().overdue(at(999_000), OVERDUE_AFTER));
    }

    #[test]
    fn a_lost_request_is_charged_its_prompt_estimate_and_all_of_max_tokens() {
        let usage = flight().estimated_usage();
        assert_eq!((usage.input_tokens, usage.output_tokens), (1_000, 512));
        let empty = Flight {
            body_bytes: 0,
            max_tokens: 0,
            ..flight()
        };
        assert_eq!(empty.estimated_usage().input_tokens, 1);
    }

    #[test]
    fn a_lost_hard_mode_request_is_never_charged_more_than_it_reserved() {
        let reserved = |tokens| Flight {
            reservation: Some(Reservation {
                tokens,
                cost: 1,
                counters: Vec::new(),
            }),
            ..flight()
        };
        // Room for the whole estimate: charged as any other.
        let usage = reserved(5_000).estimated_usage();
        assert_eq!((usage.input_tokens, usage.output_tokens), (1_000, 512));
        // The body estimate (1,000) is more than the 700 reserved beside
        // max_tokens: cut to fit.
        let usage = reserved(1_212).estimated_usage();
        assert_eq!((usage.input_tokens, usage.output_tokens), (700, 512));
        let usage = reserved(300).estimated_usage();
        assert_eq!((usage.input_tokens, usage.output_tokens), (0, 300));
    }
}
