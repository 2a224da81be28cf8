//! The proxy's two writes per request: admission (one conditional update of
//! the key item that checks secret, status, expiry, quota and the rate
//! window together) and settlement (one idempotent transaction recording
//! the usage log, the key's counters and the aggregates).

use std::time::Duration;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnValue, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
    Update,
};
use rand::Rng;
use time::OffsetDateTime;

use super::item::{Item, n, s};
use super::keys::key_pk;
use super::owned::pending_item;
use super::{Store, StoreError, TTL_ATTRIBUTE, classify};
use crate::domain::format_timestamp;
use crate::domain::key::ApiKeyRecord;
use crate::domain::key::{KeyId, SecretHash};
use crate::domain::tier::window_of;
use crate::domain::usage::TokenUsage;

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
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
    /// A reservation (a batch's worst case) does not fit what is left.
    #[error("worst case exceeds the quota left")]
    WorstCaseExceedsQuota { worst: u64, left: u64 },
    #[error("rate limited")]
    RateLimited { retry_after: u64 },
    /// More requests at once than the tier allows in a whole window.
    #[error("more requests than the tier's window holds")]
    OverTier {
        requests: u64,
        limit: u64,
        period: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an admission takes from the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// Requests counted in the tier's window (a batch counts each of its own).
    pub requests: u64,
    pub quota: QuotaRule,
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

/// Which update shape to try: count in the window the item holds, or open
/// a new one. A wrong guess costs one more round trip, never a wrong count.
#[derive(Debug, Clone, Copy)]
enum WindowStep {
    Same(u64),
    New(u64),
}

const KEY_CHECKS: &str = "attribute_exists(pk) AND secret_hash = :h AND is_active = :t \
     AND (attribute_not_exists(expires_at) OR expires_at > :now)";

/// The admission update of the key item: expression, condition, values.
fn admission_update(
    step: WindowStep,
    charge: &Charge,
    limit: u64,
    hash: &SecretHash,
    now: OffsetDateTime,
) -> (String, String, Item) {
    let mut values = Item::from([
        (":h".to_owned(), s(hash.to_hex())),
        (":t".to_owned(), AttributeValue::Bool(true)),
        (":now".to_owned(), s(format_timestamp(now))),
        (":n".to_owned(), n(charge.requests)),
    ]);
    let (mut expression, window_condition) = match step {
        WindowStep::Same(w) => {
            values.insert(":w".into(), n(w));
            // rl_count + requests <= limit, without arithmetic in a condition.
            values.insert(":room".into(), n(limit.saturating_sub(charge.requests)));
            (
                "SET rl_count = rl_count + :n".to_owned(),
                "rl_window = :w AND rl_count <= :room",
            )
        }
        WindowStep::New(w) => {
            values.insert(":w".into(), n(w));
            (
                "SET rl_window = :w, rl_count = :n".to_owned(),
                "(attribute_not_exists(rl_window) OR rl_window < :w)",
            )
        }
    };
    let quota_condition = match charge.quota {
        QuotaRule::AnyLeft => {
            "(attribute_not_exists(token_limit) OR tokens_used < token_limit)".to_owned()
        }
        QuotaRule::Reserve { limit: None, .. } => "attribute_not_exists(token_limit)".to_owned(),
        QuotaRule::Reserve {
            limit: Some(token_limit),
            tokens,
        } => {
            values.insert(":tl".into(), n(token_limit));
            // tokens_used + tokens <= token_limit, stated on the stored
            // limit; negative when the worst case exceeds the whole limit,
            // so the write fails and the diagnosis says by how much.
            let ceiling = i128::from(token_limit) - i128::from(tokens);
            values.insert(":ceiling".into(), n(ceiling));
            values.insert(":r".into(), n(tokens));
            expression.push_str(" ADD tokens_used :r, tokens_reserved :r");
            "token_limit = :tl AND tokens_used <= :ceiling".to_owned()
        }
    };
    let condition = format!("{KEY_CHECKS} AND {quota_condition} AND {window_condition}");
    (expression, condition, values)
}

/// Why the key item refused the admission, read off its old state: a final
/// refusal, or the next shape to try (another window, a changed limit).
fn diagnose(
    old: &ApiKeyRecord,
    hash: &SecretHash,
    now: OffsetDateTime,
    charge: &mut Charge,
    window: (u64, u64),
    limit: u64,
    period: u64,
) -> Result<WindowStep, AdmissionError> {
    let (window, retry_after) = window;
    if !old.secret_hash.matches(hash) {
        return Err(AdmissionError::WrongSecret);
    }
    if !old.is_active {
        return Err(AdmissionError::Disabled);
    }
    if old.is_expired(now) {
        return Err(AdmissionError::Expired);
    }
    match &mut charge.quota {
        QuotaRule::AnyLeft => {
            if let Some(limit) = old.token_limit
                && old.tokens_used >= limit
            {
                return Err(AdmissionError::QuotaExhausted {
                    used: old.tokens_used,
                    limit,
                });
            }
        }
        QuotaRule::Reserve { limit, tokens } => {
            // The limit may have changed since it was read: check against
            // the stored one, and state the next write on it.
            *limit = old.token_limit;
            if let Some(token_limit) = old.token_limit
                && old.tokens_used.saturating_add(*tokens) > token_limit
            {
                return Err(AdmissionError::WorstCaseExceedsQuota {
                    worst: *tokens,
                    left: token_limit.saturating_sub(old.tokens_used),
                });
            }
        }
    }
    Ok(match old.rate_window {
        Some((stored, count)) if stored >= window => {
            if count + charge.requests > limit {
                let retry_after = if stored == window {
                    retry_after
                } else {
                    period
                };
                return Err(AdmissionError::RateLimited { retry_after });
            }
            // Another instance's clock may be ahead: count in its window.
            WindowStep::Same(stored)
        }
        _ => WindowStep::New(window),
    })
}

impl Store {
    /// Admits one message request for key `id` presenting `hash` under a
    /// tier of `limit` requests per `period` seconds, or says why not.
    /// Atomic: a key disabled, rotated or over quota a moment ago is refused
    /// now. Returns the key as it is after counting the request.
    pub async fn admit(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        limit: u64,
        period: u64,
        now: OffsetDateTime,
        last_seen_window: Option<u64>,
    ) -> Result<ApiKeyRecord, AdmissionError> {
        let (item, _) = self
            .admit_with(
                id,
                hash,
                Charge::MESSAGE,
                limit,
                period,
                now,
                last_seen_window,
                None,
            )
            .await?;
        item.ok_or_else(|| {
            StoreError::Unexpected(anyhow::anyhow!("admission returned no item")).into()
        })
    }

    /// The admission write for `charge`: one conditional `UpdateItem` of the
    /// key item or, when it reserves tokens for the creation `pending_for`
    /// (a request id), one transaction that also records that reservation as
    /// pending. Returns the key as updated (plain updates only) and the
    /// charge as finally taken (the stored limit may have changed it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn admit_with(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        mut charge: Charge,
        limit: u64,
        period: u64,
        now: OffsetDateTime,
        last_seen_window: Option<u64>,
        pending_for: Option<&str>,
    ) -> Result<(Option<ApiKeyRecord>, Charge), AdmissionError> {
        if charge.requests > limit {
            return Err(AdmissionError::OverTier {
                requests: charge.requests,
                limit,
                period,
            });
        }
        let epoch = crate::domain::epoch_seconds(now);
        let window = window_of(epoch, period);
        let mut step = if last_seen_window == Some(window.0) {
            WindowStep::Same(window.0)
        } else {
            WindowStep::New(window.0)
        };
        for attempt in 0..6 {
            let (expression, condition, values) = admission_update(step, &charge, limit, hash, now);
            let update = Update::builder()
                .table_name(self.table())
                .key("pk", s(key_pk(id)))
                .key("sk", s("META"))
                .update_expression(expression)
                .condition_expression(condition)
                .set_expression_attribute_values(Some(values))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            let old_item = match pending_for.filter(|_| charge.reserved() > 0) {
                None => match self.admit_update(update).await? {
                    Ok(item) => return Ok((Some(ApiKeyRecord::try_from(&item)?), charge)),
                    Err(old) => old,
                },
                Some(request_id) => {
                    let pending = pending_item(id, request_id, charge.reserved(), now);
                    match self.admit_transaction(update, pending).await? {
                        Ok(()) => return Ok((None, charge)),
                        Err(old) => old,
                    }
                }
            };
            let Some(old_item) = old_item.or_conflict() else {
                // A settle transaction holds the item for a moment.
                conflict_pause(attempt).await;
                continue;
            };
            let Some(old_item) = old_item else {
                return Err(AdmissionError::UnknownKey);
            };
            let old = ApiKeyRecord::try_from(&old_item)?;
            step = diagnose(&old, hash, now, &mut charge, window, limit, period)?;
        }
        Err(StoreError::Unavailable(anyhow::anyhow!("admission kept conflicting")).into())
    }

    /// Runs the admission update alone: the new item, or why it failed.
    async fn admit_update(
        &self,
        update: UpdateBuilder,
    ) -> Result<Result<Item, Refused>, StoreError> {
        let update = update.build()?;
        let result = self
            .client
            .update_item()
            .table_name(update.table_name())
            .set_key(Some(update.key().clone()))
            .update_expression(update.update_expression())
            .set_condition_expression(update.condition_expression().map(str::to_owned))
            .set_expression_attribute_values(update.expression_attribute_values().cloned())
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(output) => output.attributes.map(Ok).ok_or_else(|| {
                StoreError::Unexpected(anyhow::anyhow!("admission returned no item"))
            }),
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    Ok(Err(Refused::Condition(failed.item.clone())))
                }
                Some(UpdateItemError::TransactionConflictException(_)) => {
                    Ok(Err(Refused::Conflict))
                }
                _ => Err(classify(err)),
            },
        }
    }

    /// Runs the admission update and `put` in one transaction.
    async fn admit_transaction(
        &self,
        update: UpdateBuilder,
        put: Item,
    ) -> Result<Result<(), Refused>, StoreError> {
        let items = vec![
            transact_update(update)?,
            transact_put(self.table(), put, Some("attribute_not_exists(pk)"))?,
        ];
        Ok(match self.transact(items).await? {
            Ok(()) => Ok(()),
            Err(canceled) if canceled.failed(0) => Err(Refused::Condition(canceled.item(0))),
            Err(canceled) if canceled.transient() => Err(Refused::Conflict),
            Err(canceled) => {
                return Err(StoreError::Unexpected(anyhow::anyhow!(
                    "admission: {canceled:?}"
                )));
            }
        })
    }
}

/// Why an admission write did not apply.
enum Refused {
    /// Its condition failed; the item as it was (`None`: no such item).
    Condition(Option<Item>),
    /// Another write held the item; try again.
    Conflict,
}

impl Refused {
    /// `Some(old item)` for a failed condition, `None` for a conflict.
    fn or_conflict(self) -> Option<Option<Item>> {
        match self {
            Refused::Condition(item) => Some(item),
            Refused::Conflict => None,
        }
    }
}

/// A short random pause before retrying a write that met a transaction.
pub(crate) async fn conflict_pause(attempt: u32) {
    let bound = 10u64 << attempt.min(5);
    let millis = rand::rng().random_range(1..=bound);
    tokio::time::sleep(Duration::from_millis(millis)).await;
}

/// Everything recorded about one relayed request.
#[derive(Debug, Clone)]
pub struct UsageRecord {
    pub request_id: String,
    pub key_id: KeyId,
    pub at: OffsetDateTime,
    pub model: Option<String>,
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
    /// `error.type` when the answer was an error (HTTP or in-stream).
    pub error_type: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    Recorded,
    /// This request id was settled before: nothing was counted again.
    AlreadyRecorded,
    /// The key no longer exists: the log and aggregates were recorded.
    RecordedWithoutKey,
}

/// What one settlement adds to the key's, a day's or a model's counters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub requests: u64,
    pub usage: TokenUsage,
    pub estimated_requests: u64,
    pub error_requests: u64,
}

impl Counters {
    fn of(record: &UsageRecord) -> Counters {
        Counters {
            requests: 1,
            usage: record.usage,
            estimated_requests: u64::from(record.estimated),
            error_requests: u64::from(record.error_type.is_some() || record.status >= 400),
        }
    }

    /// Counters kept per key, per day and per model, named alike everywhere.
    fn values(&self) -> [(&'static str, u64); 7] {
        let usage = &self.usage;
        [
            ("requests", self.requests),
            ("input_tokens", usage.input_tokens),
            ("output_tokens", usage.output_tokens),
            (
                "cache_creation_input_tokens",
                usage.cache_creation_input_tokens,
            ),
            ("cache_read_input_tokens", usage.cache_read_input_tokens),
            ("estimated_requests", self.estimated_requests),
            ("error_requests", self.error_requests),
        ]
    }
}

/// `ADD requests :requests, …` with its values, plus the extra clauses.
/// Extra adds may be negative (a reservation given back).
pub(crate) fn counters_update(
    counters: &Counters,
    extra_add: &[(&str, i64)],
    set: &str,
) -> (String, Item) {
    let mut values = Item::new();
    let mut adds = Vec::new();
    for (name, value) in counters.values() {
        adds.push(format!("{name} :{name}"));
        values.insert(format!(":{name}"), n(value));
    }
    for (name, value) in extra_add {
        adds.push(format!("{name} :{name}"));
        values.insert(format!(":{name}"), n(value));
    }
    let mut expression = format!("ADD {}", adds.join(", "));
    if !set.is_empty() {
        expression.push_str(" SET ");
        expression.push_str(set);
    }
    (expression, values)
}

/// The token columns of a usage-log item.
pub(crate) fn token_columns(usage: &TokenUsage) -> [(String, AttributeValue); 6] {
    [
        ("input_tokens".to_owned(), n(usage.input_tokens)),
        ("output_tokens".to_owned(), n(usage.output_tokens)),
        (
            "cache_creation_input_tokens".to_owned(),
            n(usage.cache_creation_input_tokens),
        ),
        (
            "cache_read_input_tokens".to_owned(),
            n(usage.cache_read_input_tokens),
        ),
        (
            "cache_creation_5m_input_tokens".to_owned(),
            n(usage.cache_creation_5m),
        ),
        (
            "cache_creation_1h_input_tokens".to_owned(),
            n(usage.cache_creation_1h),
        ),
    ]
}

pub fn log_sort_key(at: OffsetDateTime, request_id: &str) -> String {
    format!("LOG#{}#{request_id}", format_timestamp(at))
}

pub fn log_model_partition(key_id: &KeyId, model: &str) -> String {
    format!("LOG#{key_id}#{model}")
}

pub fn day_of(at: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        at.year(),
        u8::from(at.month()),
        at.day()
    )
}

impl Store {
    /// Records one request exactly once: the usage-log item (whose absence
    /// is the transaction's condition, so a repeated settle counts nothing
    /// and answers `AlreadyRecorded`),
    /// the key's counters, the day's and the model's aggregates, in one
    /// transaction. Retries transaction conflicts itself.
    pub async fn settle(
        &self,
        record: &UsageRecord,
        retention: Duration,
    ) -> Result<SettleOutcome, StoreError> {
        let mut with_key = true;
        for attempt in 0..8 {
            let items = self.settle_items(record, retention, with_key)?;
            // No ClientRequestToken: the log item's condition already makes a
            // repeat a no-op, at any distance in time, and tells us so.
            match self.transact(items).await? {
                Ok(()) if with_key => return Ok(SettleOutcome::Recorded),
                Ok(()) => return Ok(SettleOutcome::RecordedWithoutKey),
                Err(canceled) if canceled.failed(0) => return Ok(SettleOutcome::AlreadyRecorded),
                Err(canceled) if with_key && canceled.failed(1) => with_key = false,
                Err(canceled) if canceled.transient() => conflict_pause(attempt).await,
                Err(canceled) => {
                    return Err(StoreError::Unexpected(anyhow::anyhow!(
                        "settle of {}: {canceled:?}",
                        record.request_id
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "settle kept conflicting"
        )))
    }

    fn settle_items(
        &self,
        record: &UsageRecord,
        retention: Duration,
        with_key: bool,
    ) -> Result<Vec<TransactWriteItem>, StoreError> {
        let pk = key_pk(&record.key_id);
        let at = format_timestamp(record.at);
        let usage = &record.usage;
        let expires = crate::domain::epoch_seconds(record.at) + retention.as_secs();

        let mut log = Item::from([
            ("pk".to_owned(), s(&pk)),
            (
                "sk".to_owned(),
                s(log_sort_key(record.at, &record.request_id)),
            ),
            ("request_id".to_owned(), s(&record.request_id)),
            ("key_id".to_owned(), s(record.key_id.as_str())),
            ("at".to_owned(), s(&at)),
            ("method".to_owned(), s(&record.method)),
            ("path".to_owned(), s(&record.path)),
            ("status".to_owned(), n(record.status)),
            ("stream".to_owned(), AttributeValue::Bool(record.stream)),
            (
                "estimated".to_owned(),
                AttributeValue::Bool(record.estimated),
            ),
            ("latency_ms".to_owned(), n(record.latency_ms)),
            ("retries".to_owned(), n(record.retries)),
            ("client_ip".to_owned(), s(&record.client_ip)),
            (TTL_ATTRIBUTE.to_owned(), n(expires)),
        ]);
        log.extend(token_columns(usage));
        let optional = [
            ("model", record.model.as_deref()),
            ("user_agent", record.user_agent.as_deref()),
            ("session_id", record.session_id.as_deref()),
            ("error_type", record.error_type.as_deref()),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                log.insert(name.into(), s(value));
            }
        }
        if let Some(ttfb) = record.ttfb_ms {
            log.insert("ttfb_ms".into(), n(ttfb));
        }
        // Indexed by key and model, so a model-filtered log page reads only
        // what it returns.
        if let Some(model) = &record.model {
            log.insert(
                "gsi1pk".into(),
                s(log_model_partition(&record.key_id, model)),
            );
            log.insert(
                "gsi1sk".into(),
                s(log_sort_key(record.at, &record.request_id)),
            );
        }
        let mut items = vec![transact_put(
            self.table(),
            log,
            Some("attribute_not_exists(pk)"),
        )?];

        let counters = Counters::of(record);
        if with_key {
            let billed = i64::try_from(usage.billed()).unwrap_or(i64::MAX);
            items.push(self.key_counters_update(
                &pk,
                &counters,
                &[("tokens_used", billed)],
                &at,
            )?);
        }
        items.push(self.day_counters_update(&pk, &record.key_id, &counters, record.at)?);
        let model = record.model.as_deref().unwrap_or("unknown");
        items.push(self.model_counters_update(&pk, model, &counters, &at)?);
        Ok(items)
    }

    /// The key item's share of a settlement; `extra` adds to other
    /// attributes (`tokens_used`, `tokens_reserved`). The key may have been
    /// deleted meanwhile: then this item fails its condition and the
    /// settlement retries without it.
    pub(crate) fn key_counters_update(
        &self,
        pk: &str,
        counters: &Counters,
        extra: &[(&str, i64)],
        at: &str,
    ) -> Result<TransactWriteItem, StoreError> {
        let (expression, mut values) = counters_update(
            counters,
            extra,
            "last_used_at = :at, first_used_at = if_not_exists(first_used_at, :at)",
        );
        values.insert(":at".into(), s(at));
        transact_update(
            self.counters_item_update(pk, "META".into(), expression, values)
                .condition_expression("attribute_exists(pk)"),
        )
    }

    /// The day aggregate's share, also indexed by day for the all-keys view.
    pub(crate) fn day_counters_update(
        &self,
        pk: &str,
        key_id: &KeyId,
        counters: &Counters,
        at: OffsetDateTime,
    ) -> Result<TransactWriteItem, StoreError> {
        let day = day_of(at);
        let (expression, mut values) = counters_update(
            counters,
            &[],
            "gsi1pk = :gpk, gsi1sk = :gsk, key_id = :kid, #day = :day, first_at = if_not_exists(first_at, :at), last_at = :at",
        );
        values.insert(":gpk".into(), s(format!("DAY#{day}")));
        values.insert(":gsk".into(), s(pk));
        values.insert(":kid".into(), s(key_id.as_str()));
        values.insert(":day".into(), s(&day));
        values.insert(":at".into(), s(format_timestamp(at)));
        transact_update(
            self.counters_item_update(pk, format!("DAY#{day}"), expression, values)
                .expression_attribute_names("#day", "day"),
        )
    }

    /// A model aggregate's share.
    pub(crate) fn model_counters_update(
        &self,
        pk: &str,
        model: &str,
        counters: &Counters,
        at: &str,
    ) -> Result<TransactWriteItem, StoreError> {
        let (expression, mut values) = counters_update(
            counters,
            &[],
            "model = :model, first_at = if_not_exists(first_at, :at), last_at = :at",
        );
        values.insert(":model".into(), s(model));
        values.insert(":at".into(), s(at));
        transact_update(self.counters_item_update(pk, format!("MODEL#{model}"), expression, values))
    }

    /// One counters update of the settle transaction (key, day or model
    /// item); the caller adds its condition or attribute names.
    pub(crate) fn counters_item_update(
        &self,
        pk: &str,
        sk: String,
        expression: String,
        values: Item,
    ) -> UpdateBuilder {
        Update::builder()
            .table_name(self.table())
            .key("pk", s(pk))
            .key("sk", s(sk))
            .update_expression(expression)
            .set_expression_attribute_values(Some(values))
    }
}

/// A put inside a transaction, with its condition.
pub(crate) fn transact_put(
    table: &str,
    item: Item,
    condition: Option<&str>,
) -> Result<TransactWriteItem, StoreError> {
    Ok(TransactWriteItem::builder()
        .put(
            Put::builder()
                .table_name(table)
                .set_item(Some(item))
                .set_condition_expression(condition.map(str::to_owned))
                .build()?,
        )
        .build())
}

pub(crate) fn transact_update(update: UpdateBuilder) -> Result<TransactWriteItem, StoreError> {
    Ok(TransactWriteItem::builder().update(update.build()?).build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::PresentedKey;

    fn key(used: u64, limit: Option<u64>) -> (ApiKeyRecord, SecretHash) {
        let key = PresentedKey::generate();
        let now = crate::domain::now();
        let record = ApiKeyRecord {
            id: key.id().clone(),
            name: "k".into(),
            description: None,
            prefix: String::new(),
            secret_hash: key.hash(),
            is_active: true,
            created_at: now,
            updated_at: now,
            expires_at: None,
            token_limit: limit,
            tokens_used: used,
            tokens_reserved: 0,
            rate_limit_tier: "basic".into(),
            allowed_ips: vec![],
            allowed_origins: vec![],
            allowed_models: vec![],
            rate_window: Some((1000, 2)),
        };
        (record, key.hash())
    }

    fn number(values: &Item, name: &str) -> String {
        match &values[name] {
            AttributeValue::N(n) => n.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reservation_is_added_in_the_admission_write_and_bounded_by_the_limit() {
        let (_, hash) = key(0, None);
        let charge = Charge {
            requests: 3,
            quota: QuotaRule::Reserve {
                limit: Some(1000),
                tokens: 400,
            },
        };
        let now = crate::domain::now();
        let (expression, condition, values) =
            admission_update(WindowStep::Same(60), &charge, 10, &hash, now);
        assert!(expression.contains("ADD tokens_used :r, tokens_reserved :r"));
        assert!(condition.contains("token_limit = :tl AND tokens_used <= :ceiling"));
        assert_eq!(number(&values, ":ceiling"), "600");
        assert_eq!(
            number(&values, ":room"),
            "7",
            "3 more requests fit under 10"
        );
        // A worst case over the whole limit can never pass the condition.
        let too_big = Charge {
            requests: 1,
            quota: QuotaRule::Reserve {
                limit: Some(100),
                tokens: 500,
            },
        };
        let (_, _, values) = admission_update(WindowStep::New(60), &too_big, 10, &hash, now);
        assert_eq!(number(&values, ":ceiling"), "-400");
        // Messages reserve nothing and need only some quota left.
        let (expression, condition, _) =
            admission_update(WindowStep::New(60), &Charge::MESSAGE, 10, &hash, now);
        assert!(!expression.contains("ADD"));
        assert!(condition.contains("tokens_used < token_limit"));
    }

    #[test]
    fn a_refused_reservation_says_how_much_is_left_or_follows_a_changed_limit() {
        let now = crate::domain::now();
        let (old, hash) = key(700, Some(1000));
        let mut charge = Charge {
            requests: 1,
            quota: QuotaRule::Reserve {
                limit: Some(1000),
                tokens: 400,
            },
        };
        match diagnose(&old, &hash, now, &mut charge, (1000, 30), 10, 60) {
            Err(AdmissionError::WorstCaseExceedsQuota { worst, left }) => {
                assert_eq!((worst, left), (400, 300));
            }
            other => panic!("{other:?}"),
        }
        // The admin raised the limit meanwhile: the next write states it.
        let mut raised = old.clone();
        raised.token_limit = Some(5000);
        let step = diagnose(&raised, &hash, now, &mut charge, (1000, 30), 10, 60).unwrap();
        assert!(matches!(step, WindowStep::Same(1000)));
        assert_eq!(
            charge.quota,
            QuotaRule::Reserve {
                limit: Some(5000),
                tokens: 400
            }
        );
        // A batch larger than what is left of the window waits.
        let mut big = Charge {
            requests: 9,
            quota: QuotaRule::AnyLeft,
        };
        let (old, hash) = key(0, None);
        assert!(matches!(
            diagnose(&old, &hash, now, &mut big, (1000, 30), 10, 60),
            Err(AdmissionError::RateLimited { retry_after: 30 })
        ));
    }
}
