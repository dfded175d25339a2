//! The scheduler: the only component with durable state of its own. It projects the whole log into redb
//! ([`projection`]), and the active replica ([`service`]) decides from that projection ([`control`]): it routes
//! requests to decode workers ([`routing`]: KV-aware, round-robin or random), marks workers whose heartbeats stop as
//! lost, migrates their requests, and fails requests stuck in a phase. [`api`] serves the projection as JSON.

pub mod api;
pub mod control;
pub mod projection;
pub mod routing;
pub mod service;
