//! The Files API through the relay: an upload (streamed to the upstream as
//! it arrives) is owned by the key that sent it; each key lists, reads and
//! deletes only its own files, and may reference only those in requests.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, StatusCode};
use serde_json::Value;

use super::batches::{read_whole, record_owned};
use tracing::Instrument;

use super::context::{Call, too_large};
use super::exchange::{self, Exchange};
use crate::domain::{self, format_timestamp};
use crate::error::ApiError;
use crate::http::{PageParams, page_json, unknown_page_anchor};
use crate::store::owned::FileRecord;
use crate::upstream::{
    ForwardRequest, RetryPolicy, client_response_headers, upstream_request_headers,
};

fn not_found(file_id: &str) -> ApiError {
    let shown: String = file_id.chars().take(100).collect();
    ApiError::not_found(format!("no file `{shown}` for this API key"))
}

/// The key's record of `file_id`, or 404 (whoever else may own it).
async fn owned(call: &Call, file_id: &str) -> Result<FileRecord, ApiError> {
    call.authenticate(None).await?;
    call.state
        .0
        .store
        .file(call.key.id(), file_id)
        .await?
        .ok_or_else(|| not_found(file_id))
}

fn respond(status: StatusCode, headers: &http::HeaderMap, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = client_response_headers(headers);
    response
}

/// `POST /v1/files`: the multipart body streams to the upstream (within the
/// request size limit, counted as it passes); the new file is recorded as
/// the key's before the answer is given, or deleted upstream.
pub(super) async fn upload(call: Call, body: axum::body::Body) -> Result<Response, ApiError> {
    call.authenticate(None).await?;
    let state = call.state.clone();
    let max = state.0.config.max_request_bytes;
    let mut seen = 0usize;
    let over_limit = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&over_limit);
    let counted = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len();
        if seen > max {
            // Failing the stream aborts the upstream request mid-body.
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(std::io::Error::other(
                "upload exceeds the relay's size limit",
            ));
        }
        Ok::<_, std::io::Error>(chunk)
    });
    let mut headers = upstream_request_headers(&call.parts.headers);
    // The relay reads the new file's id from the answer: plain bytes.
    headers.insert(
        http::header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    );
    // The declared length travels with the stream, so the upstream gets the
    // body exactly as sent (not re-chunked).
    if let Some(length) = call.parts.headers.get(http::header::CONTENT_LENGTH) {
        headers.insert(http::header::CONTENT_LENGTH, length.clone());
    }
    // Runs to its end even if the client hangs up once its body is sent (a
    // dropped request future would leave an uploaded file unowned).
    tokio::spawn(
        async move { send_upload(call, headers, counted, over_limit).await }.in_current_span(),
    )
    .await
    .map_err(|e| ApiError::internal(e.into()))?
}

/// Sends an upload and records the new file as the key's before answering.
async fn send_upload(
    call: Call,
    headers: http::HeaderMap,
    body: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    over_limit: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Response, ApiError> {
    let state = call.state.clone();
    let max = state.0.config.max_request_bytes;
    let sent = state
        .0
        .upstream
        .send_streamed(
            Method::POST,
            &call.path,
            call.parts.uri.query(),
            headers,
            body,
        )
        .await;
    let response = match sent {
        _ if over_limit.load(std::sync::atomic::Ordering::Relaxed) => return Err(too_large(max)),
        Ok(response) => response,
        Err(err) => return Err(err.into()),
    };
    let status = response.status;
    let upstream_headers = response.headers.clone();
    let answer = read_whole(response.body, 4 * 1024 * 1024).await;
    if !status.is_success() {
        return Ok(respond(status, &upstream_headers, answer));
    }
    let object: Value = serde_json::from_slice(&answer).map_err(|e| {
        ApiError::internal(anyhow::anyhow!(
            "the upstream's file object is not JSON: {e}"
        ))
    })?;
    let Some(file_id) = object.get("id").and_then(Value::as_str).map(str::to_owned) else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "the upstream's file object has no id"
        )));
    };
    let record = FileRecord {
        file_id: file_id.clone(),
        key_id: call.key.id().clone(),
        recorded_at: format_timestamp(domain::now()),
        object,
    };
    if let Err(err) = record_owned(&state, || state.0.store.record_file(&record)).await {
        // Never left unowned: deleted upstream, and the client told.
        tracing::error!(file_id, error = %format!("{err:#}"), "could not record an upload; deleting it");
        delete_unowned(&call, &file_id).await;
        return Err(ApiError::unavailable(
            "the relay could not record the uploaded file as yours, so it was deleted; retry shortly",
            err.into(),
        ));
    }
    tracing::info!(file_id, "file uploaded");
    Ok(respond(status, &upstream_headers, answer))
}

async fn delete_unowned(call: &Call, file_id: &str) {
    let Ok(path) = crate::domain::route::CanonicalPath::parse(&format!("/v1/files/{file_id}"))
    else {
        return;
    };
    let request = ForwardRequest {
        method: Method::DELETE,
        path,
        query: None,
        headers: upstream_request_headers(&call.parts.headers),
        body: Bytes::new(),
    };
    match call
        .state
        .0
        .upstream
        .send(&request, RetryPolicy::Retryable)
        .await
    {
        Ok(answer) if answer.status.is_success() => {
            tracing::warn!(file_id, "unowned upload deleted")
        }
        Ok(answer) => tracing::error!(
            file_id,
            status = answer.status.as_u16(),
            "unowned upload could not be deleted: delete it by hand"
        ),
        Err(err) => {
            tracing::error!(file_id, error = %err, "unowned upload could not be deleted: delete it by hand")
        }
    }
}

/// `GET /v1/files`: the key's own files, from the relay's records.
pub(super) async fn list(call: Call) -> Result<Response, ApiError> {
    call.authenticate(None).await?;
    let params = PageParams::from_query(call.parts.uri.query().unwrap_or(""))?;
    let (limit, from) = params.page()?;
    let page = call
        .state
        .0
        .store
        .list_files(call.key.id(), from, limit)
        .await?
        .ok_or_else(unknown_page_anchor)?;
    let ids: Vec<String> = page.items.iter().map(|f| f.file_id.clone()).collect();
    let data = page.items.into_iter().map(|f| f.object).collect();
    Ok(page_json(data, &ids, page.has_more).into_response())
}

/// `GET /v1/files/{id}` and `…/content`: forwarded (streamed) for its owner.
pub(super) async fn forward(call: Call, file_id: &str, body: Bytes) -> Result<Response, ApiError> {
    owned(&call, file_id).await?;
    let forward = call.forward(body);
    Ok(exchange::start(Exchange::unmetered(call.state, forward, call.started)).await)
}

/// `DELETE /v1/files/{id}`: forwarded for its owner; the record goes once
/// the upstream has deleted the file.
pub(super) async fn delete(call: Call, file_id: &str) -> Result<Response, ApiError> {
    owned(&call, file_id).await?;
    let response = call
        .state
        .0
        .upstream
        .send(&call.forward(Bytes::new()), RetryPolicy::Retryable)
        .await
        .map_err(ApiError::from)?;
    let status = response.status;
    let headers = response.headers.clone();
    let answer = read_whole(response.body, 4 * 1024 * 1024).await;
    if status.is_success() || status == StatusCode::NOT_FOUND {
        call.state
            .0
            .store
            .delete_file_record(call.key.id(), file_id)
            .await?;
    }
    Ok(respond(status, &headers, answer).into_response())
}
