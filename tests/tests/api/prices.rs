//! The price table admins read and replace (`/admin/prices`), its history,
//! and the proxy pricing with what was stored.

use std::time::Duration;

use relay_tests::app::{AppOptions, TestApp, num, spawn_app, spawn_app_with};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use serde_json::{Value, json};

/// A model the shipped table does not price: what the test stores decides
/// its cost.
const MODEL: &str = "claude-test-1";

fn prices(input: f64, output: f64) -> Value {
    json!({"input": input, "output": output, "cache_write_5m": 2.5, "cache_write_1h": 4, "cache_read": 0.2})
}

/// A table pricing `MODEL` at $100/$100 from 2020, $2/$8 from 2025 and
/// $1000/$1000 from 2099: the entry in force is 2025's.
fn table() -> Value {
    json!({
        "entries": [
            {"model": MODEL, "effective_from": "2020-01-01T00:00:00Z", "prices": prices(100.0, 100.0)},
            {"model": MODEL, "effective_from": "2025-01-01T00:00:00Z", "prices": prices(2.0, 8.0)},
            {"model": MODEL, "effective_from": "2099-01-01T00:00:00Z", "prices": prices(1000.0, 1000.0)},
            {"model": "claude-opus-4-5", "effective_from": "2025-01-01T00:00:00Z",
             "prices": {"input": 5, "output": 25, "cache_write_5m": 6.25, "cache_write_1h": 10, "cache_read": 0.5},
             "bands": [{"above_prompt_tokens": 200000, "prices": prices(10.0, 37.5)}]},
        ],
        "multipliers": [{"attribute": "batch", "factors": {"input": 0.5, "output": 0.5}}],
        "fallback": prices(15.0, 75.0),
    })
}

async fn admin(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let token = app.admin_token().await.unwrap();
    let mut request = app.http.request(method, app.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn put(app: &TestApp, body: &Value) -> (u16, Value) {
    admin(app, reqwest::Method::PUT, "/admin/prices", Some(body)).await
}

async fn get(app: &TestApp, path: &str) -> Value {
    let (status, body) = admin(app, reqwest::Method::GET, path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

#[tokio::test]
async fn with_nothing_stored_the_shipped_table_is_shown_as_default() {
    let app = spawn_app().await.unwrap();
    let shown = get(&app, "/admin/prices").await;
    assert_eq!(shown["source"], "default");
    assert_eq!(shown["updated_at"], Value::Null);
    assert_eq!(shown["unpriced_models"], "charge");
    let opus = shown["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["model"] == "claude-opus-4-5")
        .unwrap();
    assert_eq!(
        opus["prices"],
        json!({"input": 5, "output": 25, "cache_write_5m": 6.25, "cache_write_1h": 10, "cache_read": 0.5})
    );
    let history = get(&app, "/admin/prices/history").await;
    assert_eq!(history["data"], json!([]));
}

#[tokio::test]
async fn replacing_prices_needs_an_admin_token() {
    let app = spawn_app().await.unwrap();
    for token in [None, Some("not-a-token")] {
        let mut request = app.http.put(app.url("/admin/prices")).json(&table());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
    }
    let reads = app.http.get(app.url("/admin/prices")).send().await.unwrap();
    assert_eq!(reads.status(), 401);
    assert_eq!(get(&app, "/admin/prices").await["source"], "default");
}

#[tokio::test]
async fn an_invalid_table_is_400_naming_the_field_and_nothing_is_stored() {
    let app = spawn_app().await.unwrap();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut t = table();
        f(&mut t);
        t
    };
    let cases = [
        (
            edit(&|t| t["entries"][2]["prices"]["output"] = json!(-25)),
            "`entries[2].prices.output`",
        ),
        (
            edit(&|t| t["entries"][0]["prices"]["input"] = json!(0.000_000_1)),
            "`entries[0].prices.input`",
        ),
        (
            edit(&|t| {
                t["entries"][3]["bands"] = json!([
                    {"above_prompt_tokens": 200000, "prices": prices(1.0, 1.0)},
                    {"above_prompt_tokens": 100000, "prices": prices(1.0, 1.0)},
                ])
            }),
            "`entries[3].bands[1].above_prompt_tokens`",
        ),
        (
            edit(&|t| t["entries"][1]["effective_from"] = json!("2020-01-01T00:00:00Z")),
            "`entries[1].effective_from`",
        ),
        (
            edit(&|t| t["entries"][0]["model"] = json!("")),
            "`entries[0].model`",
        ),
        (
            edit(&|t| t["entries"][0]["prices"]["cache_hit"] = json!(1)),
            "`entries[0].prices.cache_hit`",
        ),
        (
            edit(&|t| t["multipliers"][0]["attribute"] = json!("priority")),
            "`multipliers[0].attribute`",
        ),
        (edit(&|t| t["source"] = json!("stored")), "`source`"),
    ];
    for (body, naming) in cases {
        let (status, answer) = put(&app, &body).await;
        assert_eq!(status, 400, "{naming}: {answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(naming), "{naming} in {message}");
    }
    let history = get(&app, "/admin/prices/history").await;
    assert_eq!(history["data"], json!([]), "nothing stored");
    assert_eq!(get(&app, "/admin/prices").await["source"], "default");

    let token = app.admin_token().await.unwrap();
    let huge = app
        .http
        .put(app.url("/admin/prices"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(format!(
            "{{\"entries\": [], \"pad\": \"{}\"}}",
            "x".repeat(300 * 1024)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);
}

#[tokio::test]
async fn a_stored_table_is_shown_and_the_one_it_replaced_stays_in_the_history() {
    let app = spawn_app().await.unwrap();
    let (status, first) = put(&app, &table()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["source"], "stored");
    let mut second = table();
    second["entries"][1]["prices"]["input"] = json!(3);
    let (status, stored) = put(&app, &second).await;
    assert_eq!(status, 200, "{stored}");

    let shown = get(&app, "/admin/prices").await;
    assert_eq!(shown["source"], "stored");
    assert_eq!(shown["updated_at"], stored["updated_at"]);
    assert_eq!(shown["entries"][1]["prices"]["input"], 3);
    assert_eq!(shown["entries"][3]["prices"]["cache_write_5m"], 6.25);
    assert_eq!(
        shown["entries"][0]["effective_from"],
        "2020-01-01T00:00:00.000Z"
    );
    // Classes a multiplier does not name are shown unchanged.
    assert_eq!(
        shown["multipliers"],
        json!([{"attribute": "batch", "factors": {
            "input": 0.5, "output": 0.5, "cache_write_5m": 1, "cache_write_1h": 1, "cache_read": 1
        }}])
    );
    assert!(first["updated_at"].as_str() < stored["updated_at"].as_str());

    // Newest first: the table in force, then the one it replaced.
    let history = get(&app, "/admin/prices/history").await;
    let versions = history["data"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{history}");
    assert_eq!(versions[0]["id"], stored["updated_at"]);
    assert_eq!(versions[1]["id"], first["updated_at"]);
    assert_eq!(versions[1]["entries"][1]["prices"]["input"], 2);
    assert_eq!(history["has_more"], false);
    // Paged like Anthropic's lists.
    let page = get(&app, "/admin/prices/history?limit=1").await;
    assert_eq!(page["has_more"], true);
    assert_eq!(page["data"][0]["id"], stored["updated_at"]);
    let after = page["last_id"].as_str().unwrap();
    let next = get(
        &app,
        &format!("/admin/prices/history?limit=1&after_id={after}"),
    )
    .await;
    assert_eq!(next["data"][0]["id"], first["updated_at"]);
    assert_eq!(next["has_more"], false);
}

/// A relayed request after a PUT is priced at the stored table's entry in
/// force, and the cost recorded on its log row says so.
#[tokio::test]
async fn a_request_after_a_price_change_is_charged_the_new_price() {
    let app = spawn_app().await.unwrap();
    let (status, answer) = put(&app, &table()).await;
    assert_eq!(status, 200, "{answer}");
    let (id, key) = app.new_key().await.unwrap();
    relay(&app, &key).await;

    // 2025's prices: 1000 × $2 + 500 × $8 + 10000 × $0.20 per million
    // = 2000 + 4000 + 2000 µ$ (the shipped table would have charged the
    // fallback, Opus 4's $15/$75/$1.50: 15000 + 37500 + 15000).
    const COST: u64 = 8_000;
    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(num(&logs[0], "cost_micro_usd"), COST);
    let token = app.admin_token().await.unwrap();
    let page: Value = app
        .http
        .get(app.url(&format!("/admin/api-keys/{id}/usage/logs")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["data"][0]["cost_micro_usd"], COST, "{page}");
    assert_ne!(page["data"][0]["unpriced"], true, "{page}");
}

/// Sends one message for `MODEL` billed 1000 input, 500 output and 10000
/// cache-read tokens, and reads the answer to its end.
async fn relay(app: &TestApp, key: &str) {
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(1000, 500, 0, 10_000),
        ..MessageSpec::default()
    }));
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": MODEL,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "say hello"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
}

/// The proxy reads the table once per `PRICE_CACHE_SECONDS`, not per
/// request: within that time, a new table is not seen yet.
#[tokio::test]
async fn the_proxy_keeps_the_table_it_read_until_its_cache_expires() {
    let mut options = AppOptions::default();
    options.proxy.price_cache_ttl = Duration::from_secs(3600);
    let app = spawn_app_with(options).await.unwrap();
    let (status, answer) = put(&app, &table()).await;
    assert_eq!(status, 200, "{answer}");
    let (id, key) = app.new_key().await.unwrap();
    relay(&app, &key).await;
    let mut dearer = table();
    dearer["entries"][1]["prices"]["input"] = json!(4);
    let (status, answer) = put(&app, &dearer).await;
    assert_eq!(status, 200, "{answer}");
    relay(&app, &key).await;

    // Both at the first table's $2 input: 2000 + 4000 + 2000 µ$ each (the
    // second table would have made it 4000 + 4000 + 2000).
    let logs = app.wait_for_logs(&id, 2).await.unwrap();
    let costs: Vec<u64> = logs.iter().map(|log| num(log, "cost_micro_usd")).collect();
    assert_eq!(costs, [8_000, 8_000]);
}
