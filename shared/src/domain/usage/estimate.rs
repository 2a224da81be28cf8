//! The estimate for answers cut short: tiktoken over the request's text for
//! input never reported, over the deltas seen for output never reported.

use super::AnswerUsage;

/// Counts tokens with tiktoken's cl100k_base: not Claude's tokenizer, but a
/// close, deterministic stand-in for charging a cut stream. Counted in
/// bounded chunks (see [`chunks`]), so a hostile text costs linear time.
pub fn estimate_tokens(text: &str) -> u64 {
    chunks(text).map(count_chunk).sum()
}

/// cl100k's count of one chunk from [`chunks`].
pub(super) fn count_chunk(chunk: &str) -> u64 {
    tiktoken_rs::cl100k_base_singleton().count_ordinary(chunk) as u64
}

/// The longest slice handed to tiktoken at once where the text allows an
/// exact cut (see [`chunks`]): long enough that prose is counted in few
/// calls.
const MAX_CHUNK_BYTES: usize = 4096;
/// The slices of a run without an exact cut. tiktoken-rs merges a piece
/// (one pre-tokenized word) of n bytes in O(n log n) with a large constant
/// past 100 bytes: 1 MB of `a` is one piece and costs ~0.3 s whole, ~0.1 s
/// in 4 KB slices, ~40 ms in 32-byte slices, which take its quick path
/// (under 100 bytes): about what 1 MB of prose costs.
const FORCED_CHUNK_BYTES: usize = 32;

/// Splits a text into slices whose cl100k counts add up to at least
/// cl100k's count of the whole, so that no text makes counting slow.
///
/// A slice ends, when it can, at an *exact* cut: a place where cl100k's
/// pre-tokenizer always starts a new piece, whatever comes before or after,
/// so the pieces (and tokens) on both sides are exactly those of the whole
/// text and the sum equals the whole count. A stretch of
/// [`MAX_CHUNK_BYTES`] / 2 bytes without such a place (one giant word, a
/// base64 blob, a run of spaces, unspaced CJK) is cut into
/// [`FORCED_CHUNK_BYTES`] slices at character boundaries. Such a forced cut
/// splits a piece in two; BPE is not provably subadditive, but splitting a
/// piece in practice only adds tokens at the cut (the tests check it on
/// hostile samples), and any loss would be a token or so per cut, far
/// inside the callers' safety margin.
pub(super) fn chunks(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    // What is left of a stretch without an exact cut.
    let mut forced = "";
    std::iter::from_fn(move || {
        if forced.is_empty() {
            if rest.is_empty() {
                return None;
            }
            if rest.len() <= MAX_CHUNK_BYTES {
                return Some(std::mem::take(&mut rest));
            }
            if let Some(cut) = exact_cut(rest.as_bytes()) {
                let (head, tail) = rest.split_at(cut);
                rest = tail;
                return Some(head);
            }
            (forced, rest) = rest.split_at(char_floor(rest, MAX_CHUNK_BYTES));
        }
        let (head, tail) = forced.split_at(char_floor(forced, FORCED_CHUNK_BYTES));
        forced = tail;
        Some(head)
    })
}

/// The last exact cut in the upper half of the first [`MAX_CHUNK_BYTES`].
fn exact_cut(bytes: &[u8]) -> Option<usize> {
    (MAX_CHUNK_BYTES / 2..=MAX_CHUNK_BYTES)
        .rev()
        .find(|&at| is_exact_cut(bytes[at - 1], bytes[at]))
}

/// The largest character boundary at or below `at`, or the whole text when
/// shorter; never 0 for `at` ≥ 4 (a character has at most 4 bytes).
fn char_floor(text: &str, at: usize) -> usize {
    if text.len() <= at {
        return text.len();
    }
    (1..=at)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len())
}

/// What cl100k's pre-tokenizer pattern
/// `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`
/// sees in an ASCII byte.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Letter,
    Digit,
    Space,
    Newline,
    Other,
}

fn char_class(byte: u8) -> Option<CharClass> {
    Some(match byte {
        b'a'..=b'z' | b'A'..=b'Z' => CharClass::Letter,
        b'0'..=b'9' => CharClass::Digit,
        b'\r' | b'\n' => CharClass::Newline,
        // Unicode White_Space, which the pattern's `\s` means.
        b' ' | b'\t' | 0x0b | 0x0c => CharClass::Space,
        0x80.. => return None,
        _ => CharClass::Other,
    })
}

/// Whether no piece of the pattern can hold both `before` and `after`, with
/// `before` not whitespace: then the piece holding `before` ends there in the
/// whole text and in the text cut there alike (the pattern looks ahead only
/// inside whitespace runs and has no look-behind), and matching restarts at
/// `after` identically. Pairs a piece can hold: letter after anything but a
/// digit or newline; digit after digit; other after space or other; newline
/// after other; whitespace after whitespace. Only ASCII is classified, so a
/// multi-byte character is never split.
fn is_exact_cut(before: u8, after: u8) -> bool {
    use CharClass::*;
    let (Some(before), Some(after)) = (char_class(before), char_class(after)) else {
        return false;
    };
    match (before, after) {
        (Space | Newline, _) => false,
        (_, Space) => true,
        (Other, Newline) => false,
        (_, Newline) => true,
        (Digit, Letter) => true,
        (Letter | Other, Digit) => true,
        (Letter | Digit, Other) => true,
        _ => false,
    }
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
pub(crate) mod tests {
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

    /// Text samples whose runs leave no exact cut: forced cuts only.
    pub(crate) fn hostile_samples() -> Vec<(&'static str, String)> {
        let mut seed: u64 = 7;
        let base64: String = (0..20_000)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                const ALPHABET: &[u8] =
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                ALPHABET[(seed >> 58) as usize] as char
            })
            .collect();
        vec![
            ("letters", "a".repeat(20_000)),
            ("mixed-case word", "Supercalifragilistic".repeat(1_000)),
            ("base64", base64),
            ("digits", "1234567".repeat(3_000)),
            ("spaces", " ".repeat(20_000)),
            ("newlines", "\n".repeat(20_000)),
            ("punctuation", "!=".repeat(10_000)),
            ("cjk", "中文字符测试".repeat(1_200)),
            ("accented", "é".repeat(10_000)),
            ("emoji", "🦀".repeat(5_000)),
            ("spaced cjk", "中文 字符，测试。".repeat(1_000)),
        ]
    }

    /// Fixture request bodies from ../shared/fixtures (real clients).
    pub(crate) fn fixture_bodies() -> Vec<(String, Vec<u8>)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures");
        let mut bodies: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .map(|path| {
                let raw: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, serde_json::to_vec(&raw["body"]).unwrap())
            })
            .collect();
        bodies.sort();
        assert!(bodies.len() >= 3, "fixtures missing from {dir}");
        bodies
    }

    fn whole_count(text: &str) -> u64 {
        tiktoken_rs::cl100k_base_singleton().count_ordinary(text) as u64
    }

    #[test]
    fn estimate_counts_cl100k_tokens() {
        assert_eq!(estimate_tokens(""), 0);
        // "hello" + " world"
        assert_eq!(estimate_tokens("hello world"), 2);
    }

    #[test]
    fn chunks_cover_the_text_in_bounded_slices() {
        let mut samples = hostile_samples();
        samples.push(("prose", "The quick brown fox, 42 times. ".repeat(1_000)));
        for (name, text) in samples {
            let pieces: Vec<&str> = chunks(&text).collect();
            assert_eq!(pieces.concat(), text, "{name}");
            assert!(pieces.len() > 1, "{name}");
            assert!(
                pieces
                    .iter()
                    .all(|p| !p.is_empty() && p.len() <= MAX_CHUNK_BYTES),
                "{name}"
            );
        }
    }

    #[test]
    fn chunked_count_of_real_requests_equals_the_whole_count() {
        for (name, body) in fixture_bodies() {
            let text = request_text(&body);
            assert_eq!(estimate_tokens(&text), whole_count(&text), "{name}");
        }
        let prose = "The quick brown fox (v2.1) jumps: over 42 lazy dogs!\n".repeat(2_000);
        assert!(chunks(&prose).count() > 10);
        assert_eq!(estimate_tokens(&prose), whole_count(&prose));
    }

    #[test]
    fn forced_cuts_never_lower_the_count() {
        for (name, text) in hostile_samples() {
            let chunked = estimate_tokens(&text);
            let whole = whole_count(&text);
            assert!(chunked >= whole, "{name}: {chunked} < {whole}");
        }
    }

    #[test]
    fn exact_cuts_are_only_where_pieces_always_break() {
        assert!(is_exact_cut(b'a', b' '));
        assert!(is_exact_cut(b'a', b'.'));
        assert!(is_exact_cut(b'7', b'x'));
        assert!(is_exact_cut(b'x', b'7'));
        assert!(is_exact_cut(b'a', b'\n'));
        // `ab`, `12`, `,x` (one piece), `!\n` (one piece), whitespace runs,
        // and anything non-ASCII are never cut exactly.
        assert!(!is_exact_cut(b'a', b'b'));
        assert!(!is_exact_cut(b'1', b'2'));
        assert!(!is_exact_cut(b',', b'x'));
        assert!(!is_exact_cut(b'!', b'\n'));
        assert!(!is_exact_cut(b' ', b'x'));
        assert!(!is_exact_cut(b' ', b' '));
        assert!(!is_exact_cut(0xe4, b' '));
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
