//! The scheduler: consumes the log and routes requests to decode workers.
//!
//! Built so far: the minimal routing loop ([`router`]), round-robin over live decode workers. The full scheduler
//! (redb projections, KV-aware routing, liveness and recovery) is filed as its own issue and replaces it.

pub mod router;
pub mod selection;
