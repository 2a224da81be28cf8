//! Admin authentication: HTTP Basic checked against a bcrypt hash, then
//! short-lived HS256 JWTs. Only HS256 is accepted, so `alg: none` and
//! algorithm-confusion tokens fail verification.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

const ISSUER: &str = "claude-relay-station";

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
}

/// Username and password from an `Authorization: Basic …` header value.
pub fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Checks both username and password, always running bcrypt so that a wrong
/// username takes as long as a wrong password. Blocking: run it off the
/// async threads.
pub fn credentials_match(
    expected_user: &str,
    password_hash: &str,
    user: &str,
    password: &str,
) -> bool {
    let password_ok = bcrypt::verify(password, password_hash).unwrap_or(false);
    let user_ok: bool = expected_user.as_bytes().ct_eq(user.as_bytes()).into();
    password_ok && user_ok
}

/// Hashes a plaintext password given to this process (`ADMIN_PASSWORD`,
/// relay-local's own) for the login check. bcrypt's cost only slows the
/// guessing of a hash that leaks from storage; this one lives in memory and
/// is never stored or shown, so it takes the lowest cost. At the default
/// cost (12) it was most of relay-local's start-up (~0.3 s). Online
/// guessing is bounded by the login lockout, whatever the cost.
pub fn hash_in_memory_password(password: &str) -> anyhow::Result<String> {
    Ok(bcrypt::hash(password, IN_MEMORY_COST)?)
}

/// bcrypt's lowest cost.
const IN_MEMORY_COST: u32 = 4;

pub fn issue_token(secret: &str, subject: &str, now: u64, ttl: Duration) -> anyhow::Result<String> {
    let claims = Claims {
        sub: subject.to_owned(),
        iat: now,
        exp: now + ttl.as_secs(),
        iss: ISSUER.to_owned(),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// The token's claims if it is ours, unexpired and signed with `secret`.
pub fn verify_token(secret: &str, token: &str) -> Option<Claims> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 5;
    validation.set_issuer(&[ISSUER]);
    validation.set_required_spec_claims(&["exp", "iat", "sub", "iss"]);
    jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .ok()
    .map(|data| data.claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn issued_token_verifies_and_carries_subject() {
        let token = issue_token("s3cret", "admin", now(), Duration::from_secs(60)).unwrap();
        assert_eq!(verify_token("s3cret", &token).unwrap().sub, "admin");
    }

    #[test]
    fn expired_wrong_key_tampered_and_unsigned_tokens_fail() {
        let expired = issue_token("k", "admin", now() - 7200, Duration::from_secs(60)).unwrap();
        assert!(verify_token("k", &expired).is_none());
        let token = issue_token("k", "admin", now(), Duration::from_secs(60)).unwrap();
        assert!(verify_token("other", &token).is_none());
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let forged = STANDARD.encode(format!(
            r#"{{"sub":"root","iat":{0},"exp":{1},"iss":"{ISSUER}"}}"#,
            now(),
            now() + 60
        ));
        parts[1] = forged
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_");
        assert!(verify_token("k", &parts.join(".")).is_none());
        let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"alg":"none","typ":"JWT"}"#);
        let unsigned = format!("{none_header}.{}.", token.split('.').nth(1).unwrap());
        assert!(verify_token("k", &unsigned).is_none());
    }

    #[test]
    fn basic_header_parses_and_garbage_does_not() {
        let header = format!("Basic {}", STANDARD.encode("admin:pa:ss"));
        assert_eq!(parse_basic(&header), Some(("admin".into(), "pa:ss".into())));
        assert_eq!(parse_basic("Bearer abc"), None);
        assert_eq!(parse_basic("Basic !!!"), None);
        assert_eq!(
            parse_basic(&format!("Basic {}", STANDARD.encode("nocolon"))),
            None
        );
    }

    #[test]
    fn credentials_check_needs_both_parts() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        assert!(credentials_match("admin", &hash, "admin", "pw"));
        assert!(!credentials_match("admin", &hash, "root", "pw"));
        assert!(!credentials_match("admin", &hash, "admin", "nope"));
        assert!(!credentials_match("admin", "not-a-hash", "admin", "pw"));
    }
}
