//! Attribution (issue 15, point 3): usage rows record the agent, its
//! parent, the request class and the agent type Claude Code names, only in
//! a sanitised form, and the per-class view (key holder and admin) and the
//! session view add up each class's tokens, cost and requests.

use relay_tests::app::{TestApp, spawn_app};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use reqwest::header::HeaderValue;
use serde_json::{Value, json};

const SONNET: &str = "claude-sonnet-4-5-20250929";
const HAIKU: &str = "claude-haiku-4-5-20251001";

/// What a test request sends besides the message: headers as raw bytes
/// (a hostile client sends any).
#[derive(Default)]
struct Sent<'a> {
    session: Option<&'a str>,
    headers: Vec<(&'static str, Vec<u8>)>,
}

fn attributed<'a>(session: Option<&'a str>, headers: &[(&'static str, &str)]) -> Sent<'a> {
    Sent {
        session,
        headers: headers
            .iter()
            .map(|(name, value)| (*name, value.as_bytes().to_vec()))
            .collect(),
    }
}

/// Sends one message billed `usage` as `key`, reads the answer to its end
/// and returns the relay's request id.
async fn send(app: &TestApp, key: &str, model: &str, usage: Usage, sent: &Sent<'_>) -> String {
    app.upstream.push(Behavior::Message(MessageSpec {
        usage,
        ..MessageSpec::default()
    }));
    let mut request = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01");
    if let Some(session) = sent.session {
        request = request.header("x-claude-code-session-id", session);
    }
    for (name, value) in &sent.headers {
        request = request.header(*name, HeaderValue::from_bytes(value).unwrap());
    }
    let response = request
        .json(&json!({
            "model": model,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "say hello"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-relay-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.bytes().await.unwrap();
    request_id
}

async fn get(app: &TestApp, token: &str, path: &str) -> (u16, Value, String) {
    let response = app
        .http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

async fn ok(app: &TestApp, token: &str, path: &str) -> Value {
    let (status, body, text) = get(app, token, path).await;
    assert_eq!(status, 200, "GET {path}: {text}");
    body
}

fn data(body: &Value) -> &Vec<Value> {
    body["data"].as_array().unwrap()
}

fn count(row: &Value, field: &str) -> u64 {
    row[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` is not a count in {row}"))
}

/// A per-class row as (class, requests, input, output, cache writes,
/// cache reads, cost).
type ClassRow<'a> = (&'a str, u64, u64, u64, u64, u64, u64);

/// A per-class row of a view, its `tokens` checked to be the sum.
fn class_row(row: &Value) -> ClassRow<'_> {
    let tokens = count(row, "input_tokens")
        + count(row, "output_tokens")
        + count(row, "cache_creation_input_tokens")
        + count(row, "cache_read_input_tokens");
    assert_eq!(count(row, "tokens"), tokens, "{row}");
    (
        row["request_class"].as_str().unwrap(),
        count(row, "requests"),
        count(row, "input_tokens"),
        count(row, "output_tokens"),
        count(row, "cache_creation_input_tokens"),
        count(row, "cache_read_input_tokens"),
        count(row, "cost_micro_usd"),
    )
}

fn log_row<'a>(logs: &'a Value, request_id: &str) -> &'a Value {
    data(logs)
        .iter()
        .find(|row| row["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no row {request_id} in {logs}"))
}

fn attribution_of(row: &Value) -> [Value; 4] {
    [
        row["agent_id"].clone(),
        row["parent_agent_id"].clone(),
        row["request_class"].clone(),
        row["agent_type"].clone(),
    ]
}

#[tokio::test]
async fn rows_record_the_attribution_headers_only_in_sanitised_form() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let usage = Usage::new(10, 5, 0, 0);

    let plain = send(
        &app,
        &key,
        HAIKU,
        usage,
        &attributed(
            Some("sess-1"),
            &[
                ("x-claude-code-agent-id", "agent-7c9e6679"),
                ("x-claude-code-parent-agent-id", "agent-main"),
                ("x-claude-code-request-class", "subagent"),
                ("x-claude-code-agent-type", "general-purpose"),
            ],
        ),
    )
    .await;
    // Hostile values: a 10 KB id, a tab, non-UTF-8 bytes, markup, an
    // unknown class, a class that tries to look like an attribute name.
    let huge = "a".repeat(10 * 1024);
    let hostile = send(
        &app,
        &key,
        HAIKU,
        usage,
        &Sent {
            session: None,
            headers: vec![
                ("x-claude-code-agent-id", huge.clone().into_bytes()),
                ("x-claude-code-parent-agent-id", b"agent\tparent".to_vec()),
                (
                    "x-claude-code-request-class",
                    b"class|main|requests".to_vec(),
                ),
                ("x-claude-code-agent-type", b"Expl\xc3\xb6re".to_vec()),
            ],
        },
    )
    .await;
    let markup = send(
        &app,
        &key,
        HAIKU,
        usage,
        &attributed(
            None,
            &[
                ("x-claude-code-request-class", "background-job"),
                ("x-claude-code-agent-type", "<script>alert(1)</script>"),
                ("x-claude-code-agent-id", "KEY#other/SESSION#x"),
            ],
        ),
    )
    .await;
    let bare = send(&app, &key, HAIKU, usage, &Sent::default()).await;
    app.wait_for_logs(&id, 4).await.unwrap();

    let (_, logs, text) = get(&app, &key, "/api/usage/logs").await;
    assert_eq!(
        attribution_of(log_row(&logs, &plain)),
        [
            json!("agent-7c9e6679"),
            json!("agent-main"),
            json!("subagent"),
            json!("general-purpose")
        ]
    );
    // An unknown class is recorded as `other`, nothing else of them at all.
    for dropped in [&hostile, &markup] {
        assert_eq!(
            attribution_of(log_row(&logs, dropped)),
            [Value::Null, Value::Null, json!("other"), Value::Null],
            "{dropped}"
        );
    }
    assert_eq!(
        attribution_of(log_row(&logs, &bare)),
        [Value::Null, Value::Null, Value::Null, Value::Null]
    );
    for raw in [
        huge.as_str(),
        "agent\\tparent",
        "class|main",
        "background-job",
        "script",
        "SESSION#x",
    ] {
        assert!(!text.contains(raw), "`{raw}` is in the logs: {text}");
    }
    // The admin's view of the logs shows the same fields.
    let token = app.admin_token().await.unwrap();
    let admin = ok(&app, &token, &format!("/admin/api-keys/{id}/usage/logs")).await;
    assert_eq!(admin, logs);
}

/// A day of one key's traffic, every class among it. The per-class view,
/// the session's per-class rows and the key's totals equal the
/// hand-computed figures, and the classes add up to the key's totals and
/// to the sum of the rows.
#[tokio::test]
async fn the_request_class_view_adds_up_each_class_and_the_classes_add_up_to_the_key() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let class = |name: &'static str| [("x-claude-code-request-class", name)];
    let write_5m = |input, output, written| Usage {
        input_tokens: input,
        output_tokens: output,
        cache_creation_input_tokens: written,
        cache_read_input_tokens: 0,
        cache_5m: written,
        cache_1h: 0,
    };
    // Per million: Sonnet 4.5 $3 in, $15 out, $0.30 read; Haiku 4.5 $1 in,
    // $5 out, $1.25 5-minute write.
    // main 1 (sess-x), Sonnet, in 1000, out 200, read 10,000:
    //   3000 + 3000 + 3000 = 9000 µ$
    let main_1 = Usage::new(1000, 200, 0, 10_000);
    send(
        &app,
        &key,
        SONNET,
        main_1,
        &attributed(Some("sess-x"), &class("main")),
    )
    .await;
    // subagent (sess-x), Haiku, in 500, out 400, 5m write 1000:
    //   500 + 2000 + 1250 = 3750
    let subagent = write_5m(500, 400, 1000);
    let sent = attributed(Some("sess-x"), &class("subagent"));
    send(&app, &key, HAIKU, subagent, &sent).await;
    // compaction (sess-x), Sonnet, in 4000, out 1000: 12,000 + 15,000 = 27,000
    let compaction = Usage::new(4000, 1000, 0, 0);
    let sent = attributed(Some("sess-x"), &class("compaction"));
    send(&app, &key, SONNET, compaction, &sent).await;
    // main 2 (no session), Sonnet, in 2000, out 100: 6000 + 1500 = 7500
    let main_2 = Usage::new(2000, 100, 0, 0);
    send(
        &app,
        &key,
        SONNET,
        main_2,
        &attributed(None, &class("main")),
    )
    .await;
    // an unknown class, Haiku, in 100, out 10: 100 + 50 = 150
    let unknown = Usage::new(100, 10, 0, 0);
    let sent = attributed(None, &class("background"));
    send(&app, &key, HAIKU, unknown, &sent).await;
    // no class, Haiku, in 300, out 20: 300 + 100 = 400
    let none = Usage::new(300, 20, 0, 0);
    send(&app, &key, HAIKU, none, &Sent::default()).await;
    app.wait_for_logs(&id, 6).await.unwrap();

    let view = ok(&app, &key, "/api/usage/request-classes").await;
    let rows: Vec<_> = data(&view).iter().map(class_row).collect();
    // (class, requests, input, output, cache writes, cache reads, cost)
    let expected = [
        ("main", 2, 3000, 300, 0, 10_000, 16_500),
        ("subagent", 1, 500, 400, 1000, 0, 3750),
        ("compaction", 1, 4000, 1000, 0, 0, 27_000),
        ("other", 1, 100, 10, 0, 0, 150),
        ("unclassified", 1, 300, 20, 0, 0, 400),
    ];
    assert_eq!(rows, expected, "{view}");

    // The classes add up to the key's totals (6 requests, 47,800 µ$), and
    // so do the rows.
    let summary = ok(&app, &key, "/api/usage").await;
    let class_sum = |pick: fn(&ClassRow<'_>) -> u64| expected.iter().map(pick).sum::<u64>();
    assert_eq!(
        (
            count(&summary, "requests"),
            count(&summary, "cost_micro_usd"),
            count(&summary, "input_tokens"),
            count(&summary, "output_tokens"),
            count(&summary, "cache_creation_input_tokens"),
            count(&summary, "cache_read_input_tokens"),
        ),
        (
            class_sum(|r| r.1),
            class_sum(|r| r.6),
            class_sum(|r| r.2),
            class_sum(|r| r.3),
            class_sum(|r| r.4),
            class_sum(|r| r.5),
        )
    );
    assert_eq!(
        (
            count(&summary, "requests"),
            count(&summary, "cost_micro_usd")
        ),
        (6, 47_800)
    );
    let logs = ok(&app, &key, "/api/usage/logs").await;
    let row_sum = |field: &str| data(&logs).iter().map(|row| count(row, field)).sum::<u64>();
    for field in [
        "cost_micro_usd",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ] {
        assert_eq!(row_sum(field), count(&summary, field), "{field}");
    }
    assert_eq!(data(&logs).len(), 6);

    // The session's own per-class rows: its three requests.
    let sessions = ok(&app, &key, "/api/usage/sessions").await;
    let session = &data(&sessions)[0];
    assert_eq!(session["session_id"], "sess-x");
    let by_class: Vec<_> = session["by_request_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(class_row)
        .collect();
    assert_eq!(
        by_class,
        [
            ("main", 1, 1000, 200, 0, 10_000, 9000),
            ("subagent", 1, 500, 400, 1000, 0, 3750),
            ("compaction", 1, 4000, 1000, 0, 0, 27_000),
        ]
    );
    assert_eq!(count(session, "cost_micro_usd"), 39_750);

    // The admin sees the same view of the key.
    let token = app.admin_token().await.unwrap();
    let admin = ok(
        &app,
        &token,
        &format!("/admin/api-keys/{id}/usage/request-classes"),
    )
    .await;
    assert_eq!(admin, view);
    // Another key has no classes, and a range without traffic is empty.
    let (_, other) = app.new_key().await.unwrap();
    let theirs = ok(&app, &other, "/api/usage/request-classes").await;
    assert_eq!(data(&theirs).len(), 0);
    let empty = ok(
        &app,
        &key,
        "/api/usage/request-classes?from=2020-01-01&to=2020-01-31",
    )
    .await;
    assert_eq!(
        (&empty["from"], &empty["to"], data(&empty).len()),
        (&json!("2020-01-01"), &json!("2020-01-31"), 0)
    );
}

#[tokio::test]
async fn bad_request_class_ranges_are_400_naming_the_parameter() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let token = app.admin_token().await.unwrap();
    for (query, naming) in [
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("from=2026-02-02&to=2026-02-01", "after"),
        ("from=2024-01-01&to=2026-01-01", "366"),
        ("class=main", "class"),
    ] {
        for (token, path) in [
            (&key, format!("/api/usage/request-classes?{query}")),
            (
                &token,
                format!("/admin/api-keys/{id}/usage/request-classes?{query}"),
            ),
        ] {
            let (status, body, text) = get(&app, token, &path).await;
            assert_eq!(status, 400, "{path}: {text}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{text}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains(naming), "{path}: {message}");
        }
    }
    let (status, _, _) = get(
        &app,
        &token,
        "/admin/api-keys/nosuchkey123/usage/request-classes",
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_session_named_only_in_metadata_user_id_is_recorded_and_grouped() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let session = "0f3c2a1e-9b7d-4c8e-a5f6-1234567890ab";
    let user_id = json!({"device_id": "d1", "session_id": session}).to_string();
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": HAIKU,
            "max_tokens": 64,
            "metadata": {"user_id": user_id},
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(
        relay_tests::app::text(&logs[0], "session_id"),
        Some(session)
    );
    let sessions = ok(&app, &key, "/api/usage/sessions").await;
    assert_eq!(sessions["data"][0]["session_id"], session, "{sessions}");
    assert_eq!(sessions["data"][0]["requests"], 1, "{sessions}");
}
