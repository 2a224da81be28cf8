//! `make local`: every function's router on one port, against DynamoDB
//! Local, exactly as the Lambda binaries serve them; stopped gracefully by
//! SIGINT (Ctrl-C) or SIGTERM (`kill`, systemd, containers) alike.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use rand::distr::{Alphanumeric, SampleString};
use relay_shared::app::App;
use relay_shared::config::{AdminConfig, LocalConfig};
use relay_shared::in_flight::InFlight;
use relay_shared::proxy::{self, SettleTiming};
use relay_shared::secrets::{SecretValues, Secrets};
use relay_shared::store::Store;
use relay_shared::{admin_auth, telemetry};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::oneshot;

/// How long to wait for settlements still running (at shutdown, and before
/// reading the bench stats). Longer than a settlement retries while its
/// host waits (`SETTLE_INLINE_MS`, 3 s by default).
const SETTLEMENTS_WAIT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let local = LocalConfig::from_env()?;
    let port = local.port;
    let admin = AdminConfig::from_env()?;

    // Locally the secrets are variables; a missing admin password or JWT
    // secret gets a random one so `make local` works with no setup.
    let password = local
        .admin_password
        .clone()
        .unwrap_or_else(|| Alphanumeric.sample_string(&mut rand::rng(), 20));
    let secrets = Secrets::fixed(SecretValues {
        upstream_api_key: local.upstream_api_key.clone(),
        upstreams: local.upstreams.clone(),
        admin_password_hash: Some(admin_auth::hash_in_memory_password(&password)?),
        jwt_secret: Some(
            local
                .jwt_secret
                .clone()
                .unwrap_or_else(|| Alphanumeric.sample_string(&mut rand::rng(), 48)),
        ),
    });
    // The bench's stats also count capacity units, which makes every
    // DynamoDB request ask for them: only then.
    let store = if local.debug_stats {
        Store::connect_counting_capacity(&local.table_name, Some(&local.dynamodb_endpoint)).await
    } else {
        Store::connect(&local.table_name, Some(&local.dynamodb_endpoint)).await
    };
    store
        .ensure_table()
        .await
        .context("creating the table in DynamoDB Local")?;
    let app = App::new(store, secrets);

    // A long-lived process: usage is settled after each answer ends, and
    // shutdown waits for the settlements still running.
    let in_flight = InFlight::new();
    let proxy_state = app.proxy_state_from_env(SettleTiming::AfterAnswerEnds(in_flight.clone()))?;
    // What an EventBridge schedule does in AWS: record the usage of ended
    // batches whose results nobody read. Shutdown does not wait for a pass:
    // one cut short is redone whole by the next (`collect` is safe to run
    // any number of times).
    tokio::spawn(proxy::batches::collect_every(
        proxy_state.clone(),
        local.batch_collect_interval,
    ));
    // `make bench` counts DynamoDB calls per request here; off unless asked
    // for, and never part of the Lambda routers.
    let debug_routes = if local.debug_stats {
        debug_stats_routes(app.store().clone(), in_flight.clone())
    } else {
        axum::Router::new()
    };
    // The same routers the Lambda functions serve, on one port.
    let router = app.local_router(admin.clone(), proxy_state, debug_routes);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let base = format!("http://127.0.0.1:{port}");
    if local.upstream_api_key.is_none() && local.upstreams.is_none() {
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
    // Installed before the first connection is accepted, so no answer can
    // lose its usage to a signal's default action; until here a signal
    // kills the process outright (nothing is in flight yet, and a startup
    // stuck on DynamoDB stays stoppable).
    let mut stop_signals = StopSignals::install()?;
    // The first signal starts the graceful stop; a second one ends the
    // process at once, for when an answer in flight would take too long.
    let (stop_started, stop_requested) = oneshot::channel();
    let second_signal = async move {
        let first = stop_signals.next().await;
        tracing::info!(
            signal = first.name(),
            "stopping: no new connections; waiting for the answers in flight and their settlements (a second signal exits at once)"
        );
        let _ = stop_started.send(());
        stop_signals.next().await
    };
    let graceful_stop = async {
        // Stops accepting, then waits until every connection has finished
        // the answer it is writing: streams in flight run to their end.
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = stop_requested.await;
        })
        .await?;
        // Each answer's settlement is counted in `in_flight` before the
        // answer ends, so none can slip past this wait.
        tokio::time::timeout(SETTLEMENTS_WAIT, in_flight.idle())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "stopped with usage settlements still running after {SETTLEMENTS_WAIT:?}"
                )
            })
    };
    tokio::select! {
        stopped = graceful_stop => {
            stopped?;
            tracing::info!("stopped: every answer ended and every settlement ran");
            Ok(())
        }
        second = second_signal => {
            tracing::warn!(
                signal = second.name(),
                "second signal: exiting now; the usage of requests in flight is lost"
            );
            std::process::exit(second.exit_code())
        }
    }
}

/// A signal that stops relay-local.
#[derive(Debug, Clone, Copy)]
enum StopSignal {
    Interrupt,
    Terminate,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }

    /// The shell's convention for a process ended by the signal.
    fn exit_code(self) -> i32 {
        match self {
            StopSignal::Interrupt => 128 + 2,
            StopSignal::Terminate => 128 + 15,
        }
    }
}

/// SIGINT and SIGTERM as one stream, so both stop the server the same way.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// The next SIGINT or SIGTERM (the streams never end while the
    /// handles live, so a `None` is read as the signal itself).
    async fn next(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.interrupt.recv() => StopSignal::Interrupt,
            _ = self.terminate.recv() => StopSignal::Terminate,
        }
    }
}

/// `GET /__relay/stats`: the DynamoDB round trips and capacity units so far.
/// Settlements run after the answer, so the counts are read once they are
/// done.
fn debug_stats_routes(store: Store, in_flight: InFlight) -> axum::Router {
    axum::Router::new().route(
        "/__relay/stats",
        axum::routing::get(move || {
            let store = store.clone();
            let in_flight = in_flight.clone();
            async move {
                let _ = tokio::time::timeout(SETTLEMENTS_WAIT, in_flight.idle()).await;
                let round_trips = store.round_trips();
                let units = store.consumed_capacity().unwrap_or_default();
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    format!(
                        "{{\"dynamodb_round_trips\":{round_trips},\
                         \"dynamodb_read_units\":{},\"dynamodb_write_units\":{}}}",
                        units.read, units.write
                    ),
                )
            }
        }),
    )
}
