//! The days' split by model: `/api/usage/daily`, its admin mirror and
//! `/admin/usage` give each day's `by_model`, read from the counters the
//! settlement adds to the day item, and the models add up to the day.

use std::time::Duration;

use relay_shared::domain::key::KeyId;
use relay_shared::domain::price::Cost;
use relay_shared::domain::usage::{TokenUsage, UsageRecord};
use relay_shared::store::settlement::SettleOutcome;
use relay_tests::app::{TestApp, spawn_app};
use serde_json::{Value, json};
use time::{Date, OffsetDateTime, Time};

const SONNET: &str = "claude-sonnet-4-5-20250929";
const HAIKU: &str = "claude-haiku-4-5-20251001";

/// One request settled straight into the store: the day it falls on, the
/// model served, its tokens (input, output, cache write, cache read) and
/// what it cost.
struct Planted {
    key: usize,
    days_ago: i64,
    model: Option<&'static str>,
    tokens: [u64; 4],
    cost: u64,
}

fn record(key: &str, planted: &Planted) -> UsageRecord {
    let day = OffsetDateTime::now_utc().date() - time::Duration::days(planted.days_ago);
    let [input, output, cache_write, cache_read] = planted.tokens;
    UsageRecord {
        request_id: format!("relay_{}", uuid::Uuid::new_v4().simple()),
        key_id: KeyId::parse(key).unwrap(),
        // A second into the day: never in the future.
        at: OffsetDateTime::new_utc(day, Time::from_hms(0, 0, 1).unwrap()),
        model: planted.model.map(str::to_owned),
        requested_model: None,
        method: "POST".into(),
        path: "/v1/messages".into(),
        status: 200,
        stream: false,
        usage: TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: cache_write,
            cache_read_input_tokens: cache_read,
            cache_creation_5m: cache_write,
            cache_creation_1h: 0,
        },
        estimated: false,
        latency_ms: 1,
        ttfb_ms: None,
        retries: 0,
        client_ip: "127.0.0.1".into(),
        user_agent: None,
        session_id: None,
        attribution: Default::default(),
        error_type: None,
        upstream: None,
        cost: Cost {
            micro_usd: planted.cost,
            unpriced: false,
            saved_micro_usd: 0,
        },
        budget: Default::default(),
    }
}

fn ymd(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

async fn get(app: &TestApp, path: &str, header: (&str, String)) -> Value {
    let response = app
        .http
        .get(app.url(path))
        .header(header.0, header.1)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

/// A day row's models, each as `(model, requests, input, output, cache
/// write, cache read, tokens, cost)`.
fn models(row: &Value) -> Vec<(String, [u64; 7])> {
    row["by_model"]
        .as_array()
        .unwrap_or_else(|| panic!("no by_model: {row}"))
        .iter()
        .map(|share| {
            let n = |name: &str| share[name].as_u64().unwrap_or_else(|| panic!("{share}"));
            (
                share["model"].as_str().unwrap().to_owned(),
                [
                    n("requests"),
                    n("input_tokens"),
                    n("output_tokens"),
                    n("cache_creation_input_tokens"),
                    n("cache_read_input_tokens"),
                    n("tokens"),
                    n("cost_micro_usd"),
                ],
            )
        })
        .collect()
}

/// The row's own counters in the same order.
fn own(row: &Value) -> [u64; 7] {
    let n = |name: &str| row[name].as_u64().unwrap_or_else(|| panic!("{row}"));
    [
        n("requests"),
        n("input_tokens"),
        n("output_tokens"),
        n("cache_creation_input_tokens"),
        n("cache_read_input_tokens"),
        n("tokens"),
        n("cost_micro_usd"),
    ]
}

fn sum(shares: &[(String, [u64; 7])]) -> [u64; 7] {
    let mut total = [0; 7];
    for (_, values) in shares {
        for (sum, value) in total.iter_mut().zip(values) {
            *sum += value;
        }
    }
    total
}

fn share(model: &str, values: [u64; 7]) -> (String, [u64; 7]) {
    (model.to_owned(), values)
}

#[tokio::test]
async fn days_split_by_model_exactly_per_key_and_across_keys() {
    let app = spawn_app().await.unwrap();
    let (alpha_id, alpha_key) = app.new_key().await.unwrap();
    let (beta_id, beta_key) = app.new_key().await.unwrap();
    let ids = [&alpha_id, &beta_id];
    let planted = [
        // alpha, today: two Sonnet requests and one Haiku.
        Planted {
            key: 0,
            days_ago: 0,
            model: Some(SONNET),
            tokens: [100, 10, 4, 50],
            cost: 1_000,
        },
        Planted {
            key: 0,
            days_ago: 0,
            model: Some(SONNET),
            tokens: [200, 20, 0, 0],
            cost: 2_000,
        },
        Planted {
            key: 0,
            days_ago: 0,
            model: Some(HAIKU),
            tokens: [30, 3, 0, 0],
            cost: 33,
        },
        // alpha, yesterday: Haiku, and a request that named no model.
        Planted {
            key: 0,
            days_ago: 1,
            model: Some(HAIKU),
            tokens: [7, 1, 0, 2],
            cost: 9,
        },
        Planted {
            key: 0,
            days_ago: 1,
            model: None,
            tokens: [5, 0, 0, 0],
            cost: 0,
        },
        // beta, today and yesterday: Sonnet.
        Planted {
            key: 1,
            days_ago: 0,
            model: Some(SONNET),
            tokens: [1_000, 100, 0, 0],
            cost: 10_000,
        },
        Planted {
            key: 1,
            days_ago: 1,
            model: Some(SONNET),
            tokens: [400, 40, 0, 0],
            cost: 4_000,
        },
    ];
    for plant in &planted {
        let outcome = app
            .store
            .settle(&record(ids[plant.key], plant), Duration::from_secs(86_400))
            .await
            .unwrap();
        assert_eq!(outcome, SettleOutcome::Recorded);
    }

    // Hand-summed: [requests, input, output, cache write, cache read,
    // tokens, cost].
    let alpha_today = [
        share(HAIKU, [1, 30, 3, 0, 0, 33, 33]),
        share(SONNET, [2, 300, 30, 4, 50, 384, 3_000]),
    ];
    let alpha_yesterday = [
        share(HAIKU, [1, 7, 1, 0, 2, 10, 9]),
        share("unknown", [1, 5, 0, 0, 0, 5, 0]),
    ];
    let beta_today = [share(SONNET, [1, 1_000, 100, 0, 0, 1_100, 10_000])];
    let beta_yesterday = [share(SONNET, [1, 400, 40, 0, 0, 440, 4_000])];

    let holder = |key: &String| ("x-api-key", key.clone());
    let alpha = get(&app, "/api/usage/daily?days=2", holder(&alpha_key)).await;
    let rows = alpha["data"].as_array().unwrap();
    assert_eq!(models(&rows[0]), alpha_yesterday, "{alpha}");
    assert_eq!(models(&rows[1]), alpha_today, "{alpha}");
    for row in rows {
        assert_eq!(sum(&models(row)), own(row), "the models add up: {row}");
    }
    let beta = get(&app, "/api/usage/daily?days=2", holder(&beta_key)).await;
    let rows = beta["data"].as_array().unwrap();
    assert_eq!(models(&rows[0]), beta_yesterday, "{beta}");
    assert_eq!(models(&rows[1]), beta_today, "{beta}");
    // A day without traffic has no models.
    let week = get(&app, "/api/usage/daily?days=7", holder(&beta_key)).await;
    assert_eq!(week["data"][0]["by_model"], json!([]), "{week}");

    // The key's lifetime totals are its rows' sums, models included.
    let summary = get(&app, "/api/usage", holder(&alpha_key)).await;
    let rows = alpha["data"].as_array().unwrap();
    let days_sum = sum(&[share("", own(&rows[0])), share("", own(&rows[1]))]);
    assert_eq!(own(&summary), days_sum, "{summary}");
    assert_eq!(
        days_sum,
        sum(&[alpha_today.to_vec(), alpha_yesterday.to_vec()].concat())
    );

    // The admin sees the same rows for a key, and every key's models
    // summed per day.
    let token = app.admin_token().await.unwrap();
    let admin = ("authorization", format!("Bearer {token}"));
    let mirror = get(
        &app,
        &format!("/admin/api-keys/{alpha_id}/usage/daily?days=2"),
        admin.clone(),
    )
    .await;
    assert_eq!(mirror["data"], alpha["data"]);
    let today = OffsetDateTime::now_utc().date();
    let yesterday = today - time::Duration::days(1);
    let all = get(
        &app,
        &format!("/admin/usage?from={}&to={}", ymd(yesterday), ymd(today)),
        admin,
    )
    .await;
    let daily = all["daily"].as_array().unwrap();
    assert_eq!(daily.len(), 2, "{all}");
    assert_eq!(
        models(&daily[0]),
        [
            share(HAIKU, [1, 7, 1, 0, 2, 10, 9]),
            share(SONNET, [1, 400, 40, 0, 0, 440, 4_000]),
            share("unknown", [1, 5, 0, 0, 0, 5, 0]),
        ],
        "{all}"
    );
    assert_eq!(
        models(&daily[1]),
        [
            share(HAIKU, [1, 30, 3, 0, 0, 33, 33]),
            share(SONNET, [3, 1_300, 130, 4, 50, 1_484, 13_000]),
        ],
        "{all}"
    );
    for row in daily {
        assert_eq!(sum(&models(row)), own(row), "the models add up: {row}");
    }
}

#[tokio::test]
async fn a_proxied_request_counts_under_the_model_served() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let response = app.message(&key, SONNET).send().await.unwrap();
    assert_eq!(response.status(), 200);
    app.wait_for_logs(&id, 1).await.unwrap();
    let daily = get(&app, "/api/usage/daily?days=1", ("x-api-key", key)).await;
    let row = &daily["data"][0];
    let shares = models(row);
    assert_eq!(shares.len(), 1, "{daily}");
    assert_eq!(shares[0].0, SONNET);
    assert_eq!(shares[0].1, own(row), "{daily}");
    assert_eq!(own(row)[0], 1);
}
