//! The scheduler: consumes the log and routes requests to decode workers.
//!
//! Built so far: the minimal routing loop ([`router`]), round-robin over live decode workers, and the redb
//! projections of the log ([`projection`]: requests, their events, workers, audit findings), not yet wired in.
//! The rest of the full scheduler (KV-aware routing, liveness and recovery) is filed as its own issue.

pub mod projection;
pub mod router;
pub mod selection;
