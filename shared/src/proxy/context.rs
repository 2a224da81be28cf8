//! The first phase of every proxied request (route and identify), and the
//! context the later phases share: the route decided on the canonical path,
//! the presented key, the caller, the clock, the request id; and the
//! authentication the second phase runs on it.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{Method, StatusCode, header};
use time::OffsetDateTime;

use super::ProxyState;
use super::body;
use crate::domain::client_setup::base_url_problem;
use crate::domain::key::access::Refusal;
use crate::domain::key::{ApiKeyRecord, PresentedKey};
use crate::domain::route::{CanonicalPath, Route, RouteRefusal, is_id_segment, route};
use crate::error::ApiError;
use crate::http::key_holder::{self, Caller, NamedModels, presented_key};
use crate::http::{RequestId, read_limited};
use crate::upstream::{ForwardRequest, upstream_request_headers};

/// One request on its way through the proxy, once its route is known.
pub(crate) struct Call {
    pub(super) state: ProxyState,
    pub(super) parts: http::request::Parts,
    pub(super) path: CanonicalPath,
    pub(super) key: PresentedKey,
    pub(super) ip: IpAddr,
    pub(super) at: OffsetDateTime,
    pub(super) started: Instant,
    pub(super) request_id: String,
    /// The key as this request last saw it, and the models it asks for:
    /// the answer's `x-relay-…` headers (`standing`) are made from it.
    pub(super) seen: Seen,
}

/// The key record a request saw (read, or as its admission left it) and
/// the models it names; shared with the phase that answers.
#[derive(Clone, Default)]
pub(super) struct Seen(Arc<Mutex<Option<SeenKey>>>);

pub(super) struct SeenKey {
    pub record: Arc<ApiKeyRecord>,
    pub models: Vec<String>,
}

impl Seen {
    pub(super) fn saw(&self, record: Arc<ApiKeyRecord>, models: &[&str]) {
        let models = models.iter().map(|m| (*m).to_owned()).collect();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(SeenKey { record, models });
    }

    pub(super) fn take(&self) -> Option<SeenKey> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// What the first phase ends with.
pub(super) enum Begun {
    /// The relay answers itself (`/`'s hello).
    Answered(Response),
    /// A request for a route that needs its key: the context, the route
    /// and the unread body.
    Call(Box<Call>, Route, axum::body::Body),
}

/// Phase 1: decides the route, takes the presented key and refuses a body
/// declared larger than the relay accepts. Nothing is read from the store.
pub(super) fn begin(state: ProxyState, ip: IpAddr, request: Request) -> Result<Begun, ApiError> {
    let started = Instant::now();
    let at = crate::domain::now();
    let (parts, body) = request.into_parts();
    let (route, path) = route(
        &parts.method,
        parts.uri.path(),
        &state.0.config.pass_through,
    )
    .map_err(|refusal| match refusal {
        // The commonest setup mistake says how to fix it.
        RouteRefusal::UnknownPath => match base_url_problem(parts.uri.path()) {
            Some(problem) => ApiError::not_found(problem),
            None => route_refusal(refusal),
        },
        refusal => route_refusal(refusal),
    })?;
    match route {
        Route::Hello => return Ok(Begun::Answered(StatusCode::OK.into_response())),
        Route::Complete => {
            return Err(ApiError::not_found(
                "this relay does not serve the legacy Text Completions API (/v1/complete): its answers carry no usage to meter; use /v1/messages",
            ));
        }
        _ => {}
    }
    // Made once, by the request-id layer the composition root applies.
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .ok_or_else(|| {
            ApiError::internal(anyhow::anyhow!(
                "no request id: the proxy router was served without the request-id layer"
            ))
        })?;
    let key = presented_key(&parts.headers)?;
    let max = state.0.config.max_request_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large(max));
    }
    let call = Call {
        state,
        parts,
        path,
        key,
        ip,
        at,
        started,
        request_id,
        seen: Seen::default(),
    };
    Ok(Begun::Call(Box::new(call), route, body))
}

/// The answer when no route serves a request.
fn route_refusal(refusal: RouteRefusal) -> ApiError {
    match refusal {
        RouteRefusal::BadPath(problem) => {
            ApiError::bad_request(format!("{problem}; send the path in its canonical form"))
        }
        RouteRefusal::UnknownPath => {
            ApiError::not_found("this relay does not serve that path (see its route table)")
        }
        RouteRefusal::MethodNotAllowed(allowed) if allowed.is_empty() => {
            ApiError::MethodNotAllowed("this relay does not serve that method".into())
        }
        RouteRefusal::MethodNotAllowed(allowed) => {
            let allowed: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            ApiError::MethodNotAllowed(format!(
                "method not allowed on this path; use {}",
                allowed.join(" or ")
            ))
        }
    }
}

pub(super) fn too_large(max: usize) -> ApiError {
    ApiError::too_large(format!(
        "request body exceeds the relay's limit of {max} bytes (AWS Lambda's payload limit)"
    ))
}

impl Call {
    /// The whole body, bounded by the relay's payload limit.
    pub(super) async fn read_body(&self, body: axum::body::Body) -> Result<Bytes, ApiError> {
        let max = self.state.0.config.max_request_bytes;
        read_limited(body, max).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(max)
            } else {
                e
            }
        })
    }

    pub(super) fn caller(&self) -> Caller<'_> {
        Caller::of(&self.parts.headers, self.ip)
    }

    /// Phase 3: this request as it goes upstream (same method, path and query).
    pub(super) fn forward(&self, body: Bytes) -> ForwardRequest {
        ForwardRequest {
            method: self.parts.method.clone(),
            path: self.path.clone(),
            query: self.parts.uri.query().map(str::to_owned),
            headers: upstream_request_headers(&self.parts.headers),
            body,
        }
    }

    /// The key's record, read afresh, if it admits this caller and each of
    /// `models` (for requests that name models).
    pub(super) async fn authenticate(
        &self,
        models: NamedModels<'_>,
    ) -> Result<ApiKeyRecord, ApiError> {
        let record = key_holder::authenticate(
            &self.state.0.store,
            &self.key,
            &self.caller(),
            models,
            self.at,
        )
        .await?;
        self.seen.saw(Arc::new(record.clone()), &[]);
        Ok(record)
    }

    /// The access rules (status, expiry, IP, origin, models) on a record
    /// already in hand.
    pub(super) fn check(
        &self,
        record: &ApiKeyRecord,
        models: NamedModels<'_>,
    ) -> Result<(), ApiError> {
        key_holder::admits(record, &self.caller(), models, self.at)
    }

    /// Refuses a body that references a file this key does not own.
    pub(super) async fn check_file_references(&self, body: &[u8]) -> Result<(), ApiError> {
        if !body::may_reference_files(body) {
            return Ok(());
        }
        let ids = body::file_ids(body)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?;
        if ids.is_empty() {
            return Ok(());
        }
        if ids.len() > 1000 {
            return Err(ApiError::bad_request(
                "the request references more than 1000 files",
            ));
        }
        // No upload has an id of another shape: it cannot be this key's.
        if let Some(odd) = ids.iter().find(|id| !is_id_segment(id)) {
            return Err(Refusal::FileNotOwned(odd.clone()).into());
        }
        let unowned = self
            .state
            .0
            .store
            .unowned_files(self.key.id(), &ids)
            .await?;
        match unowned.into_iter().next() {
            Some(id) => Err(Refusal::FileNotOwned(id).into()),
            None => Ok(()),
        }
    }

    /// A client-sent header as recorded in the usage log: text, bounded.
    pub(super) fn header_text(&self, name: &str) -> Option<String> {
        self.parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(256).collect::<String>())
    }
}
