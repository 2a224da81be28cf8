//! Claude Code sessions (`x-claude-code-session-id`): the id a request
//! names, accepted as a key of the session's usage aggregate only when it is
//! short and plain, since the client chooses it.

use std::fmt;

/// The longest session id kept: Claude Code sends UUIDs (36 characters).
pub const MAX_SESSION_ID: usize = 128;

/// A session id fit to be part of a stored key: 1 to [`MAX_SESSION_ID`]
/// characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// The id a client sent, if it may be a key; anything else is ignored
    /// (the request is still relayed and logged, with no session aggregate).
    pub fn parse(text: &str) -> Option<SessionId> {
        let plain = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
        (plain && (1..=MAX_SESSION_ID).contains(&text.len())).then(|| SessionId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The Claude Code session inside a request's `metadata.user_id`: a JSON
/// string with `session_id` (current versions), or
/// `user_<sha>_account_<uuid>_session_<uuid>` (older ones). For requests
/// that do not send `x-claude-code-session-id`.
pub fn session_of_user_id(user_id: &str) -> Option<SessionId> {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(user_id) {
        return fields
            .get("session_id")
            .and_then(serde_json::Value::as_str)
            .and_then(SessionId::parse);
    }
    let (_, session) = user_id.rsplit_once("_session_")?;
    SessionId::parse(session)
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_in_metadata_user_id_is_found_in_either_form() {
        let current = r#"{"device_id":"d1","account_uuid":"a1","session_id":"0f3c2a1e-9b7d-4c8e-a5f6-1234567890ab"}"#;
        assert_eq!(
            session_of_user_id(current).map(|s| s.0),
            Some("0f3c2a1e-9b7d-4c8e-a5f6-1234567890ab".to_owned())
        );
        let older = "user_5e884898da28_account__session_7c9e6679-7425-40de-944b-e07fc1f90ae7";
        assert_eq!(
            session_of_user_id(older).map(|s| s.0),
            Some("7c9e6679-7425-40de-944b-e07fc1f90ae7".to_owned())
        );
        for none in [
            "",
            "someone",
            r#"{"session_id":"a b"}"#,
            r#"{"device_id":"d"}"#,
        ] {
            assert_eq!(session_of_user_id(none), None, "{none}");
        }
    }

    #[test]
    fn plain_bounded_ids_are_kept_and_anything_else_ignored() {
        for good in [
            "0f3c2a1e-9b7d-4c8e-a5f6-1234567890ab",
            "a",
            "team.alpha:run_1-2",
            &"x".repeat(MAX_SESSION_ID),
        ] {
            assert_eq!(SessionId::parse(good).map(|s| s.0), Some(good.to_owned()));
        }
        for bad in [
            "",
            &"x".repeat(MAX_SESSION_ID + 1),
            "a#b",
            "KEY#other/SESSION#x",
            "with space",
            "slash/es",
            "ünïcode",
            "new\nline",
        ] {
            assert_eq!(SessionId::parse(bad), None, "{bad:?}");
        }
    }
}
