//! The active scheduler's decisions, made from the projection after each applied batch: route waiting requests,
//! mark workers whose heartbeats stopped as lost, move the live requests of departed decode workers elsewhere
//! (`Migrated`, then a new `Routed`), and fail requests stuck in a phase too long.
//!
//! Every decision is an append with a dedup id fixed by what it decides (`<request>:routed:<attempt>`,
//! `<request>:migrated:<attempt>`, `<request>:failed:1`, `<worker>:worker_lost:1`), so taking one twice (a restart
//! that re-reads an older projection, a standby taking over, a retry after a failed append) lands once. Decisions
//! take effect when their events come back through the projection; until then they are remembered here so the
//! next tick does not take them again, and their load counts toward the worker they went to.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_events::blocks::block_hashes;
use tandem_events::log::{EventLog, KvBucket};
use tandem_events::schema::{Body, Failed, Migrated, Routed, WorkerLost};
use tandem_events::tokens::{TokenBus, TokenUpdate};
use tandem_events::{Event, EventKind};

use crate::projection::{ActiveRequest, ProjectionError, ProjectionReader, RequestRecord};
use crate::routing::{Candidate, RoutingPolicy, choose};

/// How long a request may stay in a phase before the scheduler fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseTimeouts {
    /// Received (or migrated) and routed, but no decode worker has started on it.
    pub queue: Duration,
    /// On the prefill queue or being prefilled remotely.
    pub prefill: Duration,
    /// Prefilling locally or decoding with no new event (checkpoint) for this long.
    pub progress: Duration,
}

impl Default for PhaseTimeouts {
    fn default() -> PhaseTimeouts {
        PhaseTimeouts {
            queue: Duration::from_secs(300),
            prefill: Duration::from_secs(300),
            progress: Duration::from_secs(120),
        }
    }
}

/// What the decisions need to know.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub scheduler_id: String,
    pub policy: RoutingPolicy,
    pub timeouts: PhaseTimeouts,
    /// A worker whose heartbeat is gone is lost only once it joined at least this long ago (its first heartbeat
    /// may not be visible yet right after it joined).
    pub join_grace: Duration,
}

/// Decisions taken and not yet seen back on the projection are forgotten after this (their dedup ids guard the
/// rare case of taking one again).
const DECISION_MEMORY: Duration = Duration::from_secs(10);
/// A worker whose heartbeat is gone is lost once it has stayed gone this long without a `WorkerLeft`.
const HEARTBEAT_MISSING_GRACE: Duration = Duration::from_secs(1);

/// The active scheduler's decision state.
pub struct Control {
    log: Arc<dyn EventLog>,
    tokens: Arc<dyn TokenBus>,
    heartbeats: Box<dyn KvBucket>,
    config: ControlConfig,
    /// (kind, id, attempt) of decisions appended and when.
    taken: HashMap<(EventKind, String, u32), Instant>,
    /// Routings taken and not yet on the projection: request → (worker, KV blocks).
    routed_in_flight: HashMap<String, (String, u32)>,
    previous_round_robin: Option<String>,
    /// Workers whose heartbeat this scheduler found missing, and since when.
    heartbeat_missing_since: HashMap<String, Instant>,
}

/// What one tick decided, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TickSummary {
    pub routed: usize,
    pub waiting_for_a_worker: usize,
    pub workers_lost: usize,
    pub migrated: usize,
    pub failed: usize,
}

/// Errors of a decision round; the round is retried on the next tick.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("reading the projection: {0}")]
    Projection(#[from] ProjectionError),
    #[error("event log: {0}")]
    Log(#[from] tandem_events::log::LogError),
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn age(now_ns: u64, since_ns: Option<u64>) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(since_ns.unwrap_or(now_ns)))
}

impl Control {
    pub fn new(
        log: Arc<dyn EventLog>,
        tokens: Arc<dyn TokenBus>,
        heartbeats: Box<dyn KvBucket>,
        config: ControlConfig,
    ) -> Control {
        Control {
            log,
            tokens,
            heartbeats,
            config,
            taken: HashMap::new(),
            routed_in_flight: HashMap::new(),
            previous_round_robin: None,
            heartbeat_missing_since: HashMap::new(),
        }
    }

    fn already_taken(&self, kind: EventKind, id: &str, attempt: u32) -> bool {
        self.taken.contains_key(&(kind, id.to_string(), attempt))
    }

    /// Appends a decision; remembered only once it is on the log.
    async fn take(&mut self, event: Event, occurrence: u32) -> Result<(), ControlError> {
        let key = (event.kind(), event.id().to_string(), occurrence);
        self.log.append_event(&event, occurrence).await?;
        self.taken.insert(key, Instant::now());
        Ok(())
    }

    /// One round of decisions against the projection as `reader` sees it now.
    pub async fn tick(&mut self, reader: &ProjectionReader) -> Result<TickSummary, ControlError> {
        self.taken
            .retain(|_, taken_at| taken_at.elapsed() < DECISION_MEMORY);
        let mut summary = TickSummary::default();
        let now = now_ns();

        let mut live_heartbeats: HashSet<String> = HashSet::new();
        for worker_id in self.heartbeats.keys().await? {
            live_heartbeats.insert(worker_id);
        }
        let workers = reader.workers()?;
        let mut departed: HashMap<String, String> = HashMap::new();
        for (worker_id, record) in &workers {
            if record.role.is_empty() {
                continue;
            }
            if record.left_at_ns.is_some() || record.lost_at_ns.is_some() {
                let reason = if record.lost_at_ns.is_some() {
                    "decode worker lost"
                } else {
                    "decode worker left"
                };
                departed.insert(worker_id.clone(), reason.to_string());
                continue;
            }
            if live_heartbeats.contains(worker_id) {
                self.heartbeat_missing_since.remove(worker_id);
                continue;
            }
            if age(now, record.joined_at_ns) < self.config.join_grace
                || self.already_taken(EventKind::WorkerLost, worker_id, 1)
            {
                continue;
            }
            // A worker leaving cleanly removes its heartbeat and appends `WorkerLeft`: give that event time to
            // reach the projection before calling the worker lost.
            let missing_since = *self
                .heartbeat_missing_since
                .entry(worker_id.clone())
                .or_insert_with(Instant::now);
            if missing_since.elapsed() < HEARTBEAT_MISSING_GRACE {
                continue;
            }
            tracing::warn!(%worker_id, role = %record.role, "heartbeats stopped: worker lost");
            let lost = Event::new(
                worker_id.as_str(),
                self.config.scheduler_id.as_str(),
                Body::WorkerLost(WorkerLost {
                    last_heartbeat_ns: record.last_heartbeat_at_ns.unwrap_or(0),
                    reason: "heartbeat expired".into(),
                }),
            );
            self.take(lost, 1).await?;
            summary.workers_lost += 1;
        }

        let active = reader.active_requests()?;
        // Routings now visible on the projection need no more accounting here.
        let visible: HashSet<&str> = active.iter().map(|a| a.request_id.as_str()).collect();
        self.routed_in_flight
            .retain(|request_id, _| !visible.contains(request_id.as_str()));

        for request in active
            .iter()
            .filter(|request| departed.contains_key(&request.decode_worker_id))
        {
            let Some(record) = reader.request(&request.request_id)? else {
                continue;
            };
            let attempt = record.routing_attempts.max(1);
            if self.already_taken(EventKind::Migrated, &request.request_id, attempt) {
                continue;
            }
            let reason = departed
                .get(&request.decode_worker_id)
                .cloned()
                .unwrap_or_default();
            tracing::info!(request_id = %request.request_id, from = %request.decode_worker_id,
                tokens_generated = record.tokens_checkpointed, %reason, "migrating request");
            let migrated = Event::new(
                request.request_id.as_str(),
                self.config.scheduler_id.as_str(),
                Body::Migrated(Migrated {
                    from_worker_id: request.decode_worker_id.clone(),
                    reason,
                    tokens_generated: record.tokens_checkpointed,
                }),
            )
            .with_trace_from(&self.received_or(
                reader,
                &request.request_id,
                &record,
            )?);
            self.take(migrated, attempt).await?;
            summary.migrated += 1;
        }

        self.route_waiting(
            reader,
            &workers,
            &departed,
            &live_heartbeats,
            &active,
            &mut summary,
        )
        .await?;
        self.fail_stuck(reader, &departed, &active, now, &mut summary)
            .await?;
        Ok(summary)
    }

    /// The request's `Received` (for its trace context and prompt); an empty event when it is not there.
    fn received_or(
        &self,
        reader: &ProjectionReader,
        request_id: &str,
        record: &RequestRecord,
    ) -> Result<Event, ControlError> {
        Ok(reader
            .request_event(request_id, record.received_sequence)?
            .unwrap_or_else(|| {
                Event::new(
                    request_id,
                    self.config.scheduler_id.as_str(),
                    Body::Received(Default::default()),
                )
            }))
    }

    async fn route_waiting(
        &mut self,
        reader: &ProjectionReader,
        workers: &[(String, crate::projection::WorkerRecord)],
        departed: &HashMap<String, String>,
        live_heartbeats: &HashSet<String>,
        active: &[ActiveRequest],
        summary: &mut TickSummary,
    ) -> Result<(), ControlError> {
        let unrouted = reader.unrouted()?;
        if unrouted.is_empty() {
            return Ok(());
        }
        let mut candidates: Vec<(Candidate, u32)> = workers
            .iter()
            .filter(|(worker_id, record)| {
                record.role == "decode"
                    && !departed.contains_key(worker_id)
                    && live_heartbeats.contains(worker_id)
            })
            .map(|(worker_id, record)| {
                (
                    Candidate {
                        worker_id: worker_id.clone(),
                        cached_prefix_blocks: 0,
                        active_decode_blocks: 0,
                        active_sequences: 0,
                        total_blocks: record.total_blocks,
                    },
                    record.block_size_tokens.max(1),
                )
            })
            .collect();
        let load = active
            .iter()
            .map(|a| (&a.decode_worker_id, a.kv_blocks))
            .chain(
                self.routed_in_flight
                    .values()
                    .map(|(worker_id, blocks)| (worker_id, *blocks)),
            );
        for (worker_id, blocks) in load {
            if let Some((candidate, _)) = candidates
                .iter_mut()
                .find(|(candidate, _)| &candidate.worker_id == worker_id)
            {
                candidate.active_decode_blocks += blocks;
                candidate.active_sequences += 1;
            }
        }
        for (request_id, attempt) in unrouted {
            if self.already_taken(EventKind::Routed, &request_id, attempt) {
                continue;
            }
            if candidates.is_empty() {
                summary.waiting_for_a_worker += 1;
                continue;
            }
            let Some(record) = reader.request(&request_id)? else {
                continue;
            };
            let received = self.received_or(reader, &request_id, &record)?;
            let prompt: &[u32] = match received.body() {
                Body::Received(received) => &received.prompt_token_ids,
                _ => &[],
            };
            // Workers of one fleet share a block size; hashes are computed once per size present.
            let mut overlaps_by_block_size: HashMap<u32, HashMap<String, u32>> = HashMap::new();
            for (_, block_size) in &candidates {
                if !overlaps_by_block_size.contains_key(block_size) {
                    let hashes = block_hashes(prompt, *block_size as usize);
                    overlaps_by_block_size
                        .insert(*block_size, reader.cached_prefix_blocks(&hashes)?);
                }
            }
            let prompt_tokens = record.prompt_tokens.max(prompt.len() as u32);
            let block_size = candidates[0].1;
            let prompt_blocks = prompt_tokens.div_ceil(block_size);
            let scored: Vec<Candidate> = candidates
                .iter()
                .map(|(candidate, block_size)| {
                    let mut candidate = candidate.clone();
                    candidate.cached_prefix_blocks = overlaps_by_block_size
                        .get(block_size)
                        .and_then(|overlaps| overlaps.get(&candidate.worker_id))
                        .copied()
                        .unwrap_or(0);
                    candidate
                })
                .collect();
            let Some(choice) = choose(
                self.config.policy,
                &request_id,
                prompt_blocks,
                &scored,
                self.previous_round_robin.as_deref(),
            ) else {
                continue;
            };
            let routed = Event::new(
                request_id.as_str(),
                self.config.scheduler_id.as_str(),
                Body::Routed(Routed {
                    decode_worker_id: choice.worker_id.clone(),
                    policy: self.config.policy.name().into(),
                    reason: choice.reason,
                    scores: choice.scores,
                    attempt,
                    received_sequence: record.received_sequence,
                }),
            )
            .with_trace_from(&received);
            self.take(routed, attempt).await?;
            summary.routed += 1;
            let blocks = (prompt_tokens + record.tokens_checkpointed).div_ceil(block_size);
            if let Some((candidate, _)) = candidates
                .iter_mut()
                .find(|(candidate, _)| candidate.worker_id == choice.worker_id)
            {
                candidate.active_decode_blocks += blocks;
                candidate.active_sequences += 1;
            }
            self.routed_in_flight
                .insert(request_id, (choice.worker_id.clone(), blocks));
            self.previous_round_robin = Some(choice.worker_id);
        }
        Ok(())
    }

    async fn fail_stuck(
        &mut self,
        reader: &ProjectionReader,
        departed: &HashMap<String, String>,
        active: &[ActiveRequest],
        now: u64,
        summary: &mut TickSummary,
    ) -> Result<(), ControlError> {
        let timeouts = self.config.timeouts;
        let live_ids = reader
            .unrouted()?
            .into_iter()
            .map(|(request_id, _)| request_id)
            .chain(
                active
                    .iter()
                    // Those are being migrated; their clock starts again when they are routed.
                    .filter(|request| !departed.contains_key(&request.decode_worker_id))
                    .map(|request| request.request_id.clone()),
            );
        for request_id in live_ids.collect::<Vec<_>>() {
            if self.already_taken(EventKind::Failed, &request_id, 1) {
                continue;
            }
            let Some(record) = reader.request(&request_id)? else {
                continue;
            };
            let Some((reason, message)) = stuck(&record, now, &timeouts) else {
                continue;
            };
            tracing::warn!(%request_id, state = %record.state, %reason, "request timed out");
            let failed = Event::new(
                request_id.as_str(),
                self.config.scheduler_id.as_str(),
                Body::Failed(Failed {
                    reason: reason.into(),
                    message: message.clone(),
                    worker_id: record.decode_worker_id.clone(),
                }),
            )
            .with_trace_from(&self.received_or(reader, &request_id, &record)?);
            self.take(failed, 1).await?;
            summary.failed += 1;
            // The client hears it at once; the decode worker frees the request's blocks when it reads the
            // `Failed` from the log.
            let update = TokenUpdate {
                start_index: record.tokens_checkpointed,
                error: Some(message),
                prompt_tokens: record.prompt_tokens,
                worker_id: self.config.scheduler_id.clone(),
                ..TokenUpdate::default()
            };
            if let Err(error) = self.tokens.publish(&request_id, update).await {
                tracing::warn!(%request_id, %error, "could not tell the gateway about a timeout");
            }
        }
        Ok(())
    }
}

/// The timeout a live request has run past, if any: (reason, message for the client).
fn stuck(
    record: &RequestRecord,
    now: u64,
    timeouts: &PhaseTimeouts,
) -> Option<(&'static str, String)> {
    let (limit, since, reason, what) = match record.state.as_str() {
        "Received" | "Migrating" | "Routed" => (
            timeouts.queue,
            record.last_event_at_ns,
            "queue_timeout",
            "waited for a decode worker",
        ),
        "PrefillQueued" | "PrefillRunning" => (
            timeouts.prefill,
            record.prefill_queued_at_ns.or(record.last_event_at_ns),
            "prefill_timeout",
            "waited for its remote prefill",
        ),
        "PrefillLocal" | "PrefillDone" | "KvTransferred" | "Decoding" => (
            timeouts.progress,
            record.last_event_at_ns,
            "no_progress",
            "made no progress",
        ),
        _ => return None,
    };
    let waited = age(now, since);
    (waited > limit).then(|| {
        (
            reason,
            format!(
                "The request {what} for {:.0} s (limit {} s) and was stopped by the scheduler.",
                waited.as_secs_f64(),
                limit.as_secs()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_has_its_own_limit() {
        let timeouts = PhaseTimeouts {
            queue: Duration::from_secs(10),
            prefill: Duration::from_secs(20),
            progress: Duration::from_secs(5),
        };
        let second = 1_000_000_000u64;
        let now = 1_000 * second;
        let record = |state: &str, last_event_s: u64| RequestRecord {
            state: state.into(),
            last_event_at_ns: Some(now - last_event_s * second),
            prefill_queued_at_ns: Some(now - last_event_s * second),
            ..RequestRecord::default()
        };
        assert_eq!(stuck(&record("Received", 9), now, &timeouts), None);
        assert_eq!(
            stuck(&record("Received", 11), now, &timeouts).unwrap().0,
            "queue_timeout"
        );
        assert_eq!(stuck(&record("PrefillQueued", 11), now, &timeouts), None);
        assert_eq!(
            stuck(&record("PrefillRunning", 21), now, &timeouts)
                .unwrap()
                .0,
            "prefill_timeout"
        );
        let (reason, message) = stuck(&record("Decoding", 6), now, &timeouts).unwrap();
        assert_eq!(reason, "no_progress");
        assert!(message.contains("limit 5 s"), "{message}");
        assert_eq!(stuck(&record("Completed", 600), now, &timeouts), None);
    }
}
