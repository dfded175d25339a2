//! One request's phases, folded from its events: when each step happened, on which workers, and the durations
//! between them. Shared by `timeline` (one request) and `stats` (every request in a window).
//!
//! Phase durations (all from the emitters' wall clocks):
//! - `route`: `Received` → first `Routed` (waiting for the scheduler);
//! - `queue_wait`: `PrefillQueued` → first `PrefillStarted` (on the prefill queue; remote prefill only);
//! - `prefill`: remote, last `PrefillStarted` → `PrefillDone`; local, `PrefillLocal` → `DecodeStarted`;
//! - `kv_transfer`: the transfer's own measured duration from `KvTransferred`;
//! - `ttft`: `Received` → first `DecodeStarted`: the first token is sampled at the end of the prefill and the decode
//!   worker streams it as it starts decoding (checkpoints come every 16 tokens, too coarse for this);
//! - `decode`: last `DecodeStarted` → `Completed`;
//! - `inter_token`: the decode's mean gap per generated token, from the checkpoints;
//! - `total`: `Received` → the terminal event.

use serde::Serialize;
use tandem_events::Event;
use tandem_events::schema::Body;

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ending {
    /// `completed`, `failed` or `cancelled`.
    pub kind: String,
    pub at_ns: u64,
    /// The finish reason of a completion (`stop`, `length`), or the reason of a failure or cancellation.
    pub reason: String,
}

/// The times and facts of one request's steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestPhases {
    pub received_at_ns: Option<u64>,
    pub prompt_tokens: u32,
    pub first_routed_at_ns: Option<u64>,
    pub routed_at_ns: Option<u64>,
    pub prefill_local_at_ns: Option<u64>,
    pub prefill_queued_at_ns: Option<u64>,
    pub first_prefill_started_at_ns: Option<u64>,
    pub prefill_started_at_ns: Option<u64>,
    pub prefill_done_at_ns: Option<u64>,
    pub kv_transferred_at_ns: Option<u64>,
    pub kv_transfer_ns: Option<u64>,
    pub kv_bytes: u64,
    pub first_decode_started_at_ns: Option<u64>,
    pub decode_started_at_ns: Option<u64>,
    pub tokens_checkpointed: u32,
    pub last_checkpoint_at_ns: Option<u64>,
    pub ending: Option<Ending>,
    /// The prompt went to the prefill queue (in the last attempt).
    pub remote_prefill: bool,
    /// Highest prefill delivery attempt seen: above 1, the prefill job was redelivered.
    pub prefill_attempts: u32,
    pub migrations: u32,
    pub decode_worker_id: String,
    pub prefill_worker_id: String,
    /// Every worker that took part, in order of appearance.
    pub workers: Vec<String>,
}

/// The durations between phases (see the module docs); `None` when a phase did not happen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PhaseDurations {
    pub route_ns: Option<u64>,
    pub queue_wait_ns: Option<u64>,
    pub prefill_ns: Option<u64>,
    pub kv_transfer_ns: Option<u64>,
    pub ttft_ns: Option<u64>,
    pub decode_ns: Option<u64>,
    pub inter_token_ns: Option<u64>,
    pub total_ns: Option<u64>,
}

impl PhaseDurations {
    /// The phases by name, in flow order, for tables and percentiles.
    pub fn named(&self) -> [(&'static str, Option<u64>); 8] {
        [
            ("route", self.route_ns),
            ("queue_wait", self.queue_wait_ns),
            ("prefill", self.prefill_ns),
            ("kv_transfer", self.kv_transfer_ns),
            ("ttft", self.ttft_ns),
            ("decode", self.decode_ns),
            ("inter_token", self.inter_token_ns),
            ("total", self.total_ns),
        ]
    }
}

fn span(from: Option<u64>, to: Option<u64>) -> Option<u64> {
    Some(to?.saturating_sub(from?))
}

impl RequestPhases {
    fn involve(&mut self, worker_id: &str) {
        if !worker_id.is_empty() && !self.workers.iter().any(|known| known == worker_id) {
            self.workers.push(worker_id.to_string());
        }
    }

    /// Folds one event about this request in.
    pub fn observe(&mut self, event: &Event) {
        let at = event.timestamp_ns();
        match event.body() {
            Body::Received(received) => {
                self.received_at_ns.get_or_insert(at);
                self.prompt_tokens = received.prompt_tokens;
            }
            Body::Routed(routed) => {
                self.first_routed_at_ns.get_or_insert(at);
                self.routed_at_ns = Some(at);
                self.decode_worker_id = routed.decode_worker_id.clone();
                self.involve(&routed.decode_worker_id);
            }
            Body::PrefillLocal(local) => {
                self.prefill_local_at_ns = Some(at);
                self.remote_prefill = false;
                self.involve(&local.decode_worker_id);
            }
            Body::PrefillQueued(queued) => {
                self.prefill_queued_at_ns = Some(at);
                self.first_prefill_started_at_ns = None;
                self.remote_prefill = true;
                self.involve(&queued.decode_worker_id);
            }
            Body::PrefillStarted(started) => {
                self.first_prefill_started_at_ns.get_or_insert(at);
                self.prefill_started_at_ns = Some(at);
                self.prefill_attempts = self.prefill_attempts.max(started.delivery_attempt);
                self.prefill_worker_id = started.prefill_worker_id.clone();
                self.involve(&started.prefill_worker_id);
            }
            Body::PrefillDone(done) => {
                self.prefill_done_at_ns = Some(at);
                self.involve(&done.prefill_worker_id);
            }
            Body::KvTransferred(transferred) => {
                self.kv_transferred_at_ns = Some(at);
                self.kv_transfer_ns = Some(transferred.duration_ns);
                self.kv_bytes += transferred.bytes;
            }
            Body::DecodeStarted(started) => {
                self.first_decode_started_at_ns.get_or_insert(at);
                self.decode_started_at_ns = Some(at);
                self.decode_worker_id = started.decode_worker_id.clone();
                self.involve(&started.decode_worker_id);
            }
            Body::TokensDecoded(checkpoint) => {
                let end = checkpoint.start_index + checkpoint.token_ids.len() as u32;
                self.tokens_checkpointed = self.tokens_checkpointed.max(end);
                self.last_checkpoint_at_ns = Some(at);
            }
            Body::Migrated(migrated) => {
                self.migrations += 1;
                self.involve(&migrated.from_worker_id);
                // The next attempt starts its prefill afresh.
                self.prefill_local_at_ns = None;
                self.prefill_queued_at_ns = None;
                self.first_prefill_started_at_ns = None;
                self.prefill_started_at_ns = None;
                self.prefill_done_at_ns = None;
            }
            Body::Completed(completed) => {
                self.end("completed", at, &completed.finish_reason);
                self.involve(&completed.decode_worker_id);
            }
            Body::Failed(failed) => {
                self.end("failed", at, &failed.reason);
                self.involve(&failed.worker_id);
            }
            Body::Cancelled(cancelled) => self.end("cancelled", at, &cancelled.reason),
            Body::WorkerJoined(_)
            | Body::WorkerHeartbeat(_)
            | Body::WorkerLeft(_)
            | Body::WorkerLost(_)
            | Body::KvBlocksStored(_)
            | Body::KvBlocksRemoved(_) => {}
        }
    }

    fn end(&mut self, kind: &str, at_ns: u64, reason: &str) {
        // The first terminal event decides; anything after it is late work, not a new ending.
        if self.ending.is_none() {
            self.ending = Some(Ending {
                kind: kind.into(),
                at_ns,
                reason: reason.into(),
            });
        }
    }

    pub fn durations(&self) -> PhaseDurations {
        let ended_at = self.ending.as_ref().map(|ending| ending.at_ns);
        let completed_at = self
            .ending
            .as_ref()
            .filter(|ending| ending.kind == "completed")
            .map(|ending| ending.at_ns);
        let prefill_ns = if self.remote_prefill {
            span(self.prefill_started_at_ns, self.prefill_done_at_ns)
        } else {
            span(self.prefill_local_at_ns, self.decode_started_at_ns)
        };
        let inter_token_ns = match (self.decode_started_at_ns, self.last_checkpoint_at_ns) {
            (Some(start), Some(last)) if self.tokens_checkpointed > 1 && last >= start => {
                Some((last - start) / u64::from(self.tokens_checkpointed - 1))
            }
            _ => None,
        };
        PhaseDurations {
            route_ns: span(self.received_at_ns, self.first_routed_at_ns),
            queue_wait_ns: span(self.prefill_queued_at_ns, self.first_prefill_started_at_ns),
            prefill_ns,
            kv_transfer_ns: self.kv_transfer_ns.filter(|_| self.remote_prefill),
            ttft_ns: span(self.received_at_ns, self.first_decode_started_at_ns),
            decode_ns: span(self.decode_started_at_ns, completed_at),
            inter_token_ns,
            total_ns: span(self.received_at_ns, ended_at),
        }
    }
}

/// The workers an event names (decode, prefill, or the one a request migrated from).
pub fn workers_named(body: &Body) -> Vec<&str> {
    let named: Vec<&str> = match body {
        Body::Routed(routed) => vec![&routed.decode_worker_id],
        Body::PrefillLocal(local) => vec![&local.decode_worker_id],
        Body::PrefillQueued(queued) => vec![&queued.decode_worker_id],
        Body::PrefillStarted(started) => vec![&started.prefill_worker_id],
        Body::PrefillDone(done) => vec![&done.prefill_worker_id],
        Body::KvTransferred(transferred) => {
            vec![&transferred.from_worker_id, &transferred.to_worker_id]
        }
        Body::DecodeStarted(started) => vec![&started.decode_worker_id],
        Body::TokensDecoded(checkpoint) => vec![&checkpoint.decode_worker_id],
        Body::Migrated(migrated) => vec![&migrated.from_worker_id],
        Body::Completed(completed) => vec![&completed.decode_worker_id],
        Body::Failed(failed) => vec![&failed.worker_id],
        _ => Vec::new(),
    };
    named.into_iter().filter(|id| !id.is_empty()).collect()
}
