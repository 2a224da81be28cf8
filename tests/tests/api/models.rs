//! Model discovery (`GET /v1/models`, as Claude Code's gateway discovery
//! asks for it) and admin-defined aliases: what each key is offered, and
//! an alias forwarded as its model and recorded as both names.

use relay_tests::app::{TestApp, spawn_app, text};
use serde_json::{Value, json};

const SONNET: &str = "claude-sonnet-4-5-20250929";
const OPUS: &str = "claude-opus-4-1-20250805";
const HAIKU: &str = "claude-haiku-4-5-20251001";

async fn put_aliases(app: &TestApp, aliases: Value) -> reqwest::Response {
    let token = app.admin_token().await.unwrap();
    app.http
        .put(app.url("/admin/model-aliases"))
        .bearer_auth(token)
        .json(&json!({ "aliases": aliases }))
        .send()
        .await
        .unwrap()
}

async fn team_aliases(app: &TestApp) {
    let response = put_aliases(
        app,
        json!([
            {"alias": "claude-team", "model": SONNET, "display_name": "Team default (Sonnet)"},
            {"alias": "claude-big", "model": OPUS},
        ]),
    )
    .await;
    assert_eq!(response.status(), 200);
}

async fn listed(app: &TestApp, key: &str, query: &str) -> Value {
    let response = app
        .http
        .get(app.url(&format!("/v1/models{query}")))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn ids(list: &Value) -> Vec<&str> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}

fn upstream_list_reads(app: &TestApp) -> usize {
    app.upstream
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/models")
        .count()
}

#[tokio::test]
async fn each_key_is_offered_exactly_the_models_and_aliases_it_may_use() {
    let app = spawn_app().await.unwrap();
    team_aliases(&app).await;
    let (_, limited) = app
        .new_key_with(json!({"name": "limited", "allowed_models": ["claude-sonnet-*", HAIKU]}))
        .await
        .unwrap();
    let (_, open) = app.new_key().await.unwrap();

    // As Claude Code's discovery asks.
    let list = listed(&app, &limited, "?limit=1000").await;
    assert_eq!(
        ids(&list),
        ["claude-team", "claude-sonnet-5-5", HAIKU, SONNET]
    );
    assert_eq!(list["data"][0]["display_name"], "Team default (Sonnet)");
    assert_eq!(list["data"][0]["type"], "model");
    assert_eq!(list["data"][0]["created_at"], "2025-09-29T00:00:00Z");
    assert_eq!(list["has_more"], false);
    assert_eq!(
        (&list["first_id"], &list["last_id"]),
        (&json!("claude-team"), &json!(SONNET))
    );
    let list = listed(&app, &open, "?limit=1000").await;
    assert_eq!(
        ids(&list),
        [
            "claude-team",
            "claude-big",
            "claude-opus-5-5",
            "claude-sonnet-5-5",
            "claude-haiku-5-5",
            HAIKU,
            SONNET,
            OPUS
        ]
    );
    assert_eq!(list["data"][1]["display_name"], "claude-big");
    assert_eq!(upstream_list_reads(&app), 1, "the upstream's list is kept");

    // Paged as Anthropic pages (the SDKs' default is 20 per page).
    let first = listed(&app, &open, "?limit=2").await;
    assert_eq!(
        (ids(&first), &first["has_more"]),
        (vec!["claude-team", "claude-big"], &json!(true))
    );
    let next = listed(&app, &open, "?limit=2&after_id=claude-big").await;
    assert_eq!(ids(&next), ["claude-opus-5-5", "claude-sonnet-5-5"]);
    let back = listed(&app, &open, &format!("?limit=2&before_id={SONNET}")).await;
    assert_eq!(ids(&back), ["claude-haiku-5-5", HAIKU]);
    let bad = app
        .http
        .get(app.url("/v1/models?limit=0"))
        .header("x-api-key", &open)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // One model: an alias is found, a model the key may not use is not.
    let one = |key: &str, id: &str| {
        app.http
            .get(app.url(&format!("/v1/models/{id}")))
            .header("x-api-key", key)
            .send()
    };
    let alias = one(&limited, "claude-team").await.unwrap();
    assert_eq!(alias.status(), 200);
    assert_eq!(alias.json::<Value>().await.unwrap()["id"], "claude-team");
    for hidden in ["claude-big", OPUS, "claude-nonesuch"] {
        let response = one(&limited, hidden).await.unwrap();
        assert_eq!(response.status(), 404, "{hidden}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "not_found_error", "{hidden}");
    }
    assert_eq!(one(&open, OPUS).await.unwrap().status(), 200);
    assert_eq!(upstream_list_reads(&app), 1);
}

#[tokio::test]
async fn an_alias_reaches_the_upstream_as_its_model_and_is_recorded_as_both_names() {
    let app = spawn_app().await.unwrap();
    team_aliases(&app).await;
    let (id, key) = app.new_key().await.unwrap();
    let body = json!({
        "model": "claude-team",
        "max_tokens": 64,
        "metadata": {"model": "claude-team"},
        "messages": [{"role": "user", "content": "which \"model\": \"claude-team\"?"}]
    });
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["model"], SONNET);
    let sent = app.upstream.requests();
    let sent = sent.iter().find(|r| r.path == "/v1/messages").unwrap();
    let mut expected = body.clone();
    expected["model"] = json!(SONNET);
    // Only the top-level model changed: the rest as the client wrote it.
    assert_eq!(sent.json().unwrap(), expected);
    let logs = app.wait_for_logs(&id, 1).await.unwrap();
    assert_eq!(text(&logs[0], "model"), Some(SONNET));
    assert_eq!(text(&logs[0], "requested_model"), Some("claude-team"));

    // The key holder's log shows both names.
    let log: Value = app
        .http
        .get(app.url("/api/usage/logs"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["data"][0]["model"], SONNET);
    assert_eq!(log["data"][0]["requested_model"], "claude-team");

    // A model named by its own id is recorded once.
    assert_eq!(app.message(&key, HAIKU).send().await.unwrap().status(), 200);
    let logs = app.wait_for_logs(&id, 2).await.unwrap();
    let haiku = logs
        .iter()
        .find(|l| text(l, "model") == Some(HAIKU))
        .unwrap();
    assert_eq!(text(haiku, "requested_model"), None);

    // count_tokens resolves it too.
    let count = app
        .http
        .post(app.url("/v1/messages/count_tokens"))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-big", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(count.status(), 200);
    let counted = app.upstream.requests();
    let counted = counted
        .iter()
        .find(|r| r.path == "/v1/messages/count_tokens")
        .unwrap();
    assert_eq!(counted.json().unwrap()["model"], OPUS);
}

#[tokio::test]
async fn an_alias_never_opens_a_model_the_key_may_not_use() {
    let app = spawn_app().await.unwrap();
    team_aliases(&app).await;
    let (_, key) = app
        .new_key_with(json!({"name": "haiku only", "allowed_models": ["claude-haiku-*"]}))
        .await
        .unwrap();
    // An alias whose own name the allowlist's pattern would match.
    let response = put_aliases(
        &app,
        json!([{"alias": "claude-haiku-deluxe", "model": OPUS}]),
    )
    .await;
    assert_eq!(response.status(), 200);
    for model in ["claude-team", "claude-big", "claude-haiku-deluxe"] {
        let response = app.message(&key, model).send().await.unwrap();
        assert_eq!(response.status(), 403, "{model}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "permission_error", "{model}");
    }
    assert!(
        app.upstream
            .requests()
            .iter()
            .all(|r| r.path != "/v1/messages"),
        "nothing refused reaches the upstream"
    );
    assert_eq!(app.message(&key, HAIKU).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn admins_read_and_replace_the_aliases_and_bad_lists_are_refused_by_field() {
    let app = spawn_app().await.unwrap();
    let token = app.admin_token().await.unwrap();
    let get = || async {
        app.http
            .get(app.url("/admin/model-aliases"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert_eq!(get().await, json!({"aliases": [], "updated_at": null}));
    team_aliases(&app).await;
    let stored = get().await;
    assert_eq!(stored["aliases"][0]["alias"], "claude-team");
    assert_eq!(
        stored["aliases"][1],
        json!({"alias": "claude-big", "model": OPUS})
    );
    assert!(stored["updated_at"].is_string());

    for (aliases, field) in [
        (
            json!([{"alias": "a", "model": "b"}, {"alias": "b", "model": SONNET}]),
            "aliases[0].model",
        ),
        (
            json!([{"alias": "x y", "model": SONNET}]),
            "aliases[0].alias",
        ),
        (
            json!([{"alias": "x", "model": SONNET}, {"alias": "x", "model": OPUS}]),
            "aliases[1].alias",
        ),
        (
            json!([{"alias": "x", "model": SONNET, "display_name": ""}]),
            "aliases[0].display_name",
        ),
    ] {
        let response = put_aliases(&app, aliases.clone()).await;
        assert_eq!(response.status(), 422, "{aliases}");
        let body: Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{field}: {message}");
    }
    let unknown = put_aliases(&app, json!([{"alias": "x", "model": SONNET, "target": 1}])).await;
    assert!(unknown.status().is_client_error());
    // Refused lists changed nothing.
    assert_eq!(get().await, stored);
    // Without a token: refused.
    let anonymous = app
        .http
        .get(app.url("/admin/model-aliases"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(put_aliases(&app, json!([])).await.status(), 200);
    assert_eq!(get().await["aliases"], json!([]));
}

#[tokio::test]
async fn a_batch_request_naming_an_alias_is_created_upstream_with_its_model() {
    let app = spawn_app().await.unwrap();
    // One alias the allowlist's pattern would admit by its own name.
    let aliases = json!([
        {"alias": "claude-team", "model": SONNET},
        {"alias": "claude-sonnet-max", "model": OPUS},
    ]);
    assert_eq!(put_aliases(&app, aliases).await.status(), 200);
    let (_, key) = app
        .new_key_with(json!({"name": "sonnet only", "allowed_models": ["claude-sonnet-*"]}))
        .await
        .unwrap();
    let request = |id: &str, model: &str| {
        json!({"custom_id": id, "params": {
            "model": model, "max_tokens": 16,
            "metadata": {"model": "claude-team"},
            "messages": [{"role": "user", "content": "\"model\": \"claude-team\""}]}})
    };
    let body = json!({"requests": [
        request("a", "claude-team"),
        request("b", SONNET),
        request("c", "claude-team"),
    ]});
    let create = |body: Value| {
        app.http
            .post(app.url("/v1/messages/batches"))
            .header("x-api-key", &key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
    };
    let response = create(body.clone()).await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let sent = app.upstream.requests();
    let sent = sent
        .iter()
        .find(|r| r.method == "POST" && r.path == "/v1/messages/batches")
        .unwrap();
    let mut expected = body;
    for index in [0, 2] {
        expected["requests"][index]["params"]["model"] = json!(SONNET);
    }
    // Only each aliased request's model changed.
    assert_eq!(sent.json().unwrap(), expected);

    // An alias to a model the key may not use is refused, nothing forwarded.
    app.upstream.clear_requests();
    let refused =
        create(json!({"requests": [request("a", SONNET), request("b", "claude-sonnet-max")]}))
            .await
            .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(app.upstream.requests().is_empty());
}
