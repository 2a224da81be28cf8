//! HTTP plumbing shared by the functions' routers: the client address,
//! request ids, strict JSON and query extractors, and the fallbacks, all
//! answering in Anthropic's error envelope.

pub mod admin;
pub mod console;
pub mod health;
pub mod key_holder;
pub mod prometheus;
mod setup;
pub mod usage;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, header};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::error::ApiError;

/// The caller's address as the platform saw it: API Gateway's
/// `requestContext.identity.sourceIp` in Lambda, the socket peer locally.
/// Never taken from a client-supplied header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The relay's base URL as the client reached it (API Gateway's domain and
/// stage), set by the Lambda adapter; locally, taken from `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicBase(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        if let Some(ip) = parts.extensions.get::<ClientIp>() {
            return Ok(*ip);
        }
        if let Some(ConnectInfo(addr)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            return Ok(ClientIp(addr.ip()));
        }
        Err(ApiError::internal(anyhow::anyhow!(
            "no client address: the router was served without ConnectInfo or the Lambda adapter"
        )))
    }
}

pub const REQUEST_ID_HEADER: &str = "x-relay-request-id";

/// This request's id, shown to the client and used as the settle key.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Gives every request an id, a tracing span that carries it (and the key
/// id once `key_holder::presented_key` knows it) over every log line of the
/// request, tasks it spawns included, and every response the
/// `x-relay-request-id` header. Applied once, to each composed app.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = format!("relay_{}", uuid::Uuid::new_v4().simple());
    request.extensions_mut().insert(RequestId(id.clone()));
    // At error level, so that a stricter log filter (`RUST_LOG=warn`) keeps
    // the ids on the warnings and errors it lets through.
    let span = tracing::error_span!("request", request_id = %id, key_id = tracing::field::Empty);
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Admin and usage bodies are small; anything larger is a mistake.
pub const MAX_JSON_BODY: usize = 64 * 1024;

/// A JSON body parsed strictly: `application/json` only, at most `LIMIT`
/// bytes, and errors that name the offending field.
pub struct JsonBody<T, const LIMIT: usize = MAX_JSON_BODY>(pub T);

impl<T: DeserializeOwned, S: Send + Sync, const LIMIT: usize> FromRequest<S>
    for JsonBody<T, LIMIT>
{
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "content-type must be application/json".into(),
            ));
        }
        let body = read_limited(request.into_body(), LIMIT).await?;
        // serde would read a struct from an array, field by field in order:
        // our bodies are objects, and anything else is a mistake.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request("request body must be a JSON object"));
        }
        parse_json(&body).map(JsonBody)
    }
}

/// Reads a whole body, refusing (413) one larger than `limit` bytes.
pub async fn read_limited(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(
            format!("request body must be at most {limit} bytes"),
        )),
        Err(err) => Err(ApiError::bad_request(format!(
            "could not read the request body: {err}"
        ))),
    }
}

/// Parses one JSON value filling the whole body (trailing whitespace
/// aside), naming the field path on error (`allowed_ips[1]: …`).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad_request(format!("request body: {inner}"))
        } else {
            ApiError::bad_request(format!("`{path}`: {inner}"))
        }
    })?;
    // Deserializing stops after the first value: `{"name":"x"} trailing`
    // would otherwise be accepted as `{"name":"x"}`. The proxy's
    // `serde_json::from_slice` checks this too.
    deserializer
        .end()
        .map_err(|err| ApiError::bad_request(format!("request body is not valid JSON: {err}")))?;
    Ok(value)
}

/// Query parameters parsed strictly, naming the bad parameter.
pub struct QueryParams<T>(pub T);

/// Routes that take no parameters still refuse unknown ones: a typo such as
/// `/api/usage?days=7` should say so, not answer something else.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(QueryParams)
            .map_err(|err| {
                let path = err.path().to_string();
                let inner = err.into_inner();
                if path == "." {
                    ApiError::bad_request(format!("query string: {inner}"))
                } else {
                    ApiError::bad_request(format!("query parameter `{path}`: {inner}"))
                }
            })
    }
}

/// Page parameters of the lists of owned objects (batches, files), as
/// Anthropic's list routes take them: newest first, `after_id` pages back,
/// `before_id` forward.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageParams {
    limit: Option<usize>,
    after_id: Option<String>,
    before_id: Option<String>,
}

/// The largest page of owned objects.
const MAX_OWNED_PAGE: usize = 100;

impl PageParams {
    /// Parses a query string (the proxy reads it off the request itself).
    pub fn from_query(query: &str) -> Result<PageParams, ApiError> {
        serde_urlencoded::from_str(query)
            .map_err(|e| ApiError::bad_request(format!("query string: {e}")))
    }

    /// The page size and where the page starts.
    pub fn page(&self) -> Result<(usize, crate::store::owned::PageFrom<'_>), ApiError> {
        use crate::store::owned::PageFrom;
        let limit = self.limit.unwrap_or(20);
        if !(1..=MAX_OWNED_PAGE).contains(&limit) {
            return Err(ApiError::bad_request(format!(
                "query parameter `limit` must be between 1 and {MAX_OWNED_PAGE}"
            )));
        }
        let from = match (&self.before_id, &self.after_id) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give `before_id` or `after_id`, not both",
                ));
            }
            (Some(id), None) => PageFrom::Before(id),
            (None, Some(id)) => PageFrom::After(id),
            (None, None) => PageFrom::Newest,
        };
        Ok((limit, from))
    }
}

/// Anthropic's page shape: the objects, whether more follow, and the ids
/// of the first and last.
#[derive(Debug, serde::Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
}

pub fn page_json<T, S: AsRef<str>>(data: Vec<T>, ids: &[S], has_more: bool) -> axum::Json<Page<T>> {
    axum::Json(Page {
        data,
        has_more,
        first_id: ids.first().map(|id| id.as_ref().to_owned()),
        last_id: ids.last().map(|id| id.as_ref().to_owned()),
    })
}

/// The answer when a page's `before_id`/`after_id` is not one of the key's.
pub fn unknown_page_anchor() -> ApiError {
    ApiError::bad_request("`before_id`/`after_id` is not one of this key's")
}

/// Unknown paths on the admin and usage functions.
pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this route".into())
}

/// The bearer token of an `Authorization` header, if that is its scheme.
pub fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}
