//! What is recorded of relayed requests: one request's usage record, the
//! counters a settlement adds to a key, a day and a model, the totals read
//! back, and what a message batch's results add up to.

use std::collections::BTreeMap;

use serde::Serialize;
use time::OffsetDateTime;

use super::{Attribution, ClassTotals, TokenUsage};
use crate::domain::budget::BudgetCharge;
use crate::domain::key::KeyId;
use crate::domain::price::{Attribute, Cost, MicroUsd, PriceTable};

/// Everything recorded about one relayed request.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub request_id: String,
    pub key_id: KeyId,
    pub at: OffsetDateTime,
    /// The model served and billed (the answer's own name).
    pub model: Option<String>,
    /// The alias the client asked for, when it named one (`model` is what
    /// it resolved to).
    pub requested_model: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub stream: bool,
    pub usage: TokenUsage,
    pub estimated: bool,
    pub latency_ms: u64,
    pub ttfb_ms: Option<u64>,
    pub retries: u32,
    pub client_ip: String,
    pub user_agent: Option<String>,
    pub session_id: Option<String>,
    /// The agent and request class the client named (`attribution`).
    pub attribution: Attribution,
    /// `error.type` when the answer was an error (HTTP or in-stream).
    pub error_type: Option<String>,
    /// The upstream that answered (`None`: none did).
    pub upstream: Option<String>,
    /// What the usage cost (estimated when the usage was), and whether the
    /// model had no price of its own.
    pub cost: Cost,
    /// The dollar limits' counters the cost is added to.
    pub budget: BudgetCharge,
}

/// What one settlement adds to the key's, a day's or a model's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub requests: u64,
    pub usage: TokenUsage,
    pub cost_micro_usd: MicroUsd,
    /// What caching saved against the same traffic uncached (negative:
    /// it cost more).
    pub cache_saved_micro_usd: i64,
    pub estimated_requests: u64,
    pub error_requests: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, other: Counters) {
        self.requests += other.requests;
        self.usage += other.usage;
        self.cost_micro_usd += other.cost_micro_usd;
        self.cache_saved_micro_usd += other.cache_saved_micro_usd;
        self.estimated_requests += other.estimated_requests;
        self.error_requests += other.error_requests;
    }
}

impl Counters {
    /// One request's share: an error request is one answered with an error
    /// status or an error event; an estimated one is one whose usage was
    /// estimated rather than read off the answer.
    pub fn of(record: &UsageRecord) -> Counters {
        Counters {
            requests: 1,
            usage: record.usage,
            cost_micro_usd: record.cost.micro_usd,
            cache_saved_micro_usd: record.cost.saved_micro_usd,
            estimated_requests: u64::from(record.estimated),
            error_requests: u64::from(record.error_type.is_some() || record.status >= 400),
        }
    }
}

/// Counters settlement adds to the key, day and model items alike, as read
/// back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UsageTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// Cache writes by TTL, as the answers split them (writes an answer
    /// did not split are in `cache_creation_input_tokens` only).
    pub cache_creation_5m_input_tokens: u64,
    pub cache_creation_1h_input_tokens: u64,
    pub cost_micro_usd: MicroUsd,
    /// What caching saved against the same traffic uncached; negative
    /// when it cost more.
    pub cache_saved_micro_usd: i64,
    pub estimated_requests: u64,
    pub error_requests: u64,
}

impl UsageTotals {
    /// The token counts as a usage.
    pub fn usage(&self) -> TokenUsage {
        TokenUsage {
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_creation_input_tokens: self.cache_creation_input_tokens,
            cache_read_input_tokens: self.cache_read_input_tokens,
            cache_creation_5m: self.cache_creation_5m_input_tokens,
            cache_creation_1h: self.cache_creation_1h_input_tokens,
        }
    }

    /// Share of prompt tokens read from the cache: `cache_read / (input +
    /// cache_creation + cache_read)`; `None` when no prompt token was sent.
    pub fn cache_hit_ratio(&self) -> Option<f64> {
        let prompt =
            self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens;
        (prompt > 0).then(|| self.cache_read_input_tokens as f64 / prompt as f64)
    }

    /// Every billed token ([`TokenUsage::billed`]): what quotas count.
    pub fn tokens(&self) -> u64 {
        self.usage().billed()
    }

    pub fn add(&mut self, other: &UsageTotals) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.cache_creation_5m_input_tokens += other.cache_creation_5m_input_tokens;
        self.cache_creation_1h_input_tokens += other.cache_creation_1h_input_tokens;
        self.cost_micro_usd += other.cost_micro_usd;
        self.cache_saved_micro_usd += other.cache_saved_micro_usd;
        self.estimated_requests += other.estimated_requests;
        self.error_requests += other.error_requests;
    }
}

/// The model name requests that named none count under, in the model
/// aggregates and the days' per-model counters.
pub const UNKNOWN_MODEL: &str = "unknown";

/// What a batch's results add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchTally {
    /// Usage and succeeded requests per model.
    pub by_model: BTreeMap<String, (TokenUsage, u64)>,
    pub succeeded: u64,
    pub errored: u64,
    pub canceled: u64,
    pub expired: u64,
    /// Not read from results: the batch's reservation, charged because its
    /// results could no longer be read.
    pub estimated: bool,
}

/// A batch's tally with each model's cost at batch prices: what settlement
/// records (it takes nothing less, so no batch is settled unpriced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedBatch {
    pub tally: BatchTally,
    cost_by_model: BTreeMap<String, Cost>,
}

impl BatchTally {
    /// A batch whose results can no longer be read: charged its
    /// reservation, as input tokens of an unknown model, estimated.
    pub fn abandoned(reserved_tokens: u64) -> BatchTally {
        let reserved = TokenUsage {
            input_tokens: reserved_tokens,
            ..TokenUsage::default()
        };
        BatchTally {
            by_model: BTreeMap::from([(UNKNOWN_MODEL.to_owned(), (reserved, 0))]),
            estimated: true,
            ..BatchTally::default()
        }
    }

    /// Each model's usage priced as batch requests at `at`, with the
    /// batch's own price `attributes` (US inference) on top.
    pub fn priced(
        self,
        table: &PriceTable,
        attributes: &[Attribute],
        at: OffsetDateTime,
    ) -> PricedBatch {
        let mut attributes = attributes.to_vec();
        if !attributes.contains(&Attribute::Batch) {
            attributes.push(Attribute::Batch);
        }
        let cost_by_model = self
            .by_model
            .iter()
            .map(|(model, (usage, _))| {
                let cost = table.cost(Some(model), usage, &attributes, at);
                (model.clone(), cost)
            })
            .collect();
        PricedBatch {
            tally: self,
            cost_by_model,
        }
    }

    pub fn total(&self) -> TokenUsage {
        let mut total = TokenUsage::default();
        for (usage, _) in self.by_model.values() {
            total += *usage;
        }
        total
    }
}

impl PricedBatch {
    /// The batch's share of the key's and the day's counters: the requests
    /// answered (succeeded or errored), or, estimated, all
    /// `request_count` the batch was created with.
    pub fn counters(&self, request_count: u64) -> Counters {
        let tally = &self.tally;
        let requests = if tally.estimated {
            request_count
        } else {
            tally.succeeded + tally.errored
        };
        Counters {
            requests,
            usage: tally.total(),
            cost_micro_usd: self.cost_by_model.values().map(|c| c.micro_usd).sum(),
            cache_saved_micro_usd: self.cost_by_model.values().map(|c| c.saved_micro_usd).sum(),
            estimated_requests: if tally.estimated { requests } else { 0 },
            error_requests: tally.errored,
        }
    }

    /// Each model's share of its aggregate: its succeeded requests and usage.
    pub fn model_counters(&self) -> impl Iterator<Item = (&str, Counters)> {
        self.tally
            .by_model
            .iter()
            .map(|(model, (usage, succeeded))| {
                let cost = self.cost_by_model.get(model).copied().unwrap_or_default();
                (
                    model.as_str(),
                    Counters {
                        requests: *succeeded,
                        usage: *usage,
                        cost_micro_usd: cost.micro_usd,
                        cache_saved_micro_usd: cost.saved_micro_usd,
                        estimated_requests: 0,
                        error_requests: 0,
                    },
                )
            })
    }

    /// Each model's share of the batch's day counters (`counters`): its
    /// `model_counters`, and the answered requests no model is known for
    /// (errored, or all of an estimated batch) under [`UNKNOWN_MODEL`], so
    /// the shares add up to `counters(request_count)`.
    pub fn day_model_shares(&self, request_count: u64) -> Vec<(&str, ClassTotals)> {
        let mut shares: Vec<(&str, ClassTotals)> = self
            .model_counters()
            .map(|(model, counters)| (model, ClassTotals::of(&counters)))
            .collect();
        let counted: u64 = shares.iter().map(|(_, share)| share.requests).sum();
        let unmodelled = self
            .counters(request_count)
            .requests
            .saturating_sub(counted);
        if unmodelled > 0 {
            match shares.iter_mut().find(|(model, _)| *model == UNKNOWN_MODEL) {
                Some((_, share)) => share.requests += unmodelled,
                None => shares.push((
                    UNKNOWN_MODEL,
                    ClassTotals {
                        requests: unmodelled,
                        ..ClassTotals::default()
                    },
                )),
            }
        }
        shares
    }

    /// Whether a model had no price of its own (charged the fallback).
    pub fn unpriced(&self) -> bool {
        self.cost_by_model.values().any(|c| c.unpriced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: u16, error_type: Option<&str>, estimated: bool) -> UsageRecord {
        UsageRecord {
            request_id: "r".into(),
            key_id: KeyId::parse("abcdefABCDEF").unwrap(),
            at: crate::domain::now(),
            model: None,
            requested_model: None,
            method: "POST".into(),
            path: "/v1/messages".into(),
            status,
            stream: false,
            usage: TokenUsage::default(),
            estimated,
            latency_ms: 0,
            ttfb_ms: None,
            retries: 0,
            client_ip: "127.0.0.1".into(),
            user_agent: None,
            session_id: None,
            attribution: Default::default(),
            error_type: error_type.map(str::to_owned),
            upstream: None,
            cost: Cost::default(),
            budget: BudgetCharge::default(),
        }
    }

    #[test]
    fn error_status_or_error_event_counts_as_an_error_request() {
        let cases = [
            (200, None, false, 0, 0),
            (200, Some("overloaded_error"), false, 1, 0),
            (400, None, false, 1, 0),
            (529, None, true, 1, 1),
            (200, None, true, 0, 1),
        ];
        for (status, error_type, estimated, errors, estimates) in cases {
            let counters = Counters::of(&record(status, error_type, estimated));
            assert_eq!(counters.requests, 1);
            assert_eq!(
                (counters.error_requests, counters.estimated_requests),
                (errors, estimates),
                "{status} {error_type:?} {estimated}"
            );
        }
    }

    #[test]
    fn totals_count_the_billed_tokens() {
        let totals = UsageTotals {
            input_tokens: 1,
            output_tokens: 2,
            cache_creation_input_tokens: 4,
            cache_read_input_tokens: 8,
            ..UsageTotals::default()
        };
        assert_eq!(totals.tokens(), 15);
        assert_eq!(totals.tokens(), totals.usage().billed());
    }

    #[test]
    fn a_batch_counts_answered_requests_or_all_when_estimated() {
        use crate::domain::now;
        use crate::domain::price::default_table;
        let mut tally = BatchTally {
            succeeded: 3,
            errored: 1,
            canceled: 2,
            ..BatchTally::default()
        };
        let counters = tally
            .clone()
            .priced(&default_table(), &[], now())
            .counters(6);
        assert_eq!(
            (
                counters.requests,
                counters.error_requests,
                counters.estimated_requests
            ),
            (4, 1, 0)
        );
        tally = BatchTally::abandoned(500);
        let counters = tally.priced(&default_table(), &[], now()).counters(6);
        assert_eq!((counters.requests, counters.estimated_requests), (6, 6));
        assert_eq!(counters.usage.billed(), 500);
    }

    #[test]
    fn a_batch_day_shares_by_model_add_up_to_its_day_counters() {
        use crate::domain::price::default_table;
        let usage = |input| TokenUsage {
            input_tokens: input,
            ..TokenUsage::default()
        };
        // 3 + 1 succeeded under two models, 2 errored under none.
        let tally = BatchTally {
            by_model: BTreeMap::from([
                ("claude-opus-4-5".to_owned(), (usage(100), 3)),
                ("claude-haiku-4-5".to_owned(), (usage(10), 1)),
            ]),
            succeeded: 4,
            errored: 2,
            ..BatchTally::default()
        };
        let priced = tally.priced(&default_table(), &[], crate::domain::now());
        let shares: Vec<(&str, u64, u64)> = priced
            .day_model_shares(6)
            .into_iter()
            .map(|(model, share)| (model, share.requests, share.input_tokens))
            .collect();
        assert_eq!(
            shares,
            [
                ("claude-haiku-4-5", 1, 10),
                ("claude-opus-4-5", 3, 100),
                (UNKNOWN_MODEL, 2, 0)
            ]
        );
        assert_eq!(priced.counters(6).requests, 6);
        // An abandoned batch: all its requests under its unknown model.
        let abandoned =
            BatchTally::abandoned(500).priced(&default_table(), &[], crate::domain::now());
        let shares: Vec<(&str, u64, u64)> = abandoned
            .day_model_shares(6)
            .into_iter()
            .map(|(model, share)| (model, share.requests, share.input_tokens))
            .collect();
        assert_eq!(shares, [(UNKNOWN_MODEL, 6, 500)]);
    }

    #[test]
    fn a_batch_is_priced_per_model_at_batch_prices() {
        use crate::domain::price::default_table;
        let million = |input, output| TokenUsage {
            input_tokens: input,
            output_tokens: output,
            ..TokenUsage::default()
        };
        let tally = BatchTally {
            by_model: BTreeMap::from([
                (
                    "claude-opus-4-5".to_owned(),
                    (million(1_000_000, 1_000_000), 3),
                ),
                ("claude-haiku-4-5".to_owned(), (million(2_000_000, 0), 1)),
            ]),
            succeeded: 4,
            ..BatchTally::default()
        };
        let tally = tally.priced(&default_table(), &[], crate::domain::now());
        // Half of Opus 4.5's $5 + $25, and of Haiku 4.5's 2 × $1.
        let costs: Vec<(&str, u64)> = tally
            .model_counters()
            .map(|(model, counters)| (model, counters.cost_micro_usd))
            .collect();
        assert_eq!(
            costs,
            [
                ("claude-haiku-4-5", 1_000_000),
                ("claude-opus-4-5", 15_000_000)
            ]
        );
        assert_eq!(tally.counters(4).cost_micro_usd, 16_000_000);
        // A batch whose results are lost is charged its reservation as
        // input of no known model: the fallback, at batch prices, flagged.
        let lost =
            BatchTally::abandoned(1_000_000).priced(&default_table(), &[], crate::domain::now());
        assert_eq!(lost.counters(1).cost_micro_usd, 7_500_000);
        assert!(lost.unpriced());
    }

    #[test]
    fn a_request_counts_its_cost() {
        let mut priced = record(200, None, false);
        priced.cost = Cost {
            micro_usd: 1234,
            unpriced: false,
            saved_micro_usd: -56,
        };
        let counters = Counters::of(&priced);
        assert_eq!(
            (counters.cost_micro_usd, counters.cache_saved_micro_usd),
            (1234, -56)
        );
    }

    #[test]
    fn the_hit_ratio_is_cache_reads_over_every_prompt_token() {
        let totals = UsageTotals {
            input_tokens: 100,
            cache_creation_input_tokens: 300,
            cache_read_input_tokens: 600,
            output_tokens: 5000,
            ..UsageTotals::default()
        };
        // 600 / (100 + 300 + 600); output tokens are no prompt.
        assert_eq!(totals.cache_hit_ratio(), Some(0.6));
        let output_only = UsageTotals {
            output_tokens: 10,
            ..UsageTotals::default()
        };
        assert_eq!(output_only.cache_hit_ratio(), None);
    }

    #[test]
    fn a_batch_records_each_models_savings_at_batch_prices() {
        use crate::domain::price::default_table;
        let cached = TokenUsage {
            input_tokens: 1000,
            cache_read_input_tokens: 100_000,
            cache_creation_input_tokens: 10_000,
            cache_creation_5m: 10_000,
            ..TokenUsage::default()
        };
        let tally = BatchTally {
            by_model: BTreeMap::from([("claude-sonnet-4-5".to_owned(), (cached, 1))]),
            succeeded: 1,
            ..BatchTally::default()
        };
        let priced = tally.priced(&default_table(), &[], crate::domain::now());
        // Sonnet 4.5 at batch prices ($1.50 in; reads and writes unhalved):
        // real 1000 × 1.50 + 100,000 × 0.30 + 10,000 × 3.75
        //    = 1500 + 30,000 + 37,500 = 69,000 µ$;
        // uncached 111,000 × 1.50 = 166,500 µ$; saved 97,500.
        let counters = priced.counters(1);
        assert_eq!(
            (counters.cost_micro_usd, counters.cache_saved_micro_usd),
            (69_000, 97_500)
        );
        let (_, model) = priced.model_counters().next().unwrap();
        assert_eq!(model.cache_saved_micro_usd, 97_500);
    }
}
