//! `/admin/prices`: the price table in force, replaced as a whole, and the
//! versions stored before. The table's shape and rules are
//! `domain::price_list`'s; the proxy picks a new table up within
//! `PRICE_CACHE_SECONDS`.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::{Admin, AdminState};
use crate::domain::price::default_table;
use crate::domain::price_list::PriceList;
use crate::domain::{self, parse_timestamp};
use crate::error::ApiError;
use crate::http::{JsonBody, NoParams, Page, PageParams, QueryParams, page_json};
use crate::store::owned::PageFrom;
use crate::store::prices::{PricesStored, StoredPrices};

/// The largest `PUT /admin/prices` body: a table of `MAX_ENTRIES` entries
/// with a band or two each.
pub const MAX_PRICE_LIST_BODY: usize = 256 * 1024;

/// `GET` and `PUT /admin/prices`: the table in force and where it is from.
#[derive(Debug, Serialize)]
pub struct PricesView {
    #[serde(flatten)]
    pub list: PriceList,
    /// `default` (the shipped table: nothing stored) or `stored`.
    pub source: &'static str,
    /// When the stored table was stored; `null` for the shipped one.
    pub updated_at: Option<String>,
    /// `UNPRICED_MODELS`: `charge` or `refuse` (configuration, read-only).
    pub unpriced_models: &'static str,
}

/// A stored version, as `GET /admin/prices/history` lists it; its `id` is
/// its `updated_at`.
#[derive(Debug, Serialize)]
pub struct PriceVersionView {
    pub id: String,
    pub updated_at: String,
    #[serde(flatten)]
    pub list: PriceList,
}

fn view(state: &AdminState, stored: Option<StoredPrices>) -> PricesView {
    let unpriced_models = if state.config.refuse_unpriced_models {
        "refuse"
    } else {
        "charge"
    };
    match stored {
        Some(stored) => PricesView {
            list: PriceList::of(&stored.table),
            source: "stored",
            updated_at: Some(stored.updated_at),
            unpriced_models,
        },
        None => PricesView {
            list: PriceList::of(&default_table()),
            source: "default",
            updated_at: None,
            unpriced_models,
        },
    }
}

pub(super) async fn get_prices(
    _: Admin,
    State(state): State<AdminState>,
    QueryParams(NoParams {}): QueryParams<NoParams>,
) -> Result<Json<PricesView>, ApiError> {
    let stored = state.store.stored_prices().await?;
    Ok(Json(view(&state, stored)))
}

/// Replaces the whole table; the one it replaces stays in the history.
/// Costs already recorded keep the prices they were computed at.
pub(super) async fn put_prices(
    _: Admin,
    State(state): State<AdminState>,
    JsonBody(list): JsonBody<PriceList, MAX_PRICE_LIST_BODY>,
) -> Result<Json<PricesView>, ApiError> {
    let table = list
        .validate()
        .map_err(|err| ApiError::bad_request(err.to_string()))?;
    match state.store.put_prices(&table, domain::now()).await? {
        PricesStored::Stored(stored) => {
            tracing::info!(
                updated_at = %stored.updated_at,
                entries = stored.table.entries.len(),
                "price table stored"
            );
            Ok(Json(view(&state, Some(stored))))
        }
        PricesStored::TooLarge { bytes, limit } => Err(ApiError::bad_request(format!(
            "`entries`: the table takes {bytes} bytes stored, over the {limit} one table may take"
        ))),
    }
}

/// `GET /admin/prices/history`: every table stored, newest first (the
/// first is the one in force), paged by `after_id`/`before_id` as
/// Anthropic's lists are.
pub(super) async fn price_history(
    _: Admin,
    State(state): State<AdminState>,
    QueryParams(params): QueryParams<PageParams>,
) -> Result<Json<Page<PriceVersionView>>, ApiError> {
    let (limit, from) = params.page()?;
    if let PageFrom::After(id) | PageFrom::Before(id) = from
        && parse_timestamp(id).is_none()
    {
        return Err(ApiError::bad_request(
            "`before_id`/`after_id` must be a version's id (its `updated_at`)",
        ));
    }
    let page = state.store.price_versions(from, limit).await?;
    let ids: Vec<String> = page.versions.iter().map(|v| v.updated_at.clone()).collect();
    let data = page
        .versions
        .into_iter()
        .map(|v| PriceVersionView {
            id: v.updated_at.clone(),
            updated_at: v.updated_at,
            list: PriceList::of(&v.table),
        })
        .collect();
    Ok(page_json(data, &ids, page.has_more))
}
