//! Nothing gets past admission: canonical paths, the route table, batches
//! and files owned per key, batch usage recorded exactly once, and nothing
//! left unowned when the database fails after an upstream creation.

use std::time::Duration;

use relay_tests::app::{AppOptions, TestApp, num, spawn_app, spawn_app_with, text};
use relay_tests::dynamo::PrivateDynamo;
use relay_tests::fake_upstream::Usage;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a request target exactly as written (HTTP clients normalise dot
/// segments before sending; hostile ones need not). Returns status and body.
async fn raw(app: &TestApp, method: &str, target: &str, key: &str, body: &str) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nhost: {}\r\nx-api-key: {key}\r\ncontent-type: application/json\r\nanthropic-version: 2023-06-01\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        app.addr,
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json = serde_json::from_str(body.trim()).unwrap_or(Value::Null);
    (status, json)
}

fn message(model: &str) -> String {
    json!({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

fn batch(model: &str, requests: usize, max_tokens: u64) -> Value {
    let requests: Vec<Value> = (0..requests)
        .map(|i| {
            json!({"custom_id": format!("r{i}"), "params": {
                "model": model, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": format!("question number {i}")}]}})
        })
        .collect();
    json!({ "requests": requests })
}

/// Every spelling of a metered or owned path a URL parser resolves to it.
fn variants(path: &str) -> Vec<String> {
    let (head, last) = path.rsplit_once('/').unwrap();
    vec![
        format!("{head}/./{last}"),
        format!("{head}/x/../{last}"),
        format!("{head}/%2e/{last}"),
        format!("{head}/%2E/{last}"),
        format!("{head}/x/%2e%2e/{last}"),
        format!("{head}//{last}"),
        format!("{head}\\{last}"),
        format!("{head}/%{:02X}{}", last.as_bytes()[0], &last[1..]),
    ]
}

#[tokio::test]
async fn no_spelling_of_a_metered_or_owned_path_reaches_the_upstream() {
    let app = spawn_app().await.unwrap();
    let (_, spent) = app
        .new_key_with(json!({"name": "spent", "token_limit": 1}))
        .await
        .unwrap();
    let (_, haiku_only) = app
        .new_key_with(json!({"name": "haiku", "allowed_models": ["claude-haiku-*"]}))
        .await
        .unwrap();
    // Spend the first key's quota.
    let (status, _) = raw(
        &app,
        "POST",
        "/v1/messages",
        &spent,
        &message("claude-haiku-5-5"),
    )
    .await;
    assert_eq!(status, 200);
    app.upstream.clear_requests();

    let paths = [
        ("POST", "/v1/messages", message("claude-opus-5-5")),
        (
            "POST",
            "/v1/messages/count_tokens",
            message("claude-opus-5-5"),
        ),
        (
            "POST",
            "/v1/messages/batches",
            batch("claude-opus-5-5", 1, 16).to_string(),
        ),
        ("GET", "/v1/messages/batches", String::new()),
        (
            "GET",
            "/v1/messages/batches/msgbatch_01x/results",
            String::new(),
        ),
        (
            "POST",
            "/v1/messages/batches/msgbatch_01x/cancel",
            String::new(),
        ),
        ("GET", "/v1/files", String::new()),
        ("GET", "/v1/files/file_01x/content", String::new()),
    ];
    for (method, path, body) in &paths {
        for target in variants(path) {
            for key in [&spent, &haiku_only] {
                let (status, answer) = raw(&app, method, &target, key, body).await;
                assert_eq!(status, 400, "{method} {target}: {answer}");
                assert_eq!(answer["type"], "error", "{target}");
                assert_eq!(answer["error"]["type"], "invalid_request_error", "{target}");
            }
        }
    }
    // The canonical spelling is refused for what it is.
    let (status, answer) = raw(
        &app,
        "POST",
        "/v1/messages",
        &spent,
        &message("claude-haiku-5-5"),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    let (status, _) = raw(
        &app,
        "POST",
        "/v1/messages",
        &haiku_only,
        &message("claude-opus-5-5"),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = raw(
        &app,
        "POST",
        "/v1/messages/batches",
        &haiku_only,
        &batch("claude-opus-5-5", 1, 16).to_string(),
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        app.upstream.requests().is_empty(),
        "reached the upstream: {:?}",
        app.upstream
            .requests()
            .iter()
            .map(|r| (&r.method, &r.path))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn connect_trace_options_unknown_paths_and_legacy_completions_never_reach_the_upstream() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    for (method, target, status) in [
        ("CONNECT", "api.anthropic.com:443", 405),
        ("TRACE", "/v1/messages", 405),
        ("OPTIONS", "*", 405),
        ("OPTIONS", "/v1/messages", 405),
        ("PUT", "/v1/messages", 405),
        ("GET", "/v1/messages", 405),
        ("POST", "/v1/complete", 404),
        ("POST", "/v1/skills", 404),
        ("GET", "/v1/organizations/me", 404),
        ("GET", "/anything", 404),
        ("POST", "/v1/messages/", 404),
        ("GET", "/v1/files/a%2Fb", 404),
    ] {
        let (got, answer) = raw(&app, method, target, &key, "").await;
        assert_eq!(got, status, "{method} {target}: {answer}");
        assert_eq!(answer["type"], "error", "{method} {target}");
    }
    assert!(app.upstream.requests().is_empty());
    // Claude Code's checks are answered by the relay itself.
    for (method, target) in [("HEAD", "/api/hello"), ("GET", "/api/hello"), ("HEAD", "/")] {
        let response = app
            .http
            .request(method.parse().unwrap(), app.url(target))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{method} {target}");
    }
    assert!(app.upstream.requests().is_empty());
}

#[tokio::test]
async fn model_names_too_long_or_odd_are_refused_before_forwarding() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    // serde would read the fields of an array in order: not a message.
    let (status, _) = raw(
        &app,
        "POST",
        "/v1/messages",
        &key,
        r#"["claude-haiku-5-5",false,16]"#,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = raw(
        &app,
        "POST",
        "/v1/messages/batches",
        &key,
        r#"{"requests":[{"custom_id":"a","params":["claude-haiku-5-5",9]}]}"#,
    )
    .await;
    assert_eq!(status, 400);
    for model in [
        "x".repeat(2000),
        "claude haiku".into(),
        "claude\u{202e}".into(),
    ] {
        let (status, answer) = raw(&app, "POST", "/v1/messages", &key, &message(&model)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("model")
        );
    }
    assert!(app.upstream.requests().is_empty());
}

async fn post_json(app: &TestApp, key: &str, path: &str, body: &Value) -> (u16, Value) {
    let response = app
        .http
        .post(app.url(path))
        .header("x-api-key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn call(app: &TestApp, method: &str, key: &str, path: &str) -> (u16, String) {
    let response = app
        .http
        .request(method.parse().unwrap(), app.url(path))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn upstream_hits(app: &TestApp, needle: &str) -> usize {
    app.upstream
        .requests()
        .iter()
        .filter(|r| r.path.contains(needle))
        .count()
}

#[tokio::test]
async fn a_key_sees_and_touches_only_its_own_batches() {
    let app = spawn_app().await.unwrap();
    app.upstream.set_batch_duration(Duration::from_secs(3600));
    let (_, a) = app.new_key().await.unwrap();
    let (_, b) = app.new_key().await.unwrap();
    let (status, created) = post_json(
        &app,
        &a,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 2, 16),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();

    let before = upstream_hits(&app, &id);
    for (method, path) in [
        ("GET", format!("/v1/messages/batches/{id}")),
        ("POST", format!("/v1/messages/batches/{id}/cancel")),
        ("DELETE", format!("/v1/messages/batches/{id}")),
        ("GET", format!("/v1/messages/batches/{id}/results")),
    ] {
        let (status, body) = call(&app, method, &b, &path).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(body.contains("not_found_error"));
    }
    assert_eq!(
        upstream_hits(&app, &id),
        before,
        "key B's requests reached the upstream"
    );
    let (_, listed) = call(&app, "GET", &b, "/v1/messages/batches").await;
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["data"], json!([]));
    assert_eq!(listed["has_more"], false);

    let (status, listed) = call(&app, "GET", &a, "/v1/messages/batches").await;
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["data"][0]["id"], id.as_str());
    assert_eq!(listed["first_id"], id.as_str());
    let response = app
        .http
        .get(app.url(&format!("/v1/messages/batches/{id}")))
        .header("x-api-key", &a)
        .header("accept-encoding", "gzip, deflate")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The relay rewrites batch objects, so it asks for them uncompressed.
    let asked = app.upstream.requests();
    let asked = asked.last().unwrap();
    assert_eq!(asked.header("accept-encoding"), Some("identity"));
    let (status, canceled) = call(
        &app,
        "POST",
        &a,
        &format!("/v1/messages/batches/{id}/cancel"),
    )
    .await;
    assert_eq!(status, 200, "{canceled}");
    let canceled: Value = serde_json::from_str(&canceled).unwrap();
    assert_eq!(
        canceled["results_url"],
        format!("/v1/messages/batches/{id}/results"),
        "results_url must point at the relay"
    );
}

#[tokio::test]
async fn batches_are_admitted_like_their_requests() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    app.http
        .put(app.url("/admin/tiers/tiny"))
        .bearer_auth(&token)
        .json(&json!({"requests": 3, "period": 60}))
        .send()
        .await
        .unwrap();
    let (_, haiku_only) = app
        .new_key_with(json!({"name": "h", "allowed_models": ["claude-haiku-*"]}))
        .await
        .unwrap();
    let (_, small) = app
        .new_key_with(json!({"name": "s", "token_limit": 100}))
        .await
        .unwrap();
    let (_, tiny) = app
        .new_key_with(json!({"name": "t", "rate_limit_tier": "tiny"}))
        .await
        .unwrap();

    let mixed = json!({"requests": [
        batch("claude-haiku-5-5", 1, 16)["requests"][0],
        {"custom_id": "x", "params": {"model": "claude-opus-5-5", "max_tokens": 16, "messages": []}}]});
    let (status, answer) = post_json(&app, &haiku_only, "/v1/messages/batches", &mixed).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("claude-opus-5-5")
    );

    let (status, answer) = post_json(
        &app,
        &small,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 1, 500),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("worst case")
    );

    let (status, answer) = post_json(
        &app,
        &tiny,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 4, 16),
    )
    .await;
    assert_eq!(status, 429, "{answer}");
    let (status, _) = post_json(
        &app,
        &tiny,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 3, 16),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post_json(
        &app,
        &tiny,
        "/v1/messages",
        &json!({"model": "claude-haiku-5-5", "max_tokens": 5, "messages": []}),
    )
    .await;
    assert_eq!(status, 429, "the batch's three requests filled the window");

    let missing_max = json!({"requests": [{"custom_id": "a", "params": {"model": "claude-haiku-5-5", "messages": []}}]});
    let (status, _) = post_json(&app, &small, "/v1/messages/batches", &missing_max).await;
    assert_eq!(status, 400);
    let dup_model = r#"{"requests":[{"custom_id":"a","params":{"model":"claude-haiku-5-5","model":"claude-opus-5-5","max_tokens":5}}]}"#;
    let (status, _) = raw(&app, "POST", "/v1/messages/batches", &haiku_only, dup_model).await;
    assert_eq!(status, 400, "two models in one request must not pass");
    assert_eq!(
        app.upstream
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/v1/messages/batches"))
            .count(),
        1,
        "only the admitted batch reached the upstream"
    );
}

fn billed(usage: Usage) -> u64 {
    usage.input_tokens
        + usage.output_tokens
        + usage.cache_creation_input_tokens
        + usage.cache_read_input_tokens
}

async fn batch_logs(app: &TestApp, id: &str) -> Vec<relay_tests::app::RawItem> {
    app.items(id, "LOG#")
        .await
        .unwrap()
        .into_iter()
        .filter(|item| text(item, "kind") == Some("batch"))
        .collect()
}

#[tokio::test]
async fn a_batch_reserves_its_worst_case_and_is_charged_once_when_its_results_are_read_twice() {
    let app = spawn_app().await.unwrap();
    app.upstream.set_batch_duration(Duration::from_secs(3600));
    let (id, key) = app
        .new_key_with(json!({"name": "b", "token_limit": 5000}))
        .await
        .unwrap();
    let (status, created) = post_json(
        &app,
        &key,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 3, 100),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let batch_id = created["id"].as_str().unwrap().to_owned();
    let record = app.key_record(&id).await.unwrap();
    assert!(
        record.tokens_reserved >= 300,
        "worst case reserved: {}",
        record.tokens_reserved
    );
    assert_eq!(record.tokens_used, record.tokens_reserved);

    // Not ended yet: results are refused upstream and nothing is charged.
    let (status, _) = call(
        &app,
        "GET",
        &key,
        &format!("/v1/messages/batches/{batch_id}/results"),
    )
    .await;
    assert_eq!(status, 400);
    app.upstream.end_batch(&batch_id);
    let expected = billed(app.upstream.batch_results_usage(&batch_id).unwrap());
    for _ in 0..2 {
        let (status, body) = call(
            &app,
            "GET",
            &key,
            &format!("/v1/messages/batches/{batch_id}/results"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body.lines().count(), 3);
    }
    let logs = batch_logs(&app, &id).await;
    assert_eq!(logs.len(), 1);
    assert_eq!(text(&logs[0], "batch_id"), Some(batch_id.as_str()));
    assert_eq!(num(&logs[0], "requests"), 3);
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(record.tokens_reserved, 0);
    assert_eq!(
        record.tokens_used, expected,
        "the real usage replaced the reservation"
    );
    // The collector finds nothing left to do.
    let report = relay_shared::proxy::batches::collect(&app.proxy).await;
    assert_eq!(report.settled, 0);
    assert_eq!(batch_logs(&app, &id).await.len(), 1);

    // The usage view shows the row as a batch.
    let response = app
        .http
        .get(app.url("/api/usage/logs"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    let logs: Value = response.json().await.unwrap();
    assert_eq!(logs["data"][0]["kind"], "batch");
    assert_eq!(logs["data"][0]["batch_id"], batch_id.as_str());
}

#[tokio::test]
async fn a_batch_whose_results_are_never_read_is_charged_by_the_collector_once() {
    let app = spawn_app().await.unwrap();
    app.upstream.set_batch_duration(Duration::from_secs(3600));
    let (id, key) = app.new_key().await.unwrap();
    let (_, created) = post_json(
        &app,
        &key,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 2, 30),
    )
    .await;
    let batch_id = created["id"].as_str().unwrap().to_owned();
    let report = relay_shared::proxy::batches::collect(&app.proxy).await;
    assert_eq!((report.settled, report.still_running), (0, 1));
    app.upstream.end_batch(&batch_id);
    let report = relay_shared::proxy::batches::collect(&app.proxy).await;
    assert_eq!(report.settled, 1, "{report:?}");
    let report = relay_shared::proxy::batches::collect(&app.proxy).await;
    assert_eq!(report, Default::default(), "the batch left the queue");
    assert_eq!(batch_logs(&app, &id).await.len(), 1);
    let expected = billed(app.upstream.batch_results_usage(&batch_id).unwrap());
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, expected);
    let models = app.items(&id, "MODEL#").await.unwrap();
    assert_eq!(num(&models[0], "requests"), 2);
}

#[tokio::test]
async fn a_batch_read_and_collected_at_once_is_charged_once() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let (_, created) = post_json(
        &app,
        &key,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 5, 30),
    )
    .await;
    let batch_id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/messages/batches/{batch_id}/results");
    let (read, report, read_again) = tokio::join!(
        call(&app, "GET", &key, &path),
        relay_shared::proxy::batches::collect(&app.proxy),
        call(&app, "GET", &key, &path),
    );
    assert_eq!((read.0, read_again.0), (200, 200));
    assert!(report.failures == 0, "{report:?}");
    assert_eq!(batch_logs(&app, &id).await.len(), 1);
    let expected = billed(app.upstream.batch_results_usage(&batch_id).unwrap());
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(record.tokens_used, expected);
    let summary: Value = app
        .http
        .get(app.url("/api/usage"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["requests"], 5);
}

#[tokio::test]
async fn a_batch_is_charged_before_it_is_deleted() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let (_, created) = post_json(
        &app,
        &key,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 2, 30),
    )
    .await;
    let batch_id = created["id"].as_str().unwrap().to_owned();
    let (status, body) = call(
        &app,
        "DELETE",
        &key,
        &format!("/v1/messages/batches/{batch_id}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(batch_logs(&app, &id).await.len(), 1);
    assert!(app.key_record(&id).await.unwrap().tokens_used > 0);
    let (status, _) = call(
        &app,
        "GET",
        &key,
        &format!("/v1/messages/batches/{batch_id}"),
    )
    .await;
    assert_eq!(status, 404);
}

fn multipart(filename: &str, content: &[u8]) -> (String, Vec<u8>) {
    let boundary = "relay-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\ncontent-type: text/plain\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(app: &TestApp, key: &str, content: &[u8]) -> (u16, Value) {
    let (content_type, body) = multipart("notes.txt", content);
    let response = app
        .http
        .post(app.url("/v1/files"))
        .header("x-api-key", key)
        .header("anthropic-beta", "files-api-2025-04-14")
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_key_sees_reads_deletes_and_references_only_its_own_files() {
    let app = spawn_app().await.unwrap();
    let (_, a) = app.new_key().await.unwrap();
    let (_, b) = app.new_key().await.unwrap();
    let content = b"line one\r\nline two\r\n--not a boundary\r\n";
    let (status, file) = upload(&app, &a, content).await;
    assert_eq!(status, 200, "{file}");
    let asked = app.upstream.requests();
    assert_eq!(
        asked.last().unwrap().header("accept-encoding"),
        Some("identity"),
        "the relay reads the new file's id, so it asks for plain bytes"
    );
    let file_id = file["id"].as_str().unwrap().to_owned();

    let before = upstream_hits(&app, &file_id);
    for (method, path) in [
        ("GET", format!("/v1/files/{file_id}")),
        ("GET", format!("/v1/files/{file_id}/content")),
        ("DELETE", format!("/v1/files/{file_id}")),
    ] {
        let (status, body) = call(&app, method, &b, &path).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
    }
    let referencing = json!({"model": "claude-haiku-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": file_id}}]}]});
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let (status, answer) = post_json(&app, &b, path, &referencing).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&file_id)
        );
    }
    let batch_referencing =
        json!({"requests": [{"custom_id": "a", "params": referencing.clone()}]});
    let (status, _) = post_json(&app, &b, "/v1/messages/batches", &batch_referencing).await;
    assert_eq!(status, 403);
    let odd = json!({"model": "claude-haiku-5-5", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "f".repeat(3000)}}]}]});
    let (status, _) = post_json(&app, &b, "/v1/messages", &odd).await;
    assert_eq!(status, 403, "an id no upload has is no key's");
    let escaped = referencing
        .to_string()
        .replace("\"file_id\"", "\"file\\u005fid\"");
    let (status, _) = raw(&app, "POST", "/v1/messages", &b, &escaped).await;
    assert_eq!(status, 403, "an escaped key is the same key");
    assert_eq!(upstream_hits(&app, &file_id), before);
    assert!(
        !app.upstream
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/v1/messages"))
    );
    let (_, listed) = call(&app, "GET", &b, "/v1/files").await;
    assert_eq!(
        serde_json::from_str::<Value>(&listed).unwrap()["data"],
        json!([])
    );

    // The owner can do all of it.
    let (status, listed) = call(&app, "GET", &a, "/v1/files").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&listed).unwrap()["data"][0]["id"],
        file_id.as_str()
    );
    let (status, body) = call(&app, "GET", &a, &format!("/v1/files/{file_id}/content")).await;
    assert_eq!((status, body.as_bytes()), (200, &content[..]));
    let (status, _) = post_json(&app, &a, "/v1/messages", &referencing).await;
    assert_eq!(status, 200);
    let (status, _) = call(&app, "DELETE", &a, &format!("/v1/files/{file_id}")).await;
    assert_eq!(status, 200);
    assert!(app.upstream.file_ids().is_empty());
    let (status, _) = call(&app, "GET", &a, &format!("/v1/files/{file_id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_upload_over_the_size_limit_is_refused() {
    let mut options = AppOptions::default();
    options.proxy.max_request_bytes = 1024;
    let app = spawn_app_with(options).await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let (status, answer) = upload(&app, &key, &[b'x'; 4096]).await;
    assert_eq!(status, 413, "{answer}");
    assert!(app.upstream.file_ids().is_empty());
}

/// Waits until the fake has received a request to `path`.
async fn until_received(app: &TestApp, method: &str, path: &str) {
    for _ in 0..200 {
        if app
            .upstream
            .requests()
            .iter()
            .any(|r| r.method == method && r.path == path)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the upstream never received {method} {path}");
}

#[tokio::test]
async fn objects_created_upstream_while_the_database_fails_are_not_left_unowned() {
    let dynamo = PrivateDynamo::start().unwrap();
    let mut options = AppOptions {
        dynamodb_endpoint: Some(dynamo.endpoint()),
        ..AppOptions::default()
    };
    options.proxy.settle_inline = Duration::from_millis(500);
    let app = spawn_app_with(options).await.unwrap();
    app.upstream.set_batch_duration(Duration::from_secs(3600));
    let (id, key) = app
        .new_key_with(json!({"name": "k", "token_limit": 100000}))
        .await
        .unwrap();

    // A batch: created upstream, then the database goes away.
    app.upstream.hold_next_create(Duration::from_secs(2));
    let pending = {
        let client = app.http.clone();
        let url = app.url("/v1/messages/batches");
        let key = key.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .header("x-api-key", key)
                .json(&batch("claude-haiku-5-5", 2, 50))
                .send()
                .await
        })
    };
    until_received(&app, "POST", "/v1/messages/batches").await;
    dynamo.stop().unwrap();
    let response = pending.await.unwrap().unwrap();
    assert_eq!(response.status(), 503);
    let batch_id = app.upstream.batch_ids().pop().unwrap();
    assert!(
        app.upstream
            .requests()
            .iter()
            .any(|r| r.path == format!("/v1/messages/batches/{batch_id}/cancel")),
        "the unowned batch was canceled"
    );

    // A file: uploaded, then the database goes away.
    dynamo.restart().unwrap();
    app.upstream.hold_next_create(Duration::from_secs(2));
    let uploading = {
        let (content_type, body) = multipart("notes.txt", b"hello");
        let request = app
            .http
            .post(app.url("/v1/files"))
            .header("x-api-key", &key)
            .header("content-type", content_type)
            .body(body);
        tokio::spawn(async move { request.send().await })
    };
    until_received(&app, "POST", "/v1/files").await;
    dynamo.stop().unwrap();
    assert_eq!(uploading.await.unwrap().unwrap().status(), 503);
    assert!(
        app.upstream.file_ids().is_empty(),
        "the unowned file was deleted"
    );

    // Back up: the batch's reservation is pending until the collector gives
    // it back (once no request could still claim it).
    dynamo.restart().unwrap();
    let held = app.key_record(&id).await.unwrap();
    assert!(held.tokens_reserved > 0);
    let report = relay_shared::proxy::batches::collect(&app.proxy).await;
    assert_eq!(
        report.released_reservations, 0,
        "too young to be given back"
    );
    let later = relay_shared::domain::now() + time::Duration::minutes(21);
    let report = relay_shared::proxy::batches::collect_as_of(&app.proxy, later).await;
    assert_eq!(report.released_reservations, 1, "{report:?}");
    let record = app.key_record(&id).await.unwrap();
    assert_eq!((record.tokens_used, record.tokens_reserved), (0, 0));
}

#[tokio::test]
async fn concurrent_batches_cannot_reserve_more_than_the_quota() {
    let app = spawn_app().await.unwrap();
    app.upstream.set_batch_duration(Duration::from_secs(3600));
    let (id, key) = app
        .new_key_with(json!({"name": "c", "token_limit": 1000}))
        .await
        .unwrap();
    let body = batch("claude-haiku-5-5", 1, 300);
    let answers = futures_util::future::join_all(
        (0..10).map(|_| post_json(&app, &key, "/v1/messages/batches", &body)),
    )
    .await;
    let admitted = answers.iter().filter(|(status, _)| *status == 200).count();
    assert!((1..=3).contains(&admitted), "{admitted} admitted");
    assert!(
        answers
            .iter()
            .all(|(status, _)| matches!(status, 200 | 429))
    );
    let record = app.key_record(&id).await.unwrap();
    assert!(record.tokens_used <= 1000, "{}", record.tokens_used);
    assert_eq!(app.upstream.batch_ids().len(), admitted);
}

#[tokio::test]
async fn admins_see_each_keys_batches_and_files() {
    let app = spawn_app().await.unwrap();
    app.upstream.set_batch_duration(Duration::from_secs(3600));
    let (a_id, a) = app
        .new_key_with(json!({"name": "a", "token_limit": 100000}))
        .await
        .unwrap();
    let (b_id, _) = app.new_key().await.unwrap();
    let (_, created) = post_json(
        &app,
        &a,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 2, 10),
    )
    .await;
    let (_, file) = upload(&app, &a, b"x").await;
    let token = app.admin_token().await.unwrap();
    let admin = |path: String| {
        let request = app.http.get(app.url(&path)).bearer_auth(&token);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()
        }
    };
    let batches = admin(format!("/admin/api-keys/{a_id}/batches")).await;
    assert_eq!(batches["data"][0]["id"], created["id"]);
    assert_eq!(batches["data"][0]["request_count"], 2);
    assert_eq!(batches["data"][0]["usage_recorded"], false);
    assert!(batches["data"][0]["reserved_tokens"].as_u64().unwrap() > 20);
    let files = admin(format!("/admin/api-keys/{a_id}/files")).await;
    assert_eq!(files["data"][0]["id"], file["id"]);
    assert_eq!(
        admin(format!("/admin/api-keys/{b_id}/batches")).await["data"],
        json!([])
    );
    assert_eq!(
        admin(format!("/admin/api-keys/{b_id}/files")).await["data"],
        json!([])
    );
}

#[tokio::test]
async fn a_batch_that_has_not_ended_is_not_deleted_and_keeps_its_usage() {
    let app = spawn_app().await.unwrap();
    app.upstream.set_batch_duration(Duration::from_secs(3600));
    let (id, key) = app.new_key().await.unwrap();
    let (_, created) = post_json(
        &app,
        &key,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 2, 30),
    )
    .await;
    let batch_id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/messages/batches/{batch_id}");
    let (status, body) = call(&app, "DELETE", &key, &path).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        !app.upstream.requests().iter().any(|r| r.method == "DELETE"),
        "a deletion is forwarded only once the usage is recorded"
    );
    app.upstream.end_batch(&batch_id);
    let expected = billed(app.upstream.batch_results_usage(&batch_id).unwrap());
    let (status, _) = call(&app, "DELETE", &key, &path).await;
    assert_eq!(status, 200);
    assert_eq!(batch_logs(&app, &id).await.len(), 1);
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, expected);
}

#[tokio::test]
async fn a_batch_that_vanished_upstream_is_charged_its_reservation_as_an_estimate() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app
        .new_key_with(json!({"name": "v", "token_limit": 100000}))
        .await
        .unwrap();
    let (_, created) = post_json(
        &app,
        &key,
        "/v1/messages/batches",
        &batch("claude-haiku-5-5", 2, 30),
    )
    .await;
    let batch_id = created["id"].as_str().unwrap().to_owned();
    let reserved = app.key_record(&id).await.unwrap().tokens_reserved;
    assert!(reserved > 60);
    // Deleted behind the relay's back (by someone holding the upstream key).
    let gone = app
        .http
        .delete(format!(
            "{}/v1/messages/batches/{batch_id}",
            app.upstream.base_url()
        ))
        .header("x-api-key", app.upstream.api_key())
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 200);
    let report = relay_shared::proxy::batches::collect(&app.proxy).await;
    assert_eq!(report.abandoned, 1, "{report:?}");
    let record = app.key_record(&id).await.unwrap();
    assert_eq!((record.tokens_used, record.tokens_reserved), (reserved, 0));
    let logs = batch_logs(&app, &id).await;
    assert_eq!(logs.len(), 1);
    assert!(matches!(
        logs[0].get("estimated"),
        Some(aws_sdk_dynamodb::types::AttributeValue::Bool(true))
    ));
    assert_eq!(
        relay_shared::proxy::batches::collect(&app.proxy).await,
        Default::default()
    );
}

#[tokio::test]
async fn a_batch_asking_for_us_inference_is_priced_so_and_counts_against_dollar_limits() {
    use relay_shared::domain::price::{Attribute, default_table};
    use relay_shared::domain::usage::TokenUsage;
    let app = spawn_app().await.unwrap();
    app.upstream.set_batch_duration(Duration::from_secs(3600));
    let (id, key) = app
        .new_key_with(
            json!({"name": "b", "dollar_limits": [{"window": "lifetime", "limit_usd": 100}]}),
        )
        .await
        .unwrap();
    let mut body = batch("claude-haiku-5-5", 3, 100);
    body["requests"][1]["params"]["inference_geo"] = json!("us");
    let (status, created) = post_json(&app, &key, "/v1/messages/batches", &body).await;
    assert_eq!(status, 200, "{created}");
    let batch_id = created["id"].as_str().unwrap().to_owned();
    app.upstream.end_batch(&batch_id);
    let usage = app.upstream.batch_results_usage(&batch_id).unwrap();
    let (status, _) = call(
        &app,
        "GET",
        &key,
        &format!("/v1/messages/batches/{batch_id}/results"),
    )
    .await;
    assert_eq!(status, 200);

    // Results do not say which request ran in the US: one asked, so the
    // whole batch is priced at batch and US-inference rates (never under).
    let usage = TokenUsage {
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
        cache_creation_input_tokens: usage.cache_creation_input_tokens,
        cache_read_input_tokens: usage.cache_read_input_tokens,
        ..TokenUsage::default()
    };
    let table = default_table();
    let now = relay_shared::domain::now();
    let expected = table
        .cost(
            Some("claude-haiku-5-5"),
            &usage,
            &[Attribute::Batch, Attribute::UsInference],
            now,
        )
        .micro_usd;
    let batch_only = table
        .cost(Some("claude-haiku-5-5"), &usage, &[Attribute::Batch], now)
        .micro_usd;
    assert!(expected > batch_only, "{expected} vs {batch_only}");
    let logs = batch_logs(&app, &id).await;
    assert_eq!(num(&logs[0], "cost_micro_usd"), expected);
    // And the lifetime dollar limit counted it.
    let spent: Vec<u64> = app
        .key_record(&id)
        .await
        .unwrap()
        .spend
        .into_values()
        .collect();
    assert_eq!(spent, vec![expected]);
}
