//! The scheduler's query API (JSON over HTTP): what the projection knows about requests, workers and audit
//! findings, plus `/health` and `/ready` for probes. Read-only: it reads committed projection state and never
//! waits on the projector.
//!
//! - `GET /requests/{id}`: state, phases with their times, workers, token counts, the events.
//! - `GET /requests?state=&since=&limit=`: requests in a state (`live` and `terminal` group states) received at or
//!   after `since` (Unix seconds), oldest first.
//! - `GET /workers`: every worker seen on the log, with its load and cached blocks.
//! - `GET /audit`: events the projection could not accept.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::projection::{ProjectionError, ProjectionReader, RequestRecord, WorkerRecord};
use crate::service::SchedulerStatus;

/// Most requests one `/requests` answer lists unless `limit` says otherwise.
const DEFAULT_LIST_LIMIT: usize = 1000;

#[derive(Clone)]
struct ApiState {
    reader: ProjectionReader,
    status: watch::Receiver<SchedulerStatus>,
}

/// The query API's routes, to serve alone (`tandem scheduler`) or merged into another router (`tandem serve`).
pub fn router(reader: ProjectionReader, status: watch::Receiver<SchedulerStatus>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/requests", get(list_requests))
        .route("/requests/{id}", get(one_request))
        .route("/workers", get(workers))
        .route("/audit", get(audit))
        .with_state(ApiState { reader, status })
}

/// The routes without the probes, for a process whose probes answer for more than the scheduler.
pub fn query_router(reader: ProjectionReader, status: watch::Receiver<SchedulerStatus>) -> Router {
    Router::new()
        .route("/requests", get(list_requests))
        .route("/requests/{id}", get(one_request))
        .route("/workers", get(workers))
        .route("/audit", get(audit))
        .with_state(ApiState { reader, status })
}

/// An error in OpenAI's shape.
fn error(status: StatusCode, kind: &str, message: String, param: Option<&str>) -> Response {
    let body =
        json!({"error": {"message": message, "type": kind, "param": param, "code": Value::Null}});
    (status, Json(body)).into_response()
}

fn internal(error: ProjectionError) -> Response {
    tracing::error!(%error, "query API could not read the projection");
    self::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("The scheduler could not read its projection: {error}"),
        None,
    )
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

fn status_json(status: &SchedulerStatus) -> Value {
    json!({
        "caught_up": status.caught_up,
        "active": status.active,
        "last_applied_sequence": status.last_applied_sequence,
        "last_round": {
            "routed": status.last_tick.routed,
            "waiting_for_a_worker": status.last_tick.waiting_for_a_worker,
            "workers_lost": status.last_tick.workers_lost,
            "migrated": status.last_tick.migrated,
            "failed": status.last_tick.failed,
        },
    })
}

/// Ready once the projection has caught up (a standby is ready too: it answers queries and can take over).
async fn ready(State(state): State<ApiState>) -> Response {
    let status = state.status.borrow().clone();
    let code = if status.caught_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(status_json(&status))).into_response()
}

fn ns_to_ms(from: Option<u64>, to: Option<u64>) -> Value {
    match (from, to) {
        (Some(from), Some(to)) if to >= from => json!((to - from) as f64 / 1e6),
        _ => Value::Null,
    }
}

fn request_summary(id: &str, record: &RequestRecord) -> Value {
    json!({
        "id": id,
        "state": record.state,
        "model": record.model,
        "prompt_tokens": record.prompt_tokens,
        "tokens_checkpointed": record.tokens_checkpointed,
        "completion_tokens": record.completion_tokens,
        "decode_worker_id": record.decode_worker_id,
        "prefill_worker_id": record.prefill_worker_id,
        "received_at_ns": record.received_at_ns,
        "terminal_at_ns": record.terminal_at_ns,
        "finish_reason": record.finish_reason,
        "failure_reason": record.failure_reason,
        "routing_attempts": record.routing_attempts,
        "migrations": record.migrations,
    })
}

async fn one_request(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let record = match state.reader.request(&id) {
        Ok(Some(record)) => record,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!("No request {id:?} on the log (as far as the scheduler has read it)."),
                Some("id"),
            );
        }
        Err(error) => return internal(error),
    };
    let events = match state.reader.request_events(&id) {
        Ok(events) => events,
        Err(error) => return internal(error),
    };
    let mut body = request_summary(&id, &record);
    let received = record.received_at_ns;
    let first_token = record
        .decode_started_at_ns
        .or(record.first_checkpoint_at_ns);
    body["phases"] = json!({
        "received_at_ns": record.received_at_ns,
        "routed_at_ns": record.routed_at_ns,
        "prefill_local_at_ns": record.prefill_local_at_ns,
        "prefill_queued_at_ns": record.prefill_queued_at_ns,
        "prefill_started_at_ns": record.prefill_started_at_ns,
        "prefill_done_at_ns": record.prefill_done_at_ns,
        "kv_transferred_at_ns": record.kv_transferred_at_ns,
        "decode_started_at_ns": record.decode_started_at_ns,
        "first_checkpoint_at_ns": record.first_checkpoint_at_ns,
        "last_checkpoint_at_ns": record.last_checkpoint_at_ns,
        "terminal_at_ns": record.terminal_at_ns,
    });
    body["durations_ms"] = json!({
        "routing": ns_to_ms(received, record.routed_at_ns),
        "prefill_queue_wait": ns_to_ms(record.prefill_queued_at_ns, record.prefill_started_at_ns),
        "prefill": ns_to_ms(record.prefill_started_at_ns, record.prefill_done_at_ns),
        "to_decode_start": ns_to_ms(received, first_token),
        "total": ns_to_ms(received, record.terminal_at_ns),
    });
    body["events"] = events
        .iter()
        .map(|(sequence, event)| {
            json!({
                "sequence": sequence,
                "kind": event.kind().as_str(),
                "emitter": event.envelope().emitter,
                "at_ns": event.timestamp_ns(),
            })
        })
        .collect();
    Json(body).into_response()
}

async fn list_requests(
    State(state): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let since_ns = match params.get("since").map(|since| since.parse::<f64>()) {
        None => 0,
        Some(Ok(seconds)) if seconds >= 0.0 => (seconds * 1e9) as u64,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "`since` is a Unix time in seconds, e.g. since=1764100000".into(),
                Some("since"),
            );
        }
    };
    let limit = match params.get("limit").map(|limit| limit.parse::<usize>()) {
        None => DEFAULT_LIST_LIMIT,
        Some(Ok(limit)) => limit,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "`limit` is a whole number".into(),
                Some("limit"),
            );
        }
    };
    let wanted = params.get("state").map(|state| state.to_ascii_lowercase());
    let requests = match state.reader.requests(None, since_ns) {
        Ok(requests) => requests,
        Err(error) => return internal(error),
    };
    let terminal = ["completed", "failed", "cancelled"];
    let matching: Vec<Value> = requests
        .iter()
        .filter(|(_, record)| {
            let state = record.state.to_ascii_lowercase();
            match wanted.as_deref() {
                None => true,
                Some("live") => !terminal.contains(&state.as_str()),
                Some("terminal") => terminal.contains(&state.as_str()),
                Some(wanted) => state == wanted,
            }
        })
        .take(limit)
        .map(|(id, record)| request_summary(id, record))
        .collect();
    Json(json!({"count": matching.len(), "requests": matching})).into_response()
}

fn worker_json(
    id: &str,
    record: &WorkerRecord,
    active_requests: u32,
    active_kv_blocks: u64,
    cached_blocks: u64,
) -> Value {
    let status = if record.lost_at_ns.is_some() {
        "lost"
    } else if record.left_at_ns.is_some() {
        "left"
    } else if record.joined_at_ns.is_some() {
        "joined"
    } else {
        "unknown"
    };
    json!({
        "id": id,
        "role": record.role,
        "status": status,
        "device": record.device,
        "model": record.model,
        "joined_at_ns": record.joined_at_ns,
        "left_at_ns": record.left_at_ns,
        "lost_at_ns": record.lost_at_ns,
        "departure_reason": record.departure_reason,
        "total_blocks": record.total_blocks,
        "block_size_tokens": record.block_size_tokens,
        "max_batch_sequences": record.max_batch_sequences,
        "active_requests": active_requests,
        "active_kv_blocks": active_kv_blocks,
        "cached_blocks": cached_blocks,
    })
}

async fn workers(State(state): State<ApiState>) -> Response {
    let read = || -> Result<Value, ProjectionError> {
        let workers = state.reader.workers()?;
        let mut load: HashMap<String, (u32, u64)> = HashMap::new();
        for active in state.reader.active_requests()? {
            let entry = load.entry(active.decode_worker_id).or_default();
            entry.0 += 1;
            entry.1 += u64::from(active.kv_blocks);
        }
        let cached = state.reader.cached_block_counts()?;
        let listed: Vec<Value> = workers
            .iter()
            .map(|(id, record)| {
                let (requests, blocks) = load.get(id).copied().unwrap_or_default();
                worker_json(
                    id,
                    record,
                    requests,
                    blocks,
                    cached.get(id).copied().unwrap_or(0),
                )
            })
            .collect();
        Ok(json!({"count": listed.len(), "workers": listed}))
    };
    match read() {
        Ok(body) => Json(body).into_response(),
        Err(error) => internal(error),
    }
}

async fn audit(State(state): State<ApiState>) -> Response {
    let findings = match state.reader.findings() {
        Ok(findings) => findings,
        Err(error) => return internal(error),
    };
    let listed: Vec<Value> = findings
        .iter()
        .map(|finding| {
            json!({
                "sequence": finding.sequence,
                "request_id": finding.request_id,
                "event_kind": finding.event_kind,
                "subject": finding.subject,
                "violation": finding.violation,
                "event_bytes": finding.event_bytes.len(),
            })
        })
        .collect();
    Json(json!({"count": listed.len(), "findings": listed})).into_response()
}
