//! The API key item (`KEY#<id>` / `META`): the key's record, its rate
//! window and the counters settlement adds to it; and the expressions on
//! it: the admission update (`store::admission`), an admin's patch and
//! rotation (`store::api_keys`), a settlement's counters and a reservation
//! given back (`store::settlement`, `store::owned`).

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;
use time::OffsetDateTime;

use super::super::StoreError;
use super::super::item::{
    Item, get_bool, get_list, get_n, get_s, get_signed, invalid, list, n, opt_n, opt_s, s,
};
use super::super::usage_log::KeyUsage;
use super::{Change, GSI1PK, GSI1SK, KEYS_INDEX, api_key, created_sort_key};
use crate::domain::admission::{AdmissionWrite, QuotaRule, RateLimit, WindowStep};
use crate::domain::budget::{
    BudgetCharge, DollarLimit, FIVE_HOURS, FiveHourStep, SpendCounter, Window,
};
use crate::domain::flight::{Flight, Reservation};
use crate::domain::key::{ApiKeyRecord, KeyChanges, KeyId, LimitMode, SecretHash};
use crate::domain::price::MicroUsd;
use crate::domain::usage::Counters;
use crate::domain::{format_timestamp, parse_timestamp};

impl TryFrom<&Item> for ApiKeyRecord {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        let timestamp = |name: &str| -> Result<OffsetDateTime, StoreError> {
            parse_timestamp(get_s(item, name)?).ok_or_else(|| invalid(item, name))
        };
        Ok(ApiKeyRecord {
            id: KeyId::parse(get_s(item, "id")?).ok_or_else(|| invalid(item, "id"))?,
            name: get_s(item, "name")?.to_owned(),
            description: opt_s(item, "description")?.map(str::to_owned),
            prefix: get_s(item, "prefix")?.to_owned(),
            secret_hash: SecretHash::from_hex(get_s(item, "secret_hash")?)
                .ok_or_else(|| invalid(item, "secret_hash"))?,
            is_active: get_bool(item, "is_active")?,
            created_at: timestamp("created_at")?,
            updated_at: timestamp("updated_at")?,
            expires_at: opt_s(item, "expires_at")?
                .map(|t| parse_timestamp(t).ok_or_else(|| invalid(item, "expires_at")))
                .transpose()?,
            token_limit: opt_n(item, "token_limit")?,
            tokens_used: get_n(item, "tokens_used")?,
            tokens_reserved: get_n(item, "tokens_reserved")?,
            rate_limit_tier: get_s(item, "rate_limit_tier")?.to_owned(),
            allowed_ips: get_list(item, "allowed_ips")?
                .iter()
                .map(|net| net.parse().map_err(|_| invalid(item, "allowed_ips")))
                .collect::<Result<_, _>>()?,
            allowed_origins: get_list(item, "allowed_origins")?,
            allowed_models: get_list(item, "allowed_models")?,
            rate_window: opt_n(item, "rl_window")?
                .map(|start| Ok::<_, StoreError>((start, get_n(item, "rl_count")?)))
                .transpose()?,
            dollar_limits: opt_s(item, "dollar_limits")?
                .map(|text| decode_limits(text).ok_or_else(|| invalid(item, "dollar_limits")))
                .transpose()?,
            spend: spend_of(item)?,
            flights: flights_of(item)?,
            max_concurrent: opt_n(item, "max_concurrent")?,
            in_flight: get_signed(item, "in_flight")?,
            five_hour_start: opt_n(item, "five_hour_start")?,
            budget_alerts: alerts_of(item)?,
            tokens_per_minute: minutes_of(item)?,
            limit_mode: match opt_s(item, "limit_mode")? {
                None => LimitMode::Soft,
                Some(name) => LimitMode::parse(name).ok_or_else(|| invalid(item, "limit_mode"))?,
            },
        })
    }
}

impl TryFrom<&Item> for KeyUsage {
    type Error = StoreError;

    /// A key item carries its record and its counters together.
    fn try_from(item: &Item) -> Result<Self, StoreError> {
        Ok(KeyUsage {
            key: ApiKeyRecord::try_from(item)?,
            totals: super::usage::totals_of(item)?,
            first_used_at: opt_s(item, "first_used_at")?.map(str::to_owned),
            last_used_at: opt_s(item, "last_used_at")?.map(str::to_owned),
        })
    }
}

/// The `gsi1` sort key listing a key: newest first, ties broken by id.
pub(crate) fn listing_sort_key(record: &ApiKeyRecord) -> String {
    created_sort_key(&format_timestamp(record.created_at), record.id.as_str())
}

/// The item of a newly created key: no usage, no rate window yet.
pub(crate) fn new_key_item(record: &ApiKeyRecord) -> Item {
    let created = format_timestamp(record.created_at);
    let mut item = api_key(&record.id).item();
    item.insert(GSI1PK.into(), s(KEYS_INDEX));
    item.insert(GSI1SK.into(), s(listing_sort_key(record)));
    item.insert("id".into(), s(record.id.as_str()));
    item.insert("name".into(), s(&record.name));
    if let Some(description) = &record.description {
        item.insert("description".into(), s(description));
    }
    item.insert("prefix".into(), s(&record.prefix));
    item.insert("secret_hash".into(), s(record.secret_hash.to_hex()));
    item.insert("is_active".into(), AttributeValue::Bool(true));
    item.insert("created_at".into(), s(&created));
    item.insert("updated_at".into(), s(&created));
    if let Some(expires_at) = record.expires_at {
        item.insert("expires_at".into(), s(format_timestamp(expires_at)));
    }
    if let Some(limit) = record.token_limit {
        item.insert("token_limit".into(), n(limit));
    }
    item.insert("tokens_used".into(), n(0));
    item.insert("requests".into(), n(0));
    item.insert("rate_limit_tier".into(), s(&record.rate_limit_tier));
    let ips: Vec<String> = record.allowed_ips.iter().map(ToString::to_string).collect();
    item.insert("allowed_ips".into(), list(&ips));
    item.insert("allowed_origins".into(), list(&record.allowed_origins));
    item.insert("allowed_models".into(), list(&record.allowed_models));
    if let Some(limits) = &record.dollar_limits {
        item.insert("dollar_limits".into(), s(encode_limits(limits)));
    }
    if let Some(most) = record.max_concurrent {
        item.insert("max_concurrent".into(), n(most));
    }
    item.insert("limit_mode".into(), s(record.limit_mode.name()));
    item
}

/// Spend counters are top-level attributes `spend|<limit id>|<period>`
/// (`domain::budget::SpendCounter`): a settlement's `ADD` works on them
/// whether or not they exist yet, which a nested map would not allow.
const SPEND_PREFIX: &str = "spend|";

pub(crate) fn spend_attribute(counter: &SpendCounter) -> String {
    format!("{SPEND_PREFIX}{}|{}", counter.limit, counter.period)
}

fn spend_of(item: &Item) -> Result<BTreeMap<SpendCounter, MicroUsd>, StoreError> {
    counters_of(item, SPEND_PREFIX)
}

/// Budget-alert markers are top-level attributes `alert|<limit id>|<period>`
/// beside their spend counter, holding the highest threshold (percent)
/// claimed for it (`domain::budget::alerts`); a settlement that drops an
/// ended period's counter drops its marker too.
const ALERT_PREFIX: &str = "alert|";

pub(crate) fn alert_attribute(counter: &SpendCounter) -> String {
    format!("{ALERT_PREFIX}{}|{}", counter.limit, counter.period)
}

fn alerts_of(item: &Item) -> Result<BTreeMap<SpendCounter, u8>, StoreError> {
    Ok(counters_of(item, ALERT_PREFIX)?
        .into_iter()
        .map(|(counter, threshold)| (counter, u8::try_from(threshold).unwrap_or(u8::MAX)))
        .collect())
}

/// Tokens-per-minute counters are top-level attributes `tpm|<minute start,
/// epoch seconds>` (`domain::tpm`), added to by settlement like the spend
/// counters, and dropped by a later settlement once their minute is over.
const TPM_PREFIX: &str = "tpm|";

pub(crate) fn tpm_attribute(minute: u64) -> String {
    format!("{TPM_PREFIX}{minute}")
}

fn minutes_of(item: &Item) -> Result<BTreeMap<u64, u64>, StoreError> {
    item.keys()
        .filter_map(|name| Some((name, name.strip_prefix(TPM_PREFIX)?.parse::<u64>().ok()?)))
        .map(|(name, minute)| Ok((minute, get_n(item, name)?)))
        .collect()
}

/// The numbers stored under `<prefix><limit id>|<period>`, by counter.
fn counters_of(item: &Item, prefix: &str) -> Result<BTreeMap<SpendCounter, u64>, StoreError> {
    item.keys()
        .filter_map(|name| {
            let (limit, period) = name.strip_prefix(prefix)?.rsplit_once('|')?;
            Some((name, limit, period))
        })
        .map(|(name, limit, period)| {
            let counter = SpendCounter {
                limit: limit.to_owned(),
                period: period.to_owned(),
            };
            // A hard-mode settlement gives back what its admission added; a
            // counter dropped in between (its period ended) reads as what it
            // never goes below.
            Ok((counter, u64::try_from(get_signed(item, name)?).unwrap_or(0)))
        })
        .collect()
}

/// The claim of one budget alert: the counter's marker raised to
/// `threshold`, only if no claim reached it yet and the counter (as settled)
/// has reached `amount`, the threshold's share of the limit — so of
/// concurrent claimants exactly one wins, and a claim never runs ahead of
/// the spend it reports.
pub(crate) fn alert_claim(counter: &SpendCounter, threshold: u8, amount: MicroUsd) -> Change {
    Change {
        expression: "SET #alert = :threshold".to_owned(),
        names: Some(HashMap::from([
            ("#alert".to_owned(), alert_attribute(counter)),
            ("#spend".to_owned(), spend_attribute(counter)),
        ])),
        values: Item::from([
            (":threshold".to_owned(), n(threshold)),
            (":amount".to_owned(), n(amount)),
        ]),
    }
}

/// The condition of an [`alert_claim`] (the key must exist: its counter does).
pub(crate) const ALERT_CLAIM_CONDITION: &str =
    "(attribute_not_exists(#alert) OR #alert < :threshold) AND #spend >= :amount";

/// A key's dollar limits as stored: one JSON string, written only here, so
/// the admission write can require it unchanged by comparing strings.
pub(crate) fn encode_limits(limits: &[DollarLimit]) -> String {
    let limits: Vec<serde_json::Value> = limits
        .iter()
        .map(|l| {
            let mut value = serde_json::json!({"window": l.window.name(), "limit": l.limit});
            if let Some(models) = &l.models {
                value["models"] = serde_json::Value::from(models.as_str());
            }
            value
        })
        .collect();
    serde_json::Value::from(limits).to_string()
}

fn decode_limits(text: &str) -> Option<Vec<DollarLimit>> {
    let values: Vec<serde_json::Value> = serde_json::from_str(text).ok()?;
    values
        .iter()
        .map(|v| {
            Some(DollarLimit {
                window: Window::parse(v.get("window")?.as_str()?)?,
                limit: v.get("limit")?.as_u64()?,
                models: match v.get("models") {
                    None => None,
                    Some(models) => Some(models.as_str()?.to_owned()),
                },
            })
        })
        .collect()
}

/// The start key resuming a key listing after the key whose listing sort
/// key is `sort_key`.
pub(crate) fn listing_start(sort_key: String, id: &KeyId) -> Item {
    let mut start = api_key(id).item();
    start.insert(GSI1PK.to_owned(), s(KEYS_INDEX));
    start.insert(GSI1SK.to_owned(), s(sort_key));
    start
}

/// The secret and status checks of `domain::admission::decide` (secret,
/// then `key_status`), as a condition on the stored key item.
pub(crate) const KEY_CHECKS: &str = "attribute_exists(pk) AND secret_hash = :h AND is_active = :t \
     AND (attribute_not_exists(expires_at) OR expires_at > :now)";

/// The admission update of the key item and its condition.
pub(crate) struct AdmissionUpdate {
    pub expression: String,
    pub condition: String,
    pub names: HashMap<String, String>,
    pub values: Item,
}

/// The admission update of the key item: `domain::admission::decide`'s
/// write, stated as one conditional update.
pub(crate) fn admission_update(
    write: &AdmissionWrite,
    rate: RateLimit,
    hash: &SecretHash,
    now: OffsetDateTime,
) -> AdmissionUpdate {
    let charge = &write.charge;
    let mut values = Item::from([
        (":h".to_owned(), s(hash.to_hex())),
        (":t".to_owned(), AttributeValue::Bool(true)),
        (":now".to_owned(), s(format_timestamp(now))),
        (":n".to_owned(), n(charge.requests)),
    ]);
    // The update's clauses, joined at the end: each rule adds to them.
    let mut sets: Vec<String> = Vec::new();
    let mut adds: Vec<String> = Vec::new();
    let window_condition = match write.step {
        WindowStep::Same(w) => {
            values.insert(":w".into(), n(w));
            // rl_count + requests <= limit, without arithmetic in a condition.
            values.insert(
                ":room".into(),
                n(rate.requests.saturating_sub(charge.requests)),
            );
            sets.push("rl_count = rl_count + :n".to_owned());
            "rl_window = :w AND rl_count <= :room"
        }
        WindowStep::New(w) => {
            values.insert(":w".into(), n(w));
            sets.push("rl_window = :w, rl_count = :n".to_owned());
            "(attribute_not_exists(rl_window) OR rl_window < :w)"
        }
    };
    // `domain::admission::quota_admits`, stated on the stored attributes.
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
            // so the write fails and the decision says by how much.
            let ceiling = i128::from(token_limit) - i128::from(tokens);
            values.insert(":ceiling".into(), n(ceiling));
            values.insert(":r".into(), n(tokens));
            adds.push("tokens_used :r, tokens_reserved :r".to_owned());
            "token_limit = :tl AND tokens_used <= :ceiling".to_owned()
        }
    };
    let mut names = HashMap::new();
    let budget_condition = budget_conditions(write, &mut sets, &mut adds, &mut names, &mut values);
    // A lease: `domain::admission::decide`'s concurrency rule, stated on
    // the stored count and limit; settlement (or the reconciler) gives it back.
    let lease_condition = if charge.lease {
        values.insert(":one".into(), n(1));
        adds.push("in_flight :one".to_owned());
        " AND (attribute_not_exists(max_concurrent) OR attribute_not_exists(in_flight) \
         OR in_flight < max_concurrent)"
    } else {
        ""
    };
    // The request's trace, removed by its settlement (`domain::flight`).
    if let Some(flight) = &write.flight {
        names.insert("#fl".into(), flight_attribute(&flight.request_id));
        values.insert(
            ":fl".into(),
            s(encode_flight(flight, write.reservation().as_ref())),
        );
        sets.push("#fl = :fl".to_owned());
    }
    let mut expression = format!("SET {}", sets.join(", "));
    if !adds.is_empty() {
        expression.push_str(&format!(" ADD {}", adds.join(", ")));
    }
    // `domain::tpm::MinuteStanding::check`, stated on the stored counter of
    // the current minute: room left admits.
    let tpm_condition = match write.tpm {
        Some(check) => {
            names.insert("#tpm".into(), tpm_attribute(check.minute));
            values.insert(":tpm_limit".into(), n(check.limit));
            " AND (attribute_not_exists(#tpm) OR #tpm < :tpm_limit)"
        }
        None => "",
    };
    // The limit mode the write was stated for must still be the key's.
    let mode_condition = match write.mode {
        Some(mode) => {
            values.insert(":hard".into(), s(LimitMode::Hard.name()));
            match mode {
                LimitMode::Hard => " AND limit_mode = :hard",
                LimitMode::Soft => " AND (attribute_not_exists(limit_mode) OR limit_mode <> :hard)",
            }
        }
        None => "",
    };
    let condition = format!(
        "{KEY_CHECKS} AND {quota_condition} AND {window_condition}{budget_condition}{tpm_condition}{lease_condition}{mode_condition}"
    );
    AdmissionUpdate {
        expression,
        condition,
        names,
        values,
    }
}

/// The dollar limits' share of the admission write
/// (`domain::budget::budget_write`): the limits as they were read, the
/// 5-hour window, and each applicable counter below its limit.
fn budget_conditions(
    write: &AdmissionWrite,
    sets: &mut Vec<String>,
    adds: &mut Vec<String>,
    names: &mut HashMap<String, String>,
    values: &mut Item,
) -> String {
    let budget = &write.budget;
    let mut condition = match &budget.guard {
        Some(limits) => {
            values.insert(":dl".into(), s(encode_limits(limits)));
            " AND dollar_limits = :dl".to_owned()
        }
        None => " AND attribute_not_exists(dollar_limits)".to_owned(),
    };
    match budget.five_hour {
        Some(FiveHourStep::Same(start)) => {
            values.insert(":fs".into(), n(start));
            condition.push_str(" AND five_hour_start = :fs");
        }
        Some(FiveHourStep::Open(start)) => {
            values.insert(":fs".into(), n(start));
            values.insert(":fs_closed".into(), n(start.saturating_sub(FIVE_HOURS)));
            sets.push("five_hour_start = :fs".to_owned());
            condition.push_str(
                " AND (attribute_not_exists(five_hour_start) OR five_hour_start <= :fs_closed)",
            );
        }
        None => {}
    }
    // `domain::budget::LimitStanding::spent`, stated on the stored counter:
    // room left admits.
    let Some(worst) = budget.reserve else {
        for (i, (counter, limit)) in budget.checks.iter().enumerate() {
            names.insert(format!("#sc{i}"), spend_attribute(counter));
            values.insert(format!(":sl{i}"), n(*limit));
            condition.push_str(&format!(
                " AND (attribute_not_exists(#sc{i}) OR #sc{i} < :sl{i})"
            ));
        }
        return condition;
    };
    // Hard mode (`domain::budget::worst_case_over`): counter + worst <=
    // limit, stated as counter <= limit - worst, and the worst case added
    // to each counter by the same write. A worst case over the whole limit
    // leaves a negative ceiling no counter, present or absent, meets.
    if !budget.checks.is_empty() {
        values.insert(":sr".into(), n(worst));
    }
    for (i, (counter, limit)) in budget.checks.iter().enumerate() {
        names.insert(format!("#sc{i}"), spend_attribute(counter));
        let ceiling = i128::from(*limit) - i128::from(worst);
        values.insert(format!(":sl{i}"), n(ceiling));
        adds.push(format!("#sc{i} :sr"));
        if ceiling >= 0 {
            condition.push_str(&format!(
                " AND (attribute_not_exists(#sc{i}) OR #sc{i} <= :sl{i})"
            ));
        } else {
            condition.push_str(&format!(" AND #sc{i} <= :sl{i}"));
        }
    }
    condition
}

/// A request's trace is the top-level attribute `flight|<request id>`
/// (`domain::flight::Flight`, as JSON), set by its admission write and
/// removed by its settlement, or by the reconciler that charges it when
/// the settlement never came.
const FLIGHT_PREFIX: &str = "flight|";

pub(crate) fn flight_attribute(request_id: &str) -> String {
    format!("{FLIGHT_PREFIX}{request_id}")
}

/// The removal of request `request_id`'s trace alone.
pub(crate) fn flight_removal(request_id: &str) -> Change {
    Change {
        expression: "REMOVE #fr".into(),
        names: Some(HashMap::from([(
            "#fr".to_owned(),
            flight_attribute(request_id),
        )])),
        values: Item::new(),
    }
}

/// A flight as its admission write states it, with what that write
/// reserves (hard mode; `reservation`), whatever the flight was given.
fn encode_flight(flight: &Flight, reservation: Option<&Reservation>) -> String {
    let mut value = serde_json::json!({
        "at": format_timestamp(flight.admitted_at),
        "model": flight.model,
        "bytes": flight.body_bytes,
        "max_tokens": flight.max_tokens,
        "path": flight.path,
    });
    if let Some(reservation) = reservation {
        let counters: Vec<String> = reservation
            .counters
            .iter()
            .map(|c| format!("{}|{}", c.limit, c.period))
            .collect();
        value["reserved"] = serde_json::json!({
            "tokens": reservation.tokens,
            "cost": reservation.cost,
            "counters": counters,
        });
    }
    value.to_string()
}

fn reservation_of(value: &serde_json::Value) -> Option<Reservation> {
    Some(Reservation {
        tokens: value.get("tokens")?.as_u64()?,
        cost: value.get("cost")?.as_u64()?,
        counters: value
            .get("counters")?
            .as_array()?
            .iter()
            .map(|c| {
                let (limit, period) = c.as_str()?.rsplit_once('|')?;
                Some(SpendCounter {
                    limit: limit.to_owned(),
                    period: period.to_owned(),
                })
            })
            .collect::<Option<_>>()?,
    })
}

fn flights_of(item: &Item) -> Result<Vec<Flight>, StoreError> {
    item.keys()
        .filter_map(|name| Some((name, name.strip_prefix(FLIGHT_PREFIX)?)))
        .map(|(name, request_id)| {
            let value: serde_json::Value =
                serde_json::from_str(get_s(item, name)?).map_err(|_| invalid(item, name))?;
            let number = |field: &str| value.get(field).and_then(serde_json::Value::as_u64);
            Ok(Flight {
                request_id: request_id.to_owned(),
                admitted_at: value
                    .get("at")
                    .and_then(serde_json::Value::as_str)
                    .and_then(parse_timestamp)
                    .ok_or_else(|| invalid(item, name))?,
                model: value
                    .get("model")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned),
                body_bytes: number("bytes").unwrap_or(0),
                max_tokens: number("max_tokens").unwrap_or(0),
                path: value
                    .get("path")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("/v1/messages")
                    .to_owned(),
                reservation: match value.get("reserved") {
                    None => None,
                    Some(reserved) => {
                        Some(reservation_of(reserved).ok_or_else(|| invalid(item, name))?)
                    }
                },
            })
        })
        .collect()
}

/// Filter of a key listing: only keys whose `is_active` is `:a`.
pub(crate) const ACTIVE_IS: &str = "is_active = :a";

/// An admin's validated changes at `now`, as one update of the key item.
pub(crate) fn patch(changes: &KeyChanges, now: OffsetDateTime) -> Change {
    // Every attribute goes through a `#name` placeholder: some of ours
    // (`name`) are DynamoDB reserved words.
    let mut sets = vec!["#updated_at = :updated_at".to_owned()];
    let mut names = HashMap::from([("#updated_at".to_owned(), "updated_at".to_owned())]);
    let mut removes = Vec::new();
    let mut values = Item::from([(":updated_at".to_owned(), s(format_timestamp(now)))]);
    let mut set = |name: &str, value: AttributeValue| {
        sets.push(format!("#{name} = :{name}"));
        names.insert(format!("#{name}"), name.to_owned());
        values.insert(format!(":{name}"), value);
    };
    if let Some(name) = &changes.name {
        set("name", s(name));
    }
    if let Some(tier) = &changes.rate_limit_tier {
        set("rate_limit_tier", s(tier));
    }
    if let Some(active) = changes.is_active {
        set("is_active", AttributeValue::Bool(active));
    }
    if let Some(ips) = &changes.allowed_ips {
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        set("allowed_ips", list(&ips));
    }
    if let Some(origins) = &changes.allowed_origins {
        set("allowed_origins", list(origins));
    }
    if let Some(models) = &changes.allowed_models {
        set("allowed_models", list(models));
    }
    match &changes.description {
        Some(Some(description)) => set("description", s(description)),
        Some(None) => removes.push("description"),
        None => {}
    }
    match changes.token_limit {
        Some(Some(limit)) => set("token_limit", n(limit)),
        Some(None) => removes.push("token_limit"),
        None => {}
    }
    match changes.expires_at {
        Some(Some(at)) => set("expires_at", s(format_timestamp(at))),
        Some(None) => removes.push("expires_at"),
        None => {}
    }
    if let Some(mode) = changes.limit_mode {
        set("limit_mode", s(mode.name()));
    }
    match changes.max_concurrent {
        Some(Some(most)) => set("max_concurrent", n(most)),
        Some(None) => removes.push("max_concurrent"),
        None => {}
    }
    match &changes.dollar_limits {
        Some(Some(limits)) => set("dollar_limits", s(encode_limits(limits))),
        Some(None) => removes.push("dollar_limits"),
        None => {}
    }
    let mut expression = format!("SET {}", sets.join(", "));
    if !removes.is_empty() {
        for name in &removes {
            names.insert(format!("#{name}"), (*name).to_owned());
        }
        let placeholders: Vec<String> = removes.iter().map(|n| format!("#{n}")).collect();
        expression.push_str(&format!(" REMOVE {}", placeholders.join(", ")));
    }
    Change {
        expression,
        names: Some(names),
        values,
    }
}

/// A rotation at `now`: the secret's hash replaced by `new_hash`.
pub(crate) fn rotation(new_hash: &SecretHash, now: OffsetDateTime) -> Change {
    Change {
        expression: "SET secret_hash = :h, updated_at = :now".into(),
        names: None,
        values: Item::from([
            (":now".to_owned(), s(format_timestamp(now))),
            (":h".to_owned(), s(new_hash.to_hex())),
        ]),
    }
}

/// A key's share of a settlement at `at`: its counters, `tokens_used`
/// moved by `tokens_used` and, for a batch, `tokens_reserved` by
/// `tokens_reserved` (negative: a reservation given back).
pub(crate) fn settlement(
    counters: &Counters,
    tokens_used: i64,
    tokens_reserved: Option<i64>,
    spend: &KeySpend<'_>,
    at: OffsetDateTime,
) -> Change {
    let mut extra = vec![("tokens_used", tokens_used)];
    extra.extend(tokens_reserved.map(|reserved| ("tokens_reserved", reserved)));
    // The counters' `ADD` clause, which the spend counters join, then the rest.
    let (mut expression, mut values) = super::usage::counters_update(counters, &extra, "");
    values.insert(":at".into(), s(format_timestamp(at)));
    let mut names = HashMap::new();
    for (i, (counter, cost)) in spend.add.iter().enumerate() {
        names.insert(format!("#sa{i}"), spend_attribute(counter));
        values.insert(format!(":sa{i}"), n(*cost));
        expression.push_str(&format!(", #sa{i} :sa{i}"));
    }
    if let Some((minute, tokens)) = spend.minute {
        names.insert("#ta".into(), tpm_attribute(minute));
        values.insert(":ta".into(), n(tokens));
        expression.push_str(", #ta :ta");
    }
    // A settled message gives its lease back (its trace goes below).
    if spend.flight.is_some() {
        values.insert(":lease_back".into(), n(-1));
        expression.push_str(", in_flight :lease_back");
    }
    expression
        .push_str(" SET last_used_at = :at, first_used_at = if_not_exists(first_used_at, :at)");
    // An ended period's counter goes with its alert marker (removing an
    // absent attribute is no error).
    let mut drops: Vec<String> = spend
        .drop
        .iter()
        .enumerate()
        .map(|(i, counter)| {
            names.insert(format!("#sd{i}"), spend_attribute(counter));
            names.insert(format!("#ad{i}"), alert_attribute(counter));
            format!("#sd{i}, #ad{i}")
        })
        .collect();
    // The request has landed: its trace goes.
    if let Some(request_id) = spend.flight {
        names.insert("#fr".into(), flight_attribute(request_id));
        drops.push("#fr".into());
    }
    // Ended minutes' token counters, likewise.
    drops.extend(spend.drop_minutes.iter().enumerate().map(|(i, minute)| {
        names.insert(format!("#td{i}"), tpm_attribute(*minute));
        format!("#td{i}")
    }));
    if !drops.is_empty() {
        expression.push_str(&format!(" REMOVE {}", drops.join(", ")));
    }
    Change {
        expression,
        names: (!names.is_empty()).then_some(names),
        values,
    }
}

/// What a settlement adds to a key's spend counters (micro-dollars per
/// counter) and which ended periods' counters (and alert markers) it drops;
/// likewise for the tokens-per-minute counters (`domain::tpm`).
#[derive(Debug, Default)]
pub(crate) struct KeySpend<'a> {
    /// Micro-dollars added to each counter (negative where a hard-mode
    /// reservation given back is more than the cost).
    pub add: Vec<(&'a SpendCounter, i64)>,
    pub drop: &'a [SpendCounter],
    /// The request whose trace (`flight|<request id>`) the settlement removes.
    pub flight: Option<&'a str>,
    /// Tokens added to the counter of the minute (start) a message was
    /// admitted in.
    pub minute: Option<(u64, u64)>,
    pub drop_minutes: &'a [u64],
}

impl<'a> KeySpend<'a> {
    /// Request `request_id`'s cost added to each counter of its `charge`
    /// (less what its admission reserved on it, in hard mode: the real
    /// figure replaces the reservation), and its billed `tokens` to the
    /// minute it was admitted in.
    pub(crate) fn of(
        charge: &'a BudgetCharge,
        cost: MicroUsd,
        tokens: u64,
        request_id: &'a str,
    ) -> KeySpend<'a> {
        let signed = |micro: MicroUsd| i64::try_from(micro).unwrap_or(i64::MAX);
        let mut add: BTreeMap<&SpendCounter, i64> =
            charge.add_to.iter().map(|c| (c, signed(cost))).collect();
        if let Some(reservation) = &charge.reservation {
            for counter in &reservation.counters {
                *add.entry(counter).or_default() -= signed(reservation.cost);
            }
        }
        let minute = &charge.tokens_per_minute;
        KeySpend {
            add: add.into_iter().collect(),
            drop: &charge.drop,
            flight: Some(request_id),
            minute: minute.add_to.map(|start| (start, tokens)),
            drop_minutes: &minute.drop,
        }
    }
}

/// A reservation of `tokens` given back: taken off `tokens_used` and
/// `tokens_reserved` alike.
pub(crate) fn reservation_release(tokens: u64) -> Change {
    let back = -i64::try_from(tokens).unwrap_or(i64::MAX);
    Change {
        expression: "ADD tokens_used :back, tokens_reserved :back".into(),
        names: None,
        values: Item::from([(":back".to_owned(), n(back))]),
    }
}

/// What a listing of names reads of a key item (`name` is a reserved word).
pub(crate) const NAME_PROJECTION: &str = "id, #n";
/// The placeholders of [`NAME_PROJECTION`].
pub(crate) const NAME_PROJECTION_NAMES: &[(&str, &str)] = &[("#n", "name")];

/// A key's id and name, from an item read with [`NAME_PROJECTION`].
pub(crate) fn id_and_name(item: &Item) -> Result<(String, String), StoreError> {
    Ok((
        get_s(item, "id")?.to_owned(),
        get_s(item, "name")?.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::admission::Charge;
    use crate::domain::budget::BudgetWrite;
    use crate::domain::key::PresentedKey;

    fn number(values: &Item, name: &str) -> String {
        match &values[name] {
            AttributeValue::N(n) => n.clone(),
            other => panic!("{other:?}"),
        }
    }

    fn no_budget() -> BudgetWrite {
        BudgetWrite {
            guard: None,
            five_hour: None,
            checks: vec![],
            reserve: None,
        }
    }

    const RATE: RateLimit = RateLimit {
        requests: 10,
        period: 60,
        tokens_per_minute: None,
    };

    #[test]
    fn a_reservation_is_added_in_the_admission_write_and_bounded_by_the_limit() {
        let hash = PresentedKey::generate().hash();
        let charge = Charge {
            requests: 3,
            quota: QuotaRule::Reserve {
                limit: Some(1000),
                tokens: 400,
            },
            lease: false,
        };
        let now = crate::domain::now();
        let write = AdmissionWrite {
            step: WindowStep::Same(60),
            charge,
            budget: no_budget(),
            flight: None,
            tpm: None,
            mode: None,
        };
        let AdmissionUpdate {
            expression,
            condition,
            values,
            ..
        } = admission_update(&write, RATE, &hash, now);
        assert!(expression.contains("ADD tokens_used :r, tokens_reserved :r"));
        assert!(condition.contains("token_limit = :tl AND tokens_used <= :ceiling"));
        assert_eq!(number(&values, ":ceiling"), "600");
        assert_eq!(
            number(&values, ":room"),
            "7",
            "3 more requests fit under 10"
        );
        // A worst case over the whole limit can never pass the condition.
        let too_big = AdmissionWrite {
            step: WindowStep::New(60),
            charge: Charge {
                requests: 1,
                quota: QuotaRule::Reserve {
                    limit: Some(100),
                    tokens: 500,
                },
                lease: false,
            },
            budget: no_budget(),
            flight: None,
            tpm: None,
            mode: None,
        };
        let values = admission_update(&too_big, RATE, &hash, now).values;
        assert_eq!(number(&values, ":ceiling"), "-400");
        // Messages reserve nothing and need only some quota left.
        let message = AdmissionWrite {
            step: WindowStep::New(60),
            charge: Charge::MESSAGE,
            budget: no_budget(),
            flight: None,
            tpm: None,
            mode: None,
        };
        let AdmissionUpdate {
            expression,
            condition,
            ..
        } = admission_update(&message, RATE, &hash, now);
        assert!(!expression.contains("tokens_used"));
        // …and take a lease, within the key's concurrency limit.
        assert!(expression.ends_with(" ADD in_flight :one"), "{expression}");
        assert!(
            condition.ends_with(" OR in_flight < max_concurrent)"),
            "{condition}"
        );
        assert!(condition.contains("tokens_used < token_limit"));
    }

    #[test]
    fn every_set_goes_in_the_set_clause_and_every_add_in_the_add_clause() {
        // A batch's reservation on a key whose 5-hour window opens, for a
        // message with its trace: each SET before the one ADD clause.
        let hash = PresentedKey::generate().hash();
        let write = AdmissionWrite {
            step: WindowStep::New(60),
            charge: Charge {
                requests: 1,
                quota: QuotaRule::Reserve {
                    limit: Some(1000),
                    tokens: 10,
                },
                lease: false,
            },
            budget: BudgetWrite {
                guard: None,
                five_hour: Some(crate::domain::budget::FiveHourStep::Open(7200)),
                checks: vec![],
                reserve: None,
            },
            flight: Some(crate::domain::flight::Flight {
                request_id: "req_1".into(),
                admitted_at: crate::domain::now(),
                model: None,
                body_bytes: 10,
                max_tokens: 1,
                path: "/v1/messages".into(),
                reservation: None,
            }),
            tpm: None,
            mode: None,
        };
        let update = admission_update(&write, RATE, &hash, crate::domain::now());
        assert_eq!(
            update.expression,
            "SET rl_window = :w, rl_count = :n, five_hour_start = :fs, #fl = :fl \
             ADD tokens_used :r, tokens_reserved :r"
        );
        assert_eq!(update.names["#fl"], "flight|req_1");
    }

    #[test]
    fn a_hard_mode_write_reserves_the_worst_case_on_each_counter_it_checks() {
        let hash = PresentedKey::generate().hash();
        let week = SpendCounter {
            limit: "week".into(),
            period: "w2026-11-23".into(),
        };
        let write = |reserve: MicroUsd| AdmissionWrite {
            step: WindowStep::New(960),
            charge: Charge {
                quota: QuotaRule::Reserve {
                    limit: Some(10_000),
                    tokens: 4_000,
                },
                ..Charge::MESSAGE
            },
            budget: BudgetWrite {
                checks: vec![(week.clone(), 5_000_000)],
                reserve: Some(reserve),
                ..no_budget()
            },
            flight: Some(Flight {
                request_id: "req_1".into(),
                admitted_at: crate::domain::now(),
                model: None,
                body_bytes: 10,
                max_tokens: 1,
                path: "/v1/messages".into(),
                reservation: None,
            }),
            tpm: None,
            mode: Some(LimitMode::Hard),
        };
        let fits = write(1_500_000);
        let update = admission_update(&fits, RATE, &hash, crate::domain::now());
        // counter + worst <= limit, as counter <= limit - worst; the
        // worst case added by the same write, tokens and dollars alike.
        assert!(
            update
                .condition
                .contains(" AND (attribute_not_exists(#sc0) OR #sc0 <= :sl0)"),
            "{}",
            update.condition
        );
        assert_eq!(number(&update.values, ":sl0"), "3500000");
        assert!(
            update.expression.contains("#sc0 :sr"),
            "{}",
            update.expression
        );
        assert!(
            update
                .expression
                .contains("tokens_used :r, tokens_reserved :r"),
            "{}",
            update.expression
        );
        assert_eq!(number(&update.values, ":sr"), "1500000");
        assert_eq!(number(&update.values, ":ceiling"), "6000");
        assert!(update.condition.ends_with(" AND limit_mode = :hard"));
        // The trace records what was reserved, for the settlement.
        let trace = match &update.values[":fl"] {
            AttributeValue::S(text) => serde_json::from_str::<serde_json::Value>(text).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            trace["reserved"],
            serde_json::json!({"tokens": 4000, "cost": 1500000, "counters": ["week|w2026-11-23"]})
        );
        let mut item = new_key_item(&ApiKeyRecord::sample(crate::domain::now()).0);
        item.insert("flight|req_1".into(), update.values[":fl"].clone());
        let read = ApiKeyRecord::try_from(&item).unwrap();
        assert_eq!(read.flights[0].reservation, fits.reservation());
        // A worst case over the whole limit: no counter, even an absent
        // one, meets the condition.
        let over = write(5_000_001);
        let update = admission_update(&over, RATE, &hash, crate::domain::now());
        assert!(update.condition.contains(" AND #sc0 <= :sl0"));
        assert!(!update.condition.contains("attribute_not_exists(#sc0)"));
        assert_eq!(number(&update.values, ":sl0"), "-1");
        // A soft write states the mode it was decided on too.
        let soft = AdmissionWrite {
            mode: Some(LimitMode::Soft),
            ..write(1)
        };
        let update = admission_update(&soft, RATE, &hash, crate::domain::now());
        assert!(
            update
                .condition
                .ends_with(" AND (attribute_not_exists(limit_mode) OR limit_mode <> :hard)")
        );
    }

    #[test]
    fn a_hard_mode_settlement_replaces_the_reservation_with_the_real_cost() {
        let week = SpendCounter {
            limit: "week".into(),
            period: "w2026-11-23".into(),
        };
        let day = SpendCounter {
            limit: "day".into(),
            period: "d2026-11-28".into(),
        };
        let charge = BudgetCharge {
            add_to: vec![week.clone(), day.clone()],
            reservation: Some(Reservation {
                tokens: 4_000,
                cost: 1_500_000,
                counters: vec![week.clone()],
            }),
            ..BudgetCharge::default()
        };
        let spend = KeySpend::of(&charge, 400_000, 900, "req_1");
        // The week counter held the reservation: it moves by the
        // difference; the day counter (none reserved there) by the cost.
        assert_eq!(spend.add, vec![(&day, 400_000), (&week, -1_100_000)]);
    }

    #[test]
    fn tokens_per_minute_are_checked_on_the_current_minute_counted_and_dropped() {
        let hash = PresentedKey::generate().hash();
        let write = AdmissionWrite {
            step: WindowStep::New(960),
            charge: Charge::MESSAGE,
            budget: no_budget(),
            flight: None,
            tpm: Some(crate::domain::tpm::MinuteCheck {
                minute: 960,
                limit: 10_000,
            }),
            mode: None,
        };
        let update = admission_update(&write, RATE, &hash, crate::domain::now());
        assert!(
            update
                .condition
                .contains(" AND (attribute_not_exists(#tpm) OR #tpm < :tpm_limit)"),
            "{}",
            update.condition
        );
        assert_eq!(update.names["#tpm"], "tpm|960");
        assert_eq!(number(&update.values, ":tpm_limit"), "10000");
        // Without a limit the condition says nothing of minutes.
        let unlimited = AdmissionWrite { tpm: None, ..write };
        let update = admission_update(&unlimited, RATE, &hash, crate::domain::now());
        assert!(!update.condition.contains("#tpm"));

        // The settlement adds the billed tokens to the admitted minute and
        // drops the earlier minutes' counters.
        let spend = KeySpend {
            minute: Some((960, 1234)),
            drop_minutes: &[840, 900],
            ..KeySpend::default()
        };
        let change = settlement(&Counters::default(), 1, None, &spend, crate::domain::now());
        let names = change.names.unwrap();
        assert!(
            change.expression.contains(", #ta :ta"),
            "{}",
            change.expression
        );
        assert_eq!(names["#ta"], "tpm|960");
        assert_eq!(number(&change.values, ":ta"), "1234");
        let removed: Vec<&str> = change
            .expression
            .split(" REMOVE ")
            .nth(1)
            .unwrap()
            .split(", ")
            .map(|placeholder| names[placeholder].as_str())
            .collect();
        assert_eq!(removed, ["tpm|840", "tpm|900"]);

        // And the counters are read back into the record by minute.
        let (record, _) = ApiKeyRecord::sample(crate::domain::now());
        let mut item = new_key_item(&record);
        item.insert("tpm|960".into(), n(1234));
        item.insert("tpm|900".into(), n(7));
        let read = ApiKeyRecord::try_from(&item).unwrap();
        assert_eq!(
            read.tokens_per_minute,
            BTreeMap::from([(900, 7), (960, 1234)])
        );
    }

    #[test]
    fn an_ended_period_loses_its_spend_counter_and_its_alert_marker_together() {
        let ended = SpendCounter {
            limit: "day".into(),
            period: "d2026-11-27".into(),
        };
        let current = SpendCounter {
            limit: "day".into(),
            period: "d2026-11-28".into(),
        };
        let spend = KeySpend {
            add: vec![(&current, 5)],
            drop: std::slice::from_ref(&ended),
            flight: None,
            ..KeySpend::default()
        };
        let change = settlement(&Counters::default(), 1, None, &spend, crate::domain::now());
        let names = change.names.unwrap();
        let removed: Vec<&str> = change
            .expression
            .split(" REMOVE ")
            .nth(1)
            .unwrap()
            .split(", ")
            .map(|placeholder| names[placeholder].as_str())
            .collect();
        assert_eq!(removed, ["spend|day|d2026-11-27", "alert|day|d2026-11-27"]);
        // The claim of a threshold: raised only past the marker, and only
        // once the settled counter has reached the amount.
        let claim = alert_claim(&current, 80, 8_000_000);
        let claim_names = claim.names.unwrap();
        assert_eq!(claim_names["#alert"], "alert|day|d2026-11-28");
        assert_eq!(claim_names["#spend"], "spend|day|d2026-11-28");
        assert_eq!(number(&claim.values, ":amount"), "8000000");
        assert_eq!(
            ALERT_CLAIM_CONDITION,
            "(attribute_not_exists(#alert) OR #alert < :threshold) AND #spend >= :amount"
        );
    }
}
