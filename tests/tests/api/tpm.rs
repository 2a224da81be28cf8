//! Tokens per minute end to end: a tier's `tokens_per_minute` checked in
//! the admission write against the counter of the current minute on the key
//! item, filled by settlement, refused with a transient 429 whose integer
//! `retry-after` is the seconds left in the minute, and shown in the
//! key holder's quota view.
//!
//! No test sleeps across a minute: the counters are read back, or written,
//! for the minutes a request can fall in.

use aws_sdk_dynamodb::types::AttributeValue;
use relay_tests::app::{TestApp, spawn_app};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use reqwest::Response;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// The tier's limit, and what each answer bills: 300 input + 100 output.
const LIMIT: u64 = 1000;
const PER_ANSWER: u64 = 400;

/// A tier of `LIMIT` tokens per minute (and plenty of requests), a key on
/// it, and answers billing `PER_ANSWER` tokens each.
async fn key_on_a_tpm_tier(app: &TestApp) -> (String, String) {
    app.upstream.set_default(Behavior::Message(MessageSpec {
        usage: Usage::new(300, 100, 0, 0),
        ..MessageSpec::default()
    }));
    let token = app.admin_token().await.unwrap();
    let put = app
        .http
        .put(app.url("/admin/tiers/tpm"))
        .bearer_auth(token)
        .json(&json!({"requests": 1000, "period": 60, "tokens_per_minute": LIMIT}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    app.new_key_with(json!({"name": "tpm", "rate_limit_tier": "tpm"}))
        .await
        .unwrap()
}

async fn send(app: &TestApp, key: &str) -> Response {
    app.message(key, "claude-sonnet-4-5").send().await.unwrap()
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A transient refusal: 429 `rate_limit_error` with an integer
/// `retry-after` of 1 to 60 seconds, and nothing telling clients not to
/// retry. Returns the retry-after and the message.
async fn transient_refusal(response: Response) -> (u64, String) {
    assert_eq!(response.status(), 429);
    assert_ne!(header(&response, "x-should-retry"), Some("false"));
    let retry_after: u64 = header(&response, "retry-after")
        .expect("a retry-after header")
        .parse()
        .expect("an integer retry-after");
    assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let message = body["error"]["message"].as_str().unwrap().to_owned();
    (retry_after, message)
}

/// Sets the token counters of the current minute and the next to `tokens`
/// (the request sent next falls in one of them), dropping any other.
async fn set_minute_counters(app: &TestApp, id: &str, tokens: u64) {
    let now = u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap();
    let minute = now - now % 60;
    let record = app.key_record(id).await.unwrap();
    let mut update = app
        .store
        .client()
        .update_item()
        .table_name(app.store.table())
        .key("pk", AttributeValue::S(format!("KEY#{id}")))
        .key("sk", AttributeValue::S("META".into()))
        .expression_attribute_names("#now", format!("tpm|{minute}"))
        .expression_attribute_names("#next", format!("tpm|{}", minute + 60))
        .expression_attribute_values(":tokens", AttributeValue::N(tokens.to_string()));
    let mut expression = "SET #now = :tokens, #next = :tokens".to_owned();
    let others: Vec<String> = record
        .tokens_per_minute
        .keys()
        .filter(|start| **start != minute && **start != minute + 60)
        .enumerate()
        .map(|(i, start)| {
            update = update
                .clone()
                .expression_attribute_names(format!("#old{i}"), format!("tpm|{start}"));
            format!("#old{i}")
        })
        .collect();
    if !others.is_empty() {
        expression.push_str(&format!(" REMOVE {}", others.join(", ")));
    }
    update.update_expression(expression).send().await.unwrap();
}

#[tokio::test]
async fn a_key_is_refused_once_its_minute_of_tokens_is_spent_and_told_when_to_retry() {
    let app = spawn_app().await.unwrap();
    let (id, key) = key_on_a_tpm_tier(&app).await;

    // 400 tokens an answer under 1000 a minute: the third is admitted with
    // 800 used (soft: room left admits) and takes the minute to 1200; the
    // next is refused. A minute that turns meanwhile starts the count
    // again, so allow for one turn.
    let mut admitted = 0;
    let refusal = loop {
        let response = send(&app, &key).await;
        if response.status() == 429 {
            break transient_refusal(response).await;
        }
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        admitted += 1;
        assert!(admitted <= 6, "never refused");
    };
    assert!(admitted >= 3, "refused after {admitted}");
    let (retry_after, message) = refusal;
    assert_eq!(
        message,
        format!(
            "tokens-per-minute limit of this API key's tier reached (1200 of 1000 tokens this minute); retry in {retry_after} seconds"
        )
    );
    // The refused minute holds three answers' tokens; an earlier minute's
    // counter was dropped by the first settlement of the next.
    let counters = app.key_record(&id).await.unwrap().tokens_per_minute;
    let counted: Vec<u64> = counters.values().copied().collect();
    assert_eq!(counted, [3 * PER_ANSWER], "{counters:?}");
    let requests_sent = app.upstream.requests().len();
    assert_eq!(requests_sent, admitted, "the refused request was not sent");

    // The key holder sees the minute spent and when it resets.
    let quota: Value = app.quota(&key).await.unwrap();
    assert_eq!(quota["rate_limit_tier"]["tokens_per_minute"], LIMIT);
    let (minute, _) = counters.first_key_value().unwrap();
    let now = u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap();
    if now - now % 60 == *minute {
        let reset = OffsetDateTime::from_unix_timestamp(i64::try_from(minute + 60).unwrap());
        assert_eq!(
            quota["token_minute"],
            json!({
                "tokens_used": 1200,
                "tokens_remaining": 0,
                "resets_at": relay_shared::domain::format_timestamp(reset.unwrap()),
            })
        );
    }
}

#[tokio::test]
async fn one_token_under_the_limit_admits_and_exactly_at_it_refuses() {
    let app = spawn_app().await.unwrap();
    let (id, key) = key_on_a_tpm_tier(&app).await;

    set_minute_counters(&app, &id, LIMIT - 1).await;
    let response = send(&app, &key).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    // Its tokens went to the minute it was admitted in.
    let counters = app.key_record(&id).await.unwrap().tokens_per_minute;
    assert!(
        counters
            .values()
            .any(|used| *used == LIMIT - 1 + PER_ANSWER),
        "{counters:?}"
    );

    set_minute_counters(&app, &id, LIMIT).await;
    let (retry_after, message) = transient_refusal(send(&app, &key).await).await;
    assert!(
        message.contains("(1000 of 1000 tokens this minute)"),
        "{message}"
    );
    assert!(
        message.ends_with(&format!("retry in {retry_after} seconds")),
        "{message}"
    );
}

#[tokio::test]
async fn a_tier_without_tokens_per_minute_counts_no_minutes() {
    let app = spawn_app().await.unwrap();
    app.upstream.set_default(Behavior::Message(MessageSpec {
        usage: Usage::new(300, 100, 0, 0),
        ..MessageSpec::default()
    }));
    let (id, key) = app.new_key().await.unwrap();
    for _ in 0..3 {
        let response = send(&app, &key).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    assert!(
        app.key_record(&id)
            .await
            .unwrap()
            .tokens_per_minute
            .is_empty()
    );
    let quota: Value = app.quota(&key).await.unwrap();
    assert_eq!(quota["token_minute"], Value::Null);
}

#[tokio::test]
async fn a_batch_is_admitted_on_a_key_whose_minute_is_spent() {
    let app = spawn_app().await.unwrap();
    let (id, key) = key_on_a_tpm_tier(&app).await;
    set_minute_counters(&app, &id, LIMIT).await;
    let before = app.key_record(&id).await.unwrap().tokens_per_minute;

    // Messages are refused this minute; a batch, which runs upstream
    // asynchronously, is not held to the minute.
    transient_refusal(send(&app, &key).await).await;
    let batch = json!({"requests": [{"custom_id": "a", "params": {
        "model": "claude-sonnet-4-5", "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}]}}]});
    let response = app
        .http
        .post(app.url("/v1/messages/batches"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    assert_eq!(app.key_record(&id).await.unwrap().tokens_per_minute, before);
}
