//! `/admin/model-aliases`: the names clients may ask for in place of a
//! model id (`domain::model_catalog`), replaced as a whole. The proxy picks
//! a new list up within `PRICE_CACHE_SECONDS`, with the price table.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::{Admin, AdminState};
use crate::domain;
use crate::domain::model_catalog::{ModelAlias, ModelAliases};
use crate::error::ApiError;
use crate::http::{JsonBody, NoParams, QueryParams};
use crate::store::model_aliases::StoredAliases;

/// The largest `PUT /admin/model-aliases` body: `MAX_ALIASES` long entries.
const MAX_ALIASES_BODY: usize = 64 * 1024;

/// What `PUT` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasesBody {
    pub aliases: Vec<ModelAlias>,
}

/// What `GET` and `PUT` answer.
#[derive(Debug, Serialize)]
pub struct AliasesView {
    pub aliases: Vec<ModelAlias>,
    /// When they were stored; `null` when none ever were.
    pub updated_at: Option<String>,
}

fn view(stored: Option<StoredAliases>) -> AliasesView {
    match stored {
        Some(stored) => AliasesView {
            aliases: stored.aliases.as_slice().to_vec(),
            updated_at: Some(stored.updated_at),
        },
        None => AliasesView {
            aliases: Vec::new(),
            updated_at: None,
        },
    }
}

pub(super) async fn get_aliases(
    _: Admin,
    State(state): State<AdminState>,
    QueryParams(NoParams {}): QueryParams<NoParams>,
) -> Result<Json<AliasesView>, ApiError> {
    Ok(Json(view(state.store.stored_aliases().await?)))
}

/// Replaces every alias; `{"aliases": []}` removes them all.
pub(super) async fn put_aliases(
    _: Admin,
    State(state): State<AdminState>,
    JsonBody(body): JsonBody<AliasesBody, MAX_ALIASES_BODY>,
) -> Result<Json<AliasesView>, ApiError> {
    let aliases = ModelAliases::new(body.aliases)?;
    let stored = state.store.put_aliases(&aliases, domain::now()).await?;
    tracing::info!(
        updated_at = %stored.updated_at,
        aliases = stored.aliases.as_slice().len(),
        "model aliases stored"
    );
    Ok(Json(view(Some(stored))))
}
