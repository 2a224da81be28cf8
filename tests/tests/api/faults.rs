//! The fault suite: upstream failures, a database outage in the middle of a
//! run, and a corpus of malformed input. Every request gets a well-formed
//! answer (or a well-formed Anthropic error), nothing hangs, nothing
//! answered goes unrecorded, nothing is counted twice.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use relay_tests::app::{AppOptions, TestApp, num, spawn_app, spawn_app_with};
use relay_tests::dynamo::PrivateDynamo;
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use relay_tests::sse::parse_sse;
use serde_json::{Value, json};

fn body(stream: bool) -> Value {
    json!({"model": "claude-haiku-5-5", "max_tokens": 16, "stream": stream,
           "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test]
async fn storm_of_529s_ends_in_a_well_formed_529_after_bounded_retries() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.set_default(Behavior::Error {
        status: 529,
        error_type: "overloaded_error".into(),
        retry_after: None,
    });
    let started = Instant::now();
    let requests = (0..8).map(|i| {
        app.http
            .post(app.url("/v1/messages"))
            .header("x-api-key", &key)
            .json(&body(i % 2 == 0))
            .send()
    });
    for response in futures_util::future::join_all(requests).await {
        let response = response.unwrap();
        assert_eq!(response.status(), 529);
        let envelope: Value = response.json().await.unwrap();
        assert_eq!(envelope["error"]["type"], "overloaded_error");
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "retries are bounded"
    );
    assert_eq!(app.upstream.requests().len(), 8 * 3, "three attempts each");
    let logs = app.wait_for_logs(&id, 8).await.unwrap();
    assert!(
        logs.iter()
            .all(|log| num(log, "status") == 529 && num(log, "retries") == 2)
    );
    assert_eq!(
        app.key_record(&id).await.unwrap().tokens_used,
        0,
        "errors cost nothing"
    );
}

#[tokio::test]
async fn thirty_second_first_byte_is_kept_alive_and_then_answered() {
    let mut options = AppOptions::default();
    options.upstream.header_timeout = Duration::from_secs(60);
    options.proxy.keepalive_after = Duration::from_secs(10);
    options.proxy.keepalive_interval = Duration::from_secs(10);
    let app = spawn_app_with(options).await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let slow = || {
        Behavior::Message(MessageSpec {
            usage: Usage::new(9, 4, 0, 0),
            first_byte_delay: Duration::from_secs(30),
            ..MessageSpec::default()
        })
    };
    app.upstream.push(slow());
    app.upstream.push(slow());
    let streamed = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&body(true))
        .send();
    let plain = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&body(false))
        .send();
    let (streamed, plain) = tokio::join!(streamed, plain);
    let streamed = streamed.unwrap();
    assert_eq!(streamed.status(), 200);
    let text = String::from_utf8(streamed.bytes().await.unwrap().to_vec()).unwrap();
    assert_eq!(text.matches(": keepalive").count(), 3, "at 10, 20 and 30 s");
    assert_eq!(
        parse_sse(text.as_bytes()).last().unwrap().event.as_deref(),
        Some("message_stop")
    );
    let plain = plain.unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(
        plain.json::<Value>().await.unwrap()["usage"]["output_tokens"],
        4
    );
    app.wait_for_logs(&id, 2).await.unwrap();
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 26);
}

async fn send(app: &TestApp, key: &str, stream: bool) -> reqwest::Response {
    app.http
        .post(app.url("/v1/messages"))
        .header("x-api-key", key)
        .json(&body(stream))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn database_outage_mid_run_fails_cleanly_and_loses_nothing() {
    let dynamo = PrivateDynamo::start().unwrap();
    let mut options = AppOptions {
        dynamodb_endpoint: Some(dynamo.endpoint()),
        ..AppOptions::default()
    };
    options.proxy.settle_inline = Duration::from_millis(300);
    options.proxy.settle_background = Duration::from_secs(120);
    let app = spawn_app_with(options).await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.set_default(Behavior::Message(MessageSpec {
        usage: Usage::new(10, 5, 0, 0),
        ..MessageSpec::default()
    }));
    for stream in [true, false] {
        assert_eq!(send(&app, &key, stream).await.status(), 200);
    }

    // A slow answer is admitted, then the database goes away before it ends.
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(100, 50, 0, 0),
        text_chunks: (0..20).map(|i| format!("w{i} ")).collect(),
        event_delay: Duration::from_millis(100),
        ..MessageSpec::default()
    }));
    let in_flight = send(&app, &key, true).await;
    assert_eq!(in_flight.status(), 200);
    dynamo.stop().unwrap();
    let text = in_flight.bytes().await.unwrap();
    assert_eq!(
        parse_sse(&text).last().unwrap().event.as_deref(),
        Some("message_stop"),
        "the answer is delivered whole although its settlement must wait"
    );

    // While it is down, new requests fail fast and well-formed.
    for stream in [true, false] {
        let started = Instant::now();
        let response = send(&app, &key, stream).await;
        assert_eq!(response.status(), 503);
        assert!(response.headers().contains_key("retry-after"));
        let envelope: Value = response.json().await.unwrap();
        assert_eq!(envelope["type"], "error");
        assert_eq!(envelope["error"]["type"], "overloaded_error");
        assert!(started.elapsed() < Duration::from_secs(15));
    }
    let health = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);

    dynamo.restart().unwrap();
    // The postponed settlement lands once the database is back.
    let deadline = Instant::now() + Duration::from_secs(60);
    let logs = loop {
        let logs = app.items(&id, "LOG#").await;
        if let Ok(logs) = logs
            && (logs.len() >= 3 || Instant::now() > deadline)
        {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        logs.len(),
        3,
        "every answered request recorded once, refused ones not at all"
    );
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(
        record.tokens_used,
        15 + 15 + 150,
        "nothing lost, nothing twice"
    );
    assert_eq!(
        send(&app, &key, false).await.status(),
        200,
        "and service resumes"
    );
}

#[tokio::test]
async fn the_answer_ends_before_its_settlement_which_the_host_then_waits_for() {
    let dynamo = PrivateDynamo::start().unwrap();
    let mut options = AppOptions {
        dynamodb_endpoint: Some(dynamo.endpoint()),
        // What the client sees, not what the other tests see.
        hold_answers_until_settled: false,
        ..AppOptions::default()
    };
    // Long enough that the settlement is still owed while the database is
    // down: were it settled before the answer ends, the answer would wait.
    options.proxy.settle_inline = Duration::from_secs(60);
    let app = spawn_app_with(options).await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(100, 50, 0, 0),
        text_chunks: (0..5).map(|i| format!("w{i} ")).collect(),
        event_delay: Duration::from_millis(100),
        ..MessageSpec::default()
    }));
    let answer = send(&app, &key, true).await;
    assert_eq!(answer.status(), 200);
    dynamo.stop().unwrap();
    let started = Instant::now();
    let text = answer.bytes().await.unwrap();
    assert_eq!(
        parse_sse(&text).last().unwrap().event.as_deref(),
        Some("message_stop")
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the answer ended without waiting for DynamoDB"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), app.in_flight.idle())
            .await
            .is_err(),
        "its settlement is still owed, and counted for the host to wait on"
    );

    dynamo.restart().unwrap();
    tokio::time::timeout(Duration::from_secs(60), app.in_flight.idle())
        .await
        .expect("the settlement lands once the database is back");
    let logs = app.items(&id, "LOG#").await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 150);
}

/// One raw HTTP/1.1 exchange, for requests no well-behaved client would send.
fn raw_request(app: &TestApp, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(app.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_never_5xx_or_a_panic() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let token = app.admin_token().await.unwrap();

    // Requests a client library can build.
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let deep_object = format!(
        "{{\"model\":\"m\",\"messages\":{}1{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        (
            "nested array body",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &key)
                .body(nested.clone()),
        ),
        (
            "invalid utf-8 body",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &key)
                .body(vec![b'{', 0xff, 0xfe, b'}']),
        ),
        (
            "body is a string",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &key)
                .body("\"hello\""),
        ),
        (
            "model is a number",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &key)
                .body("{\"model\":5,\"messages\":[]}"),
        ),
        (
            "stream is a string",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &key)
                .body("{\"model\":\"m\",\"stream\":\"yes\"}"),
        ),
        (
            "empty body",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &key),
        ),
        (
            "body is null",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &key)
                .body("null"),
        ),
        (
            "usage days fractional",
            app.http
                .get(app.url("/api/usage/daily?days=1.5"))
                .header("x-api-key", &key),
        ),
        (
            "admin patch with an array",
            app.http
                .patch(app.url("/admin/api-keys/aaaaaaaaaaaa"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("[1,2]"),
        ),
        (
            "count_tokens garbage",
            app.http
                .post(app.url("/v1/messages/count_tokens"))
                .header("x-api-key", &key)
                .body("{{{"),
        ),
        (
            "bearer without token",
            app.http
                .post(app.url("/v1/messages"))
                .header("authorization", "Bearer")
                .json(&body(false)),
        ),
        (
            "bearer of spaces",
            app.http
                .post(app.url("/v1/messages"))
                .header("authorization", "Bearer    ")
                .json(&body(false)),
        ),
        (
            "lowercase scheme, bad key",
            app.http
                .post(app.url("/v1/messages"))
                .header("authorization", "bearer sk-proxy-")
                .json(&body(false)),
        ),
        (
            "basic instead of bearer",
            app.http
                .post(app.url("/v1/messages"))
                .header("authorization", "Basic YTpi")
                .json(&body(false)),
        ),
        (
            "empty x-api-key",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", "")
                .json(&body(false)),
        ),
        (
            "key with unicode",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", format!("sk-proxy-{}é", "a".repeat(42)))
                .json(&body(false)),
        ),
        (
            "key too long",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", format!("{key}x"))
                .json(&body(false)),
        ),
        (
            "two different keys",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &key)
                .header(
                    "authorization",
                    format!(
                        "Bearer {}",
                        relay_shared::domain::key::PresentedKey::generate().expose()
                    ),
                )
                .json(&body(false)),
        ),
        (
            "admin token as api key",
            app.http
                .post(app.url("/v1/messages"))
                .header("x-api-key", &token)
                .json(&body(false)),
        ),
        (
            "relay key as admin token",
            app.http.get(app.url("/admin/api-keys")).bearer_auth(&key),
        ),
        (
            "usage with admin token",
            app.http.get(app.url("/api/usage")).bearer_auth(&token),
        ),
        (
            "usage days huge",
            app.http
                .get(app.url("/api/usage/daily?days=99999999999999999999"))
                .header("x-api-key", &key),
        ),
        (
            "usage limit negative",
            app.http
                .get(app.url("/api/usage/logs?limit=-5"))
                .header("x-api-key", &key),
        ),
        (
            "usage cursor unicode",
            app.http
                .get(app.url("/api/usage/logs?cursor=%E2%9C%93"))
                .header("x-api-key", &key),
        ),
        (
            "usage from control char",
            app.http
                .get(app.url("/api/usage/logs?from=%00"))
                .header("x-api-key", &key),
        ),
        (
            "usage duplicate param",
            app.http
                .get(app.url("/api/usage/daily?days=1&days=2"))
                .header("x-api-key", &key),
        ),
        (
            "admin nested json",
            app.http
                .post(app.url("/admin/api-keys"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(nested),
        ),
        (
            "admin huge number",
            app.http
                .post(app.url("/admin/api-keys"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("{\"name\":\"a\",\"token_limit\":1e400}"),
        ),
        (
            "admin name of controls",
            app.http
                .post(app.url("/admin/api-keys"))
                .bearer_auth(&token)
                .json(&json!({"name": "\u{0}\u{1b}[31m"})),
        ),
        (
            "admin name RTL override",
            app.http
                .post(app.url("/admin/api-keys"))
                .bearer_auth(&token)
                .json(&json!({"name": "\u{202e}evil"})),
        ),
        (
            "admin wrong content type",
            app.http
                .post(app.url("/admin/api-keys"))
                .bearer_auth(&token)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("name=a"),
        ),
        (
            "admin multipart",
            app.http
                .post(app.url("/admin/api-keys"))
                .bearer_auth(&token)
                .header("content-type", "multipart/form-data; boundary=x")
                .body("--x--"),
        ),
        (
            "admin huge body",
            app.http
                .post(app.url("/admin/api-keys"))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(format!("{{\"name\":\"{}\"}}", "a".repeat(100_000))),
        ),
        (
            "admin path traversal",
            app.http
                .get(app.url("/admin/api-keys/..%2F..%2Fetc%2Fpasswd"))
                .bearer_auth(&token),
        ),
        (
            "admin id with unicode",
            app.http
                .get(app.url("/admin/api-keys/%E2%9C%93%E2%9C%93%E2%9C%93%E2%9C%93"))
                .bearer_auth(&token),
        ),
        (
            "tier name traversal",
            app.http
                .put(app.url("/admin/tiers/..%2Fx"))
                .bearer_auth(&token)
                .json(&json!({"requests": 1, "period": 1})),
        ),
        (
            "tier huge numbers",
            app.http
                .put(app.url("/admin/tiers/t"))
                .bearer_auth(&token)
                .json(&json!({"requests": u64::MAX, "period": u64::MAX})),
        ),
        (
            "login with huge basic",
            app.http
                .post(app.url("/admin/login"))
                .header("authorization", format!("Basic {}", "A".repeat(10_000))),
        ),
        (
            "login with non-utf8 basic",
            app.http
                .post(app.url("/admin/login"))
                .header("authorization", "Basic /w=="),
        ),
        (
            "jwt with huge header",
            app.http
                .get(app.url("/admin/api-keys"))
                .bearer_auth(format!("{}.e30.sig", "A".repeat(20_000))),
        ),
    ];
    let total = cases.len();
    let mut failures = Vec::new();
    for (name, request) in cases {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let envelope_ok = serde_json::from_str::<Value>(&text)
            .map(|v| v["type"] == "error" && v["error"]["message"].is_string())
            .unwrap_or(false);
        if !(400..500).contains(&status) || !envelope_ok {
            failures.push(format!(
                "{name}: {status} {}",
                text.chars().take(200).collect::<String>()
            ));
        }
    }

    // Requests only a broken or hostile client sends: raw bytes on the wire.
    let host = format!("127.0.0.1:{}", app.addr.port());
    let raw: Vec<(&str, Vec<u8>)> = vec![
        ("CRLF injected in a header value", format!("GET /api/usage HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\nX-Evil: a\rb\r\nConnection: close\r\n\r\n").into_bytes()),
        ("bare LF header smuggling", format!("GET /api/usage HTTP/1.1\r\nHost: {host}\r\nx-api-key: a\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").into_bytes()),
        ("invalid utf-8 in a header", [format!("GET /api/usage HTTP/1.1\r\nHost: {host}\r\nx-api-key: ").into_bytes(), vec![0xff, 0xfe], b"\r\nConnection: close\r\n\r\n".to_vec()].concat()),
        ("oversized header", format!("GET /api/usage HTTP/1.1\r\nHost: {host}\r\nx-big: {}\r\nConnection: close\r\n\r\n", "a".repeat(200_000)).into_bytes()),
        ("path traversal", format!("GET /v1/../admin/api-keys HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()),
        ("control characters in path", format!("GET /v1/\x01\x02 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()),
        ("content-length lies", format!("POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{}}").into_bytes()),
        ("both content-length and chunked", format!("POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n").into_bytes()),
        ("bad chunk size", format!("POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n").into_bytes()),
        ("huge declared body", format!("POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\nContent-Length: 999999999999\r\nConnection: close\r\n\r\n").into_bytes()),
        ("garbage request line", b"HELLO\r\n\r\n".to_vec()),
        ("absurd method", format!("FROBNICATE /admin/api-keys HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()),
    ];
    let raw_total = raw.len();
    for (name, request) in raw {
        let app_ref = &app;
        let (status, text) = tokio::task::block_in_place(|| raw_request(app_ref, &request));
        // The HTTP layer may refuse before any handler runs (400/413/431, or
        // closing the connection on bytes that are not HTTP); handlers must
        // answer 4xx. Never a 5xx.
        if status >= 500 || (status != 0 && status < 400 && !name.starts_with("path traversal")) {
            failures.push(format!(
                "raw {name}: {status} {}",
                text.chars().take(200).collect::<String>()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        total + raw_total,
        failures.join("\n")
    );
    assert!(total + raw_total >= 50);

    // A valid body nested 5000 deep is the upstream's to judge: the relay
    // only reads two top-level fields, without recursing, and forwards it.
    let deep = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .body(deep_object)
        .send()
        .await
        .unwrap();
    assert_eq!(deep.status(), 200);

    // Still serving: no handler panicked the server away.
    let health = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(send(&app, &key, false).await.status(), 200);
}
