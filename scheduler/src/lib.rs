//! The scheduler: log consumer, redb projections, routing, worker liveness, recovery.
//!
//! Not built yet: filed as its own issue ("The scheduler: redb projections, routing, worker liveness, recovery").
//! The crate exists so the workspace has the shape of DESIGN.md §2 from the start.
