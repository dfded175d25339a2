//! tandem-replay: reading a request log after the fact (DESIGN.md §2, §7).
//!
//! - [`source`]: where events come from (a JetStream stream, an embedded-log data dir, or an export file) and the
//!   streaming scan over them, with time windows and progress; a log is never loaded whole;
//! - [`export`]: the self-describing, compressed export file, which round-trips every message exactly;
//! - [`phases`]: one request's phases (routing, queue wait, prefill, KV transfer, decode) folded from its events;
//! - [`timeline`]: one request's events in order with the durations between phases, as a table, JSON or SVG;
//! - [`audit`]: the projection rebuilt in memory from the log, every request checked against the lifecycle and
//!   the log's invariants, and compared with the scheduler's redb projection;
//! - [`stats`]: latency percentiles per phase, remote vs local prefill, queue depth over time, per-worker load,
//!   failures by reason;
//! - [`rerun`]: what a logged request asked for and produced, and the comparison with a re-execution (the engine
//!   side lives in the `tandem` binary, see ARCHITECTURE.md);
//! - [`synthetic`]: plausible request flows, for the benchmark ([`bench`]) and tests.
//!
//! Invariant: a malformed event is a finding to report, never a panic, and every command reads the log as a stream.

pub mod audit;
pub mod bench;
pub mod export;
pub mod filter;
pub mod phases;
pub mod rerun;
pub mod source;
pub mod stats;
pub mod synthetic;
pub mod text;
pub mod timeline;

/// Errors of reading and writing logs and files. Bad events are not errors: they become findings.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    // The log's error is in the message, not also a `source`: `{:#}` would print it twice.
    #[error("event log: {0}")]
    Log(tandem_events::log::LogError),
    #[error("projection: {0}")]
    Projection(#[from] tandem_scheduler::projection::ProjectionError),
    #[error("{path}: {operation} failed: {error}")]
    Io {
        path: String,
        operation: &'static str,
        error: std::io::Error,
    },
    #[error("{path} is not a tandem export file: {reason}")]
    NotAnExport { path: String, reason: String },
    #[error("{path}: the export is damaged: {reason}")]
    CorruptExport { path: String, reason: String },
    #[error("request {request_id} is not on the log{hint}")]
    RequestNotFound { request_id: String, hint: String },
    #[error("request {request_id} cannot be re-executed: {reason}")]
    NotRerunnable { request_id: String, reason: String },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

impl From<tandem_events::log::LogError> for ReplayError {
    fn from(error: tandem_events::log::LogError) -> ReplayError {
        ReplayError::Log(error)
    }
}

impl ReplayError {
    pub(crate) fn io(
        path: &std::path::Path,
        operation: &'static str,
    ) -> impl FnOnce(std::io::Error) -> ReplayError {
        let path = path.display().to_string();
        move |error| ReplayError::Io {
            path,
            operation,
            error,
        }
    }
}
