//! The gateway's configuration: what the binary passes in.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::AuthConfig;
use crate::limits::ClientLimits;
use crate::prompt_log::PromptLogging;

/// Largest request body accepted unless configured otherwise: room for a prompt of a few hundred thousand tokens.
pub const DEFAULT_BODY_LIMIT_BYTES: usize = 4 << 20;
/// Largest request line plus headers accepted unless configured otherwise: room for long bearer tokens and
/// tracing headers, far below hyper's 400 KiB read buffer.
pub const DEFAULT_HEADER_LIMIT_BYTES: usize = 32 << 10;
/// Longest a request may run unless configured otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// Answers `GET /ready`: true when the gateway can take requests (the log is reachable, workers are up, ...).
pub type ReadinessFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// Answers `GET /metrics`: the process's metrics in the Prometheus text format, `None` when it records none.
pub type MetricsTextFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// What the gateway serves and how.
#[derive(Clone)]
pub struct GatewayConfig {
    /// The model name clients send (`qwen3`); any other name is a 404.
    pub served_model_name: String,
    /// Folder with `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens), and optionally
    /// `chat_template.jinja` and `generation_config.json` (EOS ids).
    pub tokenizer_dir: PathBuf,
    /// Prompt plus completion may not exceed this.
    pub context_length_tokens: u32,
    /// The model's vocabulary (embedding rows); prompt token ids must be below it and below the tokenizer's.
    pub vocab_size: u32,
    /// This gateway's id: the emitter of its events and `Received.gateway_id`.
    pub gateway_id: String,
    pub body_limit_bytes: usize,
    /// A request still running after this is cancelled (`Cancelled{reason: "deadline"}`) and answered 504.
    pub request_timeout: Duration,
    /// What `GET /metrics` serves (the binary's Prometheus recorder); `None`: 404, nothing recorded here.
    pub metrics_text: Option<MetricsTextFn>,
    /// API keys and the paths open without one.
    pub auth: AuthConfig,
    /// Header size and per-key concurrency.
    pub client_limits: ClientLimits,
    /// What `Received` carries of the prompt (`--log-prompts`).
    pub prompt_logging: PromptLogging,
}

impl GatewayConfig {
    /// A configuration with the default limits and request timeout, no API keys, and a fresh gateway id.
    pub fn new(
        served_model_name: impl Into<String>,
        tokenizer_dir: impl Into<PathBuf>,
        context_length_tokens: u32,
        vocab_size: u32,
    ) -> GatewayConfig {
        GatewayConfig {
            served_model_name: served_model_name.into(),
            tokenizer_dir: tokenizer_dir.into(),
            context_length_tokens,
            vocab_size,
            gateway_id: format!("gateway-{}", ulid::Ulid::new()),
            body_limit_bytes: DEFAULT_BODY_LIMIT_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            metrics_text: None,
            auth: AuthConfig::default(),
            client_limits: ClientLimits {
                max_concurrent_per_key: None,
                max_header_bytes: DEFAULT_HEADER_LIMIT_BYTES,
            },
            prompt_logging: PromptLogging::Full,
        }
    }
}
