//! What every entry point builds once at start: configuration, the store
//! and the secrets, so each function's `main` stays a few lines.

use std::sync::Arc;

use crate::config::{AdminConfig, CommonConfig, ConfigError};
use crate::http::admin::AdminState;
use crate::http::health::HealthState;
use crate::proxy::{ProxyConfig, ProxyState, SettleTiming};
use crate::secrets::Secrets;
use crate::store::Store;
use crate::upstream::{Upstream, UpstreamConfig};

#[derive(Clone)]
pub struct Services {
    pub config: CommonConfig,
    pub store: Store,
    pub secrets: Secrets,
}

impl Services {
    /// Everything from the environment; fails naming the variable at fault.
    pub async fn from_env() -> Result<Services, ConfigError> {
        let config = CommonConfig::from_env()?;
        let secrets = config.secrets().await?;
        Ok(Services::new(config, secrets).await)
    }

    pub async fn new(config: CommonConfig, secrets: Secrets) -> Services {
        let store = Store::connect(&config.table_name, config.dynamodb_endpoint.as_deref()).await;
        Services {
            config,
            store,
            secrets,
        }
    }

    pub fn usage_state(&self) -> crate::http::usage::UsageApiState {
        crate::http::usage::UsageApiState {
            store: self.store.clone(),
        }
    }

    pub fn health_state(&self) -> HealthState {
        HealthState {
            store: self.store.clone(),
            secrets: self.secrets.clone(),
        }
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
            settle_timing,
        ))
    }

    pub fn admin_state(&self, admin: AdminConfig) -> AdminState {
        AdminState {
            store: self.store.clone(),
            secrets: self.secrets.clone(),
            config: Arc::new(admin),
        }
    }
}
