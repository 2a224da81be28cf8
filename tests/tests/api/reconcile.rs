//! Requests whose settlement never comes: the trace their admission left
//! on the key, and the reconciler that charges them an estimate, exactly
//! once, when they are overdue.

use std::time::Duration;

use relay_shared::domain::usage::{TokenUsage, UsageRecord};
use relay_shared::proxy::batches::collect_as_of;
use relay_shared::store::settlement::SettleOutcome;
use relay_tests::app::{num, spawn_app, text};
use relay_tests::fake_upstream::Behavior;
use serde_json::json;

#[tokio::test]
async fn a_request_that_never_settles_is_charged_its_estimate_once_when_overdue() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app
        .new_key_with(json!({"name": "lost", "token_limit": 1_000_000,
            "dollar_limits": [{"window": "lifetime", "limit_usd": 100}]}))
        .await
        .unwrap();
    // The upstream never answers and the client gives up: the request was
    // admitted, and nothing settles it while the test looks.
    app.upstream.set_default(Behavior::Hang);
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "x".repeat(3_950)}]
    });
    let body_len = serde_json::to_vec(&body).unwrap().len() as u64;
    let gave_up = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .timeout(Duration::from_millis(500))
        .json(&body)
        .send()
        .await;
    assert!(gave_up.is_err(), "the fake hangs");

    // Its admission left a trace on the key.
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(record.flights.len(), 1);
    let flight = record.flights[0].clone();
    assert_eq!(flight.body_bytes, body_len);
    assert_eq!(flight.max_tokens, 300);
    assert_eq!(record.tokens_used, 0);

    // Not overdue yet: the reconciler leaves it.
    let now = relay_shared::domain::now();
    let early = collect_as_of(&app.proxy, now).await;
    assert_eq!(early.reconciled.charged, 0);

    // Fifteen minutes on, it is charged: its body at four bytes a token
    // and all of max_tokens, as an estimated row.
    let later = now + time::Duration::minutes(16);
    let report = collect_as_of(&app.proxy, later).await;
    assert_eq!(report.reconciled.charged, 1, "{report:?}");
    let expected = body_len / 4 + 300;
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(record.tokens_used, expected);
    assert!(record.flights.is_empty());
    // Sonnet 4.5: (body/4) × $3 + 300 × $15 per million.
    let cost = (body_len / 4) * 3 + 300 * 15;
    assert_eq!(
        record.spend.values().copied().collect::<Vec<_>>(),
        vec![cost]
    );
    let logs = app.items(&id, "LOG#").await.unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(
        text(&logs[0], "request_id"),
        Some(flight.request_id.as_str())
    );
    assert_eq!(num(&logs[0], "status"), 0);
    assert_eq!(num(&logs[0], "cost_micro_usd"), cost);
    assert_eq!(
        logs[0].get("estimated").and_then(|v| v.as_bool().ok()),
        Some(&true)
    );

    // Exactly once: another pass finds nothing, and the real settlement,
    // should it arrive late after all, counts nothing again.
    assert_eq!(collect_as_of(&app.proxy, later).await.reconciled.charged, 0);
    // (The proxy records it at its admission moment, as the trace says.)
    let late = UsageRecord {
        request_id: flight.request_id.clone(),
        key_id: record.id.clone(),
        at: flight.admitted_at,
        model: flight.model.clone(),
        requested_model: None,
        method: "POST".into(),
        path: "/v1/messages".into(),
        status: 200,
        stream: false,
        usage: TokenUsage {
            input_tokens: 1_000,
            output_tokens: 10,
            ..TokenUsage::default()
        },
        estimated: false,
        latency_ms: 1,
        ttfb_ms: None,
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
    let outcome = app
        .store
        .settle(&late, Duration::from_secs(86_400))
        .await
        .unwrap();
    assert_eq!(outcome, SettleOutcome::AlreadyRecorded);
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, expected);
}

#[tokio::test]
async fn a_settled_request_leaves_no_trace_for_the_reconciler() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let response = app.message(&key, "claude-sonnet-4-5").send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    app.wait_for_logs(&id, 1).await.unwrap();
    assert!(app.key_record(&id).await.unwrap().flights.is_empty());
    let later = relay_shared::domain::now() + time::Duration::minutes(16);
    let report = collect_as_of(&app.proxy, later).await;
    assert_eq!(report.reconciled.charged, 0);
    assert_eq!(app.items(&id, "LOG#").await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_key_limited_to_two_requests_at_once_gets_a_short_retry_for_the_third() {
    use relay_tests::fake_upstream::MessageSpec;
    let app = spawn_app().await.unwrap();
    let (id, key) = app
        .new_key_with(json!({"name": "two", "max_concurrent": 2}))
        .await
        .unwrap();
    // Answers that take a while to start: two are in flight together.
    app.upstream.set_default(Behavior::Message(MessageSpec {
        first_byte_delay: Duration::from_millis(600),
        ..MessageSpec::default()
    }));
    let send = || app.message(&key, "claude-sonnet-4-5").send();
    let (first, second) = (send(), send());
    let third = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send().await
    };
    let (first, second, third) = tokio::join!(first, second, third);
    let (first, second, third) = (first.unwrap(), second.unwrap(), third.unwrap());
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    assert_eq!(third.status(), 429);
    assert_eq!(
        third
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    assert_eq!(third.headers().get("x-should-retry"), None);
    first.bytes().await.unwrap();
    second.bytes().await.unwrap();
    app.in_flight.idle().await;
    // Settled: the leases are back, and the next request is admitted.
    let record = app.key_record(&id).await.unwrap();
    assert_eq!((record.in_flight, record.flights.len()), (0, 0));
    let quota = app.quota(&key).await.unwrap();
    assert_eq!(
        (quota["in_flight"].clone(), quota["max_concurrent"].clone()),
        (json!(0), json!(2))
    );
    let again = send().await.unwrap();
    assert_eq!(again.status(), 200);
    again.bytes().await.unwrap();
}

#[tokio::test]
async fn the_reconciler_gives_back_the_lease_of_a_request_that_never_settled() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app
        .new_key_with(json!({"name": "one", "max_concurrent": 1}))
        .await
        .unwrap();
    app.upstream.set_default(Behavior::Hang);
    let send = || {
        app.message(&key, "claude-sonnet-4-5")
            .timeout(Duration::from_millis(300))
            .send()
    };
    assert!(send().await.is_err(), "the fake hangs");
    // Its lease is held: the next request must wait…
    let refused = send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(app.key_record(&id).await.unwrap().in_flight, 1);
    // …until the reconciler charges the lost one and gives its lease back.
    let later = relay_shared::domain::now() + time::Duration::minutes(16);
    assert_eq!(collect_as_of(&app.proxy, later).await.reconciled.charged, 1);
    assert_eq!(app.key_record(&id).await.unwrap().in_flight, 0);
}

#[tokio::test]
async fn the_reconciler_gives_back_a_hard_mode_reservation_exactly_once() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app
        .new_key_with(
            json!({"name": "lost", "limit_mode": "hard", "token_limit": 1_000_000,
            "max_concurrent": 4,
            "dollar_limits": [{"window": "lifetime", "limit_usd": 100}]}),
        )
        .await
        .unwrap();
    app.upstream.set_default(Behavior::Hang);
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "x".repeat(3_950)}]
    });
    let body_len = serde_json::to_vec(&body).unwrap().len() as u64;
    let send = || {
        app.http
            .post(app.url("/v1/messages"))
            .header("x-api-key", &key)
            .timeout(Duration::from_millis(500))
            .json(&body)
            .send()
    };
    let (first, second) = tokio::join!(send(), send());
    assert!(first.is_err() && second.is_err(), "the fake hangs");

    // Each admission reserved its worst case on the token limit and the
    // dollar counter, and holds a lease; the quota view shows them.
    let record = app.key_record(&id).await.unwrap();
    assert_eq!((record.flights.len(), record.in_flight), (2, 2));
    let reservation = record.flights[0].reservation.clone().unwrap();
    assert_eq!(record.flights[1].reservation, Some(reservation.clone()));
    assert!(reservation.tokens > 300);
    assert_eq!(record.tokens_used, 2 * reservation.tokens);
    assert_eq!(record.tokens_reserved, 2 * reservation.tokens);
    assert_eq!(
        record.spend.values().copied().collect::<Vec<_>>(),
        vec![2 * reservation.cost]
    );
    let quota = app.quota(&key).await.unwrap();
    assert_eq!(quota["outstanding"]["requests"], 2);
    assert_eq!(quota["outstanding"]["leases"], 2);
    assert_eq!(
        quota["outstanding"]["reserved_tokens"],
        2 * reservation.tokens
    );

    // Overdue: each is charged its estimate in place of its reservation,
    // and gives its lease back. The estimate (its body at four bytes a
    // token) is more than tiktoken's bound of 3,950 `x`: it is cut to what
    // was reserved, so the limits it was checked against still hold.
    let later = relay_shared::domain::now() + time::Duration::minutes(16);
    let report = collect_as_of(&app.proxy, later).await;
    assert_eq!(report.reconciled.charged, 2, "{report:?}");
    assert!(body_len / 4 + 300 > reservation.tokens);
    let input = reservation.tokens - 300;
    let estimate = reservation.tokens;
    let cost = input * 3 + 300 * 15;
    assert!(cost <= reservation.cost);
    let check = |record: relay_shared::domain::key::ApiKeyRecord| {
        assert_eq!(record.tokens_used, 2 * estimate);
        assert_eq!(record.tokens_reserved, 0);
        assert_eq!(record.in_flight, 0);
        assert!(record.flights.is_empty());
        assert_eq!(
            record.spend.values().copied().collect::<Vec<_>>(),
            vec![2 * cost]
        );
    };
    check(app.key_record(&id).await.unwrap());
    // Exactly once: a second pass changes nothing.
    assert_eq!(collect_as_of(&app.proxy, later).await.reconciled.charged, 0);
    check(app.key_record(&id).await.unwrap());
    assert_eq!(app.items(&id, "LOG#").await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_client_that_leaves_while_its_request_is_admitted_still_gets_it_settled() {
    use relay_tests::app::{AppOptions, spawn_app_with};
    use relay_tests::dynamo::SlowSettlements;
    let endpoint = relay_tests::app::dynamodb_endpoint().unwrap();
    let slow = SlowSettlements::holding(endpoint, "UpdateItem", Duration::from_millis(600))
        .await
        .unwrap();
    let app = spawn_app_with(AppOptions {
        dynamodb_endpoint: Some(slow.endpoint.clone()),
        ..AppOptions::default()
    })
    .await
    .unwrap();
    let (id, key) = app
        .new_key_with(
            json!({"name": "leaves", "max_concurrent": 1, "limit_mode": "hard",
            "token_limit": 1_000_000}),
        )
        .await
        .unwrap();
    // The client gives up while its admission write is on its way.
    let gave_up = app
        .message(&key, "claude-sonnet-4-5")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gave_up.is_err());
    // Admitted all the same, it is forwarded, answered and settled: its
    // lease, reservation and trace are given back now, not by the
    // reconciler 15 minutes on.
    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(num(&logs[0], "status"), 200);
    app.in_flight.idle().await;
    let record = app.key_record(&id).await.unwrap();
    assert_eq!((record.in_flight, record.tokens_reserved), (0, 0));
    assert!(record.flights.is_empty());
    let next = app.message(&key, "claude-sonnet-4-5").send().await.unwrap();
    assert_eq!(next.status(), 200);
    next.bytes().await.unwrap();
}
