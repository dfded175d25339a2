//! The replay CLI: timelines, audit, stats, export and re-execution over a log.
//!
//! Not built yet: filed as its own issue ("The replay CLI").
//! The crate exists so the workspace has the shape of DESIGN.md §2 from the start.
