//! Lambda entry point of the usage function: `/api/usage*` and `/health`.

use relay_shared::app::App;
use relay_shared::{lambda, telemetry};

#[tokio::main]
async fn main() -> Result<(), lambda::Error> {
    telemetry::init();
    let app = App::from_env().await?;
    lambda::run_buffered(app.usage_router()).await
}
