//! Admin routes: login, lockout (concurrent bursts too), the address
//! allowlist, JWT checks, key lifecycle, tiers, bad input.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, like in the tests themselves"
)]

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use relay_shared::admin_auth::issue_token;
use relay_shared::config::AdminConfig;
use relay_tests::app::{
    ADMIN_PASSWORD, ADMIN_USER, AppOptions, TestApp, spawn_app, spawn_app_with,
};
use reqwest::Method;
use serde_json::{Value, json};

/// Every field the admin API shows of a key (besides the once-only `api_key`).
const KEY_FIELDS: [&str; 13] = [
    "id",
    "name",
    "description",
    "token_limit",
    "tokens_used",
    "rate_limit_tier",
    "is_active",
    "expires_at",
    "allowed_ips",
    "allowed_origins",
    "allowed_models",
    "created_at",
    "updated_at",
];

/// A well-formed key id that no test ever creates.
const UNKNOWN_ID: &str = "AbCdEf123456";

/// A response reduced to what the assertions look at.
struct Reply {
    /// The request, for failure messages.
    what: String,
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
    json: Value,
}

impl Reply {
    async fn of(method: &Method, response: reqwest::Response) -> Reply {
        let url = response.url();
        let what = match url.query() {
            Some(query) => format!("{method} {}?{query}", url.path()),
            None => format!("{method} {}", url.path()),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            what,
            status,
            headers,
            text,
            json,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `None` if this is Anthropic's error envelope with this status and
    /// type; otherwise what is wrong with it.
    fn envelope_problem(&self, status: u16, kind: &str) -> Option<String> {
        let shape_ok = self.json.as_object().is_some_and(|o| o.len() == 2)
            && self.json["type"] == "error"
            && self.json["error"]["type"].is_string()
            && self.json["error"]["message"].is_string();
        if self.status == status && shape_ok && self.json["error"]["type"] == kind {
            None
        } else {
            Some(format!(
                "{}: expected a {status} {kind} envelope, got {} {}",
                self.what,
                self.status,
                self.text.chars().take(300).collect::<String>()
            ))
        }
    }

    #[track_caller]
    fn assert_error(&self, status: u16, kind: &str) {
        if let Some(problem) = self.envelope_problem(status, kind) {
            panic!("{problem}");
        }
    }

    fn message(&self) -> &str {
        self.json["error"]["message"].as_str().unwrap_or("")
    }
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Reply {
    let mut request = app.http.request(method.clone(), app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    Reply::of(&method, request.send().await.unwrap()).await
}

async fn login_with(app: &TestApp, authorization: Option<&str>) -> Reply {
    let mut request = app.http.post(app.url("/admin/login"));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    Reply::of(&Method::POST, request.send().await.unwrap()).await
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

/// Creates a key, asserting 201; returns the created record (with `api_key`).
async fn create(app: &TestApp, token: &str, body: Value) -> Value {
    let reply = call(
        app,
        Method::POST,
        "/admin/api-keys",
        Some(token),
        Some(&body),
    )
    .await;
    assert_eq!(reply.status, 201, "create {body}: {}", reply.text);
    reply.json
}

async fn get_key(app: &TestApp, token: &str, id: &str) -> Reply {
    call(
        app,
        Method::GET,
        &format!("/admin/api-keys/{id}"),
        Some(token),
        None,
    )
    .await
}

/// Every key of a listing, following `next_cursor` to the end; asserts
/// that `has_more` agrees with `next_cursor` on each page.
async fn list_all(app: &TestApp, token: &str, query: &str) -> Vec<Value> {
    let mut keys = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/admin/api-keys?{query}&cursor={c}"),
            None => format!("/admin/api-keys?{query}"),
        };
        let reply = call(app, Method::GET, &path, Some(token), None).await;
        assert_eq!(reply.status, 200, "{}: {}", reply.what, reply.text);
        keys.extend(reply.json["data"].as_array().unwrap().iter().cloned());
        match reply.json["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(reply.json["has_more"], true);
                cursor = Some(next.to_owned());
            }
            None => {
                assert_eq!(reply.json["has_more"], false);
                return keys;
            }
        }
    }
}

fn ids(keys: &[Value]) -> HashSet<String> {
    keys.iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect()
}

fn epoch_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64url_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn valid_claims(sub: &str) -> Value {
    let now = epoch_now();
    json!({"sub": sub, "iat": now, "exp": now + 600, "iss": "claude-relay-station"})
}

/// Authorization header values that must not open any admin route.
fn bad_authorizations(app: &TestApp) -> Vec<(&'static str, Option<String>)> {
    let good = issue_token(
        &app.jwt_secret,
        ADMIN_USER,
        epoch_now(),
        Duration::from_secs(600),
    )
    .unwrap();
    let other_secret = issue_token(
        "some-other-secret",
        ADMIN_USER,
        epoch_now(),
        Duration::from_secs(600),
    )
    .unwrap();
    let expired = issue_token(
        &app.jwt_secret,
        ADMIN_USER,
        epoch_now() - 7200,
        Duration::from_secs(60),
    )
    .unwrap();
    let mut parts: Vec<&str> = good.split('.').collect();
    let forged_payload = b64url_json(&valid_claims("root"));
    parts[1] = &forged_payload;
    let tampered = parts.join(".");
    let unsigned = format!(
        "{}.{}.",
        b64url_json(&json!({"alg": "none", "typ": "JWT"})),
        b64url_json(&valid_claims(ADMIN_USER))
    );
    vec![
        ("no token", None),
        ("garbage token", Some("Bearer not.a.jwt".to_owned())),
        ("other secret", Some(format!("Bearer {other_secret}"))),
        ("expired", Some(format!("Bearer {expired}"))),
        ("tampered payload", Some(format!("Bearer {tampered}"))),
        ("alg none", Some(format!("Bearer {unsigned}"))),
        ("basic scheme", Some(basic(ADMIN_USER, ADMIN_PASSWORD))),
    ]
}

#[tokio::test]
async fn login_with_correct_basic_credentials_returns_a_working_bearer_token() {
    let app = spawn_app().await.unwrap();

    let reply = login_with(&app, Some(&basic(ADMIN_USER, ADMIN_PASSWORD))).await;

    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json.as_object().unwrap();
    let mut fields: Vec<&str> = body.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["access_token", "expires_in", "token_type"]);
    assert_eq!(reply.json["token_type"], "bearer");
    assert_eq!(reply.json["expires_in"], 3600);
    let token = reply.json["access_token"].as_str().unwrap();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let listed = call(&app, Method::GET, "/admin/api-keys", Some(token), None).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(listed.json["data"], json!([]));
}

#[tokio::test]
async fn login_without_valid_credentials_is_401_with_a_basic_challenge() {
    let app = spawn_app().await.unwrap();
    let cases = [
        ("wrong password", Some(basic(ADMIN_USER, "wrong password"))),
        ("wrong user", Some(basic("root", ADMIN_PASSWORD))),
        ("missing header", None),
        ("not base64", Some("Basic !!!".to_owned())),
        (
            "no colon",
            Some(format!("Basic {}", STANDARD.encode("admin"))),
        ),
        ("bearer scheme", Some("Bearer abc".to_owned())),
    ];

    for (case, authorization) in cases {
        let reply = login_with(&app, authorization.as_deref()).await;

        if let Some(problem) = reply.envelope_problem(401, "authentication_error") {
            panic!("{case}: {problem}");
        }
        let challenge = reply.header("www-authenticate").unwrap_or("");
        assert!(challenge.starts_with("Basic "), "{case}: {challenge:?}");
    }
}

#[tokio::test]
async fn sixth_login_after_five_wrong_passwords_is_locked_out_even_with_the_right_password() {
    let app = spawn_app().await.unwrap();
    for attempt in 1..=5 {
        let reply = login_with(&app, Some(&basic(ADMIN_USER, "nope"))).await;
        assert_eq!(reply.status, 401, "attempt {attempt}: {}", reply.text);
    }

    let reply = login_with(&app, Some(&basic(ADMIN_USER, ADMIN_PASSWORD))).await;

    reply.assert_error(429, "rate_limit_error");
    let wait: u64 = reply
        .header("retry-after")
        .expect("retry-after header")
        .parse()
        .expect("numeric retry-after");
    assert!((1..=900).contains(&wait), "retry-after {wait}");
    assert!(reply.header("www-authenticate").is_none());
}

/// Password checks one address gets per 15-minute window (the store's
/// `MAX_LOGIN_FAILURES`; README: "five failed logins").
const CHECKS_PER_WINDOW: usize = 5;

/// Whether this is a 429 `rate_limit_error` with a whole-seconds
/// `retry-after` within the 15-minute window; otherwise what is wrong.
fn lockout_problem(reply: &Reply) -> Option<String> {
    if let Some(problem) = reply.envelope_problem(429, "rate_limit_error") {
        return Some(problem);
    }
    let wait = reply
        .header("retry-after")
        .and_then(|v| v.parse::<u64>().ok());
    if !wait.is_some_and(|w| (1..=900).contains(&w)) {
        return Some(format!(
            "{}: retry-after {:?} is not 1..=900 seconds",
            reply.what,
            reply.header("retry-after")
        ));
    }
    None
}

/// Sends `count` wrong-password logins from one address all at once and
/// asserts that only the window's checks ran (a 401 means bcrypt ran) and
/// every other login was refused before checking.
async fn burst_of_wrong_logins_checks_only_the_window(count: usize) {
    let app = spawn_app().await.unwrap();
    let wrong = basic(ADMIN_USER, "wrong password");

    let replies =
        futures_util::future::join_all((0..count).map(|_| login_with(&app, Some(&wrong)))).await;

    let checked = replies.iter().filter(|r| r.status == 401).count();
    let problems: Vec<String> = replies
        .iter()
        .filter(|r| r.status != 401)
        .filter_map(lockout_problem)
        .collect();
    assert!(
        checked <= CHECKS_PER_WINDOW,
        "{count} concurrent wrong logins: {checked} passwords were checked"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Refusals never cost a slot, so the window's checks were all used.
    assert_eq!(
        checked, CHECKS_PER_WINDOW,
        "{count} concurrent wrong logins"
    );
    let after = login_with(&app, Some(&basic(ADMIN_USER, ADMIN_PASSWORD))).await;
    assert_eq!(
        lockout_problem(&after),
        None,
        "the right password after the burst"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_concurrent_wrong_logins_check_at_most_five_passwords() {
    burst_of_wrong_logins_checks_only_the_window(40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_wrong_logins_check_at_most_five_passwords() {
    burst_of_wrong_logins_checks_only_the_window(200).await;
}

#[tokio::test]
async fn successful_login_forgives_earlier_failures() {
    let app = spawn_app().await.unwrap();
    let wrong = basic(ADMIN_USER, "nope");
    for attempt in 1..CHECKS_PER_WINDOW {
        let reply = login_with(&app, Some(&wrong)).await;
        assert_eq!(reply.status, 401, "attempt {attempt}: {}", reply.text);
    }

    let reply = login_with(&app, Some(&basic(ADMIN_USER, ADMIN_PASSWORD))).await;

    assert_eq!(reply.status, 200, "{}", reply.text);
    // A whole new window: five more checks, then the lockout.
    for attempt in 1..=CHECKS_PER_WINDOW {
        let reply = login_with(&app, Some(&wrong)).await;
        assert_eq!(
            reply.status, 401,
            "attempt {attempt} after success: {}",
            reply.text
        );
    }
    let reply = login_with(&app, Some(&wrong)).await;
    assert_eq!(lockout_problem(&reply), None);
}

#[tokio::test]
async fn locked_out_address_hears_so_even_without_credentials() {
    let app = spawn_app().await.unwrap();
    for _ in 0..CHECKS_PER_WINDOW {
        let reply = login_with(&app, Some(&basic(ADMIN_USER, "nope"))).await;
        assert_eq!(reply.status, 401, "{}", reply.text);
    }

    let reply = login_with(&app, None).await;

    assert_eq!(lockout_problem(&reply), None);
}

#[tokio::test]
async fn every_admin_route_rejects_missing_invalid_forged_and_expired_tokens() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let (id, _) = app.new_key().await.unwrap();
    let key_body = json!({"name": "intruder"});
    let tier_body = json!({"requests": 1, "period": 60});
    let routes: Vec<(Method, String, Option<&Value>)> = vec![
        (Method::POST, "/admin/api-keys".into(), Some(&key_body)),
        (Method::GET, "/admin/api-keys".into(), None),
        (Method::GET, format!("/admin/api-keys/{id}"), None),
        (
            Method::PATCH,
            format!("/admin/api-keys/{id}"),
            Some(&key_body),
        ),
        (Method::DELETE, format!("/admin/api-keys/{id}"), None),
        (Method::POST, format!("/admin/api-keys/{id}/disable"), None),
        (Method::POST, format!("/admin/api-keys/{id}/enable"), None),
        (Method::POST, format!("/admin/api-keys/{id}/rotate"), None),
        (Method::GET, "/admin/tiers".into(), None),
        (
            Method::PUT,
            "/admin/tiers/intruder".into(),
            Some(&tier_body),
        ),
        (Method::PUT, "/admin/tiers/basic".into(), Some(&tier_body)),
    ];
    let before = app.key_record(&id).await.unwrap();
    let mut failures = Vec::new();

    for (auth_case, authorization) in bad_authorizations(&app) {
        for (method, path, body) in &routes {
            let mut request = app.http.request(method.clone(), app.url(path));
            if let Some(value) = &authorization {
                request = request.header("authorization", value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let reply = Reply::of(method, request.send().await.unwrap()).await;
            if let Some(problem) = reply.envelope_problem(401, "authentication_error") {
                failures.push(format!("{auth_case}: {problem}"));
            }
        }
    }

    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Control: a token forged the same way but properly signed is accepted.
    let signed = issue_token(
        &app.jwt_secret,
        ADMIN_USER,
        epoch_now(),
        Duration::from_secs(600),
    )
    .unwrap();
    let reply = call(&app, Method::GET, "/admin/tiers", Some(&signed), None).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    // Nothing any of those requests asked for happened.
    let after = app.key_record(&id).await.unwrap();
    assert_eq!(after.name, before.name);
    assert!(after.is_active);
    assert!(after.secret_hash.matches(&before.secret_hash));
    let listed = call(&app, Method::GET, "/admin/api-keys", Some(&token), None).await;
    assert_eq!(ids(listed.json["data"].as_array().unwrap()).len(), 1);
    let tiers = call(&app, Method::GET, "/admin/tiers", Some(&token), None).await;
    assert_eq!(
        tiers.json["data"],
        json!([
            {"name": "basic", "requests": 100, "period": 60},
            {"name": "premium", "requests": 1000, "period": 60},
        ])
    );
}

#[tokio::test]
async fn created_key_is_shown_once_and_its_secret_hash_never() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let body = json!({
        "name": "ci runner",
        "description": "nightly jobs",
        "token_limit": 50000,
        "rate_limit_tier": "premium",
        "expires_at": "2031-02-03T04:05:06Z",
        "allowed_ips": ["10.1.2.3/8", "192.168.1.7"],
        "allowed_origins": ["Example.com", "https://app.example.org/"],
        "allowed_models": ["claude-haiku-*"],
    });

    let created = create(&app, &token, body).await;

    let id = created["id"].as_str().unwrap().to_owned();
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    assert!(api_key.starts_with(&format!("sk-proxy-{id}")), "{api_key}");
    assert_eq!(api_key.len(), "sk-proxy-".len() + 12 + 32);
    for field in KEY_FIELDS {
        assert!(created.get(field).is_some(), "create lacks `{field}`");
    }
    assert_eq!(created["name"], "ci runner");
    assert_eq!(created["description"], "nightly jobs");
    assert_eq!(created["token_limit"], 50000);
    assert_eq!(created["tokens_used"], 0);
    assert_eq!(created["rate_limit_tier"], "premium");
    assert_eq!(created["is_active"], true);
    assert_eq!(created["expires_at"], "2031-02-03T04:05:06.000Z");
    assert_eq!(
        created["allowed_ips"],
        json!(["10.0.0.0/8", "192.168.1.7/32"])
    );
    assert_eq!(
        created["allowed_origins"],
        json!(["example.com", "https://app.example.org"])
    );
    assert_eq!(created["allowed_models"], json!(["claude-haiku-*"]));
    assert_eq!(created["created_at"], created["updated_at"]);

    let fetched = get_key(&app, &token, &id).await;
    assert_eq!(fetched.status, 200, "{}", fetched.text);
    assert!(fetched.json.get("api_key").is_none(), "{}", fetched.text);
    let mut expected = created.clone();
    expected.as_object_mut().unwrap().remove("api_key");
    assert_eq!(fetched.json, expected);
    assert!(!fetched.text.contains(&api_key[9 + 12..]));

    let listed = call(&app, Method::GET, "/admin/api-keys", Some(&token), None).await;
    let patched = call(
        &app,
        Method::PATCH,
        &format!("/admin/api-keys/{id}"),
        Some(&token),
        Some(&json!({"description": "changed"})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    let old_hash = app.key_record(&id).await.unwrap().secret_hash.to_hex();
    let rotated = call(
        &app,
        Method::POST,
        &format!("/admin/api-keys/{id}/rotate"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let new_hash = app.key_record(&id).await.unwrap().secret_hash.to_hex();
    assert_ne!(old_hash, new_hash);
    let created_text = created.to_string();
    let bodies = [
        ("create", created_text.as_str()),
        ("get", &fetched.text),
        ("list", &listed.text),
        ("patch", &patched.text),
        ("rotate", &rotated.text),
    ];
    for (route, text) in bodies {
        for needle in [old_hash.as_str(), new_hash.as_str(), "secret_hash"] {
            assert!(
                !text.contains(needle),
                "{route} body shows `{needle}`: {text}"
            );
        }
    }
    assert!(!listed.text.contains("api_key"), "{}", listed.text);
    assert!(!patched.text.contains("api_key"), "{}", patched.text);
}

#[tokio::test]
async fn listing_pages_newest_first_and_filters_by_active() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let mut created_ids = Vec::new();
    for n in 0..5 {
        let key = create(&app, &token, json!({"name": format!("key {n}")})).await;
        created_ids.push(key["id"].as_str().unwrap().to_owned());
    }

    let mut seen: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    for (page, (size, more)) in [(2, true), (2, true), (1, false)].into_iter().enumerate() {
        let path = match &cursor {
            Some(c) => format!("/admin/api-keys?limit=2&cursor={c}"),
            None => "/admin/api-keys?limit=2".to_owned(),
        };
        let reply = call(&app, Method::GET, &path, Some(&token), None).await;
        assert_eq!(reply.status, 200, "page {page}: {}", reply.text);
        assert_eq!(
            reply.json["data"].as_array().unwrap().len(),
            size,
            "page {page}"
        );
        assert_eq!(reply.json["has_more"], more, "page {page}");
        assert_eq!(reply.json["next_cursor"].is_string(), more, "page {page}");
        seen.extend(reply.json["data"].as_array().unwrap().iter().cloned());
        cursor = reply.json["next_cursor"].as_str().map(str::to_owned);
    }

    assert_eq!(seen.len(), 5);
    assert_eq!(ids(&seen), created_ids.iter().cloned().collect());
    let created_at: Vec<&str> = seen
        .iter()
        .map(|k| k["created_at"].as_str().unwrap())
        .collect();
    let mut newest_first = created_at.clone();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(created_at, newest_first);
    assert!(seen.iter().all(|k| k.get("api_key").is_none()));

    let disabled: HashSet<String> = [created_ids[1].clone(), created_ids[3].clone()].into();
    for id in &disabled {
        let path = format!("/admin/api-keys/{id}/disable");
        let reply = call(&app, Method::POST, &path, Some(&token), None).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let inactive = list_all(&app, &token, "active=false").await;
    assert_eq!(ids(&inactive), disabled);
    assert!(inactive.iter().all(|k| k["is_active"] == false));
    let active = list_all(&app, &token, "active=true").await;
    let enabled: HashSet<String> = created_ids
        .iter()
        .filter(|id| !disabled.contains(*id))
        .cloned()
        .collect();
    assert_eq!(ids(&active), enabled);
    assert!(active.iter().all(|k| k["is_active"] == true));
    // The filter and the paging together: 3 active keys at 2 a page.
    let paged_active = list_all(&app, &token, "active=true&limit=2").await;
    assert_eq!(paged_active.len(), 3);
    assert_eq!(ids(&paged_active), enabled);
    let paged_inactive = list_all(&app, &token, "active=false&limit=1").await;
    assert_eq!(paged_inactive.len(), 2);
    assert_eq!(ids(&paged_inactive), disabled);
}

#[tokio::test]
async fn patch_changes_every_editable_field_and_updated_at_but_not_created_at() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let created = create(
        &app,
        &token,
        json!({"name": "before", "description": "old", "token_limit": 10}),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let patched = call(
        &app,
        Method::PATCH,
        &format!("/admin/api-keys/{id}"),
        Some(&token),
        Some(&json!({
            "name": "after",
            "description": "new",
            "token_limit": 2000,
            "rate_limit_tier": "premium",
            "expires_at": "2032-06-07T08:09:10+02:00",
            "allowed_ips": ["2001:db8::1/32"],
            "allowed_origins": ["*.corp.dev"],
            "allowed_models": ["claude-opus-5-5", "claude-haiku-*"],
            "limit_mode": "hard",
        })),
    )
    .await;

    assert_eq!(patched.status, 200, "{}: {}", patched.what, patched.text);
    assert_eq!(created["limit_mode"], "soft");
    assert_eq!(patched.json["limit_mode"], "hard");
    let key = &patched.json;
    assert_eq!(key["id"], id);
    assert_eq!(key["name"], "after");
    assert_eq!(key["description"], "new");
    assert_eq!(key["token_limit"], 2000);
    assert_eq!(key["rate_limit_tier"], "premium");
    assert_eq!(key["expires_at"], "2032-06-07T06:09:10.000Z");
    assert_eq!(key["allowed_ips"], json!(["2001:db8::/32"]));
    assert_eq!(key["allowed_origins"], json!(["*.corp.dev"]));
    assert_eq!(
        key["allowed_models"],
        json!(["claude-opus-5-5", "claude-haiku-*"])
    );
    assert_eq!(key["is_active"], true);
    assert_eq!(key["tokens_used"], 0);
    assert_eq!(key["created_at"], created["created_at"]);
    assert_ne!(key["updated_at"], created["updated_at"]);
    assert_eq!(get_key(&app, &token, id).await.json, patched.json);
}

#[tokio::test]
async fn patch_with_null_clears_description_token_limit_and_expires_at() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let created = create(
        &app,
        &token,
        json!({
            "name": "keeps its name",
            "description": "old",
            "token_limit": 10,
            "rate_limit_tier": "premium",
            "expires_at": "2030-01-01T00:00:00Z",
            "allowed_models": ["claude-haiku-*"],
        }),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;

    let cleared = call(
        &app,
        Method::PATCH,
        &format!("/admin/api-keys/{id}"),
        Some(&token),
        Some(&json!({"description": null, "token_limit": null, "expires_at": null})),
    )
    .await;

    assert_eq!(cleared.status, 200, "{}", cleared.text);
    let key = &cleared.json;
    assert_eq!(key["description"], Value::Null);
    assert_eq!(key["token_limit"], Value::Null);
    assert_eq!(key["expires_at"], Value::Null);
    assert_eq!(key["name"], "keeps its name", "absent fields stay");
    assert_eq!(key["rate_limit_tier"], "premium");
    assert_eq!(key["allowed_models"], created["allowed_models"]);
    assert_eq!(key["created_at"], created["created_at"]);
    assert_ne!(key["updated_at"], created["updated_at"]);
    assert_eq!(get_key(&app, &token, id).await.json, cleared.json);
    let record = app.key_record(id).await.unwrap();
    assert_eq!(record.description, None);
    assert_eq!(record.token_limit, None);
    assert_eq!(record.expires_at, None);
}

#[tokio::test]
async fn disable_enable_rotate_and_delete_a_key() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let (id, old_key) = app.new_key().await.unwrap();
    let path = format!("/admin/api-keys/{id}");

    let disabled = call(
        &app,
        Method::POST,
        &format!("{path}/disable"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(disabled.status, 200, "{}", disabled.text);
    assert_eq!(disabled.json["is_active"], false);
    assert_eq!(get_key(&app, &token, &id).await.json["is_active"], false);

    let enabled = call(
        &app,
        Method::POST,
        &format!("{path}/enable"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(enabled.status, 200, "{}", enabled.text);
    assert_eq!(enabled.json["is_active"], true);
    assert_eq!(get_key(&app, &token, &id).await.json["is_active"], true);

    let rotated = call(
        &app,
        Method::POST,
        &format!("{path}/rotate"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let new_key = rotated.json["api_key"].as_str().unwrap();
    assert!(new_key.starts_with(&format!("sk-proxy-{id}")), "{new_key}");
    assert_eq!(new_key.len(), old_key.len());
    assert_ne!(new_key, old_key);
    assert_eq!(rotated.json["id"], id.as_str());
    assert!(
        get_key(&app, &token, &id)
            .await
            .json
            .get("api_key")
            .is_none()
    );

    let deleted = call(&app, Method::DELETE, &path, Some(&token), None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    assert_eq!(deleted.json, json!({"id": id, "deleted": true}));
    get_key(&app, &token, &id)
        .await
        .assert_error(404, "not_found_error");
    call(&app, Method::DELETE, &path, Some(&token), None)
        .await
        .assert_error(404, "not_found_error");
    let listed = call(&app, Method::GET, "/admin/api-keys", Some(&token), None).await;
    assert_eq!(listed.json["data"], json!([]));
}

#[tokio::test]
async fn tiers_are_listed_created_used_and_overridden() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();

    let listed = call(&app, Method::GET, "/admin/tiers", Some(&token), None).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    assert_eq!(
        listed.json["data"],
        json!([
            {"name": "basic", "requests": 100, "period": 60},
            {"name": "premium", "requests": 1000, "period": 60},
        ])
    );

    let gold = json!({"requests": 5000, "period": 60, "tokens_per_minute": 100_000});
    let put = call(
        &app,
        Method::PUT,
        "/admin/tiers/gold",
        Some(&token),
        Some(&gold),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text);
    assert_eq!(
        put.json,
        json!({"name": "gold", "requests": 5000, "period": 60, "tokens_per_minute": 100_000})
    );
    let listed = call(&app, Method::GET, "/admin/tiers", Some(&token), None).await;
    let names: Vec<&str> = listed.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["basic", "gold", "premium"]);
    assert_eq!(listed.json["data"][1], put.json);

    let key = create(
        &app,
        &token,
        json!({"name": "vip", "rate_limit_tier": "gold"}),
    )
    .await;
    assert_eq!(key["rate_limit_tier"], "gold");

    let basic = json!({"requests": 7, "period": 30});
    let put = call(
        &app,
        Method::PUT,
        "/admin/tiers/basic",
        Some(&token),
        Some(&basic),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.text);
    let listed = call(&app, Method::GET, "/admin/tiers", Some(&token), None).await;
    assert_eq!(
        listed.json["data"][0],
        json!({"name": "basic", "requests": 7, "period": 30})
    );
    assert_eq!(listed.json["data"].as_array().unwrap().len(), 3);
}

/// One bad request and what the relay must answer.
struct BadCase {
    case: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    status: u16,
    kind: &'static str,
    /// A field or parameter name the message must contain.
    names: Option<&'static str>,
}

fn bad(
    case: &'static str,
    method: Method,
    path: impl Into<String>,
    body: Option<Vec<u8>>,
    status: u16,
    names: Option<&'static str>,
) -> BadCase {
    let kind = match status {
        404 => "not_found_error",
        413 => "request_too_large",
        _ => "invalid_request_error",
    };
    BadCase {
        case,
        method,
        path: path.into(),
        content_type: body.as_ref().map(|_| "application/json"),
        body,
        status,
        kind,
        names,
    }
}

fn create_case(case: &'static str, body: Value, status: u16, names: &'static str) -> BadCase {
    bad(
        case,
        Method::POST,
        "/admin/api-keys",
        Some(body.to_string().into_bytes()),
        status,
        Some(names),
    )
}

fn raw_create_case(case: &'static str, body: Vec<u8>, status: u16) -> BadCase {
    bad(
        case,
        Method::POST,
        "/admin/api-keys",
        Some(body),
        status,
        None,
    )
}

fn list_case(case: &'static str, query: &str, names: &'static str) -> BadCase {
    bad(
        case,
        Method::GET,
        format!("/admin/api-keys?{query}"),
        None,
        400,
        Some(names),
    )
}

fn bad_cases(id: &str) -> Vec<BadCase> {
    let key = format!("/admin/api-keys/{id}");
    let json = |v: Value| Some(v.to_string().into_bytes());
    let models: Vec<String> = (0..101).map(|n| format!("model-{n}")).collect();
    vec![
        raw_create_case("malformed JSON", b"{\"name\": ".to_vec(), 400),
        raw_create_case("array body", b"[{\"name\": \"a\"}]".to_vec(), 400),
        create_case(
            "unknown field",
            json!({"name": "a", "colour": "red"}),
            400,
            "colour",
        ),
        create_case("name missing", json!({"description": "x"}), 400, "name"),
        create_case("name empty", json!({"name": ""}), 422, "name"),
        create_case(
            "limit_mode unknown",
            json!({"name": "a", "limit_mode": "strict"}),
            422,
            "limit_mode",
        ),
        create_case(
            "limit_mode capitalised",
            json!({"name": "a", "limit_mode": "Hard"}),
            422,
            "limit_mode",
        ),
        create_case("name blank", json!({"name": "   "}), 422, "name"),
        create_case(
            "name 201 chars",
            json!({"name": "x".repeat(201)}),
            422,
            "name",
        ),
        create_case(
            "name control chars",
            json!({"name": "a\u{0007}b"}),
            422,
            "name",
        ),
        create_case("name number", json!({"name": 42}), 400, "name"),
        create_case("name null", json!({"name": null}), 400, "name"),
        create_case(
            "negative token_limit",
            json!({"name": "a", "token_limit": -1}),
            400,
            "token_limit",
        ),
        create_case(
            "token_limit string",
            json!({"name": "a", "token_limit": "100"}),
            400,
            "token_limit",
        ),
        create_case(
            "token_limit 2^60",
            json!({"name": "a", "token_limit": 1u64 << 60}),
            422,
            "token_limit",
        ),
        create_case(
            "token_limit fractional",
            json!({"name": "a", "token_limit": 1.5}),
            400,
            "token_limit",
        ),
        create_case(
            "CIDR /33",
            json!({"name": "a", "allowed_ips": ["10.0.0.0/33"]}),
            422,
            "allowed_ips",
        ),
        create_case(
            "IP garbage",
            json!({"name": "a", "allowed_ips": ["not-an-ip"]}),
            422,
            "allowed_ips",
        ),
        create_case(
            "allowed_ips not a list",
            json!({"name": "a", "allowed_ips": "10.0.0.1"}),
            400,
            "allowed_ips",
        ),
        create_case(
            "origin ftp",
            json!({"name": "a", "allowed_origins": ["ftp://x"]}),
            422,
            "allowed_origins",
        ),
        create_case(
            "unknown tier",
            json!({"name": "a", "rate_limit_tier": "nope"}),
            422,
            "rate_limit_tier",
        ),
        create_case(
            "malformed tier name",
            json!({"name": "a", "rate_limit_tier": "Gold Tier"}),
            422,
            "rate_limit_tier",
        ),
        create_case(
            "expires_at tomorrow",
            json!({"name": "a", "expires_at": "tomorrow"}),
            422,
            "expires_at",
        ),
        create_case(
            "101 models",
            json!({"name": "a", "allowed_models": models}),
            422,
            "allowed_models",
        ),
        create_case(
            "model with space",
            json!({"name": "a", "allowed_models": ["claude opus"]}),
            422,
            "allowed_models",
        ),
        BadCase {
            content_type: Some("text/plain"),
            ..create_case("text/plain", json!({"name": "a"}), 415, "content-type")
        },
        BadCase {
            content_type: None,
            ..create_case("no content-type", json!({"name": "a"}), 415, "content-type")
        },
        bad(
            "body over 64 KiB",
            Method::POST,
            "/admin/api-keys",
            json(json!({"name": "a", "description": "d".repeat(70 * 1024)})),
            413,
            None,
        ),
        raw_create_case("deeply nested", "[".repeat(10_000).into_bytes(), 400),
        raw_create_case(
            "invalid UTF-8",
            [&b"{\"name\": \""[..], &[0xff, 0xfe, 0xfd], &b"\"}"[..]].concat(),
            400,
        ),
        list_case("limit=0", "limit=0", "limit"),
        list_case("limit=1000", "limit=1000", "limit"),
        list_case("limit=abc", "limit=abc", "limit"),
        list_case("limit=-1", "limit=-1", "limit"),
        list_case("active=maybe", "active=maybe", "active"),
        list_case("cursor=!!!", "cursor=!!!", "cursor"),
        list_case(
            "cursor of another shape",
            &format!("cursor={}", URL_SAFE_NO_PAD.encode("no-hash-here")),
            "cursor",
        ),
        list_case("unknown query parameter", "colour=red", "colour"),
        bad(
            "PATCH {}",
            Method::PATCH,
            &key,
            json(json!({})),
            422,
            Some("body"),
        ),
        bad(
            "PATCH name too long",
            Method::PATCH,
            &key,
            json(json!({"name": "x".repeat(201)})),
            422,
            Some("name"),
        ),
        bad(
            "PATCH unknown tier",
            Method::PATCH,
            &key,
            json(json!({"rate_limit_tier": "nope"})),
            422,
            Some("rate_limit_tier"),
        ),
        bad(
            "PATCH unknown field",
            Method::PATCH,
            &key,
            json(json!({"tokens_used": 0})),
            400,
            Some("tokens_used"),
        ),
        bad(
            "PATCH is_active string",
            Method::PATCH,
            &key,
            json(json!({"is_active": "yes"})),
            400,
            Some("is_active"),
        ),
        bad(
            "GET unknown id",
            Method::GET,
            format!("/admin/api-keys/{UNKNOWN_ID}"),
            None,
            404,
            Some(UNKNOWN_ID),
        ),
        bad(
            "GET malformed id",
            Method::GET,
            "/admin/api-keys/..%2F..%2Fetc",
            None,
            404,
            None,
        ),
        bad(
            "GET id one char short",
            Method::GET,
            format!("/admin/api-keys/{}", &UNKNOWN_ID[1..]),
            None,
            404,
            None,
        ),
        bad(
            "PUT tier requests 0",
            Method::PUT,
            "/admin/tiers/gold",
            json(json!({"requests": 0, "period": 60})),
            422,
            Some("requests"),
        ),
        bad(
            "PUT tier period 0",
            Method::PUT,
            "/admin/tiers/gold",
            json(json!({"requests": 5, "period": 0})),
            422,
            Some("period"),
        ),
        bad(
            "PUT tier requests missing",
            Method::PUT,
            "/admin/tiers/gold",
            json(json!({"period": 60})),
            400,
            Some("requests"),
        ),
        bad(
            "PUT tier tokens_per_minute 0",
            Method::PUT,
            "/admin/tiers/gold",
            json(json!({"requests": 5, "period": 60, "tokens_per_minute": 0})),
            422,
            Some("tokens_per_minute"),
        ),
        bad(
            "PUT tier Bad Name",
            Method::PUT,
            "/admin/tiers/Bad%20Name",
            json(json!({"requests": 5, "period": 60})),
            422,
            Some("name"),
        ),
        bad(
            "PUT tier name 33 chars",
            Method::PUT,
            format!("/admin/tiers/{}", "t".repeat(33)),
            json(json!({"requests": 5, "period": 60})),
            422,
            Some("name"),
        ),
        bad(
            "unknown admin path",
            Method::GET,
            "/admin/nope",
            None,
            404,
            None,
        ),
        bad(
            "unknown admin sub-path",
            Method::POST,
            format!("/admin/api-keys/{id}/explode"),
            None,
            404,
            None,
        ),
        bad(
            "PUT /admin/api-keys",
            Method::PUT,
            "/admin/api-keys",
            None,
            405,
            None,
        ),
        bad(
            "DELETE /admin/tiers",
            Method::DELETE,
            "/admin/tiers",
            None,
            405,
            None,
        ),
        bad(
            "GET /admin/login",
            Method::GET,
            "/admin/login",
            None,
            405,
            None,
        ),
    ]
}

/// Sends each case; returns a line for each answer that is not the
/// expected 4xx envelope naming the expected field.
async fn run_cases(app: &TestApp, token: &str, cases: &[BadCase]) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        let mut request = app
            .http
            .request(case.method.clone(), app.url(&case.path))
            .bearer_auth(token);
        if let Some(content_type) = case.content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(body) = &case.body {
            request = request.body(body.clone());
        }
        let reply = Reply::of(&case.method, request.send().await.unwrap()).await;

        let problem = if !(400..500).contains(&reply.status) {
            Some(format!("not a 4xx: {} {}", reply.status, reply.text))
        } else if let Some(problem) = reply.envelope_problem(case.status, case.kind) {
            Some(problem)
        } else {
            case.names
                .filter(|name| !reply.message().contains(name))
                .map(|name| format!("message does not name `{name}`: {}", reply.text))
        };
        if let Some(problem) = problem {
            let problem: String = problem.chars().take(400).collect();
            failures.push(format!("{}: {problem}", case.case));
        }
    }
    failures
}

#[tokio::test]
async fn bad_input_is_a_4xx_error_envelope_naming_the_field() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let (id, _) = app.new_key().await.unwrap();
    let before = app.key_record(&id).await.unwrap();
    let cases = bad_cases(&id);
    assert!(cases.len() >= 20);

    let failures = run_cases(&app, &token, &cases).await;

    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // None of it changed the key or created anything.
    let after = app.key_record(&id).await.unwrap();
    assert_eq!(after.name, before.name);
    assert_eq!(after.rate_limit_tier, before.rate_limit_tier);
    assert_eq!(after.updated_at, before.updated_at);
    let listed = call(&app, Method::GET, "/admin/api-keys", Some(&token), None).await;
    assert_eq!(listed.json["data"].as_array().unwrap().len(), 1);
    let tiers = call(&app, Method::GET, "/admin/tiers", Some(&token), None).await;
    assert_eq!(tiers.json["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn json_array_bodies_are_rejected_not_read_as_positional_fields() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let (id, _) = app.new_key().await.unwrap();
    // serde reads a struct from an array positionally, in field order.
    let cases = [
        raw_create_case("create from [name]", b"[\"via array\"]".to_vec(), 400),
        bad(
            "patch from [name, description]",
            Method::PATCH,
            format!("/admin/api-keys/{id}"),
            Some(b"[null, \"via array\"]".to_vec()),
            400,
            None,
        ),
        bad(
            "tier from [requests, period]",
            Method::PUT,
            "/admin/tiers/arraytier",
            Some(b"[5, 60]".to_vec()),
            400,
            None,
        ),
    ];

    let failures = run_cases(&app, &token, &cases).await;

    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn json_bodies_with_trailing_content_are_rejected_and_create_nothing() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let cases = [
        raw_create_case("trailing word", br#"{"name":"x"} trailing"#.to_vec(), 400),
        raw_create_case(
            "second object",
            br#"{"name":"x"}{"name":"y"}"#.to_vec(),
            400,
        ),
        raw_create_case("trailing number", br#"{"name":"x"} 1"#.to_vec(), 400),
        raw_create_case("trailing brace", br#"{"name":"x"}}"#.to_vec(), 400),
    ];

    let failures = run_cases(&app, &token, &cases).await;

    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let listed = call(&app, Method::GET, "/admin/api-keys", Some(&token), None).await;
    assert_eq!(listed.json["data"], json!([]), "no key was created");
    // Control: trailing whitespace is still part of a valid JSON text.
    let reply = Reply::of(
        &Method::POST,
        app.http
            .post(app.url("/admin/api-keys"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body("{\"name\":\"x\"} \r\n\t")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
}

#[tokio::test]
async fn method_not_allowed_names_the_allowed_methods() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();

    let reply = call(&app, Method::PUT, "/admin/api-keys", Some(&token), None).await;

    reply.assert_error(405, "invalid_request_error");
    let allow = reply.header("allow").unwrap_or("");
    assert!(
        allow.contains("GET") && allow.contains("POST"),
        "allow: {allow:?}"
    );
}

#[tokio::test]
async fn operations_on_an_unknown_key_are_404() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let path = format!("/admin/api-keys/{UNKNOWN_ID}");
    let patch = json!({"description": "ghost", "is_active": false});
    let operations: Vec<(Method, String, Option<&Value>)> = vec![
        (Method::GET, path.clone(), None),
        (Method::PATCH, path.clone(), Some(&patch)),
        (Method::POST, format!("{path}/disable"), None),
        (Method::POST, format!("{path}/enable"), None),
        (Method::POST, format!("{path}/rotate"), None),
        (Method::DELETE, path.clone(), None),
    ];

    for (method, path, body) in operations {
        let reply = call(&app, method.clone(), &path, Some(&token), body).await;

        reply.assert_error(404, "not_found_error");
        assert!(
            reply.message().contains(UNKNOWN_ID),
            "{method} {path}: {}",
            reply.text
        );
    }
    // None of them brought the key into being.
    let listed = call(&app, Method::GET, "/admin/api-keys", Some(&token), None).await;
    assert_eq!(listed.json["data"], json!([]));
}

#[tokio::test]
async fn bare_admin_paths_stay_in_the_admin_router_and_never_reach_upstream() {
    let app = spawn_app().await.unwrap();
    let (_, relay_key) = app.new_key().await.unwrap();
    let mut failures = Vec::new();

    for path in ["/admin", "/admin/"] {
        let reply = Reply::of(
            &Method::GET,
            app.http
                .get(app.url(path))
                .header("x-api-key", &relay_key)
                .send()
                .await
                .unwrap(),
        )
        .await;
        if let Some(problem) = reply.envelope_problem(404, "not_found_error") {
            failures.push(problem);
        }
    }

    let forwarded: Vec<String> = app
        .upstream
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        failures.is_empty() && forwarded.is_empty(),
        "{}\nforwarded upstream: {forwarded:?}",
        failures.join("\n")
    );
}

/// A test app whose admin routes allow only these blocks
/// (`ADMIN_ALLOWED_CIDRS` syntax); the tests' client is 127.0.0.1.
async fn app_with_admin_cidrs(cidrs: &str) -> TestApp {
    spawn_app_with(AppOptions {
        admin_allowed_cidrs: cidrs.to_owned(),
        ..AppOptions::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn admin_routes_refuse_callers_outside_admin_allowed_cidrs_with_403() {
    let app = app_with_admin_cidrs("10.0.0.0/8").await;
    // A valid token, as if issued earlier from an allowed address.
    let token = issue_token(
        &app.jwt_secret,
        ADMIN_USER,
        epoch_now(),
        Duration::from_secs(600),
    )
    .unwrap();
    let body = json!({"name": "from outside"});
    let requests: Vec<(Method, &str, Option<&str>, Option<&Value>)> = vec![
        (Method::POST, "/admin/api-keys", Some(&token), Some(&body)),
        (Method::GET, "/admin/api-keys", Some(&token), None),
        (Method::GET, "/admin/tiers", Some(&token), None),
        (Method::GET, "/admin/nope", Some(&token), None),
        (Method::GET, "/admin", None, None),
        // 405 on an allowed address: the address is judged first.
        (Method::GET, "/admin/login", None, None),
    ];
    let mut failures = Vec::new();

    let login = login_with(&app, Some(&basic(ADMIN_USER, ADMIN_PASSWORD))).await;
    for (method, path, token, body) in requests {
        let reply = call(&app, method, path, token, body).await;
        failures.extend(reply.envelope_problem(403, "permission_error"));
    }

    failures.extend(login.envelope_problem(403, "permission_error"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        login.message().contains("not reachable from this address"),
        "{}",
        login.text
    );
    assert!(login.header("www-authenticate").is_none());
    // Nothing was created, and other routes are not the admin API's to refuse.
    let page = app.store.list_keys(None, 10, None).await.unwrap().unwrap();
    assert!(page.keys.is_empty());
    let health = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn refused_logins_from_outside_take_no_check_slot() {
    let app = app_with_admin_cidrs("10.0.0.0/8").await;

    for _ in 0..=CHECKS_PER_WINDOW {
        let reply = login_with(&app, Some(&basic(ADMIN_USER, "nope"))).await;
        reply.assert_error(403, "permission_error");
    }

    // The lockout item (`LOGINFAIL#<ip>`) was never written.
    use aws_sdk_dynamodb::types::AttributeValue;
    let item = app
        .store
        .client()
        .get_item()
        .table_name(app.store.table())
        .key("pk", AttributeValue::S("LOGINFAIL#127.0.0.1".into()))
        .key("sk", AttributeValue::S("META".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item;
    assert_eq!(item, None);
}

#[tokio::test]
async fn admin_routes_answer_callers_inside_admin_allowed_cidrs() {
    for cidrs in ["127.0.0.0/8", "192.0.2.0/24, 127.0.0.1"] {
        let app = app_with_admin_cidrs(cidrs).await;

        let token = app.admin_token().await.unwrap();
        let created = create(&app, &token, json!({"name": "from inside"})).await;

        assert_eq!(created["name"], "from inside", "{cidrs}");
        let listed = call(&app, Method::GET, "/admin/api-keys", Some(&token), None).await;
        assert_eq!(listed.status, 200, "{cidrs}: {}", listed.text);
    }
}

#[test]
fn admin_allowed_cidrs_parses_blocks_and_addresses_and_refuses_garbage() {
    let parsed =
        AdminConfig::parse_allowed_networks(" 10.1.2.3/8, 192.168.1.7 ,,2001:db8::/32,").unwrap();
    let shown: Vec<String> = parsed.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["10.0.0.0/8", "192.168.1.7/32", "2001:db8::/32"]);
    assert!(
        AdminConfig::parse_allowed_networks("  ")
            .unwrap()
            .is_empty()
    );
    for garbage in [
        "10.0.0.0/33",
        "not-an-ip",
        "10.0.0.0/8;192.168.0.0/16",
        "10.0.0.0/8 192.168.0.0/16",
        "300.1.1.1",
        "10.0.0.0/8,*",
        "10.0.0.0/",
    ] {
        let err = AdminConfig::parse_allowed_networks(garbage).unwrap_err();
        assert_eq!(err.var, "ADMIN_ALLOWED_CIDRS", "{garbage}");
        assert!(err.to_string().contains("ADMIN_ALLOWED_CIDRS"), "{err}");
    }
}

#[test]
fn admin_config_matches_ipv4_mapped_ipv6_callers_as_ipv4() {
    let config = AdminConfig {
        admin_username: ADMIN_USER.into(),
        jwt_ttl: Duration::from_secs(3600),
        allowed_networks: AdminConfig::parse_allowed_networks("10.0.0.0/8").unwrap(),
        refuse_unpriced_models: false,
    };
    let open = AdminConfig {
        allowed_networks: Vec::new(),
        ..config.clone()
    };

    assert!(config.admits("10.1.2.3".parse().unwrap()));
    assert!(config.admits("::ffff:10.1.2.3".parse().unwrap()));
    assert!(!config.admits("::ffff:11.1.2.3".parse().unwrap()));
    assert!(!config.admits("127.0.0.1".parse().unwrap()));
    assert!(open.admits("203.0.113.9".parse().unwrap()));
}

const CIDRS_VAR: &str = "ADMIN_ALLOWED_CIDRS";
/// Set in the child process: what `AdminConfig::from_env` must give there
/// (`error`, or the networks joined by commas).
const FROM_ENV_EXPECTED: &str = "RELAY_TEST_ADMIN_CIDRS_EXPECTED";

/// `AdminConfig::from_env` reads the process environment, which a test may
/// not set (`std::env::set_var` is `unsafe`, forbidden here, and races with
/// other tests), so the test runs itself again in child processes that get
/// the variable, as `make local` and the admin function would.
#[test]
fn admin_config_from_env_reads_admin_allowed_cidrs_and_fails_on_garbage() {
    if let Ok(expected) = std::env::var(FROM_ENV_EXPECTED) {
        let result = AdminConfig::from_env();
        if expected == "error" {
            let err = result.unwrap_err();
            assert_eq!(err.var, CIDRS_VAR, "{err}");
        } else {
            let networks: Vec<String> = result
                .unwrap()
                .allowed_networks
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(networks.join(","), expected);
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let test = "admin::admin_config_from_env_reads_admin_allowed_cidrs_and_fails_on_garbage";
    for (value, expected) in [
        ("garbage", "error"),
        ("10.0.0.0/8,10.0.0.0/33", "error"),
        ("10.0.0.0/8, 127.0.0.1", "10.0.0.0/8,127.0.0.1/32"),
        ("", ""),
    ] {
        let output = std::process::Command::new(&exe)
            .args([test, "--exact", "--test-threads=1"])
            .env(CIDRS_VAR, value)
            .env(FROM_ENV_EXPECTED, expected)
            .env_remove("JWT_TTL_SECONDS")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("test result: ok. 1 passed"),
            "{CIDRS_VAR}={value:?} should give {expected:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
