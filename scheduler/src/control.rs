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

use opentelemetry::KeyValue;
use tandem_events::blocks::block_hashes;
use tandem_events::log::{EventLog, KvBucket};
use tandem_events::metric_names::{MIGRATIONS, ROUTING_DECISIONS, SCHEDULER_TIMEOUTS};
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
    /// Prompt block hashes (and prompt block count) of the requests being routed or held, by request.
    prompt_hashes: HashMap<String, (u32, Arc<Vec<u64>>, u32)>,
    /// Workers whose heartbeat this scheduler found missing, and since when.
    heartbeat_missing_since: HashMap<String, Instant>,
}

/// A prompt's full-block hashes and its block count (the last block may be partial).
type PromptBlocks = (Arc<Vec<u64>>, u32);

/// A candidate decode worker and the KV blocks its live requests hold: full prompt blocks by hash (requests sharing
/// a prefix share those blocks in its prefix cache, so they count once, as the worker's allocator counts them) and
/// the rest (partial prompt blocks, generated tokens) per request.
struct Load {
    candidate: Candidate,
    block_size: u32,
    prompt_blocks_in_use: HashSet<u64>,
    other_blocks_in_use: u32,
}

impl Load {
    fn hold(&mut self, prompt_hashes: &[u64], kv_blocks: u32) {
        self.prompt_blocks_in_use
            .extend(prompt_hashes.iter().copied());
        self.other_blocks_in_use += kv_blocks.saturating_sub(prompt_hashes.len() as u32);
        self.candidate.active_sequences += 1;
    }
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
            prompt_hashes: HashMap::new(),
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
            let migrated = traced_decision(
                migrated,
                "scheduler.migrate",
                SystemTime::now(),
                vec![
                    KeyValue::new("from_worker_id", request.decode_worker_id.clone()),
                    KeyValue::new("tokens_generated", i64::from(record.tokens_checkpointed)),
                    KeyValue::new("attempt", i64::from(attempt)),
                ],
            );
            self.take(migrated, attempt).await?;
            metrics::counter!(MIGRATIONS).increment(1);
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
            self.prompt_hashes.clear();
            return Ok(());
        }
        let mut candidates: Vec<Load> = workers
            .iter()
            .filter(|(worker_id, record)| {
                record.role == "decode"
                    && !departed.contains_key(worker_id)
                    && live_heartbeats.contains(worker_id)
            })
            .map(|(worker_id, record)| Load {
                candidate: Candidate {
                    worker_id: worker_id.clone(),
                    cached_prefix_blocks: 0,
                    active_decode_blocks: 0,
                    active_sequences: 0,
                    total_blocks: record.total_blocks,
                },
                block_size: record.block_size_tokens.max(1),
                prompt_blocks_in_use: HashSet::new(),
                other_blocks_in_use: 0,
            })
            .collect();
        if candidates.is_empty() {
            summary.waiting_for_a_worker += unrouted.len();
            return Ok(());
        }
        // The fleet's block size (workers of one model share it); a worker with another size is still a candidate,
        // its load counted in its own blocks, but it shares no hashes with the others.
        let block_size = candidates[0].block_size;
        let mut still_needed: HashSet<String> = HashSet::new();
        let in_flight: Vec<(String, String)> = self
            .routed_in_flight
            .iter()
            .map(|(request_id, (worker_id, _))| (request_id.clone(), worker_id.clone()))
            .collect();
        let holding = active
            .iter()
            .map(|a| {
                (
                    a.request_id.clone(),
                    a.decode_worker_id.clone(),
                    Some(a.kv_blocks),
                )
            })
            .chain(
                in_flight
                    .into_iter()
                    .map(|(request, worker)| (request, worker, None)),
            );
        for (request_id, worker_id, kv_blocks) in holding {
            let Some(load) = candidates
                .iter_mut()
                .find(|load| load.candidate.worker_id == worker_id)
            else {
                continue;
            };
            let Some((hashes, blocks)) = self.prompt_hashes_of(reader, &request_id, block_size)?
            else {
                continue;
            };
            still_needed.insert(request_id);
            let kv_blocks = kv_blocks.unwrap_or(blocks);
            load.hold(&hashes, kv_blocks);
        }
        for (request_id, attempt) in unrouted {
            if self.already_taken(EventKind::Routed, &request_id, attempt) {
                continue;
            }
            let Some(record) = reader.request(&request_id)? else {
                continue;
            };
            let Some((hashes, prompt_blocks)) =
                self.prompt_hashes_of(reader, &request_id, block_size)?
            else {
                continue;
            };
            still_needed.insert(request_id.clone());
            // Who holds each block: cached (announced by the worker), or about to be (a prompt it is already
            // serving or was just sent shares the block).
            let cached_holders = reader.prefix_holders(&hashes)?;
            let scored: Vec<Candidate> = candidates
                .iter()
                .map(|load| {
                    let mut candidate = load.candidate.clone();
                    candidate.cached_prefix_blocks = if load.block_size == block_size {
                        hashes
                            .iter()
                            .zip(&cached_holders)
                            .take_while(|(hash, holders)| {
                                holders.contains(&candidate.worker_id)
                                    || load.prompt_blocks_in_use.contains(hash)
                            })
                            .count() as u32
                    } else {
                        0
                    };
                    candidate.active_decode_blocks =
                        load.prompt_blocks_in_use.len() as u32 + load.other_blocks_in_use;
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
            let received = self.received_or(reader, &request_id, &record)?;
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
            // The span covers the request's wait for this decision: from its `Received` (or its migration) to now.
            let routed = traced_decision(
                routed,
                "scheduler.route",
                tandem_events::trace::system_time_of(received.timestamp_ns()),
                vec![
                    KeyValue::new("decode_worker_id", choice.worker_id.clone()),
                    KeyValue::new("attempt", i64::from(attempt)),
                    KeyValue::new("policy", self.config.policy.name()),
                ],
            );
            self.take(routed, attempt).await?;
            metrics::counter!(ROUTING_DECISIONS, "policy" => self.config.policy.name())
                .increment(1);
            summary.routed += 1;
            let blocks = (record.prompt_tokens + record.tokens_checkpointed).div_ceil(block_size);
            if let Some(load) = candidates
                .iter_mut()
                .find(|load| load.candidate.worker_id == choice.worker_id)
            {
                load.hold(&hashes, blocks);
            }
            self.routed_in_flight
                .insert(request_id, (choice.worker_id.clone(), blocks));
            self.previous_round_robin = Some(choice.worker_id);
        }
        self.prompt_hashes
            .retain(|request_id, _| still_needed.contains(request_id));
        Ok(())
    }

    /// The chained hashes of a request's full prompt blocks and its prompt's block count, computed once per
    /// request from its `Received` on the projection.
    fn prompt_hashes_of(
        &mut self,
        reader: &ProjectionReader,
        request_id: &str,
        block_size: u32,
    ) -> Result<Option<PromptBlocks>, ControlError> {
        if let Some((size, hashes, blocks)) = self.prompt_hashes.get(request_id)
            && *size == block_size
        {
            return Ok(Some((Arc::clone(hashes), *blocks)));
        }
        let Some(record) = reader.request(request_id)? else {
            return Ok(None);
        };
        let Some(received) = reader.request_event(request_id, record.received_sequence)? else {
            return Ok(None);
        };
        let Body::Received(received) = received.body() else {
            return Ok(None);
        };
        let hashes = Arc::new(block_hashes(
            &received.prompt_token_ids,
            block_size as usize,
        ));
        let prompt_tokens = record
            .prompt_tokens
            .max(received.prompt_token_ids.len() as u32);
        let blocks = prompt_tokens.div_ceil(block_size);
        self.prompt_hashes.insert(
            request_id.to_string(),
            (block_size, Arc::clone(&hashes), blocks),
        );
        Ok(Some((hashes, blocks)))
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
            metrics::counter!(SCHEDULER_TIMEOUTS, "reason" => reason).increment(1);
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

/// Records a decision of the scheduler as a span of its request's trace (a child of the context `event` carries
/// from the request's `Received`), from `since` to now, and makes `event` carry that span on. The request id and
/// the scheduler id are attributes beside `attributes`.
fn traced_decision(
    event: Event,
    name: &'static str,
    since: SystemTime,
    mut attributes: Vec<KeyValue>,
) -> Event {
    let now = SystemTime::now();
    attributes.push(KeyValue::new("request_id", event.id().to_string()));
    attributes.push(KeyValue::new(
        "scheduler_id",
        event.envelope().emitter.clone(),
    ));
    // Another host's clock may run ahead of this one: a span never ends before it starts.
    let context = tandem_events::trace::record_finished_span(
        name,
        event.trace(),
        since.min(now),
        now,
        attributes,
    );
    event.with_trace_context(context)
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
