//! Reading what settlement wrote: a key's totals and per-model totals, its
//! daily aggregates, its usage logs page by page, and one day's aggregates
//! across keys. Queries and GetItems only; a page reads at most one item
//! more than it returns. (The queries' key conditions and the readers of
//! what they return: `layout::usage`, `layout::api_key`.)

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

use super::item::{Item, get_s, s};
use super::owned::{OwnedPage, PageFrom};
use super::{GSI1, Store, StoreError, classify, layout, query_all};
use crate::domain::key::ApiKeyRecord;
use crate::domain::key::KeyId;
use crate::domain::usage::{ClassTotals, RequestClass, SessionId, UsageTotals};

/// A key with everything settled against it.
#[derive(Debug, Clone)]
pub struct KeyUsage {
    pub key: ApiKeyRecord,
    pub totals: UsageTotals,
    pub first_used_at: Option<String>,
    pub last_used_at: Option<String>,
}

/// One usage-log row, as the proxy recorded it.
#[derive(Debug, Clone, Serialize)]
pub struct LogRow {
    /// `message` (one request) or `batch` (a message batch's whole usage).
    pub kind: String,
    /// The batch, for rows of kind `batch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    /// Requests the row counts: 1 for a message, the billed requests of a batch.
    pub requests: u64,
    pub request_id: String,
    pub at: String,
    pub model: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u64,
    pub stream: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_5m_input_tokens: u64,
    pub cache_creation_1h_input_tokens: u64,
    pub estimated: bool,
    pub latency_ms: u64,
    pub ttfb_ms: Option<u64>,
    pub retries: u64,
    pub client_ip: String,
    pub user_agent: Option<String>,
    pub session_id: Option<String>,
    /// The agent (`x-claude-code-agent-id`) and its parent, when sent in a
    /// form fit to record (`domain::usage::AgentId`).
    pub agent_id: Option<String>,
    pub parent_agent_id: Option<String>,
    /// One of `main`, `subagent`, `workflow`, `compaction`, `auxiliary`,
    /// or `other` for any other value sent; null when none was.
    pub request_class: Option<String>,
    /// `x-claude-code-agent-type`, when short plain text.
    pub agent_type: Option<String>,
    pub error_type: Option<String>,
    /// The upstream that answered (`UpstreamSpec::name`).
    pub upstream: Option<String>,
    /// The alias the client asked for, when it named one (`model` is the
    /// model it resolved to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_model: Option<String>,
    /// What the row's usage cost, in millionths of a dollar (0 on rows
    /// recorded before prices existed).
    pub cost_micro_usd: u64,
    /// What caching saved against the same usage uncached, in millionths
    /// of a dollar; negative when it cost more (0 on older rows).
    pub cache_saved_micro_usd: i64,
    /// The model had no price of its own: charged the fallback.
    pub unpriced: bool,
}

/// One upstream's traffic on one day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamTraffic {
    pub requests: u64,
    /// Of them, answered with an error.
    pub errors: u64,
}

/// One Claude Code session's usage under a key.
#[derive(Debug, Clone)]
pub struct SessionUsage {
    pub session_id: String,
    pub first_used_at: String,
    pub last_used_at: String,
    pub totals: UsageTotals,
    /// Its counters per request class (`RequestClass::BUCKETS` order;
    /// counted since per-class counters exist).
    pub by_class: Vec<(&'static str, ClassTotals)>,
}

/// One key's aggregate of one day.
#[derive(Debug, Clone)]
pub struct DayUsage {
    /// `yyyy-mm-dd`, UTC.
    pub day: String,
    pub key_id: String,
    pub totals: UsageTotals,
    /// Its counters per model, by model id (`unknown`: requests that named
    /// none; counted since per-model counters exist, so older days have
    /// none and their totals are in no model).
    pub by_model: Vec<(String, ClassTotals)>,
}

/// Which logs to read: newest first, within `[from, to]` (RFC 3339 UTC
/// timestamps in the stored format), optionally one model.
#[derive(Debug, Clone)]
pub struct LogQuery {
    pub from: String,
    pub to: String,
    pub model: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
}

/// A cursor that is not one this key was given.
#[derive(Debug, thiserror::Error)]
#[error("cursor is not one this API returned for this key and query")]
pub struct BadLogCursor;

/// The cursor names the key, model and time range it belongs to, so it
/// cannot be replayed against another key or query (and reveals nothing
/// beyond a timestamp); its position must lie inside the range, or
/// DynamoDB would refuse the start key.
fn encode_log_cursor(key: &KeyId, query: &LogQuery, sort_key: &str) -> String {
    let text = serde_json::json!({
        "k": key.as_str(),
        "m": query.model,
        "f": query.from,
        "t": query.to,
        "s": sort_key,
    })
    .to_string();
    URL_SAFE_NO_PAD.encode(text)
}

fn decode_log_cursor(cursor: &str, key: &KeyId, query: &LogQuery) -> Result<String, BadLogCursor> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| BadLogCursor)?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| BadLogCursor)?;
    let sort_key = value["s"].as_str().ok_or(BadLogCursor)?;
    let (low, high) = log_bounds(query);
    let matches = value["k"].as_str() == Some(key.as_str())
        && value["m"].as_str() == query.model.as_deref()
        && value["f"].as_str() == Some(query.from.as_str())
        && value["t"].as_str() == Some(query.to.as_str())
        && layout::is_log_sort_key(sort_key)
        && (low.as_str()..=high.as_str()).contains(&sort_key);
    if matches {
        Ok(sort_key.to_owned())
    } else {
        Err(BadLogCursor)
    }
}

/// The sort-key range of a log query, both ends included.
fn log_bounds(query: &LogQuery) -> (String, String) {
    layout::log_range(&query.from, &query.to)
}

impl Store {
    /// The key's record and lifetime totals (one consistent GetItem).
    pub async fn key_usage(&self, id: &KeyId) -> Result<Option<KeyUsage>, StoreError> {
        self.key_item(id)
            .await?
            .as_ref()
            .map(KeyUsage::try_from)
            .transpose()
    }

    /// Lifetime totals per model, by model name.
    pub async fn usage_by_model(
        &self,
        id: &KeyId,
    ) -> Result<Vec<(String, UsageTotals)>, StoreError> {
        let (low, high) = layout::model_range();
        let items = self.query_partition(id, &low, &high).await?;
        items.iter().map(layout::usage::model_totals).collect()
    }

    /// Daily aggregates for `from..=to` (`yyyy-mm-dd`), only days with
    /// traffic, each with its split by model.
    pub async fn daily_usage(
        &self,
        id: &KeyId,
        from: &str,
        to: &str,
    ) -> Result<Vec<DayUsage>, StoreError> {
        let (low, high) = layout::day_range(from, to);
        let items = self.query_partition(id, &low, &high).await?;
        items.iter().map(DayUsage::try_from).collect()
    }

    /// The key's counters per request class over the days `from..=to`
    /// (`yyyy-mm-dd`), summed from the day aggregates settlement counts
    /// them on; buckets in `RequestClass::BUCKETS` order, those without
    /// traffic left out.
    pub async fn usage_by_request_class(
        &self,
        id: &KeyId,
        from: &str,
        to: &str,
    ) -> Result<Vec<(&'static str, ClassTotals)>, StoreError> {
        let (low, high) = layout::day_range(from, to);
        let items = self.query_partition(id, &low, &high).await?;
        let mut sums: Vec<(&'static str, ClassTotals)> = Vec::new();
        for item in &items {
            for (bucket, totals) in layout::usage::class_totals(item)? {
                match sums.iter_mut().find(|(b, _)| *b == bucket) {
                    Some((_, sum)) => sum.add(&totals),
                    None => sums.push((bucket, totals)),
                }
            }
        }
        let order = |bucket: &str| RequestClass::BUCKETS.iter().position(|b| *b == bucket);
        sums.sort_by_key(|(bucket, _)| order(bucket));
        Ok(sums)
    }

    /// All items of the key's partition with sort keys in `[low, high]`.
    /// Used for model and day aggregates: at most a few hundred, all wanted.
    async fn query_partition(
        &self,
        id: &KeyId,
        low: &str,
        high: &str,
    ) -> Result<Vec<Item>, StoreError> {
        query_all(
            self.client
                .query()
                .table_name(self.table())
                .key_condition_expression(layout::usage::AGGREGATES_BETWEEN)
                .expression_attribute_values(":pk", s(layout::key_partition(id)))
                .expression_attribute_values(":low", s(low))
                .expression_attribute_values(":high", s(high)),
            &format!("{} from {low} to {high}", layout::key_partition(id)),
        )
        .await
    }

    /// One page of logs, newest first, and the cursor of the next page.
    /// Reads `limit + 1` items at most: the extra one proves a next page.
    pub async fn usage_logs(
        &self,
        id: &KeyId,
        query: &LogQuery,
    ) -> Result<Result<(Vec<LogRow>, Option<String>), BadLogCursor>, StoreError> {
        let model = query.model.as_deref();
        // The cursor is the last row returned; the page resumes strictly
        // after it (ExclusiveStartKey), within the same bounds.
        let start_key = match query
            .cursor
            .as_deref()
            .map(|c| decode_log_cursor(c, id, query))
        {
            Some(Ok(after)) => {
                let mut start = Item::from([
                    (layout::PK.to_owned(), s(layout::key_partition(id))),
                    (layout::SK.to_owned(), s(after.clone())),
                ]);
                if let Some(model) = model {
                    start.insert(layout::GSI1PK.into(), s(layout::log_model_index(id, model)));
                    start.insert(layout::GSI1SK.into(), s(after));
                }
                Some(start)
            }
            Some(Err(bad)) => return Ok(Err(bad)),
            None => None,
        };
        let (low, high) = log_bounds(query);
        let limit = i32::try_from(query.limit + 1).unwrap_or(i32::MAX);
        let request = self.client.query().table_name(self.table());
        let request = match model {
            Some(model) => request
                .index_name(GSI1)
                .key_condition_expression(layout::usage::MODEL_LOGS_BETWEEN)
                .expression_attribute_values(":p", s(layout::log_model_index(id, model))),
            None => request
                .key_condition_expression(layout::usage::LOGS_BETWEEN)
                .expression_attribute_values(":p", s(layout::key_partition(id))),
        };
        let output = request
            .expression_attribute_values(":low", s(low))
            .expression_attribute_values(":high", s(high))
            .set_exclusive_start_key(start_key)
            .scan_index_forward(false)
            .limit(limit)
            .send()
            .await
            .map_err(|err| {
                classify(err).during(format!("Query of {}'s logs", layout::key_partition(id)))
            })?;
        let mut rows = Vec::with_capacity(query.limit + 1);
        for item in output.items() {
            rows.push((get_s(item, layout::SK)?.to_owned(), LogRow::try_from(item)?));
        }
        let next = if rows.len() > query.limit {
            rows.truncate(query.limit);
            rows.last()
                .map(|(sort_key, _)| encode_log_cursor(id, query, sort_key))
        } else {
            None
        };
        Ok(Ok((rows.into_iter().map(|(_, row)| row).collect(), next)))
    }

    /// A page of the key's Claude Code sessions, most recently used first
    /// (through the index settlement keeps by last use); `None` when the
    /// page's anchor is not one of the key's sessions. A session used again
    /// between two pages moves to the front.
    pub async fn sessions(
        &self,
        id: &KeyId,
        from: PageFrom<'_>,
        limit: usize,
    ) -> Result<Option<OwnedPage<SessionUsage>>, StoreError> {
        let anchor = match from {
            PageFrom::After(session) | PageFrom::Before(session) => SessionId::parse(session),
            PageFrom::Newest => None,
        };
        if anchor.is_none() && !matches!(from, PageFrom::Newest) {
            return Ok(None);
        }
        self.owned_records(
            layout::sessions_index(id),
            |session| layout::session(id, session),
            from,
            limit,
        )
        .await
    }

    /// Every key's aggregate for one day (`yyyy-mm-dd`), each with its
    /// split by model, through the index settlement maintains for it.
    pub async fn day_across_keys(&self, day: &str) -> Result<Vec<DayUsage>, StoreError> {
        self.index_partition(layout::day_index(day))
            .await?
            .iter()
            .map(DayUsage::try_from)
            .collect()
    }

    /// Each upstream's requests and errors on one day (`yyyy-mm-dd`),
    /// summed over every key's day item.
    pub async fn upstream_traffic(
        &self,
        day: &str,
    ) -> Result<std::collections::BTreeMap<String, UpstreamTraffic>, StoreError> {
        let mut traffic = std::collections::BTreeMap::<String, UpstreamTraffic>::new();
        for item in self.index_partition(layout::day_index(day)).await? {
            layout::usage::add_upstream_traffic(&item, &mut traffic);
        }
        Ok(traffic)
    }

    /// Names of these keys (deleted ones are absent), in batches of 100.
    pub async fn key_names(
        &self,
        ids: &[KeyId],
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let keys: Vec<Item> = ids.iter().map(|id| layout::api_key(id).item()).collect();
        let mut names = std::collections::HashMap::new();
        for item in self
            .batch_get(
                keys,
                layout::api_key::NAME_PROJECTION,
                layout::api_key::NAME_PROJECTION_NAMES,
                false,
            )
            .await?
        {
            let (id, name) = layout::api_key::id_and_name(&item)?;
            names.insert(id, name);
        }
        Ok(names)
    }

    /// Every key with its lifetime totals, page by page through the key
    /// listing index (for metrics exposition).
    pub async fn all_key_usage(&self) -> Result<Vec<KeyUsage>, StoreError> {
        self.index_partition(layout::KEYS_INDEX.to_owned())
            .await?
            .iter()
            .map(KeyUsage::try_from)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_cursor_is_bound_to_its_key_model_and_range() {
        let key = KeyId::parse("abcdefABCDEF").unwrap();
        let other = KeyId::parse("zzzzzzZZZZZZ").unwrap();
        let query = LogQuery {
            from: "2026-01-01T00:00:00.000Z".into(),
            to: "2026-12-31T23:59:59.999Z".into(),
            model: Some("m".into()),
            limit: 10,
            cursor: None,
        };
        let inside = "LOG#2026-06-01T00:00:00.000Z#r";
        let cursor = encode_log_cursor(&key, &query, inside);
        assert_eq!(decode_log_cursor(&cursor, &key, &query).unwrap(), inside);
        assert!(decode_log_cursor(&cursor, &other, &query).is_err());
        let unfiltered = LogQuery {
            model: None,
            ..query.clone()
        };
        assert!(decode_log_cursor(&cursor, &key, &unfiltered).is_err());
        let narrower = LogQuery {
            to: "2026-02-01T00:00:00.000Z".into(),
            ..query.clone()
        };
        assert!(decode_log_cursor(&cursor, &key, &narrower).is_err());
        assert!(decode_log_cursor("garbage!", &key, &query).is_err());
        let outside = encode_log_cursor(&key, &query, "LOG#2030-01-01T00:00:00.000Z#r");
        assert!(decode_log_cursor(&outside, &key, &query).is_err());
        let forged = encode_log_cursor(&key, &query, "KEY#zzzzzzZZZZZZ");
        assert!(decode_log_cursor(&forged, &key, &query).is_err());
    }
}
