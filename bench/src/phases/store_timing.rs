//! The relay's two hot-path DynamoDB writes (admission's UpdateItem and
//! settlement's TransactWriteItems), timed from the bench with the relay's
//! own store code against the same table.

use std::time::{Duration, Instant};

use anyhow::Context;
use relay_shared::domain::key::{KeyId, PresentedKey};
use relay_shared::domain::usage::TokenUsage;
use relay_shared::domain::usage::UsageRecord;
use time::OffsetDateTime;

use super::Bench;
use crate::client::ms;
use crate::report::Figures;
use crate::stats::percentile;
use crate::{TIER_PERIOD, TIER_REQUESTS};
use relay_shared::domain::admission::{BudgetCheck, Charge, RateLimit, WorstCase};
use relay_shared::domain::budget::BudgetPolicy;
use relay_shared::domain::flight::Flight;
use relay_shared::store::admission::Terms;

pub async fn run(bench: &Bench<'_>, f: &mut Figures) -> anyhow::Result<()> {
    let store = &bench.stack.store;
    let calls = bench.options.store_calls;
    let key = PresentedKey::parse(&bench.stack.relay_key).context("the bench key")?;
    let hash = key.hash();
    let mut last: Option<relay_shared::domain::key::ApiKeyRecord> = None;
    let policy = BudgetPolicy::default();
    let mut admits = Vec::with_capacity(calls);
    let mut settles = Vec::with_capacity(calls);
    for i in 0..calls {
        let now = relay_shared::domain::now();
        let started = Instant::now();
        let usage = usage_record(key.id(), now, i);
        let terms = Terms {
            charge: Charge::MESSAGE,
            rate: RateLimit {
                requests: TIER_REQUESTS,
                period: TIER_PERIOD,
                tokens_per_minute: None,
            },
            budget: BudgetCheck {
                policy: &policy,
                models: &[],
                // Reserved on a hard-mode key (`--limit-mode hard`),
                // ignored on a soft one: about what the bench body costs.
                worst: Some(WorstCase {
                    tokens: 2_000,
                    cost: 20_000,
                }),
            },
            now,
        };
        // Its trace, as the proxy leaves it; the settlement removes it.
        let flight = Flight {
            request_id: usage.request_id.clone(),
            admitted_at: now,
            model: usage.model.clone(),
            body_bytes: 1723,
            max_tokens: 64,
            path: usage.path.clone(),
            reservation: None,
        };
        let record = store
            .admit(key.id(), &hash, terms, last.as_ref(), &flight)
            .await
            .map_err(|e| anyhow::anyhow!("admission: {e}"))?;
        admits.push(ms(started.elapsed()));
        // What a hard-mode admission reserved, given back as the proxy does.
        let mut usage = usage;
        usage.budget = std::mem::take(&mut usage.budget).holding(
            record
                .flights
                .iter()
                .find(|f| f.request_id == usage.request_id)
                .and_then(|f| f.reservation.clone()),
        );
        last = Some(record);
        let started = Instant::now();
        store
            .settle(&usage, Duration::from_secs(86_400))
            .await
            .map_err(|e| anyhow::anyhow!("settle: {e:#}"))?;
        settles.push(ms(started.elapsed()));
    }
    f.push("store_admit_p50", percentile(&admits, 50.0));
    f.push("store_settle_p50", percentile(&settles, 50.0));
    Ok(())
}

/// The usage of a small non-streamed request, the `i`-th of this phase.
fn usage_record(key_id: &KeyId, at: OffsetDateTime, i: usize) -> UsageRecord {
    UsageRecord {
        request_id: format!("bench_{}_{i}", PresentedKey::generate().id()),
        key_id: key_id.clone(),
        at,
        model: Some("claude-sonnet-4-5-20250929".into()),
        requested_model: None,
        method: "POST".into(),
        path: "/v1/messages".into(),
        status: 200,
        stream: false,
        usage: TokenUsage {
            input_tokens: 512,
            output_tokens: 12,
            ..TokenUsage::default()
        },
        estimated: false,
        latency_ms: 5,
        ttfb_ms: Some(3),
        retries: 0,
        client_ip: "127.0.0.1".into(),
        user_agent: Some("relay-bench".into()),
        session_id: None,
        attribution: Default::default(),
        error_type: None,
        upstream: None,
        cost: Default::default(),
        budget: Default::default(),
    }
}
