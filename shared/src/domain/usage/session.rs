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

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
