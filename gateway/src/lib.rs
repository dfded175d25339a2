//! tandem-gateway: the OpenAI-compatible HTTP API. For each request it validates once into a typed request,
//! renders the chat template, tokenizes, subscribes to the request's tokens, appends `Received` to the log, and
//! answers with the decode worker's text (whole or as SSE). A client that goes away cancels its request on the log.
//!
//! - `config`: what the binary passes in ([`GatewayConfig`]); `server`: the [`Gateway`] (router, serve);
//! - `openai`: wire types; `validation`: request checks; `errors`: OpenAI-shaped errors;
//! - [`template`]: the chat template (minijinja, HF semantics); [`tokenizer`]: prompt encoding and EOS ids;
//! - `generation`: a request's life on the log and token bus; `reasoning`: `<think>` splitting;
//! - `logprobs`, `sse`, and `routes/`: the handlers; [`prompt_input`]: a chat body to prompt ids without a server
//!   (fuzzing).
//!
//! Invariant: the gateway never detokenizes generated tokens and never decides when generation stops; it passes on
//! the decode worker's text and finish reason, and every accepted request has a `Received` on the log before any
//! token is awaited.

mod config;
mod errors;
mod generation;
mod logprobs;
mod openai;
pub mod prompt_input;
mod reasoning;
mod routes;
mod server;
mod sse;
pub mod template;
pub mod tokenizer;
mod validation;

pub use config::{DEFAULT_BODY_LIMIT_BYTES, DEFAULT_REQUEST_TIMEOUT, GatewayConfig, ReadinessFn};
pub use errors::GatewayError;
pub use server::Gateway;
