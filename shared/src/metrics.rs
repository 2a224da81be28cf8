//! CloudWatch metrics as Embedded Metric Format lines on stdout: CloudWatch
//! Logs turns them into metrics, so the hot path never waits on an API
//! call. Key ids go in as properties (searchable in Logs Insights), never
//! as dimensions (one metric stream per key would be costly).

use std::io::Write;
use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use crate::config::MetricsConfig;
use crate::domain::usage::UsageRecord;

pub const DEFAULT_NAMESPACE: &str = "ClaudeRelay";

/// Read once: whether metrics are on, and their namespace.
fn settings() -> &'static MetricsConfig {
    static SETTINGS: OnceLock<MetricsConfig> = OnceLock::new();
    SETTINGS.get_or_init(MetricsConfig::from_env)
}

/// One EMF document: `metrics` as (name, unit, value) under each of the
/// `dimension_sets`, plus plain properties.
pub fn document(
    namespace: &str,
    timestamp_ms: i64,
    dimension_sets: &[&[&str]],
    dimensions: &[(&str, &str)],
    metrics: &[(&str, &str, f64)],
    properties: &[(&str, Value)],
) -> Value {
    let definitions: Vec<Value> = metrics
        .iter()
        .map(|(name, unit, _)| json!({"Name": name, "Unit": unit}))
        .collect();
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": dimension_sets,
                "Metrics": definitions,
            }],
        }),
    );
    for (name, value) in dimensions {
        root.insert((*name).into(), json!(value));
    }
    for (name, _, value) in metrics {
        root.insert((*name).into(), json!(value));
    }
    for (name, value) in properties {
        root.insert((*name).into(), value.clone());
    }
    Value::Object(root)
}

fn write_line(document: &Value) {
    let mut line = document.to_string();
    line.push('\n');
    // One write per line keeps concurrent lines whole.
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}

fn now_ms() -> i64 {
    i64::try_from(crate::domain::now().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// The metrics of one settled proxy request.
pub fn request_document(namespace: &str, record: &UsageRecord) -> Value {
    let usage = &record.usage;
    let upstream_error = record.status >= 500 || record.status == 429 || record.status == 529;
    // Only models the upstream answered for become a dimension: a client can
    // send any string as a model, and each would be a new metric.
    let model = if (200..300).contains(&record.status) {
        record.model.as_deref().unwrap_or("unknown")
    } else {
        "error"
    };
    let count = |flag: bool| if flag { 1.0 } else { 0.0 };
    let mut metrics = vec![
        ("Requests", "Count", 1.0),
        ("Errors", "Count", count(record.status >= 500)),
        (
            "ClientErrors",
            "Count",
            count((400..500).contains(&record.status)),
        ),
        ("UpstreamErrors", "Count", count(upstream_error)),
        ("Latency", "Milliseconds", record.latency_ms as f64),
        ("InputTokens", "Count", usage.input_tokens as f64),
        ("OutputTokens", "Count", usage.output_tokens as f64),
        (
            "CacheCreationTokens",
            "Count",
            usage.cache_creation_input_tokens as f64,
        ),
        (
            "CacheReadTokens",
            "Count",
            usage.cache_read_input_tokens as f64,
        ),
        ("UpstreamRetries", "Count", f64::from(record.retries)),
        ("EstimatedUsage", "Count", count(record.estimated)),
    ];
    if let Some(ttfb) = record.ttfb_ms {
        metrics.push(("TimeToFirstByte", "Milliseconds", ttfb as f64));
    }
    // Upstream names are an admin's, bounded in length and number.
    let upstream = record.upstream.as_deref().unwrap_or("none");
    document(
        namespace,
        now_ms(),
        &[
            &["Function"],
            &["Function", "Model"],
            &["Function", "Upstream"],
        ],
        &[
            ("Function", "proxy"),
            ("Model", model),
            ("Upstream", upstream),
        ],
        &metrics,
        &[
            ("key_id", json!(record.key_id.as_str())),
            ("request_id", json!(record.request_id)),
            ("status", json!(record.status)),
            ("stream", json!(record.stream)),
            ("error_type", json!(record.error_type)),
        ],
    )
}

pub fn emit_request(record: &UsageRecord) {
    let settings = settings();
    if settings.enabled {
        write_line(&request_document(&settings.namespace, record));
    }
}

/// A counted event of a function, by reason: proxy rejections (quota,
/// rate_limit, authentication …), admin logins (success, failure, locked),
/// usage settled late or not at all.
pub fn emit_event(function: &str, metric: &str, reason: &str) {
    let settings = settings();
    if settings.enabled {
        write_line(&document(
            &settings.namespace,
            now_ms(),
            &[&["Function", "Reason"]],
            &[("Function", function), ("Reason", reason)],
            &[(metric, "Count", 1.0)],
            &[],
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::PresentedKey;
    use crate::domain::usage::TokenUsage;

    #[test]
    fn request_document_is_valid_emf_with_key_as_property() {
        let key = PresentedKey::generate();
        let record = UsageRecord {
            request_id: "relay_1".into(),
            key_id: key.id().clone(),
            at: crate::domain::now(),
            model: Some("claude-opus-5-5".into()),
            requested_model: None,
            method: "POST".into(),
            path: "/v1/messages".into(),
            status: 200,
            stream: true,
            usage: TokenUsage {
                input_tokens: 10,
                output_tokens: 20,
                ..TokenUsage::default()
            },
            estimated: false,
            latency_ms: 1500,
            ttfb_ms: Some(300),
            retries: 1,
            client_ip: "10.0.0.1".into(),
            user_agent: None,
            session_id: None,
            attribution: Default::default(),
            error_type: None,
            upstream: Some("bedrock-us".into()),
            cost: Default::default(),
            budget: Default::default(),
        };
        let doc = request_document("ClaudeRelay", &record);
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "ClaudeRelay");
        assert_eq!(
            directive["Dimensions"],
            json!([
                ["Function"],
                ["Function", "Model"],
                ["Function", "Upstream"]
            ])
        );
        assert_eq!(doc["Upstream"], "bedrock-us");
        // Every declared metric and dimension has a value at the root.
        for metric in directive["Metrics"].as_array().unwrap() {
            assert!(
                doc[metric["Name"].as_str().unwrap()].is_number(),
                "{metric}"
            );
        }
        assert_eq!(doc["Model"], "claude-opus-5-5");
        assert_eq!(doc["OutputTokens"], 20.0);
        assert_eq!(doc["key_id"], key.id().as_str());
        assert!(!directive["Dimensions"].to_string().contains("key_id"));
        assert!(
            !doc.to_string().contains("10.0.0.1"),
            "client IPs stay out of metrics"
        );
    }

    #[test]
    fn failed_requests_do_not_mint_model_dimensions() {
        let key = PresentedKey::generate();
        let mut record = UsageRecord {
            request_id: "r".into(),
            key_id: key.id().clone(),
            at: crate::domain::now(),
            model: Some("attacker-chosen-model-name".into()),
            requested_model: None,
            method: "POST".into(),
            path: "/v1/messages".into(),
            status: 400,
            stream: false,
            usage: TokenUsage::default(),
            estimated: false,
            latency_ms: 1,
            ttfb_ms: None,
            retries: 0,
            client_ip: String::new(),
            user_agent: None,
            session_id: None,
            attribution: Default::default(),
            error_type: Some("invalid_request_error".into()),
            upstream: None,
            cost: Default::default(),
            budget: Default::default(),
        };
        assert_eq!(request_document("N", &record)["Model"], "error");
        record.status = 529;
        assert_eq!(request_document("N", &record)["UpstreamErrors"], 1.0);
    }
}
