//! Secret values (upstream key or upstream list, admin password hash, JWT
//! secret): from Secrets Manager in AWS, cached with a TTL and re-read on
//! demand; from environment variables locally.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::domain::upstream_pool::{self, PoolError, UpstreamPool};

/// The secret's JSON document. Missing members are allowed so one secret can
/// serve functions that need only some of them.
#[derive(Clone, Default, Deserialize)]
pub struct SecretValues {
    #[serde(default)]
    pub upstream_api_key: Option<String>,
    /// The upstream pool as written (`domain::upstream_pool`'s JSON list),
    /// validated by [`SecretValues::upstream_pool`] at each use rather than
    /// here, so a mistake in it names its entry and field and does not
    /// stop the admin password or JWT secret from being read.
    #[serde(default)]
    pub upstreams: Option<serde_json::Value>,
    #[serde(default)]
    pub admin_password_hash: Option<String>,
    #[serde(default)]
    pub jwt_secret: Option<String>,
}

impl SecretValues {
    /// The upstreams these values configure: the `upstreams` list when
    /// there is one (it wins over `upstream_api_key`, which is then
    /// ignored: `single_key_ignored`), else `upstream_api_key` as one
    /// Anthropic upstream named `anthropic` at `default_base_url`
    /// (`UPSTREAM_BASE_URL`). `Ok(None)`: no upstream configured. Each read
    /// of the secret gives new values, so the pool follows the secret; a
    /// caller that keeps the pool rebuilds it when the `Arc<SecretValues>`
    /// it came from is replaced.
    pub fn upstream_pool(&self, default_base_url: &str) -> Result<Option<UpstreamPool>, PoolError> {
        upstream_pool::pool_from(
            self.upstreams.as_ref(),
            self.upstream_api_key.as_deref(),
            default_base_url,
        )
    }
}

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValues(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("Secrets Manager unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("secret {arn} is not a JSON object of strings")]
    Malformed {
        arn: String,
        #[source]
        source: serde_json::Error,
    },
}

/// By default a forced re-read happens at most this often, however many
/// 401s arrive at once.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

enum Source {
    Fixed(Arc<SecretValues>),
    Manager {
        client: aws_sdk_secretsmanager::Client,
        arn: String,
        ttl: Duration,
        min_refresh: Duration,
        cache: Mutex<Option<(Instant, Arc<SecretValues>)>>,
    },
}

/// Cheap to clone; all clones share the cache.
#[derive(Clone)]
pub struct Secrets(Arc<Source>);

impl Secrets {
    pub fn fixed(values: SecretValues) -> Secrets {
        Secrets(Arc::new(Source::Fixed(Arc::new(values))))
    }

    /// Reads `arn` from Secrets Manager (at `endpoint` when given, e.g. a
    /// local emulator), keeps it for `ttl`, and re-reads on demand at most
    /// every `min_refresh`.
    pub async fn from_secrets_manager(
        arn: &str,
        endpoint: Option<&str>,
        ttl: Duration,
        min_refresh: Duration,
    ) -> Secrets {
        let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let mut config = aws_sdk_secretsmanager::config::Builder::from(&sdk);
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        Secrets(Arc::new(Source::Manager {
            client: aws_sdk_secretsmanager::Client::from_conf(config.build()),
            arn: arn.to_owned(),
            ttl,
            min_refresh,
            cache: Mutex::new(None),
        }))
    }

    /// The current values, from the cache while it is fresh.
    pub async fn current(&self) -> Result<Arc<SecretValues>, SecretsError> {
        self.load(false).await
    }

    /// Re-reads the secret (the upstream answered 401: the key may have been
    /// rotated), unless it was read moments ago.
    pub async fn refresh(&self) -> Result<Arc<SecretValues>, SecretsError> {
        self.load(true).await
    }

    async fn load(&self, force: bool) -> Result<Arc<SecretValues>, SecretsError> {
        let (client, arn, ttl, min_refresh, cache) = match self.0.as_ref() {
            Source::Fixed(values) => return Ok(values.clone()),
            Source::Manager {
                client,
                arn,
                ttl,
                min_refresh,
                cache,
            } => (client, arn, *ttl, *min_refresh, cache),
        };
        // Holding the lock across the read makes concurrent callers wait for
        // one fetch instead of all fetching.
        let mut cached = cache.lock().await;
        if let Some((read_at, values)) = cached.as_ref() {
            let age = read_at.elapsed();
            if age < ttl && (!force || age < min_refresh) {
                return Ok(values.clone());
            }
        }
        let output = client
            .get_secret_value()
            .secret_id(arn)
            .send()
            .await
            .map_err(|e| {
                SecretsError::Unavailable(anyhow::Error::msg(
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e).to_string(),
                ))
            })?;
        let text = output.secret_string().unwrap_or("{}");
        let values: SecretValues =
            serde_json::from_str(text).map_err(|source| SecretsError::Malformed {
                arn: arn.clone(),
                source,
            })?;
        let values = Arc::new(values);
        *cached = Some((Instant::now(), values.clone()));
        Ok(values)
    }
}
