//! `GET /api/usage/setup`, the key holder's self-check, and the hint a
//! doubled `/v1` gets.

use relay_tests::app::spawn_app;
use serde_json::{Value, json};

#[tokio::test]
async fn the_self_check_says_what_arrived_what_is_left_and_what_to_set() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app
        .new_key_with(json!({"name": "alice laptop", "token_limit": 5000}))
        .await
        .unwrap();
    let request = || {
        app.http
            .get(app.url("/api/usage/setup"))
            .header("x-api-key", &key)
            // A claude.ai login left in ANTHROPIC_AUTH_TOKEN.
            .header("authorization", "Bearer sk-ant-oat01-leftover")
            .header("user-agent", "claude-cli/2.1.330 (external, cli)")
    };
    let response = request().send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains(&key), "the key is never echoed whole");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["key"]["name"], "alice laptop");
    assert_eq!(
        body["seen"]["auth_headers"],
        json!(["x-api-key", "authorization"])
    );
    assert_eq!(
        body["seen"]["client"],
        json!({"name": "claude-cli", "version": "2.1.330"})
    );
    assert_eq!(body["quota"]["token_limit"], 5000);
    assert_eq!(body["quota"]["remaining"], 5000);
    let base = format!("http://{}", app.addr);
    assert_eq!(
        body["environment"][0],
        json!({"name": "ANTHROPIC_BASE_URL", "value": base})
    );
    // The key stands as its prefix (which ends in one ellipsis), never whole.
    let prefix = body["key"]["prefix"].as_str().unwrap().to_owned();
    assert!(
        prefix.starts_with("sk-proxy-") && prefix.ends_with('…'),
        "{prefix}"
    );
    assert_eq!(
        body["environment"][1],
        json!({"name": "ANTHROPIC_AUTH_TOKEN", "value": format!("{prefix} (your sk-proxy- key)")})
    );
    assert!(!text.contains("……"), "one ellipsis: {text}");
    assert_eq!(
        body["environment"][2],
        json!({"name": "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY", "value": "1"})
    );
    let warnings = body["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("unset ANTHROPIC_AUTH_TOKEN")
    );

    // The same for a terminal.
    let response = request()
        .header("accept", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    assert!(text.contains("client    claude-cli 2.1.330"), "{text}");
    assert!(text.contains("tokens    0 of 5000 used"), "{text}");
    assert!(
        text.contains(&format!("  export ANTHROPIC_BASE_URL={base}\n")),
        "{text}"
    );
    assert!(text.contains("Warnings:\n  - "), "{text}");
    assert!(
        text.contains(&format!("key       {prefix} \"alice laptop\"")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  export ANTHROPIC_AUTH_TOKEN={prefix} (your sk-proxy- key)\n"
        )),
        "{text}"
    );
    assert!(!text.contains("……"), "one ellipsis: {text}");

    // Without a key: Anthropic's envelope, as every relay path.
    let response = app
        .http
        .get(app.url("/api/usage/setup"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
}

#[tokio::test]
async fn a_base_url_ending_in_v1_is_told_to_drop_it() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let response = app
        .http
        .post(app.url("/v1/v1/messages"))
        .header("x-api-key", &key)
        .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must not end in /v1"),
        "{body}"
    );
    assert!(app.upstream.requests().is_empty());
}
