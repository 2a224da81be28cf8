//! The access decision for one request, from the key record alone (no I/O):
//! status, expiry and the IP, origin and model allowlists.

use std::net::IpAddr;

use time::OffsetDateTime;

use super::ApiKeyRecord;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Disabled,
    Expired,
    IpNotAllowed,
    OriginNotAllowed,
    ModelNotAllowed(String),
    ModelMissing,
    /// The request references a file another key uploaded (or none did).
    FileNotOwned(String),
}

impl Refusal {
    pub fn message(&self) -> String {
        match self {
            Refusal::Disabled => "this API key is disabled".into(),
            Refusal::Expired => "this API key has expired".into(),
            Refusal::IpNotAllowed => "this API key may not be used from this IP address".into(),
            Refusal::OriginNotAllowed => "this API key may not be used from this origin".into(),
            Refusal::ModelNotAllowed(model) => {
                let shown: String = model
                    .chars()
                    .take(100)
                    .filter(|c| !c.is_control())
                    .collect();
                format!("this API key may not use model `{shown}`")
            }
            Refusal::ModelMissing => {
                "this API key is limited to some models; the request must name one".into()
            }
            Refusal::FileNotOwned(id) => {
                let shown: String = id.chars().take(100).filter(|c| !c.is_control()).collect();
                format!("this API key may not use file `{shown}`: upload it with this key")
            }
        }
    }
}

/// Longest model name the relay forwards: whatever is served must be
/// recordable (model aggregates and log indexes use it in their keys,
/// which DynamoDB caps at 1 KB for sort keys).
pub const MAX_MODEL_NAME: usize = 256;

/// Why a model name is refused before anything is forwarded, if it is.
/// Model ids are ASCII: Anthropic's (`claude-opus-5-5`, with dates),
/// Bedrock's (`us.anthropic.claude-…-v1:0`, ARNs with `/`), and suffixes
/// such as `[1m]`.
pub fn model_name_problem(model: &str) -> Option<String> {
    if model.is_empty() || model.len() > MAX_MODEL_NAME {
        return Some(format!(
            "`model` must be 1 to {MAX_MODEL_NAME} characters long"
        ));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._:@/[]".contains(&b);
    (!model.bytes().all(allowed))
        .then(|| "`model` may contain only letters, digits and - . _ : @ / [ ]".to_owned())
}

/// What the request says about itself that the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub ip: IpAddr,
    pub origin: Option<&'a str>,
    /// `Some` for requests that carry a model (messages, count_tokens).
    pub model: Option<&'a str>,
    pub names_model: bool,
}

/// Whether a key may be used at all right now, whatever the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Usable,
    Disabled,
    Expired,
}

/// The status rule, stated once: a disabled key is refused before its
/// expiry is looked at. `check_access` and the admission decision
/// (`domain::admission`) both apply it.
pub fn key_status(key: &ApiKeyRecord, now: OffsetDateTime) -> KeyStatus {
    if !key.is_active {
        KeyStatus::Disabled
    } else if key.is_expired(now) {
        KeyStatus::Expired
    } else {
        KeyStatus::Usable
    }
}

pub fn check_access(
    key: &ApiKeyRecord,
    facts: &RequestFacts<'_>,
    now: OffsetDateTime,
) -> Result<(), Refusal> {
    match key_status(key, now) {
        KeyStatus::Usable => {}
        KeyStatus::Disabled => return Err(Refusal::Disabled),
        KeyStatus::Expired => return Err(Refusal::Expired),
    }
    if !key.ip_allowed(facts.ip) {
        return Err(Refusal::IpNotAllowed);
    }
    if !key.origin_allowed(facts.origin) {
        return Err(Refusal::OriginNotAllowed);
    }
    if facts.names_model && !key.model_allowed(facts.model) {
        return Err(match facts.model {
            Some(model) => Refusal::ModelNotAllowed(model.to_owned()),
            None => Refusal::ModelMissing,
        });
    }
    Ok(())
}
