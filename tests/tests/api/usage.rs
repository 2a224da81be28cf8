//! Usage reporting: the key holder's `/api/usage` routes (totals, daily, logs,
//! quota), the admin's per-key and all-keys views, `/admin/metrics` and
//! `/health`, each checked against the traffic the fake upstream was told to
//! bill.

use std::collections::HashSet;
use std::time::Duration;

use relay_shared::domain::format_timestamp;
use relay_shared::domain::key::{KeyId, PresentedKey};
use relay_shared::domain::usage::TokenUsage;
use relay_shared::domain::usage::UsageRecord;
use relay_shared::store::settlement::SettleOutcome;
use relay_tests::app::{TestApp, spawn_app};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use reqwest::Method;
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime};

const SONNET: &str = "claude-sonnet-4-5-20250929";
const HAIKU: &str = "claude-haiku-4-5-20251001";
const USER_AGENT: &str = "relay-usage-tests/1.0";
const LOG_RETENTION: Duration = Duration::from_secs(30 * 86_400);

/// One proxied message: its model, whether streamed, what upstream bills.
#[derive(Debug, Clone, Copy)]
struct Call {
    model: &'static str,
    stream: bool,
    usage: Usage,
}

fn call(model: &'static str, stream: bool, usage: Usage) -> Call {
    Call {
        model,
        stream,
        usage,
    }
}

/// The counters every usage view shows, as the test expects them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    requests: u64,
    input: u64,
    output: u64,
    cache_creation: u64,
    cache_read: u64,
}

impl Totals {
    fn of<'a>(calls: impl IntoIterator<Item = &'a Call>) -> Totals {
        let mut totals = Totals::default();
        for call in calls {
            totals.add(&Totals {
                requests: 1,
                input: call.usage.input_tokens,
                output: call.usage.output_tokens,
                cache_creation: call.usage.cache_creation_input_tokens,
                cache_read: call.usage.cache_read_input_tokens,
            });
        }
        totals
    }

    fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.input += other.input;
        self.output += other.output;
        self.cache_creation += other.cache_creation;
        self.cache_read += other.cache_read;
    }

    fn plus(mut self, other: &Totals) -> Totals {
        self.add(other);
        self
    }

    fn tokens(&self) -> u64 {
        self.input + self.output + self.cache_creation + self.cache_read
    }

    /// What a JSON row of any usage view says, checking its derived fields.
    fn in_row(row: &Value) -> Totals {
        let totals = Totals {
            requests: count(row, "requests"),
            input: count(row, "input_tokens"),
            output: count(row, "output_tokens"),
            cache_creation: count(row, "cache_creation_input_tokens"),
            cache_read: count(row, "cache_read_input_tokens"),
        };
        assert_eq!(
            count(row, "tokens"),
            totals.tokens(),
            "tokens is the sum: {row}"
        );
        assert_eq!(count(row, "estimated_requests"), 0, "{row}");
        assert_eq!(count(row, "error_requests"), 0, "{row}");
        totals
    }
}

fn count(value: &Value, field: &str) -> u64 {
    value[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` is not a count in {value}"))
}

/// Sends one message through the relay as `key`, reads the answer to its
/// end, and returns the relay's request id.
async fn send(app: &TestApp, key: &str, call: &Call) -> String {
    send_in_session(app, key, call, None).await
}

/// [`send`], naming a Claude Code session (`x-claude-code-session-id`).
async fn send_in_session(app: &TestApp, key: &str, call: &Call, session: Option<&str>) -> String {
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: call.usage,
        ..MessageSpec::default()
    }));
    let mut request = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .header("user-agent", USER_AGENT);
    if let Some(session) = session {
        request = request.header("x-claude-code-session-id", session);
    }
    let response = request
        .json(&json!({
            "model": call.model,
            "max_tokens": 64,
            "stream": call.stream,
            "messages": [{"role": "user", "content": "say hello"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{call:?}");
    let request_id = response.headers()["x-relay-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    response.bytes().await.unwrap();
    request_id
}

/// Sends the calls one after another and waits until the key has `logs`
/// usage logs in all; returns the request ids, oldest first.
async fn traffic(app: &TestApp, id: &str, key: &str, calls: &[Call], logs: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(calls.len());
    for call in calls {
        ids.push(send(app, key, call).await);
    }
    let stored = app.wait_for_logs(id, logs).await.unwrap();
    assert_eq!(stored.len(), logs, "every message settled once");
    ids
}

/// A response reduced to what the assertions look at.
struct Reply {
    what: String,
    status: u16,
    content_type: String,
    text: String,
    json: Value,
}

impl Reply {
    async fn of(what: String, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            what,
            status,
            content_type,
            text,
            json,
        }
    }

    /// The body of a 200.
    fn ok(self) -> Value {
        assert_eq!(self.status, 200, "{}: {}", self.what, self.text);
        self.json
    }

    /// Asserts an error envelope of this status and type whose message
    /// contains `naming`.
    fn error(&self, status: u16, kind: &str, naming: &str) {
        assert_eq!(self.status, status, "{}: {}", self.what, self.text);
        assert_eq!(self.json["type"], "error", "{}: {}", self.what, self.text);
        assert_eq!(
            self.json["error"]["type"], kind,
            "{}: {}",
            self.what, self.text
        );
        let message = self.json["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains(naming),
            "{}: message `{message}` should name {naming}",
            self.what
        );
    }
}

/// `GET path` with the key as `x-api-key`.
async fn key_get(app: &TestApp, key: &str, path: &str) -> Reply {
    let request = app.http.get(app.url(path)).header("x-api-key", key);
    Reply::of(format!("GET {path} (x-api-key)"), request).await
}

/// `GET path` with the key as `Authorization: Bearer`.
async fn bearer_get(app: &TestApp, key: &str, path: &str) -> Reply {
    let request = app.http.get(app.url(path)).bearer_auth(key);
    Reply::of(format!("GET {path} (bearer)"), request).await
}

/// `GET path` with the admin's token.
async fn admin_get(app: &TestApp, token: &str, path: &str) -> Reply {
    let request = app.http.get(app.url(path)).bearer_auth(token);
    Reply::of(format!("GET {path} (admin)"), request).await
}

async fn admin_post(app: &TestApp, path: &str, body: Option<Value>) -> Value {
    let token = app.admin_token().await.unwrap();
    let mut request = app.http.post(app.url(path)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    Reply::of(format!("POST {path}"), request).await.ok()
}

/// Every page of a log listing, following `next_cursor` from `first`.
async fn log_pages(first: &str, get: &impl AsyncFn(String) -> Reply) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut path = first.to_owned();
    loop {
        let page = get(path.clone()).await.ok();
        let next = page["next_cursor"].as_str().map(str::to_owned);
        assert_eq!(page["has_more"], next.is_some(), "{page}");
        pages.push(page);
        let Some(cursor) = next else {
            return pages;
        };
        assert!(pages.len() < 20, "pagination never ends");
        let separator = if first.contains('?') { '&' } else { '?' };
        path = format!("{first}{separator}cursor={cursor}");
    }
}

fn rows_of(pages: &[Value]) -> Vec<Value> {
    pages
        .iter()
        .flat_map(|page| page["data"].as_array().unwrap().clone())
        .collect()
}

fn request_ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|row| row["request_id"].as_str().unwrap().to_owned())
        .collect()
}

fn data(body: &Value) -> &Vec<Value> {
    body["data"].as_array().unwrap()
}

fn ymd(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

fn today() -> Date {
    OffsetDateTime::now_utc().date()
}

fn days_before(date: Date, days: i64) -> Date {
    date - time::Duration::days(days)
}

fn timestamp(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("`{text}`: {e}"))
}

/// Checks that the rows are one per day, consecutive, oldest first, ending
/// `last`.
fn assert_consecutive_days(rows: &[Value], last: Date) {
    let count = i64::try_from(rows.len()).unwrap();
    for (i, row) in rows.iter().enumerate() {
        let expected = days_before(last, count - 1 - i64::try_from(i).unwrap());
        assert_eq!(row["date"], ymd(expected), "row {i} of {count}");
    }
}

fn sum_rows(rows: &[Value]) -> Totals {
    let mut totals = Totals::default();
    for row in rows {
        totals.add(&Totals::in_row(row));
    }
    totals
}

#[tokio::test]
async fn usage_totals_equal_what_upstream_billed_split_by_model() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let calls = [
        call(SONNET, false, Usage::new(100, 20, 0, 0)),
        call(SONNET, true, Usage::new(50, 30, 400, 0)),
        call(HAIKU, false, Usage::new(7, 3, 0, 900)),
        call(SONNET, true, Usage::new(11, 13, 17, 19)),
        call(HAIKU, true, Usage::new(1000, 1, 2, 3)),
    ];
    let before = OffsetDateTime::now_utc();
    traffic(&app, &id, &key, &calls, calls.len()).await;
    let after = OffsetDateTime::now_utc();

    let summary = key_get(&app, &key, "/api/usage").await.ok();

    let expected = Totals::of(&calls);
    assert_eq!(
        expected,
        Totals {
            requests: 5,
            input: 1168,
            output: 67,
            cache_creation: 419,
            cache_read: 922
        }
    );
    assert_eq!(Totals::in_row(&summary), expected, "{summary}");
    assert_eq!(summary["key_id"], id.as_str());
    assert_eq!(summary["name"], "test");
    assert_eq!(count(&summary, "tokens"), 2576);
    assert_eq!(count(&summary, "tokens_used"), 2576);
    assert_eq!(summary["estimated_share"].as_f64(), Some(0.0), "{summary}");
    let first = timestamp(summary["first_used_at"].as_str().unwrap());
    let last = timestamp(summary["last_used_at"].as_str().unwrap());
    let millisecond = time::Duration::milliseconds(1);
    assert!(before - millisecond <= first, "{first} before the traffic");
    assert!(first < last, "{first} then {last}");
    assert!(last <= after, "{last} after the traffic");

    let by_model = summary["by_model"].as_array().unwrap();
    assert_eq!(by_model.len(), 2, "{summary}");
    // Most tokens first: haiku 1916, sonnet 660.
    assert_eq!(by_model[0]["model"], HAIKU);
    assert_eq!(by_model[1]["model"], SONNET);
    let haiku = Totals::of(calls.iter().filter(|c| c.model == HAIKU));
    let sonnet = Totals::of(calls.iter().filter(|c| c.model == SONNET));
    assert_eq!((haiku.tokens(), sonnet.tokens()), (1916, 660));
    assert_eq!(Totals::in_row(&by_model[0]), haiku);
    assert_eq!(Totals::in_row(&by_model[1]), sonnet);

    let with_bearer = bearer_get(&app, &key, "/api/usage").await.ok();
    assert_eq!(with_bearer, summary, "either header shows the same usage");
}

#[tokio::test]
async fn daily_rows_are_zero_filled_oldest_first_and_end_today() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let calls = [
        call(SONNET, false, Usage::new(10, 20, 30, 40)),
        call(HAIKU, true, Usage::new(1, 2, 3, 4)),
    ];
    traffic(&app, &id, &key, &calls, calls.len()).await;
    let recent = Totals::of(&calls);
    // A request settled three days ago, written straight to the store.
    let planted = UsageRecord {
        request_id: format!("relay_{}", uuid::Uuid::new_v4().simple()),
        key_id: KeyId::parse(&id).unwrap(),
        at: OffsetDateTime::now_utc() - time::Duration::days(3),
        model: Some(SONNET.into()),
        requested_model: None,
        method: "POST".into(),
        path: "/v1/messages".into(),
        status: 200,
        stream: false,
        usage: TokenUsage {
            input_tokens: 500,
            output_tokens: 60,
            cache_creation_input_tokens: 7,
            cache_read_input_tokens: 8,
            cache_creation_5m: 7,
            cache_creation_1h: 0,
        },
        estimated: false,
        latency_ms: 42,
        ttfb_ms: Some(10),
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
    let outcome = app.store.settle(&planted, LOG_RETENTION).await.unwrap();
    assert_eq!(outcome, SettleOutcome::Recorded);
    let old = Totals {
        requests: 1,
        input: 500,
        output: 60,
        cache_creation: 7,
        cache_read: 8,
    };

    let week = key_get(&app, &key, "/api/usage/daily?days=7").await.ok();
    let today = today();

    assert_eq!(week["key_id"], id.as_str());
    assert_eq!(week["days"], 7);
    let rows = data(&week);
    assert_eq!(rows.len(), 7, "{week}");
    assert_consecutive_days(rows, today);
    for (i, row) in rows.iter().enumerate() {
        let expected = match i {
            6 => recent,
            3 => old,
            _ => Totals::default(),
        };
        assert_eq!(Totals::in_row(row), expected, "row {i}: {row}");
    }

    let two = key_get(&app, &key, "/api/usage/daily?days=2").await.ok();
    let rows = data(&two);
    assert_eq!(rows.len(), 2, "{two}");
    assert_consecutive_days(rows, today);
    assert_eq!(sum_rows(rows), recent, "the planted day is outside");

    let default = key_get(&app, &key, "/api/usage/daily").await.ok();
    assert_eq!(default["days"], 30);
    let rows = data(&default);
    assert_eq!(rows.len(), 30);
    assert_consecutive_days(rows, today);
    assert_eq!(Totals::in_row(&rows[26]), old);
    assert_eq!(Totals::in_row(&rows[29]), recent);
    assert_eq!(sum_rows(rows), recent.plus(&old));

    let year = key_get(&app, &key, "/api/usage/daily?days=366").await.ok();
    let rows = data(&year);
    assert_eq!(rows.len(), 366);
    assert_consecutive_days(rows, today);
    assert_eq!(rows[0]["date"], ymd(days_before(today, 365)));
    assert_eq!(sum_rows(rows), recent.plus(&old));

    let one = key_get(&app, &key, "/api/usage/daily?days=1").await.ok();
    let rows = data(&one);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["date"], ymd(today));
    assert_eq!(Totals::in_row(&rows[0]), recent);

    // The key's totals include the planted request too.
    let summary = key_get(&app, &key, "/api/usage").await.ok();
    assert_eq!(Totals::in_row(&summary), recent.plus(&old));
}

#[tokio::test]
async fn logs_page_newest_first_by_cursor_and_filter_by_model_and_time() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let calls: Vec<Call> = (0..7u64)
        .map(|i| {
            let model = if i % 2 == 0 { SONNET } else { HAIKU };
            call(model, i % 3 == 0, Usage::new(100 + i, 10 + i, 5 * i, 7 * i))
        })
        .collect();
    let sent = traffic(&app, &id, &key, &calls, calls.len()).await;
    // Newest first, as the listing should be.
    let expected: Vec<(String, Call)> = sent.into_iter().zip(calls).rev().collect();
    let expected_ids = |model: Option<&str>| -> Vec<String> {
        expected
            .iter()
            .filter(|(_, c)| model.is_none_or(|m| c.model == m))
            .map(|(id, _)| id.clone())
            .collect()
    };
    let get = async |path: String| key_get(&app, &key, &path).await;

    let pages = log_pages("/api/usage/logs?limit=3", &get).await;

    let sizes: Vec<usize> = pages.iter().map(|p| data(p).len()).collect();
    assert_eq!(sizes, [3, 3, 1]);
    let more: Vec<&Value> = pages.iter().map(|p| &p["has_more"]).collect();
    assert_eq!(more, [&json!(true), &json!(true), &json!(false)]);
    assert!(pages[2]["next_cursor"].is_null());
    let rows = rows_of(&pages);
    let ids = request_ids(&rows);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 7, "{ids:?}");
    assert_eq!(
        ids,
        expected_ids(None),
        "the logged ids are the relay's, newest first"
    );
    let times: Vec<OffsetDateTime> = rows
        .iter()
        .map(|r| timestamp(r["at"].as_str().unwrap()))
        .collect();
    assert!(times.windows(2).all(|w| w[0] > w[1]), "{times:?}");
    for (row, (_, call)) in rows.iter().zip(&expected) {
        assert_eq!(row["model"], call.model, "{row}");
        assert_eq!(row["method"], "POST");
        assert_eq!(row["path"], "/v1/messages");
        assert_eq!(row["status"], 200);
        assert_eq!(row["stream"], call.stream, "{row}");
        assert_eq!(count(row, "input_tokens"), call.usage.input_tokens);
        assert_eq!(count(row, "output_tokens"), call.usage.output_tokens);
        assert_eq!(
            count(row, "cache_creation_input_tokens"),
            call.usage.cache_creation_input_tokens
        );
        assert_eq!(
            count(row, "cache_read_input_tokens"),
            call.usage.cache_read_input_tokens
        );
        assert_eq!(row["estimated"], false);
        assert!(row["latency_ms"].is_u64(), "{row}");
        assert_eq!(row["retries"], 0);
        assert_eq!(row["client_ip"], "127.0.0.1");
        assert_eq!(row["user_agent"], USER_AGENT);
        assert!(row["error_type"].is_null(), "{row}");
    }

    // One page holding everything is the same rows.
    let all = key_get(&app, &key, "/api/usage/logs").await.ok();
    assert_eq!(data(&all), &rows);
    assert_eq!(all["has_more"], false);
    assert!(all["next_cursor"].is_null());
    let exact = key_get(&app, &key, "/api/usage/logs?limit=7").await.ok();
    assert_eq!((data(&exact).len(), &exact["has_more"]), (7, &json!(false)));
    let short = key_get(&app, &key, "/api/usage/logs?limit=6").await.ok();
    assert_eq!((data(&short).len(), &short["has_more"]), (6, &json!(true)));

    // One model, paginated on its own.
    let sonnet = log_pages(&format!("/api/usage/logs?model={SONNET}&limit=2"), &get).await;
    let sizes: Vec<usize> = sonnet.iter().map(|p| data(p).len()).collect();
    assert_eq!(sizes, [2, 2]);
    assert_eq!(request_ids(&rows_of(&sonnet)), expected_ids(Some(SONNET)));
    let haiku = log_pages(&format!("/api/usage/logs?model={HAIKU}&limit=2"), &get).await;
    let sizes: Vec<usize> = haiku.iter().map(|p| data(p).len()).collect();
    assert_eq!(sizes, [2, 1]);
    assert_eq!(request_ids(&rows_of(&haiku)), expected_ids(Some(HAIKU)));
    let none = key_get(&app, &key, "/api/usage/logs?model=claude-unused-1")
        .await
        .ok();
    assert!(data(&none).is_empty());

    // Time bounds.
    let future = format_timestamp(OffsetDateTime::now_utc() + time::Duration::hours(1));
    let later = key_get(&app, &key, &format!("/api/usage/logs?from={future}"))
        .await
        .ok();
    assert!(data(&later).is_empty(), "{later}");
    assert_eq!(later["has_more"], false);
    let yesterday = ymd(days_before(today(), 1));
    let earlier = key_get(&app, &key, &format!("/api/usage/logs?to={yesterday}"))
        .await
        .ok();
    assert!(data(&earlier).is_empty(), "{earlier}");
    let day = ymd(today());
    let today_rows = key_get(&app, &key, &format!("/api/usage/logs?from={day}"))
        .await
        .ok();
    assert_eq!(data(&today_rows), &rows);
    let whole_day = key_get(&app, &key, &format!("/api/usage/logs?from={day}&to={day}"))
        .await
        .ok();
    assert_eq!(data(&whole_day), &rows);

    // Exact timestamps are inclusive bounds.
    let pivot = rows[3]["at"].as_str().unwrap();
    let since = key_get(&app, &key, &format!("/api/usage/logs?from={pivot}"))
        .await
        .ok();
    assert_eq!(request_ids(data(&since)), ids[..4]);
    let until = key_get(&app, &key, &format!("/api/usage/logs?to={pivot}"))
        .await
        .ok();
    assert_eq!(request_ids(data(&until)), ids[3..]);
    let at = key_get(
        &app,
        &key,
        &format!("/api/usage/logs?from={pivot}&to={pivot}"),
    )
    .await
    .ok();
    assert_eq!(request_ids(data(&at)), ids[3..4]);
    let since_paged = log_pages(&format!("/api/usage/logs?from={pivot}&limit=3"), &get).await;
    let sizes: Vec<usize> = since_paged.iter().map(|p| data(p).len()).collect();
    assert_eq!(sizes, [3, 1]);
    assert_eq!(request_ids(&rows_of(&since_paged)), ids[..4]);
    let sonnet_since = key_get(
        &app,
        &key,
        &format!("/api/usage/logs?model={SONNET}&from={pivot}"),
    )
    .await
    .ok();
    // The pivot (sent fourth) is haiku; sonnet was sent fifth and seventh after it.
    assert_eq!(
        request_ids(data(&sonnet_since)),
        [ids[0].clone(), ids[2].clone()]
    );
}

#[tokio::test]
async fn another_key_sees_none_of_the_first_keys_usage_nor_can_use_its_cursors() {
    let app = spawn_app().await.unwrap();
    let (id_a, key_a) = app.new_key().await.unwrap();
    let (id_b, key_b) = app.new_key().await.unwrap();
    let calls = [
        call(SONNET, false, Usage::new(10, 10, 0, 0)),
        call(HAIKU, false, Usage::new(20, 20, 0, 0)),
        call(SONNET, true, Usage::new(30, 30, 0, 0)),
    ];
    traffic(&app, &id_a, &key_a, &calls, 3).await;

    let logs_b = key_get(&app, &key_b, "/api/usage/logs").await.ok();
    assert_eq!(logs_b["key_id"], id_b.as_str());
    assert!(data(&logs_b).is_empty(), "{logs_b}");
    assert_eq!(logs_b["has_more"], false);
    let summary_b = key_get(&app, &key_b, "/api/usage").await.ok();
    assert_eq!(Totals::in_row(&summary_b), Totals::default());
    assert_eq!(summary_b["tokens_used"], 0);
    assert_eq!(summary_b["by_model"], json!([]));
    assert!(summary_b["first_used_at"].is_null() && summary_b["last_used_at"].is_null());
    assert_eq!(summary_b["estimated_share"].as_f64(), Some(0.0));
    let daily_b = key_get(&app, &key_b, "/api/usage/daily?days=7").await.ok();
    assert_eq!(sum_rows(data(&daily_b)), Totals::default());
    let quota_b = key_get(&app, &key_b, "/api/usage/quota").await.ok();
    assert_eq!(quota_b["tokens_used"], 0);
    assert_eq!(quota_b["rate_window"]["requests_used"], 0);

    // Cursors are bound to their key and to the model filter.
    let page_a = key_get(&app, &key_a, "/api/usage/logs?limit=1").await.ok();
    let cursor = page_a["next_cursor"].as_str().unwrap();
    let stolen = key_get(
        &app,
        &key_b,
        &format!("/api/usage/logs?limit=1&cursor={cursor}"),
    )
    .await;
    stolen.error(400, "invalid_request_error", "`cursor`");
    let refiltered = key_get(
        &app,
        &key_a,
        &format!("/api/usage/logs?limit=1&cursor={cursor}&model={SONNET}"),
    )
    .await;
    refiltered.error(400, "invalid_request_error", "`cursor`");
    let model_page = key_get(
        &app,
        &key_a,
        &format!("/api/usage/logs?limit=1&model={SONNET}"),
    )
    .await
    .ok();
    let model_cursor = model_page["next_cursor"].as_str().unwrap();
    let unfiltered = key_get(
        &app,
        &key_a,
        &format!("/api/usage/logs?limit=1&cursor={model_cursor}"),
    )
    .await;
    unfiltered.error(400, "invalid_request_error", "`cursor`");
    let other_model = key_get(
        &app,
        &key_a,
        &format!("/api/usage/logs?limit=1&cursor={model_cursor}&model={HAIKU}"),
    )
    .await;
    other_model.error(400, "invalid_request_error", "`cursor`");
    let stolen_model = key_get(
        &app,
        &key_b,
        &format!("/api/usage/logs?limit=1&cursor={model_cursor}&model={SONNET}"),
    )
    .await;
    stolen_model.error(400, "invalid_request_error", "`cursor`");
    // The rightful owner may follow it.
    let next_a = key_get(
        &app,
        &key_a,
        &format!("/api/usage/logs?limit=1&cursor={cursor}"),
    )
    .await
    .ok();
    assert_eq!(data(&next_a).len(), 1);
    assert_ne!(
        data(&next_a)[0]["request_id"],
        data(&page_a)[0]["request_id"]
    );

    // Once B has traffic of its own it sees exactly that.
    let b_ids = traffic(
        &app,
        &id_b,
        &key_b,
        &[call(HAIKU, false, Usage::new(1, 1, 1, 1))],
        1,
    )
    .await;
    let logs_b = key_get(&app, &key_b, "/api/usage/logs").await.ok();
    assert_eq!(request_ids(data(&logs_b)), b_ids);
    let summary_b = key_get(&app, &key_b, "/api/usage").await.ok();
    assert_eq!(Totals::in_row(&summary_b).requests, 1);
    let summary_a = key_get(&app, &key_a, "/api/usage").await.ok();
    assert_eq!(Totals::in_row(&summary_a), Totals::of(&calls));
}

/// Waits, if need be, until the current fixed rate window (of `period`
/// seconds) has at least `headroom` seconds left.
async fn with_window_headroom(period: u64, headroom: u64) {
    let now = OffsetDateTime::now_utc().unix_timestamp().unsigned_abs();
    let left = period - now % period;
    if left < headroom {
        tokio::time::sleep(Duration::from_secs(left) + Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn quota_shows_budget_tier_and_the_current_rate_window() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app
        .new_key_with(
            json!({"name": "budget", "token_limit": 1000, "expires_at": "2099-01-01T00:00:00Z"}),
        )
        .await
        .unwrap();
    let (id, key) = (id.as_str(), key.as_str());
    let calls = [
        call(SONNET, false, Usage::new(100, 23, 0, 0)),
        call(HAIKU, true, Usage::new(50, 10, 5, 5)),
        call(SONNET, false, Usage::new(20, 20, 2, 2)),
    ];
    with_window_headroom(60, 20).await;
    traffic(&app, id, key, &calls, 3).await;
    // count_tokens is answered but counts against neither quota nor window.
    for _ in 0..2 {
        let counted = app
            .http
            .post(app.url("/v1/messages/count_tokens"))
            .header("x-api-key", key)
            .json(&json!({"model": SONNET, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(counted.status(), 200);
    }

    let quota = key_get(&app, key, "/api/usage/quota").await.ok();
    let asked = OffsetDateTime::now_utc();

    assert_eq!(Totals::of(&calls).tokens(), 237);
    assert_eq!(quota["key_id"], id);
    assert_eq!(quota["token_limit"], 1000);
    assert_eq!(quota["tokens_used"], 237);
    assert_eq!(quota["remaining"], 763);
    assert_eq!(quota["percent_used"].as_f64(), Some(23.7), "{quota}");
    assert_eq!(quota["is_active"], true);
    assert_eq!(quota["expires_at"], "2099-01-01T00:00:00.000Z");
    let tier = &quota["rate_limit_tier"];
    assert_eq!(
        (&tier["name"], &tier["requests"], &tier["period"]),
        (&json!("basic"), &json!(100), &json!(60)),
        "{quota}"
    );
    let window = &quota["rate_window"];
    assert_eq!(window["requests_used"], 3, "{quota}");
    assert_eq!(window["requests_remaining"], 97);
    let resets_at = timestamp(window["resets_at"].as_str().unwrap());
    assert!(
        resets_at > asked - time::Duration::seconds(1),
        "{resets_at} is past"
    );
    assert!(
        resets_at <= asked + time::Duration::seconds(60),
        "{resets_at}"
    );
    assert_eq!(
        resets_at.unix_timestamp() % 60,
        0,
        "windows start on the minute"
    );
    let record = app.key_record(id).await.unwrap();
    let start = u64::try_from(resets_at.unix_timestamp()).unwrap() - 60;
    assert_eq!(record.rate_window, Some((start, 3)));
    assert_eq!(bearer_get(&app, key, "/api/usage/quota").await.ok(), quota);

    // No limit: nothing to show for it.
    let (_, unlimited) = app.new_key().await.unwrap();
    let quota = key_get(&app, &unlimited, "/api/usage/quota").await.ok();
    for field in ["token_limit", "remaining", "percent_used", "expires_at"] {
        assert!(quota[field].is_null(), "{field}: {quota}");
    }
    assert_eq!(quota["tokens_used"], 0);
    assert_eq!(quota["rate_window"]["requests_used"], 0);
    assert_eq!(quota["rate_window"]["requests_remaining"], 100);

    // percent_used keeps two decimals: 1000 of 3000.
    let (third_id, third_key) = app
        .new_key_with(json!({"name": "third", "token_limit": 3000}))
        .await
        .unwrap();
    let (third_id, third_key) = (third_id.as_str(), third_key.as_str());
    traffic(
        &app,
        third_id,
        third_key,
        &[call(SONNET, false, Usage::new(600, 400, 0, 0))],
        1,
    )
    .await;
    let quota = key_get(&app, third_key, "/api/usage/quota").await.ok();
    assert_eq!(quota["percent_used"].as_f64(), Some(33.33), "{quota}");
    assert_eq!(quota["remaining"], 2000);
}

const USAGE_PATHS: [&str; 4] = [
    "/api/usage",
    "/api/usage/daily",
    "/api/usage/logs",
    "/api/usage/quota",
];

#[tokio::test]
async fn usage_routes_need_a_valid_enabled_key_and_never_charge_it() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let (_, other_key) = app.new_key().await.unwrap();
    traffic(
        &app,
        &id,
        &key,
        &[call(SONNET, false, Usage::new(5, 5, 0, 0))],
        1,
    )
    .await;
    let unknown = PresentedKey::generate().expose();

    for path in USAGE_PATHS {
        let url = app.url(path);
        let anonymous = Reply::of(format!("{path} without key"), app.http.get(&url)).await;
        anonymous.error(401, "authentication_error", "missing API key");
        let cases = [
            (
                "malformed x-api-key",
                app.http.get(&url).header("x-api-key", "sk-proxy-short"),
            ),
            (
                "malformed bearer",
                app.http.get(&url).bearer_auth("not-a-relay-key"),
            ),
            (
                "basic auth",
                app.http
                    .get(&url)
                    .header("authorization", "Basic Zm9vOmJhcg=="),
            ),
            (
                "unknown key",
                app.http.get(&url).header("x-api-key", &unknown),
            ),
            (
                "two different keys",
                app.http
                    .get(&url)
                    .header("x-api-key", &key)
                    .bearer_auth(&other_key),
            ),
        ];
        for (what, request) in cases {
            let reply = Reply::of(format!("{path}: {what}"), request).await;
            reply.error(401, "authentication_error", "");
        }
    }

    // Reading usage charges nothing and counts against no window.
    let before = app.key_record(&id).await.unwrap();
    let upstream_before = app.upstream.requests().len();
    for _ in 0..5 {
        key_get(&app, &key, "/api/usage").await.ok();
    }
    for path in USAGE_PATHS {
        key_get(&app, &key, path).await.ok();
        bearer_get(&app, &key, path).await.ok();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = app.key_record(&id).await.unwrap();
    assert_eq!(after.tokens_used, before.tokens_used);
    assert_eq!(after.rate_window, before.rate_window);
    assert_eq!(app.items(&id, "LOG#").await.unwrap().len(), 1);
    assert_eq!(app.upstream.requests().len(), upstream_before);
    let summary = key_get(&app, &key, "/api/usage").await.ok();
    assert_eq!(Totals::in_row(&summary).requests, 1);

    // Disabled, then expired, then rotated.
    admin_post(&app, &format!("/admin/api-keys/{id}/disable"), None).await;
    for path in USAGE_PATHS {
        key_get(&app, &key, path)
            .await
            .error(403, "permission_error", "disabled");
    }
    admin_post(&app, &format!("/admin/api-keys/{id}/enable"), None).await;
    key_get(&app, &key, "/api/usage").await.ok();
    let token = app.admin_token().await.unwrap();
    let patched = app
        .http
        .patch(app.url(&format!("/admin/api-keys/{id}")))
        .bearer_auth(&token)
        .json(&json!({"expires_at": "2020-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    for path in USAGE_PATHS {
        key_get(&app, &key, path)
            .await
            .error(403, "permission_error", "expired");
    }
    let patched = app
        .http
        .patch(app.url(&format!("/admin/api-keys/{id}")))
        .bearer_auth(&token)
        .json(&json!({"expires_at": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let rotated = admin_post(&app, &format!("/admin/api-keys/{id}/rotate"), None).await;
    key_get(&app, &key, "/api/usage")
        .await
        .error(401, "authentication_error", "");
    let new_key = rotated["api_key"].as_str().unwrap();
    let summary = key_get(&app, new_key, "/api/usage").await.ok();
    assert_eq!(
        Totals::in_row(&summary).requests,
        1,
        "usage survives rotation"
    );
}

#[tokio::test]
async fn bad_usage_parameters_are_400_naming_the_parameter() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let cases = [
        ("/api/usage/daily?days=0", "`days`"),
        ("/api/usage/daily?days=-1", "`days`"),
        ("/api/usage/daily?days=367", "`days`"),
        ("/api/usage/daily?days=abc", "`days`"),
        ("/api/usage/daily?days=7&foo=1", "`foo`"),
        ("/api/usage/logs?limit=0", "`limit`"),
        ("/api/usage/logs?limit=501", "`limit`"),
        ("/api/usage/logs?limit=x", "`limit`"),
        ("/api/usage/logs?cursor=garbage", "`cursor`"),
        ("/api/usage/logs?from=yesterday-ish", "`from`"),
        ("/api/usage/logs?from=2026-02-30", "`from`"),
        ("/api/usage/logs?to=2026-13-45", "`to`"),
        ("/api/usage/logs?from=2026-02-02&to=2026-02-01", "`from`"),
        (
            "/api/usage/logs?from=2026-02-02T00:00:00Z&to=2026-02-01T23:59:59Z",
            "`from`",
        ),
        ("/api/usage/logs?model=claude%20opus", "`model`"),
        ("/api/usage/logs?model=", "`model`"),
        ("/api/usage/logs?foo=1", "`foo`"),
    ];
    for (path, naming) in cases {
        key_get(&app, &key, path)
            .await
            .error(400, "invalid_request_error", naming);
    }

    // The bounds themselves are fine.
    for path in [
        "/api/usage/daily?days=1",
        "/api/usage/daily?days=366",
        "/api/usage/logs?limit=1",
        "/api/usage/logs?limit=500",
        "/api/usage/logs?from=2026-01-01T00:00:00%2B02:00&to=2099-12-31",
        "/api/usage/logs?model=claude-3.5:latest@x/y_z",
    ] {
        key_get(&app, &key, path).await.ok();
    }

    for path in ["/api/usage/nope", "/api/usage/", "/api/usage/logs/extra"] {
        key_get(&app, &key, path)
            .await
            .error(404, "not_found_error", "");
    }
    let post = Reply::of(
        "POST /api/usage".into(),
        app.http
            .request(Method::POST, app.url("/api/usage"))
            .header("x-api-key", &key),
    )
    .await;
    post.error(405, "invalid_request_error", "");
}

#[tokio::test]
async fn admin_sees_each_keys_usage_as_its_holder_does_and_all_keys_together() {
    let app = spawn_app().await.unwrap();
    let mut keys = Vec::new();
    for (name, calls) in [
        (
            "alpha",
            vec![
                call(SONNET, false, Usage::new(10, 5, 0, 0)),
                call(HAIKU, true, Usage::new(20, 5, 1, 1)),
            ],
        ),
        (
            "beta",
            vec![
                call(SONNET, false, Usage::new(300, 50, 0, 100)),
                call(SONNET, true, Usage::new(200, 20, 10, 0)),
                call(HAIKU, false, Usage::new(5, 5, 5, 5)),
            ],
        ),
    ] {
        let (id, key) = app.new_key_with(json!({"name": name})).await.unwrap();
        traffic(&app, &id, &key, &calls, calls.len()).await;
        keys.push((name, id, key, Totals::of(&calls)));
    }
    let token = app.admin_token().await.unwrap();

    for (name, id, key, totals) in &keys {
        for (holder, admin) in [
            ("/api/usage", format!("/admin/api-keys/{id}/usage")),
            (
                "/api/usage/daily",
                format!("/admin/api-keys/{id}/usage/daily"),
            ),
            (
                "/api/usage/daily?days=7",
                format!("/admin/api-keys/{id}/usage/daily?days=7"),
            ),
            (
                "/api/usage/logs",
                format!("/admin/api-keys/{id}/usage/logs"),
            ),
            (
                "/api/usage/logs?limit=2",
                format!("/admin/api-keys/{id}/usage/logs?limit=2"),
            ),
            (
                "/api/usage/quota",
                format!("/admin/api-keys/{id}/usage/quota"),
            ),
        ] {
            let seen_by_holder = key_get(&app, key, holder).await.ok();
            let seen_by_admin = admin_get(&app, &token, &admin).await.ok();
            assert_eq!(seen_by_admin, seen_by_holder, "{name}: {admin}");
        }
        let summary = admin_get(&app, &token, &format!("/admin/api-keys/{id}/usage"))
            .await
            .ok();
        assert_eq!(Totals::in_row(&summary), *totals);
        assert_eq!(summary["name"], *name);
        let first = format!("/admin/api-keys/{id}/usage/logs?limit=2");
        let admin_pages = log_pages(&first, &async |p| admin_get(&app, &token, &p).await).await;
        let holder_pages = log_pages("/api/usage/logs?limit=2", &async |p| {
            key_get(&app, key, &p).await
        })
        .await;
        assert_eq!(
            request_ids(&rows_of(&admin_pages)),
            request_ids(&rows_of(&holder_pages))
        );
        assert_eq!(
            rows_of(&admin_pages).len(),
            usize::try_from(totals.requests).unwrap()
        );
    }

    let unknown = PresentedKey::generate();
    let unknown = unknown.id().as_str();
    for id in [unknown, "not-an-id"] {
        for suffix in ["usage", "usage/daily", "usage/logs", "usage/quota"] {
            admin_get(&app, &token, &format!("/admin/api-keys/{id}/{suffix}"))
                .await
                .error(404, "not_found_error", "");
        }
    }
    let (_, alpha_id, alpha_key, _) = &keys[0];
    for path in [
        format!("/admin/api-keys/{alpha_id}/usage"),
        format!("/admin/api-keys/{alpha_id}/usage/daily"),
        format!("/admin/api-keys/{alpha_id}/usage/logs"),
        format!("/admin/api-keys/{alpha_id}/usage/quota"),
        "/admin/usage".to_owned(),
        "/admin/metrics".to_owned(),
    ] {
        Reply::of(
            format!("{path} without token"),
            app.http.get(app.url(&path)),
        )
        .await
        .error(401, "authentication_error", "");
        admin_get(&app, "not-a-jwt", &path)
            .await
            .error(401, "authentication_error", "");
        // A relay key is no admin token.
        admin_get(&app, alpha_key, &path)
            .await
            .error(401, "authentication_error", "");
    }

    // All keys together.
    let (alpha, beta) = (keys[0].3, keys[1].3);
    assert!(beta.tokens() > alpha.tokens());
    let today = today();
    let all = admin_get(&app, &token, "/admin/usage").await.ok();
    assert_eq!(all["active_keys"], 2, "{all}");
    assert_eq!(all["from"], ymd(days_before(today, 29)));
    assert_eq!(all["to"], ymd(today));
    assert_eq!(Totals::in_row(&all["totals"]), alpha.plus(&beta));
    let top = all["top_keys"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    for (row, (name, id, _, totals)) in top.iter().zip([&keys[1], &keys[0]]) {
        assert_eq!(row["key_id"], id.as_str());
        assert_eq!(row["name"], *name);
        assert_eq!(Totals::in_row(row), *totals);
    }
    let daily = all["daily"].as_array().unwrap();
    assert_eq!(daily.len(), 30);
    assert_consecutive_days(daily, today);
    assert_eq!(Totals::in_row(&daily[29]), alpha.plus(&beta));
    assert_eq!(sum_rows(daily), alpha.plus(&beta));

    let one = admin_get(&app, &token, "/admin/usage?top=1").await.ok();
    let top = one["top_keys"].as_array().unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(top[0]["key_id"], keys[1].1.as_str());
    assert_eq!(one["active_keys"], 2);
    assert_eq!(Totals::in_row(&one["totals"]), alpha.plus(&beta));

    let day = ymd(today);
    let just_today = admin_get(&app, &token, &format!("/admin/usage?from={day}&to={day}"))
        .await
        .ok();
    assert_eq!(just_today["daily"].as_array().unwrap().len(), 1);
    assert_eq!(Totals::in_row(&just_today["totals"]), alpha.plus(&beta));
    let year_ago = ymd(days_before(today, 365));
    let longest = admin_get(
        &app,
        &token,
        &format!("/admin/usage?from={year_ago}&to={day}"),
    )
    .await
    .ok();
    assert_eq!(longest["daily"].as_array().unwrap().len(), 366);
    assert_eq!(Totals::in_row(&longest["totals"]), alpha.plus(&beta));

    for (path, naming) in [
        ("/admin/usage?from=garbage", "`from`"),
        ("/admin/usage?to=2026-13-45", "`to`"),
        ("/admin/usage?from=2026-02-02&to=2026-02-01", "`from`"),
        ("/admin/usage?from=2024-01-01&to=2025-01-01", "366"),
        ("/admin/usage?top=0", "`top`"),
        ("/admin/usage?top=101", "`top`"),
        ("/admin/usage?foo=1", "`foo`"),
    ] {
        admin_get(&app, &token, path)
            .await
            .error(400, "invalid_request_error", naming);
    }
}

/// A label value with the exposition format's escapes undone.
fn unescape(label: &str) -> String {
    let mut out = String::new();
    let mut chars = label.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(escaped) => out.push(escaped),
            None => out.push('\\'),
        }
    }
    out
}

#[tokio::test]
async fn metrics_expose_each_keys_counters_in_prometheus_text() {
    let app = spawn_app().await.unwrap();
    let odd_name = r#"say "hi" \ bye"#;
    let mut keys = Vec::new();
    for (fields, calls) in [
        (
            json!({"name": "limited", "token_limit": 5000}),
            vec![
                call(SONNET, false, Usage::new(100, 50, 25, 10)),
                call(HAIKU, true, Usage::new(1, 2, 3, 4)),
            ],
        ),
        (
            json!({"name": odd_name}),
            vec![call(HAIKU, false, Usage::new(7, 7, 7, 7))],
        ),
        (json!({"name": "idle"}), vec![]),
    ] {
        let created = app.create_key(fields).await.unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        let key = created["api_key"].as_str().unwrap().to_owned();
        traffic(&app, &id, &key, &calls, calls.len()).await;
        keys.push((
            id,
            created["name"].as_str().unwrap().to_owned(),
            Totals::of(&calls),
        ));
    }
    let token = app.admin_token().await.unwrap();

    let reply = admin_get(&app, &token, "/admin/metrics").await;

    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(
        reply.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        reply.content_type
    );
    let scrape =
        prometheus_parse::Scrape::parse(reply.text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    for metric in [
        "relay_requests_total",
        "relay_tokens_used_total",
        "relay_token_quota_usage_ratio",
    ] {
        assert!(scrape.docs.contains_key(metric), "no HELP for {metric}");
    }
    let sample = |metric: &str, id: &str, kind: Option<&str>| {
        let found: Vec<&prometheus_parse::Sample> = scrape
            .samples
            .iter()
            .filter(|s| {
                s.metric == metric
                    && s.labels.get("key_id") == Some(id)
                    && s.labels.get("type") == kind
            })
            .collect();
        assert!(found.len() <= 1, "{metric} for {id} {kind:?} twice");
        found.first().map(|s| (*s).clone())
    };
    let counter = |metric: &str, id: &str, kind: Option<&str>| match sample(metric, id, kind) {
        Some(prometheus_parse::Sample {
            value: prometheus_parse::Value::Counter(v),
            ..
        }) => v,
        other => panic!("{metric} for {id} {kind:?}: {other:?}"),
    };
    for (id, name, totals) in &keys {
        let as_f64 = |n: u64| n as f64;
        assert_eq!(
            counter("relay_requests_total", id, None),
            as_f64(totals.requests),
            "{name}"
        );
        for (kind, value) in [
            ("input", totals.input),
            ("output", totals.output),
            ("cache_creation", totals.cache_creation),
            ("cache_read", totals.cache_read),
        ] {
            assert_eq!(
                counter("relay_tokens_used_total", id, Some(kind)),
                as_f64(value),
                "{name} {kind}"
            );
        }
    }
    let (limited_id, _, limited) = &keys[0];
    assert_eq!(limited.tokens(), 195);
    match sample("relay_token_quota_usage_ratio", limited_id, None) {
        Some(prometheus_parse::Sample {
            value: prometheus_parse::Value::Gauge(ratio),
            ..
        }) => assert_eq!(ratio, 195.0 / 5000.0),
        other => panic!("no ratio for the limited key: {other:?}"),
    }
    for (id, name, _) in &keys[1..] {
        assert!(
            sample("relay_token_quota_usage_ratio", id, None).is_none(),
            "{name} has no limit"
        );
    }
    assert_eq!(
        scrape.samples.len(),
        3 + 3 * 4 + 1,
        "one sample per key and metric (and type)"
    );

    // The odd name is escaped in the text and round-trips.
    let (odd_id, stored_name, _) = &keys[1];
    assert_eq!(stored_name, odd_name);
    let escaped = r#"say \"hi\" \\ bye"#;
    assert!(
        reply.text.contains(&format!(r#"key_name="{escaped}""#)),
        "{}",
        reply.text
    );
    let labels = &sample("relay_requests_total", odd_id, None).unwrap().labels;
    let label = labels.get("key_name").unwrap();
    assert_eq!(label, escaped, "the parser leaves escapes as they are");
    assert_eq!(unescape(label), odd_name);
}

#[tokio::test]
async fn health_reports_dynamodb_reachable() {
    let app = spawn_app().await.unwrap();

    let health = Reply::of("GET /health".into(), app.http.get(app.url("/health"))).await;

    let body = health.ok();
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["dynamodb"], "ok", "{body}");
    assert_eq!(body["secrets"], "ok", "{body}");
}

/// A cursor naming this key, this model filter and a log position: what the
/// API hands out, and what a key holder can write by hand.
fn cursor_at(id: &str, model: Option<&str>, sort_key: &str) -> String {
    use base64::Engine;
    let text = json!({"k": id, "m": model, "s": sort_key}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn log_cursor_outside_the_requested_time_range_is_400_not_500() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let calls = [
        call(SONNET, false, Usage::new(1, 1, 0, 0)),
        call(SONNET, false, Usage::new(2, 2, 0, 0)),
        call(HAIKU, false, Usage::new(3, 3, 0, 0)),
    ];
    traffic(&app, &id, &key, &calls, 3).await;
    let page = key_get(&app, &key, "/api/usage/logs?limit=1").await.ok();
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let model_page = key_get(
        &app,
        &key,
        &format!("/api/usage/logs?limit=1&model={SONNET}"),
    )
    .await
    .ok();
    let model_cursor = model_page["next_cursor"].as_str().unwrap().to_owned();
    let yesterday = ymd(days_before(today(), 1));
    let future = format_timestamp(OffsetDateTime::now_utc() + time::Duration::hours(1));

    let cases = [
        // A cursor the API returned, reused with a range it lies outside.
        format!("/api/usage/logs?limit=1&cursor={cursor}&to={yesterday}"),
        format!("/api/usage/logs?limit=1&cursor={cursor}&from={future}"),
        format!("/api/usage/logs?limit=1&model={SONNET}&cursor={model_cursor}&to={yesterday}"),
        // One written by hand for this very key, past every possible bound.
        format!(
            "/api/usage/logs?limit=1&cursor={}",
            cursor_at(&id, None, "LOG#zzzz")
        ),
        format!(
            "/api/usage/logs?limit=1&model={SONNET}&cursor={}",
            cursor_at(&id, Some(SONNET), "LOG#zzzz")
        ),
    ];

    let mut replies = Vec::new();
    for path in cases {
        replies.push(key_get(&app, &key, &path).await);
    }

    let wrong: Vec<String> = replies
        .iter()
        .filter(|r| r.status != 400)
        .map(|r| format!("{} -> {} {}", r.what, r.status, r.text))
        .collect();
    assert!(wrong.is_empty(), "not 400:\n{}", wrong.join("\n"));
    for reply in &replies {
        reply.error(400, "invalid_request_error", "`cursor`");
    }
}

#[tokio::test]
async fn unknown_parameters_are_400_on_the_summary_and_quota_routes_too() {
    let app = spawn_app().await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let cases = [
        ("/api/usage?foo=1", "`foo`"),
        ("/api/usage/quota?foo=1", "`foo`"),
        // A typo for /api/usage/daily?days=7 must not pass for the summary.
        ("/api/usage?days=7", "`days`"),
    ];

    let mut replies = Vec::new();
    for (path, naming) in cases {
        replies.push((key_get(&app, &key, path).await, naming));
    }

    let wrong: Vec<String> = replies
        .iter()
        .filter(|(r, _)| r.status != 400)
        .map(|(r, _)| format!("{} -> {}", r.what, r.status))
        .collect();
    assert!(
        wrong.is_empty(),
        "unknown parameters accepted:\n{}",
        wrong.join("\n")
    );
    for (reply, naming) in &replies {
        reply.error(400, "invalid_request_error", naming);
    }
}

/// What one request and the aggregates it lands in cost: each token class
/// at its own price (5-minute and 1-hour writes apart, as reported), and a
/// model without a price charged the fallback, flagged — never free.
#[tokio::test]
async fn each_request_and_every_aggregate_carries_its_cost_in_micro_dollars() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let opus = Usage {
        input_tokens: 1000,
        output_tokens: 2000,
        cache_creation_input_tokens: 3000,
        cache_read_input_tokens: 4000,
        cache_5m: 1000,
        cache_1h: 2000,
    };
    // Opus 4.5: 1000 × $5 + 2000 × $25 + 1000 × $6.25 + 2000 × $10
    // + 4000 × $0.50 per million = 5000 + 50000 + 6250 + 20000 + 2000 µ$.
    const OPUS_COST: u64 = 83_250;
    // No price: the fallback (Opus 4's $15 in, $75 out): 25 × 15 + 12 × 75.
    const UNPRICED_COST: u64 = 1_275;
    send(&app, &key, &call("claude-opus-4-5-20251101", true, opus)).await;
    send(
        &app,
        &key,
        &call("claude-test-1", false, Usage::new(25, 12, 0, 0)),
    )
    .await;

    let logs = app.wait_for_logs(&id, 2).await.unwrap();
    let mut costs: Vec<(u64, bool)> = logs
        .iter()
        .map(|log| {
            let unpriced = matches!(
                log.get("unpriced"),
                Some(aws_sdk_dynamodb::types::AttributeValue::Bool(true))
            );
            (relay_tests::app::num(log, "cost_micro_usd"), unpriced)
        })
        .collect();
    costs.sort();
    assert_eq!(costs, [(UNPRICED_COST, true), (OPUS_COST, false)]);

    let summary = key_get(&app, &key, "/api/usage").await.ok();
    assert_eq!(summary["cost_micro_usd"], OPUS_COST + UNPRICED_COST);
    let by_model: Vec<(String, u64)> = summary["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["model"].as_str().unwrap().to_owned(),
                m["cost_micro_usd"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        by_model.contains(&("claude-opus-4-5-20251101".to_owned(), OPUS_COST)),
        "{by_model:?}"
    );
    assert!(
        by_model.contains(&("claude-test-1".to_owned(), UNPRICED_COST)),
        "{by_model:?}"
    );
    let daily = key_get(&app, &key, "/api/usage/daily?days=1").await.ok();
    assert_eq!(
        daily["data"][0]["cost_micro_usd"],
        OPUS_COST + UNPRICED_COST
    );
    let page = key_get(&app, &key, "/api/usage/logs").await.ok();
    let logged: u64 = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["cost_micro_usd"].as_u64().unwrap())
        .sum();
    assert_eq!(logged, OPUS_COST + UNPRICED_COST);
}

/// With `UNPRICED_MODELS=refuse`, a model without a price never reaches
/// the upstream; priced ones pass.
#[tokio::test]
async fn unpriced_models_are_refused_before_forwarding_when_the_relay_says_so() {
    let mut options = relay_tests::app::AppOptions::default();
    options.proxy.refuse_unpriced_models = true;
    let app = relay_tests::app::spawn_app_with(options).await.unwrap();
    let (_, key) = app.new_key().await.unwrap();
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .json(&json!({"model": "claude-test-1", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let envelope: Value = response.json().await.unwrap();
    assert_eq!(envelope["error"]["type"], "permission_error");
    assert!(
        envelope["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no price"),
        "{envelope}"
    );
    let batch = app
        .http
        .post(app.url("/v1/messages/batches"))
        .header("x-api-key", &key)
        .json(&json!({"requests": [{"custom_id": "a", "params": {"model": "claude-test-1", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hi"}]}}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 403);
    assert!(app.upstream.requests().is_empty(), "nothing was forwarded");
    send(&app, &key, &call(HAIKU, false, Usage::new(10, 5, 0, 0))).await;
    assert_eq!(app.upstream.requests().len(), 1);
}

/// The cache-efficiency figures of one totals row: cost, saved, 5-minute
/// and 1-hour writes, hit ratio.
fn efficiency(row: &Value) -> (u64, i64, u64, u64, Option<f64>) {
    (
        count(row, "cost_micro_usd"),
        row["cache_saved_micro_usd"]
            .as_i64()
            .unwrap_or_else(|| panic!("`cache_saved_micro_usd` in {row}")),
        count(row, "cache_creation_5m_input_tokens"),
        count(row, "cache_creation_1h_input_tokens"),
        row["cache_hit_ratio"].as_f64(),
    )
}

/// A mixed day of traffic: two Claude Code sessions, a request without
/// one, and one whose session id may not be a key. Every view's cost,
/// savings against no caching (negative for a write never read), writes
/// by TTL and hit ratio equal the hand-computed figures.
#[tokio::test]
async fn cache_efficiency_per_key_day_and_session_equals_the_hand_computed_figures() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app.new_key().await.unwrap();
    let usage = |input, output, write_5m, write_1h, read| Usage {
        input_tokens: input,
        output_tokens: output,
        cache_creation_input_tokens: write_5m + write_1h,
        cache_read_input_tokens: read,
        cache_5m: write_5m,
        cache_1h: write_1h,
    };
    // Sonnet 4.5 per million: $3 in, $15 out, $3.75 5m write, $6 1h write,
    // $0.30 read. Haiku 4.5: $1 in, $5 out, $1.25, $2, $0.10.
    // Saved = (every prompt token at the input price + output) − cost.
    //
    // A1 (sess-a), Sonnet, in 1000, out 300, 5m 2000, 1h 1000, read 50,000:
    //   cost 3000 + 4500 + 7500 + 6000 + 15,000 = 36,000
    //   uncached 54,000 × 3 + 4500 = 166,500; saved 130,500
    let a1 = call(SONNET, true, usage(1000, 300, 2000, 1000, 50_000));
    // B1 (sess-b), Haiku, in 200, out 100, 1h 8000, never read:
    //   cost 200 + 500 + 16,000 = 16,700
    //   uncached 8200 × 1 + 500 = 8700; saved 8700 − 16,700 = −8000
    let b1 = call(HAIKU, false, usage(200, 100, 0, 8000, 0));
    // A2 (sess-a), Sonnet, in 500, out 200, read 53,000:
    //   cost 1500 + 3000 + 15,900 = 20,400
    //   uncached 53,500 × 3 + 3000 = 163,500; saved 143,100
    let a2 = call(SONNET, false, usage(500, 200, 0, 0, 53_000));
    // N1 (no session), Sonnet, in 2000, out 100: cost 6000 + 1500 = 7500,
    // saved 0.
    let n1 = call(SONNET, false, usage(2000, 100, 0, 0, 0));
    // N2 (a session id that may not be a key), Haiku, in 100, out 10,
    // 5m 4000, read 4000:
    //   cost 100 + 50 + 5000 + 400 = 5550
    //   uncached 8100 × 1 + 50 = 8150; saved 2600
    let n2 = call(HAIKU, true, usage(100, 10, 4000, 0, 4000));
    send_in_session(&app, &key, &a1, Some("sess-a")).await;
    send_in_session(&app, &key, &b1, Some("sess-b")).await;
    send_in_session(&app, &key, &a2, Some("sess-a")).await;
    send(&app, &key, &n1).await;
    send_in_session(&app, &key, &n2, Some("not a key#SESSION")).await;
    app.wait_for_logs(&id, 5).await.unwrap();

    // The key and the day: cost 36,000 + 16,700 + 20,400 + 7500 + 5550
    // = 86,150; saved 130,500 − 8000 + 143,100 + 0 + 2600 = 268,200;
    // 5m 2000 + 4000 = 6000; 1h 1000 + 8000 = 9000; hit ratio
    // reads 107,000 / (input 3800 + writes 15,000 + reads 107,000).
    let whole_day = (86_150, 268_200, 6000, 9000, Some(107_000.0 / 125_800.0));
    let summary = key_get(&app, &key, "/api/usage").await.ok();
    assert_eq!(efficiency(&summary), whole_day, "{summary}");
    let daily = key_get(&app, &key, "/api/usage/daily?days=1").await.ok();
    assert_eq!(efficiency(&daily["data"][0]), whole_day, "{daily}");
    // Per model: Sonnet 36,000 + 20,400 + 7500 = 63,900, saved 273,600,
    // reads 103,000 / (3500 + 3000 + 103,000); Haiku 16,700 + 5550 =
    // 22,250, saved −8000 + 2600 = −5400, reads 4000 / (300 + 12,000 + 4000).
    let by_model: Vec<(String, _)> = summary["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| (row["model"].as_str().unwrap().to_owned(), efficiency(row)))
        .collect();
    assert_eq!(
        by_model,
        [
            (
                SONNET.to_owned(),
                (63_900, 273_600, 2000, 1000, Some(103_000.0 / 109_500.0))
            ),
            (
                HAIKU.to_owned(),
                (22_250, -5400, 4000, 8000, Some(4000.0 / 16_300.0))
            ),
        ]
    );
    // The log rows carry each request's savings.
    let logs = key_get(&app, &key, "/api/usage/logs").await.ok();
    let mut saved: Vec<i64> = data(&logs)
        .iter()
        .map(|row| row["cache_saved_micro_usd"].as_i64().unwrap())
        .collect();
    saved.sort();
    assert_eq!(saved, [-8000, 0, 2600, 130_500, 143_100]);

    // Sessions, most recently used first (A2 came after B1); N1 and N2 in
    // none. sess-a: cost 56,400, saved 273,600, 5m 2000, 1h 1000, reads
    // 103,000 / (1500 + 3000 + 103,000). sess-b: cost 16,700, saved −8000,
    // 1h 8000, reads 0 / 8200.
    let session_a = (56_400, 273_600, 2000, 1000, Some(103_000.0 / 107_500.0));
    let session_b = (16_700, -8000, 0, 8000, Some(0.0));
    let sessions = key_get(&app, &key, "/api/usage/sessions").await.ok();
    let rows: Vec<(&str, _)> = data(&sessions)
        .iter()
        .map(|row| (row["session_id"].as_str().unwrap(), efficiency(row)))
        .collect();
    assert_eq!(rows, [("sess-a", session_a), ("sess-b", session_b)]);
    assert_eq!(sessions["has_more"], false);
    assert_eq!(count(&data(&sessions)[0], "requests"), 2);
    let first = &data(&sessions)[0];
    assert!(
        first["first_used_at"].as_str().unwrap() < first["last_used_at"].as_str().unwrap(),
        "{first}"
    );

    // Paged one at a time, then the admin's view of the same key.
    let page = key_get(&app, &key, "/api/usage/sessions?limit=1")
        .await
        .ok();
    assert_eq!(
        (&page["first_id"], &page["last_id"], &page["has_more"]),
        (&json!("sess-a"), &json!("sess-a"), &json!(true))
    );
    let next = key_get(&app, &key, "/api/usage/sessions?limit=1&after_id=sess-a")
        .await
        .ok();
    assert_eq!(
        (&next["first_id"], &next["has_more"]),
        (&json!("sess-b"), &json!(false))
    );
    key_get(&app, &key, "/api/usage/sessions?after_id=no%20such")
        .await
        .error(400, "invalid_request_error", "after_id");
    let token = app.admin_token().await.unwrap();
    let admin = admin_get(
        &app,
        &token,
        &format!("/admin/api-keys/{id}/usage/sessions"),
    )
    .await
    .ok();
    assert_eq!(admin, sessions);

    // Another key sees none of these sessions.
    let (_, other) = app.new_key().await.unwrap();
    let theirs = key_get(&app, &other, "/api/usage/sessions").await.ok();
    assert_eq!(data(&theirs).len(), 0);
    key_get(&app, &other, "/api/usage/sessions?after_id=sess-a")
        .await
        .error(400, "invalid_request_error", "after_id");
}
