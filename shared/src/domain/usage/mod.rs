//! Token usage: the arithmetic (here), reading it from answers as they pass
//! (`sse`: the incremental SSE parser and the JSON extractor), estimating
//! what a cut answer did not report (`estimate`), the most input a request
//! can be billed, for hard limits (`prompt_bound`), what a request's usage
//! record holds (`record`), the Claude Code session it names
//! (`session`), and the agent and request class it names (`attribution`).

mod attribution;
mod estimate;
mod prompt_bound;
mod record;
mod session;
mod sse;

pub use attribution::{
    AGENT_ID_HEADER, AGENT_TYPE_HEADER, AgentId, AgentType, Attribution, ClassTotals,
    MAX_AGENT_TYPE, PARENT_AGENT_ID_HEADER, REQUEST_CLASS_HEADER, RequestClass, UNCLASSIFIED,
};
pub use estimate::{complete_with_estimate, estimate_tokens, request_text};
pub use prompt_bound::{CONTEXT_WINDOW, LONG_CONTEXT_WINDOW, worst_prompt_tokens};
pub use record::{BatchTally, Counters, PricedBatch, UNKNOWN_MODEL, UsageRecord, UsageTotals};
pub use session::{MAX_SESSION_ID, SessionId, session_of_user_id};
pub use sse::{AnswerUsage, SseUsageParser, usage_from_json};

/// Tokens of one request, by type. Quotas count their sum; logs and
/// aggregates keep them apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
    /// The 5-minute / 1-hour split of cache creation, when the API gives it.
    pub cache_creation_5m: u64,
    pub cache_creation_1h: u64,
}

impl std::ops::AddAssign for TokenUsage {
    /// Sums usage of separate requests (a batch's results).
    fn add_assign(&mut self, other: TokenUsage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.cache_creation_5m += other.cache_creation_5m;
        self.cache_creation_1h += other.cache_creation_1h;
    }
}

impl TokenUsage {
    /// Every token the upstream bills: input + cache creation + cache read + output.
    pub fn billed(&self) -> u64 {
        self.input_tokens
            + self.cache_creation_input_tokens
            + self.cache_read_input_tokens
            + self.output_tokens
    }
}
