//! The endpoints around generation: `GET /v1/models`, `/health`, `/ready`, `/metrics`, `/openapi.json`, and the
//! OpenAI-shaped 404 and 405 for everything else.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use crate::errors::ApiError;
use crate::openai::{ModelCard, ModelList};
use crate::server::AppState;

/// The one served model.
pub(crate) async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.limits.served_model_name.clone(),
            object: "model",
            created: state.started_unix_s,
            owned_by: "tandem",
            max_model_len: state.limits.context_length_tokens,
        }],
    })
}

/// 200 while the process is up (liveness).
pub(crate) async fn health() -> &'static str {
    "ok\n"
}

/// 200 when the readiness probe passes, else 503 (Kubernetes readiness).
pub(crate) async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if (state.ready)() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        ApiError::unavailable("Not ready: the gateway cannot serve requests yet.").into_response()
    }
}

/// The process's metrics in the Prometheus text format; 404 when this process records none (a gateway embedded
/// without the binary's recorder).
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics_text.as_ref().and_then(|render| render()) {
        Some(text) => prometheus_text_response(text),
        None => ApiError::route_not_found("GET", "/metrics").into_response(),
    }
}

/// A `/metrics` answer: `text` in the Prometheus text exposition format; every role's `/metrics` answers so.
pub fn prometheus_text_response(text: String) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The gateway's own OpenAPI document (see `api_document`).
pub(crate) async fn openapi(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.api_document.clone(),
    )
        .into_response()
}

pub(crate) async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
