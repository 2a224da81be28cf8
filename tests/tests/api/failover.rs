//! The upstream pool end to end: a request fails over to the next upstream
//! on each kind of failure, a cooling upstream is skipped, one that refuses
//! the relay's key is left alone, two relay instances share what they learn
//! through DynamoDB, a Claude Code session stays on one upstream, and a
//! Bedrock upstream serves messages as Anthropic would.

use std::time::Duration;

use relay_tests::app::{AppOptions, TestApp, num, spawn_app_with, text};
use relay_tests::fake_bedrock::FakeBedrock;
use relay_tests::fake_upstream::{Behavior, FakeConfig, FakeUpstream, MessageSpec, Usage};
use relay_tests::sse::parse_sse;
use serde_json::{Value, json};

/// `n` fake Anthropic accounts, each with its own key.
async fn accounts(n: usize) -> Vec<FakeUpstream> {
    let mut fakes = Vec::new();
    for i in 0..n {
        let fake = FakeUpstream::start_with(FakeConfig {
            api_key: format!("sk-ant-account-{i}"),
            ..FakeConfig::default()
        })
        .await
        .unwrap();
        fakes.push(fake);
    }
    fakes
}

/// The pool entry of fake `fake`, named `name`, at `priority`.
fn entry(name: &str, fake: &FakeUpstream, priority: u32) -> Value {
    json!({"name": name, "kind": "anthropic", "base_url": fake.base_url(),
        "api_key": fake.api_key(), "priority": priority})
}

/// A relay over three accounts `a`, `b` and `c` of one priority and weight.
async fn three_equal_accounts() -> (Vec<FakeUpstream>, TestApp) {
    let fakes = accounts(3).await;
    let app = app_with(
        json!([
            entry("a", &fakes[0], 1),
            entry("b", &fakes[1], 1),
            entry("c", &fakes[2], 1)
        ]),
        None,
    )
    .await;
    (fakes, app)
}

async fn app_with(upstreams: Value, table: Option<String>) -> TestApp {
    spawn_app_with(AppOptions {
        upstreams: Some(upstreams),
        table,
        ..AppOptions::default()
    })
    .await
    .unwrap()
}

/// A request on `key`, read to its end; its status.
async fn send(app: &TestApp, key: &str, session: Option<&str>) -> u16 {
    let mut request = app.message(key, "claude-sonnet-4-5");
    if let Some(session) = session {
        request = request.header("x-claude-code-session-id", session);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    response.bytes().await.unwrap();
    status
}

/// The upstream each of the key's usage rows names, oldest first.
async fn served_by(app: &TestApp, id: &str, rows: usize) -> Vec<String> {
    app.in_flight.idle().await;
    let mut logs = app.wait_for_logs(id, rows).await.unwrap();
    logs.sort_by_key(|log| text(log, "sk").map(str::to_owned));
    logs.iter()
        .map(|log| text(log, "upstream").unwrap_or("").to_owned())
        .collect()
}

/// Waits until the store shows upstream `name` cooling down (the failure is
/// shared in the background).
async fn until_cooling(app: &TestApp, name: &str) {
    for _ in 0..100 {
        let view = app
            .store
            .upstream_health(&[name], relay_shared::domain::now())
            .await
            .unwrap();
        if view
            .cooling_until(name, relay_shared::domain::now())
            .is_some()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never cooled down");
}

#[tokio::test]
async fn each_failure_kind_moves_the_request_to_the_next_upstream() {
    let failures = [
        Behavior::error(529, "overloaded_error"),
        Behavior::Error {
            status: 429,
            error_type: "rate_limit_error".into(),
            retry_after: Some(30),
        },
        Behavior::error(500, "api_error"),
        Behavior::error(503, "api_error"),
    ];
    for failure in failures {
        let fakes = accounts(2).await;
        let app = app_with(
            json!([
                entry("primary", &fakes[0], 1),
                entry("backup", &fakes[1], 2)
            ]),
            None,
        )
        .await;
        let (id, key) = app.new_key().await.unwrap();
        fakes[0].push(failure.clone());
        assert_eq!(send(&app, &key, None).await, 200, "{failure:?}");
        assert_eq!(served_by(&app, &id, 1).await, ["backup"], "{failure:?}");
        assert_eq!(fakes[0].requests().len(), 1);
        // The primary cools down: the next request goes to the backup at
        // once, and the primary is not asked.
        until_cooling(&app, "primary").await;
        assert_eq!(send(&app, &key, None).await, 200);
        assert_eq!(served_by(&app, &id, 2).await, ["backup", "backup"]);
        assert_eq!(fakes[0].requests().len(), 1, "{failure:?}");
    }
}

#[tokio::test]
async fn an_upstream_that_cannot_be_reached_is_skipped() {
    let fakes = accounts(1).await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let app = app_with(
        json!([
            {"name": "dead", "kind": "anthropic", "base_url": dead, "api_key": "sk-ant-x", "priority": 1},
            entry("alive", &fakes[0], 2)
        ]),
        None,
    )
    .await;
    let (id, key) = app.new_key().await.unwrap();
    assert_eq!(send(&app, &key, None).await, 200);
    assert_eq!(served_by(&app, &id, 1).await, ["alive"]);
    until_cooling(&app, "dead").await;
}

#[tokio::test]
async fn an_upstream_that_refuses_the_key_is_left_alone_until_the_key_changes() {
    let fakes = accounts(2).await;
    let mut refused = entry("refused", &fakes[0], 1);
    refused["api_key"] = json!("sk-ant-revoked");
    let app = app_with(json!([refused, entry("backup", &fakes[1], 2)]), None).await;
    let (id, key) = app.new_key().await.unwrap();
    assert_eq!(send(&app, &key, None).await, 200);
    assert_eq!(served_by(&app, &id, 1).await, ["backup"]);
    // Tried twice: once more after re-reading the secret.
    let asked = fakes[0].requests().len();
    assert_eq!(asked, 2);
    assert_eq!(send(&app, &key, None).await, 200);
    assert_eq!(send(&app, &key, None).await, 200);
    assert_eq!(served_by(&app, &id, 3).await, ["backup"; 3]);
    assert_eq!(fakes[0].requests().len(), asked, "not asked again");
}

#[tokio::test]
async fn a_cooldown_one_instance_saw_spares_the_other_through_dynamodb() {
    let fakes = accounts(2).await;
    let pool = json!([
        entry("primary", &fakes[0], 1),
        entry("backup", &fakes[1], 2)
    ]);
    let first = app_with(pool.clone(), None).await;
    let second = app_with(pool, Some(first.store.table().to_owned())).await;
    let (id, key) = first.new_key().await.unwrap();
    fakes[0].push(Behavior::Error {
        status: 429,
        error_type: "rate_limit_error".into(),
        retry_after: Some(60),
    });
    assert_eq!(send(&first, &key, None).await, 200);
    until_cooling(&first, "primary").await;
    // The second instance has never seen the primary fail.
    assert_eq!(send(&second, &key, None).await, 200);
    assert_eq!(served_by(&first, &id, 2).await, ["backup", "backup"]);
    assert_eq!(fakes[0].requests().len(), 1);
}

#[tokio::test]
async fn a_session_stays_on_one_upstream_and_moves_once_when_it_fails() {
    let (fakes, app) = three_equal_accounts().await;
    let (id, key) = app.new_key().await.unwrap();
    let session = "2f1a7c1e-5d7e-4c4b-9a61-3f2b8e0d9c11";
    for _ in 0..50 {
        assert_eq!(send(&app, &key, Some(session)).await, 200);
    }
    let rows = served_by(&app, &id, 50).await;
    let home = rows[0].clone();
    assert!(rows.iter().all(|r| *r == home), "{rows:?}");
    // Another session may land elsewhere: the choice is by session, not
    // one upstream for all.
    let spread: std::collections::BTreeSet<String> = {
        let (other_id, other_key) = app.new_key().await.unwrap();
        for i in 0..12 {
            send(&app, &other_key, Some(&format!("session-{i}"))).await;
        }
        served_by(&app, &other_id, 12).await.into_iter().collect()
    };
    assert!(spread.len() > 1, "{spread:?}");

    // Its upstream fails: the session moves once, and stays where it went.
    let index = ["a", "b", "c"].iter().position(|n| *n == home).unwrap();
    let asked_before = fakes[index].requests().len();
    fakes[index].set_default(Behavior::Error {
        status: 529,
        error_type: "overloaded_error".into(),
        retry_after: Some(60),
    });
    for _ in 0..10 {
        assert_eq!(send(&app, &key, Some(session)).await, 200);
    }
    let rows = served_by(&app, &id, 60).await;
    let moved: Vec<&String> = rows[50..].iter().collect();
    assert!(
        moved.iter().all(|r| **r == *moved[0] && **r != home),
        "{moved:?}"
    );
    // The failed upstream was asked once, then left to cool.
    assert_eq!(fakes[index].requests().len() - asked_before, 1);
}

#[tokio::test]
async fn a_bedrock_upstream_streams_like_anthropic_and_its_usage_is_recorded_exactly() {
    let bedrock = FakeBedrock::start().await.unwrap();
    bedrock.set_usage(Usage::new(1200, 340, 0, 0));
    let app = app_with(
        json!([{"name": "bedrock-us", "kind": "bedrock", "region": "us-east-1",
            "endpoint_url": bedrock.endpoint_url(),
            "model_map": {"claude-sonnet-4-5": "us.anthropic.claude-sonnet-4-5-20250929-v1:0"}}]),
        None,
    )
    .await;
    let (id, key) = app.new_key().await.unwrap();
    let response = app
        .http
        .post(app.url("/v1/messages?beta=true"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .header(
            "anthropic-beta",
            "claude-code-20250219,interleaved-thinking-2025-05-14",
        )
        .json(
            &json!({"model": "claude-sonnet-4-5", "max_tokens": 512, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    let events = parse_sse(&body);
    let names: Vec<&str> = events.iter().filter_map(|e| e.event.as_deref()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    // Bedrock got its own shape of the request.
    let sent = &bedrock.requests()[0];
    assert_eq!(
        sent.model_id,
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
    );
    assert_eq!(sent.body["anthropic_version"], "bedrock-2023-05-31");
    assert_eq!(
        sent.body["anthropic_beta"],
        json!(["interleaved-thinking-2025-05-14"])
    );
    assert!(sent.body.get("model").is_none() && sent.body.get("stream").is_none());
    // The usage as the answer reported it, priced, on a row naming Bedrock.
    app.in_flight.idle().await;
    let log = &app.wait_for_logs(&id, 1).await.unwrap()[0];
    assert_eq!(
        (num(log, "input_tokens"), num(log, "output_tokens")),
        (1200, 340)
    );
    assert_eq!(num(log, "cost_micro_usd"), 1200 * 3 + 340 * 15);
    assert_eq!(text(log, "upstream"), Some("bedrock-us"));
    // A model the map does not name is refused before anything is sent.
    let response = app.message(&key, "claude-opus-4-5").send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(bedrock.requests().len(), 1);
}

#[tokio::test]
async fn a_throttled_bedrock_fails_over_to_an_anthropic_account() {
    let bedrock = FakeBedrock::start().await.unwrap();
    bedrock.push(relay_tests::fake_bedrock::BedrockBehavior::Throttle);
    let fakes = accounts(1).await;
    fakes[0].set_default(Behavior::Message(MessageSpec {
        usage: Usage::new(10, 5, 0, 0),
        ..MessageSpec::default()
    }));
    let app = app_with(
        json!([{"name": "bedrock-us", "kind": "bedrock", "region": "us-east-1", "priority": 1,
            "endpoint_url": bedrock.endpoint_url(),
            "model_map": {"claude-sonnet-4-5": "anthropic.claude-sonnet-4-5-20250929-v1:0"}},
            entry("anthropic", &fakes[0], 2)]),
        None,
    )
    .await;
    let (id, key) = app.new_key().await.unwrap();
    assert_eq!(send(&app, &key, None).await, 200);
    assert_eq!(served_by(&app, &id, 1).await, ["anthropic"]);
    until_cooling(&app, "bedrock-us").await;
}

#[tokio::test]
async fn the_admin_sees_each_upstream_and_its_health_without_its_key() {
    let fakes = accounts(2).await;
    let bedrock = FakeBedrock::start().await.unwrap();
    let app = app_with(
        json!([entry("primary", &fakes[0], 1), entry("backup", &fakes[1], 2),
            {"name": "bedrock-us", "kind": "bedrock", "region": "us-east-1", "priority": 3,
             "endpoint_url": bedrock.endpoint_url(),
             "model_map": {"claude-sonnet-4-5": "anthropic.claude-sonnet-4-5-20250929-v1:0"}}]),
        None,
    )
    .await;
    let (_, key) = app.new_key().await.unwrap();
    fakes[0].push(Behavior::Error {
        status: 529,
        error_type: "overloaded_error".into(),
        retry_after: Some(60),
    });
    assert_eq!(send(&app, &key, None).await, 200);
    until_cooling(&app, "primary").await;
    app.in_flight.idle().await;
    let token = app.admin_token().await.unwrap();
    let response = app
        .http
        .get(app.url("/admin/upstreams"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains(fakes[0].api_key()), "no key shown: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let upstreams = body["upstreams"].as_array().unwrap();
    let names: Vec<&str> = upstreams
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["primary", "backup", "bedrock-us"]);
    let primary = &upstreams[0];
    assert_eq!(primary["kind"], "anthropic");
    assert_eq!(
        primary["base_url"],
        fakes[0].base_url().trim_end_matches('/')
    );
    assert_eq!(primary["health"]["status"], "cooling");
    assert_eq!(primary["health"]["last_failure"]["kind"], "overloaded");
    assert_eq!(primary["health"]["failures"], 1);
    // Today's traffic: the backup answered the request the primary could
    // not; the primary answered none.
    assert_eq!(primary["today"], json!({"requests": 0, "errors": 0}));
    assert_eq!(upstreams[1]["today"], json!({"requests": 1, "errors": 0}));
    assert!(primary["health"]["cooldown_until"].is_string());
    assert_eq!(upstreams[1]["health"]["status"], "healthy");
    assert_eq!(upstreams[2]["kind"], "bedrock");
    assert_eq!(upstreams[2]["region"], "us-east-1");
    assert_eq!(upstreams[2]["model_map"], json!(["claude-sonnet-4-5"]));
}

#[tokio::test]
async fn a_session_named_only_in_metadata_user_id_stays_on_one_upstream_too() {
    let (_fakes, app) = three_equal_accounts().await;
    let (id, key) = app.new_key().await.unwrap();
    let user_id = json!({"device_id": "d1", "account_uuid": "",
        "session_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7"})
    .to_string();
    for _ in 0..20 {
        let response = app
            .message(&key, "claude-sonnet-4-5")
            .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
                "metadata": {"user_id": user_id},
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let rows = served_by(&app, &id, 20).await;
    assert!(rows.iter().all(|r| *r == rows[0]), "{rows:?}");
}
