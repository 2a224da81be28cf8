//! The composition root (`relay_shared::app::App`): every app it composes,
//! the three functions' and relay-local's, gives every response one
//! request id, `/health` and fallbacks included.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use relay_shared::app::App;
use relay_shared::config::AdminConfig;
use relay_shared::http::{ClientIp, REQUEST_ID_HEADER};
use relay_shared::proxy::SettleTiming;
use relay_shared::secrets::{SecretValues, Secrets};
use relay_shared::store::Store;
use relay_tests::app::{AppOptions, dynamodb_client, dynamodb_endpoint, spawn_app};
use tower::ServiceExt;

/// The one request id of a response, checked to be the relay's.
fn request_id(headers: &http::HeaderMap) -> String {
    let ids: Vec<_> = headers.get_all(REQUEST_ID_HEADER).iter().collect();
    assert_eq!(ids.len(), 1, "one request id: {headers:?}");
    let id = ids[0].to_str().unwrap().to_owned();
    assert!(id.starts_with("relay_"), "{id}");
    id
}

async fn answer(router: &Router, method: &str, path: &str) -> (u16, String) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .unwrap();
    request
        .extensions_mut()
        .insert(ClientIp("203.0.113.7".parse().unwrap()));
    let response = router.clone().oneshot(request).await.unwrap();
    (response.status().as_u16(), request_id(response.headers()))
}

/// The three functions' apps on a fresh table, as their mains build them.
async fn function_apps() -> (Router, Router, Router) {
    let table = format!("relay-composition-{}", uuid::Uuid::new_v4().simple());
    let store = Store::new(dynamodb_client(&dynamodb_endpoint().unwrap()), table);
    store.ensure_table().await.unwrap();
    let app = App::new(
        store,
        Secrets::fixed(SecretValues {
            upstream_api_key: Some("sk-ant-test".into()),
            upstreams: None,
            admin_password_hash: None,
            jwt_secret: None,
        }),
    );
    let options = AppOptions::default();
    let mut upstream = options.upstream.clone();
    upstream.base_url = "http://127.0.0.1:9".into();
    let proxy = app
        .proxy_state(upstream, options.proxy, SettleTiming::BeforeAnswerEnds)
        .unwrap();
    let admin = app.admin_router(AdminConfig {
        admin_username: "admin".into(),
        jwt_ttl: Duration::from_secs(3600),
        allowed_networks: Vec::new(),
        refuse_unpriced_models: false,
    });
    (app.proxy_router(proxy), admin, app.usage_router())
}

#[tokio::test]
async fn health_answers_with_a_request_id_on_every_app_that_serves_it() {
    let (proxy, _, usage) = function_apps().await;
    for router in [&proxy, &usage] {
        let (status, _) = answer(router, "GET", "/health").await;
        assert_eq!(status, 200);
    }

    let app = spawn_app().await.unwrap();
    let response = app.http.get(app.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    request_id(response.headers());
}

#[tokio::test]
async fn every_function_app_gives_each_answer_one_request_id() {
    let (proxy, admin, usage) = function_apps().await;
    // Routes, refusals and fallbacks alike.
    for (router, method, path, expected) in [
        (&proxy, "HEAD", "/", 200),
        (&proxy, "POST", "/v1/messages", 401),
        (&proxy, "GET", "/nowhere", 404),
        (&admin, "GET", "/admin/api-keys", 401),
        (&admin, "GET", "/admin/nowhere", 404),
        (&admin, "GET", "/nowhere", 404),
        (&usage, "GET", "/api/usage", 401),
        (&usage, "GET", "/nowhere", 404),
        (&usage, "DELETE", "/health", 405),
    ] {
        let (status, _) = answer(router, method, path).await;
        assert_eq!(status, expected, "{method} {path}");
    }
    let (_, first) = answer(&usage, "GET", "/health").await;
    let (_, second) = answer(&usage, "GET", "/health").await;
    assert_ne!(first, second, "each request its own id");
}
