//! Lambda entry point of the admin function: `/admin/*`.

use relay_shared::bootstrap::Services;
use relay_shared::config::AdminConfig;
use relay_shared::{http, lambda, telemetry};

#[tokio::main]
async fn main() -> Result<(), lambda::Error> {
    telemetry::init();
    let services = Services::from_env().await?;
    let state = services.admin_state(AdminConfig::from_env()?);
    lambda::run_buffered(http::admin::router(state)).await
}
