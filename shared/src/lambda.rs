//! Runs an axum `Router` under the Lambda runtime (buffered or streamed),
//! turning API Gateway's request into the same request the local server
//! hands the router, client address included.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use lambda_http::RequestExt;
use lambda_http::request::RequestContext;
use tower::{ServiceBuilder, ServiceExt};

use crate::http::ClientIp;
use crate::in_flight::{Busy, InFlight};
use crate::proxy::SettleTiming;

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

/// The stage name template.yaml's batch-collector schedule puts in its
/// event. Clients cannot choose the stage API Gateway reports (it is the
/// deployed stage, which the template's StageName pattern keeps free of
/// `-`), and only API Gateway and that schedule may invoke the proxy, so a
/// request carrying it was made by the schedule (or by someone able to
/// create stages on the API).
pub const SCHEDULE_STAGE: &str = "relay-schedule";

fn is_scheduled(request: &lambda_http::Request) -> bool {
    match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(context)) => {
            context.stage.as_deref() == Some(SCHEDULE_STAGE)
        }
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The base URL the client used: API Gateway's domain, and whatever the
/// path it saw has before the path the router gets (the stage, or a custom
/// domain's base path).
fn public_base(request: &lambda_http::Request) -> Option<String> {
    match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(context)) => {
            let domain = context.domain_name.as_deref()?;
            let seen = context.path.as_deref().unwrap_or("");
            let prefix = seen
                .strip_suffix(request.uri().path())
                .unwrap_or("")
                .trim_end_matches('/');
            Some(format!("https://{domain}{prefix}"))
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Converts the Lambda request into a plain HTTP request for the router.
pub fn into_router_request(request: lambda_http::Request) -> http::Request<Body> {
    let ip = source_ip(&request);
    let scheduled = is_scheduled(&request);
    let base = public_base(&request);
    let (mut parts, body) = request.into_parts();
    if let Some(base) = base {
        parts.extensions.insert(crate::http::PublicBase(base));
    }
    if let Some(ip) = ip {
        parts.extensions.insert(ClientIp(ip));
    }
    if scheduled {
        parts
            .extensions
            .insert(crate::proxy::batches::ScheduledInvocation);
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
pub async fn run_buffered(router: Router) -> Result<(), Error> {
    let service = ServiceBuilder::new()
        .map_request(into_router_request)
        .service(router);
    lambda_http::run(service).await
}

/// How long after Lambda announces an invocation its handler must have
/// begun before the extension stops waiting for it (one the runtime could
/// not parse never begins). Handlers begin within milliseconds.
const ANSWER_START_WITHIN: Duration = Duration::from_secs(2);

/// The registered "relay-settle" extension: its event loop, to run beside
/// the runtime, and the tally of answers and settlements it waits for.
pub struct SettleExtension {
    events: Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>,
    in_flight: InFlight,
}

impl SettleExtension {
    /// The proxy settles after each answer, counted where this extension
    /// looks.
    pub fn settle_timing(&self) -> SettleTiming {
        SettleTiming::AfterAnswerEnds(self.in_flight.clone())
    }
}

/// Registers the internal "relay-settle" extension. Lambda freezes the
/// environment only once the runtime *and* every extension ask for the next
/// event; the extension asks only when the invocation's answer and the
/// settlement it owes are done. So the client's answer ends first, and the
/// settle transaction runs after it without being frozen mid-write.
///
/// Must run before the runtime's first poll. `None` (with a warning) where
/// the Extensions API is missing: the proxy then settles before each answer
/// ends instead.
pub async fn register_settle_extension() -> Option<SettleExtension> {
    let in_flight = InFlight::new();
    let waiter = in_flight.clone();
    let events = lambda_extension::service_fn(move |event: lambda_extension::LambdaEvent| {
        let in_flight = waiter.clone();
        async move {
            if let lambda_extension::NextEvent::Invoke(_) = event.next {
                in_flight.invocation_done(ANSWER_START_WITHIN).await;
            }
            Ok::<(), Error>(())
        }
    });
    let registered = lambda_extension::Extension::new()
        .with_extension_name("relay-settle")
        .with_events(&["INVOKE"])
        .with_events_processor(events)
        .register()
        .await;
    match registered {
        Ok(extension) => {
            tracing::info!("settle extension registered: usage is settled after each answer ends");
            Some(SettleExtension {
                events: Box::pin(extension.run()),
                in_flight,
            })
        }
        Err(err) => {
            tracing::warn!(error = %err, "no settle extension: usage is settled before each answer ends");
            None
        }
    }
}

/// A response body that counts as an answer in flight until it is dropped
/// (the runtime drops it once streamed, or when the stream fails).
struct AnswerBody {
    body: Body,
    _answer: Busy,
}

impl http_body::Body for AnswerBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `router` with streamed responses (proxy): bytes reach API Gateway
/// as the upstream produces them. With the settle extension, each answer
/// is counted in `in_flight` from the moment its request arrives until its
/// body is gone, which is what the extension waits for.
pub async fn run_streaming(
    router: Router,
    settle_extension: Option<SettleExtension>,
) -> Result<(), Error> {
    let Some(SettleExtension { events, in_flight }) = settle_extension else {
        let service = ServiceBuilder::new()
            .map_request(into_router_request)
            .service(router);
        return lambda_http::run_with_streaming_response(service).await;
    };
    let service = tower::service_fn(move |request: lambda_http::Request| {
        let answer = in_flight.answer();
        let call = router.clone().oneshot(into_router_request(request));
        async move {
            let response = call.await?;
            Ok::<_, Infallible>(response.map(|body| AnswerBody {
                body,
                _answer: answer,
            }))
        }
    });
    let runtime = lambda_http::run_with_streaming_response(service);
    tokio::try_join!(events, runtime).map(|_| ())
}

pub use lambda_http::Error;
