//! Fuzzes key parsing: never a panic, and whatever parses prints back as
//! the same text and verifies against its own hash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_shared::domain::key::{KeyId, PresentedKey, SecretHash};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = PresentedKey::parse(text) {
        assert_eq!(key.expose(), text);
        assert!(key.hash().matches(&key.hash()));
        assert!(KeyId::parse(key.id().as_str()).is_some());
    }
    let _ = KeyId::parse(text);
    if let Some(hash) = SecretHash::from_hex(text) {
        assert_eq!(hash.to_hex(), text.to_ascii_lowercase());
    }
});
