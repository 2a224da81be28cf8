//! Watches an upstream answer's bytes as they pass to the client and keeps
//! what settlement needs: usage from SSE or JSON, decompressing on the side
//! when the upstream compressed (the client still gets the bytes as sent).

use std::io::Write;

use flate2::write::{GzDecoder, ZlibDecoder};

use crate::domain::usage::{AnswerUsage, SseUsageParser, usage_from_json};

/// A JSON answer larger than this is not read for usage (none is that big).
const MAX_JSON: usize = 32 * 1024 * 1024;

enum Decoder {
    Identity,
    Gzip(GzDecoder<Vec<u8>>),
    Deflate(ZlibDecoder<Vec<u8>>),
    /// An encoding the relay cannot read: usage will be estimated.
    Unreadable,
}

impl Decoder {
    fn for_encoding(encoding: Option<&str>) -> Decoder {
        match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "identity") => Decoder::Identity,
            Some("gzip" | "x-gzip") => Decoder::Gzip(GzDecoder::new(Vec::new())),
            Some("deflate") => Decoder::Deflate(ZlibDecoder::new(Vec::new())),
            Some(_) => Decoder::Unreadable,
        }
    }

    /// Plain bytes for `chunk`, or `None` once the stream cannot be decoded.
    fn decode<'a>(&'a mut self, chunk: &'a [u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
        let out = match self {
            Decoder::Identity => return Some(chunk.into()),
            Decoder::Unreadable => return None,
            Decoder::Gzip(d) => d
                .write_all(chunk)
                .and_then(|()| d.flush())
                .map(|()| std::mem::take(d.get_mut())),
            Decoder::Deflate(d) => d
                .write_all(chunk)
                .and_then(|()| d.flush())
                .map(|()| std::mem::take(d.get_mut())),
        };
        match out {
            Ok(bytes) => Some(bytes.into()),
            Err(_) => {
                *self = Decoder::Unreadable;
                None
            }
        }
    }
}

enum Format {
    Sse(SseUsageParser),
    Json(Vec<u8>),
    Other,
}

pub struct UsageTap {
    decoder: Decoder,
    format: Format,
}

impl UsageTap {
    pub fn new(content_type: Option<&str>, content_encoding: Option<&str>) -> UsageTap {
        let media = content_type
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase());
        let format = match media.as_deref() {
            Some("text/event-stream") => Format::Sse(SseUsageParser::new()),
            Some("application/json") => Format::Json(Vec::new()),
            _ => Format::Other,
        };
        UsageTap {
            decoder: Decoder::for_encoding(content_encoding),
            format,
        }
    }

    pub fn is_sse(&self) -> bool {
        matches!(self.format, Format::Sse(_))
    }

    /// Whether the relay may add an event of its own to the stream the
    /// client reads: SSE passed on as plain text (not compressed).
    pub fn takes_own_events(&self) -> bool {
        self.is_sse() && matches!(self.decoder, Decoder::Identity)
    }

    /// Records an error the relay itself ended the stream with (its event
    /// is not the upstream's, so it is not fed through the parser).
    pub fn relay_error(&mut self, error_type: &str) {
        if let Format::Sse(parser) = &mut self.format {
            parser.note_stream_error(error_type);
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if matches!(self.format, Format::Other) {
            return;
        }
        let Some(plain) = self.decoder.decode(chunk) else {
            return;
        };
        match &mut self.format {
            Format::Sse(parser) => parser.feed(&plain),
            Format::Json(buffer) => {
                if buffer.len() + plain.len() <= MAX_JSON {
                    buffer.extend_from_slice(&plain);
                }
            }
            Format::Other => {}
        }
    }

    /// Final usage is known (a client that left need not be waited for).
    pub fn usage_complete(&self) -> bool {
        match &self.format {
            Format::Sse(parser) => parser.state().is_complete(),
            _ => false,
        }
    }

    /// What was learned, and the `error.type` of a JSON error answer.
    pub fn finish(self) -> (AnswerUsage, Option<String>) {
        match self.format {
            Format::Sse(parser) => (parser.into_state(), None),
            Format::Json(body) => match usage_from_json(&body) {
                Some(state) => (state, None),
                None => (AnswerUsage::default(), error_type(&body)),
            },
            Format::Other => (AnswerUsage::default(), None),
        }
    }
}

/// `error.type` of an Anthropic error envelope.
pub fn error_type(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get("error")?.get("type")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;

    const JSON: &[u8] =
        br#"{"id":"m","type":"message","model":"x","usage":{"input_tokens":10,"output_tokens":5}}"#;

    #[test]
    fn gzip_json_is_read_through_any_chunking() {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(JSON).unwrap();
        let compressed = encoder.finish().unwrap();
        for size in [1, 3, 50] {
            let mut tap = UsageTap::new(Some("application/json"), Some("gzip"));
            compressed.chunks(size).for_each(|c| tap.feed(c));
            let (state, _) = tap.finish();
            assert_eq!(state.usage.billed(), 15, "chunk size {size}");
        }
    }

    #[test]
    fn unknown_encoding_yields_no_usage_instead_of_garbage() {
        let mut tap = UsageTap::new(Some("application/json"), Some("br"));
        tap.feed(JSON);
        assert!(!tap.finish().0.is_complete());
    }

    #[test]
    fn error_answer_type_is_kept() {
        let mut tap = UsageTap::new(Some("application/json"), None);
        tap.feed(br#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#);
        assert_eq!(tap.finish().1.as_deref(), Some("invalid_request_error"));
    }
}
