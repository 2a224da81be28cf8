//! Lambda entry point of the admin function: `/admin/*`.

use relay_shared::app::App;
use relay_shared::config::AdminConfig;
use relay_shared::{lambda, telemetry};

#[tokio::main]
async fn main() -> Result<(), lambda::Error> {
    telemetry::init();
    let app = App::from_env().await?;
    lambda::run_buffered(app.admin_router(AdminConfig::from_env()?)).await
}
