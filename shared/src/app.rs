//! The composition root: built once from the configuration, the store and
//! the secrets, it composes every router the hosts serve (the three Lambda
//! functions, relay-local, the tests), so all of them run the same routes
//! with the same per-request layers, applied once to each whole app.

use std::sync::Arc;

use axum::Router;

use crate::config::{AdminConfig, CommonConfig, ConfigError, Env, ProxyConfig, UpstreamConfig};
use crate::domain::budget::BudgetPolicy;
use crate::http::admin::AdminState;
use crate::http::health::HealthState;
use crate::http::usage::UsageApiState;
use crate::proxy::{ProxyState, SettleTiming};
use crate::secrets::Secrets;
use crate::store::Store;
use crate::upstream::Upstream;

/// What every function builds once at start: the store and the secrets.
#[derive(Clone)]
pub struct App {
    store: Store,
    secrets: Secrets,
    /// The organisation's default dollar limits and time zone.
    budgets: Arc<BudgetPolicy>,
}

impl App {
    /// Everything from the environment; fails naming the variable at fault.
    pub async fn from_env() -> Result<App, ConfigError> {
        let env = Env::process();
        let config = CommonConfig::read(&env)?;
        let secrets = config.secrets(&env).await?;
        Ok(App::connect(&config, secrets).await)
    }

    /// The store `config` names, with these secrets.
    pub async fn connect(config: &CommonConfig, secrets: Secrets) -> App {
        let store = Store::connect(&config.table_name, config.dynamodb_endpoint.as_deref()).await;
        App::new(store, secrets).with_budgets(config.budgets.clone())
    }

    /// On a store and secrets made elsewhere (relay-local, the tests), with
    /// no default dollar limit, calendar periods in UTC.
    pub fn new(store: Store, secrets: Secrets) -> App {
        App {
            store,
            secrets,
            budgets: Arc::new(BudgetPolicy::default()),
        }
    }

    /// With this organisation default and time zone.
    pub fn with_budgets(self, budgets: BudgetPolicy) -> App {
        App {
            budgets: Arc::new(budgets),
            ..self
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The proxy's state, its configuration from the environment.
    pub fn proxy_state_from_env(&self, settle_timing: SettleTiming) -> anyhow::Result<ProxyState> {
        self.proxy_state(
            UpstreamConfig::from_env()?,
            ProxyConfig::from_env()?,
            settle_timing,
        )
    }

    pub fn proxy_state(
        &self,
        upstream: UpstreamConfig,
        proxy: ProxyConfig,
        settle_timing: SettleTiming,
    ) -> anyhow::Result<ProxyState> {
        let upstream = Upstream::new(upstream, self.secrets.clone())?;
        Ok(ProxyState::new(
            self.store.clone(),
            upstream,
            proxy,
            self.budgets.clone(),
            settle_timing,
        ))
    }

    /// The proxy function: every path API Gateway sends it (the route table
    /// decides what is served), and `/health`.
    pub fn proxy_router(&self, proxy: ProxyState) -> Router {
        whole_app(crate::proxy::router(proxy).merge(self.health_routes()))
    }

    /// The admin function: `/admin/*`, with its own fallbacks.
    pub fn admin_router(&self, config: AdminConfig) -> Router {
        whole_app(crate::http::admin::router(self.admin_state(config)))
    }

    /// The usage function: `/api/usage*` and `/health`.
    pub fn usage_router(&self) -> Router {
        whole_app(crate::http::usage::router(self.usage_state()).merge(self.health_routes()))
    }

    /// Every function on one port, as relay-local (and the tests) serve
    /// them: the proxy's fallback takes every path the others do not claim,
    /// as API Gateway routes them. `extra` is the host's own routes
    /// (relay-local's debug stats), `Router::new()` for none.
    pub fn local_router(&self, admin: AdminConfig, proxy: ProxyState, extra: Router) -> Router {
        whole_app(
            crate::http::admin::routes(self.admin_state(admin))
                .merge(crate::http::usage::routes(self.usage_state()))
                .merge(self.health_routes())
                .merge(crate::proxy::router(proxy))
                .merge(extra),
        )
    }

    fn admin_state(&self, config: AdminConfig) -> AdminState {
        AdminState {
            store: self.store.clone(),
            secrets: self.secrets.clone(),
            config: Arc::new(config),
            budgets: self.budgets.clone(),
        }
    }

    fn usage_state(&self) -> UsageApiState {
        UsageApiState {
            store: self.store.clone(),
            budgets: self.budgets.clone(),
        }
    }

    fn health_routes(&self) -> Router {
        crate::http::health::routes(HealthState {
            store: self.store.clone(),
            secrets: self.secrets.clone(),
        })
    }
}

/// The layers every response of every app gets, once, outermost: its
/// request id (`x-relay-request-id`), fallbacks and `/health` included.
fn whole_app(routes: Router) -> Router {
    routes.layer(axum::middleware::from_fn(crate::http::request_id))
}
