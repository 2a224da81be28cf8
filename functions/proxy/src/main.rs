//! Lambda entry point of the proxy function: `/v1/*` and every other path
//! API Gateway routes to it (the route table decides what is served),
//! answers streamed through API Gateway as they arrive.

use relay_shared::bootstrap::Services;
use relay_shared::lambda::SettleExtension;
use relay_shared::proxy::{self, ProxyConfig, SettleTiming};
use relay_shared::upstream::UpstreamConfig;
use relay_shared::{http, lambda, telemetry};

#[tokio::main]
async fn main() -> Result<(), lambda::Error> {
    telemetry::init();
    let services = Services::from_env().await?;
    let extension = lambda::register_settle_extension().await;
    let settle_timing = extension.as_ref().map_or(
        SettleTiming::BeforeAnswerEnds,
        SettleExtension::settle_timing,
    );
    let state = services.proxy_state(
        UpstreamConfig::from_env()?,
        ProxyConfig::from_env()?,
        settle_timing,
    )?;
    let router = proxy::router(state).merge(http::health::routes(services.health_state()));
    lambda::run_streaming(router, extension).await
}
