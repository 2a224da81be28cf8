//! Budget alerts against moto's SNS: a key's spend crossing 50, 80 and
//! 100 % of its dollar limit publishes one event per threshold, read back
//! through an SQS queue subscribed to the topic.

use std::collections::BTreeMap;

use aws_sdk_sns::config::{BehaviorVersion, Credentials, Region};
use relay_shared::config::AlertTarget;
use relay_shared::domain::budget::SpendCounter;
use relay_shared::domain::key::KeyId;
use relay_tests::app::{AppOptions, TestApp, spawn_app_with};
use relay_tests::fake_upstream::{Behavior, MessageSpec, Usage};
use serde_json::{Value, json};

/// moto serves every emulated service on one address; `make test` exports
/// it as the Secrets Manager endpoint.
fn moto_endpoint() -> String {
    std::env::var("SECRETSMANAGER_ENDPOINT")
        .expect("SECRETSMANAGER_ENDPOINT: run with `make test`, which starts moto")
}

fn credentials() -> Credentials {
    Credentials::new("test", "test", None, None, "relay-tests")
}

/// A fresh topic with a fresh queue subscribed to it; returns the topic's
/// ARN, the queue's URL and a client to read it.
async fn topic_with_queue(endpoint: &str) -> (String, String, aws_sdk_sqs::Client) {
    let sns = aws_sdk_sns::Client::from_conf(
        aws_sdk_sns::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(credentials())
            .endpoint_url(endpoint)
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::Credentials::new(
                "test",
                "test",
                None,
                None,
                "relay-tests",
            ))
            .endpoint_url(endpoint)
            .build(),
    );
    let name = format!("relay-alerts-{}", uuid::Uuid::new_v4().simple());
    let topic = sns.create_topic().name(&name).send().await.unwrap();
    let topic_arn = topic.topic_arn().unwrap().to_owned();
    let queue = sqs.create_queue().queue_name(&name).send().await.unwrap();
    let queue_url = queue.queue_url().unwrap().to_owned();
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap();
    let queue_arn =
        attributes.attributes().unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn].clone();
    sns.subscribe()
        .topic_arn(&topic_arn)
        .protocol("sqs")
        .endpoint(queue_arn)
        .send()
        .await
        .unwrap();
    (topic_arn, queue_url, sqs)
}

/// Every message in the queue (SNS envelopes), draining it.
async fn drain(sqs: &aws_sdk_sqs::Client, queue_url: &str) -> Vec<Value> {
    let mut messages = Vec::new();
    // moto delivers on publish; a few empty receives in a row mean empty.
    let mut empty = 0;
    while empty < 3 {
        let received = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        let batch = received.messages();
        if batch.is_empty() {
            empty += 1;
            continue;
        }
        for message in batch {
            messages.push(serde_json::from_str(message.body().unwrap()).unwrap());
            sqs.delete_message()
                .queue_url(queue_url)
                .receipt_handle(message.receipt_handle().unwrap())
                .send()
                .await
                .unwrap();
        }
    }
    messages
}

/// One Sonnet 4.5 message of `input` tokens and no output: $3 per million
/// input tokens, so it costs 3 µ$ per token.
async fn send(app: &TestApp, key: &str, input: u64) -> u16 {
    app.upstream.push(Behavior::Message(MessageSpec {
        usage: Usage::new(input, 0, 0, 0),
        ..MessageSpec::default()
    }));
    let response = app
        .http
        .post(app.url("/v1/messages"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "say hello"}]
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    // The body's end waits for the settlement and its alerts (the test
    // app holds answers until the after-answer work is done).
    response.bytes().await.unwrap();
    status
}

/// A $1 lifetime limit (no period boundary a slow run could cross): 45 %,
/// then 60 % (the 50 % alert), 75 % (nothing), 105 % (80 and 100 % at
/// once, admitted because room was left), then refused and silent. Each
/// threshold is published exactly once, with the key, limit, amounts and
/// period, a readable subject and the `threshold_percent` attribute.
#[tokio::test]
async fn crossing_fifty_eighty_and_a_hundred_percent_publishes_each_once() {
    let endpoint = moto_endpoint();
    let (topic_arn, queue_url, sqs) = topic_with_queue(&endpoint).await;
    let mut options = AppOptions::default();
    options.proxy.budget_alerts = AlertTarget {
        topic_arn: Some(topic_arn.clone()),
        sns_endpoint: Some(endpoint.clone()),
    };
    let app = spawn_app_with(options).await.unwrap();
    let (id, key) = app
        .new_key_with(json!({
            "name": "alerted",
            "dollar_limits": [{"window": "lifetime", "limit_usd": 1}],
        }))
        .await
        .unwrap();

    // 150,000 × 3 µ$ = 450,000 µ$: 45 % of 1,000,000.
    assert_eq!(send(&app, &key, 150_000).await, 200);
    assert!(drain(&sqs, &queue_url).await.is_empty(), "45 %: no alert");
    // + 150,000 µ$ = 600,000: 60 %, past 50.
    assert_eq!(send(&app, &key, 50_000).await, 200);
    let fifty = drain(&sqs, &queue_url).await;
    // + 150,000 = 750,000: 75 %, nothing new.
    assert_eq!(send(&app, &key, 50_000).await, 200);
    let seventy_five = drain(&sqs, &queue_url).await;
    // + 300,000 = 1,050,000: 105 %, past 80 and 100 at once.
    assert_eq!(send(&app, &key, 100_000).await, 200);
    // Spent: refused before it is forwarded, and nothing more is sent.
    assert_eq!(send(&app, &key, 1_000).await, 429);
    let rest = drain(&sqs, &queue_url).await;

    assert_eq!(fifty.len(), 1, "{fifty:?}");
    assert!(seventy_five.is_empty(), "{seventy_five:?}");
    assert_eq!(rest.len(), 2, "{rest:?}");
    let events: Vec<(Value, &Value)> = fifty
        .iter()
        .chain(&rest)
        .map(|envelope| {
            let event: Value = serde_json::from_str(envelope["Message"].as_str().unwrap()).unwrap();
            (event, envelope)
        })
        .collect();
    let mut by_threshold = BTreeMap::new();
    for (event, envelope) in &events {
        let threshold = event["threshold_percent"].as_u64().unwrap();
        assert_eq!(
            envelope["MessageAttributes"]["threshold_percent"],
            json!({"Type": "Number", "Value": threshold.to_string()})
        );
        assert_eq!(
            envelope["Subject"],
            format!("Relay budget: key alerted at {threshold}% of $1.00 per lifetime")
        );
        assert_eq!(envelope["TopicArn"], topic_arn.as_str());
        by_threshold.insert(threshold, event.clone());
    }
    assert_eq!(
        by_threshold.keys().copied().collect::<Vec<_>>(),
        [50, 80, 100]
    );
    for (threshold, used) in [(50, 600_000), (80, 1_050_000), (100, 1_050_000)] {
        let event = &by_threshold[&threshold];
        let at = event["at"].as_str().unwrap().to_owned();
        assert_eq!(
            event,
            &json!({
                "type": "relay.budget_threshold",
                "key_id": id,
                "key_name": "alerted",
                "window": "lifetime",
                "models": null,
                "threshold_percent": threshold,
                "limit_micro_usd": 1_000_000,
                "used_micro_usd": used,
                "period": "all",
                "resets_at": null,
                "time_zone": "UTC",
                "at": at,
            })
        );
    }

    // The key item remembers the highest threshold sent for the period, and
    // a further claim of it (another settlement racing) is refused.
    let key_id = KeyId::parse(&id).unwrap();
    let counter = SpendCounter {
        limit: "lifetime".into(),
        period: "all".into(),
    };
    let record = app.key_record(&id).await.unwrap();
    assert_eq!(
        record.budget_alerts,
        BTreeMap::from([(counter.clone(), 100)])
    );
    assert!(
        app.store
            .claim_budget_alert(&key_id, &counter, 100, 1_000_000)
            .await
            .unwrap()
            .is_none()
    );
}

/// A claim needs the settled spend to have reached the threshold, and of
/// two claims of the same threshold only the first wins.
#[tokio::test]
async fn a_threshold_is_claimed_once_and_only_once_its_spend_is_settled() {
    let app = spawn_app_with(AppOptions::default()).await.unwrap();
    let (id, key) = app
        .new_key_with(json!({
            "name": "claims",
            "dollar_limits": [{"window": "lifetime", "limit_usd": 1}],
        }))
        .await
        .unwrap();
    let key_id = KeyId::parse(&id).unwrap();
    let counter = SpendCounter {
        limit: "lifetime".into(),
        period: "all".into(),
    };
    // 100,000 × 3 µ$ = 300,000 µ$: 30 %. (No topic: alerts are logged.)
    assert_eq!(send(&app, &key, 100_000).await, 200);
    let claim = |threshold: u8, amount: u64| {
        let (store, key_id, counter) = (app.store.clone(), key_id.clone(), counter.clone());
        async move {
            store
                .claim_budget_alert(&key_id, &counter, threshold, amount)
                .await
                .unwrap()
        }
    };
    assert!(
        claim(50, 500_000).await.is_none(),
        "30 % has not reached 50 %"
    );
    let won = claim(50, 300_000).await.expect("the spend is there");
    assert_eq!(won.spend[&counter], 300_000);
    assert_eq!(won.name, "claims");
    assert!(claim(50, 300_000).await.is_none(), "claimed already");
    assert!(claim(20, 300_000).await.is_none(), "the marker only rises");
}
