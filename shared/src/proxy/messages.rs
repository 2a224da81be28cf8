//! `POST /v1/messages` (metered) and `count_tokens` (free) through the
//! admission phase: the model is read, bounded and checked against the
//! allowlist, file references against ownership, and a metered message is
//! admitted in one conditional write before it is forwarded.

use std::sync::Arc;

use axum::response::Response;
use bytes::Bytes;

use super::body::{self, MessagesFields};
use super::context::Call;
use super::exchange::{self, Exchange, PoolChoice};
use super::finish::Metering;
use super::tier_of;
use crate::domain::admission::{AdmissionRefusal, BudgetCheck, Charge, RateLimit, WorstCase};
use crate::domain::budget::{BudgetCharge, may_exhaust};
use crate::domain::flight::Flight;
use crate::domain::key::access::model_name_problem;
use crate::domain::key::{ApiKeyRecord, LimitMode};
use crate::domain::model_catalog::with_model;
use crate::domain::price::{Attribute, PriceTable};
use crate::domain::route::{Route, Treatment};
use crate::domain::tier::Tier;
use crate::domain::tpm::{MinuteCharge, MinuteStanding};
use crate::domain::usage::{session_of_user_id, worst_prompt_tokens};
use crate::error::ApiError;
use crate::store::admission::{AdmissionError, Terms};

/// What the admission phase learnt of a message request.
struct Admitted {
    streamed: bool,
    /// How the answer is metered; `None` for a free route.
    metering: Option<Metering>,
    /// The model it asks for, which the upstreams tried must serve.
    model: Option<String>,
    /// Its Claude Code session: the header's, else the one its
    /// `metadata.user_id` names.
    session: Option<String>,
}

pub(super) async fn messages(
    call: Call,
    route: &Route,
    mut body: Bytes,
) -> Result<Response, ApiError> {
    let admitted = admit(&call, route, &mut body).await?;
    let forward = call.forward(body);
    // A Claude Code session stays on one upstream while it is healthy: the
    // prompt cache lives in one account.
    let pooled = Some(PoolChoice {
        model: admitted.model,
        session: admitted.session,
    });
    Ok(exchange::start(Exchange {
        state: call.state,
        forward,
        metering: admitted.metering,
        streamed: admitted.streamed,
        started: call.started,
        pooled,
    })
    .await)
}

/// Phase 2 for messages: an alias resolved to its model, the key's rules,
/// then (for a metered route) the admission write. The body forwarded
/// names the real model.
async fn admit(call: &Call, route: &Route, body: &mut Bytes) -> Result<Admitted, ApiError> {
    let charged = route.treatment() == Treatment::Metered;
    // serde would read the fields from an array too, in order.
    if !body::is_json_object(body) {
        return Err(ApiError::bad_request("request body must be a JSON object"));
    }
    let mut fields = serde_json::from_slice::<MessagesFields>(body).map_err(|e| {
        ApiError::bad_request(format!("request body is not a valid JSON object: {e}"))
    })?;
    if let Some(problem) = fields.model.as_deref().and_then(model_name_problem) {
        return Err(ApiError::bad_request(problem));
    }
    // An instance's first request reads the price table and the aliases
    // while the key is read, not after it.
    let (in_force, record) = tokio::join!(call.state.in_force(), authorize(call, charged));
    let (in_force, record) = (in_force?, record?);
    let alias = fields
        .model
        .as_deref()
        .and_then(|requested| in_force.aliases.resolve(requested));
    let requested_alias = match alias {
        Some(alias) => {
            *body = with_model(body, &alias.model)
                .map_err(|e| {
                    ApiError::bad_request(format!("request body is not a valid JSON object: {e}"))
                })?
                .into();
            fields.model = Some(alias.model.clone());
            Some(alias.alias.clone())
        }
        None => None,
    };
    // The allowlist judges the model served and billed, never the alias.
    call.check(&record, Some(&[fields.model.as_deref()]))?;
    let prices = charged.then(|| Arc::clone(&in_force.prices));
    if let (Some(prices), Some(model)) = (&prices, fields.model.as_deref())
        && prices.refuses(model, call.at)
    {
        return Err(unpriced(model));
    }
    call.check_file_references(body).await?;
    let streamed = fields.stream.unwrap_or(false);
    let session = call.header_text("x-claude-code-session-id").or_else(|| {
        fields
            .user_id()
            .and_then(session_of_user_id)
            .map(|session| session.as_str().to_owned())
    });
    let metering = match prices {
        Some(prices) => {
            let mut metering = charge(call, &record, &fields, &prices, body, streamed).await?;
            metering.requested_model = requested_alias;
            metering.session_id.clone_from(&session);
            Some(metering)
        }
        None => {
            let models: Vec<&str> = fields.model.as_deref().into_iter().collect();
            call.seen.saw(record, &models);
            None
        }
    };
    Ok(Admitted {
        streamed,
        metering,
        model: fields.model,
        session,
    })
}

/// The metered part of admission: the request's worst case, its trace,
/// the admission write (reserving the worst case on a hard-mode key), what
/// its settlement will add to (and give back from) the key's counters, and
/// whether it must be settled before its answer ends.
async fn charge(
    call: &Call,
    record: &ApiKeyRecord,
    fields: &MessagesFields,
    prices: &PriceTable,
    body: &Bytes,
    streamed: bool,
) -> Result<Metering, ApiError> {
    let policy = &call.state.0.budgets;
    let models: Vec<&str> = fields.model.as_deref().into_iter().collect();
    let attributes = fields.price_attributes();
    let worst_for = async |mode| -> Result<WorstCase, ApiError> {
        let prompt = prompt_bound(call, body, mode).await?;
        Ok(worst_case(prices, fields, &attributes, prompt, call.at))
    };
    let mut worst = worst_for(record.limit_mode).await?;
    let flight = Flight {
        request_id: call.request_id.clone(),
        admitted_at: call.at,
        model: fields.model.clone(),
        body_bytes: u64::try_from(body.len()).unwrap_or(u64::MAX),
        max_tokens: fields
            .max_tokens
            .as_ref()
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        path: call.path.to_string(),
        // Stated by the admission write itself (`AdmissionWrite::reservation`).
        reservation: None,
    };
    let tier = tier_of(&call.state, &record.rate_limit_tier).await?;
    let hard_worst = (record.limit_mode == LimitMode::Hard).then_some(worst);
    let admitted = match admit_write(call, record, &tier, &models, &flight, hard_worst).await {
        // The key turned hard since this instance cached it: its worst
        // case is worked out, and the request judged on it, once.
        Err(AdmissionError::Refused(AdmissionRefusal::LimitModeChanged)) => {
            worst = worst_for(LimitMode::Hard).await?;
            admit_write(call, record, &tier, &models, &flight, Some(worst)).await?
        }
        other => other?,
    };
    let admitted = Arc::new(admitted);
    let keys = &call.state.0.keys;
    keys.insert(call.key.id().clone(), admitted.clone());
    let tokens_per_minute = tier.tokens_per_minute;
    let reservation = admitted
        .flights
        .iter()
        .find(|f| f.request_id == call.request_id)
        .and_then(|f| f.reservation.clone());
    let mut budget = BudgetCharge::of(&admitted, policy, &models, call.at).holding(reservation);
    budget.tokens_per_minute = MinuteCharge::of(&admitted, tokens_per_minute, call.at);
    let settle_first = may_exhaust(
        &admitted,
        policy,
        &models,
        worst.tokens,
        worst.cost,
        call.at,
    ) || MinuteStanding::of(&admitted, tokens_per_minute, call.at)
        .is_some_and(|minute| minute.may_exhaust(worst.tokens));
    call.seen.saw(admitted, &models);
    let mut metering = Metering::of(call, fields.model.clone(), streamed, attributes, budget);
    metering.settle_before_answer_ends = settle_first;
    Ok(metering)
}

/// The most a message request could use: `prompt` tokens (a bound of its
/// prompt) at its dearest input class, and all of `max_tokens` (absent or
/// odd: the most any model writes).
fn worst_case(
    prices: &PriceTable,
    fields: &MessagesFields,
    attributes: &[Attribute],
    prompt: u64,
    at: time::OffsetDateTime,
) -> WorstCase {
    const MOST_OUTPUT: u64 = 1_000_000;
    let output = fields
        .max_tokens
        .as_ref()
        .and_then(serde_json::Value::as_u64)
        .map_or(MOST_OUTPUT, |m| m.min(MOST_OUTPUT));
    WorstCase {
        tokens: prompt.saturating_add(output),
        cost: prices.worst_case(fields.model.as_deref(), prompt, output, attributes, at),
    }
}

/// The refusal of a model the price table does not price, when the relay
/// is set to refuse those (`UNPRICED_MODELS=refuse`).
pub(super) fn unpriced(model: &str) -> ApiError {
    ApiError::forbidden(format!(
        "model `{}` has no price in this relay's price table, and the relay refuses unpriced models; ask your relay admin",
        model.chars().take(256).collect::<String>()
    ))
}

/// The key's record if it admits this caller (its model is judged once
/// an alias is resolved). Charged requests
/// use the cached record for the rules and let the admission write re-check
/// what must be current; uncharged ones read the key afresh (they are rare
/// and write nothing).
async fn authorize(call: &Call, charged: bool) -> Result<Arc<ApiKeyRecord>, ApiError> {
    let hash = call.key.hash();
    let cached = charged
        .then(|| call.state.0.keys.get(call.key.id()))
        .flatten()
        .filter(|r| r.secret_hash.matches(&hash));
    match cached {
        Some(record) => {
            call.check(&record, None)?;
            Ok(record)
        }
        None => Ok(Arc::new(call.authenticate(None).await?)),
    }
}

/// A bound of the request's prompt in tokens: for a hard-mode key,
/// tiktoken's with its margins (`worst_prompt_tokens`); for the others the
/// cheap one (every byte a token) that only decides whether to settle
/// first.
async fn prompt_bound(call: &Call, body: &Bytes, mode: LimitMode) -> Result<u64, ApiError> {
    match mode {
        LimitMode::Hard => {
            // Tokenizing is CPU work (milliseconds for a large prompt):
            // off the async threads.
            let window = body::context_window(&call.parts.headers);
            let body = body.clone();
            tokio::task::spawn_blocking(move || worst_prompt_tokens(&body, window))
                .await
                .map_err(|e| ApiError::internal(e.into()))
        }
        LimitMode::Soft => Ok(u64::try_from(body.len()).unwrap_or(u64::MAX)),
    }
}

/// The admission write: counts the request in the tier's window and checks
/// secret, status, expiry, quota, the dollar limits that apply to `models`
/// (reserving `worst` on a hard-mode key) and the tier's tokens per minute
/// against the stored key, atomically. Returns the key as the write left it.
async fn admit_write(
    call: &Call,
    record: &ApiKeyRecord,
    tier: &Tier,
    models: &[&str],
    flight: &Flight,
    worst: Option<WorstCase>,
) -> Result<ApiKeyRecord, AdmissionError> {
    let terms = Terms {
        charge: Charge::MESSAGE,
        rate: RateLimit {
            requests: tier.requests,
            period: tier.period,
            tokens_per_minute: tier.tokens_per_minute,
        },
        budget: BudgetCheck {
            policy: &call.state.0.budgets,
            models,
            worst,
        },
        now: call.at,
    };
    call.state
        .0
        .store
        .admit(call.key.id(), &call.key.hash(), terms, Some(record), flight)
        .await
}
