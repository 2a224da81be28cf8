//! Throughput of the SSE usage parser on a realistic Claude Code answer:
//! a thinking block (many `thinking_delta`s and a `signature_delta`), text
//! deltas, a `tool_use` block streamed as `input_json_delta`s, pings,
//! `message_delta` and `message_stop`, fed in the 1–4 KB chunks a TCP
//! read delivers.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay_shared::domain::usage::SseUsageParser;
use relay_shared::proxy::tap::UsageTap;

/// A JSON string literal (quotes and escapes), as the API writes it.
fn js(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn event(out: &mut String, name: &str, data: &str) {
    out.push_str("event: ");
    out.push_str(name);
    out.push_str("\ndata: ");
    out.push_str(data);
    out.push_str("\n\n");
}

/// Deterministic pseudo-random numbers (xorshift), so every run parses the
/// same bytes in the same chunks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the",
    "function",
    "returns",
    "a",
    "`Result`",
    "so",
    "callers",
    "must",
    "handle",
    "errors;",
    "let",
    "me",
    "check",
    "src/main.rs",
    "first.",
    "The",
    "test",
    "fails",
    "because",
    "\"expected\"",
    "differs",
    "—",
    "café",
    "naïve",
    "✓",
    "{\n",
    "}\n",
    "    ",
    "fn",
    "parse(input:",
    "&str)",
    "->",
    "Option<u64>",
];

fn words(rng: &mut Rng, count: u64) -> String {
    let mut text = String::new();
    for i in 0..count {
        if i > 0 {
            text.push(' ');
        }
        let index = usize::try_from(rng.below(WORDS.len() as u64)).unwrap_or(0);
        text.push_str(WORDS[index]);
    }
    text
}

/// About 90 KB of SSE, shaped like a Claude Code turn with extended
/// thinking and a tool call.
fn claude_code_stream() -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = String::new();
    event(
        &mut out,
        "message_start",
        r#"{"type":"message_start","message":{"model":"claude-opus-5-5","id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":3,"cache_creation_input_tokens":1874,"cache_read_input_tokens":48211,"cache_creation":{"ephemeral_5m_input_tokens":1874,"ephemeral_1h_input_tokens":0},"output_tokens":8,"service_tier":"standard"}}}"#,
    );
    event(
        &mut out,
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
    );
    event(&mut out, "ping", r#"{"type": "ping"}"#);
    for i in 0..300 {
        let count = 4 + rng.below(18);
        let delta = format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"thinking_delta","thinking":{}}}}}"#,
            js(&words(&mut rng, count))
        );
        event(&mut out, "content_block_delta", &delta);
        if i % 97 == 96 {
            event(&mut out, "ping", r#"{"type": "ping"}"#);
        }
    }
    let signature: String = (0..560)
        .map(|_| {
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            char::from(alphabet[usize::try_from(rng.below(64)).unwrap_or(0)])
        })
        .collect();
    event(
        &mut out,
        "content_block_delta",
        &format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"signature_delta","signature":"{signature}=="}}}}"#
        ),
    );
    event(
        &mut out,
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    );
    event(
        &mut out,
        "content_block_start",
        r#"{"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#,
    );
    for _ in 0..120 {
        let count = 2 + rng.below(10);
        let delta = format!(
            r#"{{"type":"content_block_delta","index":1,"delta":{{"type":"text_delta","text":{}}}}}"#,
            js(&words(&mut rng, count))
        );
        event(&mut out, "content_block_delta", &delta);
    }
    event(
        &mut out,
        "content_block_stop",
        r#"{"type":"content_block_stop","index":1}"#,
    );
    event(
        &mut out,
        "content_block_start",
        r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01A09q90qw90lq917835lq9","name":"Edit","input":{}}}"#,
    );
    // The tool input, streamed as JSON split anywhere.
    let input = format!(
        r#"{{"file_path":"/home/dev/project/src/parser.rs","old_string":{},"new_string":{}}}"#,
        js(&words(&mut rng, 120)),
        js(&words(&mut rng, 160))
    );
    let mut rest = input.as_str();
    let mut first = true;
    while !rest.is_empty() || first {
        let take = if first {
            0
        } else {
            let mut n = usize::try_from(5 + rng.below(40))
                .unwrap_or(8)
                .min(rest.len());
            while !rest.is_char_boundary(n) {
                n += 1;
            }
            n
        };
        first = false;
        let (piece, tail) = rest.split_at(take);
        rest = tail;
        event(
            &mut out,
            "content_block_delta",
            &format!(
                r#"{{"type":"content_block_delta","index":2,"delta":{{"type":"input_json_delta","partial_json":{}}}}}"#,
                js(piece)
            ),
        );
    }
    event(
        &mut out,
        "content_block_stop",
        r#"{"type":"content_block_stop","index":2}"#,
    );
    event(
        &mut out,
        "message_delta",
        r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":2817}}"#,
    );
    event(&mut out, "message_stop", r#"{"type":"message_stop"}"#);
    out.into_bytes()
}

/// The stream cut into 1–4 KB pieces, at arbitrary byte offsets.
fn chunks(stream: &[u8]) -> Vec<&[u8]> {
    let mut rng = Rng(42);
    let mut pieces = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let size = usize::try_from(1024 + rng.below(3 * 1024 + 1))
            .unwrap_or(2048)
            .min(rest.len());
        let (piece, tail) = rest.split_at(size);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

fn bench(c: &mut Criterion) {
    let stream = claude_code_stream();
    let pieces = chunks(&stream);
    // Guard against benchmarking a parser that learns nothing.
    let mut check = SseUsageParser::new();
    pieces.iter().for_each(|p| check.feed(p));
    assert!(
        check.state().is_complete() && check.state().usage.output_tokens == 2817,
        "the benchmark stream must parse to complete usage"
    );

    let mut group = c.benchmark_group("sse_usage");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("parser_claude_code_stream", |b| {
        b.iter(|| {
            let mut parser = SseUsageParser::new();
            for piece in &pieces {
                parser.feed(black_box(piece));
            }
            black_box(parser.into_state().usage)
        });
    });
    // What the proxy runs per chunk: the tap (content-type dispatch,
    // identity decoder) around the same parser.
    group.bench_function("tap_claude_code_stream", |b| {
        b.iter(|| {
            let mut tap = UsageTap::new(Some("text/event-stream; charset=utf-8"), None);
            for piece in &pieces {
                tap.feed(black_box(piece));
            }
            black_box(tap.finish().0.usage)
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
