//! Everything the relay's Lambda functions share: the domain rules, the
//! DynamoDB store, secrets, and the axum routers each function serves.

pub mod admin_auth;
pub mod alerts;
pub mod app;
pub mod bedrock;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod in_flight;

pub mod lambda;
pub mod metrics;
pub mod proxy;
pub mod secrets;
pub mod store;
pub mod telemetry;
pub mod ttl_cache;
pub mod upstream;

pub use error::{ApiError, ErrorKind};
