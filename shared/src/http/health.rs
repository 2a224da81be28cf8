//! `GET /health`: whether this function can reach DynamoDB and its secrets.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde::Serialize;

use crate::secrets::Secrets;
use crate::store::Store;

#[derive(Clone)]
pub struct HealthState {
    pub store: Store,
    pub secrets: Secrets,
}

pub fn routes(state: HealthState) -> Router {
    Router::new()
        .route("/health", get(health))
        .with_state(state)
}

/// `GET /health`'s answer: "ok" or "unavailable" for the whole and for
/// each dependency.
#[derive(Debug, Serialize)]
pub struct HealthAnswer {
    pub status: &'static str,
    pub dynamodb: &'static str,
    pub secrets: &'static str,
    pub upstream_key_configured: bool,
}

async fn health(State(state): State<HealthState>) -> Response {
    let (dynamodb, secrets) = tokio::join!(state.store.ping(), state.secrets.current());
    let dynamodb_ok = dynamodb.is_ok();
    let (secrets_ok, upstream_key) = match &secrets {
        Ok(values) => (
            true,
            values
                .upstream_api_key
                .as_deref()
                .is_some_and(|k| !k.is_empty()),
        ),
        Err(_) => (false, false),
    };
    if let Err(err) = &dynamodb {
        tracing::warn!(error = %format!("{err:#}"), "health: DynamoDB unreachable");
    }
    if let Err(err) = &secrets {
        tracing::warn!(error = %format!("{err:#}"), "health: secrets unreadable");
    }
    let ready = dynamodb_ok && secrets_ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(HealthAnswer {
            status: word(ready),
            dynamodb: word(dynamodb_ok),
            secrets: word(secrets_ok),
            upstream_key_configured: upstream_key,
        }),
    )
        .into_response()
}
