//! Relay API keys: `sk-proxy-<public id><secret>`, generated from the OS CSPRNG,
//! stored only as SHA-256 of the secret, verified in constant time.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "sk-proxy-";
/// Public id length: 12 base62 characters (~71 bits) keep ids unique without a lookup.
pub const ID_LEN: usize = 12;
/// Secret length: 32 base62 characters, ~190 bits of entropy.
pub const SECRET_LEN: usize = 32;

/// Why a presented key could not even be looked up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("API key must start with `sk-proxy-`")]
    WrongPrefix,
    #[error("API key has the wrong length")]
    WrongLength,
    #[error("API key contains characters outside [A-Za-z0-9]")]
    BadCharacters,
}

/// A key's public id: the lookup key in the store, safe to show and log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// Accepts only the exact shape generated ids have (path parameters use it).
    pub fn parse(raw: &str) -> Option<KeyId> {
        (raw.len() == ID_LEN && raw.bytes().all(|b| b.is_ascii_alphanumeric()))
            .then(|| KeyId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of a key's secret part; the only form in which a secret is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    pub fn of(secret: &str) -> SecretHash {
        SecretHash(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn from_hex(hex: &str) -> Option<SecretHash> {
        // `from_str_radix` alone would take "+e" as a byte (found by fuzzing).
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(SecretHash(bytes))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Constant-time equality, so response timing says nothing about how much matched.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHash(…)")
    }
}

/// A full key as presented by a client or shown once at creation.
/// Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct PresentedKey {
    id: KeyId,
    secret: String,
}

impl PresentedKey {
    pub fn parse(raw: &str) -> Result<PresentedKey, KeyParseError> {
        let rest = raw
            .strip_prefix(KEY_PREFIX)
            .ok_or(KeyParseError::WrongPrefix)?;
        if rest.len() != ID_LEN + SECRET_LEN {
            return Err(KeyParseError::WrongLength);
        }
        if !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyParseError::BadCharacters);
        }
        let (id, secret) = rest.split_at(ID_LEN);
        Ok(PresentedKey {
            id: KeyId(id.to_owned()),
            secret: secret.to_owned(),
        })
    }

    /// A new random key. `rand::rng()` is a CSPRNG seeded from the OS.
    pub fn generate() -> PresentedKey {
        PresentedKey {
            id: KeyId(random_base62(ID_LEN)),
            secret: random_base62(SECRET_LEN),
        }
    }

    /// The same id with a fresh secret (rotation).
    pub fn rotate(id: &KeyId) -> PresentedKey {
        PresentedKey {
            id: id.clone(),
            secret: random_base62(SECRET_LEN),
        }
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.secret)
    }

    /// The full key text: shown to the admin exactly once.
    pub fn expose(&self) -> String {
        format!("{KEY_PREFIX}{}{}", self.id, self.secret)
    }
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PresentedKey({}…)", self.id)
    }
}

/// How a key is shown in listings: enough to recognise, nothing secret.
pub fn display_prefix(id: &KeyId) -> String {
    format!("{KEY_PREFIX}{id}…")
}

fn random_base62(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_parses_back_to_same_id_and_hash() {
        let key = PresentedKey::generate();
        let text = key.expose();
        assert!(text.starts_with("sk-proxy-"));
        assert_eq!(text.len(), KEY_PREFIX.len() + ID_LEN + SECRET_LEN);
        let parsed = PresentedKey::parse(&text).unwrap();
        assert_eq!(parsed.id(), key.id());
        assert!(parsed.hash().matches(&key.hash()));
    }

    #[test]
    fn generated_keys_differ() {
        let a = PresentedKey::generate().expose();
        let b = PresentedKey::generate().expose();
        assert_ne!(a, b);
    }

    #[test]
    fn rotated_key_keeps_id_and_changes_secret() {
        let key = PresentedKey::generate();
        let rotated = PresentedKey::rotate(key.id());
        assert_eq!(rotated.id(), key.id());
        assert!(!rotated.hash().matches(&key.hash()));
    }

    #[test]
    fn malformed_keys_are_rejected_with_a_reason() {
        assert_eq!(
            PresentedKey::parse("sk-ant-abc").unwrap_err(),
            KeyParseError::WrongPrefix
        );
        assert_eq!(
            PresentedKey::parse("sk-proxy-short").unwrap_err(),
            KeyParseError::WrongLength
        );
        let bad = format!("sk-proxy-{}", "a-".repeat((ID_LEN + SECRET_LEN) / 2));
        assert_eq!(
            PresentedKey::parse(&bad).unwrap_err(),
            KeyParseError::BadCharacters
        );
        // Multi-byte characters of the right byte length are still rejected.
        let unicode = format!("sk-proxy-{}é", "a".repeat(ID_LEN + SECRET_LEN - 2));
        assert_eq!(
            PresentedKey::parse(&unicode).unwrap_err(),
            KeyParseError::BadCharacters
        );
    }

    #[test]
    fn hash_hex_round_trips_and_debug_hides_secrets() {
        let key = PresentedKey::generate();
        let hash = key.hash();
        assert!(SecretHash::from_hex(&hash.to_hex()).unwrap().matches(&hash));
        assert!(SecretHash::from_hex("zz").is_none());
        let signed = format!("9eeeeeeeeeee+e{}", "e".repeat(50));
        assert!(SecretHash::from_hex(&signed).is_none());
        let debug = format!("{key:?} {hash:?}");
        assert!(!debug.contains(&key.expose()[KEY_PREFIX.len() + ID_LEN..]));
    }

    #[test]
    fn key_id_parse_accepts_only_generated_shape() {
        assert!(KeyId::parse("abcdefABCDEF").is_some());
        assert!(KeyId::parse("../etc/passwd").is_none());
        assert!(KeyId::parse("abc").is_none());
    }
}
