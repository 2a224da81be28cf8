//! The proxy's two writes per request: admission (one conditional update of
//! the key item that checks secret, status, expiry, quota and the rate
//! window together) and settlement (one idempotent transaction recording
//! the usage log, the key's counters and the aggregates).

use std::time::Duration;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{
    AttributeValue, CancellationReason, Put, ReturnValue, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem, Update,
};
use rand::Rng;
use time::OffsetDateTime;

use super::item::{Item, n, s};
use super::keys::key_pk;
use super::{Store, StoreError, TTL_ATTRIBUTE, classify};
use crate::domain::format_timestamp;
use crate::domain::key::ApiKeyRecord;
use crate::domain::tier::window_of;
use crate::keys::{KeyId, SecretHash};
use crate::usage::TokenUsage;

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
    #[error("rate limited")]
    RateLimited { retry_after: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which update shape to try: count in the window the item holds, or open
/// a new one. A wrong guess costs one more round trip, never a wrong count.
#[derive(Debug, Clone, Copy)]
enum WindowStep {
    Same(u64),
    New(u64),
}

const KEY_CHECKS: &str = "attribute_exists(pk) AND secret_hash = :h AND is_active = :t \
     AND (attribute_not_exists(expires_at) OR expires_at > :now) \
     AND (attribute_not_exists(token_limit) OR tokens_used < token_limit)";

impl Store {
    /// Admits one request for key `id` presenting `hash` under a tier of
    /// `limit` requests per `period` seconds, or says why not. Atomic: a key
    /// disabled, rotated or over quota a moment ago is refused now. Returns
    /// the key as it is after counting the request.
    pub async fn admit(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        limit: u64,
        period: u64,
        now: OffsetDateTime,
        last_seen_window: Option<u64>,
    ) -> Result<ApiKeyRecord, AdmissionError> {
        let epoch = crate::domain::epoch_seconds(now);
        let (window, retry_after) = window_of(epoch, period);
        let mut step = if last_seen_window == Some(window) {
            WindowStep::Same(window)
        } else {
            WindowStep::New(window)
        };
        for attempt in 0..6 {
            let (expression, condition, window_value) = match step {
                WindowStep::Same(w) => (
                    "SET rl_count = rl_count + :one",
                    format!("{KEY_CHECKS} AND rl_window = :w AND rl_count < :limit"),
                    w,
                ),
                WindowStep::New(w) => (
                    "SET rl_window = :w, rl_count = :one",
                    format!("{KEY_CHECKS} AND (attribute_not_exists(rl_window) OR rl_window < :w)"),
                    w,
                ),
            };
            let mut values = Item::from([
                (":h".to_owned(), s(hash.to_hex())),
                (":t".to_owned(), AttributeValue::Bool(true)),
                (":now".to_owned(), s(format_timestamp(now))),
                (":w".to_owned(), n(window_value)),
                (":one".to_owned(), n(1)),
            ]);
            // DynamoDB refuses values an expression does not use.
            if let WindowStep::Same(_) = step {
                values.insert(":limit".into(), n(limit));
            }
            let result = self
                .client
                .update_item()
                .table_name(self.table())
                .key("pk", s(key_pk(id)))
                .key("sk", s("META"))
                .update_expression(expression)
                .condition_expression(condition)
                .set_expression_attribute_values(Some(values))
                .return_values(ReturnValue::AllNew)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
                .await;
            let err = match result {
                Ok(output) => {
                    let item = output.attributes.ok_or_else(|| {
                        StoreError::Unexpected(anyhow::anyhow!("admission returned no item"))
                    })?;
                    return Ok(ApiKeyRecord::try_from(&item)?);
                }
                Err(err) => err,
            };
            let old_item = match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    failed.item.clone()
                }
                Some(UpdateItemError::TransactionConflictException(_)) => {
                    // A settle transaction holds the item for a moment.
                    conflict_pause(attempt).await;
                    continue;
                }
                _ => return Err(classify(err).into()),
            };
            let Some(old_item) = old_item else {
                return Err(AdmissionError::UnknownKey);
            };
            let old = ApiKeyRecord::try_from(&old_item)?;
            if !old.secret_hash.matches(hash) {
                return Err(AdmissionError::WrongSecret);
            }
            if !old.is_active {
                return Err(AdmissionError::Disabled);
            }
            if old.is_expired(now) {
                return Err(AdmissionError::Expired);
            }
            if let Some(limit) = old.token_limit
                && old.tokens_used >= limit
            {
                return Err(AdmissionError::QuotaExhausted {
                    used: old.tokens_used,
                    limit,
                });
            }
            step = match old.rate_window {
                Some((stored, count)) if stored >= window => {
                    if count >= limit {
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
            };
        }
        Err(StoreError::Unavailable(anyhow::anyhow!("admission kept conflicting")).into())
    }
}

/// A short random pause before retrying a write that met a transaction.
async fn conflict_pause(attempt: u32) {
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

/// Counters kept per key, per day and per model, named alike everywhere.
fn counter_values(record: &UsageRecord) -> [(&'static str, u64); 7] {
    let usage = &record.usage;
    [
        ("requests", 1),
        ("input_tokens", usage.input_tokens),
        ("output_tokens", usage.output_tokens),
        (
            "cache_creation_input_tokens",
            usage.cache_creation_input_tokens,
        ),
        ("cache_read_input_tokens", usage.cache_read_input_tokens),
        ("estimated_requests", u64::from(record.estimated)),
        (
            "error_requests",
            u64::from(record.error_type.is_some() || record.status >= 400),
        ),
    ]
}

/// `ADD requests :requests, …` with its values, plus the extra clauses.
fn counters_update(record: &UsageRecord, extra_add: &[(&str, u64)], set: &str) -> (String, Item) {
    let mut values = Item::new();
    let mut adds = Vec::new();
    for (name, value) in counter_values(record).iter().chain(extra_add) {
        adds.push(format!("{name} :{name}"));
        values.insert(format!(":{name}"), n(*value));
    }
    let mut expression = format!("ADD {}", adds.join(", "));
    if !set.is_empty() {
        expression.push_str(" SET ");
        expression.push_str(set);
    }
    (expression, values)
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
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items))
                .send()
                .await;
            let err = match result {
                Ok(_) if with_key => return Ok(SettleOutcome::Recorded),
                Ok(_) => return Ok(SettleOutcome::RecordedWithoutKey),
                Err(err) => err,
            };
            let reasons: Vec<CancellationReason> = match err.as_service_error() {
                Some(e) if e.is_transaction_canceled_exception() => match e {
                    aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => {
                        c.cancellation_reasons().to_vec()
                    }
                    _ => Vec::new(),
                },
                Some(e) if e.is_transaction_in_progress_exception() => {
                    conflict_pause(attempt).await;
                    continue;
                }
                _ => return Err(classify(err)),
            };
            let code = |i: usize| reasons.get(i).and_then(|r| r.code()).unwrap_or("None");
            if code(0) == "ConditionalCheckFailed" {
                return Ok(SettleOutcome::AlreadyRecorded);
            }
            if with_key && code(1) == "ConditionalCheckFailed" {
                with_key = false;
                continue;
            }
            if reasons.iter().any(|r| {
                matches!(
                    r.code(),
                    Some(
                        "TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded"
                    )
                )
            }) {
                conflict_pause(attempt).await;
                continue;
            }
            return Err(classify(err));
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
        let day = day_of(record.at);
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
            (
                "estimated".to_owned(),
                AttributeValue::Bool(record.estimated),
            ),
            ("latency_ms".to_owned(), n(record.latency_ms)),
            ("retries".to_owned(), n(record.retries)),
            ("client_ip".to_owned(), s(&record.client_ip)),
            (TTL_ATTRIBUTE.to_owned(), n(expires)),
        ]);
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
        let mut items = vec![
            TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(self.table())
                        .set_item(Some(log))
                        .condition_expression("attribute_not_exists(pk)")
                        .build()?,
                )
                .build(),
        ];

        if with_key {
            let (expression, mut values) = counters_update(
                record,
                &[("tokens_used", usage.billed())],
                "last_used_at = :at, first_used_at = if_not_exists(first_used_at, :at)",
            );
            values.insert(":at".into(), s(&at));
            // The key may have been deleted meanwhile: then this item fails
            // its condition and settle retries without it.
            items.push(transact_update(
                self.counters_update(&pk, "META".into(), expression, values)
                    .condition_expression("attribute_exists(pk)"),
            )?);
        }

        // The day item is also indexed by day, for the all-keys admin view.
        let (expression, mut values) = counters_update(
            record,
            &[],
            "gsi1pk = :gpk, gsi1sk = :gsk, key_id = :kid, #day = :day, first_at = if_not_exists(first_at, :at), last_at = :at",
        );
        values.insert(":gpk".into(), s(format!("DAY#{day}")));
        values.insert(":gsk".into(), s(&pk));
        values.insert(":kid".into(), s(record.key_id.as_str()));
        values.insert(":day".into(), s(&day));
        values.insert(":at".into(), s(&at));
        items.push(transact_update(
            self.counters_update(&pk, format!("DAY#{day}"), expression, values)
                .expression_attribute_names("#day", "day"),
        )?);

        let model = record.model.as_deref().unwrap_or("unknown");
        let (expression, mut values) = counters_update(
            record,
            &[],
            "model = :model, first_at = if_not_exists(first_at, :at), last_at = :at",
        );
        values.insert(":model".into(), s(model));
        values.insert(":at".into(), s(&at));
        items.push(transact_update(self.counters_update(
            &pk,
            format!("MODEL#{model}"),
            expression,
            values,
        ))?);
        Ok(items)
    }

    /// One counters update of the settle transaction (key, day or model
    /// item); the caller adds its condition or attribute names.
    fn counters_update(
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

fn transact_update(update: UpdateBuilder) -> Result<TransactWriteItem, StoreError> {
    Ok(TransactWriteItem::builder().update(update.build()?).build())
}
