//! Proxy routes: forwarding, streaming, usage accounting, admission, retries.

use std::time::Duration;

use futures_util::StreamExt;
use relay_tests::app::{AppOptions, num, spawn_app, spawn_app_with, text};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use relay_tests::sse::parse_sse;
use serde_json::{Value, json};

fn usage(input: u64, output: u64, cache_creation: u64, cache_read: u64) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cache_creation_input_tokens: cache_creation,
        cache_read_input_tokens: cache_read,
        ..Usage::default()
    }
}

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
        usage: usage(472, 33, 100, 2048),
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
        usage: usage(25, 12, 0, 3),
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
            usage: usage(10, 20, 0, 0),
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
        usage: usage(300, 40, 0, 0),
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
    use relay_shared::store::proxy::{SettleOutcome, UsageRecord};
    let app = spawn_app().await.unwrap();
    let (id, _) = app.new_key().await.unwrap();
    let record = UsageRecord {
        request_id: "relay_0123456789abcdef0123456789abcdef".into(),
        key_id: relay_shared::keys::KeyId::parse(&id).unwrap(),
        at: relay_shared::domain::now(),
        model: Some("claude-opus-5-5".into()),
        method: "POST".into(),
        path: "/v1/messages".into(),
        status: 200,
        stream: true,
        usage: relay_shared::usage::TokenUsage {
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
        error_type: None,
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
        usage: usage(7, 3, 0, 0),
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
        usage: usage(50, 500, 0, 0),
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
        usage: usage(11, 22, 0, 0),
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
