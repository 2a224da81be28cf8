//! A small Server-Sent Events decoder for tests: turns the bytes a relay or the fake upstream
//! streamed into `event:`/`data:` records, however the bytes were split on the wire.

/// One complete SSE event (terminated by a blank line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if the event had one.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n` (per the SSE spec), empty if there were none.
    pub data: String,
    /// Whether at least one `data:` line was present; an empty `data` alone cannot tell.
    pub has_data: bool,
}

impl SseEvent {
    /// The data field parsed as JSON.
    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_str(&self.data)
    }
}

/// Incremental decoder: feed it chunks exactly as they arrive. It buffers raw bytes and only
/// decodes complete lines, so chunk boundaries inside an event or inside a UTF-8 character are
/// harmless.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    current: SseEvent,
    has_field: bool,
}

impl SseDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add bytes and return every event completed by them.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=end).collect();
            let line = raw.strip_suffix(b"\n").unwrap_or(&raw);
            // CRLF framing is legal SSE; tolerate it so the decoder is not stricter than clients.
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = String::from_utf8_lossy(line);
            self.line(&line, &mut events);
        }
        events
    }

    /// Bytes received after the last complete line (non-empty means the stream ended mid-line).
    pub fn remainder(&self) -> &[u8] {
        &self.buf
    }

    /// Whether an event was started but not terminated by a blank line.
    pub fn has_partial_event(&self) -> bool {
        self.has_field || !self.buf.is_empty()
    }

    fn line(&mut self, line: &str, events: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_field {
                events.push(std::mem::take(&mut self.current));
                self.has_field = false;
            }
            return;
        }
        if line.starts_with(':') {
            return; // comment / keep-alive
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match name {
            "event" => self.current.event = Some(value.to_owned()),
            "data" => {
                if self.current.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.current.has_data = true;
            }
            _ => {} // id, retry and unknown fields do not matter to these tests
        }
        self.has_field = true;
    }
}

/// Decode a whole body at once; returns only complete events.
pub fn parse_sse(body: &[u8]) -> Vec<SseEvent> {
    SseDecoder::new().push(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_across_arbitrary_splits() {
        let body = "event: a\ndata: {\"x\":\"é✓🌍\"}\n\n: ping comment\nevent: b\r\ndata: 1\r\ndata: 2\r\n\r\n";
        let whole = parse_sse(body.as_bytes());
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].event.as_deref(), Some("a"));
        assert_eq!(whole[0].json().unwrap()["x"], "é✓🌍");
        assert_eq!(whole[1].data, "1\n2");
        for n in 1..body.len() {
            let mut dec = SseDecoder::new();
            let mut got = Vec::new();
            for chunk in body.as_bytes().chunks(n) {
                got.extend(dec.push(chunk));
            }
            assert_eq!(got, whole, "split {n}");
            assert!(!dec.has_partial_event());
        }
    }

    #[test]
    fn reports_partial_event() {
        let mut dec = SseDecoder::new();
        assert!(dec.push(b"event: a\ndata: {").is_empty());
        assert!(dec.has_partial_event());
        assert_eq!(dec.remainder(), b"data: {");
    }
}
