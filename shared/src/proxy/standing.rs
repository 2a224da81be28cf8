//! The relay's own headers on every proxied answer: what the key has left
//! of its token quota and dollar limits, and when the nearest dollar limit
//! resets, as the request last saw the key (`context::Seen`: admitted, or
//! read; a message's own cost is not in them yet). Documented in the
//! README ("Headers the relay adds").

use http::{HeaderMap, HeaderName, HeaderValue};
use time::OffsetDateTime;

use crate::domain::budget::{BudgetPolicy, headroom, usd};
use crate::domain::format_timestamp;
use crate::domain::key::ApiKeyRecord;

/// Tokens left of the key's `token_limit` (absent: no token limit).
pub const TOKENS_REMAINING: HeaderName = HeaderName::from_static("x-relay-tokens-remaining");
/// Dollars left under the tightest dollar limit that applies to the
/// request's model (absent: none applies).
pub const BUDGET_REMAINING: HeaderName = HeaderName::from_static("x-relay-budget-remaining-usd");
/// Which limit that is: its window, and `:pattern` for a model-restricted one.
pub const BUDGET_LIMIT: HeaderName = HeaderName::from_static("x-relay-budget-limit");
/// When the soonest applicable dollar limit resets (RFC 3339).
pub const BUDGET_RESET: HeaderName = HeaderName::from_static("x-relay-budget-reset");

/// The headers for a request for `models` (empty: every limit applies)
/// by the key `record`.
pub(super) fn headers(
    record: &ApiKeyRecord,
    policy: &BudgetPolicy,
    models: &[&str],
    now: OffsetDateTime,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut put = |name: HeaderName, value: String| {
        // Limit ids are validated model patterns: always a valid value.
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    if let Some(left) = record.remaining_tokens() {
        put(TOKENS_REMAINING, left.to_string());
    }
    let room = headroom(record, policy, models, now);
    if let Some((limit, left)) = room.tightest {
        put(BUDGET_REMAINING, usd(left));
        put(BUDGET_LIMIT, limit);
    }
    if let Some(at) = room.next_reset {
        put(BUDGET_RESET, format_timestamp(at));
    }
    headers
}
