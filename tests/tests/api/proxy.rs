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
