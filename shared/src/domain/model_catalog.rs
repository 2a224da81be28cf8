//! The models a key may use, as `GET /v1/models` lists them: the upstream's
//! list filtered by the key's `allowed_models`, and the aliases admins
//! define (an alias names a real model id and a display name). What a valid
//! alias list is, how a requested name resolves, and how a list is paged
//! the way Anthropic pages it all live here.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::key::access::model_name_problem;
use super::key::{ApiKeyRecord, FieldError};

/// The most aliases an organisation defines.
pub const MAX_ALIASES: usize = 100;
/// A display name's longest spelling, in characters.
pub const MAX_DISPLAY_NAME: usize = 100;
/// The largest page `GET /v1/models` answers (Anthropic's own ceiling).
pub const MAX_PAGE: usize = 1000;
/// The page size when the client names none (Anthropic's default).
pub const DEFAULT_PAGE: usize = 20;

/// One alias as admins write it and `GET /admin/model-aliases` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAlias {
    /// The name clients ask for.
    pub alias: String,
    /// The upstream model id it is forwarded as, priced as and checked
    /// against allowlists and dollar limits as.
    pub model: String,
    /// What model pickers show; the alias itself when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// The aliases in force: valid, unique, each naming a real model (never
/// another alias, so a name resolves in one step).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelAliases(Vec<ModelAlias>);

impl ModelAliases {
    /// The list admins wrote, checked: each refusal names its entry
    /// (`aliases[1].model`).
    pub fn new(aliases: Vec<ModelAlias>) -> Result<ModelAliases, FieldError> {
        if aliases.len() > MAX_ALIASES {
            return Err(FieldError::new(
                "aliases",
                format!("at most {MAX_ALIASES} aliases"),
            ));
        }
        let names: HashSet<&str> = aliases.iter().map(|a| a.alias.as_str()).collect();
        let mut seen = HashSet::new();
        for (i, alias) in aliases.iter().enumerate() {
            let field = |name: &str| format!("aliases[{i}].{name}");
            if let Some(problem) = model_name_problem(&alias.alias) {
                return Err(FieldError::new(
                    field("alias"),
                    problem.replace("`model`", "an alias"),
                ));
            }
            if let Some(problem) = model_name_problem(&alias.model) {
                return Err(FieldError::new(field("model"), problem));
            }
            if !seen.insert(alias.alias.as_str()) {
                return Err(FieldError::new(
                    field("alias"),
                    format!("`{}` is defined twice", alias.alias),
                ));
            }
            if alias.model == alias.alias || names.contains(alias.model.as_str()) {
                return Err(FieldError::new(
                    field("model"),
                    "must be a real model id, not an alias",
                ));
            }
            if let Some(display) = &alias.display_name {
                let length = display.chars().count();
                if length == 0 || length > MAX_DISPLAY_NAME || display.chars().any(char::is_control)
                {
                    return Err(FieldError::new(
                        field("display_name"),
                        format!(
                            "must be 1 to {MAX_DISPLAY_NAME} characters, none a control character"
                        ),
                    ));
                }
            }
        }
        Ok(ModelAliases(aliases))
    }

    pub fn as_slice(&self) -> &[ModelAlias] {
        &self.0
    }

    /// The alias `requested` names, if it is one (exact, case included, as
    /// model ids are).
    pub fn resolve(&self, requested: &str) -> Option<&ModelAlias> {
        self.0.iter().find(|alias| alias.alias == requested)
    }
}

/// A model as `/v1/models` lists it (Anthropic's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelEntry {
    #[serde(rename = "type", default = "model_type")]
    pub kind: String,
    pub id: String,
    #[serde(default)]
    pub display_name: String,
    /// RFC 3339, as the upstream wrote it.
    #[serde(default = "epoch")]
    pub created_at: String,
}

fn model_type() -> String {
    "model".to_owned()
}

/// What an entry without a date claims: aliases have none of their own.
fn epoch() -> String {
    "1970-01-01T00:00:00Z".to_owned()
}

/// One page of an upstream's `/v1/models` answer.
#[derive(Debug, Deserialize)]
pub struct UpstreamModelsPage {
    pub data: Vec<ModelEntry>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub last_id: Option<String>,
}

/// The models `key` may use: each alias whose target it may use (listed
/// first, as the names admins chose for it), then each upstream model it
/// may use that some upstream of the pool serves (`served`). The allowlist
/// judges the real model: an alias never opens a model the key may not
/// use.
pub fn key_models(
    upstream: &[ModelEntry],
    aliases: &ModelAliases,
    key: &ApiKeyRecord,
    served: impl Fn(&str) -> bool,
) -> Vec<ModelEntry> {
    let alias_entries = aliases
        .as_slice()
        .iter()
        .filter(|alias| key.model_allowed(Some(&alias.model)) && served(&alias.model))
        .map(|alias| {
            let target = upstream.iter().find(|m| m.id == alias.model);
            ModelEntry {
                kind: model_type(),
                id: alias.alias.clone(),
                display_name: alias
                    .display_name
                    .clone()
                    .unwrap_or_else(|| alias.alias.clone()),
                created_at: target.map_or_else(epoch, |m| m.created_at.clone()),
            }
        });
    let mut listed = HashSet::new();
    alias_entries
        .chain(
            upstream
                .iter()
                .filter(|m| key.model_allowed(Some(&m.id)) && served(&m.id))
                .cloned(),
        )
        .filter(|m| listed.insert(m.id.clone()))
        .collect()
}

/// The query of a `/v1/models` list: `limit`, `after_id`, `before_id`.
#[derive(Debug, Default, Deserialize)]
pub struct ModelsQuery {
    pub limit: Option<String>,
    pub after_id: Option<String>,
    pub before_id: Option<String>,
}

/// The page Anthropic's list answers for `query`: `limit` entries after
/// `after_id` (or the last `limit` before `before_id`), with `has_more`,
/// `first_id` and `last_id`. An id not in the list gives an empty page.
pub fn page(models: &[ModelEntry], query: &ModelsQuery) -> Result<serde_json::Value, String> {
    let limit = match query.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| format!("limit: must be an integer from 1 to {MAX_PAGE}"))?,
    };
    if query.after_id.is_some() && query.before_id.is_some() {
        return Err("after_id and before_id cannot be given together".to_owned());
    }
    let position = |id: &str| models.iter().position(|m| m.id == id);
    let (start, end) = match (&query.after_id, &query.before_id) {
        (Some(after), _) => {
            let start = position(after).map_or(models.len(), |i| i + 1);
            (start, (start + limit).min(models.len()))
        }
        (_, Some(before)) => {
            let end = position(before).unwrap_or(0);
            (end.saturating_sub(limit), end)
        }
        (None, None) => (0, limit.min(models.len())),
    };
    let shown = &models[start..end];
    let has_more = if query.before_id.is_some() {
        start > 0
    } else {
        end < models.len()
    };
    Ok(serde_json::json!({
        "data": shown,
        "has_more": has_more,
        "first_id": shown.first().map(|m| &m.id),
        "last_id": shown.last().map(|m| &m.id),
    }))
}

/// The JSON object `body` with its top-level `model` naming `model`
/// instead: only that value's bytes change, everything else stays as it
/// was written (an alias resolved in a request, Bedrock's model id in an
/// answer). An error when `body` is not an object with one `model`.
pub fn with_model(body: &[u8], model: &str) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct ModelValue<'a> {
        #[serde(borrow)]
        model: &'a serde_json::value::RawValue,
    }
    // serde would read the struct from an array too, by position.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(serde::de::Error::custom("not a JSON object"));
    }
    let found: ModelValue<'_> = serde_json::from_slice(body)?;
    // The raw value borrows from `body`: its place is where it points.
    let raw = found.model.get().as_bytes();
    let start = (raw.as_ptr() as usize).wrapping_sub(body.as_ptr() as usize);
    let end = start + raw.len();
    let replacement = serde_json::to_vec(model)?;
    let mut out = Vec::with_capacity(body.len() - raw.len() + replacement.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(&replacement);
    out.extend_from_slice(&body[end..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_with_models(allowed: &[&str]) -> ApiKeyRecord {
        let mut record = ApiKeyRecord::sample(crate::domain::now()).0;
        record.allowed_models = allowed.iter().map(|m| (*m).to_owned()).collect();
        record
    }

    fn alias(alias: &str, model: &str) -> ModelAlias {
        ModelAlias {
            alias: alias.to_owned(),
            model: model.to_owned(),
            display_name: None,
        }
    }

    fn entry(id: &str) -> ModelEntry {
        ModelEntry {
            kind: "model".to_owned(),
            id: id.to_owned(),
            display_name: format!("Claude {id}"),
            created_at: "2026-09-01T00:00:00Z".to_owned(),
        }
    }

    fn ids(models: &[ModelEntry]) -> Vec<&str> {
        models.iter().map(|m| m.id.as_str()).collect()
    }

    #[test]
    fn only_the_top_level_model_is_replaced() {
        let body = br#"{ "messages":[{"role":"user","content":"say \"model\":\"x\""}],
            "metadata":{"model":"inner"}, "m\u006fdel" : "claude-team" ,"max_tokens":5}"#;
        let replaced = with_model(body, "claude-sonnet-5-5").unwrap();
        let expected = br#"{ "messages":[{"role":"user","content":"say \"model\":\"x\""}],
            "metadata":{"model":"inner"}, "m\u006fdel" : "claude-sonnet-5-5" ,"max_tokens":5}"#;
        assert_eq!(&replaced[..], &expected[..]);
        assert!(with_model(br#"{"messages":[]}"#, "m").is_err());
        assert!(with_model(br#"["claude-team"]"#, "m").is_err());
    }

    #[test]
    fn aliases_resolve_in_one_step_and_exactly() {
        let aliases = ModelAliases::new(vec![alias("claude-team", "claude-sonnet-5-5")]).unwrap();
        assert_eq!(
            aliases.resolve("claude-team").map(|a| a.model.as_str()),
            Some("claude-sonnet-5-5")
        );
        assert!(aliases.resolve("Claude-Team").is_none());
        assert!(aliases.resolve("claude-sonnet-5-5").is_none());
    }

    #[test]
    fn invalid_alias_lists_are_refused_naming_the_entry() {
        let refused = |list: Vec<ModelAlias>| ModelAliases::new(list).unwrap_err().field;
        assert_eq!(refused(vec![alias("a b", "claude-x")]), "aliases[0].alias");
        assert_eq!(
            refused(vec![alias("ok", "claude-x"), alias("ok2", "")]),
            "aliases[1].model"
        );
        assert_eq!(
            refused(vec![alias("dup", "claude-x"), alias("dup", "claude-y")]),
            "aliases[1].alias"
        );
        // A chain or a loop would resolve to something no admin wrote.
        assert_eq!(
            refused(vec![alias("a", "b"), alias("b", "claude-x")]),
            "aliases[0].model"
        );
        assert_eq!(refused(vec![alias("same", "same")]), "aliases[0].model");
        let mut named = alias("n", "claude-x");
        named.display_name = Some("bad\u{7}bell".to_owned());
        assert_eq!(refused(vec![named.clone()]), "aliases[0].display_name");
        named.display_name = Some("x".repeat(MAX_DISPLAY_NAME + 1));
        assert_eq!(refused(vec![named.clone()]), "aliases[0].display_name");
        named.display_name = Some("é".repeat(MAX_DISPLAY_NAME));
        assert!(ModelAliases::new(vec![named]).is_ok());
        let many = (0..=MAX_ALIASES)
            .map(|i| alias(&format!("a{i}"), "claude-x"))
            .collect();
        assert_eq!(refused(many), "aliases");
    }

    #[test]
    fn a_key_sees_the_aliases_of_models_it_may_use_then_those_models() {
        let upstream = [
            entry("claude-opus-5-5"),
            entry("claude-sonnet-5-5"),
            entry("claude-haiku-5-5"),
        ];
        let mut team = alias("claude-team", "claude-sonnet-5-5");
        team.display_name = Some("Team default".to_owned());
        let aliases = ModelAliases::new(vec![
            team,
            alias("claude-best", "claude-opus-5-5"),
            alias("claude-gone", "claude-retired-1"),
        ])
        .unwrap();
        let everyone = record_with_models(&[]);
        let listed = key_models(&upstream, &aliases, &everyone, |_| true);
        assert_eq!(
            ids(&listed),
            [
                "claude-team",
                "claude-best",
                "claude-gone",
                "claude-opus-5-5",
                "claude-sonnet-5-5",
                "claude-haiku-5-5"
            ]
        );
        assert_eq!(listed[0].display_name, "Team default");
        assert_eq!(listed[0].created_at, "2026-09-01T00:00:00Z");
        assert_eq!(listed[1].display_name, "claude-best");
        assert_eq!(listed[2].created_at, "1970-01-01T00:00:00Z");

        // The allowlist judges the real model: the opus alias goes with opus.
        let limited = record_with_models(&["claude-sonnet-*", "claude-haiku-5-5"]);
        let listed = key_models(&upstream, &aliases, &limited, |_| true);
        assert_eq!(
            ids(&listed),
            ["claude-team", "claude-sonnet-5-5", "claude-haiku-5-5"]
        );
        // A model no upstream serves is not offered, nor its alias.
        let listed = key_models(&upstream, &aliases, &everyone, |m| m != "claude-opus-5-5");
        assert!(!ids(&listed).contains(&"claude-opus-5-5"));
        assert!(!ids(&listed).contains(&"claude-best"));
    }

    #[test]
    fn pages_follow_anthropics_cursors() {
        let models: Vec<ModelEntry> = ["a", "b", "c", "d", "e"].into_iter().map(entry).collect();
        let query = |limit: Option<&str>, after: Option<&str>, before: Option<&str>| ModelsQuery {
            limit: limit.map(str::to_owned),
            after_id: after.map(str::to_owned),
            before_id: before.map(str::to_owned),
        };
        let shown = |q: ModelsQuery| {
            let page = page(&models, &q).unwrap();
            let ids: Vec<String> = page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect();
            (
                ids.join(","),
                page["has_more"].as_bool().unwrap(),
                page["first_id"].clone(),
                page["last_id"].clone(),
            )
        };
        assert_eq!(shown(query(None, None, None)).0, "a,b,c,d,e");
        let first = shown(query(Some("2"), None, None));
        assert_eq!((first.0.as_str(), first.1), ("a,b", true));
        assert_eq!((first.2, first.3), ("a".into(), "b".into()));
        assert_eq!(shown(query(Some("2"), Some("b"), None)).0, "c,d");
        let last = shown(query(Some("2"), Some("c"), None));
        assert_eq!((last.0.as_str(), last.1), ("d,e", false));
        let back = shown(query(Some("2"), None, Some("d")));
        assert_eq!((back.0.as_str(), back.1), ("b,c", true));
        let start = shown(query(Some("2"), None, Some("b")));
        assert_eq!((start.0.as_str(), start.1), ("a", false));
        let unknown = shown(query(None, Some("zz"), None));
        assert_eq!(
            (unknown.0.as_str(), unknown.1, unknown.2),
            ("", false, serde_json::Value::Null)
        );
        for bad in ["0", "1001", "-1", "ten"] {
            assert!(
                page(&models, &query(Some(bad), None, None)).is_err(),
                "{bad}"
            );
        }
        assert!(page(&models, &query(None, Some("a"), Some("c"))).is_err());
    }
}
