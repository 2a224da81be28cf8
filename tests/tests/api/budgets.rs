//! Dollar limits end to end: set on a key (or by the organisation
//! default), checked in the admission write, spent by settlement, refused
//! with a 429 that names the window and its reset, shown in the views and
//! in the `x-relay-…` headers of every proxied answer.

use aws_sdk_dynamodb::types::AttributeValue;
use relay_shared::domain::budget::{BudgetPolicy, BudgetZone, DollarLimit, Window};
use relay_tests::app::{AppOptions, TestApp, spawn_app, spawn_app_with};
use relay_tests::dynamo::SlowSettlements;
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use reqwest::Response;
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime, Time, Weekday};

/// Sonnet 4.5 at $3 / $15 per MTok: 100 000 input and 10 000 output
/// tokens cost 0.3 + 0.15 = $0.45 (450 000 µ$).
const SONNET_COST: u64 = 450_000;
/// Opus 4.5 at $5 / $25 per MTok for the same usage: 0.5 + 0.25 = $0.75.
const OPUS_COST: u64 = 750_000;

fn answer_costing_a_fixed_amount(app: &TestApp) {
    app.upstream.set_default(Behavior::Message(MessageSpec {
        usage: Usage::new(100_000, 10_000, 0, 0),
        ..MessageSpec::default()
    }));
}

async fn send(app: &TestApp, key: &str, model: &str) -> Response {
    app.message(key, model).send().await.unwrap()
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn refusal(response: Response) -> String {
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-should-retry"), Some("false"));
    assert_eq!(header(&response, "retry-after"), None);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    body["error"]["message"].as_str().unwrap().to_owned()
}

fn midnight_after(now: OffsetDateTime) -> String {
    let next = (now + Duration::days(1)).replace_time(Time::MIDNIGHT);
    relay_shared::domain::format_timestamp(next)
}

async fn key_quota(app: &TestApp, key: &str) -> Value {
    app.quota(key).await.unwrap()
}

async fn admin(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let token = app.admin_token().await.unwrap();
    let mut request = app.http.request(method, app.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_daily_dollar_limit_admits_while_it_has_room_then_refuses_naming_its_reset() {
    let app = spawn_app().await.unwrap();
    answer_costing_a_fixed_amount(&app);
    let (id, key) = app
        .new_key_with(
            json!({"name": "daily", "dollar_limits": [{"window": "day", "limit_usd": 1}]}),
        )
        .await
        .unwrap();

    // $1 a day at $0.45 a request: the third starts with $0.10 left, so it
    // is admitted (soft: room left admits) and overshoots to $1.35.
    let expected_left = ["1.00", "0.55", "0.10"];
    for left in expected_left {
        let response = send(&app, &key, "claude-sonnet-4-5").await;
        assert_eq!(response.status(), 200);
        // What was left when the request was admitted.
        assert_eq!(
            header(&response, "x-relay-budget-remaining-usd"),
            Some(left)
        );
        assert_eq!(header(&response, "x-relay-budget-limit"), Some("day"));
        let reset = midnight_after(OffsetDateTime::now_utc());
        assert_eq!(
            header(&response, "x-relay-budget-reset"),
            Some(reset.as_str())
        );
        response.bytes().await.unwrap();
    }
    let sent_upstream = app.upstream.requests().len();
    let message = refusal(send(&app, &key, "claude-sonnet-4-5").await).await;
    let reset = midnight_after(OffsetDateTime::now_utc());
    assert_eq!(
        message,
        format!(
            "dollar limit reached: $1.35 of $1.00 per day; resets at {reset} (day calendar, UTC)"
        )
    );
    assert_eq!(
        app.upstream.requests().len(),
        sent_upstream,
        "refused before forwarding"
    );
    // Every proxied answer says so, not only messages: a model list from
    // upstream, a file list the relay answers from its own records.
    for path in ["/v1/models", "/v1/files"] {
        let response = app
            .http
            .get(app.url(path))
            .header("x-api-key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            header(&response, "x-relay-budget-remaining-usd"),
            Some("0.00"),
            "{path}"
        );
        assert_eq!(
            header(&response, "x-relay-budget-limit"),
            Some("day"),
            "{path}"
        );
    }

    // Both views show it spent, with its reset.
    let quota = key_quota(&app, &key).await;
    let budget = &quota["budgets"][0];
    assert_eq!(budget["window"], "day");
    assert_eq!(budget["source"], "key");
    assert_eq!(budget["limit_micro_usd"], 1_000_000);
    assert_eq!(budget["used_micro_usd"], 3 * SONNET_COST);
    assert_eq!(budget["remaining_micro_usd"], 0);
    assert_eq!(budget["resets_at"], reset.as_str());
    let (_, view) = admin(
        &app,
        reqwest::Method::GET,
        &format!("/admin/api-keys/{id}"),
        None,
    )
    .await;
    assert_eq!(view["dollar_limits"][0]["limit_usd"], 1.0);
    assert_eq!(view["budgets"][0]["used_micro_usd"], 3 * SONNET_COST);

    // Raising the limit takes effect on the next request, although the
    // proxy caches the key: the admission write requires the limits it
    // was decided on, and the changed ones send it back to the stored key.
    let (status, _) = admin(
        &app,
        reqwest::Method::PATCH,
        &format!("/admin/api-keys/{id}"),
        Some(json!({"dollar_limits": [{"window": "day", "limit_usd": 2}]})),
    )
    .await;
    assert_eq!(status, 200);
    let response = send(&app, &key, "claude-sonnet-4-5").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "x-relay-budget-remaining-usd"),
        Some("0.65")
    );
    response.bytes().await.unwrap();
    // …and lowering it refuses at once.
    admin(
        &app,
        reqwest::Method::PATCH,
        &format!("/admin/api-keys/{id}"),
        Some(json!({"dollar_limits": [{"window": "day", "limit_usd": 0.5}]})),
    )
    .await;
    refusal(send(&app, &key, "claude-sonnet-4-5").await).await;
}

#[tokio::test]
async fn a_weekly_limit_on_opus_refuses_opus_only_and_counts_only_opus() {
    let app = spawn_app().await.unwrap();
    answer_costing_a_fixed_amount(&app);
    let (id, key) = app
        .new_key_with(json!({"name": "opus-weekly", "dollar_limits": [
            {"window": "week", "limit_usd": 0.7, "models": "claude-opus-*"},
            {"window": "lifetime", "limit_usd": 100}
        ]}))
        .await
        .unwrap();

    let response = send(&app, &key, "claude-opus-4-5-20251101").await;
    assert_eq!(response.status(), 200);
    // The tightest limit for Opus is its week.
    assert_eq!(
        header(&response, "x-relay-budget-limit"),
        Some("week:claude-opus-*")
    );
    response.bytes().await.unwrap();
    let message = refusal(send(&app, &key, "claude-opus-4-5-20251101").await).await;
    let now = OffsetDateTime::now_utc();
    let days_to_monday = 7 - i64::from(now.weekday().number_days_from_monday());
    let monday = (now + Duration::days(days_to_monday)).replace_time(Time::MIDNIGHT);
    assert_eq!(monday.weekday(), Weekday::Monday);
    assert_eq!(
        message,
        format!(
            "dollar limit reached: $0.75 of $0.70 per week on models `claude-opus-*`; resets at {} (week calendar, UTC)",
            relay_shared::domain::format_timestamp(monday)
        )
    );
    // Sonnet is not restricted by the Opus week, and does not count in it.
    for _ in 0..2 {
        let response = send(&app, &key, "claude-sonnet-4-5").await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-relay-budget-limit"), Some("lifetime"));
        response.bytes().await.unwrap();
    }
    let record = app.key_record(&id).await.unwrap();
    let by_limit: Vec<(String, u64)> = record
        .spend
        .iter()
        .map(|(counter, used)| (counter.limit.clone(), *used))
        .collect();
    assert_eq!(
        by_limit,
        vec![
            ("lifetime".to_owned(), OPUS_COST + 2 * SONNET_COST),
            ("week:claude-opus-*".to_owned(), OPUS_COST),
        ]
    );
}

#[tokio::test]
async fn the_organisation_default_applies_to_keys_that_set_none() {
    let app = spawn_app_with(AppOptions {
        budgets: BudgetPolicy {
            default_limits: vec![DollarLimit {
                window: Window::Month,
                limit: 400_000,
                models: None,
            }],
            zone: BudgetZone::named("Asia/Tokyo").unwrap(),
        },
        ..AppOptions::default()
    })
    .await
    .unwrap();
    answer_costing_a_fixed_amount(&app);
    let (_, unset) = app.new_key().await.unwrap();
    let (_, opted_out) = app
        .new_key_with(json!({"name": "no-limit", "dollar_limits": []}))
        .await
        .unwrap();

    send(&app, &unset, "claude-sonnet-4-5")
        .await
        .bytes()
        .await
        .unwrap();
    let message = refusal(send(&app, &unset, "claude-sonnet-4-5").await).await;
    assert!(message.contains("per month"), "{message}");
    assert!(
        message.ends_with("(month calendar, Asia/Tokyo)"),
        "{message}"
    );
    let quota = key_quota(&app, &unset).await;
    assert_eq!(quota["budgets"][0]["source"], "default");
    assert_eq!(quota["budgets"][0]["time_zone"], "Asia/Tokyo");
    // The month ends at Tokyo's midnight: 15:00 UTC the day before.
    assert!(
        quota["budgets"][0]["resets_at"]
            .as_str()
            .unwrap()
            .ends_with("T15:00:00.000Z"),
        "{quota}"
    );

    for _ in 0..3 {
        let response = send(&app, &opted_out, "claude-sonnet-4-5").await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-relay-budget-remaining-usd"), None);
        response.bytes().await.unwrap();
    }
    assert_eq!(key_quota(&app, &opted_out).await["budgets"], json!([]));
}

#[tokio::test]
async fn the_five_hour_window_opens_with_the_first_request_and_a_new_one_after_it_closed() {
    let app = spawn_app().await.unwrap();
    answer_costing_a_fixed_amount(&app);
    let (id, key) = app
        .new_key_with(json!({"name": "5h", "dollar_limits": [{"window": "5h", "limit_usd": 0.4}]}))
        .await
        .unwrap();
    // No window before the first request: nothing used, no reset yet.
    let quota = key_quota(&app, &key).await;
    assert_eq!(quota["budgets"][0]["used_micro_usd"], 0);
    assert_eq!(quota["budgets"][0]["resets_at"], Value::Null);

    let before = OffsetDateTime::now_utc().unix_timestamp();
    send(&app, &key, "claude-sonnet-4-5")
        .await
        .bytes()
        .await
        .unwrap();
    let start = app.key_record(&id).await.unwrap().five_hour_start.unwrap();
    assert!((before..=before + 5).contains(&i64::try_from(start).unwrap()));
    let message = refusal(send(&app, &key, "claude-sonnet-4-5").await).await;
    let reset =
        OffsetDateTime::from_unix_timestamp(i64::try_from(start).unwrap() + 5 * 3600).unwrap();
    assert!(
        message.ends_with(&format!(
            "per 5-hour window; the window resets at {}",
            relay_shared::domain::format_timestamp(reset)
        )),
        "{message}"
    );

    // Five hours pass (the stored window and its counter are moved five
    // hours back): the next request opens a new window at its own moment,
    // with nothing spent in it, and its settlement drops the old window's
    // counter.
    let old_start = start - 5 * 3600 - 1;
    app.store
        .client()
        .update_item()
        .table_name(app.store.table())
        .key("pk", AttributeValue::S(format!("KEY#{id}")))
        .key("sk", AttributeValue::S("META".into()))
        .update_expression("SET five_hour_start = :s, #old = :spent REMOVE #now")
        .expression_attribute_names("#old", format!("spend|5h|h{old_start}"))
        .expression_attribute_names("#now", format!("spend|5h|h{start}"))
        .expression_attribute_values(":s", AttributeValue::N(old_start.to_string()))
        .expression_attribute_values(":spent", AttributeValue::N(SONNET_COST.to_string()))
        .send()
        .await
        .unwrap();
    let spent = app.key_record(&id).await.unwrap().spend;
    assert_eq!(spent.len(), 1, "the moved counter: {spent:?}");
    let response = send(&app, &key, "claude-sonnet-4-5").await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    let record = app.key_record(&id).await.unwrap();
    let new_start = record.five_hour_start.unwrap();
    assert!(new_start >= start && new_start > old_start + 5 * 3600);
    let counters: Vec<(String, u64)> = record
        .spend
        .iter()
        .map(|(c, used)| (c.period.clone(), *used))
        .collect();
    assert_eq!(counters, vec![(format!("h{new_start}"), SONNET_COST)]);
}

#[tokio::test]
async fn dollar_limits_are_validated_naming_the_field() {
    let app = spawn_app().await.unwrap();
    for (limits, field) in [
        (
            json!([{"window": "fortnight", "limit_usd": 1}]),
            "dollar_limits[0].window",
        ),
        (
            json!([{"window": "day", "limit_usd": -1}]),
            "dollar_limits[0].limit_usd",
        ),
        (
            json!([{"window": "day", "limit_usd": 0.0000001}]),
            "dollar_limits[0].limit_usd",
        ),
        (
            json!([{"window": "day", "limit_usd": 1}, {"window": "day", "limit_usd": 2}]),
            "dollar_limits[1].window",
        ),
        (
            json!([{"window": "week", "limit_usd": 1, "models": "claude opus"}]),
            "dollar_limits[0].models",
        ),
    ] {
        let (status, body) = admin(
            &app,
            reqwest::Method::POST,
            "/admin/api-keys",
            Some(json!({"name": "bad", "dollar_limits": limits})),
        )
        .await;
        assert_eq!(status, 422, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{field}`")),
            "{field}: {message}"
        );
    }
    // null on a patch gives the key back to the organisation default.
    let (id, _) = app
        .new_key_with(json!({"name": "k", "dollar_limits": [{"window": "day", "limit_usd": 3}]}))
        .await
        .unwrap();
    let (status, view) = admin(
        &app,
        reqwest::Method::PATCH,
        &format!("/admin/api-keys/{id}"),
        Some(json!({"dollar_limits": null})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(view["dollar_limits"], Value::Null);
    assert_eq!(app.key_record(&id).await.unwrap().dollar_limits, None);
}

/// A client that sends each request once the previous answer ended, as
/// Claude Code does, on the real settle timing (after the answer, unless
/// the answer may use up a limit), with every settlement held back 300 ms
/// on its way to DynamoDB: a request sent right after an answer whose
/// settlement trails it is admitted before that usage is counted. The fake
/// bills what the request could really use: input = body length / 4,
/// output = min(max_tokens, 12).
async fn sequential_app() -> (TestApp, SlowSettlements) {
    let endpoint = relay_tests::app::dynamodb_endpoint().unwrap();
    let slow = SlowSettlements::start(endpoint, std::time::Duration::from_millis(300))
        .await
        .unwrap();
    let app = spawn_app_with(AppOptions {
        hold_answers_until_settled: false,
        dynamodb_endpoint: Some(slow.endpoint.clone()),
        ..AppOptions::default()
    })
    .await
    .unwrap();
    app.upstream.set_default(Behavior::Message(MessageSpec {
        usage_from_request: true,
        ..MessageSpec::default()
    }));
    (app, slow)
}

/// Three requests one after another, each read to its end; returns how many
/// usage rows were recorded when the third answer had ended.
async fn three_in_a_row(app: &TestApp, id: &str, key: &str) -> usize {
    for _ in 0..3 {
        let response = send(app, key, "claude-sonnet-4-5").await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    app.items(id, "LOG#").await.unwrap().len()
}

/// What one such request bills (tokens, µ$), read off a probe key.
async fn one_request(app: &TestApp) -> (u64, u64) {
    let (probe_id, probe) = app.new_key().await.unwrap();
    send(app, &probe, "claude-sonnet-4-5")
        .await
        .bytes()
        .await
        .unwrap();
    app.in_flight.idle().await;
    let log = &app.wait_for_logs(&probe_id, 1).await.unwrap()[0];
    (
        relay_tests::app::num(log, "input_tokens") + relay_tests::app::num(log, "output_tokens"),
        relay_tests::app::num(log, "cost_micro_usd"),
    )
}

#[tokio::test]
async fn a_sequential_client_is_refused_right_after_the_answer_that_spent_its_dollars() {
    let (app, _slow) = sequential_app().await;
    // A limit two requests' cost and one micro-dollar: the third is
    // admitted (room left) and spends it.
    let (_, cost) = one_request(&app).await;
    let limit_usd = (2 * cost + 1) as f64 / 1e6;
    let (id, key) = app
        .new_key_with(json!({"name": "seq", "dollar_limits": [{"window": "lifetime", "limit_usd": limit_usd}]}))
        .await
        .unwrap();
    // Each answer's worst case reaches what is left, so each is recorded
    // before it ends: once the third answer is read, its usage is there.
    assert_eq!(three_in_a_row(&app, &id, &key).await, 3);
    let spent: u64 = app.key_record(&id).await.unwrap().spend.values().sum();
    assert_eq!(spent, 3 * cost);
    let message = refusal(send(&app, &key, "claude-sonnet-4-5").await).await;
    assert!(message.contains("in total"), "{message}");
}

#[tokio::test]
async fn a_sequential_client_is_refused_right_after_the_answer_that_spent_its_tokens() {
    let (app, _slow) = sequential_app().await;
    let (tokens, _) = one_request(&app).await;
    let (id, key) = app
        .new_key_with(json!({"name": "seq", "token_limit": 2 * tokens + 1}))
        .await
        .unwrap();
    assert_eq!(three_in_a_row(&app, &id, &key).await, 3);
    assert_eq!(app.key_record(&id).await.unwrap().tokens_used, 3 * tokens);
    let response = send(&app, &key, "claude-sonnet-4-5").await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-should-retry"), Some("false"));
}

/// A hard-mode request's worst case (tokens, µ$) as the refusals of two
/// probe keys state it: one whose token limit, one whose dollar limit,
/// holds nothing.
async fn hard_worst_case(app: &TestApp) -> (u64, u64) {
    let first_number = |message: &str, prefix: &str| -> String {
        let rest = message
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{message}"));
        rest.split_whitespace().next().unwrap().to_owned()
    };
    let (_, probe) = app
        .new_key_with(json!({"name": "probe", "limit_mode": "hard", "token_limit": 1}))
        .await
        .unwrap();
    let message = refusal(send(app, &probe, "claude-sonnet-4-5").await).await;
    let tokens: u64 = first_number(&message, "worst case of ").parse().unwrap();
    let (_, probe) = app
        .new_key_with(json!({"name": "probe", "limit_mode": "hard",
            "dollar_limits": [{"window": "lifetime", "limit_usd": 0.000001}]}))
        .await
        .unwrap();
    let message = refusal(send(app, &probe, "claude-sonnet-4-5").await).await;
    let dollars = first_number(&message, "worst case $");
    let cost = relay_shared::domain::price::exact_micro_usd(dollars.parse().unwrap(), 1e9).unwrap();
    (tokens, cost)
}

#[tokio::test]
async fn a_sequential_client_of_a_hard_key_is_refused_right_after_the_answer_that_spent_its_tokens()
{
    let (app, _slow) = sequential_app().await;
    let (tokens, _) = one_request(&app).await;
    let (worst, _) = hard_worst_case(&app).await;
    assert!(worst > tokens, "{worst} > {tokens}");
    // Two answers and one worst case less a token: the third cannot fit.
    let (id, key) = app
        .new_key_with(json!({"name": "seq", "limit_mode": "hard",
            "token_limit": 2 * tokens + worst - 1}))
        .await
        .unwrap();
    for _ in 0..2 {
        let response = send(&app, &key, "claude-sonnet-4-5").await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    // The second answer's reservation was replaced before it ended: the
    // third is told plainly it cannot fit, not to retry.
    let message = refusal(send(&app, &key, "claude-sonnet-4-5").await).await;
    assert_eq!(
        message,
        format!(
            "worst case of {worst} tokens (input estimate plus max_tokens, of every request for a batch) \
             exceeds the {} left of this API key's token_limit; lower max_tokens, shorten the prompt \
             or split the batch, or ask your relay admin to raise the token_limit",
            worst - 1
        )
    );
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(
        (record.tokens_used, record.tokens_reserved),
        (2 * tokens, 0)
    );
}

#[tokio::test]
async fn a_sequential_client_of_a_hard_key_is_refused_right_after_the_answer_that_spent_its_dollars()
 {
    let (app, _slow) = sequential_app().await;
    let (_, cost) = one_request(&app).await;
    let (_, worst) = hard_worst_case(&app).await;
    assert!(worst > cost, "{worst} > {cost}");
    let limit = 2 * cost + worst - 1;
    let (id, key) = app
        .new_key_with(json!({"name": "seq", "limit_mode": "hard",
            "dollar_limits": [{"window": "day", "limit_usd": limit as f64 / 1e6}]}))
        .await
        .unwrap();
    for _ in 0..2 {
        let response = send(&app, &key, "claude-sonnet-4-5").await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let message = refusal(send(&app, &key, "claude-sonnet-4-5").await).await;
    let usd = relay_shared::domain::budget::usd;
    assert_eq!(
        message,
        format!(
            "worst case ${} exceeds the ${} left of the ${} limit per day; lower max_tokens or \
             shorten the prompt, or wait until {} (day calendar, UTC)",
            usd(worst),
            usd(worst - 1),
            usd(limit),
            midnight_after(OffsetDateTime::now_utc())
        )
    );
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(record.spend.values().sum::<u64>(), 2 * cost);
}
