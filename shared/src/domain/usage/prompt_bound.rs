//! The most input tokens a Messages request can be billed, read from its
//! body before it is forwarded: what a `limit_mode: hard` key reserves.
//!
//! cl100k_base (tiktoken) over the text that becomes input, times a margin
//! for Claude's tokenizer, plus fixed overheads for what the API adds, with
//! media at fixed bounds and input the body cannot show (PDFs, URLs, files,
//! server tools) at the whole context window.

use serde_json::{Map, Value};

use super::estimate::{chunks, count_chunk};

/// The most input a request can have on a model's default context window.
pub const CONTEXT_WINDOW: u64 = 200_000;
/// …with the `context-1m-*` beta in `anthropic-beta`.
pub const LONG_CONTEXT_WINDOW: u64 = 1_000_000;

/// cl100k's count is multiplied by 9/5. Claude's tokenizers cut the same
/// text finer than cl100k: by 20–30 % on published comparisons, most on code
/// and technical text, and the newer Claude tokenizers take up to 35 % more
/// than the older ones; 1.30 × 1.35 ≈ 1.76, rounded up.
const MARGIN_NUMERATOR: u64 = 9;
const MARGIN_DENOMINATOR: u64 = 5;

/// Once per request: the turn and system-prompt framing the API wraps
/// around the content.
const REQUEST_OVERHEAD_TOKENS: u64 = 50;
/// Per message: its role marker and separators.
const MESSAGE_OVERHEAD_TOKENS: u64 = 10;
/// Per content block (text, image, tool call, …): its delimiters.
const BLOCK_OVERHEAD_TOKENS: u64 = 10;
/// Per top-level argument of a tool call: the API renders each one in its
/// own tagged element, wordier than the JSON key counted as text.
const TOOL_ARGUMENT_OVERHEAD_TOKENS: u64 = 10;
/// Once when `tools` is present: the tool-use system prompt the API adds
/// (documented at 313–346 tokens on Claude 4, up to 530 on Claude 3, plus
/// ~500 more for the computer-use prompt), rounded up.
const TOOL_USE_SYSTEM_PROMPT_TOKENS: u64 = 1_100;
/// Per tool definition, on top of its JSON counted as text: its framing.
const TOOL_DEFINITION_OVERHEAD_TOKENS: u64 = 20;
/// Per Anthropic-defined client tool (`bash_*`, `text_editor_*`,
/// `computer_*`, `memory_*`, `tool_search_tool_*`): the definition the API
/// substitutes for the short one in the body (documented at 245 for bash,
/// 700 for the text editor, 735 for computer use), rounded up.
const ANTHROPIC_TOOL_TOKENS: u64 = 1_500;
/// Per image, whatever its byte size or source: the API scales an image
/// down to at most ~1.15 megapixels (1568 px on the long edge), about 1,600
/// tokens at width × height / 750; newer models accept up to ~3.75
/// megapixels (~5,000 tokens). 6,000 covers both with room to spare.
const IMAGE_TOKENS: u64 = 6_000;

/// Tool types whose input the relay can see in the body: custom tools and
/// Anthropic-defined client tools. Any other type is a server tool (web
/// search, web fetch, code execution, …) whose results the upstream fetches
/// and adds as input.
const ANTHROPIC_CLIENT_TOOL_PREFIXES: [&str; 5] = [
    "bash_",
    "text_editor_",
    "computer_",
    "memory_",
    // Tool search only loads definitions that are in the body already.
    "tool_search_tool_",
];

/// The worst-case input tokens of a `POST /v1/messages` body on a model
/// with this context window: never more than the window (no request is
/// billed more input), never less than 1. A body that is not a JSON object
/// counts one token per byte (no token is shorter than a byte).
///
/// Cost is linear in the body and stops once the window is reached; the
/// text is tokenized in bounded chunks, so no input makes tiktoken slow.
pub fn worst_prompt_tokens(body: &[u8], context_window: u64) -> u64 {
    let bound = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(request)) => {
            let mut tally = Tally::new(context_window);
            tally.request(&request);
            tally.bound()
        }
        _ => body.len() as u64,
    };
    bound.min(context_window).max(1)
}

/// The running bound: cl100k tokens of the text seen (before the margin)
/// and the fixed tokens added.
struct Tally {
    text_tokens: u64,
    fixed_tokens: u64,
    context_window: u64,
}

impl Tally {
    fn new(context_window: u64) -> Self {
        Tally {
            text_tokens: 0,
            fixed_tokens: 0,
            context_window,
        }
    }

    fn bound(&self) -> u64 {
        self.text_tokens
            .saturating_mul(MARGIN_NUMERATOR)
            .div_ceil(MARGIN_DENOMINATOR)
            .saturating_add(self.fixed_tokens)
    }

    /// Whether the window is reached: nothing more can raise the result.
    fn is_full(&self) -> bool {
        self.bound() >= self.context_window
    }

    fn add_fixed(&mut self, tokens: u64) {
        self.fixed_tokens = self.fixed_tokens.saturating_add(tokens);
    }

    /// Input the body cannot bound: the whole window.
    fn add_whole_window(&mut self) {
        self.add_fixed(self.context_window);
    }

    fn add_text(&mut self, text: &str) {
        for chunk in chunks(text) {
            if self.is_full() {
                return;
            }
            self.text_tokens = self.text_tokens.saturating_add(count_chunk(chunk));
        }
    }

    /// A value the API renders as JSON (a tool's schema, a call's
    /// arguments): its compact JSON counted as text.
    fn add_json(&mut self, value: &Value) {
        if !self.is_full() {
            self.add_text(&value.to_string());
        }
    }

    fn request(&mut self, request: &Map<String, Value>) {
        self.add_fixed(REQUEST_OVERHEAD_TOKENS);
        // MCP servers' tools and results and a container's files (skills)
        // become input the body does not show.
        let has_mcp_servers = request
            .get("mcp_servers")
            .and_then(Value::as_array)
            .is_some_and(|servers| !servers.is_empty());
        if has_mcp_servers || request.get("container").is_some() {
            self.add_whole_window();
            return;
        }
        if let Some(tools) = request.get("tools").and_then(Value::as_array) {
            self.tools(tools);
        }
        // Small, but rendered into the prompt: the forced tool choice and a
        // structured-output schema.
        for field in ["tool_choice", "output_format", "output_config"] {
            if let Some(value) = request.get(field) {
                self.add_json(value);
            }
        }
        if let Some(system) = request.get("system") {
            self.content(system);
        }
        for message in request
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.add_fixed(MESSAGE_OVERHEAD_TOKENS);
            if let Some(content) = message.get("content") {
                self.content(content);
            }
        }
    }

    fn tools(&mut self, tools: &[Value]) {
        if tools.is_empty() {
            return;
        }
        self.add_fixed(TOOL_USE_SYSTEM_PROMPT_TOKENS);
        for tool in tools {
            match tool.get("type").and_then(Value::as_str) {
                None | Some("custom") => {}
                Some(kind)
                    if ANTHROPIC_CLIENT_TOOL_PREFIXES
                        .iter()
                        .any(|prefix| kind.starts_with(prefix)) =>
                {
                    self.add_fixed(ANTHROPIC_TOOL_TOKENS);
                }
                Some(_) => {
                    self.add_whole_window();
                    return;
                }
            }
            self.add_fixed(TOOL_DEFINITION_OVERHEAD_TOKENS);
            self.add_json(tool);
        }
    }

    /// A `content` (or `system`) value: a string, blocks, or anything else
    /// walked for the strings it holds.
    fn content(&mut self, value: &Value) {
        if self.is_full() {
            return;
        }
        match value {
            Value::String(text) => self.add_text(text),
            Value::Array(items) => items.iter().for_each(|item| self.content(item)),
            Value::Object(object) => match object.get("type").and_then(Value::as_str) {
                Some(kind) => self.block(kind, object),
                None => object.values().for_each(|value| self.content(value)),
            },
            // Numbers, booleans: a token or two, inside the overheads.
            _ => {}
        }
    }

    /// One typed content block. Text, thinking (its signature included: it
    /// carries the thinking the API may restore), tool results, search
    /// results and blocks of types unknown here are walked for their
    /// strings; media and calls are counted by their own rules.
    fn block(&mut self, kind: &str, block: &Map<String, Value>) {
        self.add_fixed(BLOCK_OVERHEAD_TOKENS);
        match kind {
            // Never tokenize base64 image data: it says nothing of the
            // image's tokens and costs CPU.
            "image" => self.add_fixed(IMAGE_TOKENS),
            "document" => self.document(block),
            // A file put in the code-execution container: unseen.
            "container_upload" => self.add_whole_window(),
            "tool_use" | "server_tool_use" | "mcp_tool_use" => {
                for field in ["name", "server_name"] {
                    if let Some(name) = block.get(field).and_then(Value::as_str) {
                        self.add_text(name);
                    }
                }
                if let Some(input) = block.get("input") {
                    let arguments = input.as_object().map_or(0, Map::len) as u64;
                    self.add_fixed(arguments.saturating_mul(TOOL_ARGUMENT_OVERHEAD_TOKENS));
                    self.add_json(input);
                }
            }
            _ => {
                for (field, value) in block {
                    // `type` is the block's tag, `cache_control` an
                    // instruction to the API: neither is rendered.
                    if field != "type" && field != "cache_control" {
                        self.content(value);
                    }
                }
            }
        }
    }

    /// A `document` block: a plain-text source is tokenized, a `content`
    /// source walked; a PDF (base64), URL or file source cannot be bounded
    /// from the body (a PDF page is text plus an image of the page).
    fn document(&mut self, document: &Map<String, Value>) {
        for field in ["title", "context"] {
            if let Some(text) = document.get(field).and_then(Value::as_str) {
                self.add_text(text);
            }
        }
        let source = document.get("source");
        match source.and_then(|s| s.get("type")).and_then(Value::as_str) {
            Some("text") => {
                if let Some(data) = source.and_then(|s| s.get("data")).and_then(Value::as_str) {
                    self.add_text(data);
                }
            }
            Some("content") => {
                if let Some(content) = source.and_then(|s| s.get("content")) {
                    self.content(content);
                }
            }
            _ => self.add_whole_window(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::estimate::tests::{fixture_bodies, hostile_samples};
    use crate::domain::usage::{estimate_tokens, request_text};
    use serde_json::json;

    fn bound(body: &Value) -> u64 {
        worst_prompt_tokens(&serde_json::to_vec(body).unwrap(), CONTEXT_WINDOW)
    }

    fn user_says(content: Value) -> Value {
        json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": content}]})
    }

    #[test]
    fn text_is_counted_with_the_margin_and_overheads() {
        // "hello world" is 2 cl100k tokens: ⌈2 × 9/5⌉ = 4, + request 50,
        // + message 10.
        assert_eq!(bound(&user_says(json!("hello world"))), 4 + 50 + 10);
        // As a block: + block 10.
        let block = json!([{"type": "text", "text": "hello world", "cache_control": {"type": "ephemeral"}}]);
        assert_eq!(bound(&user_says(block)), 4 + 50 + 10 + 10);
    }

    #[test]
    fn every_fixture_is_bounded_above_its_cl100k_count_and_below_the_window() {
        for (name, body) in fixture_bodies() {
            let counted = estimate_tokens(&request_text(&body));
            let worst = worst_prompt_tokens(&body, CONTEXT_WINDOW);
            assert!(
                worst >= counted * 9 / 5,
                "{name}: {worst} < {counted} × 9/5"
            );
            assert!(worst < CONTEXT_WINDOW, "{name}: {worst}");
        }
    }

    #[test]
    fn an_image_counts_its_bound_not_its_base64_size() {
        let image = |data: String| {
            user_says(
                json!([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]),
            )
        };
        let expected = 50 + 10 + 10 + IMAGE_TOKENS;
        assert_eq!(bound(&image("QUJD".to_owned())), expected);
        assert_eq!(bound(&image("QUJD".repeat(500_000))), expected);
        let by_url = json!([{"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]);
        assert_eq!(bound(&user_says(by_url)), expected);
        // In a tool result, too.
        let in_result = json!([{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}]);
        assert!(bound(&user_says(in_result)) >= expected + BLOCK_OVERHEAD_TOKENS);
    }

    #[test]
    fn a_document_the_body_cannot_show_costs_the_whole_window() {
        for source in [
            json!({"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}),
            json!({"type": "url", "url": "https://example.com/a.pdf"}),
            json!({"type": "file", "file_id": "file_1"}),
        ] {
            let body = user_says(json!([{"type": "document", "source": source}]));
            assert_eq!(bound(&body), CONTEXT_WINDOW, "{source}");
            let long = serde_json::to_vec(&body).unwrap();
            assert_eq!(
                worst_prompt_tokens(&long, LONG_CONTEXT_WINDOW),
                LONG_CONTEXT_WINDOW
            );
        }
        let upload = user_says(json!([{"type": "container_upload", "file_id": "file_1"}]));
        assert_eq!(bound(&upload), CONTEXT_WINDOW);
    }

    #[test]
    fn a_text_document_is_tokenized() {
        let text = json!([{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "hello world"}}]);
        // 2 tokens → 4, + request 50, message 10, block 10.
        assert_eq!(bound(&user_says(text)), 4 + 50 + 10 + 10);
        let content = json!([{"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "hello world"}]}}]);
        assert_eq!(bound(&user_says(content)), 4 + 50 + 10 + 10 + 10);
    }

    #[test]
    fn input_fetched_by_the_upstream_costs_the_whole_window() {
        let mut web_search = user_says(json!("hi"));
        web_search["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
        assert_eq!(bound(&web_search), CONTEXT_WINDOW);
        let mut mcp = user_says(json!("hi"));
        mcp["mcp_servers"] =
            json!([{"type": "url", "url": "https://example.com/sse", "name": "x"}]);
        assert_eq!(bound(&mcp), CONTEXT_WINDOW);
    }

    #[test]
    fn tool_overhead_is_added_only_when_tools_are_present() {
        let plain = user_says(json!("hello world"));
        let mut no_tools = plain.clone();
        no_tools["tools"] = json!([]);
        assert_eq!(bound(&no_tools), bound(&plain));

        let tool = json!({"name": "t", "description": "d", "input_schema": {"type": "object"}});
        let mut one_tool = plain.clone();
        one_tool["tools"] = json!([tool]);
        let schema_tokens = estimate_tokens(&tool.to_string());
        // ⌈(2 + schema) × 9/5⌉ instead of ⌈2 × 9/5⌉ = 4.
        let text = ((2 + schema_tokens) * 9).div_ceil(5);
        assert_eq!(
            bound(&one_tool),
            text + 50 + 10 + TOOL_USE_SYSTEM_PROMPT_TOKENS + TOOL_DEFINITION_OVERHEAD_TOKENS
        );

        let mut bash = plain.clone();
        bash["tools"] = json!([{"type": "bash_20250124", "name": "bash"}]);
        assert!(
            bound(&bash) >= bound(&plain) + TOOL_USE_SYSTEM_PROMPT_TOKENS + ANTHROPIC_TOOL_TOKENS
        );
    }

    #[test]
    fn a_tool_call_counts_its_arguments_as_json() {
        let input = json!({"command": "ls -la", "timeout": 5});
        let call = user_says(
            json!([{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": input}]),
        );
        let text = estimate_tokens("Bash") + estimate_tokens(&input.to_string());
        let expected = (text * 9).div_ceil(5) + 50 + 10 + 10 + 2 * TOOL_ARGUMENT_OVERHEAD_TOKENS;
        assert_eq!(bound(&call), expected);
    }

    #[test]
    fn thinking_and_system_text_are_counted() {
        let mut body = user_says(json!("hello world"));
        body["system"] = json!("hello world");
        assert_eq!(bound(&body), 8 + 50 + 10);
        let thinking =
            json!([{"type": "thinking", "thinking": "hello world", "signature": "hello world"}]);
        let body = json!({"messages": [{"role": "assistant", "content": thinking}]});
        assert_eq!(bound(&body), 8 + 50 + 10 + 10);
    }

    #[test]
    fn the_window_caps_the_bound() {
        let huge = user_says(json!("hello world ".repeat(100_000)));
        assert_eq!(bound(&huge), CONTEXT_WINDOW);
        let body = serde_json::to_vec(&huge).unwrap();
        assert_eq!(worst_prompt_tokens(&body, 1_000), 1_000);
        assert!(worst_prompt_tokens(&body, LONG_CONTEXT_WINDOW) < LONG_CONTEXT_WINDOW);
        assert!(worst_prompt_tokens(&body, LONG_CONTEXT_WINDOW) > CONTEXT_WINDOW);
    }

    #[test]
    fn a_body_that_is_not_a_json_object_counts_its_bytes() {
        assert_eq!(worst_prompt_tokens(b"not json", CONTEXT_WINDOW), 8);
        assert_eq!(worst_prompt_tokens(b"[1,2]", CONTEXT_WINDOW), 5);
        assert_eq!(
            worst_prompt_tokens(&vec![b'x'; 300_000], CONTEXT_WINDOW),
            CONTEXT_WINDOW
        );
        assert_eq!(worst_prompt_tokens(b"", CONTEXT_WINDOW), 1);
        assert_eq!(worst_prompt_tokens(b"{}", 0), 1);
    }

    #[test]
    fn hostile_text_is_bounded_above_its_whole_count() {
        let whole = |text: &str| tiktoken_rs::cl100k_base_singleton().count_ordinary(text) as u64;
        for (name, text) in hostile_samples() {
            let worst = bound(&user_says(json!(text)));
            assert!(worst >= whole(&text) * 9 / 5 + 60, "{name}: {worst}");
        }
    }
}
