//! DynamoDB persistence: the only module that sees `AttributeValue`. One
//! table holds keys, tiers, rate windows, usage logs and daily aggregates,
//! told apart by their `pk`/`sk` prefixes (all of them, and every attribute
//! name, in `layout`). Modules
//! are named after what they store: `api_keys`, `tiers`, `logins`, `owned`
//! (batches, files and the collector's queue), `usage_log` (reading what
//! settlement wrote); and after the proxy's two writes, `admission` and
//! `settlement`.

pub mod admission;
mod api_keys;
mod capacity;
mod item;
mod layout;
mod logins;
pub mod model_aliases;
pub mod owned;
pub mod prices;
pub mod schema;
pub mod settlement;
mod tiers;
pub mod upstream_health;
pub mod usage_log;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::{BoxError, SdkError};
use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem};

pub use api_keys::KeyPage;
pub use capacity::CapacityUnits;
pub use layout::TTL_ATTRIBUTE;

/// The listing index, as in template.yaml (its key attributes: `layout`).
pub const GSI1: &str = "gsi1";

/// Why a store call failed: the distinction decides between a 503 (retry
/// later) and a 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// DynamoDB could not be reached, timed out or throttled us.
    #[error("DynamoDB unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

impl StoreError {
    /// The same error, saying which operation on which item (or query) it
    /// met; still `Unavailable` or `Unexpected` as before.
    pub(crate) fn during(self, what: impl std::fmt::Display) -> StoreError {
        let what = what.to_string();
        match self {
            StoreError::Unavailable(err) => StoreError::Unavailable(err.context(what)),
            StoreError::Unexpected(err) => StoreError::Unexpected(err.context(what)),
        }
    }
}

/// A request the relay built wrong (a missing required field): a bug, never
/// a reason to retry.
impl From<aws_sdk_dynamodb::error::BuildError> for StoreError {
    fn from(err: aws_sdk_dynamodb::error::BuildError) -> Self {
        StoreError::Unexpected(err.into())
    }
}

/// Sorts an SDK failure into "try again later" and "something is wrong".
pub(crate) fn classify<E, R>(err: SdkError<E, R>) -> StoreError
where
    E: std::error::Error + aws_sdk_dynamodb::error::ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let transient = match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(service) => matches!(
            service.err().code(),
            Some(
                "ProvisionedThroughputExceededException"
                    | "RequestLimitExceeded"
                    | "ThrottlingException"
                    | "InternalServerError"
                    | "ServiceUnavailable"
            )
        ),
        _ => false,
    };
    // DisplayErrorContext prints the whole chain (service code, message, cause).
    let err = anyhow::Error::msg(aws_sdk_dynamodb::error::DisplayErrorContext(err).to_string());
    if transient {
        StoreError::Unavailable(err)
    } else {
        StoreError::Unexpected(err)
    }
}

/// Why a transaction was canceled: each item's reason, in the order the
/// items were given.
pub(crate) struct Canceled {
    reasons: Vec<aws_sdk_dynamodb::types::CancellationReason>,
    /// Another transaction was still running on one of the items.
    in_progress: bool,
}

impl Canceled {
    fn code(&self, index: usize) -> &str {
        self.reasons
            .get(index)
            .and_then(|r| r.code())
            .unwrap_or("None")
    }

    /// Item `index` failed its condition.
    pub(crate) fn failed(&self, index: usize) -> bool {
        self.code(index) == "ConditionalCheckFailed"
    }

    /// Item `index` as it was, for an update that asked for it on failure.
    pub(crate) fn item(&self, index: usize) -> Option<item::Item> {
        self.reasons.get(index).and_then(|r| r.item().cloned())
    }

    /// Another writer held an item, or DynamoDB throttled: worth a retry.
    pub(crate) fn transient(&self) -> bool {
        self.in_progress
            || self.reasons.iter().any(|r| {
                matches!(
                    r.code(),
                    Some(
                        "TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded"
                    )
                )
            })
    }
}

impl std::fmt::Debug for Canceled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let codes: Vec<&str> = (0..self.reasons.len()).map(|i| self.code(i)).collect();
        write!(f, "transaction canceled {codes:?}")
    }
}

/// Every item a query matches, page after page. Only for result sets known
/// to be small (tiers, one key's aggregates, one day's keys, all keys).
pub(crate) async fn query_all(
    query: aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
    partition: &str,
) -> Result<Vec<item::Item>, StoreError> {
    let mut items = Vec::new();
    let mut start_key = None;
    loop {
        let output = query
            .clone()
            .set_exclusive_start_key(start_key)
            .send()
            .await
            .map_err(|err| classify(err).during(format!("Query of {partition}")))?;
        items.extend(output.items.unwrap_or_default());
        start_key = output.last_evaluated_key;
        if start_key.is_none() {
            return Ok(items);
        }
    }
}

/// Short timeouts: a request waiting on a dead database should fail fast
/// with a 503, not hang.
pub fn timeouts() -> aws_config::timeout::TimeoutConfig {
    aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_attempt_timeout(Duration::from_secs(4))
        .operation_timeout(Duration::from_secs(10))
        .build()
}

/// Counts HTTP requests sent to DynamoDB (each retry included), for the
/// benchmarks' calls-per-request figure. One relaxed atomic add per call.
#[derive(Debug)]
struct RoundTripCounter(Arc<AtomicU64>);

impl Intercept for RoundTripCounter {
    fn name(&self) -> &'static str {
        "RoundTripCounter"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The relay's table, shared by all handlers. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    table: Arc<str>,
    round_trips: Arc<AtomicU64>,
    /// Present only on a store from [`Store::connect_counting_capacity`].
    capacity: Option<capacity::CapacityCounter>,
}

impl Store {
    /// A store on a ready-made client; its round trips are not counted
    /// (only [`Store::connect`] installs the counter).
    pub fn new(client: Client, table: impl Into<Arc<str>>) -> Store {
        Store {
            client,
            table: table.into(),
            round_trips: Arc::default(),
            capacity: None,
        }
    }

    /// DynamoDB requests sent so far by this store and its clones, retries
    /// included (`GET /__relay/stats` of `relay-local` shows it).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Capacity units consumed so far by this store and its clones, when it
    /// counts them (`relay-local` with `RELAY_DEBUG_STATS=1`); successful
    /// calls only, as DynamoDB reports none on errors.
    pub fn consumed_capacity(&self) -> Option<CapacityUnits> {
        self.capacity.as_ref().map(capacity::CapacityCounter::total)
    }

    /// A client from the ambient AWS configuration, pointed at `endpoint`
    /// when one is given (DynamoDB Local), with [`timeouts`].
    pub async fn connect(table: &str, endpoint: Option<&str>) -> Store {
        Store::connect_with(table, endpoint, None).await
    }

    /// As [`Store::connect`], and every call asks DynamoDB for the capacity
    /// it consumed ([`Store::consumed_capacity`] sums it): for the bench's
    /// debug stats only, since it changes every request the relay sends.
    pub async fn connect_counting_capacity(table: &str, endpoint: Option<&str>) -> Store {
        Store::connect_with(table, endpoint, Some(capacity::CapacityCounter::default())).await
    }

    async fn connect_with(
        table: &str,
        endpoint: Option<&str>,
        capacity: Option<capacity::CapacityCounter>,
    ) -> Store {
        let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        // Stalled-stream protection watches long transfers (S3 bodies); every
        // DynamoDB body is small and `timeouts()` bounds each call, so its
        // per-call throughput checker (~4% of the relay's CPU) buys nothing.
        let mut config = aws_sdk_dynamodb::config::Builder::from(&sdk)
            .timeout_config(timeouts())
            .stalled_stream_protection(
                aws_sdk_dynamodb::config::StalledStreamProtectionConfig::disabled(),
            );
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        let round_trips = Arc::new(AtomicU64::new(0));
        config = config.interceptor(RoundTripCounter(Arc::clone(&round_trips)));
        if let Some(counter) = &capacity {
            config = config.interceptor(counter.clone());
        }
        Store {
            client: Client::from_conf(config.build()),
            table: table.into(),
            round_trips,
            capacity,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table from template.yaml's definition if it is missing.
    pub async fn ensure_table(&self) -> Result<(), StoreError> {
        schema::create_table(&self.client, &self.table).await
    }

    /// Every item of one `gsi1` partition (see [`query_all`]).
    pub(crate) async fn index_partition(
        &self,
        partition: String,
    ) -> Result<Vec<item::Item>, StoreError> {
        query_all(
            self.client
                .query()
                .table_name(self.table())
                .index_name(GSI1)
                .key_condition_expression(layout::IN_INDEX_PARTITION)
                .expression_attribute_values(":p", item::s(&partition)),
            &format!("{GSI1} partition {partition}"),
        )
        .await
    }

    /// The items with these keys (those that exist), in batches of 100,
    /// asking again for what DynamoDB left unprocessed. `project` names the
    /// attributes to read (`#name` placeholders for reserved words).
    pub(crate) async fn batch_get(
        &self,
        keys: Vec<item::Item>,
        project: &str,
        names: &[(&str, &str)],
        consistent: bool,
    ) -> Result<Vec<item::Item>, StoreError> {
        use aws_sdk_dynamodb::types::KeysAndAttributes;
        let mut items = Vec::new();
        for chunk in keys.chunks(100) {
            let mut request = KeysAndAttributes::builder()
                .set_keys(Some(chunk.to_vec()))
                .consistent_read(consistent)
                .projection_expression(project);
            for (placeholder, name) in names {
                request = request.expression_attribute_names(*placeholder, *name);
            }
            let mut request = Some(request.build()?);
            while let Some(keys) = request.take() {
                let output = self
                    .client
                    .batch_get_item()
                    .request_items(self.table(), keys)
                    .send()
                    .await
                    .map_err(|err| {
                        classify(err).during(format!("BatchGetItem of {} keys", chunk.len()))
                    })?;
                items.extend(
                    output
                        .responses
                        .unwrap_or_default()
                        .remove(self.table())
                        .unwrap_or_default(),
                );
                request = output
                    .unprocessed_keys
                    .and_then(|mut rest| rest.remove(self.table()))
                    .filter(|rest| !rest.keys().is_empty());
            }
        }
        Ok(items)
    }

    /// Runs one transaction: `Err(Canceled)` when DynamoDB canceled it
    /// (a failed condition, a conflict), `StoreError` when it could not run.
    pub(crate) async fn transact(
        &self,
        items: Vec<aws_sdk_dynamodb::types::TransactWriteItem>,
    ) -> Result<Result<(), Canceled>, StoreError> {
        use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
        // Described before they are sent (the SDK takes them): a few short
        // strings, against a network round trip.
        let described = transaction_items(&items);
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        let err = match result {
            Ok(_) => return Ok(Ok(())),
            Err(err) => err,
        };
        let canceled = match err.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(canceled)) => Canceled {
                reasons: canceled.cancellation_reasons().to_vec(),
                in_progress: false,
            },
            Some(TransactWriteItemsError::TransactionInProgressException(_)) => Canceled {
                reasons: Vec::new(),
                in_progress: true,
            },
            _ => return Err(classify(err).during(format!("TransactWriteItems of {described}"))),
        };
        Ok(Err(canceled))
    }

    /// A cheap read that proves the table is reachable (health checks).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client
            .describe_table()
            .table_name(self.table.as_ref())
            .send()
            .await
            .map(|_| ())
            .map_err(|err| classify(err).during(format!("DescribeTable {}", self.table)))
    }
}

/// A short random pause before retrying a write that met a transaction.
pub(crate) async fn conflict_pause(attempt: u32) {
    use rand::Rng;
    let bound = 10u64 << attempt.min(5);
    let millis = rand::rng().random_range(1..=bound);
    tokio::time::sleep(Duration::from_millis(millis)).await;
}

/// A put inside a transaction, with its condition.
pub(crate) fn transact_put(
    table: &str,
    item: item::Item,
    condition: Option<&str>,
) -> Result<TransactWriteItem, StoreError> {
    Ok(TransactWriteItem::builder()
        .put(
            Put::builder()
                .table_name(table)
                .set_item(Some(item))
                .set_condition_expression(condition.map(str::to_owned))
                .build()?,
        )
        .build())
}

pub(crate) fn transact_update(update: UpdateBuilder) -> Result<TransactWriteItem, StoreError> {
    Ok(TransactWriteItem::builder().update(update.build()?).build())
}

/// The items of a transaction, for messages about it: `pk / sk` of each.
fn transaction_items(items: &[TransactWriteItem]) -> String {
    let keys: Vec<String> = items
        .iter()
        .map(|item| {
            let key = if let Some(put) = item.put() {
                layout::ItemKey::of(put.item())
            } else if let Some(update) = item.update() {
                layout::ItemKey::of(update.key())
            } else if let Some(delete) = item.delete() {
                layout::ItemKey::of(delete.key())
            } else {
                item.condition_check()
                    .and_then(|check| layout::ItemKey::of(check.key()))
            };
            key.map_or_else(|| "?".to_owned(), |key| key.to_string())
        })
        .collect();
    format!("[{}]", keys.join(", "))
}
