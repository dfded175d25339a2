//! The worker roles around the engine: the decode worker (continuous batching, local prefill, token streaming)
//! and what it needs beside the engine (incremental detokenization, stop strings). Unlike the engine, roles speak
//! the log: they consume and append `tandem-events` types.

mod batcher;
pub mod decode;
mod detokenizer;
pub mod prefill_rule;
mod stop;

/// Errors of the roles.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("event log: {0}")]
    Log(#[from] tandem_events::log::LogError),
    #[error("invalid worker configuration: {0}")]
    Config(String),
}
