//! Proxy routes: forwarding, streaming, usage accounting, admission, retries.

use std::time::Duration;

use futures_util::StreamExt;
use relay_tests::app::{AppOptions, num, spawn_app, spawn_app_with, text};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use relay_tests::sse::parse_sse;
use serde_json::{Value, json};

fn message_body(stream: bool) -> Value {
    json!({
        "model": "claude-haiku-5-5",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": "say hello"}]
    })
}

#[tokio::test]
async fn streamed_answer_split_at_odd_bytes_is_billed_exactly() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(472, 33, 100, 2048),
        chunk_split: Some(7),
        thinking: true,
        tool_use: true,
        usage_steps: 3,
        ..MessageSpec::default()
    }));

    let response = app
        .http
        .post(app.url("/v1/messages?beta=true"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&message_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-relay-request-id"));
    assert!(!response.headers().contains_key("anthropic-organization-id"));
    let body = response.bytes().await.unwrap();
    let events = parse_sse(&body);
    assert_eq!(
        events.last().unwrap().event.as_deref(),
        Some("message_stop")
    );

    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(logs.len(), 1);
    let log = &logs[0];
    assert_eq!(num(log, "input_tokens"), 472);
    assert_eq!(num(log, "output_tokens"), 33);
    assert_eq!(num(log, "cache_creation_input_tokens"), 100);
    assert_eq!(num(log, "cache_read_input_tokens"), 2048);
    assert_eq!(text(log, "model"), Some("claude-haiku-5-5"));
    assert!(matches!(
        log.get("estimated"),
        Some(aws_sdk_dynamodb::types::AttributeValue::Bool(false))
    ));
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(record.tokens_used, 472 + 33 + 100 + 2048);
}

#[tokio::test]
async fn non_streamed_answer_is_billed_from_its_usage_object() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(25, 12, 0, 3),
        ..MessageSpec::default()
    }));
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .bearer_auth(&key)
        .json(&message_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["input_tokens"], 25);
    app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 40);
}

/// A captured client request from ../shared/fixtures.
struct Fixture {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn fixture(name: &str) -> Fixture {
    let path = format!(
        "{}/../../shared/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    Fixture {
        method: raw["method"].as_str().unwrap().to_owned(),
        path: raw["path"].as_str().unwrap().to_owned(),
        query: raw["query"].as_str().unwrap().to_owned(),
        headers: raw["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_owned(),
                    h[1].as_str().unwrap().to_owned(),
                )
            })
            .collect(),
        body: serde_json::to_vec(&raw["body"]).unwrap(),
    }
}

/// Headers the relay replaces or that HTTP clients set per connection.
const NOT_FORWARDED: &[&str] = &[
    "x-api-key",
    "authorization",
    "connection",
    "content-length",
    "accept-encoding",
    "host",
];

#[tokio::test]
async fn captured_client_requests_are_forwarded_byte_identical_except_credentials() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    for name in [
        "claude-code-2.1.330-messages-stream.json",
        "sdk-python-2.12.0-messages-stream.json",
        "sdk-js-0.137.0-count-tokens.json",
    ] {
        let fixture = fixture(name);
        app.upstream.clear_requests();
        let url = if fixture.query.is_empty() {
            app.url(&fixture.path)
        } else {
            app.url(&format!("{}?{}", fixture.path, fixture.query))
        };
        let mut request = app
            .http
            .request(fixture.method.parse().unwrap(), url)
            .body(fixture.body.clone());
        for (name, value) in &fixture.headers {
            let value = match name.to_ascii_lowercase().as_str() {
                "x-api-key" => key.clone(),
                "authorization" => format!("Bearer {key}"),
                // Framing is the HTTP client's: the body was re-serialised.
                "content-length" | "connection" => continue,
                _ => value.clone(),
            };
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{name}");
        let _ = response.bytes().await.unwrap();

        let received = app.upstream.requests();
        assert_eq!(received.len(), 1, "{name}");
        let seen = &received[0];
        assert_eq!(seen.method, fixture.method);
        assert_eq!(seen.path, fixture.path);
        assert_eq!(seen.query.as_deref().unwrap_or(""), fixture.query, "{name}");
        assert_eq!(
            seen.body.as_ref(),
            fixture.body.as_slice(),
            "{name}: body changed"
        );
        assert_eq!(seen.header("x-api-key"), Some(app.upstream.api_key()));
        assert_eq!(seen.header("authorization"), None);
        let mut expected: Vec<(String, String)> = fixture
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .filter(|(n, _)| !NOT_FORWARDED.contains(&n.as_str()))
            .collect();
        let mut forwarded: Vec<(String, String)> = seen
            .headers
            .iter()
            .filter(|(n, _)| !NOT_FORWARDED.contains(&n.as_str()))
            .cloned()
            .collect();
        expected.sort();
        forwarded.sort();
        assert_eq!(forwarded, expected, "{name}: headers changed");
    }
}

#[tokio::test]
async fn gzip_compressed_answers_still_yield_exact_usage() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    for stream in [false, true] {
        app.upstream.push(Behavior::Message(MessageSpec {
            usage: Usage::new(10, 20, 0, 0),
            gzip: true,
            ..MessageSpec::default()
        }));
        let response = app
            .http
            .post(app.url("/v1/messages"))
            .header("x-api-key", &key)
            .header("accept-encoding", "gzip, br")
            .json(&message_body(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-encoding"], "gzip");
        let _ = response.bytes().await.unwrap();
    }
    assert_eq!(
        app.upstream.requests()[0].header("accept-encoding"),
        Some("gzip"),
        "only encodings the relay can read are offered upstream"
    );
    let logs = app.wait_for_logs(&id, 2).await.unwrap();
    assert!(logs.iter().all(|log| num(log, "output_tokens") == 20));
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 60);
}

#[tokio::test]
async fn client_that_disconnects_mid_stream_is_still_billed_exactly() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(300, 40, 0, 0),
        text_chunks: (0..40).map(|i| format!("word{i} ")).collect(),
        event_delay: Duration::from_millis(25),
        ..MessageSpec::default()
    }));
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(true))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(stream);

    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(logs.len(), 1, "the abandoned request was settled");
    assert_eq!(num(&logs[0], "input_tokens"), 300);
    assert_eq!(num(&logs[0], "output_tokens"), 40, "exact, not estimated");
    assert!(matches!(
        logs[0].get("estimated"),
        Some(aws_sdk_dynamodb::types::AttributeValue::Bool(false))
    ));
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 340);
}

#[tokio::test]
async fn settling_the_same_request_twice_counts_it_once() {
    use relay_shared::domain::usage::UsageRecord;
    use relay_shared::store::settlement::SettleOutcome;
    let app = spawn_app().await.unwrap();
    let (id, _) = app.new_key().await.unwrap();
    let record = UsageRecord {
        request_id: "relay_0123456789abcdef0123456789abcdef".into(),
        key_id: relay_shared::domain::key::KeyId::parse(&id).unwrap(),
        at: relay_shared::domain::now(),
        model: Some("claude-opus-5-5".into()),
        requested_model: None,
        method: "POST".into(),
        path: "/v1/messages".into(),
        status: 200,
        stream: true,
        usage: relay_shared::domain::usage::TokenUsage {
            input_tokens: 100,
            output_tokens: 50,
            ..Default::default()
        },
        estimated: false,
        latency_ms: 10,
        ttfb_ms: Some(5),
        retries: 0,
        client_ip: "127.0.0.1".into(),
        user_agent: None,
        session_id: None,
        attribution: Default::default(),
        error_type: None,
        upstream: None,
        cost: Default::default(),
        budget: Default::default(),
    };
    let retention = Duration::from_secs(86_400);
    assert_eq!(
        app.store.settle(&record, retention).await.unwrap(),
        SettleOutcome::Recorded
    );
    assert_eq!(
        app.store.settle(&record, retention).await.unwrap(),
        SettleOutcome::AlreadyRecorded
    );
    assert_eq!(app.items(&id, "LOG#").await.unwrap().len(), 1);
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 150);
    let days = app.items(&id, "DAY#").await.unwrap();
    assert_eq!(num(&days[0], "requests"), 1);
    assert_eq!(num(&days[0], "input_tokens"), 100);
    let models = app.items(&id, "MODEL#").await.unwrap();
    assert_eq!(num(&models[0], "output_tokens"), 50);
}

#[tokio::test]
async fn concurrent_requests_on_one_key_are_each_counted_once() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.set_default(Behavior::Message(MessageSpec {
        usage: Usage::new(7, 3, 0, 0),
        ..MessageSpec::default()
    }));
    let requests = (0..24).map(|i| {
        let request = app
            .http
            .post(app.url("/v1/messages"))
            .header("x-api-key", &key)
            .json(&message_body(i % 2 == 0));
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }
    });
    futures_util::future::join_all(requests).await;
    let logs = app.wait_for_logs(&id, 24).await.unwrap();
    assert_eq!(logs.len(), 24);
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(record.tokens_used, 24 * 10);
    let key_item = app.items(&id, "META").await.unwrap();
    assert_eq!(num(&key_item[0], "requests"), 24);
}

#[tokio::test]
async fn overloaded_upstream_is_retried_and_the_retries_recorded() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Error {
        status: 529,
        error_type: "overloaded_error".into(),
        retry_after: None,
    });
    app.upstream.push(Behavior::Error {
        status: 429,
        error_type: "rate_limit_error".into(),
        retry_after: Some(0),
    });
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await.unwrap();
    assert_eq!(app.upstream.requests().len(), 3);
    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(num(&logs[0], "retries"), 2);
    assert_eq!(num(&logs[0], "status"), 200);
}

#[tokio::test]
async fn rate_limit_beyond_the_retry_budget_reaches_the_client_with_retry_after() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Error {
        status: 429,
        error_type: "rate_limit_error".into(),
        retry_after: Some(120),
    });
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "120");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(
        app.upstream.requests().len(),
        1,
        "not retried: the wait exceeds the budget"
    );
    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(text(&logs[0], "error_type"), Some("rate_limit_error"));
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 0);
}

#[tokio::test]
async fn client_errors_from_upstream_are_returned_at_once() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Error {
        status: 400,
        error_type: "invalid_request_error".into(),
        retry_after: None,
    });
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(app.upstream.requests().len(), 1);
}

#[tokio::test]
async fn stream_cut_before_usage_is_charged_an_estimate_and_ends_with_an_error_event() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(50, 500, 0, 0),
        text_chunks: vec!["The quick brown fox jumps over the lazy dog. ".repeat(4)],
        cut_after_events: Some(5),
        ..MessageSpec::default()
    }));
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    let events = parse_sse(&body);
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    assert_eq!(last.json().unwrap()["error"]["type"], "api_error");

    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    let log = &logs[0];
    assert!(matches!(
        log.get("estimated"),
        Some(aws_sdk_dynamodb::types::AttributeValue::Bool(true))
    ));
    assert_eq!(
        num(log, "input_tokens"),
        50,
        "input reported by message_start is kept"
    );
    let output = num(log, "output_tokens");
    assert!(
        (30..=60).contains(&output),
        "estimated from the deltas seen: {output}"
    );
}

#[tokio::test]
async fn in_stream_error_event_is_passed_on_and_recorded() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Message(MessageSpec {
        error_event_after: Some(4),
        ..MessageSpec::default()
    }));
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(true))
        .send()
        .await
        .unwrap();
    let body = response.bytes().await.unwrap();
    let events = parse_sse(&body);
    assert!(events.iter().any(|e| e.event.as_deref() == Some("ping")));
    assert_eq!(events.last().unwrap().event.as_deref(), Some("error"));
    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(text(&logs[0], "error_type"), Some("overloaded_error"));
}

#[tokio::test]
async fn slow_first_byte_of_a_stream_is_kept_alive_then_relayed() {
    let mut options = AppOptions::default();
    options.proxy.keepalive_after = Duration::from_millis(100);
    options.proxy.keepalive_interval = Duration::from_millis(100);
    let app = spawn_app_with(options).await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(11, 22, 0, 0),
        first_byte_delay: Duration::from_millis(450),
        ..MessageSpec::default()
    }));
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    assert!(body.starts_with(": keepalive\n\n"), "{body}");
    let events = parse_sse(body.as_bytes());
    assert_eq!(
        events.last().unwrap().event.as_deref(),
        Some("message_stop")
    );
    app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 33);
}

#[tokio::test]
async fn upstream_that_never_answers_gets_a_gateway_timeout() {
    let mut options = AppOptions::default();
    options.upstream.header_timeout = Duration::from_millis(300);
    let app = spawn_app_with(options).await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Hang);
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "api_error");
    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(num(&logs[0], "status"), 504);
}

#[tokio::test]
async fn upstream_rejecting_the_relay_key_is_a_502_that_blames_the_relay() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    app.upstream.set_api_key("sk-ant-some-other-key");
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&message_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream key")
    );
}

async fn post_message(app: &relay_tests::app::TestApp, key: &str) -> reqwest::Response {
    app.http
        .post(app.url("/v1/messages"))
        .header("x-api-key", key)
        .json(&message_body(false))
        .send()
        .await
        .unwrap()
}

async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    (
        status,
        body["error"]["type"].as_str().unwrap().to_owned(),
        body["error"]["message"].as_str().unwrap().to_owned(),
    )
}

async fn admin_request(
    app: &relay_tests::app::TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let token = app.admin_token().await.unwrap();
    let mut request = app.http.request(method, app.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

#[tokio::test]
async fn missing_malformed_and_unknown_keys_are_401() {
    let app = spawn_app().await.unwrap();
    let unknown = relay_shared::domain::key::PresentedKey::generate().expose();
    let cases = [
        app.http
            .post(app.url("/v1/messages"))
            .json(&message_body(false)),
        app.http
            .post(app.url("/v1/messages"))
            .header("x-api-key", "sk-ant-api03-real-looking")
            .json(&message_body(false)),
        app.http
            .post(app.url("/v1/messages"))
            .header("authorization", "Bearer sk-proxy-tooshort")
            .json(&message_body(false)),
        app.http
            .post(app.url("/v1/messages"))
            .header("x-api-key", &unknown)
            .json(&message_body(false)),
        app.http
            .get(app.url("/v1/models"))
            .header("x-api-key", &unknown),
        app.http.get(app.url("/v1/files")),
    ];
    for request in cases {
        let (status, kind, _) = error_of(request.send().await.unwrap()).await;
        assert_eq!((status, kind.as_str()), (401, "authentication_error"));
    }
    assert!(
        app.upstream.requests().is_empty(),
        "nothing unauthenticated reaches upstream"
    );
}

#[tokio::test]
async fn disabled_expired_and_rotated_keys_stop_working_at_once() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    assert_eq!(post_message(&app, &key).await.status(), 200);

    let path = format!("/admin/api-keys/{id}");
    admin_request(
        &app,
        reqwest::Method::POST,
        &format!("{path}/disable"),
        None,
    )
    .await;
    let (status, kind, message) = error_of(post_message(&app, &key).await).await;
    assert_eq!((status, kind.as_str()), (403, "permission_error"));
    assert!(message.contains("disabled"));

    admin_request(&app, reqwest::Method::POST, &format!("{path}/enable"), None).await;
    assert_eq!(post_message(&app, &key).await.status(), 200);

    let rotated = admin_request(&app, reqwest::Method::POST, &format!("{path}/rotate"), None).await;
    let new_key = rotated["api_key"].as_str().unwrap();
    let (status, _, _) = error_of(post_message(&app, &key).await).await;
    assert_eq!(status, 401, "the old secret stops at once, cache or not");
    assert_eq!(post_message(&app, new_key).await.status(), 200);

    admin_request(
        &app,
        reqwest::Method::PATCH,
        &path,
        Some(json!({"expires_at": "2020-01-01T00:00:00Z"})),
    )
    .await;
    let (status, _, message) = error_of(post_message(&app, new_key).await).await;
    assert_eq!(status, 403);
    assert!(message.contains("expired"));
}

#[tokio::test]
async fn ip_origin_and_model_allowlists_are_enforced() {
    let app = spawn_app().await.unwrap();
    let elsewhere = app
        .create_key(json!({"name": "office only", "allowed_ips": ["10.0.0.0/8"]}))
        .await
        .unwrap();
    let (status, _, message) =
        error_of(post_message(&app, elsewhere["api_key"].as_str().unwrap()).await).await;
    assert_eq!(status, 403);
    assert!(message.contains("IP"));
    // A forged X-Forwarded-For changes nothing: the socket peer counts.
    let forged = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", elsewhere["api_key"].as_str().unwrap())
        .header("x-forwarded-for", "10.1.2.3")
        .json(&message_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);

    let loopback = app
        .create_key(json!({"name": "here", "allowed_ips": ["127.0.0.0/8"], "allowed_origins": ["*.example.com"], "allowed_models": ["claude-haiku-*"]}))
        .await
        .unwrap();
    let key = loopback["api_key"].as_str().unwrap();
    let send = |origin: Option<&str>, model: &str| {
        let mut request = app
            .http
            .post(app.url("/v1/messages"))
            .header("x-api-key", key)
            .json(&json!({"model": model, "max_tokens": 5, "messages": []}));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    assert_eq!(
        send(Some("https://app.example.com"), "claude-haiku-5-5")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(send(None, "claude-haiku-5-5").await.unwrap().status(), 403);
    assert_eq!(
        send(Some("https://evil.com"), "claude-haiku-5-5")
            .await
            .unwrap()
            .status(),
        403
    );
    let (status, _, message) = error_of(
        send(Some("https://app.example.com"), "claude-opus-5-5")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    assert!(message.contains("claude-opus-5-5"));
    assert_eq!(app.upstream.requests().len(), 1);
}

#[tokio::test]
async fn tier_rate_limit_answers_429_with_retry_after() {
    let app = spawn_app().await.unwrap();
    admin_request(
        &app,
        reqwest::Method::PUT,
        "/admin/tiers/tiny",
        Some(json!({"requests": 2, "period": 3600})),
    )
    .await;
    let created = app
        .create_key(json!({"name": "t", "rate_limit_tier": "tiny"}))
        .await
        .unwrap();
    let key = created["api_key"].as_str().unwrap();
    assert_eq!(post_message(&app, key).await.status(), 200);
    assert_eq!(post_message(&app, key).await.status(), 200);
    let response = post_message(&app, key).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry_after));
    let (status, kind, _) = error_of(response).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limit_error"));
    assert_eq!(app.upstream.requests().len(), 2);
}

#[tokio::test]
async fn exhausted_token_quota_stops_client_retries() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app
        .new_key_with(json!({"name": "q", "token_limit": 30}))
        .await
        .unwrap();
    let (id, key) = (id.as_str(), key.as_str());
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(25, 12, 0, 0),
        ..MessageSpec::default()
    }));
    assert_eq!(post_message(&app, key).await.status(), 200);
    app.wait_for_logs(id, 1).await.unwrap();
    let response = post_message(&app, key).await;
    assert_eq!(response.headers()["x-should-retry"], "false");
    assert!(!response.headers().contains_key("retry-after"));
    let (status, kind, message) = error_of(response).await;
    assert_eq!((status, kind.as_str()), (429, "rate_limit_error"));
    assert!(message.contains("37 of 30"), "{message}");
    assert_eq!(app.upstream.requests().len(), 1);
}

#[tokio::test]
async fn count_tokens_models_and_hello_are_answered_but_never_charged() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let count = app
        .http
        .post(app.url("/v1/messages/count_tokens"))
        .header("x-api-key", &key)
        .json(
            &json!({"model": "claude-haiku-5-5", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(count.status(), 200);
    assert!(count.json::<Value>().await.unwrap()["input_tokens"].is_u64());
    let models = app
        .http
        .get(app.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let hello = app.http.head(app.url("/api/hello")).send().await.unwrap();
    assert_eq!(hello.status(), 200);
    assert_eq!(
        app.upstream.requests().len(),
        2,
        "hello is answered by the relay"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(app.items(&id, "LOG#").await.unwrap().is_empty());
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(record.tokens_used, 0);
    assert_eq!(
        record.rate_window, None,
        "not counted against the rate window"
    );
}

#[tokio::test]
async fn body_over_the_lambda_limit_is_413_before_anything_goes_upstream() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let huge = json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(6 * 1024 * 1024)}]});
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&huge)
        .send()
        .await
        .unwrap();
    let (status, kind, _) = error_of(response).await;
    assert_eq!((status, kind.as_str()), (413, "request_too_large"));
    assert!(app.upstream.requests().is_empty());
}

#[tokio::test]
async fn malformed_message_body_is_400_from_the_relay() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body("{\"model\": \"m\", \"messages\": [")
        .send()
        .await
        .unwrap();
    let (status, kind, _) = error_of(response).await;
    assert_eq!((status, kind.as_str()), (400, "invalid_request_error"));
    assert!(app.upstream.requests().is_empty());
}

/// Collects everything the relay logs on this test's thread.
#[derive(Clone, Default)]
struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn keys_and_bodies_never_appear_in_logs_or_responses() {
    let capture = LogCapture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let secret_text = "TOP-SECRET-PROMPT-TEXT";
    let body = json!({"model": "claude-haiku-5-5", "max_tokens": 5, "stream": true, "messages": [{"role": "user", "content": secret_text}]});
    let mut seen = Vec::new();
    for behavior in [
        Behavior::Message(MessageSpec::default()),
        Behavior::Error {
            status: 529,
            error_type: "overloaded_error".into(),
            retry_after: None,
        },
        Behavior::Message(MessageSpec {
            cut_after_events: Some(3),
            ..MessageSpec::default()
        }),
    ] {
        app.upstream.set_default(behavior);
        let response = app
            .http
            .post(app.url("/v1/messages"))
            .header("x-api-key", &key)
            .json(&body)
            .send()
            .await
            .unwrap();
        for (name, value) in response.headers() {
            seen.push(format!("{name}: {}", value.to_str().unwrap_or("")));
        }
        seen.push(String::from_utf8_lossy(&response.bytes().await.unwrap()).into_owned());
    }
    // Failed logins and admin calls log too.
    let _ = app
        .http
        .post(app.url("/admin/login"))
        .basic_auth("admin", Some("wrong-password"))
        .send()
        .await;
    let token = app.admin_token().await.unwrap();
    let _ = app
        .http
        .get(app.url("/admin/api-keys"))
        .bearer_auth(&token)
        .send()
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    std::fs::write(std::env::temp_dir().join("relay-log-capture.txt"), &logs).unwrap();
    assert!(
        logs.contains("retrying upstream"),
        "the capture works ({} bytes)",
        logs.len()
    );
    let responses = seen.join("\n");
    let secret_part = &key[key.len() - 32..];
    for (what, needle) in [
        ("upstream key", app.upstream.api_key()),
        ("relay key secret", secret_part),
        ("admin password", "wrong-password"),
        ("admin JWT", token.as_str()),
        ("JWT secret", app.jwt_secret.as_str()),
        ("request body", secret_text),
    ] {
        assert!(!logs.contains(needle), "{what} appears in the logs");
        if what != "request body" {
            assert!(!responses.contains(needle), "{what} appears in a response");
        }
    }
}

#[tokio::test]
async fn every_log_line_of_a_retried_then_cut_request_names_its_request_and_key() {
    let capture = LogCapture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("relay_shared=trace"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    capture.0.lock().unwrap().clear();
    app.upstream.push(Behavior::error(529, "overloaded_error"));
    app.upstream.push(Behavior::Message(MessageSpec {
        cut_after_events: Some(3),
        ..MessageSpec::default()
    }));
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(
            &json!({"model": "claude-haiku-5-5", "max_tokens": 5, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    let request_id = response.headers()["x-relay-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let _ = response.bytes().await;
    app.wait_for_logs(&id, 1).await.unwrap();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    for expected in ["retrying upstream", "upstream answer cut short"] {
        assert!(logs.contains(expected), "no `{expected}` line in:\n{logs}");
    }
    for line in logs.lines().filter(|line| !line.trim().is_empty()) {
        assert!(
            line.contains(&format!("request_id={request_id}")),
            "a line without the request id: {line}"
        );
        assert!(
            line.contains(&format!("key_id={id}")),
            "a line without the key id: {line}"
        );
    }
}

#[tokio::test]
async fn upstream_key_rotated_in_secrets_manager_is_reread_after_a_401() {
    use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
    let endpoint = std::env::var("SECRETSMANAGER_ENDPOINT")
        .expect("SECRETSMANAGER_ENDPOINT: run with `make test`, which starts moto");
    let client = aws_sdk_secretsmanager::Client::from_conf(
        aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "relay-tests"))
            .endpoint_url(&endpoint)
            .build(),
    );
    let secret = |upstream_key: &str| {
        json!({
            "upstream_api_key": upstream_key,
            "admin_password_hash": relay_tests::app::admin_password_hash().unwrap(),
            "jwt_secret": "jwt-secret-from-secrets-manager",
        })
        .to_string()
    };
    let created = client
        .create_secret()
        .name(format!("relay-test-{}", uuid::Uuid::new_v4().simple()))
        .secret_string(secret(relay_tests::fake_upstream::DEFAULT_API_KEY))
        .send()
        .await
        .unwrap();
    let arn = created.arn().unwrap();
    let secrets = relay_shared::secrets::Secrets::from_secrets_manager(
        arn,
        Some(&endpoint),
        Duration::from_secs(300),
        Duration::from_millis(200),
    )
    .await;
    let app = spawn_app_with(AppOptions {
        secrets: Some(secrets),
        ..AppOptions::default()
    })
    .await
    .unwrap();
    let (_, key) = app.new_key().await.unwrap();
    assert_eq!(post_message(&app, &key).await.status(), 200);

    client
        .put_secret_value()
        .secret_id(arn)
        .secret_string(secret("sk-ant-rotated-upstream-key"))
        .send()
        .await
        .unwrap();
    app.upstream.set_api_key("sk-ant-rotated-upstream-key");
    tokio::time::sleep(Duration::from_millis(250)).await;

    assert_eq!(post_message(&app, &key).await.status(), 200);
    let keys: Vec<String> = app
        .upstream
        .requests()
        .iter()
        .map(|r| r.header("x-api-key").unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        keys,
        [
            relay_tests::fake_upstream::DEFAULT_API_KEY,
            relay_tests::fake_upstream::DEFAULT_API_KEY,
            "sk-ant-rotated-upstream-key"
        ],
        "cached key, its 401, then the re-read key"
    );
}
