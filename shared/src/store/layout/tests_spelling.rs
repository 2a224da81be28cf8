//! The layout is the only place that spells attribute names: every name its
//! items and expressions use is gathered here, and no string of the other
//! store modules may hold one.

use std::collections::BTreeSet;
use std::path::Path;

use super::super::item::Item;
use super::super::owned::{BatchRecord, FileRecord};
use super::{
    Change, IN_INDEX_PARTITION, IN_INDEX_PARTITION_AFTER, IN_INDEX_PARTITION_BEFORE, IN_PARTITION,
    ITEM_ABSENT, ITEM_EXISTS, TTL_ATTRIBUTE, api_key, day, login, model_aliases, owned, prices,
    tier, upstream_health, usage,
};
use crate::domain::admission::{AdmissionWrite, Charge, QuotaRule, RateLimit, WindowStep};
use crate::domain::budget::{BudgetWrite, FiveHourStep, SpendCounter};
use crate::domain::key::{ApiKeyRecord, KeyChanges, KeyId, PresentedKey};
use crate::domain::tier::Tier;
use crate::domain::usage::{Counters, UsageRecord};

/// The store's modules outside `layout`, read as the compiler reads them.
/// `schema.rs` is left out: it restates template.yaml's key schema.
const OPERATION_FILES: &[(&str, &str)] = &[
    ("admission.rs", include_str!("../admission.rs")),
    ("api_keys.rs", include_str!("../api_keys.rs")),
    ("capacity.rs", include_str!("../capacity.rs")),
    ("item.rs", include_str!("../item.rs")),
    ("logins.rs", include_str!("../logins.rs")),
    ("mod.rs", include_str!("../mod.rs")),
    ("model_aliases.rs", include_str!("../model_aliases.rs")),
    ("owned.rs", include_str!("../owned.rs")),
    ("prices.rs", include_str!("../prices.rs")),
    ("settlement.rs", include_str!("../settlement.rs")),
    ("tiers.rs", include_str!("../tiers.rs")),
    ("upstream_health.rs", include_str!("../upstream_health.rs")),
    ("usage_log.rs", include_str!("../usage_log.rs")),
];

/// Words of expressions that are DynamoDB's, not attributes.
const EXPRESSION_WORDS: &[&str] = &[
    "SET",
    "ADD",
    "REMOVE",
    "AND",
    "OR",
    "BETWEEN",
    "attribute_exists",
    "attribute_not_exists",
    "if_not_exists",
];

/// The attribute names an expression or projection uses (placeholders and
/// DynamoDB's own words left out).
fn expression_attributes(expression: &str) -> Vec<String> {
    expression
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '#'))
        .filter(|word| !word.is_empty() && !word.starts_with([':', '#']))
        .filter(|word| !word.chars().all(|c| c.is_ascii_digit()))
        .filter(|word| !EXPRESSION_WORDS.contains(word))
        .map(str::to_owned)
        .collect()
}

fn change_attributes(change: &Change) -> Vec<String> {
    let mut names = expression_attributes(&change.expression);
    names.extend(change.names.iter().flat_map(|n| n.values().cloned()));
    names
}

/// Every attribute name the layout writes, reads in expressions or
/// projects: the items its builders make (optional attributes set) and the
/// words of its expressions.
fn layout_attributes() -> BTreeSet<String> {
    let key = KeyId::parse("abcdefABCDEF").unwrap();
    let at = crate::domain::parse_timestamp("2026-01-02T03:04:05.006Z").unwrap();
    let record = ApiKeyRecord {
        id: key.clone(),
        name: "n".into(),
        description: Some("d".into()),
        prefix: "p".into(),
        secret_hash: PresentedKey::generate().hash(),
        is_active: true,
        created_at: at,
        updated_at: at,
        expires_at: Some(at),
        token_limit: Some(1),
        tokens_used: 0,
        tokens_reserved: 0,
        rate_limit_tier: "basic".into(),
        allowed_ips: Vec::new(),
        allowed_origins: Vec::new(),
        allowed_models: Vec::new(),
        rate_window: None,
        dollar_limits: Some(Vec::new()),
        spend: Default::default(),
        five_hour_start: None,
        budget_alerts: Default::default(),
        flights: Vec::new(),
        max_concurrent: Some(4),
        in_flight: 0,
        tokens_per_minute: Default::default(),
        limit_mode: crate::domain::key::LimitMode::Hard,
    };
    let usage_record = UsageRecord {
        request_id: "r".into(),
        key_id: key.clone(),
        at,
        model: Some("m".into()),
        requested_model: Some("a".into()),
        method: "POST".into(),
        path: "/v1/messages".into(),
        status: 200,
        stream: false,
        usage: Default::default(),
        estimated: false,
        latency_ms: 1,
        ttfb_ms: Some(1),
        retries: 0,
        client_ip: "127.0.0.1".into(),
        user_agent: Some("u".into()),
        session_id: Some("s".into()),
        attribution: crate::domain::usage::Attribution {
            agent_id: crate::domain::usage::AgentId::parse("a"),
            parent_agent_id: crate::domain::usage::AgentId::parse("p"),
            request_class: Some(crate::domain::usage::RequestClass::Subagent),
            agent_type: crate::domain::usage::AgentType::parse("t"),
        },
        error_type: Some("e".into()),
        upstream: Some("u".into()),
        cost: Default::default(),
        budget: Default::default(),
    };
    let batch = BatchRecord {
        batch_id: "b".into(),
        key_id: key.clone(),
        recorded_at: "2026-01-02T03:04:05.006Z".into(),
        request_count: 1,
        reserved_tokens: 1,
        client_ip: "127.0.0.1".into(),
        settled_at: None,
        price_attributes: vec![crate::domain::price::Attribute::UsInference],
    };
    let file = FileRecord {
        file_id: "f".into(),
        key_id: key.clone(),
        recorded_at: "2026-01-02T03:04:05.006Z".into(),
        object: serde_json::json!({}),
    };
    let tier_record = Tier {
        name: "t".into(),
        requests: 1,
        period: 1,
        tokens_per_minute: Some(1),
    };
    let counters = Counters::default();
    let items: Vec<Item> = vec![
        api_key::new_key_item(&record),
        tier::tier_item(&tier_record),
        usage::request_log_item(&usage_record, 1),
        usage::batch_log_item(
            &batch,
            at,
            &counters,
            usage::LogFlags {
                estimated: false,
                unpriced: false,
            },
            Some("m"),
            1,
        ),
        owned::batch_item(&batch, at),
        owned::open_batch_item(&batch, at),
        owned::pending_item(&key, "r", 1, at),
        owned::file_item(&file),
        prices::prices_item(prices::current(), "{}", "2026-01-02T03:04:05.006Z"),
        model_aliases::aliases_item(&Default::default(), "2026-01-02T03:04:05.006Z").unwrap(),
        upstream_health::fresh_health_item(
            "u",
            at,
            crate::domain::upstream_pool::FailureKind::Connect,
            at,
        ),
        upstream_health::unusable_item("u", "v", at),
    ];
    let mut names: BTreeSet<String> = items.iter().flat_map(|i| i.keys().cloned()).collect();

    let every_change = KeyChanges {
        name: Some("n".into()),
        description: Some(None),
        token_limit: Some(None),
        rate_limit_tier: Some("basic".into()),
        expires_at: Some(None),
        is_active: Some(true),
        allowed_ips: Some(Vec::new()),
        allowed_origins: Some(Vec::new()),
        allowed_models: Some(Vec::new()),
        dollar_limits: Some(None),
        max_concurrent: Some(None),
        limit_mode: Some(crate::domain::key::LimitMode::Soft),
    };
    let day_item = day(&key, "2026-01-02");
    let spend_counter = SpendCounter {
        limit: "day".into(),
        period: "d2026-01-02".into(),
    };
    let changes = [
        api_key::patch(&every_change, at),
        api_key::rotation(&PresentedKey::generate().hash(), at),
        api_key::settlement(&counters, 1, Some(-1), &api_key::KeySpend::default(), at),
        api_key::reservation_release(1),
        api_key::alert_claim(&spend_counter, 80, 1),
        api_key::settlement(
            &counters,
            1,
            None,
            &api_key::KeySpend {
                add: vec![(&spend_counter, 1)],
                drop: std::slice::from_ref(&spend_counter),
                flight: Some("r"),
                minute: Some((60, 1)),
                drop_minutes: &[0],
            },
            at,
        ),
        usage::day_settlement(
            &key,
            &day_item,
            "2026-01-02",
            &counters,
            at,
            Some(&usage::UpstreamServed {
                name: "main",
                failed: true,
            }),
        ),
        usage::model_settlement("m", &counters, at),
        // Every per-class counter counts something, so each is named.
        usage::with_class_counters(
            usage::model_settlement("m", &counters, at),
            "subagent",
            &Counters {
                requests: 1,
                usage: crate::domain::usage::TokenUsage {
                    input_tokens: 1,
                    output_tokens: 1,
                    cache_creation_input_tokens: 1,
                    cache_read_input_tokens: 1,
                    cache_creation_5m: 1,
                    cache_creation_1h: 1,
                },
                cost_micro_usd: 1,
                ..Counters::default()
            },
        ),
        // Every per-model counter counts something, so each is named.
        usage::with_model_counters(
            usage::model_settlement("m", &counters, at),
            &[(
                "m",
                crate::domain::usage::ClassTotals {
                    requests: 1,
                    input_tokens: 1,
                    output_tokens: 1,
                    cache_creation_input_tokens: 1,
                    cache_read_input_tokens: 1,
                    cost_micro_usd: 1,
                },
            )],
        ),
        usage::session_settlement(
            &key,
            &crate::domain::usage::SessionId::parse("s").unwrap(),
            &counters,
            at,
            1,
        ),
        owned::batch_settled(at, 1),
        upstream_health::another_failure(
            at,
            crate::domain::upstream_pool::FailureKind::Connect,
            at,
        ),
    ];
    names.extend(changes.iter().flat_map(change_attributes));

    let rate = RateLimit {
        requests: 1,
        period: 1,
        tokens_per_minute: Some(1),
    };
    let hash = PresentedKey::generate().hash();
    let budgets = [
        BudgetWrite {
            guard: None,
            five_hour: Some(FiveHourStep::Same(1)),
            checks: Vec::new(),
            reserve: None,
        },
        BudgetWrite {
            guard: Some(Vec::new()),
            five_hour: Some(FiveHourStep::Open(1)),
            checks: vec![(spend_counter.clone(), 5)],
            reserve: Some(1),
        },
    ];
    for (step, budget) in [WindowStep::Same(1), WindowStep::New(1)]
        .into_iter()
        .zip(budgets)
    {
        for quota in [
            QuotaRule::AnyLeft,
            QuotaRule::Reserve {
                limit: None,
                tokens: 1,
            },
            QuotaRule::Reserve {
                limit: Some(1),
                tokens: 1,
            },
        ] {
            let charge = Charge {
                requests: 1,
                quota,
                lease: false,
            };
            let write = AdmissionWrite {
                step,
                charge,
                budget: budget.clone(),
                flight: Some(crate::domain::flight::Flight {
                    request_id: "r".into(),
                    admitted_at: at,
                    model: None,
                    body_bytes: 1,
                    max_tokens: 1,
                    path: "/v1/messages".into(),
                    reservation: None,
                }),
                tpm: Some(crate::domain::tpm::MinuteCheck {
                    minute: 60,
                    limit: 1,
                }),
                mode: Some(crate::domain::key::LimitMode::Hard),
            };
            let update = api_key::admission_update(&write, rate, &hash, at);
            names.extend(expression_attributes(&update.expression));
            names.extend(expression_attributes(&update.condition));
            names.extend(update.names.into_values());
        }
    }

    let expressions = [
        ITEM_EXISTS,
        ITEM_ABSENT,
        IN_PARTITION,
        IN_INDEX_PARTITION,
        IN_INDEX_PARTITION_AFTER,
        IN_INDEX_PARTITION_BEFORE,
        api_key::KEY_CHECKS,
        api_key::ACTIVE_IS,
        api_key::NAME_PROJECTION,
        api_key::ALERT_CLAIM_CONDITION,
        usage::AGGREGATES_BETWEEN,
        usage::LOGS_BETWEEN,
        usage::MODEL_LOGS_BETWEEN,
        owned::NOT_SETTLED,
        owned::FILE_ID_PROJECTION,
        login::OPEN_WINDOW,
        login::WINDOW_EXPIRED,
        login::ADD_CHECK,
        login::SAME_WINDOW_BELOW_MAX,
        prices::OLDER_OR_ABSENT,
        prices::VERSIONS_BEFORE,
        prices::VERSIONS_AFTER,
        upstream_health::ALIVE,
        upstream_health::PROJECTION,
    ];
    names.extend(expressions.iter().flat_map(|e| expression_attributes(e)));
    names.extend(
        api_key::NAME_PROJECTION_NAMES
            .iter()
            .map(|(_, n)| (*n).to_owned()),
    );
    names.insert(TTL_ATTRIBUTE.to_owned());
    names
}

/// The string literals of Rust source `code` (comments skipped), up to its
/// tests: a test may spell what it asserts on.
fn string_literals(code: &str) -> Vec<String> {
    let code = code.split("#[cfg(test)]").next().unwrap_or_default();
    let mut literals = Vec::new();
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                chars.by_ref().find(|&c| c == '\n');
            }
            '"' => {
                let mut literal = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        c => literal.push(c),
                    }
                }
                literals.push(literal);
            }
            _ => {}
        }
    }
    literals
}

/// The words of a string literal, format arguments (`{name}`: a Rust
/// variable) and value placeholders (`:name`: bound where the call is
/// built, named by the layout's expression) left out.
fn literal_words(literal: &str) -> Vec<String> {
    let mut text = String::new();
    let mut depth = 0;
    for c in literal.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            c if depth == 0 => text.push(c),
            _ => {}
        }
    }
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| !word.starts_with(':'))
        .flat_map(|word| word.split(':'))
        .filter(|word| !word.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_layout_gathers_the_attribute_names_it_uses() {
    let names = layout_attributes();
    for expected in [
        "pk",
        "gsi1pk",
        "ttl",
        "secret_hash",
        "rl_count",
        "rl_window",
        "tokens_reserved",
        "first_used_at",
        "day",
        "settled_tokens",
        "window_start",
        "failures",
        "file_id",
        "name",
        "price_list",
        "alert|day|d2026-01-02",
        "spend|day|d2026-01-02",
        "tpm|60",
        "tpm|0",
        "agent_id",
        "parent_agent_id",
        "request_class",
        "agent_type",
        "class|subagent|requests",
        "class|subagent|cost_micro_usd",
    ] {
        assert!(names.contains(expected), "{expected} in {names:?}");
    }
    for word in EXPRESSION_WORDS {
        assert!(!names.contains(*word), "{word}");
    }
}

#[test]
fn the_scan_finds_names_in_strings_and_not_in_code_comments_or_format_arguments() {
    let code = r#"
        // "rl_count" in a comment
        let name = "SET rl_count = :n";
        format!("stored {at}: {name} \"quoted\" :pk");
        #[cfg(test)]
        "tokens_used"
    "#;
    let literals = string_literals(code);
    assert_eq!(
        literals,
        ["SET rl_count = :n", "stored {at}: {name} quoted :pk"]
    );
    assert_eq!(literal_words(&literals[1]), ["stored", "quoted"]);
}

#[test]
fn no_store_module_outside_the_layout_spells_an_attribute_name() {
    let store = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".rs") && name != "schema.rs")
        .collect();
    let scanned: BTreeSet<String> = OPERATION_FILES
        .iter()
        .map(|(name, _)| (*name).to_owned())
        .collect();
    assert_eq!(on_disk, scanned, "OPERATION_FILES lists every store module");

    let names = layout_attributes();
    let names = &names;
    let offenders: Vec<String> = OPERATION_FILES
        .iter()
        .flat_map(|(file, code)| {
            string_literals(code)
                .into_iter()
                .filter_map(move |literal| {
                    let named: Vec<String> = literal_words(&literal)
                        .into_iter()
                        .filter(|word| names.contains(word))
                        .collect();
                    (!named.is_empty()).then(|| format!("{file}: {literal:?} names {named:?}"))
                })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "spell attribute names in store::layout, not in the operations:\n{}",
        offenders.join("\n")
    );
}
