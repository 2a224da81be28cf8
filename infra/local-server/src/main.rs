//! `make local`: every function's router on one port, against DynamoDB
//! Local, exactly as the Lambda binaries serve them.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use rand::distr::{Alphanumeric, SampleString};
use relay_shared::bootstrap::Services;
use relay_shared::config::{AdminConfig, CommonConfig};
use relay_shared::in_flight::InFlight;
use relay_shared::proxy::{self, ProxyConfig, SettleTiming};
use relay_shared::secrets::{SecretValues, Secrets};
use relay_shared::upstream::UpstreamConfig;
use relay_shared::{admin_auth, http, telemetry};

/// How long to wait for settlements still running (at shutdown, and before
/// reading the bench stats).
const SETTLEMENTS_WAIT: Duration = Duration::from_secs(10);

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let port: u16 = env("PORT")
        .map(|p| p.parse().context("PORT must be a port number"))
        .transpose()?
        .unwrap_or(8080);
    if env("DYNAMODB_ENDPOINT").is_none() {
        anyhow::bail!(
            "DYNAMODB_ENDPOINT must be set (make local starts DynamoDB Local and sets it)"
        );
    }
    let common = CommonConfig {
        table_name: env("TABLE_NAME").unwrap_or_else(|| "relay-local".into()),
        dynamodb_endpoint: env("DYNAMODB_ENDPOINT"),
        secret_arn: None,
        secretsmanager_endpoint: None,
        secret_ttl: Duration::from_secs(300),
    };
    let admin = AdminConfig::from_env()?;

    // Locally the secrets are variables; a missing admin password or JWT
    // secret gets a random one so `make local` works with no setup.
    let password =
        env("ADMIN_PASSWORD").unwrap_or_else(|| Alphanumeric.sample_string(&mut rand::rng(), 20));
    let secrets = Secrets::fixed(SecretValues {
        upstream_api_key: env("UPSTREAM_API_KEY"),
        admin_password_hash: Some(admin_auth::hash_in_memory_password(&password)?),
        jwt_secret: Some(
            env("SECRET_KEY").unwrap_or_else(|| Alphanumeric.sample_string(&mut rand::rng(), 48)),
        ),
    });
    let services = Services::new(common, secrets).await;
    services
        .store
        .ensure_table()
        .await
        .context("creating the table in DynamoDB Local")?;

    // A long-lived process: usage is settled after each answer ends, and
    // shutdown waits for the settlements still running.
    let in_flight = InFlight::new();
    let proxy_state = services.proxy_state(
        UpstreamConfig::from_env()?,
        ProxyConfig::from_env()?,
        SettleTiming::AfterAnswerEnds(in_flight.clone()),
    )?;
    // What an EventBridge schedule does in AWS: record the usage of ended
    // batches whose results nobody read.
    let collect_every = Duration::from_secs(
        env("BATCH_COLLECT_INTERVAL_SECONDS")
            .map(|s| {
                s.parse()
                    .context("BATCH_COLLECT_INTERVAL_SECONDS must be a number of seconds")
            })
            .transpose()?
            .unwrap_or(300)
            .max(1),
    );
    tokio::spawn(proxy::batches::collect_every(
        proxy_state.clone(),
        collect_every,
    ));
    // The same routers the Lambda functions serve; the proxy's fallback
    // takes every path the others do not claim, as API Gateway routes them.
    let mut app = http::admin::routes(services.admin_state(admin.clone()))
        .merge(http::usage::routes(services.usage_state()))
        .merge(http::health::routes(services.health_state()))
        .merge(proxy::router(proxy_state));
    // `make bench` counts DynamoDB calls per request here; off unless asked
    // for, and never part of the Lambda routers. Settlements run after the
    // answer, so the count is read once they are done.
    if env("RELAY_DEBUG_STATS").as_deref() == Some("1") {
        let store = services.store.clone();
        let in_flight = in_flight.clone();
        app = app.merge(axum::Router::new().route(
            "/__relay/stats",
            axum::routing::get(move || {
                let store = store.clone();
                let in_flight = in_flight.clone();
                async move {
                    let _ = tokio::time::timeout(SETTLEMENTS_WAIT, in_flight.idle()).await;
                    let round_trips = store.round_trips();
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        format!("{{\"dynamodb_round_trips\":{round_trips}}}"),
                    )
                }
            }),
        ));
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let base = format!("http://127.0.0.1:{port}");
    if env("UPSTREAM_API_KEY").is_none() {
        tracing::warn!("UPSTREAM_API_KEY is not set: proxied requests will get 503 until it is");
    }
    let banner = format!(
        "\nClaude Relay Station is serving on {base}\n\
         admin user:     {user}\n\
         admin password: {password}\n\
         \n\
         Log in and create a key:\n\
         TOKEN=$(curl -s -u '{user}:{password}' -X POST {base}/admin/login | jq -r .access_token)\n\
         curl -s {base}/admin/api-keys -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' -d '{{\"name\":\"my laptop\"}}'\n\
         \n\
         Point Claude Code at it:\n\
         export ANTHROPIC_BASE_URL={base} ANTHROPIC_API_KEY=sk-proxy-…\n",
        user = admin.admin_username,
    );
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(banner.as_bytes())?;
    stdout.flush()?;
    drop(stdout);

    // Without TCP_NODELAY the small last write of a response (the chunked
    // body's terminator, an SSE event) waits for the client's delayed ACK:
    // make bench measured +40 ms per request and 27 ms SSE p99 from it.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    if tokio::time::timeout(SETTLEMENTS_WAIT, in_flight.idle())
        .await
        .is_err()
    {
        tracing::error!("stopped with usage settlements still running");
    }
    Ok(())
}
