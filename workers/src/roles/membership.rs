//! A worker's membership of the fleet: `WorkerJoined` on start, a heartbeat in the workers bucket while it runs,
//! `WorkerLeft` on a clean shutdown. The scheduler and the decode workers read the bucket to see who is alive.

use bytes::Bytes;
use tandem_events::Event;
use tandem_events::log::{EventLog, KvBucket};
use tandem_events::schema::{Body, WorkerJoined, WorkerLeft};
use tandem_events::subjects::{WORKER_HEARTBEAT_TTL, WORKERS_BUCKET};

use crate::engine::Engine;
use crate::roles::RoleError;

/// What a worker says about itself when it joins.
pub(crate) struct Joining<'a> {
    pub worker_id: &'a str,
    /// `decode` or `prefill`: also the heartbeat's value.
    pub role: &'static str,
    pub device: &'a str,
    pub model_name: &'a str,
    pub max_batch_sequences: usize,
}

/// Appends `WorkerJoined` (with the engine's KV capacity) and puts the first heartbeat; returns the bucket for
/// the next ones.
pub(crate) async fn join(
    log: &dyn EventLog,
    joining: Joining<'_>,
    engine: &Engine,
) -> Result<Box<dyn KvBucket>, RoleError> {
    let heartbeats = log.kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL).await?;
    let joined = Event::new(
        joining.worker_id,
        joining.worker_id,
        Body::WorkerJoined(WorkerJoined {
            role: joining.role.into(),
            transfer_endpoint: String::new(),
            device: joining.device.into(),
            model: joining.model_name.into(),
            total_blocks: engine.config().num_blocks as u32,
            block_size_tokens: engine.kv_layout().block_size_tokens as u32,
            max_batch_sequences: joining.max_batch_sequences as u32,
        }),
    );
    log.append_event(&joined, 1).await?;
    beat(heartbeats.as_ref(), joining.worker_id, joining.role).await;
    Ok(heartbeats)
}

/// One heartbeat; a failed one is logged, the next one may succeed.
pub(crate) async fn beat(heartbeats: &dyn KvBucket, worker_id: &str, role: &'static str) {
    if let Err(error) = heartbeats
        .put(worker_id, Bytes::from_static(role.as_bytes()))
        .await
    {
        tracing::warn!(%error, worker_id, "heartbeat failed");
    }
}

/// Appends `WorkerLeft` and removes the heartbeat.
pub(crate) async fn leave(log: &dyn EventLog, heartbeats: Option<&dyn KvBucket>, worker_id: &str) {
    // `WorkerLeft` first: a scheduler that sees the heartbeat gone before the event would call the worker lost.
    let left = Event::new(
        worker_id,
        worker_id,
        Body::WorkerLeft(WorkerLeft {
            reason: "shutdown".into(),
        }),
    );
    if let Err(error) = log.append_event(&left, 1).await {
        tracing::warn!(%error, worker_id, "could not append WorkerLeft");
    }
    if let Some(heartbeats) = heartbeats
        && let Err(error) = heartbeats.delete(worker_id).await
    {
        tracing::warn!(%error, worker_id, "could not remove the heartbeat");
    }
    tracing::info!(worker_id, "worker left");
}
