//! The sample API Gateway REST (v1) events in events/ through the Lambda
//! adapter, as the deployed functions receive them: `lambda_http` parses the
//! event, `relay_shared::lambda::into_router_request` turns it into the
//! router's request, and each function's real router (composed by
//! `relay_shared::app::App`, as in functions/*/src/main.rs) answers against DynamoDB Local and the fake
//! upstream. Checked: the client address is the event's
//! `requestContext.identity.sourceIp` (not 127.0.0.1, not a client-supplied
//! X-Forwarded-For), the stage never reaches the routers, and the answers.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use axum::Router;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::BodyExt;
use relay_shared::app::App;
use relay_shared::config::AdminConfig;
use relay_shared::domain::key::KeyId;
use relay_shared::http::ClientIp;
use relay_shared::proxy::SettleTiming;
use relay_shared::secrets::{SecretValues, Secrets};
use relay_shared::store::Store;
use relay_tests::app::{
    ADMIN_PASSWORD, ADMIN_USER, AppOptions, admin_password_hash, dynamodb_client,
    dynamodb_endpoint, key_items, text,
};
use relay_tests::fake_upstream::FakeUpstream;
use relay_tests::sse::parse_sse;
use serde_json::{Value, json};
use tower::ServiceExt;

const IGNORE_STAGE: &str = "AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH";
/// `requestContext.identity.sourceIp` of every sample event.
const EVENT_IP: &str = "203.0.113.7";
/// The address a client put in X-Forwarded-For of the streamed message
/// event (API Gateway appends the real one): never the client's address.
const SPOOFED_IP: &str = "198.51.100.99";

const ADMIN_LOGIN: &str = include_str!("../../../events/admin-login.json");
const ADMIN_CREATE_KEY: &str = include_str!("../../../events/admin-create-key.json");
const PROXY_MESSAGES_STREAM: &str = include_str!("../../../events/proxy-messages-stream.json");
const PROXY_COUNT_TOKENS: &str = include_str!("../../../events/proxy-count-tokens.json");
const PROXY_HELLO_HEAD: &str = include_str!("../../../events/proxy-hello-head.json");
const USAGE_QUOTA: &str = include_str!("../../../events/usage-quota.json");
const USAGE_HEALTH: &str = include_str!("../../../events/usage-health.json");
const PROXY_COLLECT_BATCHES: &str = include_str!("../../../events/proxy-collect-batches.json");

const ALL_EVENTS: [(&str, &str); 7] = [
    ("admin-login", ADMIN_LOGIN),
    ("admin-create-key", ADMIN_CREATE_KEY),
    ("proxy-messages-stream", PROXY_MESSAGES_STREAM),
    ("proxy-count-tokens", PROXY_COUNT_TOKENS),
    ("proxy-hello-head", PROXY_HELLO_HEAD),
    ("usage-quota", USAGE_QUOTA),
    ("usage-health", USAGE_HEALTH),
];

/// lambda_http reads AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH from the process
/// environment each time it converts an event, as in the deployed functions
/// (template.yaml sets it). Setting it from a test would need
/// `std::env::set_var`, which is `unsafe` (forbidden in this workspace) and
/// races with tests on other threads. So a test that finds it unset runs
/// itself again in a child process that has it, and passes or fails with
/// that child; it returns whether the caller should run the test body.
fn in_lambda_environment(test: &str) -> bool {
    if std::env::var_os(IGNORE_STAGE).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let output = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(IGNORE_STAGE, "true")
        .output()
        .expect("run the test again with the variable set");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{test} with {IGNORE_STAGE}=true failed:\n{stdout}\n{stderr}"
    );
    false
}

/// A sample event, edited, as lambda_http parses it.
fn event(json_text: &str, edit: impl FnOnce(&mut Value)) -> lambda_http::Request {
    let mut event: Value = serde_json::from_str(json_text).expect("the event is JSON");
    edit(&mut event);
    lambda_http::request::from_str(&event.to_string()).expect("an API Gateway REST event")
}

/// Sets a header in both `headers` and `multiValueHeaders`, as API Gateway
/// sends them.
fn set_header(event: &mut Value, name: &str, value: &str) {
    event["headers"][name] = json!(value);
    event["multiValueHeaders"][name] = json!([value]);
}

fn with_key(key: &str) -> impl FnOnce(&mut Value) {
    let key = key.to_owned();
    move |event| set_header(event, "x-api-key", &key)
}

/// The three functions' routers, composed by `App` as their main.rs has it
/// compose them, on a fresh table and a fresh fake upstream.
struct Functions {
    admin: Router,
    usage: Router,
    proxy: Router,
    store: Store,
    upstream: FakeUpstream,
}

impl Functions {
    async fn start() -> Functions {
        let upstream = FakeUpstream::start().await.unwrap();
        let table = format!("relay-events-{}", uuid::Uuid::new_v4().simple());
        let store = Store::new(dynamodb_client(&dynamodb_endpoint().unwrap()), table);
        store.ensure_table().await.unwrap();
        let secrets = Secrets::fixed(SecretValues {
            upstream_api_key: Some(upstream.api_key().to_owned()),
            upstreams: None,
            admin_password_hash: Some(admin_password_hash().unwrap()),
            jwt_secret: Some(format!("jwt-{}", uuid::Uuid::new_v4().simple())),
        });
        let options = AppOptions::default();
        let mut upstream_config = options.upstream.clone();
        upstream_config.base_url = upstream.base_url();
        let app = App::new(store.clone(), secrets);
        let admin = app.admin_router(AdminConfig {
            admin_username: ADMIN_USER.into(),
            jwt_ttl: Duration::from_secs(3600),
            allowed_networks: Vec::new(),
            refuse_unpriced_models: false,
        });
        let usage = app.usage_router();
        let proxy_state = app
            .proxy_state(
                upstream_config,
                options.proxy.clone(),
                // As a Lambda without the settle extension: before the answer ends.
                SettleTiming::BeforeAnswerEnds,
            )
            .unwrap();
        let proxy = app.proxy_router(proxy_state);
        Functions {
            admin,
            usage,
            proxy,
            store,
            upstream,
        }
    }

    /// An admin token from the admin-login event.
    async fn login(&self) -> String {
        let reply = call(&self.admin, event(ADMIN_LOGIN, |_| {})).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.json["access_token"].as_str().unwrap().to_owned()
    }

    /// A key from the admin-create-key event, with these allowed IPs.
    async fn create_key(&self, allowed_ips: &[&str]) -> (String, String) {
        let token = self.login().await;
        let ips = allowed_ips.to_vec();
        let reply = call(
            &self.admin,
            event(ADMIN_CREATE_KEY, |event| {
                set_header(event, "Authorization", &format!("Bearer {token}"));
                let mut body: Value =
                    serde_json::from_str(event["body"].as_str().unwrap()).unwrap();
                body["allowed_ips"] = json!(ips);
                event["body"] = json!(body.to_string());
            }),
        )
        .await;
        assert_eq!(reply.status, 201, "{}", reply.text);
        (
            reply.json["id"].as_str().unwrap().to_owned(),
            reply.json["api_key"].as_str().unwrap().to_owned(),
        )
    }
}

struct Reply {
    status: u16,
    content_type: String,
    body: Vec<u8>,
    text: String,
    json: Value,
}

async fn call(router: &Router, request: lambda_http::Request) -> Reply {
    let request = relay_shared::lambda::into_router_request(request);
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    let text = String::from_utf8_lossy(&body).into_owned();
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        body,
        text,
        json,
    }
}

fn event_ip() -> IpAddr {
    EVENT_IP.parse().unwrap()
}

#[tokio::test]
async fn events_are_realistic_and_reach_the_router_without_the_stage() {
    let ignore_stage = std::env::var_os(IGNORE_STAGE).is_some();
    for (name, json_text) in ALL_EVENTS {
        let raw: Value = serde_json::from_str(json_text).unwrap();
        let path = raw["path"].as_str().unwrap();
        let context = &raw["requestContext"];
        // As API Gateway sends them: `path` without the stage,
        // `requestContext.path` with it, the route's `resource`.
        assert_eq!(context["stage"], "prod", "{name}");
        assert_eq!(context["path"], format!("/prod{path}"), "{name}");
        assert_eq!(context["identity"]["sourceIp"], EVENT_IP, "{name}");
        assert_eq!(raw["resource"], context["resourcePath"], "{name}");
        assert!(raw["httpMethod"].is_string(), "{name}");

        let request = relay_shared::lambda::into_router_request(event(json_text, |_| {}));
        assert_eq!(
            request.extensions().get::<ClientIp>(),
            Some(&ClientIp(event_ip())),
            "{name}: the client address is the event's sourceIp"
        );
        assert_eq!(
            request.method().as_str(),
            raw["httpMethod"].as_str().unwrap()
        );
        if ignore_stage {
            assert_eq!(request.uri().path(), path, "{name}: no stage in the path");
        } else {
            // Why template.yaml sets the variable on every function.
            assert_eq!(
                request.uri().path(),
                format!("/prod{path}"),
                "{name}: lambda_http restores the stage unless told not to"
            );
        }
        if let Some(query) = raw["queryStringParameters"].as_object() {
            for (key, value) in query {
                let pair = format!("{key}={}", value.as_str().unwrap());
                assert!(
                    request.uri().query().unwrap_or("").contains(&pair),
                    "{name}: query {pair} kept"
                );
            }
        }
    }
    if !ignore_stage {
        in_lambda_environment(
            "lambda_events::events_are_realistic_and_reach_the_router_without_the_stage",
        );
    }
}

#[tokio::test]
async fn admin_events_log_in_create_a_key_and_lock_out_the_event_address() {
    if !in_lambda_environment(
        "lambda_events::admin_events_log_in_create_a_key_and_lock_out_the_event_address",
    ) {
        return;
    }
    let functions = Functions::start().await;

    let token = functions.login().await;
    assert!(!token.is_empty());

    let (id, key) = functions.create_key(&["203.0.113.0/24"]).await;
    let record = functions
        .store
        .get_key(&KeyId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(key.starts_with("sk-proxy-"));
    assert_eq!(record.name, "alice laptop");
    assert_eq!(record.token_limit, Some(5_000_000));

    // Five failed logins from the event's address lock that address out,
    // and only that one.
    let wrong = format!(
        "Basic {}",
        STANDARD.encode(format!("{ADMIN_USER}:not the {ADMIN_PASSWORD}"))
    );
    for _ in 0..5 {
        let reply = call(
            &functions.admin,
            event(ADMIN_LOGIN, |e| set_header(e, "Authorization", &wrong)),
        )
        .await;
        assert_eq!(reply.status, 401, "{}", reply.text);
    }
    let reply = call(&functions.admin, event(ADMIN_LOGIN, |_| {})).await;
    assert_eq!(reply.status, 429, "locked out: {}", reply.text);
    let now = time::OffsetDateTime::now_utc()
        .unix_timestamp()
        .unsigned_abs();
    assert!(
        functions
            .store
            .login_lockout(event_ip(), now)
            .await
            .unwrap()
            .is_some()
    );
    for other in ["127.0.0.1", SPOOFED_IP] {
        assert_eq!(
            functions
                .store
                .login_lockout(other.parse().unwrap(), now)
                .await
                .unwrap(),
            None,
            "{other} is not locked out"
        );
    }
}

#[tokio::test]
async fn proxy_events_stream_count_tokens_and_say_hello_for_the_event_address() {
    if !in_lambda_environment(
        "lambda_events::proxy_events_stream_count_tokens_and_say_hello_for_the_event_address",
    ) {
        return;
    }
    let functions = Functions::start().await;
    let (id, key) = functions.create_key(&["203.0.113.0/24"]).await;

    // Claude Code's connectivity check, answered by the proxy itself.
    let reply = call(&functions.proxy, event(PROXY_HELLO_HEAD, |_| {})).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty());
    assert!(functions.upstream.requests().is_empty());

    // The streamed message: SSE through to message_stop.
    let sent: Value = serde_json::from_str(PROXY_MESSAGES_STREAM).unwrap();
    let reply = call(
        &functions.proxy,
        event(PROXY_MESSAGES_STREAM, with_key(&key)),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.content_type.starts_with("text/event-stream"));
    let events = parse_sse(&reply.body);
    assert_eq!(
        events.first().and_then(|e| e.event.as_deref()),
        Some("message_start")
    );
    assert_eq!(
        events.last().and_then(|e| e.event.as_deref()),
        Some("message_stop")
    );
    let forwarded = functions.upstream.requests();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].method, "POST");
    assert_eq!(forwarded[0].path, "/v1/messages", "no stage upstream");
    assert_eq!(forwarded[0].query.as_deref(), Some("beta=true"));
    assert_eq!(
        forwarded[0].body.as_ref(),
        sent["body"].as_str().unwrap().as_bytes(),
        "the body goes upstream byte for byte"
    );
    assert_eq!(forwarded[0].header("anthropic-version"), Some("2023-06-01"));

    // Settled with the event's address, not the spoofed one.
    let logs = key_items(&functions.store, &id, "LOG#").await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(text(&logs[0], "client_ip"), Some(EVENT_IP));

    // Token counting: forwarded, not billed.
    let reply = call(&functions.proxy, event(PROXY_COUNT_TOKENS, with_key(&key))).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.json["input_tokens"].is_u64(), "{}", reply.text);
    let forwarded = functions.upstream.requests();
    assert_eq!(forwarded.len(), 2);
    assert_eq!(forwarded[1].path, "/v1/messages/count_tokens");
    assert_eq!(forwarded[1].query.as_deref(), Some("beta=true"));

    // Keys allowed only from 127.0.0.1 or from the X-Forwarded-For address
    // are refused: the relay sees the event's sourceIp.
    for only in ["127.0.0.1/32", "198.51.100.99/32"] {
        let (_, other) = functions.create_key(&[only]).await;
        let reply = call(
            &functions.proxy,
            event(PROXY_MESSAGES_STREAM, with_key(&other)),
        )
        .await;
        assert_eq!(reply.status, 403, "{only}: {}", reply.text);
        assert_eq!(reply.json["error"]["type"], "permission_error");
    }
    assert_eq!(functions.upstream.requests().len(), 2, "refused upstream");
}

#[tokio::test]
async fn usage_events_answer_quota_and_health() {
    if !in_lambda_environment("lambda_events::usage_events_answer_quota_and_health") {
        return;
    }
    let functions = Functions::start().await;
    let (id, key) = functions.create_key(&["203.0.113.0/24"]).await;

    let reply = call(&functions.usage, event(USAGE_QUOTA, with_key(&key))).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json["key_id"], id.as_str());
    assert_eq!(reply.json["token_limit"], 5_000_000);
    assert_eq!(reply.json["tokens_used"], 0);
    assert_eq!(reply.json["rate_limit_tier"]["name"], "basic");

    // The self-check names the base URL as the client reached it: API
    // Gateway's domain and the stage the router never sees.
    let setup = event(USAGE_QUOTA, |event| {
        set_header(event, "x-api-key", &key);
        event["path"] = json!("/api/usage/setup");
        event["requestContext"]["path"] = json!("/prod/api/usage/setup");
        event["requestContext"]["resourcePath"] = json!("/api/usage/setup");
    });
    let reply = call(&functions.usage, setup).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.json["environment"][0]["value"],
        "https://a1b2c3d4e5.execute-api.us-east-1.amazonaws.com/prod"
    );

    let (_, local_only) = functions.create_key(&["127.0.0.1/32"]).await;
    let reply = call(&functions.usage, event(USAGE_QUOTA, with_key(&local_only))).await;
    assert_eq!(reply.status, 403, "{}", reply.text);

    // The placeholder key of the sample event is well formed but unknown.
    let reply = call(&functions.usage, event(USAGE_QUOTA, |_| {})).await;
    assert_eq!(reply.status, 401, "{}", reply.text);
    assert_eq!(reply.json["error"]["message"], "invalid API key");

    for router in [&functions.usage, &functions.proxy] {
        let reply = call(router, event(USAGE_HEALTH, |_| {})).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(reply.json["status"], "ok");
        assert_eq!(reply.json["upstream_key_configured"], true);
    }
    // Admin paths stay on the admin function: the usage router does not
    // answer them.
    let reply = call(&functions.usage, event(ADMIN_LOGIN, |_| {})).await;
    assert_eq!(reply.status, 404);
}

#[tokio::test]
async fn the_scheduled_event_runs_the_batch_collector_and_no_client_can() {
    if !in_lambda_environment(
        "lambda_events::the_scheduled_event_runs_the_batch_collector_and_no_client_can",
    ) {
        return;
    }
    let functions = Functions::start().await;
    let (id, key) = functions.create_key(&[]).await;
    // A batch created through the proxy, as API Gateway delivers it.
    let created = call(
        &functions.proxy,
        event(PROXY_COUNT_TOKENS, |event| {
            with_key(&key)(event);
            event["path"] = json!("/v1/messages/batches");
            event["requestContext"]["path"] = json!("/prod/v1/messages/batches");
            event["queryStringParameters"] = Value::Null;
            event["multiValueQueryStringParameters"] = Value::Null;
            event["body"] = json!(
                json!({"requests": [{"custom_id": "a", "params": {
                "model": "claude-haiku-5-5", "max_tokens": 9,
                "messages": [{"role": "user", "content": "hi"}]}}]})
                .to_string()
            );
        }),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text);

    // The same path through API Gateway (a real stage) is not the schedule.
    let refused = call(
        &functions.proxy,
        event(PROXY_COUNT_TOKENS, |event| {
            with_key(&key)(event);
            event["path"] = json!("/__relay/collect-batches");
        }),
    )
    .await;
    assert_eq!(refused.status, 404, "{}", refused.text);
    assert!(
        key_items(&functions.store, &id, "LOG#")
            .await
            .unwrap()
            .is_empty()
    );

    // The schedule's own event (template.yaml sends this file) settles it.
    let reply = call(&functions.proxy, event(PROXY_COLLECT_BATCHES, |_| {})).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json["settled"], 1, "{}", reply.text);
    let logs = key_items(&functions.store, &id, "LOG#").await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(text(&logs[0], "kind"), Some("batch"));
}

#[tokio::test]
async fn a_binary_upload_event_reaches_the_upstream_byte_for_byte() {
    if !in_lambda_environment(
        "lambda_events::a_binary_upload_event_reaches_the_upstream_byte_for_byte",
    ) {
        return;
    }
    let functions = Functions::start().await;
    let (_, key) = functions.create_key(&[]).await;
    let content: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, b'\r', b'\n']).collect();
    let boundary = "lambda-event-boundary";
    let mut body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"blob.bin\"\r\ncontent-type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    // API Gateway base64-encodes bodies of the template's BinaryMediaTypes.
    let reply = call(
        &functions.proxy,
        event(PROXY_COUNT_TOKENS, |event| {
            with_key(&key)(event);
            set_header(
                event,
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            );
            event["path"] = json!("/v1/files");
            event["queryStringParameters"] = Value::Null;
            event["multiValueQueryStringParameters"] = Value::Null;
            event["isBase64Encoded"] = json!(true);
            event["body"] = json!(STANDARD.encode(&body));
        }),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let file_id = reply.json["id"].as_str().unwrap();
    let download = call(
        &functions.proxy,
        event(PROXY_HELLO_HEAD, |event| {
            with_key(&key)(event);
            event["httpMethod"] = json!("GET");
            event["path"] = json!(format!("/v1/files/{file_id}/content"));
        }),
    )
    .await;
    assert_eq!(download.status, 200, "{}", download.text);
    assert_eq!(download.body, content);
}
