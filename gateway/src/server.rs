//! The [`Gateway`]: loads the tokenizer and chat template, builds the axum router, and serves it with graceful
//! shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use tandem_events::log::EventLog;
use tandem_events::tokens::TokenBus;

use crate::api_document;
use crate::auth::{self, AuthConfig};
use crate::config::{GatewayConfig, MetricsTextFn, ReadinessFn};
use crate::errors::GatewayError;
use crate::generation::Backplane;
use crate::limits::{self, ClientLimits, ConcurrencyLimiter};
use crate::prompt_log::PromptStore;
use crate::routes;
use crate::template::ChatTemplate;
use crate::tokenizer::PromptTokenizer;
use crate::validation::ModelLimits;

/// What every handler shares.
pub(crate) struct AppState {
    pub limits: ModelLimits,
    pub template: ChatTemplate,
    pub tokenizer: PromptTokenizer,
    pub backplane: Backplane,
    pub ready: ReadinessFn,
    /// What `GET /metrics` serves.
    pub metrics_text: Option<MetricsTextFn>,
    pub body_limit_bytes: usize,
    /// When this gateway started (the `created` of the model card).
    pub started_unix_s: u64,
    /// `GET /openapi.json`, with the served model's name filled in.
    pub api_document: String,
}

/// The OpenAI-compatible HTTP API of one served model.
pub struct Gateway {
    state: Arc<AppState>,
    auth: Arc<AuthConfig>,
    client_limits: ClientLimits,
    limiter: Arc<ConcurrencyLimiter>,
}

impl Gateway {
    /// Loads the tokenizer and chat template from `config.tokenizer_dir`. Requests are appended to `log` and their
    /// tokens read from `tokens`; `ready` answers `GET /ready`.
    pub fn new(
        config: GatewayConfig,
        log: Arc<dyn EventLog>,
        tokens: Arc<dyn TokenBus>,
        ready: ReadinessFn,
    ) -> Result<Gateway, GatewayError> {
        if config.served_model_name.is_empty() {
            return Err(GatewayError::Config(
                "the served model name is empty".into(),
            ));
        }
        if config.context_length_tokens == 0 || config.vocab_size == 0 {
            return Err(GatewayError::Config(format!(
                "context length ({}) and vocabulary size ({}) must be positive",
                config.context_length_tokens, config.vocab_size
            )));
        }
        if config.request_timeout.is_zero() {
            return Err(GatewayError::Config("the request timeout is zero".into()));
        }
        let tokenizer = PromptTokenizer::load(&config.tokenizer_dir)?;
        let template = ChatTemplate::load(&config.tokenizer_dir)?;
        let limits = ModelLimits {
            served_model_name: config.served_model_name,
            context_length_tokens: config.context_length_tokens,
            // An id must be both an embedding row and decodable.
            vocab_size: config.vocab_size.min(tokenizer.vocab_size()),
            eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        };
        let api_document = api_document::document(&limits)?;
        tracing::info!(
            model = %limits.served_model_name,
            context_length_tokens = limits.context_length_tokens,
            eos_token_ids = ?limits.eos_token_ids,
            api_keys = config.auth.api_keys.len(),
            max_concurrent_per_key = ?config.client_limits.max_concurrent_per_key,
            log_prompts = %config.prompt_logging,
            "gateway ready to serve"
        );
        Ok(Gateway {
            auth: Arc::new(config.auth),
            client_limits: config.client_limits,
            limiter: Arc::new(ConcurrencyLimiter::new(
                config.client_limits.max_concurrent_per_key,
            )),
            state: Arc::new(AppState {
                limits,
                template,
                tokenizer,
                backplane: Backplane {
                    prompt_store: Arc::new(PromptStore::new(Arc::clone(&log))),
                    log,
                    tokens,
                    gateway_id: config.gateway_id,
                    request_timeout: config.request_timeout,
                    prompt_logging: config.prompt_logging,
                },
                ready,
                metrics_text: config.metrics_text,
                body_limit_bytes: config.body_limit_bytes,
                started_unix_s: now_unix_s(),
                api_document,
            }),
        })
    }

    /// The routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`,
    /// `GET /ready`, `GET /metrics`, `GET /openapi.json`; anything else is an OpenAI-shaped 404 or 405. Behind
    /// the header limit, the API keys and the per-key concurrency limit.
    pub fn router(&self) -> Router {
        self.guarded(self.routes())
    }

    /// [`Gateway::router`] merged with `extra_routes` (served on the same port), all behind the same guards.
    pub fn router_with(&self, extra_routes: Router) -> Router {
        self.guarded(self.routes().merge(extra_routes))
    }

    /// Outermost first: header size, then the key, then the key's concurrency; the body limit is the handlers'.
    fn guarded(&self, routes: Router) -> Router {
        routes
            .layer(from_fn_with_state(
                Arc::clone(&self.limiter),
                limits::limit_concurrency,
            ))
            .layer(from_fn_with_state(
                Arc::clone(&self.auth),
                auth::require_api_key,
            ))
            .layer(from_fn_with_state(
                self.client_limits,
                limits::limit_header_size,
            ))
    }

    fn routes(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(routes::chat::chat_completions))
            .route("/v1/completions", post(routes::completions::completions))
            .route("/v1/models", get(routes::meta::models))
            .route("/health", get(routes::meta::health))
            .route("/ready", get(routes::meta::ready))
            .route("/metrics", get(routes::meta::metrics))
            .route("/openapi.json", get(routes::meta::openapi))
            .fallback(routes::meta::route_not_found)
            .method_not_allowed_fallback(routes::meta::method_not_allowed)
            .layer(DefaultBodyLimit::max(self.state.body_limit_bytes))
            .with_state(Arc::clone(&self.state))
    }

    /// Serves on `listener` until `shutdown` completes, then finishes the requests in flight.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayError> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }
}

pub(crate) fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}
