//! Key-holder authentication shared by the proxy and the usage routes: the
//! `sk-proxy-…` key from `x-api-key` or `Authorization: Bearer`, checked
//! against the stored record and the key's allowlists.

use std::net::IpAddr;

use http::{HeaderMap, header};

use crate::domain::key::ApiKeyRecord;
use crate::domain::key::PresentedKey;
use crate::domain::key::access::{RequestFacts, check_access};
use crate::error::ApiError;
use crate::store::Store;
use time::OffsetDateTime;

/// The key a client presented: `x-api-key` or `Authorization: Bearer`
/// (Claude Code may send both; if both are relay keys they must agree).
pub fn presented_key(headers: &HeaderMap) -> Result<PresentedKey, ApiError> {
    let api_key = headers
        .get("x-api-key")
        .map(|v| v.to_str().map(str::trim).unwrap_or(""));
    let bearer = headers.get(header::AUTHORIZATION).map(|v| {
        let value = v.to_str().unwrap_or("").trim();
        match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => "",
        }
    });
    let candidates: Vec<&str> = [api_key, bearer].into_iter().flatten().collect();
    if candidates.is_empty() {
        return Err(ApiError::unauthorized(
            "missing API key: send your sk-proxy- key as `x-api-key` or `Authorization: Bearer`",
        ));
    }
    let parsed: Vec<PresentedKey> = candidates
        .iter()
        .filter_map(|c| PresentedKey::parse(c).ok())
        .collect();
    let key = match parsed.as_slice() {
        [] => {
            let reason = PresentedKey::parse(candidates[0])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            Err(ApiError::unauthorized(format!("invalid API key: {reason}")))
        }
        [one] => Ok(one.clone()),
        [first, second, ..] => {
            if first.id() == second.id() && first.hash().matches(&second.hash()) {
                Ok(first.clone())
            } else {
                Err(ApiError::unauthorized(
                    "x-api-key and Authorization carry different API keys; send one",
                ))
            }
        }
    }?;
    // The id only (never the secret): from here on, the request's log
    // lines name the key it presents (not yet verified: a forged secret
    // is logged under the id it claims).
    tracing::Span::current().record("key_id", tracing::field::display(key.id()));
    Ok(key)
}

/// Who is calling, as a key's allowlists see it.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub ip: IpAddr,
    pub origin: Option<&'a str>,
}

impl<'a> Caller<'a> {
    pub fn of(headers: &'a HeaderMap, ip: IpAddr) -> Caller<'a> {
        Caller {
            ip,
            origin: headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        }
    }
}

/// The models a request names, for the model allowlist: `None` for a
/// request that names none (usage, model list, files), else each model
/// named (`None` inside: the body names no model where one belongs).
pub type NamedModels<'m> = Option<&'m [Option<&'m str>]>;

/// Whether `record` admits this caller and each of `models`: status,
/// expiry, IP, origin and model allowlist (`domain::key::access`).
pub fn admits(
    record: &ApiKeyRecord,
    caller: &Caller<'_>,
    models: NamedModels<'_>,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    let facts = |model, names_model| RequestFacts {
        ip: caller.ip,
        origin: caller.origin,
        model,
        names_model,
    };
    match models {
        None => check_access(record, &facts(None, false), now)?,
        Some(models) => {
            for model in models {
                check_access(record, &facts(*model, true), now)?;
            }
        }
    }
    Ok(())
}

/// The one key-holder authentication of the proxy and the usage routes:
/// the key's record, read afresh (consistent), if `key`'s secret matches
/// and the record admits this caller and `models`. Nothing is counted.
pub async fn authenticate(
    store: &Store,
    key: &PresentedKey,
    caller: &Caller<'_>,
    models: NamedModels<'_>,
    now: OffsetDateTime,
) -> Result<ApiKeyRecord, ApiError> {
    let record = store
        .get_key(key.id())
        .await?
        .filter(|r| r.secret_hash.matches(&key.hash()))
        .ok_or_else(ApiError::invalid_key)?;
    admits(&record, caller, models, now)?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn key_is_taken_from_either_header_or_both_when_equal() {
        let key = PresentedKey::generate().expose();
        let bearer = format!("Bearer {key}");
        for pairs in [
            vec![("x-api-key", key.as_str())],
            vec![("authorization", bearer.as_str())],
            vec![
                ("x-api-key", key.as_str()),
                ("authorization", bearer.as_str()),
            ],
            vec![
                ("x-api-key", key.as_str()),
                ("authorization", "Bearer sk-ant-old-oauth"),
            ],
        ] {
            assert_eq!(presented_key(&headers(&pairs)).unwrap().expose(), key);
        }
    }

    #[test]
    fn missing_malformed_and_conflicting_keys_are_401() {
        let a = PresentedKey::generate().expose();
        let b = format!("Bearer {}", PresentedKey::generate().expose());
        for pairs in [
            vec![],
            vec![("x-api-key", "sk-proxy-short")],
            vec![("authorization", "Basic Zm9vOmJhcg==")],
            vec![("x-api-key", a.as_str()), ("authorization", b.as_str())],
        ] {
            let err = presented_key(&headers(&pairs)).unwrap_err();
            assert_eq!(err.status(), StatusCode::UNAUTHORIZED, "{pairs:?}");
        }
    }
}
