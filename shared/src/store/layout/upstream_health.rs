//! An upstream's shared health: two small items under `UPSTREAM#<name>`,
//! each expiring by itself through the `ttl` attribute. `HEALTH` holds the
//! cooldown and the failures counted since the upstream last stayed quiet
//! for [`QUIET_RESET`] after a cooldown (the backoff's exponent, and what
//! `/admin/upstreams` shows); `UNUSABLE` holds a refusal (401/403) and the
//! credential it was made under. Two items, not one: each has its own
//! lifetime, which one `ttl` could not give them.

use std::collections::HashMap;

use time::{Duration, OffsetDateTime};

use super::super::StoreError;
use super::super::item::{Item, corrupt, get_n, get_s, n, opt_n, opt_s, s};
use super::{Change, ItemKey, PK, SK, TTL_ATTRIBUTE};
use crate::domain::epoch_seconds;
use crate::domain::upstream_pool::{
    FailureKind, HealthView, LastFailure, Unusable, UpstreamHealth,
};

const PARTITION: &str = "UPSTREAM#";
const HEALTH: &str = "HEALTH";
const UNUSABLE: &str = "UNUSABLE";

const COOLDOWN_UNTIL: &str = "cooldown_until";
const CONSECUTIVE: &str = "consecutive_failures";
const FAILURE_COUNT: &str = "failure_count";
const LAST_KIND: &str = "last_failure_kind";
const LAST_AT: &str = "last_failure_at";
const CREDENTIAL: &str = "credential_version";
const UNUSABLE_SINCE: &str = "unusable_since";

/// How long after its cooldown a health item lives: a failure within it
/// counts as consecutive (a longer backoff), one after it starts over.
pub(crate) const QUIET_RESET: Duration = Duration::minutes(10);
/// How long a refusal is remembered with the same credential: a key that
/// comes back (an account's billing fixed) is tried again within the hour
/// even if nobody re-keys the secret.
pub(crate) const UNUSABLE_FOR: Duration = Duration::hours(1);

/// The `#ttl` placeholder (`ttl` is a DynamoDB reserved word).
pub(crate) const TTL_NAME: &str = "#ttl";

/// Condition: the health item exists and has not outlived its `ttl` (DynamoDB
/// deletes expired items lazily, up to days later).
pub(crate) const ALIVE: &str = "#ttl > :now";

/// Every attribute a health read needs.
pub(crate) const PROJECTION: &str = "pk, sk, cooldown_until, consecutive_failures, failure_count, last_failure_kind, last_failure_at, credential_version, unusable_since, #ttl";

pub(crate) fn health(name: &str) -> ItemKey {
    ItemKey::new(format!("{PARTITION}{name}"), HEALTH)
}

pub(crate) fn unusable(name: &str) -> ItemKey {
    ItemKey::new(format!("{PARTITION}{name}"), UNUSABLE)
}

fn millis(at: OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos() / 1_000_000
}

fn from_millis(item: &Item, attribute: &str) -> Result<Option<OffsetDateTime>, StoreError> {
    opt_n(item, attribute)?
        .map(|ms| {
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .map_err(|_| corrupt(item, attribute, "is not a time"))
        })
        .transpose()
}

/// One more failure on a live health item: the cooldown set to `until`
/// (the ALL_NEW values read back are the health to note), its `ttl` moved.
/// Runs with [`ALIVE`]; when that fails, [`fresh_health_item`] starts over.
pub(crate) fn another_failure(
    until: OffsetDateTime,
    kind: FailureKind,
    now: OffsetDateTime,
) -> Change {
    Change {
        expression: format!(
            "SET {COOLDOWN_UNTIL} = :until, {LAST_KIND} = :kind, {LAST_AT} = :at, {TTL_NAME} = :ttl ADD {CONSECUTIVE} :one, {FAILURE_COUNT} :one"
        ),
        names: Some(HashMap::from([(
            TTL_NAME.to_owned(),
            TTL_ATTRIBUTE.to_owned(),
        )])),
        values: Item::from([
            (":until".to_owned(), n(millis(until))),
            (":kind".to_owned(), s(kind.as_str())),
            (":at".to_owned(), n(millis(now))),
            (":ttl".to_owned(), n(health_ttl(until, now))),
            (":one".to_owned(), n(1)),
            (":now".to_owned(), n(epoch_seconds(now))),
        ]),
    }
}

fn health_ttl(until: OffsetDateTime, now: OffsetDateTime) -> u64 {
    epoch_seconds(until.max(now) + QUIET_RESET)
}

/// A health item for a first failure (none alive).
pub(crate) fn fresh_health_item(
    name: &str,
    until: OffsetDateTime,
    kind: FailureKind,
    now: OffsetDateTime,
) -> Item {
    let mut item = health(name).item();
    item.extend([
        (COOLDOWN_UNTIL.to_owned(), n(millis(until))),
        (CONSECUTIVE.to_owned(), n(1)),
        (FAILURE_COUNT.to_owned(), n(1)),
        (LAST_KIND.to_owned(), s(kind.as_str())),
        (LAST_AT.to_owned(), n(millis(now))),
        (TTL_ATTRIBUTE.to_owned(), n(health_ttl(until, now))),
    ]);
    item
}

/// A refusal of `name`'s key under `credential_version`.
pub(crate) fn unusable_item(name: &str, credential_version: &str, now: OffsetDateTime) -> Item {
    let mut item = unusable(name).item();
    item.extend([
        (CREDENTIAL.to_owned(), s(credential_version)),
        (UNUSABLE_SINCE.to_owned(), n(millis(now))),
        (
            TTL_ATTRIBUTE.to_owned(),
            n(epoch_seconds(now + UNUSABLE_FOR)),
        ),
    ]);
    item
}

/// The upstream a health item belongs to.
fn upstream_of(item: &Item) -> Result<&str, StoreError> {
    get_s(item, PK)?
        .strip_prefix(PARTITION)
        .ok_or_else(|| corrupt(item, PK, "is not an upstream's"))
}

/// Whether an item is past its `ttl` at `now` (not yet deleted).
fn expired(item: &Item, now: OffsetDateTime) -> Result<bool, StoreError> {
    Ok(opt_n(item, TTL_ATTRIBUTE)?.is_some_and(|ttl| ttl <= epoch_seconds(now)))
}

/// A health item's part of the health (the cooldown and failures).
pub(crate) fn health_of(item: &Item, into: &mut UpstreamHealth) -> Result<(), StoreError> {
    into.cooldown_until = from_millis(item, COOLDOWN_UNTIL)?;
    into.consecutive_failures = u32::try_from(get_n(item, CONSECUTIVE)?).unwrap_or(u32::MAX);
    into.failures = get_n(item, FAILURE_COUNT)?;
    into.last_failure = match (opt_s(item, LAST_KIND)?, from_millis(item, LAST_AT)?) {
        (Some(kind), Some(at)) => Some(LastFailure {
            kind: FailureKind::parse(kind)
                .ok_or_else(|| corrupt(item, LAST_KIND, "is not a failure kind"))?,
            at,
        }),
        _ => None,
    };
    Ok(())
}

/// The view the items read for some upstreams make at `now`; items past
/// their `ttl` count as gone.
pub(crate) fn view_of(items: &[Item], now: OffsetDateTime) -> Result<HealthView, StoreError> {
    let mut view = HealthView::default();
    for item in items {
        if expired(item, now)? {
            continue;
        }
        let health = view
            .upstreams
            .entry(upstream_of(item)?.to_owned())
            .or_default();
        match get_s(item, SK)? {
            HEALTH => health_of(item, health)?,
            UNUSABLE => {
                health.unusable = Some(Unusable {
                    since: from_millis(item, UNUSABLE_SINCE)?
                        .ok_or_else(|| corrupt(item, UNUSABLE_SINCE, "is missing"))?,
                    credential_version: get_s(item, CREDENTIAL)?.to_owned(),
                });
            }
            _ => return Err(corrupt(item, SK, "is not an upstream health item")),
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::parse_timestamp;

    #[test]
    fn key_formats_are_the_documented_ones() {
        assert_eq!(health("main").to_string(), "UPSTREAM#main / HEALTH");
        assert_eq!(unusable("main").to_string(), "UPSTREAM#main / UNUSABLE");
    }

    #[test]
    fn items_read_back_as_the_health_they_hold_until_their_ttl() {
        let now = parse_timestamp("2026-01-02T03:04:05.006Z").unwrap();
        let until = now + Duration::seconds(30);
        let items = [
            fresh_health_item("a", until, FailureKind::RateLimited, now),
            unusable_item("b", "0123456789abcdef", now),
        ];
        assert_eq!(
            items[0].get(TTL_ATTRIBUTE),
            Some(&n(epoch_seconds(now) + 30 + 600))
        );
        let view = view_of(&items, now).unwrap();
        assert_eq!(
            view.of("a"),
            Some(&UpstreamHealth {
                cooldown_until: Some(until),
                consecutive_failures: 1,
                failures: 1,
                last_failure: Some(LastFailure {
                    kind: FailureKind::RateLimited,
                    at: now,
                }),
                unusable: None,
            })
        );
        assert_eq!(
            view.of("b").and_then(|h| h.unusable.clone()),
            Some(Unusable {
                since: now,
                credential_version: "0123456789abcdef".into(),
            })
        );
        // Past the health item's ttl (cooldown end + 10 min), before the
        // refusal's (an hour): DynamoDB may not have deleted it yet.
        let later = now + Duration::minutes(11);
        let view = view_of(&items, later).unwrap();
        assert_eq!(view.of("a"), None);
        assert!(view.of("b").is_some());
        assert_eq!(
            view_of(&items, now + Duration::hours(1)).unwrap(),
            HealthView::default()
        );
    }
}
