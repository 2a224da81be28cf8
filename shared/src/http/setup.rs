//! `GET /api/usage/setup`: a key holder's self-check. What the relay saw of
//! the request (credential headers, client and version), the key's limits
//! and what is left, the environment to set for Claude Code, and what
//! looks wrong; JSON, or text for a terminal (`Accept: text/plain`). The
//! rules are `domain::client_setup`'s.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, header};
use serde::Serialize;

use super::usage::{KeyHolder, QuotaView, UsageApiState, quota_view};
use super::{NoParams, PublicBase, QueryParams};
use crate::domain::budget::usd;
use crate::domain::client_setup::{
    ClientSeen, Credential, CredentialsSeen, client_of, environment, warnings,
};
use crate::domain::format_timestamp;
use crate::domain::key::PresentedKey;
use crate::error::ApiError;

#[derive(Debug, Serialize)]
pub struct SetupView {
    pub key: SetupKey,
    pub seen: SetupSeen,
    /// The key's limits and what is left (as `GET /api/usage/quota`).
    pub quota: QuotaView,
    /// What to set for Claude Code, in order.
    pub environment: Vec<EnvironmentLine>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SetupKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub is_active: bool,
    pub expires_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SetupSeen {
    /// `x-api-key` and/or `authorization`.
    pub auth_headers: Vec<&'static str>,
    /// The client and version its `User-Agent` names, when it names one.
    pub client: Option<ClientView>,
}

#[derive(Debug, Serialize)]
pub struct ClientView {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Serialize)]
pub struct EnvironmentLine {
    pub name: &'static str,
    pub value: String,
}

pub(super) async fn setup(
    State(state): State<UsageApiState>,
    KeyHolder(key): KeyHolder,
    base: Option<axum::Extension<PublicBase>>,
    headers: HeaderMap,
    QueryParams(NoParams {}): QueryParams<NoParams>,
) -> Result<Response, ApiError> {
    let seen = credentials_seen(&headers);
    let base = match base {
        Some(axum::Extension(PublicBase(base))) => base,
        None => local_base(&headers),
    };
    let view = SetupView {
        key: SetupKey {
            id: key.id.to_string(),
            name: key.name.clone(),
            prefix: key.prefix.clone(),
            is_active: key.is_active,
            expires_at: key.expires_at.map(format_timestamp),
        },
        seen: SetupSeen {
            auth_headers: [
                seen.api_key.map(|_| "x-api-key"),
                seen.bearer.map(|_| "authorization"),
            ]
            .into_iter()
            .flatten()
            .collect(),
            client: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .and_then(client_of)
                .map(|ClientSeen { name, version }| ClientView { name, version }),
        },
        quota: quota_view(&state.store, &state.budgets, &key.id).await?,
        environment: environment(&base, &key.prefix)
            .into_iter()
            .map(|(name, value)| EnvironmentLine { name, value })
            .collect(),
        warnings: warnings(&seen),
    };
    let wants_text = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/plain") && !accept.contains("json"));
    Ok(if wants_text {
        (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            as_text(&view),
        )
            .into_response()
    } else {
        Json(view).into_response()
    })
}

/// Which credential headers carried this relay's key, and which something else.
fn credentials_seen(headers: &HeaderMap) -> CredentialsSeen {
    let credential = |value: &str| match PresentedKey::parse(value.trim()) {
        Ok(_) => Credential::RelayKey,
        Err(_) => Credential::Other,
    };
    CredentialsSeen {
        api_key: headers
            .get("x-api-key")
            .map(|v| credential(v.to_str().unwrap_or(""))),
        bearer: headers.get(header::AUTHORIZATION).map(|v| {
            let value = v.to_str().unwrap_or("");
            match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => credential(token),
                _ => Credential::Other,
            }
        }),
    }
}

/// Locally there is no API Gateway: the `Host` the client used.
fn local_base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|host| {
            host.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1:8080");
    format!("http://{host}")
}

/// The view for a terminal.
fn as_text(view: &SetupView) -> String {
    let mut out = String::from("Claude Relay Station: setup check\n\n");
    let state = if view.key.is_active {
        "active"
    } else {
        "disabled"
    };
    out.push_str(&format!(
        "key       {} \"{}\" ({state}, {} limits)\n",
        view.key.prefix,
        view.key.name.replace(['\n', '\r'], " "),
        view.quota.limit_mode
    ));
    if let Some(client) = &view.seen.client {
        out.push_str(&format!("client    {} {}\n", client.name, client.version));
    }
    out.push_str(&format!(
        "sent      {}\n",
        view.seen.auth_headers.join(", ")
    ));
    let quota = &view.quota;
    match quota.token_limit {
        Some(limit) => out.push_str(&format!(
            "tokens    {} of {limit} used\n",
            quota.tokens_used
        )),
        None => out.push_str(&format!(
            "tokens    {} used (no limit)\n",
            quota.tokens_used
        )),
    }
    for budget in &quota.budgets {
        out.push_str(&format!(
            "budget    {}: ${} of ${} left{}\n",
            budget.limit.window,
            usd(budget.remaining_micro_usd),
            usd(budget.limit.limit_micro_usd),
            budget
                .resets_at
                .as_deref()
                .map(|at| format!(", resets {at}"))
                .unwrap_or_default()
        ));
    }
    out.push_str("\nSet for Claude Code:\n");
    for line in &view.environment {
        out.push_str(&format!("  export {}={}\n", line.name, line.value));
    }
    if !view.warnings.is_empty() {
        out.push_str("\nWarnings:\n");
        for warning in &view.warnings {
            out.push_str(&format!("  - {warning}\n"));
        }
    }
    out
}
