//! The host's cap on one response (API Gateway: 15 minutes): a stream
//! still running near it is ended by the relay with an `overloaded_error`
//! event, and charged what it streamed. Tested with a shortened cap.

use std::time::Duration;

use relay_tests::app::{AppOptions, num, spawn_app_with, text};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use relay_tests::sse::parse_sse;
use serde_json::{Value, json};

#[tokio::test]
async fn a_stream_past_the_cap_ends_with_a_retryable_error_and_is_charged_what_it_streamed() {
    let mut options = AppOptions::default();
    options.proxy.stream_deadline = Duration::from_millis(1_500);
    let app = spawn_app_with(options).await.unwrap();
    // An answer of 20 deltas, one every 200 ms: four seconds, past the cap.
    app.upstream.set_default(Behavior::Message(MessageSpec {
        usage: Usage::new(300, 100, 0, 0),
        text_chunks: vec!["The relay counts every token. ".into(); 20],
        event_delay: Duration::from_millis(200),
        ..MessageSpec::default()
    }));
    let (id, key) = app.new_key().await.unwrap();
    let started = std::time::Instant::now();
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(
            &json!({"model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut before its end"
    );
    let events = parse_sse(&body);
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    let error: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "overloaded_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("15-minute limit"),
        "{error}"
    );
    // Some deltas made it, the end did not.
    let deltas = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .count();
    assert!((1..20).contains(&deltas), "{deltas}");
    assert!(
        !events
            .iter()
            .any(|e| e.event.as_deref() == Some("message_stop"))
    );

    // Charged what it streamed: the prompt as the upstream reported it,
    // the output estimated from the deltas seen, flagged as estimated.
    app.in_flight.idle().await;
    let log = &app.wait_for_logs(&id, 1).await.unwrap()[0];
    assert_eq!(num(log, "input_tokens"), 300);
    let output = num(log, "output_tokens");
    assert!((1..100).contains(&output), "{output}");
    assert_eq!(
        log.get("estimated").and_then(|v| v.as_bool().ok()),
        Some(&true)
    );
    assert_eq!(text(log, "error_type"), Some("overloaded_error"));
    assert_eq!(num(log, "cost_micro_usd"), 300 * 3 + output * 15);
}
