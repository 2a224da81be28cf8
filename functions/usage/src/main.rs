//! Lambda entry point of the usage function: `/api/usage*` and `/health`.

use relay_shared::bootstrap::Services;
use relay_shared::{http, lambda, telemetry};

#[tokio::main]
async fn main() -> Result<(), lambda::Error> {
    telemetry::init();
    let services = Services::from_env().await?;
    let router = http::usage::router(services.usage_state())
        .merge(http::health::routes(services.health_state()));
    lambda::run_buffered(router).await
}
