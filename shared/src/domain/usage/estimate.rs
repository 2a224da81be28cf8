//! The estimate for answers cut short: tiktoken over the request's text for
//! input never reported, over the deltas seen for output never reported.

use super::AnswerUsage;

/// Counts tokens with tiktoken's cl100k_base: not Claude's tokenizer, but a
/// close, deterministic stand-in for charging a cut stream.
pub fn estimate_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    tiktoken_rs::cl100k_base_singleton().count_ordinary(text) as u64
}

/// The text of a Messages request that becomes input tokens: system prompt,
/// message contents and tool definitions, without the JSON around them.
pub fn request_text(body: &[u8]) -> String {
    fn collect(value: &serde_json::Value, out: &mut String) {
        match value {
            serde_json::Value::String(s) => {
                out.push_str(s);
                out.push(' ');
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            serde_json::Value::Object(map) => map.values().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut text = String::new();
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        for field in ["system", "messages", "tools"] {
            if let Some(value) = map.get(field) {
                collect(value, &mut text);
            }
        }
    }
    text
}

/// Fills in what a cut answer did not report: input from the request when
/// `message_start` never came, output from the deltas seen when the final
/// `message_delta` never came. Returns whether anything was estimated.
pub fn complete_with_estimate(state: &mut AnswerUsage, request_body: &[u8]) -> bool {
    if state.is_complete() {
        return false;
    }
    if !state.saw_message_start {
        state.usage.input_tokens = estimate_tokens(&request_text(request_body));
    }
    if !state.saw_usage_delta {
        let estimated = estimate_tokens(&state.delta_text());
        state.usage.output_tokens = state.usage.output_tokens.max(estimated);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::SseUsageParser;
    use crate::domain::usage::sse::tests::STREAM;

    #[test]
    fn cut_stream_is_completed_with_an_estimate() {
        let cut = STREAM.split("event: message_delta").next().unwrap();
        let mut parser = SseUsageParser::new();
        parser.feed(cut.as_bytes());
        let mut state = parser.into_state();
        assert!(!state.is_complete());
        assert_eq!(state.delta_text(), "Hello wörld ✓");
        assert!(complete_with_estimate(&mut state, b"{}"));
        assert_eq!(state.usage.input_tokens, 472, "reported input is kept");
        assert!(state.usage.output_tokens >= 3);
    }

    #[test]
    fn request_text_is_estimated_when_nothing_arrived() {
        let body = br#"{"model":"m","system":"You are terse.","messages":[{"role":"user","content":[{"type":"text","text":"say hello to the whole world please"}]}]}"#;
        let mut state = AnswerUsage::default();
        assert!(complete_with_estimate(&mut state, body));
        assert!(
            state.usage.input_tokens >= 8,
            "{}",
            state.usage.input_tokens
        );
        assert_eq!(state.usage.output_tokens, 0);
    }
}

// TEMP (replaced by h-est)
pub const CONTEXT_WINDOW: u64 = 200_000;
pub const LONG_CONTEXT_WINDOW: u64 = 1_000_000;
pub fn worst_prompt_tokens(body: &[u8], context_window: u64) -> u64 {
    (u64::try_from(body.len()).unwrap_or(u64::MAX)).clamp(1, context_window)
}
