//! The minimal routing loop: a durable consumer of `Received` events that appends a `Routed` for each, choosing
//! a live decode worker (heartbeat present in the workers bucket) round-robin. A request with no live decode
//! worker waits (its delivery is nak'd with a delay) rather than being dropped.
//!
//! The `Routed` is appended before the `Received` is acknowledged: a crash between the two redelivers the
//! `Received`, and the retried append has the same dedup id, so the request is routed once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_events::log::{ConsumerConfig, EventLog, KvBucket, LogError};
use tandem_events::schema::{Body, Routed};
use tandem_events::{Event, EventKind, subjects};
use tokio::sync::watch;

use crate::selection::round_robin;

/// The durable consumer the routing loop uses; shared by every scheduler process, so one routes each request.
pub const ROUTER_CONSUMER: &str = "scheduler-router";
/// How often the list of live decode workers is read again.
const LIVE_WORKERS_REFRESH: Duration = Duration::from_millis(250);

/// Errors that stop the routing loop from starting.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("event log: {0}")]
    Log(#[from] LogError),
}

/// Where the routing loop finds live workers.
pub struct RouterConfig {
    pub scheduler_id: String,
    /// Bucket of worker heartbeats (key: worker id, value: role).
    pub workers_bucket: String,
    pub workers_ttl: Duration,
}

struct LiveWorkers {
    decode_worker_ids: Vec<String>,
    read_at: Option<Instant>,
}

impl LiveWorkers {
    async fn refresh(&mut self, bucket: &dyn KvBucket) -> Result<&[String], LogError> {
        if self
            .read_at
            .is_none_or(|read_at| read_at.elapsed() >= LIVE_WORKERS_REFRESH)
        {
            let mut decode_worker_ids = Vec::new();
            for worker_id in bucket.keys().await? {
                if bucket.get(&worker_id).await?.as_deref() == Some(b"decode") {
                    decode_worker_ids.push(worker_id);
                }
            }
            self.decode_worker_ids = decode_worker_ids;
            self.read_at = Some(Instant::now());
        }
        Ok(&self.decode_worker_ids)
    }
}

/// Routes requests until `stop` turns true.
pub async fn run_router(
    log: Arc<dyn EventLog>,
    config: RouterConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), RouterError> {
    let received = log
        .consumer(ConsumerConfig::new(
            ROUTER_CONSUMER,
            vec![subjects::kind_filter(EventKind::Received)],
        ))
        .await?;
    let bucket = log
        .kv_bucket(&config.workers_bucket, config.workers_ttl)
        .await?;
    let mut live = LiveWorkers {
        decode_worker_ids: Vec::new(),
        read_at: None,
    };
    let mut previous_choice: Option<String> = None;
    tracing::info!(scheduler_id = %config.scheduler_id, "routing loop started");
    while !*stop.borrow() {
        let deliveries = tokio::select! {
            fetched = received.fetch(64, Duration::from_millis(500)) => fetched,
            _ = stop.changed() => break,
        };
        let deliveries = match deliveries {
            Ok(deliveries) => deliveries,
            Err(error) => {
                tracing::warn!(%error, "fetching requests failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for delivery in deliveries {
            let event = match delivery.message.event() {
                Ok(event) => event,
                Err(error) => {
                    // Reported, never routed; terminated so it is not delivered again and again.
                    tracing::error!(%error, sequence = delivery.message.sequence, "malformed event on the log");
                    let _ = delivery.term().await;
                    continue;
                }
            };
            let live_workers = match live.refresh(bucket.as_ref()).await {
                Ok(workers) => workers.to_vec(),
                Err(error) => {
                    tracing::warn!(%error, "reading live workers failed");
                    Vec::new()
                }
            };
            let Some(choice) = round_robin(&live_workers, previous_choice.as_deref()) else {
                tracing::warn!(request_id = %event.id(), "no live decode worker; request waits");
                let _ = delivery.nak(Some(Duration::from_millis(500))).await;
                continue;
            };
            let routed = Event::new(
                event.id(),
                config.scheduler_id.clone(),
                Body::Routed(Routed {
                    decode_worker_id: choice.worker_id.clone(),
                    policy: "round_robin".into(),
                    reason: choice.reason,
                    scores: Vec::new(),
                    attempt: 1,
                    received_sequence: delivery.message.sequence,
                }),
            )
            .with_trace_from(&event);
            match log.append_event(&routed, 1).await {
                Ok(_) => {
                    previous_choice = Some(choice.worker_id);
                    if let Err(error) = delivery.ack().await {
                        tracing::warn!(%error, "could not ack a routed request");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, request_id = %event.id(), "appending Routed failed; will retry");
                    let _ = delivery.nak(Some(Duration::from_millis(200))).await;
                }
            }
        }
    }
    Ok(())
}
