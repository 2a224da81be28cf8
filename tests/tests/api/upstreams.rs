//! Upstream health shared between relay instances through DynamoDB Local:
//! what one instance marks (a cooldown, a refused key), another's next
//! health read sees, and the items expire by themselves.

use std::time::Duration;

use relay_shared::domain::upstream_pool::{
    FailureKind, UpstreamApiKey, UpstreamKind, UpstreamSpec, candidates,
};
use relay_shared::domain::{epoch_seconds, now};
use relay_shared::store::Store;
use relay_shared::store::upstream_health::HealthCache;
use relay_tests::app::{dynamodb_client, dynamodb_endpoint};

/// Two instances of the relay: two clients on one fresh table.
async fn two_instances() -> (Store, Store) {
    let endpoint = dynamodb_endpoint().unwrap();
    let table = format!("relay-upstreams-{}", uuid::Uuid::new_v4().simple());
    let first = Store::new(dynamodb_client(&endpoint), table.clone());
    first.ensure_table().await.unwrap();
    let second = Store::new(dynamodb_client(&endpoint), table);
    (first, second)
}

fn anthropic(name: &str, key: &str) -> UpstreamSpec {
    UpstreamSpec {
        name: name.into(),
        kind: UpstreamKind::Anthropic {
            base_url: "http://127.0.0.1:9".into(),
            api_key: UpstreamApiKey::new(key),
        },
        priority: 1,
        weight: 1,
        models: Vec::new(),
    }
}

async fn raw_ttl(store: &Store, pk: &str, sk: &str) -> u64 {
    use aws_sdk_dynamodb::types::AttributeValue;
    let item = store
        .client()
        .get_item()
        .table_name(store.table())
        .key("pk", AttributeValue::S(pk.into()))
        .key("sk", AttributeValue::S(sk.into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    item[relay_shared::store::TTL_ATTRIBUTE]
        .as_n()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_cooldown_one_instance_marks_is_seen_by_the_other_and_expires_by_ttl() {
    let (first, second) = two_instances().await;
    let pool = [anthropic("main", "sk-main"), anthropic("spare", "sk-spare")];
    let names = ["main", "spare"];
    let first_cache = HealthCache::new(Duration::from_secs(5));
    assert!(first_cache.view(&first, &names).await.upstreams.is_empty());

    // The first instance meets a 429 with `retry-after: 30`.
    let at = now();
    let until = first_cache
        .report_failure(
            &first,
            &pool[0],
            FailureKind::RateLimited,
            Some(Duration::from_secs(30)),
            at,
        )
        .await
        .unwrap();
    assert_eq!(until, at + Duration::from_secs(30));
    let own = first_cache.view(&first, &names).await;
    assert_eq!(
        own.of("main").unwrap().cooldown_until.map(epoch_millis),
        Some(epoch_millis(until)),
        "this instance sees its own mark at once"
    );

    // The second instance's first health read sees it.
    let second_cache = HealthCache::new(Duration::from_secs(5));
    let seen = second_cache.view(&second, &names).await;
    let main = seen.of("main").unwrap();
    assert_eq!(
        main.cooldown_until.map(epoch_millis),
        Some(epoch_millis(until))
    );
    assert_eq!(main.consecutive_failures, 1);
    assert_eq!(
        main.last_failure.as_ref().unwrap().kind,
        FailureKind::RateLimited
    );
    assert!(seen.of("spare").is_none());
    let order = candidates(
        &pool,
        Some("claude-sonnet-4-5"),
        Some("session-1"),
        &seen,
        at,
        0,
    );
    let order: Vec<&str> = order.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        order,
        ["spare", "main"],
        "the cooling upstream is the last resort"
    );

    // The item expires by itself: ten minutes after the cooldown ends.
    let ttl = raw_ttl(&first, "UPSTREAM#main", "HEALTH").await;
    assert_eq!(ttl, epoch_seconds(until) + 600);

    // A second failure while the item lives is consecutive: without
    // `retry-after`, 5 s doubled once.
    let again = now();
    let until = first_cache
        .report_failure(&first, &pool[0], FailureKind::ServerError, None, again)
        .await
        .unwrap();
    assert_eq!(until, again + Duration::from_secs(10));
    let view = second.upstream_health(&names, again).await.unwrap();
    let main = view.of("main").unwrap();
    assert_eq!((main.consecutive_failures, main.failures), (2, 2));

    // Past its ttl the item counts as gone even before DynamoDB deletes it,
    // and the next failure starts the count over.
    let much_later = again + Duration::from_secs(11 * 60);
    let view = second.upstream_health(&names, much_later).await.unwrap();
    assert!(view.of("main").is_none(), "{view:?}");
    let health = second
        .mark_cooldown(
            "main",
            much_later + Duration::from_secs(5),
            FailureKind::Connect,
            much_later,
        )
        .await
        .unwrap();
    assert_eq!((health.consecutive_failures, health.failures), (1, 1));
}

#[tokio::test]
async fn a_refused_key_is_skipped_everywhere_until_the_secret_holds_another() {
    let (first, second) = two_instances().await;
    let refused = anthropic("main", "sk-revoked");
    let pool = [refused.clone(), anthropic("spare", "sk-spare")];
    let names = ["main", "spare"];
    let at = now();
    HealthCache::new(Duration::from_secs(5))
        .report_refused(&first, &refused, at)
        .await
        .unwrap();

    let view = HealthCache::new(Duration::from_secs(5))
        .view(&second, &names)
        .await;
    assert!(view.is_unusable(&refused));
    let order = candidates(&pool, None, None, &view, at, 3);
    assert_eq!(order.len(), 1);
    assert_eq!(order[0].name, "spare");
    let ttl = raw_ttl(&first, "UPSTREAM#main", "UNUSABLE").await;
    assert_eq!(ttl, epoch_seconds(at) + 3600);

    // The secret re-read with a new key for `main`: the mark was made
    // under the old one.
    let rekeyed = [anthropic("main", "sk-new"), anthropic("spare", "sk-spare")];
    assert!(!view.is_unusable(&rekeyed[0]));
    assert_eq!(candidates(&rekeyed, None, None, &view, at, 3).len(), 2);
}

fn epoch_millis(at: time::OffsetDateTime) -> i128 {
    at.unix_timestamp_nanos() / 1_000_000
}
