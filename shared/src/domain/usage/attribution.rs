//! Who in a Claude Code session made a request: the agent and its parent
//! (`x-claude-code-agent-id`, `x-claude-code-parent-agent-id`), the kind of
//! request (`x-claude-code-request-class`) and the agent's type
//! (`x-claude-code-agent-type`). The client chooses them all, so each is
//! kept only when short and plain, and the class only as one of a fixed set
//! of names: nothing of them reaches a row, a log line or an aggregate key
//! as the client spelt it.

use std::fmt;

use serde::Serialize;

use super::{Counters, SessionId};
use crate::domain::price::MicroUsd;

/// The headers Claude Code names the request's agent and class in.
pub const AGENT_ID_HEADER: &str = "x-claude-code-agent-id";
pub const PARENT_AGENT_ID_HEADER: &str = "x-claude-code-parent-agent-id";
pub const REQUEST_CLASS_HEADER: &str = "x-claude-code-request-class";
pub const AGENT_TYPE_HEADER: &str = "x-claude-code-agent-type";

/// The longest agent type kept: Claude Code's are names such as
/// `general-purpose` or a custom agent's `plugin:reviewer`.
pub const MAX_AGENT_TYPE: usize = 64;

/// An agent id fit to be recorded: the rule session ids follow
/// ([`SessionId::parse`]: 1 to 128 characters of `[A-Za-z0-9._:-]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentId(String);

impl AgentId {
    /// The id a client sent, if short and plain; anything else is dropped.
    pub fn parse(text: &str) -> Option<AgentId> {
        SessionId::parse(text).map(|id| AgentId(id.as_str().to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An agent type fit to be recorded: 1 to [`MAX_AGENT_TYPE`] characters of
/// `[A-Za-z0-9 ._:-]`, neither starting nor ending with a space.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentType(String);

impl AgentType {
    /// The type a client sent, if short and plain; anything else is dropped.
    pub fn parse(text: &str) -> Option<AgentType> {
        let plain = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" ._:-".contains(&b));
        let trimmed = text.trim() == text;
        (plain && trimmed && (1..=MAX_AGENT_TYPE).contains(&text.len()))
            .then(|| AgentType(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What kind of request Claude Code says this is. A value outside the
/// documented five is [`RequestClass::Other`]: recorded under that name,
/// never as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestClass {
    Main,
    Subagent,
    Workflow,
    Compaction,
    Auxiliary,
    Other,
}

/// The bucket of requests that named no class (no header, or an empty
/// one): older clients, SDKs, batches.
pub const UNCLASSIFIED: &str = "unclassified";

impl RequestClass {
    /// Every class, in the order the views list them.
    pub const ALL: [RequestClass; 6] = [
        RequestClass::Main,
        RequestClass::Subagent,
        RequestClass::Workflow,
        RequestClass::Compaction,
        RequestClass::Auxiliary,
        RequestClass::Other,
    ];

    /// Every bucket a request may be counted under: each class's name, then
    /// [`UNCLASSIFIED`]. Aggregate attribute names are built from these
    /// only.
    pub const BUCKETS: [&'static str; 7] = [
        "main",
        "subagent",
        "workflow",
        "compaction",
        "auxiliary",
        "other",
        UNCLASSIFIED,
    ];

    /// The class a header names (case and surrounding blanks ignored);
    /// `None` for an empty value, [`RequestClass::Other`] for any unknown
    /// one.
    pub fn parse(text: &str) -> Option<RequestClass> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let class = RequestClass::ALL
            .into_iter()
            .find(|class| class.name().eq_ignore_ascii_case(text));
        Some(class.unwrap_or(RequestClass::Other))
    }

    pub fn name(self) -> &'static str {
        match self {
            RequestClass::Main => "main",
            RequestClass::Subagent => "subagent",
            RequestClass::Workflow => "workflow",
            RequestClass::Compaction => "compaction",
            RequestClass::Auxiliary => "auxiliary",
            RequestClass::Other => "other",
        }
    }

    /// The bucket a request of class `class` counts under in the per-class
    /// views: the class's name, or [`UNCLASSIFIED`] when it named none.
    pub fn bucket(class: Option<RequestClass>) -> &'static str {
        class.map_or(UNCLASSIFIED, RequestClass::name)
    }
}

impl fmt::Display for RequestClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request's attribution, each part only when the client sent it in a
/// form fit to record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    pub agent_id: Option<AgentId>,
    pub parent_agent_id: Option<AgentId>,
    pub request_class: Option<RequestClass>,
    pub agent_type: Option<AgentType>,
}

impl Attribution {
    /// Reads the four headers through `header` (a header's value by its
    /// lower-case name, when it is text).
    pub fn of<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Attribution {
        Attribution {
            agent_id: header(AGENT_ID_HEADER).and_then(AgentId::parse),
            parent_agent_id: header(PARENT_AGENT_ID_HEADER).and_then(AgentId::parse),
            request_class: header(REQUEST_CLASS_HEADER).and_then(RequestClass::parse),
            agent_type: header(AGENT_TYPE_HEADER).and_then(AgentType::parse),
        }
    }

    /// The bucket the request counts under in the per-class views.
    pub fn bucket(&self) -> &'static str {
        RequestClass::bucket(self.request_class)
    }
}

/// What the per-class views count of a bucket's requests: the tokens by
/// type, what they cost, and how many requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassTotals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cost_micro_usd: MicroUsd,
}

impl ClassTotals {
    /// One settlement's share of its bucket.
    pub fn of(counters: &Counters) -> ClassTotals {
        ClassTotals {
            requests: counters.requests,
            input_tokens: counters.usage.input_tokens,
            output_tokens: counters.usage.output_tokens,
            cache_creation_input_tokens: counters.usage.cache_creation_input_tokens,
            cache_read_input_tokens: counters.usage.cache_read_input_tokens,
            cost_micro_usd: counters.cost_micro_usd,
        }
    }

    /// Every billed token: input + cache creation + cache read + output.
    pub fn tokens(&self) -> u64 {
        self.input_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
            + self.output_tokens
    }

    pub fn add(&mut self, other: &ClassTotals) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.cost_micro_usd += other.cost_micro_usd;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::TokenUsage;

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, value)| *value)
        }
    }

    #[test]
    fn the_four_headers_are_kept_when_plain() {
        let sent = [
            (AGENT_ID_HEADER, "agent-7c9e6679"),
            (
                PARENT_AGENT_ID_HEADER,
                "0f3c2a1e-9b7d-4c8e-a5f6-1234567890ab",
            ),
            (REQUEST_CLASS_HEADER, "subagent"),
            (AGENT_TYPE_HEADER, "general-purpose"),
        ];
        let attribution = Attribution::of(headers(&sent));
        assert_eq!(
            attribution.agent_id.as_ref().map(AgentId::as_str),
            Some("agent-7c9e6679")
        );
        assert_eq!(
            attribution.parent_agent_id.as_ref().map(AgentId::as_str),
            Some("0f3c2a1e-9b7d-4c8e-a5f6-1234567890ab")
        );
        assert_eq!(attribution.request_class, Some(RequestClass::Subagent));
        assert_eq!(
            attribution.agent_type.as_ref().map(AgentType::as_str),
            Some("general-purpose")
        );
        assert_eq!(attribution.bucket(), "subagent");
    }

    #[test]
    fn absent_headers_leave_each_part_empty_and_the_request_unclassified() {
        let attribution = Attribution::of(headers(&[]));
        assert_eq!(attribution, Attribution::default());
        assert_eq!(attribution.bucket(), UNCLASSIFIED);
    }

    #[test]
    fn hostile_values_are_dropped_not_recorded() {
        let long = "a".repeat(10 * 1024);
        for bad in [
            long.as_str(),
            "",
            "agent\nid",
            "agent\u{7f}",
            "a b",
            "KEY#x/SESSION#y",
            "ünïcode",
        ] {
            let sent = [
                (AGENT_ID_HEADER, bad),
                (PARENT_AGENT_ID_HEADER, bad),
                (AGENT_TYPE_HEADER, bad),
            ];
            let attribution = Attribution::of(headers(&sent));
            assert_eq!(attribution.agent_id, None, "{bad:?}");
            assert_eq!(attribution.parent_agent_id, None, "{bad:?}");
            // Spaces are fine inside a type, not control characters.
            if bad != "a b" {
                assert_eq!(attribution.agent_type, None, "{bad:?}");
            }
        }
    }

    #[test]
    fn agent_ids_follow_the_session_id_bounds() {
        assert!(AgentId::parse(&"x".repeat(crate::domain::usage::MAX_SESSION_ID)).is_some());
        assert!(AgentId::parse(&"x".repeat(crate::domain::usage::MAX_SESSION_ID + 1)).is_none());
    }

    #[test]
    fn agent_types_are_short_plain_text() {
        for good in [
            "general-purpose",
            "Explore",
            "plugin:code-reviewer",
            "my agent v2.1",
            &"t".repeat(MAX_AGENT_TYPE),
        ] {
            assert_eq!(
                AgentType::parse(good).as_ref().map(AgentType::as_str),
                Some(good)
            );
        }
        for bad in [
            "",
            " padded",
            "padded ",
            &"t".repeat(MAX_AGENT_TYPE + 1),
            "tab\there",
            "quote\"d",
            "<script>",
            "a/b",
            "ünïcode",
        ] {
            assert_eq!(AgentType::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_five_documented_classes_are_read_and_any_other_value_is_other() {
        let cases = [
            ("main", Some(RequestClass::Main)),
            ("subagent", Some(RequestClass::Subagent)),
            ("workflow", Some(RequestClass::Workflow)),
            ("compaction", Some(RequestClass::Compaction)),
            ("auxiliary", Some(RequestClass::Auxiliary)),
            (" Compaction ", Some(RequestClass::Compaction)),
            ("SUBAGENT", Some(RequestClass::Subagent)),
            ("background", Some(RequestClass::Other)),
            ("main\r\nx-evil: 1", Some(RequestClass::Other)),
            ("class|main|requests", Some(RequestClass::Other)),
            ("", None),
            ("   ", None),
        ];
        for (sent, class) in cases {
            assert_eq!(RequestClass::parse(sent), class, "{sent:?}");
        }
        let huge = "m".repeat(10 * 1024);
        assert_eq!(RequestClass::parse(&huge), Some(RequestClass::Other));
    }

    #[test]
    fn every_bucket_a_request_can_land_in_is_a_listed_fixed_name() {
        let mut landed: Vec<&str> = RequestClass::ALL
            .into_iter()
            .map(|class| RequestClass::bucket(Some(class)))
            .collect();
        landed.push(RequestClass::bucket(None));
        assert_eq!(landed, RequestClass::BUCKETS);
        for bucket in RequestClass::BUCKETS {
            assert!(bucket.bytes().all(|b| b.is_ascii_lowercase()), "{bucket}");
        }
    }

    #[test]
    fn a_settlement_adds_its_tokens_cost_and_requests_to_its_bucket() {
        let counters = Counters {
            requests: 1,
            usage: TokenUsage {
                input_tokens: 10,
                output_tokens: 20,
                cache_creation_input_tokens: 30,
                cache_read_input_tokens: 40,
                cache_creation_5m: 30,
                cache_creation_1h: 0,
            },
            cost_micro_usd: 500,
            cache_saved_micro_usd: 7,
            estimated_requests: 0,
            error_requests: 0,
        };
        let mut totals = ClassTotals::of(&counters);
        totals.add(&ClassTotals::of(&counters));
        assert_eq!(
            totals,
            ClassTotals {
                requests: 2,
                input_tokens: 20,
                output_tokens: 40,
                cache_creation_input_tokens: 60,
                cache_read_input_tokens: 80,
                cost_micro_usd: 1000,
            }
        );
        assert_eq!(totals.tokens(), 200);
    }
}
