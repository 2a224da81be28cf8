//! The Bedrock upstream against the fake Bedrock runtime: what reaches
//! Bedrock, and that its answers read exactly like Anthropic's.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use relay_shared::bedrock::{BedrockSendError, BedrockSettings, BedrockUpstream};
use relay_shared::domain::bedrock::{PING, bedrock_request};
use relay_shared::domain::usage::{AnswerUsage, SseUsageParser};
use relay_shared::upstream::UpstreamResponse;
use relay_tests::fake_bedrock::{BedrockBehavior, FakeBedrock};
use relay_tests::fake_upstream::{Behavior, FakeUpstream, MessageSpec, Usage};
use relay_tests::sse::parse_sse;
use serde_json::{Value, json};

const OPUS_ID: &str = "global.anthropic.claude-opus-5-5-v1:0";
const HAIKU_ID: &str = "us.anthropic.claude-haiku-5-5-v1:0";
const LONG: Duration = Duration::from_secs(60);

fn model_map() -> BTreeMap<String, String> {
    [("claude-opus-5-5", OPUS_ID), ("claude-haiku-5-5", HAIKU_ID)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn upstream(fake: &FakeBedrock) -> BedrockUpstream {
    // Credentials come from the default chain: the test environment's
    // AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    BedrockUpstream::new(BedrockSettings {
        region: "us-east-1".to_owned(),
        endpoint_url: Some(fake.endpoint_url()),
        model_map: model_map(),
    })
    .await
}

async fn body_of(response: UpstreamResponse) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunks = response.body;
    while let Some(chunk) = chunks.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    body
}

fn stream_request(model: &str) -> Vec<u8> {
    json!({"model": model, "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string()
    .into_bytes()
}

/// A captured client request from ../shared/fixtures: its `anthropic-beta`
/// values and its body.
fn fixture(name: &str) -> (Vec<String>, Vec<u8>) {
    let path = format!(
        "{}/../../shared/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let betas = raw["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| {
            h[0].as_str()
                .unwrap()
                .eq_ignore_ascii_case("anthropic-beta")
        })
        .map(|h| h[1].as_str().unwrap().to_owned())
        .collect();
    (betas, serde_json::to_vec(&raw["body"]).unwrap())
}

#[tokio::test]
async fn a_claude_code_request_reaches_bedrock_translated_with_rejected_betas_stripped() {
    let fake = FakeBedrock::start().await.unwrap();
    let (betas, body) = fixture("claude-code-2.1.330-messages-stream.json");
    let betas: Vec<&str> = betas.iter().map(String::as_str).collect();
    let response = upstream(&fake)
        .await
        .send(&body, &betas, LONG)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    body_of(response).await;

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let seen = &requests[0];
    assert_eq!(seen.operation, "invoke-with-response-stream");
    assert_eq!(seen.model_id, OPUS_ID);
    assert_eq!(seen.body["anthropic_version"], "bedrock-2023-05-31");
    // The fixture's header: claude-code (conflicting reports, stripped),
    // per-turn-control (rejected) leave; advanced-tool-use is renamed.
    assert_eq!(
        seen.body["anthropic_beta"],
        json!([
            "interleaved-thinking-2025-05-14",
            "context-management-2025-06-27",
            "mid-conversation-tool-changes-2026-07-01",
            "thinking-token-count-2026-05-13",
            "tool-search-tool-2025-10-19",
            "effort-2025-11-24"
        ])
    );
    assert!(seen.body.get("model").is_none());
    assert!(seen.body.get("stream").is_none());
    // The field of a supported beta stays with it, and the rest is intact.
    let original: Value = serde_json::from_slice(&body).unwrap();
    for field in [
        "context_management",
        "thinking",
        "output_config",
        "metadata",
        "messages",
        "system",
        "tools",
        "max_tokens",
    ] {
        assert_eq!(seen.body[field], original[field], "{field}");
    }
}

#[tokio::test]
async fn a_rejected_beta_leaves_with_its_field_and_a_supported_one_stays_with_its_own() {
    let fake = FakeBedrock::start().await.unwrap();
    let body = json!({"model": "claude-haiku-5-5", "max_tokens": 8, "stream": true,
        "messages": [{"role": "user", "content": "hi"}],
        "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}],
        "context_management": {"edits": []}});
    let response = upstream(&fake)
        .await
        .send(
            body.to_string().as_bytes(),
            &[
                "oauth-2025-04-20,mcp-client-2025-04-04",
                "context-management-2025-06-27",
            ],
            LONG,
        )
        .await
        .unwrap();
    body_of(response).await;
    let seen = &fake.requests()[0];
    assert_eq!(seen.model_id, HAIKU_ID);
    assert!(seen.body.get("mcp_servers").is_none());
    assert_eq!(seen.body["context_management"], json!({"edits": []}));
    assert_eq!(
        seen.body["anthropic_beta"],
        json!(["context-management-2025-06-27"])
    );
}

#[test]
fn every_fixture_translates_into_a_valid_bedrock_request() {
    for name in [
        "claude-code-2.1.330-messages-stream.json",
        "sdk-python-2.12.0-messages-stream.json",
        "sdk-js-0.137.0-count-tokens.json",
    ] {
        let (betas, body) = fixture(name);
        let betas: Vec<&str> = betas.iter().map(String::as_str).collect();
        let request = bedrock_request(&body, &betas, &model_map()).unwrap();
        let translated: Value = serde_json::from_slice(&request.body).unwrap();
        let original: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            translated["anthropic_version"], "bedrock-2023-05-31",
            "{name}"
        );
        assert!(
            translated.get("model").is_none() && translated.get("stream").is_none(),
            "{name}"
        );
        assert_eq!(translated["messages"], original["messages"], "{name}");
        assert_eq!(
            request.streamed,
            original["stream"] == json!(true),
            "{name}"
        );
        assert!(
            request.model_id == OPUS_ID || request.model_id == HAIKU_ID,
            "{name}"
        );
    }
}

/// The Anthropic fake's streamed answer for `spec`.
async fn anthropic_stream(spec: MessageSpec) -> Vec<u8> {
    let anthropic = FakeUpstream::start().await.unwrap();
    anthropic.set_default(Behavior::Message(spec));
    reqwest::Client::new()
        .post(format!("{}/v1/messages", anthropic.base_url()))
        .header("x-api-key", anthropic.api_key())
        .header("anthropic-version", "2023-06-01")
        .body(stream_request("claude-opus-5-5"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

fn usage_of(body: &[u8]) -> AnswerUsage {
    let mut parser = SseUsageParser::new();
    parser.feed(body);
    parser.into_state()
}

#[tokio::test]
async fn a_bedrock_stream_reads_as_the_same_anthropic_events_and_usage() {
    let usage = Usage {
        input_tokens: 1234,
        output_tokens: 56,
        cache_creation_input_tokens: 700,
        cache_read_input_tokens: 8000,
        cache_5m: 300,
        cache_1h: 400,
    };
    let anthropic = anthropic_stream(MessageSpec {
        usage,
        thinking: true,
        tool_use: true,
        ..MessageSpec::default()
    })
    .await;
    let anthropic_events = parse_sse(&anthropic);
    // Bedrock carries every event but Anthropic's ping, one per chunk, and
    // adds its metrics to the last.
    let mut chunks: Vec<String> = anthropic_events
        .iter()
        .filter(|e| e.event.as_deref() != Some("ping"))
        .map(|e| e.data.clone())
        .collect();
    let last = chunks.pop().unwrap();
    let mut last: Value = serde_json::from_str(&last).unwrap();
    last["amazon-bedrock-invocationMetrics"] =
        json!({"inputTokenCount": 1234, "outputTokenCount": 56});
    chunks.push(last.to_string());

    let fake = FakeBedrock::start().await.unwrap();
    fake.set_events(chunks);
    let response = upstream(&fake)
        .await
        .send(&stream_request("claude-opus-5-5"), &[], LONG)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["content-type"], "text/event-stream");
    let bedrock = body_of(response).await;

    let expected: Vec<_> = anthropic_events
        .into_iter()
        .filter(|e| e.event.as_deref() != Some("ping"))
        .collect();
    assert_eq!(parse_sse(&bedrock), expected);
    let (from_bedrock, from_anthropic) = (usage_of(&bedrock), usage_of(&anthropic));
    assert!(from_bedrock.is_complete() && from_bedrock.saw_message_stop);
    assert_eq!(from_bedrock.usage, from_anthropic.usage);
    assert_eq!(from_bedrock.usage.input_tokens, 1234);
    assert_eq!(from_bedrock.usage.output_tokens, 56);
    assert_eq!(from_bedrock.usage.cache_creation_input_tokens, 700);
    assert_eq!(from_bedrock.usage.cache_read_input_tokens, 8000);
    assert_eq!(from_bedrock.usage.cache_creation_5m, 300);
    assert_eq!(from_bedrock.usage.cache_creation_1h, 400);
}

#[tokio::test]
async fn a_silent_bedrock_stream_gets_the_relays_pings() {
    let fake = FakeBedrock::start().await.unwrap();
    fake.set_gap(Duration::from_millis(400));
    let response = upstream(&fake)
        .await
        .send(
            &stream_request("claude-opus-5-5"),
            &[],
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    let body = body_of(response).await;
    let events = parse_sse(&body);
    let pings = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("ping"))
        .count();
    assert!(pings >= 1, "no ping in {}", String::from_utf8_lossy(&body));
    let ping = String::from_utf8(PING.to_vec()).unwrap();
    assert!(String::from_utf8(body.clone()).unwrap().contains(&ping));
    // The pings come between events, never inside one, and the answer is whole.
    let answer = usage_of(&body);
    assert!(answer.is_complete() && answer.saw_message_stop);
    assert_eq!(answer.usage.input_tokens, 25);
}

#[tokio::test]
async fn a_throttle_is_anthropics_429_rate_limit_envelope() {
    let fake = FakeBedrock::start().await.unwrap();
    let upstream = upstream(&fake).await;
    for streamed in [true, false] {
        fake.push(BedrockBehavior::Throttle);
        let mut body: Value = serde_json::from_slice(&stream_request("claude-opus-5-5")).unwrap();
        body["stream"] = json!(streamed);
        let response = upstream
            .send(body.to_string().as_bytes(), &[], LONG)
            .await
            .unwrap();
        assert_eq!(response.status, 429, "streamed: {streamed}");
        assert_eq!(response.headers["content-type"], "application/json");
        assert!(response.headers.get("retry-after").is_none());
        let body: Value = serde_json::from_slice(&body_of(response).await).unwrap();
        assert_eq!(
            body,
            json!({"type": "error", "error": {"type": "rate_limit_error",
                "message": "Too many requests, please wait before trying again."}})
        );
    }
}

#[tokio::test]
async fn a_validation_failure_is_a_400_invalid_request_with_bedrocks_message() {
    let fake = FakeBedrock::start().await.unwrap();
    fake.push(BedrockBehavior::Invalid("invalid beta flag".to_owned()));
    let response = upstream(&fake)
        .await
        .send(&stream_request("claude-opus-5-5"), &[], LONG)
        .await
        .unwrap();
    assert_eq!(response.status, 400);
    let body: Value = serde_json::from_slice(&body_of(response).await).unwrap();
    assert_eq!(
        body,
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "invalid beta flag"}})
    );
}

#[tokio::test]
async fn a_failure_mid_stream_ends_with_anthropics_error_event() {
    let fake = FakeBedrock::start().await.unwrap();
    fake.push(BedrockBehavior::FailAfter(3));
    let response = upstream(&fake)
        .await
        .send(&stream_request("claude-opus-5-5"), &[], LONG)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let body = body_of(response).await;
    let events = parse_sse(&body);
    let names: Vec<_> = events.iter().map(|e| e.event.clone().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(
        events[3].json().unwrap(),
        json!({"type": "error", "error": {"type": "api_error", "message": "The model stream failed."}})
    );
    let answer = usage_of(&body);
    assert_eq!(answer.stream_error.as_deref(), Some("api_error"));
    assert!(!answer.saw_message_stop);
}

#[tokio::test]
async fn a_failure_as_the_first_event_is_an_error_status_not_a_stream() {
    let fake = FakeBedrock::start().await.unwrap();
    fake.push(BedrockBehavior::FailAfter(0));
    let response = upstream(&fake)
        .await
        .send(&stream_request("claude-opus-5-5"), &[], LONG)
        .await
        .unwrap();
    assert_eq!(response.status, 500);
    let body: Value = serde_json::from_slice(&body_of(response).await).unwrap();
    assert_eq!(body["error"]["type"], "api_error");
}

#[tokio::test]
async fn a_whole_answer_is_bedrocks_message_json_as_is() {
    let fake = FakeBedrock::start().await.unwrap();
    fake.set_usage(Usage::new(40, 7, 3, 2));
    let mut body: Value = serde_json::from_slice(&stream_request("claude-haiku-5-5")).unwrap();
    body["stream"] = json!(false);
    let response = upstream(&fake)
        .await
        .send(body.to_string().as_bytes(), &[], LONG)
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["content-type"], "application/json");
    let answer: Value = serde_json::from_slice(&body_of(response).await).unwrap();
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["usage"]["input_tokens"], 40);
    assert_eq!(answer["usage"]["output_tokens"], 7);
    let seen = &fake.requests()[0];
    assert_eq!(
        (seen.operation.as_str(), seen.model_id.as_str()),
        ("invoke", HAIKU_ID)
    );
}

#[tokio::test]
async fn count_tokens_goes_through_bedrocks_count_tokens() {
    let fake = FakeBedrock::start().await.unwrap();
    fake.set_usage(Usage::new(321, 0, 0, 0));
    let (_, body) = fixture("sdk-js-0.137.0-count-tokens.json");
    let response = upstream(&fake)
        .await
        .count_tokens(&body, &[])
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let answer: Value = serde_json::from_slice(&body_of(response).await).unwrap();
    assert_eq!(answer, json!({"input_tokens": 321}));
    let seen = &fake.requests()[0];
    assert_eq!(
        (seen.operation.as_str(), seen.model_id.as_str()),
        ("count-tokens", HAIKU_ID)
    );
    assert_eq!(seen.body["anthropic_version"], "bedrock-2023-05-31");
    assert!(seen.body.get("model").is_none());
}

#[tokio::test]
async fn an_unmapped_model_is_refused_before_bedrock_as_an_invalid_request() {
    let fake = FakeBedrock::start().await.unwrap();
    let error = upstream(&fake)
        .await
        .send(&stream_request("claude-sonnet-9"), &[], LONG)
        .await
        .err()
        .unwrap();
    assert!(matches!(error, BedrockSendError::Request(_)));
    assert_eq!(error.anthropic_error().status, 400);
    assert_eq!(
        error.to_string(),
        "model `claude-sonnet-9` is not served by this upstream; it serves: claude-haiku-5-5, claude-opus-5-5"
    );
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn the_fake_refuses_an_unsigned_request_like_aws() {
    let fake = FakeBedrock::start().await.unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}/model/{OPUS_ID}/invoke", fake.endpoint_url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn the_models_list_names_what_the_map_serves() {
    let fake = FakeBedrock::start().await.unwrap();
    let models = upstream(&fake).await.models();
    assert_eq!(models["first_id"], "claude-haiku-5-5");
    assert_eq!(models["last_id"], "claude-opus-5-5");
    assert_eq!(models["data"].as_array().unwrap().len(), 2);
}
