//! The Qwen3 model on the host: its configuration, its weights, and the two ways to get them
//! (a Hugging Face folder, or the deterministic built-in model).

pub(crate) mod builtin;
pub(crate) mod config;
pub(crate) mod loader;
pub(crate) mod weights;
