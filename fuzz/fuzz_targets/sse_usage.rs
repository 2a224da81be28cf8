//! Fuzzes the incremental SSE usage parser: any bytes, split anywhere, must
//! neither panic nor give a different result than the same bytes in one piece.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_shared::domain::usage::SseUsageParser;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let mut whole = SseUsageParser::new();
    whole.feed(stream);
    // Chunk sizes derived from the first byte: 1..=32, varying per chunk.
    let mut split = SseUsageParser::new();
    let mut rest = stream;
    let mut size = usize::from(seed % 32) + 1;
    while !rest.is_empty() {
        let take = size.min(rest.len());
        split.feed(&rest[..take]);
        rest = &rest[take..];
        size = size % 31 + 1 + usize::from(seed & 1);
    }
    let (a, b) = (whole.into_state(), split.into_state());
    assert_eq!(a.usage, b.usage);
    assert_eq!(a.model, b.model);
    assert_eq!(a.saw_message_start, b.saw_message_start);
    assert_eq!(a.saw_usage_delta, b.saw_usage_delta);
    assert_eq!(a.saw_message_stop, b.saw_message_stop);
    assert_eq!(a.stream_error, b.stream_error);
    assert_eq!(a.delta_text(), b.delta_text());
});
