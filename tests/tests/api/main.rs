//! Integration tests: the relay's real router against DynamoDB Local and a
//! fake Anthropic upstream. Run with `make test` (it starts the emulators).

// Test helpers outside #[test] functions unwrap too: a failed setup is a
// failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod alerts;
mod attribution;
mod bedrock;
mod budgets;
mod composition;
mod daily_models;
mod failover;
mod faults;
mod hard;
mod isolation;
mod lambda_events;
mod models;
mod prices;
mod proxy;
mod reconcile;
mod setup;
mod stream_cap;
mod template;
mod tpm;
mod upstreams;
mod usage;
