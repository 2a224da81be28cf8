//! Test support for the relay: a fake Anthropic upstream that speaks the
//! real wire format, an SSE decoder, and `spawn_app()` for integration tests.

pub mod fake_bedrock;
pub mod fake_upstream;
pub mod sse;

pub mod app;
pub mod dynamo;
