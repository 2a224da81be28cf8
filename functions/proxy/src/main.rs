//! Lambda entry point of the proxy function: `/v1/*` and every other path
//! API Gateway routes to it (the route table decides what is served),
//! answers streamed through API Gateway as they arrive.

use relay_shared::app::App;
use relay_shared::lambda::SettleExtension;
use relay_shared::proxy::SettleTiming;
use relay_shared::{lambda, telemetry};

#[tokio::main]
async fn main() -> Result<(), lambda::Error> {
    telemetry::init();
    let app = App::from_env().await?;
    let extension = lambda::register_settle_extension().await;
    let settle_timing = extension.as_ref().map_or(
        SettleTiming::BeforeAnswerEnds,
        SettleExtension::settle_timing,
    );
    let proxy = app.proxy_state_from_env(settle_timing)?;
    lambda::run_streaming(app.proxy_router(proxy), extension).await
}
