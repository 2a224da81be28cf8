//! What a key holder's setup looks like from the relay: which credential
//! headers arrived, which client sent them, what to set for Claude Code,
//! and what looks wrong. Pure rules for `GET /api/usage/setup`.

/// The credential headers a request carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CredentialsSeen {
    /// `x-api-key` (Claude Code's `ANTHROPIC_API_KEY`)…
    pub api_key: Option<Credential>,
    /// …and `Authorization: Bearer` (`ANTHROPIC_AUTH_TOKEN`).
    pub bearer: Option<Credential>,
}

/// What one credential header held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// This relay's key (the one the request was authenticated with).
    RelayKey,
    /// Something else: an Anthropic key, a stale token.
    Other,
}

/// A client as its `User-Agent` names it: `claude-cli/2.1.330 (external,
/// cli)`, `Anthropic/Python 2.12.0`, `Anthropic/JS 1.12.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSeen {
    pub name: String,
    pub version: String,
}

/// The client and version a `User-Agent` names (bounded: it is the
/// client's to choose).
pub fn client_of(user_agent: &str) -> Option<ClientSeen> {
    let first = user_agent.split_whitespace().next()?;
    let (name, version) = match first.split_once('/') {
        Some((name, version)) => (name, version),
        None => return None,
    };
    // `Anthropic/Python 2.12.0`: the version is the next word.
    let (name, version) = if version.chars().next().is_some_and(|c| c.is_ascii_digit()) {
        (name.to_owned(), version.to_owned())
    } else {
        let next = user_agent.split_whitespace().nth(1)?;
        (format!("{name}/{version}"), next.to_owned())
    };
    let plain = |text: &str, most: usize| {
        text.len() <= most
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/+".contains(&b))
    };
    (plain(&name, 64) && plain(&version, 32)).then_some(ClientSeen { name, version })
}

/// What to tell a key holder about their setup.
pub fn warnings(seen: &CredentialsSeen) -> Vec<String> {
    let mut out = Vec::new();
    match (seen.api_key, seen.bearer) {
        (Some(Credential::RelayKey), Some(Credential::RelayKey)) => out.push(
            "both ANTHROPIC_API_KEY and ANTHROPIC_AUTH_TOKEN are set (the same key): one is enough; \
             unset ANTHROPIC_API_KEY"
                .to_owned(),
        ),
        (Some(Credential::Other), Some(Credential::RelayKey)) => out.push(
            "x-api-key carries something that is not this relay's key (an Anthropic key?): \
             unset ANTHROPIC_API_KEY, or set it to your sk-proxy- key"
                .to_owned(),
        ),
        (Some(Credential::RelayKey), Some(Credential::Other)) => out.push(
            "Authorization carries something that is not this relay's key (a claude.ai login?): \
             unset ANTHROPIC_AUTH_TOKEN, or set it to your sk-proxy- key"
                .to_owned(),
        ),
        _ => {}
    }
    out
}

/// The environment lines for Claude Code against the relay at `base_url`,
/// for the key whose display prefix is `key_prefix` (the key itself is
/// never echoed: [`key_placeholder`] stands for it).
pub fn environment(base_url: &str, key_prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "ANTHROPIC_BASE_URL",
            base_url.trim_end_matches('/').to_owned(),
        ),
        ("ANTHROPIC_AUTH_TOKEN", key_placeholder(key_prefix)),
        ("CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY", "1".to_owned()),
    ]
}

/// What stands for a key in the lines shown: its display prefix
/// (`key::display_prefix`, which ends in `…` already) and what goes there.
/// One ellipsis either way, so a prefix stored without one reads alike.
pub fn key_placeholder(key_prefix: &str) -> String {
    format!("{}… (your sk-proxy- key)", key_prefix.trim_end_matches('…'))
}

/// A base URL a client may have been given by mistake: with `/v1` at the
/// end (Claude Code adds it), the requests go to `/v1/v1/…`.
pub fn base_url_problem(path: &str) -> Option<&'static str> {
    path.starts_with("/v1/v1/").then_some(
        "ANTHROPIC_BASE_URL must not end in /v1: Claude Code and the SDKs add it; remove it",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_read_from_their_user_agents() {
        for (agent, name, version) in [
            (
                "claude-cli/2.1.330 (external, cli)",
                "claude-cli",
                "2.1.330",
            ),
            (
                "claude-cli/1.0.128 (external, sdk-cli)",
                "claude-cli",
                "1.0.128",
            ),
            ("Anthropic/Python 2.12.0", "Anthropic/Python", "2.12.0"),
            ("Anthropic/JS 1.12.0", "Anthropic/JS", "1.12.0"),
            ("curl/8.5.0", "curl", "8.5.0"),
        ] {
            assert_eq!(
                client_of(agent),
                Some(ClientSeen {
                    name: name.into(),
                    version: version.into()
                }),
                "{agent}"
            );
        }
        for agent in [
            "",
            "Mozilla",
            "x/<script>",
            &format!("a/{}", "1".repeat(40)),
        ] {
            assert_eq!(client_of(agent), None, "{agent}");
        }
    }

    #[test]
    fn a_setup_that_sends_two_credentials_or_a_foreign_one_is_warned_about() {
        use Credential::{Other, RelayKey};
        let seen = |api_key, bearer| CredentialsSeen { api_key, bearer };
        assert!(warnings(&seen(Some(RelayKey), None)).is_empty());
        assert!(warnings(&seen(None, Some(RelayKey))).is_empty());
        assert!(warnings(&seen(Some(RelayKey), Some(RelayKey)))[0].contains("one is enough"));
        assert!(
            warnings(&seen(Some(Other), Some(RelayKey)))[0].contains("unset ANTHROPIC_API_KEY")
        );
        assert!(
            warnings(&seen(Some(RelayKey), Some(Other)))[0].contains("unset ANTHROPIC_AUTH_TOKEN")
        );
    }

    #[test]
    fn the_key_stands_in_the_environment_as_its_prefix_with_one_ellipsis() {
        let id = crate::domain::key::KeyId::parse("abcdefABCDEF").unwrap();
        let prefix = crate::domain::key::material::display_prefix(&id);
        let expected = "sk-proxy-abcdefABCDEF… (your sk-proxy- key)";
        assert_eq!(
            environment("https://relay.example", &prefix)[1],
            ("ANTHROPIC_AUTH_TOKEN", expected.to_owned())
        );
        // A prefix without its ellipsis reads the same.
        assert_eq!(key_placeholder("sk-proxy-abcdefABCDEF"), expected);
    }

    #[test]
    fn a_base_url_ending_in_v1_is_recognised_by_the_doubled_prefix() {
        assert!(base_url_problem("/v1/v1/messages").is_some());
        assert!(base_url_problem("/v1/messages").is_none());
        assert_eq!(
            environment("https://relay.example/prod/", "sk-proxy-abc…")[0],
            (
                "ANTHROPIC_BASE_URL",
                "https://relay.example/prod".to_owned()
            )
        );
    }
}
