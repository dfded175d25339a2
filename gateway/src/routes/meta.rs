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

/// The Prometheus exporter is a separate issue; until it lands this says so rather than serving made-up numbers.
pub(crate) async fn metrics() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "# tandem metrics are not built yet: the Prometheus exporter is its own issue.\n# No numbers are served until it lands.\n",
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
