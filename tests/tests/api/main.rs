//! Integration tests: the relay's real router against DynamoDB Local and a
//! fake Anthropic upstream. Run with `make test` (it starts the emulators).

mod admin;
mod proxy;
