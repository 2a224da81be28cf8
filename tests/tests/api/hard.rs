//! Limit modes under a burst: 200 concurrent streamed requests on one key
//! whose token and dollar limits hold only some of them. In hard mode each
//! request's worst case is reserved in its admission write and replaced at
//! settlement, so what is recorded never exceeds a limit and every refusal
//! names what did not fit; in soft mode the overshoot stays within the
//! bound the README gives (what the requests in flight use).

use std::time::Duration;

use relay_tests::app::{TestApp, num, spawn_app};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use serde_json::{Value, json};

const STREAMS: usize = 200;
/// What each answer bills: 400 input and 100 output tokens, 2,700 µ$ at
/// Sonnet 4.5's $3 / $15 per million.
const TOKENS_PER_ANSWER: u64 = 500;
const COST_PER_ANSWER: u64 = 400 * 3 + 100 * 15;
const TOKEN_LIMIT: u64 = 10_000;
const DOLLAR_LIMIT_MICRO: u64 = 40_000;

/// A streamed request whose prompt bound is above the 400 input tokens
/// the fake bills (about 70 × 7 tokens of English) and whose `max_tokens`
/// is the 100 it writes.
fn body() -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "stream": true,
        "messages": [{"role": "user", "content": "The relay counts every token. ".repeat(70)}]
    })
}

async fn burst_app() -> TestApp {
    let app = spawn_app().await.unwrap();
    // Answers that last a while, so many are in flight together.
    app.upstream.set_default(Behavior::Message(MessageSpec {
        usage: Usage::new(400, 100, 0, 0),
        text_chunks: vec!["a".into(); 4],
        event_delay: Duration::from_millis(40),
        ..MessageSpec::default()
    }));
    app
}

/// How one client's request ended, after retrying transient refusals.
#[derive(Debug)]
enum Ending {
    Answered,
    /// A final refusal (`x-should-retry: false`): its message.
    Refused(String),
}

/// Sends the request until it is answered or finally refused, retrying
/// each transient 429 after a short pause (not its `retry-after`: the test
/// wants the burst to go on while answers settle). Every transient
/// refusal's message is kept for checking.
async fn client(app: &TestApp, key: &str, transient: &std::sync::Mutex<Vec<String>>) -> Ending {
    for _ in 0..400 {
        let response = app
            .http
            .post(app.url("/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&body())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let should_retry = response
            .headers()
            .get("x-should-retry")
            .map(|v| v.to_str().unwrap().to_owned());
        let retry_after = response.headers().get("retry-after").map(|v| {
            v.to_str()
                .unwrap()
                .parse::<u64>()
                .expect("an integer retry-after")
        });
        let bytes = response.bytes().await.unwrap();
        match status {
            200 => {
                assert!(
                    bytes.ends_with(b"\n\n"),
                    "a whole stream: {}",
                    String::from_utf8_lossy(&bytes)
                );
                return Ending::Answered;
            }
            429 => {
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(body["error"]["type"], "rate_limit_error");
                let message = body["error"]["message"].as_str().unwrap().to_owned();
                if should_retry.as_deref() == Some("false") {
                    assert_eq!(retry_after, None, "{message}");
                    return Ending::Refused(message);
                }
                let wait = retry_after.expect("a transient refusal says when to retry");
                assert!((1..=60).contains(&wait), "{wait}: {message}");
                transient.lock().unwrap().push(message);
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            other => panic!("{other}: {}", String::from_utf8_lossy(&bytes)),
        }
    }
    panic!("a client was neither answered nor finally refused");
}

/// Runs the burst: returns how many were answered, and the final and
/// transient refusals' messages.
async fn burst(app: &TestApp, key: &str) -> (usize, Vec<String>, Vec<String>) {
    let transient = std::sync::Mutex::new(Vec::new());
    let endings =
        futures_util::future::join_all((0..STREAMS).map(|_| client(app, key, &transient))).await;
    app.in_flight.idle().await;
    let answered = endings
        .iter()
        .filter(|e| matches!(e, Ending::Answered))
        .count();
    let refused = endings
        .into_iter()
        .filter_map(|e| match e {
            Ending::Refused(message) => Some(message),
            Ending::Answered => None,
        })
        .collect();
    (answered, refused, transient.into_inner().unwrap())
}

/// The numbers a worst-case refusal states, in order: tokens or
/// micro-dollars (worst, left[, held]).
fn amounts(message: &str) -> Vec<u64> {
    message
        .split_whitespace()
        .filter_map(|word| {
            let word = word.trim_end_matches([',', ';']);
            if let Some(dollars) = word.strip_prefix('$') {
                let (whole, fraction) = dollars.split_once('.').unwrap_or((dollars, ""));
                let fraction = format!("{fraction:0<6}");
                Some(whole.parse::<u64>().ok()? * 1_000_000 + fraction[..6].parse::<u64>().ok()?)
            } else {
                word.parse().ok()
            }
        })
        .collect()
}

/// What a key recorded, summed from its usage rows: (rows, tokens, µ$).
async fn recorded(app: &TestApp, id: &str) -> (usize, u64, u64) {
    let logs = app.items(id, "LOG#").await.unwrap();
    let tokens = logs
        .iter()
        .map(|log| num(log, "input_tokens") + num(log, "output_tokens"))
        .sum();
    let cost = logs.iter().map(|log| num(log, "cost_micro_usd")).sum();
    (logs.len(), tokens, cost)
}

/// Nothing is held once the burst is over: no reservation, lease or trace,
/// and the key's counters are exactly the sum of its rows.
async fn nothing_outstanding(app: &TestApp, id: &str, key: &str, tokens: u64, cost: u64) {
    let record = app.key_record(id).await.unwrap();
    assert_eq!(record.tokens_reserved, 0);
    assert_eq!(record.in_flight, 0);
    assert!(record.flights.is_empty(), "{:?}", record.flights);
    assert_eq!(record.tokens_used, tokens);
    assert_eq!(record.spend.values().sum::<u64>(), cost);
    let quota = app.quota(key).await.unwrap();
    assert_eq!(
        quota["outstanding"],
        json!({"requests": 0, "reserved_tokens": 0, "reserved_usd": "0.00", "leases": 0})
    );
}

#[tokio::test]
async fn a_hard_key_never_records_more_than_its_limits_under_200_concurrent_streams() {
    let app = burst_app().await;
    let (id, key) = app
        .new_key_with(json!({"name": "hard", "limit_mode": "hard",
            "token_limit": TOKEN_LIMIT,
            "dollar_limits": [{"window": "lifetime", "limit_usd": DOLLAR_LIMIT_MICRO as f64 / 1e6}]}))
        .await
        .unwrap();
    let (answered, refused, transient) = burst(&app, &key).await;
    let (rows, tokens, cost) = recorded(&app, &id).await;
    eprintln!(
        "hard: {answered} answered, {} finally refused, {} transient refusals; \
         recorded {tokens} of {TOKEN_LIMIT} tokens, {cost} of {DOLLAR_LIMIT_MICRO} µ$",
        refused.len(),
        transient.len()
    );
    assert_eq!(rows, answered);
    assert_eq!(answered + refused.len(), STREAMS);
    assert_eq!(
        (tokens, cost),
        (
            answered as u64 * TOKENS_PER_ANSWER,
            answered as u64 * COST_PER_ANSWER
        )
    );
    // The limits hold.
    assert!(tokens <= TOKEN_LIMIT && cost <= DOLLAR_LIMIT_MICRO);
    // Some were answered, and the dollars ran out before the tokens
    // (14 answers' cost is under the limit, 15's is over).
    assert!(answered >= 1);
    // Every refusal names a worst case that did not fit what the stored key
    // had left at that moment; a final one, not even once every
    // reservation in flight came back; a transient one, only because of
    // them.
    for message in &refused {
        assert!(message.starts_with("worst case "), "{message}");
        let numbers = amounts(message);
        let (worst, left) = (numbers[0], numbers[1]);
        assert!(worst > left, "{message}");
        assert!(!message.contains("reserved by"), "{message}");
    }
    for message in &transient {
        assert!(message.starts_with("worst case "), "{message}");
        let numbers = amounts(message);
        let (worst, left) = (numbers[0], numbers[1]);
        assert!(worst > left, "{message}");
        let held = if message.contains(" tokens ") {
            numbers[2]
        } else {
            numbers[3]
        };
        assert!(worst <= left + held, "{message}");
    }
    // After the burst, no request could fit what is left: the last
    // refusals were final.
    assert!(!refused.is_empty());
    nothing_outstanding(&app, &id, &key, tokens, cost).await;
}

#[tokio::test]
async fn a_soft_key_overshoots_by_at_most_what_its_requests_in_flight_use() {
    const MAX_CONCURRENT: u64 = 20;
    let app = burst_app().await;
    let (id, key) = app
        .new_key_with(json!({"name": "soft", "max_concurrent": MAX_CONCURRENT,
            "token_limit": TOKEN_LIMIT,
            "dollar_limits": [{"window": "lifetime", "limit_usd": DOLLAR_LIMIT_MICRO as f64 / 1e6}]}))
        .await
        .unwrap();
    let (answered, refused, _) = burst(&app, &key).await;
    let (rows, tokens, cost) = recorded(&app, &id).await;
    eprintln!(
        "soft: {answered} answered; recorded {tokens} of {TOKEN_LIMIT} tokens (overshoot {}), \
         {cost} of {DOLLAR_LIMIT_MICRO} µ$ (overshoot {})",
        tokens.saturating_sub(TOKEN_LIMIT),
        cost.saturating_sub(DOLLAR_LIMIT_MICRO)
    );
    assert_eq!(rows, answered);
    assert_eq!(answered + refused.len(), STREAMS);
    // Each was admitted while the limit had room, with at most
    // MAX_CONCURRENT in flight: the overshoot is at most what that many
    // answers use.
    assert!(
        cost < DOLLAR_LIMIT_MICRO + MAX_CONCURRENT * COST_PER_ANSWER,
        "{cost}"
    );
    assert!(
        tokens < TOKEN_LIMIT + MAX_CONCURRENT * TOKENS_PER_ANSWER,
        "{tokens}"
    );
    // And the dollar limit was reached: the final refusals say so.
    assert!(cost >= DOLLAR_LIMIT_MICRO);
    for message in &refused {
        assert!(
            message.starts_with("dollar limit reached")
                || message.starts_with("token quota exhausted"),
            "{message}"
        );
    }
    nothing_outstanding(&app, &id, &key, tokens, cost).await;
}

#[tokio::test]
async fn a_key_turned_hard_while_an_instance_caches_it_soft_is_judged_hard_at_once() {
    let app = spawn_app().await.unwrap();
    let (id, key) = app
        .new_key_with(json!({"name": "flip", "token_limit": 100}))
        .await
        .unwrap();
    // Soft: admitted while any of the 100 tokens is left; the instance now
    // caches the key as soft.
    let first = app.message(&key, "claude-sonnet-4-5").send().await.unwrap();
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let patched = app
        .http
        .patch(app.url(&format!("/admin/api-keys/{id}")))
        .bearer_auth(token)
        .json(&json!({"limit_mode": "hard"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    // Hard: the worst case (a prompt bound plus 64 max_tokens) does not fit
    // what is left, and the refusal says so, not "retry".
    let second = app.message(&key, "claude-sonnet-4-5").send().await.unwrap();
    assert_eq!(second.status(), 429);
    assert_eq!(
        second
            .headers()
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok()),
        Some("false")
    );
    let body: Value = second.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("worst case of "), "{message}");
}
