//! Reading usage out of an answer as it passes: the incremental SSE parser
//! for streamed answers (usage values are cumulative: the last one seen is
//! the total) and the extractor for JSON answers.

use serde::Deserialize;

use super::TokenUsage;

/// The wire shape of a `usage` object; every field optional because
/// `message_delta` carries only the ones that changed.
#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<WireCacheCreation>,
}

#[derive(Debug, Default, Deserialize)]
struct WireCacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Overwrites the fields present: usage values are cumulative, so the
    /// last one seen is the total (never summed).
    fn apply_to(&self, usage: &mut TokenUsage) {
        let set = |field: &mut u64, value: Option<u64>| {
            if let Some(value) = value {
                *field = value;
            }
        };
        set(&mut usage.input_tokens, self.input_tokens);
        set(&mut usage.output_tokens, self.output_tokens);
        set(
            &mut usage.cache_creation_input_tokens,
            self.cache_creation_input_tokens,
        );
        set(
            &mut usage.cache_read_input_tokens,
            self.cache_read_input_tokens,
        );
        if let Some(split) = &self.cache_creation {
            set(
                &mut usage.cache_creation_5m,
                split.ephemeral_5m_input_tokens,
            );
            set(
                &mut usage.cache_creation_1h,
                split.ephemeral_1h_input_tokens,
            );
        }
    }
}

#[derive(Deserialize)]
struct MessageStart {
    message: MessageWithUsage,
}

/// Required `usage`: an error envelope must not pass for an empty message.
#[derive(Deserialize)]
struct MessageWithUsage {
    usage: WireUsage,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
struct MessageDelta {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ErrorEvent {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "type")]
    kind: String,
}

/// What has been learned from an answer so far.
#[derive(Debug, Default, Clone)]
pub struct AnswerUsage {
    pub usage: TokenUsage,
    pub model: Option<String>,
    pub saw_message_start: bool,
    /// A `message_delta` with usage arrived: output tokens are final-so-far.
    pub saw_usage_delta: bool,
    pub saw_message_stop: bool,
    /// `error.type` of an in-stream `error` event.
    pub stream_error: Option<String>,
    /// Raw `data` of `content_block_delta` events, kept only to estimate
    /// output tokens if the stream is cut before its final usage.
    delta_data: Vec<u8>,
}

/// Beyond this, deltas are not kept for the estimate (the tail is counted
/// by proportion instead).
const MAX_DELTA_BYTES: usize = 4 * 1024 * 1024;

impl AnswerUsage {
    /// Usage is exact when the answer reported both input (message_start or
    /// a JSON body) and final output.
    pub fn is_complete(&self) -> bool {
        self.saw_message_start && self.saw_usage_delta
    }

    fn on_event(&mut self, name: &[u8], data: &[u8]) {
        match name {
            b"message_start" => {
                if let Ok(start) = serde_json::from_slice::<MessageStart>(data) {
                    start.message.usage.apply_to(&mut self.usage);
                    self.model = start.message.model;
                    self.saw_message_start = true;
                }
            }
            b"message_delta" => {
                if let Ok(MessageDelta { usage: Some(usage) }) = serde_json::from_slice(data) {
                    usage.apply_to(&mut self.usage);
                    self.saw_usage_delta = true;
                }
            }
            b"content_block_delta" if self.delta_data.len() + data.len() <= MAX_DELTA_BYTES => {
                self.delta_data.extend_from_slice(data);
                self.delta_data.push(b'\n');
            }
            b"message_stop" => self.saw_message_stop = true,
            b"error" => {
                self.stream_error = serde_json::from_slice::<ErrorEvent>(data)
                    .map(|e| e.error.kind)
                    .ok()
                    .or_else(|| Some("unknown".into()));
            }
            _ => {}
        }
    }

    /// The text the model produced, from the deltas seen (for estimates).
    pub fn delta_text(&self) -> String {
        #[derive(Deserialize)]
        struct Delta {
            delta: DeltaBody,
        }
        #[derive(Deserialize)]
        struct DeltaBody {
            text: Option<String>,
            thinking: Option<String>,
            partial_json: Option<String>,
        }
        let mut text = String::new();
        for line in self.delta_data.split(|b| *b == b'\n') {
            if let Ok(Delta { delta }) = serde_json::from_slice::<Delta>(line) {
                for part in [delta.text, delta.thinking, delta.partial_json]
                    .into_iter()
                    .flatten()
                {
                    text.push_str(&part);
                }
            }
        }
        text
    }
}

/// Reads `text/event-stream` bytes in whatever chunks they arrive (split
/// mid-line, mid-UTF-8, CRLF or LF) and feeds complete events to a
/// [`AnswerUsage`]. Only lines are buffered, never the whole stream.
#[derive(Debug, Default)]
pub struct SseUsageParser {
    state: AnswerUsage,
    line: Vec<u8>,
    event_name: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The last byte was `\r`: a following `\n` belongs to the same line end.
    after_cr: bool,
}

/// A line longer than this is not one we need (usage events are small);
/// its tail is dropped rather than buffered without bound.
const MAX_LINE: usize = 1024 * 1024;

impl SseUsageParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn feed(&mut self, mut chunk: &[u8]) {
        if self.after_cr && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        self.after_cr = false;
        while let Some(pos) = chunk.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.push_line_bytes(&chunk[..pos]);
            self.end_line();
            if chunk[pos] == b'\r' {
                if chunk.get(pos + 1) == Some(&b'\n') {
                    chunk = &chunk[pos + 2..];
                } else {
                    if pos + 1 == chunk.len() {
                        self.after_cr = true;
                    }
                    chunk = &chunk[pos + 1..];
                }
            } else {
                chunk = &chunk[pos + 1..];
            }
        }
        self.push_line_bytes(chunk);
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch();
        } else if line[0] != b':' {
            let (field, value) = match line.iter().position(|b| *b == b':') {
                Some(colon) => {
                    let value = &line[colon + 1..];
                    (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
                }
                None => (&line[..], &[][..]),
            };
            match field {
                b"event" => {
                    self.event_name.clear();
                    self.event_name.extend_from_slice(value);
                }
                b"data" => {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        // Reuse the allocation for the next line.
        self.line = line;
        self.line.clear();
    }

    fn dispatch(&mut self) {
        if self.has_data {
            let name = if self.event_name.is_empty() {
                b"message".as_slice()
            } else {
                &self.event_name
            };
            self.state.on_event(name, &self.data);
        }
        self.event_name.clear();
        self.data.clear();
        self.has_data = false;
    }

    pub fn state(&self) -> &AnswerUsage {
        &self.state
    }

    /// An error that ended the stream, as if an `error` event had said it
    /// (the relay's own, which does not pass through the parser); the
    /// upstream's, if it sent one, is kept.
    pub fn note_stream_error(&mut self, error_type: &str) {
        self.state
            .stream_error
            .get_or_insert_with(|| error_type.to_owned());
    }

    pub fn into_state(self) -> AnswerUsage {
        self.state
    }
}

/// Usage from a non-streamed answer's JSON body.
pub fn usage_from_json(body: &[u8]) -> Option<AnswerUsage> {
    let message: MessageWithUsage = serde_json::from_slice(body).ok()?;
    let mut state = AnswerUsage {
        model: message.model,
        saw_message_start: true,
        saw_usage_delta: true,
        ..AnswerUsage::default()
    };
    message.usage.apply_to(&mut state.usage);
    Some(state)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::domain::usage::TokenUsage;

    pub(in crate::domain::usage) const STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-opus-5-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":472,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2048,\"cache_creation\":{\"ephemeral_5m_input_tokens\":60,\"ephemeral_1h_input_tokens\":40},\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello wörld ✓\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":null},\"usage\":{\"output_tokens\":7}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    fn expected() -> TokenUsage {
        TokenUsage {
            input_tokens: 472,
            output_tokens: 15,
            cache_creation_input_tokens: 100,
            cache_read_input_tokens: 2048,
            cache_creation_5m: 60,
            cache_creation_1h: 40,
        }
    }

    #[test]
    fn whole_stream_yields_exact_usage_keeping_last_delta() {
        let mut parser = SseUsageParser::new();
        parser.feed(STREAM.as_bytes());
        let state = parser.into_state();
        assert_eq!(state.usage, expected());
        assert_eq!(state.usage.billed(), 472 + 100 + 2048 + 15);
        assert!(state.is_complete() && state.saw_message_stop);
        assert_eq!(state.model.as_deref(), Some("claude-opus-5-5"));
    }

    #[test]
    fn every_split_point_and_chunk_size_gives_the_same_usage() {
        let bytes = STREAM.as_bytes();
        for size in 1..=17 {
            let mut parser = SseUsageParser::new();
            bytes.chunks(size).for_each(|c| parser.feed(c));
            assert_eq!(parser.state().usage, expected(), "chunk size {size}");
        }
        for split in 0..bytes.len() {
            let mut parser = SseUsageParser::new();
            parser.feed(&bytes[..split]);
            parser.feed(&bytes[split..]);
            assert_eq!(parser.state().usage, expected(), "split at {split}");
        }
    }

    #[test]
    fn crlf_and_cr_line_endings_parse_the_same() {
        for ending in ["\r\n", "\r"] {
            let text = STREAM.replace('\n', ending);
            for size in [1, 2, 3, 64] {
                let mut parser = SseUsageParser::new();
                text.as_bytes().chunks(size).for_each(|c| parser.feed(c));
                assert_eq!(parser.state().usage, expected(), "{ending:?} / {size}");
            }
        }
    }

    #[test]
    fn newer_delta_shape_with_input_fields_overrides_start() {
        let mut parser = SseUsageParser::new();
        parser.feed(
            STREAM
                .split("event: message_delta")
                .next()
                .unwrap()
                .as_bytes(),
        );
        parser.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"input_tokens\":500,\"cache_read_input_tokens\":2048,\"output_tokens\":9}}\n\n");
        let usage = parser.state().usage;
        assert_eq!((usage.input_tokens, usage.output_tokens), (500, 9));
    }

    #[test]
    fn in_stream_error_is_recorded() {
        let mut parser = SseUsageParser::new();
        parser.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
        assert_eq!(
            parser.state().stream_error.as_deref(),
            Some("overloaded_error")
        );
    }

    #[test]
    fn json_answer_usage_is_read() {
        let body = br#"{"id":"msg_1","type":"message","model":"claude-haiku-5-5","content":[],"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":3,"output_tokens":12}}"#;
        let state = usage_from_json(body).unwrap();
        assert_eq!(state.usage.billed(), 40);
        assert!(state.is_complete());
        assert!(usage_from_json(b"not json").is_none());
    }

    #[test]
    fn oversized_lines_are_capped_not_buffered() {
        let mut parser = SseUsageParser::new();
        let huge = vec![b'x'; MAX_LINE * 2];
        parser.feed(b"data: ");
        parser.feed(&huge);
        assert!(parser.line.len() <= MAX_LINE);
        parser.feed(b"\n\n");
        parser.feed(STREAM.as_bytes());
        assert_eq!(parser.state().usage, expected());
    }
}
