//! Errors: [`GatewayError`] for building and running the gateway, and [`ApiError`], an error answered to an HTTP
//! client in OpenAI's shape (`{"error":{"message","type","param","code"}}`) with its status.

use std::path::PathBuf;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why the gateway could not be built or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot load the tokenizer from {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("cannot read {path}: {reason}")]
    TokenizerConfig { path: PathBuf, reason: String },
    #[error(
        "the chat template in {path} does not compile: {reason} (is `chat_template` a Jinja template?)"
    )]
    ChatTemplate { path: PathBuf, reason: String },
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    #[error("the HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// An error answered to the client: OpenAI's error body with an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`, ...
    pub error_type: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is invalid; `param` names the field at fault.
    pub fn invalid(param: Option<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            error_type: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// 400 for a named parameter.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid(Some(param.to_string()), message)
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(requested: &str, served: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{requested}` does not exist. This server serves `{served}` (see GET /v1/models)."
            ),
            error_type: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    pub fn route_not_found(method: &str, path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "No route for {method} {path}. Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /ready, GET /metrics, GET /openapi.json."
            ),
            error_type: "not_found_error",
            param: None,
            code: Some("route_not_found"),
        }
    }

    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("Method {method} is not allowed on {path}."),
            error_type: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    pub fn body_too_large(limit_bytes: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "The request body is larger than this server's limit of {limit_bytes} bytes."
            ),
            error_type: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    /// 503: the log or the token bus is unavailable; retrying later may work.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            error_type: "server_error",
            param: None,
            code: Some("service_unavailable"),
        }
    }

    /// 504: the request ran past the gateway's per-request deadline.
    pub fn deadline(timeout_s: u64) -> ApiError {
        ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!(
                "The request did not finish within this server's limit of {timeout_s} s and was cancelled."
            ),
            error_type: "timeout_error",
            param: None,
            code: Some("request_timeout"),
        }
    }

    /// 500: generation failed in a worker; the message is the worker's reason.
    pub fn generation_failed(reason: &str) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("Generation failed: {reason}"),
            error_type: "server_error",
            param: None,
            code: Some("generation_failed"),
        }
    }

    /// The JSON body (also sent as an SSE event when a stream fails after its headers went out).
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                error_type: self.error_type,
                param: self.param.clone(),
                code: self.code,
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

/// `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub error_type: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), message = %self.message, "request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), message = %self.message, "request refused");
        }
        (self.status, Json(self.body())).into_response()
    }
}
