//! The flags of the gateway's HTTP API that decide who may call it and how much they may send or hold: API keys,
//! `/metrics` behind a key, per-key concurrency, body and header size, the request deadline, and how much of a
//! prompt the log keeps (shared by `tandem serve` and `tandem gateway`).

use std::time::Duration;

use anyhow::{Result, bail};
use tandem_gateway::{
    ApiKeys, AuthConfig, ClientLimits, DEFAULT_BODY_LIMIT_BYTES, DEFAULT_HEADER_LIMIT_BYTES,
    DEFAULT_REQUEST_TIMEOUT, GatewayConfig, PromptLogging,
};

/// Who may call the HTTP API and how much of it one client may hold.
#[derive(clap::Args, Clone)]
pub struct ApiAccessArgs {
    /// An API key clients must send as `Authorization: Bearer <key>`; repeat for several. None: the API is open.
    /// `/health`, `/ready` and `/openapi.json` never need a key. Held in memory only as SHA-256 digests.
    #[arg(
        long = "api-key",
        value_name = "KEY",
        env = "TANDEM_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// `/metrics` needs an API key too (by default it stays open for the Prometheus scraper).
    #[arg(long, env = "TANDEM_METRICS_REQUIRE_KEY")]
    metrics_require_key: bool,
    /// Generation requests one API key may have in flight (without keys: all clients together); more are
    /// answered 429 with `Retry-After`. Unset: no limit.
    #[arg(long, env = "TANDEM_MAX_CONCURRENT_PER_KEY")]
    max_concurrent_per_key: Option<u32>,
    /// Largest request body accepted (413 beyond).
    #[arg(long, env = "TANDEM_MAX_BODY_BYTES", default_value_t = DEFAULT_BODY_LIMIT_BYTES)]
    max_body_bytes: usize,
    /// Largest request line plus headers accepted (431 beyond).
    #[arg(long, env = "TANDEM_MAX_HEADER_BYTES", default_value_t = DEFAULT_HEADER_LIMIT_BYTES)]
    max_header_bytes: usize,
    /// A request still running after this many seconds is cancelled and answered 504.
    #[arg(long, env = "TANDEM_REQUEST_TIMEOUT_S", default_value_t = DEFAULT_REQUEST_TIMEOUT.as_secs())]
    request_timeout_s: u64,
    /// Prompt plus completion may not exceed this many tokens (default: the model's context window); also what a
    /// request without `max_tokens` generates up to.
    #[arg(long, env = "TANDEM_MAX_MODEL_LEN")]
    max_model_len: Option<u32>,
    /// What `Received` on the log carries of the prompt: `full` (token ids, needed by `replay rerun`), `hash`
    /// (SHA-256 and length) or `none` (length). With hash or none the ids live in the `tandem-prompts` bucket only
    /// while the request runs, and such requests are prefilled by their decode worker (never queued on the log).
    #[arg(long, env = "TANDEM_LOG_PROMPTS", default_value_t = PromptLogging::Full)]
    log_prompts: PromptLogging,
}

impl ApiAccessArgs {
    /// Sets the gateway's keys and limits; the keys are hashed here and never stored in the clear.
    pub fn apply(&self, config: &mut GatewayConfig) -> Result<()> {
        if self.max_concurrent_per_key == Some(0) {
            bail!(
                "--max-concurrent-per-key 0 would refuse every request; leave it unset for no limit"
            );
        }
        if self.max_body_bytes == 0 || self.max_header_bytes == 0 || self.request_timeout_s == 0 {
            bail!("--max-body-bytes, --max-header-bytes and --request-timeout-s must be positive");
        }
        let api_keys = ApiKeys::from_plaintext(&self.api_keys);
        if api_keys.is_empty() && self.metrics_require_key {
            tracing::warn!(
                "--metrics-require-key has no effect without --api-key: the whole API is open"
            );
        }
        config.auth = AuthConfig {
            api_keys,
            metrics_require_key: self.metrics_require_key,
        };
        config.client_limits = ClientLimits {
            max_concurrent_per_key: self.max_concurrent_per_key,
            max_header_bytes: self.max_header_bytes,
        };
        config.body_limit_bytes = self.max_body_bytes;
        config.request_timeout = Duration::from_secs(self.request_timeout_s);
        config.prompt_logging = self.log_prompts;
        match self.max_model_len {
            Some(0) => bail!("--max-model-len must be positive"),
            Some(max_model_len) if max_model_len > config.context_length_tokens => bail!(
                "--max-model-len {max_model_len} is longer than the model's context window of {} tokens",
                config.context_length_tokens
            ),
            Some(max_model_len) => config.context_length_tokens = max_model_len,
            None => {}
        }
        Ok(())
    }
}
