//! Amazon Bedrock as an upstream, as pure rules: an Anthropic Messages
//! request turned into a Bedrock `InvokeModel` body (model mapped, betas moved
//! into the body, what Bedrock rejects stripped in pairs), Bedrock's stream
//! chunks rendered as Anthropic SSE, and Bedrock's errors as Anthropic's.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The `anthropic_version` Bedrock requires in the body of Claude requests.
pub const ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";

/// Anthropic's exact ping framing (the space inside is verbatim): Bedrock's
/// event stream never pings, and Claude Code aborts a stream silent for
/// 300 s, so the relay writes its own.
pub const PING: &[u8] = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";

/// The field Bedrock adds to the last event of a stream; Anthropic clients
/// have no use for it and usage is read from the Anthropic `usage` fields.
const INVOCATION_METRICS: &str = "amazon-bedrock-invocationMetrics";

/// One thing Bedrock rejects: a beta and the top-level body fields that
/// travel with it. Both halves go together: a field left without its beta,
/// or a beta without its field, is a hard 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// Betas (exact names) Bedrock answers `invalid beta flag` to.
    pub betas: &'static [&'static str],
    /// Top-level body fields Bedrock answers `Extra inputs are not
    /// permitted` to, stripped when present whether or not a beta came.
    pub fields: &'static [&'static str],
}

/// What Bedrock's `InvokeModel` rejects, the one table to maintain.
///
/// Bedrock checks betas against a list of its own (unknown ones are
/// `400 invalid beta flag`), so a beta Claude Code starts sending tomorrow
/// fails there until it is added here. Betas Bedrock documents stay
/// (`context-1m-2025-08-07`, `interleaved-thinking-2025-05-14`,
/// `computer-use-*`, `token-efficient-tools-2025-02-19`,
/// `output-128k-2025-02-19`, `context-management-2025-06-27`,
/// `effort-2025-11-24`, `tool-search-tool-2025-10-19`,
/// `fine-grained-tool-streaming-2025-05-14`).
///
/// Sources: [4750] router-for-me/CLIProxyAPI#4750 (each flag tried alone
/// against Bedrock, 2026-08); [LL] BerriAI/litellm
/// `litellm/anthropic_beta_headers_config.json`, provider `bedrock` (the
/// Invoke API) and PR #19877; [49648] anthropics/claude-code#49648.
pub const REJECTED: &[Rejected] = &[
    // [4750]: 400 invalid beta flag; [LL]: unsupported. Subscription
    // (OAuth) sign-in has no meaning on Bedrock.
    Rejected {
        betas: &["oauth-2025-04-20"],
        fields: &[],
    },
    // Conflicting sources: [4750] found it accepted and so did Opus 4.6,
    // but [49648] shows Opus 4.7 on Bedrock rejecting it. It marks the
    // client and changes nothing in the answer: stripped, to be safe.
    Rejected {
        betas: &["claude-code-20250219"],
        fields: &[],
    },
    // [4750] and [LL]: rejected.
    Rejected {
        betas: &["prompt-caching-scope-2026-01-05"],
        fields: &[],
    },
    // [4750] and [LL]: rejected; fast mode is asked for with `speed`.
    Rejected {
        betas: &["fast-mode-2026-02-01"],
        fields: &["speed"],
    },
    // [4750]: rejected.
    Rejected {
        betas: &["redact-thinking-2026-02-12"],
        fields: &[],
    },
    // [LL] and litellm PR #19877: MCP connector betas are rejected; the
    // servers travel in `mcp_servers`.
    Rejected {
        betas: &[
            "mcp-servers-2025-12-04",
            "mcp-client-2025-04-04",
            "mcp-client-2025-11-20",
        ],
        fields: &["mcp_servers"],
    },
    // [LL]: skills and the code-execution tool are not on Bedrock; both
    // use the `container` field.
    Rejected {
        betas: &["skills-2025-10-02", "code-execution-2025-08-25"],
        fields: &["container"],
    },
    // [LL]: no Files API on Bedrock.
    Rejected {
        betas: &["files-api-2025-04-14"],
        fields: &[],
    },
    // [LL]: rejected by the Invoke API (accepted by bedrock-mantle only).
    Rejected {
        betas: &["per-turn-control-2026-07-01", "advisor-tool-2026-03-01"],
        fields: &[],
    },
    // No source shows Bedrock's answer to these first-party routing
    // fields; they only choose Anthropic's capacity (priority tier, data
    // residency) and mean nothing to Bedrock, so dropping them loses
    // nothing while sending them risks `Extra inputs are not permitted`.
    Rejected {
        betas: &[],
        fields: &["service_tier", "inference_geo"],
    },
];

/// Betas Bedrock knows under another name ([LL]: tool search is
/// `tool-search-tool-2025-10-19` there, `advanced-tool-use-2025-11-20` on
/// the first-party API; its `defer_loading` tool field needs one of them).
pub const RENAMED: &[(&str, &str)] = &[(
    "advanced-tool-use-2025-11-20",
    "tool-search-tool-2025-10-19",
)];

/// A Messages request as Bedrock takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedrockRequest {
    /// The model the client asked for (its answer names it again).
    pub model: String,
    /// The Bedrock model id (or inference profile) the model mapped to.
    pub model_id: String,
    /// The body for `InvokeModel`: no `model`, no `stream`,
    /// `anthropic_version` and `anthropic_beta` added.
    pub body: Vec<u8>,
    /// Whether the client asked for a stream (`"stream": true`).
    pub streamed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BedrockRequestError {
    #[error("the request body is not a JSON object")]
    NotAnObject,
    #[error("the request has no `model`")]
    NoModel,
    /// The proxy answers 400 `invalid_request_error` with this text.
    #[error("model `{model}` is not served by this upstream; it serves: {}", served.join(", "))]
    UnmappedModel { model: String, served: Vec<String> },
}

/// The Bedrock model id for `model`: the map's entry for exactly `model`;
/// else, when `model` ends in a `-YYYYMMDD` snapshot date, the entry for
/// the name without it (`claude-sonnet-4-5-20250929` → `claude-sonnet-4-5`).
/// No looser prefix: `claude-opus-4` must not catch `claude-opus-4-7`.
pub fn map_model<'a>(model: &str, model_map: &'a BTreeMap<String, String>) -> Option<&'a str> {
    if let Some(id) = model_map.get(model) {
        return Some(id);
    }
    let (base, date) = model.rsplit_once('-')?;
    let is_date = date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit());
    if !is_date {
        return None;
    }
    model_map.get(base).map(String::as_str)
}

/// The betas of the `anthropic-beta` header values (comma-separated, maybe
/// several headers), trimmed, deduplicated in their order.
pub fn betas<'a>(beta_header_values: &[&'a str]) -> Vec<&'a str> {
    let mut betas: Vec<&str> = Vec::new();
    for beta in beta_header_values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
    {
        if !beta.is_empty() && !betas.contains(&beta) {
            betas.push(beta);
        }
    }
    betas
}

/// The Bedrock request for an Anthropic Messages `body` (see
/// [`BedrockRequest`]): rejected betas and their fields stripped together
/// ([`REJECTED`]), renamed betas renamed ([`RENAMED`]).
pub fn bedrock_request(
    body: &[u8],
    beta_header_values: &[&str],
    model_map: &BTreeMap<String, String>,
) -> Result<BedrockRequest, BedrockRequestError> {
    let mut fields: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(fields)) => fields,
        _ => return Err(BedrockRequestError::NotAnObject),
    };
    let model = match fields.shift_remove("model") {
        Some(Value::String(model)) => model,
        _ => return Err(BedrockRequestError::NoModel),
    };
    let model_id = map_model(&model, model_map)
        .ok_or_else(|| BedrockRequestError::UnmappedModel {
            model: model.clone(),
            served: model_map.keys().cloned().collect(),
        })?
        .to_owned();
    let streamed = fields.shift_remove("stream") == Some(Value::Bool(true));
    strip_rejected_fields(&mut fields);
    // A client made for Bedrock may have set these itself; they are set
    // again below, in Bedrock's order.
    fields.shift_remove("anthropic_version");
    let in_body = fields.shift_remove("anthropic_beta");
    let betas = bedrock_betas(beta_header_values, in_body.as_ref());
    // Bedrock's own key comes first, as in its documentation's examples.
    let mut out = Map::with_capacity(fields.len() + 2);
    out.insert(
        "anthropic_version".to_owned(),
        Value::from(ANTHROPIC_VERSION),
    );
    if !betas.is_empty() {
        out.insert("anthropic_beta".to_owned(), Value::from(betas));
    }
    out.extend(fields);
    let body =
        serde_json::to_vec(&Value::Object(out)).map_err(|_| BedrockRequestError::NotAnObject)?;
    Ok(BedrockRequest {
        model,
        model_id,
        body,
        streamed,
    })
}

fn strip_rejected_fields(fields: &mut Map<String, Value>) {
    for rejected in REJECTED {
        for field in rejected.fields {
            fields.shift_remove(*field);
        }
    }
}

/// The header's betas as Bedrock takes them, plus any the client already
/// put in the body's `anthropic_beta` (an SDK made for Bedrock does).
fn bedrock_betas(beta_header_values: &[&str], in_body: Option<&Value>) -> Vec<String> {
    let in_body: Vec<&str> = in_body
        .and_then(Value::as_array)
        .map(|betas| betas.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut all: Vec<&str> = betas(beta_header_values);
    for beta in betas(&in_body) {
        if !all.contains(&beta) {
            all.push(beta);
        }
    }
    let mut out: Vec<String> = Vec::with_capacity(all.len());
    for beta in all {
        if REJECTED.iter().any(|r| r.betas.contains(&beta)) {
            continue;
        }
        let beta = RENAMED
            .iter()
            .find(|(from, _)| *from == beta)
            .map_or(beta, |(_, to)| *to);
        if !out.iter().any(|b| b == beta) {
            out.push(beta.to_owned());
        }
    }
    out
}

/// Why a stream chunk could not be rendered as SSE.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("the stream chunk is not a JSON object")]
    NotAnObject,
    #[error("the stream chunk has no event `type`")]
    NoType,
}

/// One Bedrock stream chunk (the bytes of an Anthropic streaming event's
/// JSON) as Anthropic frames it: `event: <type>\ndata: <json>\n\n`. The
/// JSON passes byte for byte unless it carries Bedrock's invocation
/// metrics (removed: usage is read from Anthropic's `usage` fields only)
/// or a line break (which would end the `data:` line).
pub fn sse_event(chunk_json: &[u8], model: &str) -> Result<Vec<u8>, ChunkError> {
    let mut event: Map<String, Value> = match serde_json::from_slice(chunk_json) {
        Ok(Value::Object(event)) => event,
        _ => return Err(ChunkError::NotAnObject),
    };
    let event_type = match event.get("type") {
        Some(Value::String(event_type)) if !event_type.contains(['\n', '\r']) => event_type.clone(),
        _ => return Err(ChunkError::NoType),
    };
    // The answer names the model the client asked for, as Anthropic's
    // does (and as prices and allowlists know it), not Bedrock's id.
    let renamed = match event.get_mut("message").and_then(|m| m.get_mut("model")) {
        Some(named) if named.as_str() != Some(model) => {
            *named = Value::from(model);
            true
        }
        _ => false,
    };
    let rewritten;
    let data: &[u8] = if event.shift_remove(INVOCATION_METRICS).is_some()
        || renamed
        || chunk_json.iter().any(|b| matches!(b, b'\n' | b'\r'))
    {
        rewritten =
            serde_json::to_vec(&Value::Object(event)).map_err(|_| ChunkError::NotAnObject)?;
        &rewritten
    } else {
        chunk_json.trim_ascii()
    };
    let mut out = Vec::with_capacity(data.len() + event_type.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event_type.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Ok(out)
}

/// A non-streamed answer's JSON with `model` set to the one the client
/// asked for; anything else is returned as it is.
pub fn with_model(message: Vec<u8>, model: &str) -> Vec<u8> {
    super::model_catalog::with_model(&message, model).unwrap_or(message)
}

/// An Anthropic error: HTTP status and error `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnthropicError {
    pub status: u16,
    pub error_type: &'static str,
}

/// The Anthropic status and error type for a Bedrock error code (the
/// exception's name, as `x-amzn-errortype` and the SDK's `code()` give it;
/// the event stream's camel-case names map the same). What Bedrock may not
/// have processed stays 429/5xx/529 so failover can try elsewhere.
pub fn anthropic_error(bedrock_code: &str) -> AnthropicError {
    // `x-amzn-errortype` may carry `:<namespace>` after the name.
    let code = bedrock_code
        .split(':')
        .next()
        .unwrap_or(bedrock_code)
        .trim();
    let (status, error_type) = match code.to_ascii_lowercase().as_str() {
        "throttlingexception" | "servicequotaexceededexception" => (429, "rate_limit_error"),
        "validationexception" => (400, "invalid_request_error"),
        "accessdeniedexception" | "unrecognizedclientexception" => (403, "permission_error"),
        "resourcenotfoundexception" => (404, "not_found_error"),
        "modelnotreadyexception" | "serviceunavailableexception" => (529, "overloaded_error"),
        // Anthropic has no gateway timeout of its own; 504 with its
        // `timeout_error` type is what its API answers for one.
        "modeltimeoutexception" => (504, "timeout_error"),
        _ => (500, "api_error"),
    };
    AnthropicError { status, error_type }
}

fn error_json(error_type: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": error_type, "message": message },
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Anthropic's error body: `{"type":"error","error":{"type":…,"message":…}}`.
pub fn error_body(error_type: &str, message: &str) -> Vec<u8> {
    error_json(error_type, message)
}

/// The in-stream error event for a failure after the first byte, as
/// Anthropic sends it: `event: error\ndata: {"type":"error",…}\n\n`.
pub fn error_event(error_type: &str, message: &str) -> Vec<u8> {
    let mut out = b"event: error\ndata: ".to_vec();
    out.extend_from_slice(&error_json(error_type, message));
    out.extend_from_slice(b"\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sonnet_map() -> BTreeMap<String, String> {
        map(&[
            (
                "claude-sonnet-4-5",
                "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            ),
            ("claude-opus-4-7", "global.anthropic.claude-opus-4-7"),
        ])
    }

    fn translate(body: &str, betas: &[&str]) -> (BedrockRequest, Value) {
        let request = bedrock_request(body.as_bytes(), betas, &sonnet_map()).unwrap();
        let json = serde_json::from_slice(&request.body).unwrap();
        (request, json)
    }

    #[test]
    fn the_model_maps_by_exact_id_and_leaves_the_body_with_stream_as_the_operation() {
        let (request, json) = translate(
            r#"{"model":"claude-opus-4-7","max_tokens":5,"stream":true,"messages":[]}"#,
            &[],
        );
        assert_eq!(request.model_id, "global.anthropic.claude-opus-4-7");
        assert!(request.streamed);
        assert_eq!(
            String::from_utf8(request.body).unwrap(),
            r#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}"#
        );
        assert!(json.get("model").is_none() && json.get("stream").is_none());
    }

    #[test]
    fn a_dated_snapshot_maps_through_its_undated_name_but_no_looser_prefix_does() {
        let models = sonnet_map();
        assert_eq!(
            map_model("claude-sonnet-4-5-20250929", &models),
            Some("us.anthropic.claude-sonnet-4-5-20250929-v1:0")
        );
        assert_eq!(map_model("claude-sonnet-4-5-2025092", &models), None);
        assert_eq!(map_model("claude-sonnet-4-5-x", &models), None);
        assert_eq!(map_model("claude-sonnet-4", &models), None);
        assert_eq!(map_model("claude-opus-4-7-1m", &models), None);
        let models = map(&[("claude-opus-4", "old")]);
        assert_eq!(map_model("claude-opus-4-7", &models), None);
    }

    #[test]
    fn an_unmapped_model_names_itself_and_the_models_served() {
        let error =
            bedrock_request(br#"{"model":"claude-haiku-5-5"}"#, &[], &sonnet_map()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "model `claude-haiku-5-5` is not served by this upstream; it serves: claude-opus-4-7, claude-sonnet-4-5"
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_with_a_model_is_refused() {
        let models = sonnet_map();
        assert_eq!(
            bedrock_request(b"[]", &[], &models),
            Err(BedrockRequestError::NotAnObject)
        );
        assert_eq!(
            bedrock_request(b"{", &[], &models),
            Err(BedrockRequestError::NotAnObject)
        );
        assert_eq!(
            bedrock_request(b"{}", &[], &models),
            Err(BedrockRequestError::NoModel)
        );
        assert_eq!(
            bedrock_request(br#"{"model":5}"#, &[], &models),
            Err(BedrockRequestError::NoModel)
        );
    }

    #[test]
    fn stream_false_or_absent_is_not_streamed() {
        let (request, json) = translate(r#"{"model":"claude-opus-4-7","stream":false}"#, &[]);
        assert!(!request.streamed);
        assert!(json.get("stream").is_none());
        let (request, _) = translate(r#"{"model":"claude-opus-4-7"}"#, &[]);
        assert!(!request.streamed);
    }

    #[test]
    fn betas_of_every_header_go_into_the_body_once_in_order() {
        let (_, json) = translate(
            r#"{"model":"claude-opus-4-7"}"#,
            &[
                "context-1m-2025-08-07, interleaved-thinking-2025-05-14",
                "interleaved-thinking-2025-05-14,,computer-use-2025-01-24",
            ],
        );
        assert_eq!(
            json["anthropic_beta"],
            serde_json::json!([
                "context-1m-2025-08-07",
                "interleaved-thinking-2025-05-14",
                "computer-use-2025-01-24"
            ])
        );
    }

    #[test]
    fn no_betas_means_no_anthropic_beta_field() {
        let (_, json) = translate(r#"{"model":"claude-opus-4-7"}"#, &[" , "]);
        assert!(json.get("anthropic_beta").is_none());
    }

    #[test]
    fn betas_already_in_the_body_are_kept_and_filtered_like_the_header() {
        let (_, json) = translate(
            r#"{"model":"claude-opus-4-7","anthropic_beta":["oauth-2025-04-20","effort-2025-11-24"]}"#,
            &["effort-2025-11-24,context-1m-2025-08-07"],
        );
        assert_eq!(
            json["anthropic_beta"],
            serde_json::json!(["effort-2025-11-24", "context-1m-2025-08-07"])
        );
    }

    #[test]
    fn every_rejected_beta_and_its_fields_are_stripped_together() {
        for rejected in REJECTED {
            let mut body = serde_json::json!({"model": "claude-opus-4-7", "max_tokens": 1});
            for field in rejected.fields {
                body[*field] = serde_json::json!({"x": 1});
            }
            let mut header = rejected.betas.to_vec();
            header.push("context-1m-2025-08-07");
            let header = header.join(",");
            let (_, json) = translate(&body.to_string(), &[&header]);
            for field in rejected.fields {
                assert!(json.get(*field).is_none(), "{field} stayed");
            }
            assert_eq!(
                json["anthropic_beta"],
                serde_json::json!(["context-1m-2025-08-07"]),
                "{rejected:?}"
            );
            assert_eq!(json["max_tokens"], 1);
        }
    }

    #[test]
    fn the_table_names_the_known_rejections_and_keeps_what_bedrock_supports() {
        let rejected = |beta: &str| REJECTED.iter().any(|r| r.betas.contains(&beta));
        let stripped = |field: &str| REJECTED.iter().any(|r| r.fields.contains(&field));
        for beta in [
            "oauth-2025-04-20",
            "claude-code-20250219",
            "prompt-caching-scope-2026-01-05",
            "mcp-servers-2025-12-04",
            "fast-mode-2026-02-01",
        ] {
            assert!(rejected(beta), "{beta}");
        }
        for beta in [
            "context-1m-2025-08-07",
            "interleaved-thinking-2025-05-14",
            "computer-use-2024-10-22",
            "computer-use-2025-01-24",
            "token-efficient-tools-2025-02-19",
            "context-management-2025-06-27",
            "fine-grained-tool-streaming-2025-05-14",
            "effort-2025-11-24",
        ] {
            assert!(!rejected(beta), "{beta}");
        }
        for field in ["mcp_servers", "container", "service_tier", "inference_geo"] {
            assert!(stripped(field), "{field}");
        }
        // Fields that travel with betas Bedrock supports stay.
        for field in [
            "context_management",
            "output_config",
            "thinking",
            "metadata",
            "tools",
        ] {
            assert!(!stripped(field), "{field}");
        }
    }

    #[test]
    fn a_field_whose_beta_bedrock_supports_stays_with_its_beta() {
        let (_, json) = translate(
            r#"{"model":"claude-opus-4-7","context_management":{"edits":[]},"metadata":{"user_id":"u"}}"#,
            &["context-management-2025-06-27"],
        );
        assert_eq!(json["context_management"], serde_json::json!({"edits": []}));
        assert_eq!(json["metadata"]["user_id"], "u");
        assert_eq!(
            json["anthropic_beta"],
            serde_json::json!(["context-management-2025-06-27"])
        );
    }

    #[test]
    fn a_beta_bedrock_names_differently_is_renamed_once() {
        let (_, json) = translate(
            r#"{"model":"claude-opus-4-7"}"#,
            &["advanced-tool-use-2025-11-20,tool-search-tool-2025-10-19"],
        );
        assert_eq!(
            json["anthropic_beta"],
            serde_json::json!(["tool-search-tool-2025-10-19"])
        );
    }

    #[test]
    fn the_rest_of_the_body_keeps_its_order_and_values() {
        let (request, _) = translate(
            r#"{"system":[{"type":"text","text":"é"}],"model":"claude-opus-4-7","messages":[{"role":"user","content":"hi"}],"max_tokens":128000,"stream":true}"#,
            &["interleaved-thinking-2025-05-14"],
        );
        assert_eq!(
            String::from_utf8(request.body).unwrap(),
            r#"{"anthropic_version":"bedrock-2023-05-31","anthropic_beta":["interleaved-thinking-2025-05-14"],"system":[{"type":"text","text":"é"}],"messages":[{"role":"user","content":"hi"}],"max_tokens":128000}"#
        );
    }

    #[test]
    fn a_chunk_is_framed_as_anthropic_sse_byte_for_byte() {
        let chunk = br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#;
        let mut expected = b"event: content_block_delta\ndata: ".to_vec();
        expected.extend_from_slice(chunk);
        expected.extend_from_slice(b"\n\n");
        assert_eq!(sse_event(chunk, "claude-sonnet-4-5").unwrap(), expected);
    }

    #[test]
    fn the_invocation_metrics_leave_and_the_usage_stays() {
        let chunk = br#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":12},"amazon-bedrock-invocationMetrics":{"inputTokenCount":25,"outputTokenCount":12,"invocationLatency":900,"firstByteLatency":300}}"#;
        assert_eq!(
            String::from_utf8(sse_event(chunk, "claude-sonnet-4-5").unwrap()).unwrap(),
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":12}}\n\n"
        );
    }

    #[test]
    fn a_chunk_with_line_breaks_is_written_on_one_data_line() {
        let chunk = b"{\n  \"type\": \"message_stop\"\n}";
        assert_eq!(
            sse_event(chunk, "claude-sonnet-4-5").unwrap(),
            b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_vec()
        );
    }

    #[test]
    fn a_chunk_without_an_event_type_is_an_error() {
        assert_eq!(
            sse_event(b"[1]", "claude-sonnet-4-5"),
            Err(ChunkError::NotAnObject)
        );
        assert_eq!(
            sse_event(b"nope", "claude-sonnet-4-5"),
            Err(ChunkError::NotAnObject)
        );
        assert_eq!(
            sse_event(br#"{"a":1}"#, "claude-sonnet-4-5"),
            Err(ChunkError::NoType)
        );
        assert_eq!(
            sse_event(br#"{"type":1}"#, "claude-sonnet-4-5"),
            Err(ChunkError::NoType)
        );
        assert_eq!(
            sse_event(br#"{"type":"a\nb"}"#, "claude-sonnet-4-5"),
            Err(ChunkError::NoType)
        );
    }

    #[test]
    fn the_answer_names_the_model_the_client_asked_for() {
        let start = br#"{"type":"message_start","message":{"id":"m","model":"us.anthropic.claude-sonnet-4-5-20250929-v1:0","usage":{"input_tokens":3}}}"#;
        assert_eq!(
            String::from_utf8(sse_event(start, "claude-sonnet-4-5").unwrap()).unwrap(),
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":3}}}\n\n"
        );
        let whole = br#"{"id":"m","model":"anthropic.claude-x","content":[]}"#.to_vec();
        assert_eq!(
            with_model(whole, "claude-x"),
            br#"{"id":"m","model":"claude-x","content":[]}"#.to_vec()
        );
        assert_eq!(with_model(b"[1]".to_vec(), "claude-x"), b"[1]".to_vec());
    }

    #[test]
    fn the_ping_is_anthropics() {
        assert_eq!(PING, b"event: ping\ndata: {\"type\": \"ping\"}\n\n");
    }

    #[test]
    fn bedrock_errors_map_to_anthropic_statuses_and_types() {
        let cases = [
            ("ThrottlingException", 429, "rate_limit_error"),
            ("ServiceQuotaExceededException", 429, "rate_limit_error"),
            ("throttlingException", 429, "rate_limit_error"),
            (
                "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/",
                429,
                "rate_limit_error",
            ),
            ("ValidationException", 400, "invalid_request_error"),
            ("validationException", 400, "invalid_request_error"),
            ("AccessDeniedException", 403, "permission_error"),
            ("UnrecognizedClientException", 403, "permission_error"),
            ("ResourceNotFoundException", 404, "not_found_error"),
            ("ModelNotReadyException", 529, "overloaded_error"),
            ("ServiceUnavailableException", 529, "overloaded_error"),
            ("serviceUnavailableException", 529, "overloaded_error"),
            ("ModelTimeoutException", 504, "timeout_error"),
            ("modelTimeoutException", 504, "timeout_error"),
            ("ModelStreamErrorException", 500, "api_error"),
            ("modelStreamErrorException", 500, "api_error"),
            ("InternalServerException", 500, "api_error"),
            ("ModelErrorException", 500, "api_error"),
            ("SomethingNew", 500, "api_error"),
        ];
        for (code, status, error_type) in cases {
            assert_eq!(
                anthropic_error(code),
                AnthropicError { status, error_type },
                "{code}"
            );
        }
    }

    #[test]
    fn error_bodies_and_events_use_anthropics_envelope() {
        assert_eq!(
            String::from_utf8(error_body("rate_limit_error", "Too many \"requests\"")).unwrap(),
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Too many \"requests\""}}"#
        );
        assert_eq!(
            String::from_utf8(error_event("api_error", "boom")).unwrap(),
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"boom\"}}\n\n"
        );
    }
}
