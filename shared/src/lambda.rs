//! Runs an axum `Router` under the Lambda runtime (buffered or streamed),
//! turning API Gateway's request into the same request the local server
//! hands the router, client address included.

use std::net::IpAddr;

use axum::Router;
use axum::body::Body;
use lambda_http::request::RequestContext;
use lambda_http::{RequestExt, tower::ServiceBuilder};

use crate::http::ClientIp;

/// The source address API Gateway saw (never a client header).
fn source_ip(request: &lambda_http::Request) -> Option<IpAddr> {
    match request.request_context_ref()? {
        RequestContext::ApiGatewayV1(context) => {
            context.identity.source_ip.as_deref()?.parse().ok()
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Converts the Lambda request into a plain HTTP request for the router.
pub fn into_router_request(request: lambda_http::Request) -> http::Request<Body> {
    let ip = source_ip(&request);
    let (mut parts, body) = request.into_parts();
    if let Some(ip) = ip {
        parts.extensions.insert(ClientIp(ip));
    }
    let body = match body {
        lambda_http::Body::Empty => Body::empty(),
        lambda_http::Body::Text(text) => Body::from(text),
        lambda_http::Body::Binary(bytes) => Body::from(bytes),
        _ => Body::empty(),
    };
    http::Request::from_parts(parts, body)
}

/// Serves `router` with buffered responses (admin, usage).
pub async fn run_buffered(router: Router) -> Result<(), lambda_http::Error> {
    let service = ServiceBuilder::new()
        .map_request(into_router_request)
        .service(router);
    lambda_http::run(service).await
}

/// Serves `router` with streamed responses (proxy): bytes reach API Gateway
/// as the upstream produces them.
pub async fn run_streaming(router: Router) -> Result<(), lambda_http::Error> {
    let service = ServiceBuilder::new()
        .map_request(into_router_request)
        .service(router);
    lambda_http::run_with_streaming_response(service).await
}

pub use lambda_http::Error;
