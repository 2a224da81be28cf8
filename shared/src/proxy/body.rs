//! What the relay reads from requests it otherwise forwards untouched: a
//! message request's model, `stream`, `max_tokens` and `inference_geo`,
//! every `file_id` a body references, and the context window its
//! `anthropic-beta` header opens.

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::domain::price::Attribute;
use crate::domain::usage::{CONTEXT_WINDOW, LONG_CONTEXT_WINDOW};

/// The context window a request may fill: 1M tokens with the long-context
/// beta (`context-1m-…` in `anthropic-beta`), else the standard 200K.
pub(super) fn context_window(headers: &http::HeaderMap) -> u64 {
    let long = headers
        .get_all("anthropic-beta")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|beta| beta.trim().starts_with("context-1m"));
    if long {
        LONG_CONTEXT_WINDOW
    } else {
        CONTEXT_WINDOW
    }
}

/// The few fields of a Messages (or count_tokens) body the relay reads.
/// Duplicate `model` keys are refused by serde: the relay and the upstream
/// must not read different ones.
#[derive(Debug, Deserialize)]
pub struct MessagesFields {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub max_tokens: Option<serde_json::Value>,
    /// `"us"` prices every token class higher.
    #[serde(default)]
    pub inference_geo: Option<serde_json::Value>,
    /// Claude Code's `metadata.user_id` names its session.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

impl MessagesFields {
    /// `metadata.user_id`, when it is a string.
    pub fn user_id(&self) -> Option<&str> {
        self.metadata.as_ref()?.get("user_id")?.as_str()
    }

    /// The request attributes that change its price.
    pub fn price_attributes(&self) -> Vec<Attribute> {
        let us = self
            .inference_geo
            .as_ref()
            .and_then(serde_json::Value::as_str)
            == Some("us");
        if us {
            vec![Attribute::UsInference]
        } else {
            Vec::new()
        }
    }
}

/// Whether `body` is a JSON object (by its first byte; the parse that
/// follows checks the rest). serde reads a struct's fields from an array
/// too, in order: those are refused, not read.
pub fn is_json_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Whether `body` can name a `file_id` at all: the key spelt out, or some of
/// its letters written as `\u00XX` escapes. Most bodies have neither (an
/// escape such as `\u001b` in a tool result is not one of those letters)
/// and skip the walk.
pub fn may_reference_files(body: &[u8]) -> bool {
    if memchr::memmem::find(body, b"file_id").is_some() {
        return true;
    }
    memchr::memmem::find_iter(body, b"\\u00").any(|at| {
        let hex = body.get(at + 4..at + 6).unwrap_or_default();
        let hex = std::str::from_utf8(hex).unwrap_or("");
        u8::from_str_radix(hex, 16).is_ok_and(|byte| b"file_d".contains(&byte))
    })
}

/// Every string value of a `file_id` key anywhere in the JSON `body`,
/// duplicates of one object's key included (whichever copy the upstream
/// reads, the relay has checked it).
pub fn file_ids(body: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    let mut ids = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    FileIdWalk {
        ids: &mut ids,
        is_file_id: false,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Walks one JSON value, collecting `file_id` strings.
struct FileIdWalk<'a> {
    ids: &'a mut Vec<String>,
    /// The value is a `file_id`'s: a string is collected.
    is_file_id: bool,
}

impl<'de> DeserializeSeed<'de> for FileIdWalk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// A map key: only whether it is `file_id` matters (escapes decoded).
struct IsFileId(bool);

impl<'de> Deserialize<'de> for IsFileId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = IsFileId;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<IsFileId, E> {
                Ok(IsFileId(key == "file_id"))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de> Visitor<'de> for FileIdWalk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(IsFileId(is_file_id)) = map.next_key()? {
            map.next_value_seed(FileIdWalk {
                ids: self.ids,
                is_file_id,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(FileIdWalk {
                ids: self.ids,
                is_file_id: false,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_str<E>(self, value: &str) -> Result<(), E> {
        if self.is_file_id {
            self.ids.push(value.to_owned());
        }
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ids_are_found_at_any_depth_however_the_key_is_spelt() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"document","source":{"type":"file","file_id":"file_a"}},
            {"type":"image","source":{"type":"file","file\u005fid":"file_b"}},
            {"type":"container_upload","file_id":"file_c","file_id":"file_d"},
            {"type":"text","text":"file_id is just text here"}]}],
            "metadata":{"file_id":{"nested":{"file_id":"file_e"}}}}"#;
        assert!(may_reference_files(body));
        assert_eq!(
            file_ids(body).unwrap(),
            ["file_a", "file_b", "file_c", "file_d", "file_e"]
        );
    }

    #[test]
    fn bodies_without_the_key_skip_the_walk() {
        assert!(!may_reference_files(
            br#"{"model":"m","messages":[{"role":"user","content":"hi \u001b[0m \u00e9"}]}"#
        ));
        for spelling in [
            r#""fil\u0065_id""#,
            r#""\u0066ile_id""#,
            r#""file\u005Fid""#,
        ] {
            assert!(may_reference_files(spelling.as_bytes()), "{spelling}");
        }
        assert!(file_ids(br#"{"a":[1,2,{"b":null}]}"#).unwrap().is_empty());
        assert!(file_ids(br#"{"a":1} trailing"#).is_err());
    }

    #[test]
    fn duplicate_model_keys_are_refused() {
        let parsed = serde_json::from_slice::<MessagesFields>(
            br#"{"model":"claude-haiku-5-5","model":"claude-opus-5-5"}"#,
        );
        assert!(parsed.is_err());
    }
}
