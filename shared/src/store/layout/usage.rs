//! What settlement writes under a key: usage-log rows (`LOG#<at>#<request
//! id>`, also under `gsi1` `LOG#<key>#<model>`), and the counters the key,
//! day (`DAY#<day>`), model (`MODEL#<model>`) and session
//! (`SESSION#<session id>`, also under `gsi1` `SESSIONS#<key>`) items share;
//! the updates that add to those counters, and the queries and readers of
//! `store::usage_log`.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use time::OffsetDateTime;

use super::super::StoreError;
use super::super::item::{Item, get_n, get_s, get_signed, n, opt_n, opt_s, s};
use super::super::owned::BatchRecord;
use super::super::usage_log::{DayUsage, LogRow, SessionUsage};
use super::{
    Change, GSI1PK, GSI1SK, ItemKey, TTL_ATTRIBUTE, created_sort_key, day_index, log_model_index,
    sessions_index, usage_log,
};
use crate::domain::format_timestamp;
use crate::domain::key::KeyId;
#[cfg(doc)]
use crate::domain::usage::UNKNOWN_MODEL;
use crate::domain::usage::{
    AgentId, AgentType, ClassTotals, Counters, RequestClass, SessionId, TokenUsage, UsageRecord,
    UsageTotals,
};

/// The counters kept per key, day, model and session, named alike
/// everywhere (signed: what caching saved may be negative).
pub(crate) fn counter_values(counters: &Counters) -> [(&'static str, i128); 11] {
    let usage = &counters.usage;
    let count = i128::from;
    [
        ("requests", count(counters.requests)),
        ("cost_micro_usd", count(counters.cost_micro_usd)),
        (
            "cache_saved_micro_usd",
            i128::from(counters.cache_saved_micro_usd),
        ),
        ("input_tokens", count(usage.input_tokens)),
        ("output_tokens", count(usage.output_tokens)),
        (
            "cache_creation_input_tokens",
            count(usage.cache_creation_input_tokens),
        ),
        (
            "cache_creation_5m_input_tokens",
            count(usage.cache_creation_5m),
        ),
        (
            "cache_creation_1h_input_tokens",
            count(usage.cache_creation_1h),
        ),
        (
            "cache_read_input_tokens",
            count(usage.cache_read_input_tokens),
        ),
        ("estimated_requests", count(counters.estimated_requests)),
        ("error_requests", count(counters.error_requests)),
    ]
}

/// The counters of a key, day or model item.
pub(crate) fn totals_of(item: &Item) -> Result<UsageTotals, StoreError> {
    Ok(UsageTotals {
        requests: get_n(item, "requests")?,
        input_tokens: get_n(item, "input_tokens")?,
        output_tokens: get_n(item, "output_tokens")?,
        cache_creation_input_tokens: get_n(item, "cache_creation_input_tokens")?,
        cache_read_input_tokens: get_n(item, "cache_read_input_tokens")?,
        // Counted since prices exist: older items have none (read as 0).
        cache_creation_5m_input_tokens: get_n(item, "cache_creation_5m_input_tokens")?,
        cache_creation_1h_input_tokens: get_n(item, "cache_creation_1h_input_tokens")?,
        cost_micro_usd: opt_n(item, "cost_micro_usd")?.unwrap_or(0),
        cache_saved_micro_usd: get_signed(item, "cache_saved_micro_usd")?,
        estimated_requests: get_n(item, "estimated_requests")?,
        error_requests: get_n(item, "error_requests")?,
    })
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
    for (name, value) in counter_values(counters) {
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

/// The day aggregate `day`'s share of a settlement at `at`; also indexes
/// it under `gsi1` by day, for the all-keys view.
pub(crate) fn day_settlement(
    key_id: &KeyId,
    item: &ItemKey,
    day: &str,
    counters: &Counters,
    at: OffsetDateTime,
    upstream: Option<&UpstreamServed<'_>>,
) -> Change {
    let (mut expression, mut values) = counters_update(
        counters,
        &[],
        "gsi1pk = :gpk, gsi1sk = :gsk, key_id = :kid, #day = :day, first_at = if_not_exists(first_at, :at), last_at = :at",
    );
    values.insert(":gpk".into(), s(day_index(day)));
    values.insert(":gsk".into(), s(&item.pk));
    values.insert(":kid".into(), s(key_id.as_str()));
    values.insert(":day".into(), s(day));
    values.insert(":at".into(), s(format_timestamp(at)));
    let mut names = HashMap::from([("#day".to_owned(), "day".to_owned())]);
    // The day's traffic per upstream, for `/admin/upstreams`: counters on
    // the item the settlement writes anyway (its `ADD` clause comes first).
    if let Some(served) = upstream {
        let (add, rest) = expression
            .split_once(" SET ")
            .map_or((expression.as_str(), ""), |(add, rest)| (add, rest));
        let mut add = add.to_owned();
        values.insert(":up_one".into(), n(1));
        names.insert("#upr".into(), upstream_attribute(served.name, "requests"));
        add.push_str(", #upr :up_one");
        if served.failed {
            names.insert("#upe".into(), upstream_attribute(served.name, "errors"));
            add.push_str(", #upe :up_one");
        }
        expression = format!("{add} SET {rest}");
    }
    Change {
        expression,
        names: Some(names),
        values,
    }
}

/// The upstream that answered a settled request, and whether its answer
/// was an error.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamServed<'a> {
    pub name: &'a str,
    pub failed: bool,
}

/// A day item's traffic counters per upstream are top-level attributes
/// `upstream|<name>|requests` and `…|errors` (names are an admin's, of a
/// safe charset).
const UPSTREAM_PREFIX: &str = "upstream|";

fn upstream_attribute(name: &str, counter: &str) -> String {
    format!("{UPSTREAM_PREFIX}{name}|{counter}")
}

/// Adds one day item's traffic counters to `traffic`, by upstream.
pub(crate) fn add_upstream_traffic(
    item: &Item,
    traffic: &mut std::collections::BTreeMap<String, super::super::usage_log::UpstreamTraffic>,
) {
    for name in item.keys() {
        let Some((upstream, counter)) = name
            .strip_prefix(UPSTREAM_PREFIX)
            .and_then(|rest| rest.rsplit_once('|'))
        else {
            continue;
        };
        let value = get_n(item, name).unwrap_or(0);
        let entry = traffic.entry(upstream.to_owned()).or_default();
        match counter {
            "requests" => entry.requests += value,
            "errors" => entry.errors += value,
            _ => {}
        }
    }
}

/// A day or session item's counters per request class are top-level
/// attributes `class|<bucket>|<counter>`, the bucket one of
/// `RequestClass::BUCKETS` (never what the client sent), the counter one
/// of [`BUCKET_COUNTERS`]. Only the counters a request adds to are
/// written (no zero `ADD`s), and only six per class: the items stay small,
/// since every settlement rewrites them and pays by their size.
const CLASS_PREFIX: &str = "class|";

/// A day item's counters per model are top-level attributes
/// `model|<model id>|<counter>`, alike: the model served and billed (an
/// alias counts as its real model), [`UNKNOWN_MODEL`] for requests that
/// named none (as the model aggregates name them), [`OTHER_MODELS`] for a
/// batch's models past [`MAX_DAY_MODELS`]. Model ids are checked before
/// anything is forwarded (`model_name_problem`: at most 256 of
/// `[A-Za-z0-9-._:@/[]]`), so `|` never occurs in one.
///
/// What they cost: a model's six counters take about 0.28 KB of the day
/// item with a dated id (`claude-sonnet-4-5-20250929`: 6 names of 33 bytes
/// plus the counters' own 54, and the numbers), zeros left out. A day item
/// with one request class and one upstream is about 0.6 KB before them, so
/// with N models it is about 0.6 + 0.28·N KB: 1 write unit (2 in the
/// settle transaction) for one model, 2 (4) for two to five models, 3 (6)
/// for six to eight. Every settlement of the key that day pays by that size.
const MODEL_PREFIX: &str = "model|";

/// The model bucket of a batch's models past the first
/// [`MAX_DAY_MODELS`] − 1 (parentheses: never a model id's).
pub(crate) const OTHER_MODELS: &str = "(other)";

/// Most model buckets one update adds to: a batch may name many models,
/// and DynamoDB refuses an update expression over 4 KB (the day's own
/// update is about 0.9 KB, each model's adds about 80 bytes).
pub(crate) const MAX_DAY_MODELS: usize = 24;

/// The counters kept per request class and per model, as they end
/// attribute names.
const BUCKET_COUNTERS: [&str; 6] = [
    "requests",
    "input",
    "output",
    "cache_write",
    "cache_read",
    "cost_micro_usd",
];

fn bucket_attribute(prefix: &str, bucket: &str, counter: &str) -> String {
    format!("{prefix}{bucket}|{counter}")
}

fn bucket_values(totals: &ClassTotals) -> [u64; 6] {
    [
        totals.requests,
        totals.input_tokens,
        totals.output_tokens,
        totals.cache_creation_input_tokens,
        totals.cache_read_input_tokens,
        totals.cost_micro_usd,
    ]
}

fn totals_from_values(values: [u64; 6]) -> ClassTotals {
    let [
        requests,
        input_tokens,
        output_tokens,
        cache_creation_input_tokens,
        cache_read_input_tokens,
        cost_micro_usd,
    ] = values;
    ClassTotals {
        requests,
        input_tokens,
        output_tokens,
        cache_creation_input_tokens,
        cache_read_input_tokens,
        cost_micro_usd,
    }
}

/// The `(attribute, value)` adds of `totals` under `prefix` and
/// `bucket`, zeros left out.
fn bucket_adds(prefix: &str, bucket: &str, totals: &ClassTotals) -> Vec<(String, u64)> {
    BUCKET_COUNTERS
        .iter()
        .zip(bucket_values(totals))
        .filter(|(_, value)| *value > 0)
        .map(|(counter, value)| (bucket_attribute(prefix, bucket, counter), value))
        .collect()
}

/// `change` (a day or session settlement, whose `ADD` clause comes first)
/// with `adds` spliced into its `ADD` clause, as placeholders
/// `#<tag><n>` / `:<tag><n>`: no write of its own.
fn with_adds(mut change: Change, tag: &str, adds: Vec<(String, u64)>) -> Change {
    let (add, rest) = change
        .expression
        .split_once(" SET ")
        .map_or((change.expression.as_str(), None), |(add, rest)| {
            (add, Some(rest))
        });
    let mut add = add.to_owned();
    let names = change.names.get_or_insert_with(HashMap::new);
    for (index, (attribute, value)) in adds.into_iter().enumerate() {
        names.insert(format!("#{tag}{index}"), attribute);
        change.values.insert(format!(":{tag}{index}"), n(value));
        add.push_str(&format!(", #{tag}{index} :{tag}{index}"));
    }
    change.expression = match rest {
        Some(rest) => format!("{add} SET {rest}"),
        None => add,
    };
    if change.names.as_ref().is_some_and(HashMap::is_empty) {
        change.names = None;
    }
    change
}

/// `change` (a day or session settlement, whose `ADD` clause comes first)
/// with `counters` also added to request-class `bucket`'s counters on the
/// same item: no write of its own.
pub(crate) fn with_class_counters(change: Change, bucket: &str, counters: &Counters) -> Change {
    let adds = bucket_adds(CLASS_PREFIX, bucket, &ClassTotals::of(counters));
    with_adds(change, "rc", adds)
}

/// `change` (a day settlement) with each model's share also added to that
/// model's counters on the same item: no write of its own. Models past
/// the first [`MAX_DAY_MODELS`] − 1 count together as [`OTHER_MODELS`].
pub(crate) fn with_model_counters(change: Change, models: &[(&str, ClassTotals)]) -> Change {
    let mut buckets: Vec<(&str, ClassTotals)> = Vec::with_capacity(models.len());
    for (index, (model, totals)) in models.iter().enumerate() {
        if models.len() <= MAX_DAY_MODELS || index + 1 < MAX_DAY_MODELS {
            buckets.push((model, *totals));
        } else if let Some((OTHER_MODELS, other)) = buckets.last_mut() {
            other.add(totals);
        } else {
            buckets.push((OTHER_MODELS, *totals));
        }
    }
    let adds = buckets
        .iter()
        .flat_map(|(model, totals)| bucket_adds(MODEL_PREFIX, model, totals))
        .collect();
    with_adds(change, "m", adds)
}

/// One item's per-class counters, by bucket in `RequestClass::BUCKETS`
/// order (buckets it never counted left out).
pub(crate) fn class_totals(item: &Item) -> Result<Vec<(&'static str, ClassTotals)>, StoreError> {
    let mut by_class = Vec::new();
    for bucket in RequestClass::BUCKETS {
        let mut values = [0; 6];
        let mut counted = false;
        for (value, counter) in values.iter_mut().zip(BUCKET_COUNTERS) {
            if let Some(number) = opt_n(item, &bucket_attribute(CLASS_PREFIX, bucket, counter))? {
                *value = number;
                counted = true;
            }
        }
        if counted {
            by_class.push((bucket, totals_from_values(values)));
        }
    }
    Ok(by_class)
}

/// A day item's per-model counters, by model id (ascending; models it
/// never counted left out, and so are attributes of counters not kept).
pub(crate) fn model_day_totals(item: &Item) -> Result<Vec<(String, ClassTotals)>, StoreError> {
    let mut by_model = std::collections::BTreeMap::<&str, [u64; 6]>::new();
    for name in item.keys() {
        let Some((model, counter)) = name
            .strip_prefix(MODEL_PREFIX)
            .and_then(|rest| rest.rsplit_once('|'))
        else {
            continue;
        };
        let Some(position) = BUCKET_COUNTERS.iter().position(|c| *c == counter) else {
            continue;
        };
        by_model.entry(model).or_default()[position] = get_n(item, name)?;
    }
    Ok(by_model
        .into_iter()
        .map(|(model, values)| (model.to_owned(), totals_from_values(values)))
        .collect())
}

/// A model aggregate's share of a settlement at `at`.
pub(crate) fn model_settlement(model: &str, counters: &Counters, at: OffsetDateTime) -> Change {
    let (expression, mut values) = counters_update(
        counters,
        &[],
        "model = :model, first_at = if_not_exists(first_at, :at), last_at = :at",
    );
    values.insert(":model".into(), s(model));
    values.insert(":at".into(), s(format_timestamp(at)));
    Change {
        expression,
        names: None,
        values,
    }
}

/// A session aggregate's share of a settlement at `at`, kept until
/// `expires` (epoch seconds, pushed back by every settlement); indexed
/// under `gsi1` by its last use, most recent first.
pub(crate) fn session_settlement(
    key_id: &KeyId,
    session: &SessionId,
    counters: &Counters,
    at: OffsetDateTime,
    expires: u64,
) -> Change {
    let (expression, mut values) = counters_update(
        counters,
        &[],
        "gsi1pk = :gpk, gsi1sk = :gsk, session_id = :sid, first_at = if_not_exists(first_at, :at), last_at = :at, #ttl = :ttl",
    );
    let at = format_timestamp(at);
    values.insert(":gpk".into(), s(sessions_index(key_id)));
    values.insert(":gsk".into(), s(created_sort_key(&at, session.as_str())));
    values.insert(":sid".into(), s(session.as_str()));
    values.insert(":at".into(), s(at));
    values.insert(":ttl".into(), n(expires));
    Change {
        expression,
        // `ttl` is a DynamoDB reserved word.
        names: Some(HashMap::from([(
            "#ttl".to_owned(),
            TTL_ATTRIBUTE.to_owned(),
        )])),
        values,
    }
}

impl TryFrom<&Item> for SessionUsage {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        Ok(SessionUsage {
            session_id: get_s(item, "session_id")?.to_owned(),
            first_used_at: get_s(item, "first_at")?.to_owned(),
            last_used_at: get_s(item, "last_at")?.to_owned(),
            totals: totals_of(item)?,
            by_class: class_totals(item)?,
        })
    }
}

/// Key condition: a key's aggregates (partition `:pk`) sorted `:low..=:high`.
pub(crate) const AGGREGATES_BETWEEN: &str = "pk = :pk AND sk BETWEEN :low AND :high";
/// Key condition: a key's log rows (partition `:p`) sorted `:low..=:high`.
pub(crate) const LOGS_BETWEEN: &str = "pk = :p AND sk BETWEEN :low AND :high";
/// Key condition: a key's log rows for one model (`gsi1` partition `:p`)
/// sorted `:low..=:high`.
pub(crate) const MODEL_LOGS_BETWEEN: &str = "gsi1pk = :p AND gsi1sk BETWEEN :low AND :high";

/// A model aggregate's model and counters.
pub(crate) fn model_totals(item: &Item) -> Result<(String, UsageTotals), StoreError> {
    Ok((get_s(item, "model")?.to_owned(), totals_of(item)?))
}

impl TryFrom<&Item> for DayUsage {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        Ok(DayUsage {
            day: get_s(item, "day")?.to_owned(),
            key_id: get_s(item, "key_id")?.to_owned(),
            totals: totals_of(item)?,
            by_model: model_day_totals(item)?,
        })
    }
}

/// The token columns of a usage-log item.
fn token_columns(usage: &TokenUsage) -> [(String, AttributeValue); 6] {
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

/// The cost columns of a usage-log item.
fn cost_columns(micro_usd: u64, saved: i64, unpriced: bool) -> [(String, AttributeValue); 3] {
    [
        ("cost_micro_usd".to_owned(), n(micro_usd)),
        ("cache_saved_micro_usd".to_owned(), n(saved)),
        ("unpriced".to_owned(), AttributeValue::Bool(unpriced)),
    ]
}

/// What a batch's log row says of its figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogFlags {
    /// Usage estimated, not read off the results.
    pub estimated: bool,
    /// A model had no price of its own: charged the fallback.
    pub unpriced: bool,
}

/// The log row's key, plus its `gsi1` key when it names a model: indexed
/// by key and model, so a model-filtered log page reads only what it
/// returns.
fn log_row_base(key: &KeyId, at: OffsetDateTime, request_id: &str, model: Option<&str>) -> Item {
    let row = usage_log(key, at, request_id);
    let mut item = row.item();
    if let Some(model) = model {
        item.insert("model".into(), s(model));
        item.insert(GSI1PK.into(), s(log_model_index(key, model)));
        item.insert(GSI1SK.into(), s(row.sk));
    }
    item
}

/// The usage-log row of one request, kept until `expires` (epoch seconds).
pub(crate) fn request_log_item(record: &UsageRecord, expires: u64) -> Item {
    let mut log = log_row_base(
        &record.key_id,
        record.at,
        &record.request_id,
        record.model.as_deref(),
    );
    log.extend([
        ("request_id".to_owned(), s(&record.request_id)),
        ("key_id".to_owned(), s(record.key_id.as_str())),
        ("at".to_owned(), s(format_timestamp(record.at))),
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
    log.extend(token_columns(&record.usage));
    log.extend(cost_columns(
        record.cost.micro_usd,
        record.cost.saved_micro_usd,
        record.cost.unpriced,
    ));
    let optional = [
        ("user_agent", record.user_agent.as_deref()),
        ("session_id", record.session_id.as_deref()),
        (
            "agent_id",
            record.attribution.agent_id.as_ref().map(AgentId::as_str),
        ),
        (
            "parent_agent_id",
            record
                .attribution
                .parent_agent_id
                .as_ref()
                .map(AgentId::as_str),
        ),
        (
            "request_class",
            record.attribution.request_class.map(RequestClass::name),
        ),
        (
            "agent_type",
            record
                .attribution
                .agent_type
                .as_ref()
                .map(AgentType::as_str),
        ),
        ("error_type", record.error_type.as_deref()),
        ("upstream", record.upstream.as_deref()),
        ("requested_model", record.requested_model.as_deref()),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            log.insert(name.into(), s(value));
        }
    }
    if let Some(ttfb) = record.ttfb_ms {
        log.insert("ttfb_ms".into(), n(ttfb));
    }
    log
}

/// The request id of a batch's usage-log row.
pub(crate) fn batch_log_request_id(batch_id: &str) -> String {
    format!("batch_{batch_id}")
}

/// The usage-log row of a whole batch (kind `batch`), settled at `at`
/// with `counters`, naming its model when it used only one.
pub(crate) fn batch_log_item(
    batch: &BatchRecord,
    at: OffsetDateTime,
    counters: &Counters,
    flags: LogFlags,
    model: Option<&str>,
    expires: u64,
) -> Item {
    let LogFlags {
        estimated,
        unpriced,
    } = flags;
    let request_id = batch_log_request_id(&batch.batch_id);
    let mut log = log_row_base(&batch.key_id, at, &request_id, model);
    log.extend([
        ("request_id".to_owned(), s(&request_id)),
        ("kind".to_owned(), s("batch")),
        ("batch_id".to_owned(), s(&batch.batch_id)),
        ("requests".to_owned(), n(counters.requests)),
        ("key_id".to_owned(), s(batch.key_id.as_str())),
        ("at".to_owned(), s(format_timestamp(at))),
        ("method".to_owned(), s("POST")),
        ("path".to_owned(), s("/v1/messages/batches")),
        ("status".to_owned(), n(200)),
        ("stream".to_owned(), AttributeValue::Bool(false)),
        ("estimated".to_owned(), AttributeValue::Bool(estimated)),
        ("latency_ms".to_owned(), n(0)),
        ("retries".to_owned(), n(0)),
        ("client_ip".to_owned(), s(&batch.client_ip)),
        (TTL_ATTRIBUTE.to_owned(), n(expires)),
    ]);
    log.extend(token_columns(&counters.usage));
    log.extend(cost_columns(
        counters.cost_micro_usd,
        counters.cache_saved_micro_usd,
        unpriced,
    ));
    log
}

impl TryFrom<&Item> for LogRow {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        let flag = |name: &str| matches!(item.get(name), Some(AttributeValue::Bool(true)));
        let owned = |v: Option<&str>| v.map(str::to_owned);
        Ok(LogRow {
            kind: opt_s(item, "kind")?.unwrap_or("message").to_owned(),
            batch_id: owned(opt_s(item, "batch_id")?),
            requests: opt_n(item, "requests")?.unwrap_or(1),
            request_id: get_s(item, "request_id")?.to_owned(),
            at: get_s(item, "at")?.to_owned(),
            model: owned(opt_s(item, "model")?),
            method: get_s(item, "method")?.to_owned(),
            path: get_s(item, "path")?.to_owned(),
            status: get_n(item, "status")?,
            stream: flag("stream"),
            input_tokens: get_n(item, "input_tokens")?,
            output_tokens: get_n(item, "output_tokens")?,
            cache_creation_input_tokens: get_n(item, "cache_creation_input_tokens")?,
            cache_read_input_tokens: get_n(item, "cache_read_input_tokens")?,
            cache_creation_5m_input_tokens: get_n(item, "cache_creation_5m_input_tokens")?,
            cache_creation_1h_input_tokens: get_n(item, "cache_creation_1h_input_tokens")?,
            estimated: flag("estimated"),
            latency_ms: get_n(item, "latency_ms")?,
            ttfb_ms: opt_n(item, "ttfb_ms")?,
            retries: get_n(item, "retries")?,
            client_ip: get_s(item, "client_ip")?.to_owned(),
            user_agent: owned(opt_s(item, "user_agent")?),
            session_id: owned(opt_s(item, "session_id")?),
            agent_id: owned(opt_s(item, "agent_id")?),
            parent_agent_id: owned(opt_s(item, "parent_agent_id")?),
            request_class: owned(opt_s(item, "request_class")?),
            agent_type: owned(opt_s(item, "agent_type")?),
            error_type: owned(opt_s(item, "error_type")?),
            upstream: owned(opt_s(item, "upstream")?),
            requested_model: owned(opt_s(item, "requested_model")?),
            cost_micro_usd: opt_n(item, "cost_micro_usd")?.unwrap_or(0),
            cache_saved_micro_usd: get_signed(item, "cache_saved_micro_usd")?,
            unpriced: flag("unpriced"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::{AgentId, AgentType, Attribution};

    fn record(attribution: Attribution) -> UsageRecord {
        UsageRecord {
            request_id: "req_1".into(),
            key_id: KeyId::parse("abcdefABCDEF").unwrap(),
            at: crate::domain::parse_timestamp("2026-01-02T03:04:05.006Z").unwrap(),
            model: Some("claude-sonnet-4-5".into()),
            requested_model: None,
            method: "POST".into(),
            path: "/v1/messages".into(),
            status: 200,
            stream: true,
            usage: TokenUsage::default(),
            estimated: false,
            latency_ms: 1,
            ttfb_ms: None,
            retries: 0,
            client_ip: "127.0.0.1".into(),
            user_agent: None,
            session_id: Some("s-1".into()),
            attribution,
            error_type: None,
            upstream: None,
            cost: Default::default(),
            budget: Default::default(),
        }
    }

    #[test]
    fn a_log_row_reads_back_the_attribution_it_was_written_with() {
        let attribution = Attribution {
            agent_id: AgentId::parse("agent-1"),
            parent_agent_id: AgentId::parse("agent-0"),
            request_class: RequestClass::parse("no-such-class"),
            agent_type: AgentType::parse("general-purpose"),
        };
        let item = request_log_item(&record(attribution), 1);
        let row = LogRow::try_from(&item).unwrap();
        assert_eq!(row.agent_id.as_deref(), Some("agent-1"));
        assert_eq!(row.parent_agent_id.as_deref(), Some("agent-0"));
        // An unknown class is stored under its bucket's name, not as sent.
        assert_eq!(row.request_class.as_deref(), Some("other"));
        assert_eq!(row.agent_type.as_deref(), Some("general-purpose"));
    }

    #[test]
    fn a_log_row_without_attribution_writes_none_of_its_attributes() {
        let item = request_log_item(&record(Attribution::default()), 1);
        for name in ["agent_id", "parent_agent_id", "request_class", "agent_type"] {
            assert!(!item.contains_key(name), "{name}");
        }
        let row = LogRow::try_from(&item).unwrap();
        assert_eq!(
            (
                row.agent_id,
                row.parent_agent_id,
                row.request_class,
                row.agent_type
            ),
            (None, None, None, None)
        );
    }

    /// What DynamoDB makes of `change`'s `ADD #rcN :rcN` clauses on an item
    /// that had no class counters.
    fn apply_class_adds(change: &Change, item: &mut Item) {
        apply_adds(change, "#rc", item);
    }

    /// What DynamoDB makes of `change`'s `ADD <tag>N :…N` clauses on an
    /// item, adding to what it holds.
    fn apply_adds(change: &Change, tag: &str, item: &mut Item) {
        let names = change.names.clone().unwrap_or_default();
        for (placeholder, attribute) in names.iter().filter(|(p, _)| {
            p.strip_prefix(tag)
                .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit()))
        }) {
            let value = format!(":{}", &placeholder[1..]);
            assert!(
                change
                    .expression
                    .split(" SET ")
                    .next()
                    .unwrap()
                    .contains(&format!("{placeholder} {value}")),
                "{placeholder} is added in the ADD clause: {}",
                change.expression
            );
            let held = opt_n(item, attribute).unwrap().unwrap_or(0);
            let added: u64 = match &change.values[&value] {
                AttributeValue::N(number) => number.parse().unwrap(),
                other => panic!("{other:?}"),
            };
            item.insert(attribute.clone(), n(held + added));
        }
    }

    fn share(requests: u64, input: u64, output: u64, cache_read: u64, cost: u64) -> ClassTotals {
        ClassTotals {
            requests,
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: cache_read,
            cost_micro_usd: cost,
        }
    }

    #[test]
    fn model_counters_ride_on_the_day_update_and_read_back_by_model() {
        let key = KeyId::parse("abcdefABCDEF").unwrap();
        let at = crate::domain::parse_timestamp("2026-01-02T03:04:05.006Z").unwrap();
        let day_item = super::super::day(&key, "2026-01-02");
        let plain = day_settlement(
            &key,
            &day_item,
            "2026-01-02",
            &Counters::default(),
            at,
            None,
        );
        let set_clause = plain.expression.split_once(" SET ").unwrap().1.to_owned();
        let opus = "claude-opus-4-5-20251101";
        let sonnet = "us.anthropic.claude-sonnet-4-5-v1:0[1m]";
        let first = with_model_counters(
            with_class_counters(plain, "main", &Counters::default()),
            &[(sonnet, share(1, 10, 20, 0, 300))],
        );
        assert!(first.expression.ends_with(&format!(" SET {set_clause}")));
        let mut item = Item::new();
        apply_adds(&first, "#m", &mut item);
        // Zero counters are not added: four of six.
        assert_eq!(item.len(), 4);
        assert!(item.contains_key(&format!("model|{sonnet}|requests")));
        // A second settlement, with two models (a batch), adds to the first.
        let second = with_model_counters(
            day_settlement(
                &key,
                &day_item,
                "2026-01-02",
                &Counters::default(),
                at,
                None,
            ),
            &[
                (opus, share(2, 5, 6, 7, 1000)),
                (sonnet, share(1, 1, 1, 1, 1)),
            ],
        );
        apply_adds(&second, "#m", &mut item);
        // A foreign attribute of the prefix, or a counter not kept, is not read.
        item.insert("model|x|bogus".into(), n(5));
        item.insert("model".into(), s("not a counter"));
        assert_eq!(
            model_day_totals(&item).unwrap(),
            [
                (opus.to_owned(), share(2, 5, 6, 7, 1000)),
                (sonnet.to_owned(), share(2, 11, 21, 1, 301)),
            ]
        );
        // And a DayUsage reads them with the day's own counters.
        item.extend([
            ("day".to_owned(), s("2026-01-02")),
            ("key_id".to_owned(), s("abcdefABCDEF")),
            ("requests".to_owned(), n(4)),
        ]);
        let day = DayUsage::try_from(&item).unwrap();
        assert_eq!((day.day.as_str(), day.totals.requests), ("2026-01-02", 4));
        assert_eq!(day.by_model.len(), 2);
    }

    #[test]
    fn a_batch_of_many_models_fits_one_update_and_keeps_its_sums() {
        let key = KeyId::parse("abcdefABCDEF").unwrap();
        let at = crate::domain::parse_timestamp("2026-01-02T03:04:05.006Z").unwrap();
        let day_item = super::super::day(&key, "2026-01-02");
        let every = Counters {
            requests: 1,
            usage: TokenUsage {
                input_tokens: 1,
                output_tokens: 1,
                cache_creation_input_tokens: 1,
                cache_read_input_tokens: 1,
                cache_creation_5m: 1,
                cache_creation_1h: 1,
            },
            cost_micro_usd: 1,
            cache_saved_micro_usd: 1,
            estimated_requests: 1,
            error_requests: 1,
        };
        let names: Vec<String> = (0..30).map(|i| format!("model-{i:02}")).collect();
        let full = ClassTotals::of(&every);
        let models: Vec<(&str, ClassTotals)> = names.iter().map(|m| (m.as_str(), full)).collect();
        // The longest day update: an upstream that failed, a class, and
        // every counter of 30 models counted.
        let served = UpstreamServed {
            name: "main",
            failed: true,
        };
        let change = day_settlement(&key, &day_item, "2026-01-02", &every, at, Some(&served));
        let change = with_class_counters(change, "subagent", &every);
        let change = with_model_counters(change, &models);
        assert!(
            change.expression.len() <= 4096,
            "{} bytes",
            change.expression.len()
        );
        let mut item = Item::new();
        apply_adds(&change, "#m", &mut item);
        let by_model = model_day_totals(&item).unwrap();
        // 23 models of their own, the other 7 together.
        assert_eq!(by_model.len(), MAX_DAY_MODELS);
        assert_eq!(
            by_model.iter().find(|(model, _)| model == OTHER_MODELS),
            Some(&(OTHER_MODELS.to_owned(), share_of(7, &full)))
        );
        let requests: u64 = by_model.iter().map(|(_, totals)| totals.requests).sum();
        assert_eq!(requests, 30);
    }

    fn share_of(times: u64, one: &ClassTotals) -> ClassTotals {
        let mut sum = ClassTotals::default();
        for _ in 0..times {
            sum.add(one);
        }
        sum
    }

    #[test]
    fn class_counters_ride_on_the_day_update_and_read_back_by_bucket() {
        let key = KeyId::parse("abcdefABCDEF").unwrap();
        let at = crate::domain::parse_timestamp("2026-01-02T03:04:05.006Z").unwrap();
        let day_item = super::super::day(&key, "2026-01-02");
        let counters = Counters {
            requests: 1,
            usage: TokenUsage {
                input_tokens: 10,
                output_tokens: 20,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: 40,
                ..TokenUsage::default()
            },
            cost_micro_usd: 1234,
            ..Counters::default()
        };
        let plain = day_settlement(&key, &day_item, "2026-01-02", &counters, at, None);
        let set_clause = plain.expression.split_once(" SET ").unwrap().1.to_owned();
        let change = with_class_counters(plain, "compaction", &counters);
        // The day's own update is unchanged around the added counters.
        assert!(change.expression.ends_with(&format!(" SET {set_clause}")));
        let mut item = Item::new();
        apply_class_adds(&change, &mut item);
        // A zero counter is not added: the item stays small.
        assert!(!item.contains_key("class|compaction|cache_write"));
        assert_eq!(item.len(), 5);
        assert_eq!(
            class_totals(&item).unwrap(),
            [(
                "compaction",
                ClassTotals {
                    requests: 1,
                    input_tokens: 10,
                    output_tokens: 20,
                    cache_creation_input_tokens: 0,
                    cache_read_input_tokens: 40,
                    cost_micro_usd: 1234,
                }
            )]
        );
    }

    #[test]
    fn class_counters_of_an_update_without_names_or_set_clause_still_apply() {
        let counters = Counters {
            requests: 1,
            ..Counters::default()
        };
        let bare = Change {
            expression: "ADD requests :requests".into(),
            names: None,
            values: Item::new(),
        };
        let change = with_class_counters(bare, UNCLASSIFIED_BUCKET, &counters);
        assert_eq!(change.expression, "ADD requests :requests, #rc0 :rc0");
        let mut item = Item::new();
        apply_class_adds(&change, &mut item);
        assert_eq!(
            class_totals(&item).unwrap(),
            [(
                "unclassified",
                ClassTotals {
                    requests: 1,
                    ..ClassTotals::default()
                }
            )]
        );
        // Nothing counted adds nothing, and no empty names map.
        let idle = with_class_counters(
            Change {
                expression: "ADD requests :requests".into(),
                names: None,
                values: Item::new(),
            },
            "main",
            &Counters::default(),
        );
        assert_eq!(idle.expression, "ADD requests :requests");
        assert!(idle.names.is_none());
    }

    #[test]
    fn buckets_read_back_in_their_listed_order_and_foreign_attributes_are_ignored() {
        let mut item = Item::new();
        item.insert("class|unclassified|requests".into(), n(3));
        item.insert("class|main|requests".into(), n(2));
        item.insert("class|subagent|output".into(), n(7));
        // Not a bucket: never written, and not read.
        item.insert("class|evil|requests".into(), n(99));
        item.insert("requests".into(), n(6));
        let buckets: Vec<(&str, u64, u64)> = class_totals(&item)
            .unwrap()
            .into_iter()
            .map(|(bucket, totals)| (bucket, totals.requests, totals.output_tokens))
            .collect();
        assert_eq!(
            buckets,
            [("main", 2, 0), ("subagent", 0, 7), ("unclassified", 3, 0)]
        );
    }

    const UNCLASSIFIED_BUCKET: &str = crate::domain::usage::UNCLASSIFIED;
}
