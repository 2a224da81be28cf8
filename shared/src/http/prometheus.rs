//! `GET /admin/metrics`: Prometheus text exposition (format 0.0.4) of the
//! per-key counters settlement keeps in DynamoDB.

use std::fmt::Write;

use crate::store::usage_log::KeyUsage;

/// Label values escape backslash, double quote and newline.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

pub fn render(keys: &[KeyUsage]) -> String {
    let mut out = String::new();
    let labels = |k: &KeyUsage| {
        format!(
            "key_id=\"{}\",key_name=\"{}\"",
            label(k.key.id.as_str()),
            label(&k.key.name)
        )
    };
    out.push_str("# HELP relay_requests_total Requests relayed and settled, per key.\n");
    out.push_str("# TYPE relay_requests_total counter\n");
    for key in keys {
        let _ = writeln!(
            out,
            "relay_requests_total{{{}}} {}",
            labels(key),
            key.totals.requests
        );
    }
    out.push_str(
        "# HELP relay_tokens_used_total Tokens billed by the upstream, per key and token type.\n",
    );
    out.push_str("# TYPE relay_tokens_used_total counter\n");
    for key in keys {
        let t = &key.totals;
        for (kind, value) in [
            ("input", t.input_tokens),
            ("output", t.output_tokens),
            ("cache_creation", t.cache_creation_input_tokens),
            ("cache_read", t.cache_read_input_tokens),
        ] {
            let _ = writeln!(
                out,
                "relay_tokens_used_total{{{},type=\"{kind}\"}} {value}",
                labels(key)
            );
        }
    }
    out.push_str("# HELP relay_token_quota_usage_ratio Share of the key's token limit used (keys with a limit).\n");
    out.push_str("# TYPE relay_token_quota_usage_ratio gauge\n");
    for key in keys {
        if let Some(limit) = key.key.token_limit {
            let ratio = if limit == 0 {
                1.0
            } else {
                key.key.tokens_used as f64 / limit as f64
            };
            let _ = writeln!(
                out,
                "relay_token_quota_usage_ratio{{{}}} {ratio}",
                labels(key)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
