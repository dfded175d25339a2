//! tandem-events: the contract every part of tandem speaks.
//!
//! - [`blocks`]: the chained hashes that name full KV blocks (workers' KV events, the scheduler's prefix index);
//! - [`schema`]: the protobuf event schema (envelope and bodies) and [`event`]: kinds and checked encoding;
//! - [`subjects`]: subject names and wildcard matching;
//! - [`lifecycle`]: which event may follow which in a request's life;
//! - [`log`]: the [`log::EventLog`] trait with its JetStream and embedded backends;
//! - [`prompts`]: the short-lived store of prompts kept off a redacted log;
//! - [`tokens`]: token updates from decode workers to gateways (NATS core or in-process);
//! - [`nats_server`]: starting a real nats-server for tests and local runs;
//! - [`trace`]: the W3C trace context that rides in every event; [`metric_names`]: the Prometheus metrics.
//!
//! Invariant: every event on the log decodes with this crate forever (schema versions only grow), and a
//! malformed one is an error, never a panic.

pub mod blocks;
pub mod event;
pub mod lifecycle;
pub mod log;
pub mod metric_names;
pub mod nats_server;
pub mod prompts;
pub mod schema;
pub mod subjects;
pub mod tokens;
pub mod trace;

pub use event::{DecodeError, Event, EventKind, SCHEMA_VERSION};
pub use schema::Body;
