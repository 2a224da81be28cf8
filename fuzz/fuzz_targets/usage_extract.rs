//! Fuzzes usage extraction from JSON answers and the side tap (with and
//! without gzip framing): never a panic, and usage only from a `usage` object.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_shared::domain::usage::{complete_with_estimate, request_text, usage_from_json};
use relay_shared::proxy::tap::{UsageTap, error_type};

fuzz_target!(|data: &[u8]| {
    if let Some(state) = usage_from_json(data) {
        assert!(state.is_complete());
    }
    let _ = error_type(data);
    for (content_type, encoding) in [
        ("application/json", None),
        ("text/event-stream", None),
        ("application/json", Some("gzip")),
        ("text/event-stream", Some("deflate")),
    ] {
        let mut tap = UsageTap::new(Some(content_type), encoding);
        for chunk in data.chunks(7) {
            tap.feed(chunk);
        }
        let _ = tap.finish();
    }
    // The estimate path runs on whatever a client sent as a request body.
    if data.len() < 4096 {
        let _ = request_text(data);
        let mut state = Default::default();
        let _ = complete_with_estimate(&mut state, data);
    }
});
