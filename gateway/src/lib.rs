//! tandem-gateway: the OpenAI-compatible HTTP API. For each request it validates once into a typed request,
//! renders the chat template, tokenizes, subscribes to the request's tokens, appends `Received` to the log, and
//! answers with the decode worker's text (whole or as SSE). A client that goes away cancels its request on the log.
//!
//! - `config`: what the binary passes in ([`GatewayConfig`]); `server`: the [`Gateway`] (router, serve);
//! - `api_document`: the OpenAPI document (`GET /openapi.json`);
//! - `auth`: API keys (401); `limits`: header size (431) and per-key concurrency (429);
//! - `prompt_log`: what `Received` carries of the prompt, and the prompt store for redacted logs;
//! - `openai`: wire types; `validation`: request checks; `errors`: OpenAI-shaped errors;
//! - [`template`]: the chat template (minijinja, HF semantics); [`tokenizer`]: prompt encoding and EOS ids;
//! - `generation`: a request's life on the log and token bus; `reasoning`: `<think>` splitting;
//! - `logprobs`, `sse`, and `routes/`: the handlers; `observe`: a request's span and metrics; [`prompt_input`]: a
//!   chat body to prompt ids without a server (fuzzing).
//!
//! Invariant: the gateway never detokenizes generated tokens and never decides when generation stops; it passes on
//! the decode worker's text and finish reason, and every accepted request has a `Received` on the log before any
//! token is awaited.

mod api_document;
mod auth;
mod config;
mod errors;
mod generation;
mod limits;
mod logprobs;
mod observe;
mod openai;
pub mod prompt_input;
mod prompt_log;
mod reasoning;
mod routes;
mod server;
mod sse;
pub mod template;
pub mod tokenizer;
mod validation;

pub use auth::{ApiKeys, AuthConfig};
pub use config::{
    DEFAULT_BODY_LIMIT_BYTES, DEFAULT_HEADER_LIMIT_BYTES, DEFAULT_REQUEST_TIMEOUT, GatewayConfig,
    MetricsTextFn, ReadinessFn,
};
pub use errors::GatewayError;
pub use limits::ClientLimits;
pub use prompt_log::PromptLogging;
pub use routes::meta::prometheus_text_response;
pub use server::Gateway;
