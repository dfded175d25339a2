//! The worker roles' metrics, labelled with the worker's id (several workers may share a process under
//! `tandem serve`): the decode worker's batch, KV blocks, prefix-cache lookups, prefill decisions and steps queued
//! ahead; the prefill
//! worker's queue wait and compute. The names are in `tandem_events::metric_names`; spans are made where the work
//! is (`decode.request` in `decode.rs`, `prefill.*` in `prefill.rs`, `kv_transfer.*` in `transfer/`).

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::engine::QueuedAheadSteps;
use tandem_events::metric_names::{
    DECODE_STEPS_QUEUED_AHEAD, KV_BLOCKS_FREE, KV_BLOCKS_USED, NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING, PREFILL_COMPUTE, PREFILL_DECISIONS, PREFILL_QUEUE_DEPTH,
    PREFILL_QUEUE_WAIT, PREFILL_TOKENS, PREFIX_CACHE_HITS, PREFIX_CACHE_QUERIES,
};

/// A decode worker's metric handles (resolved once, then cheap to update from the engine thread).
#[derive(Clone)]
pub struct DecodeMetrics {
    running: Gauge,
    waiting: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_free: Gauge,
    prefix_cache_queries: Counter,
    prefix_cache_hits: Counter,
    prefill_local: Counter,
    prefill_remote: Counter,
    prefill_queue_depth: Gauge,
    steps_queued_ahead_taken: Counter,
    steps_queued_ahead_dropped: Counter,
}

impl std::fmt::Debug for DecodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DecodeMetrics")
    }
}

impl DecodeMetrics {
    pub fn new(worker_id: &str) -> DecodeMetrics {
        let worker_id = worker_id.to_string();
        DecodeMetrics {
            running: metrics::gauge!(NUM_REQUESTS_RUNNING, "worker_id" => worker_id.clone()),
            waiting: metrics::gauge!(NUM_REQUESTS_WAITING, "worker_id" => worker_id.clone()),
            kv_blocks_used: metrics::gauge!(KV_BLOCKS_USED, "worker_id" => worker_id.clone()),
            kv_blocks_free: metrics::gauge!(KV_BLOCKS_FREE, "worker_id" => worker_id.clone()),
            prefix_cache_queries: metrics::counter!(PREFIX_CACHE_QUERIES, "worker_id" => worker_id.clone()),
            prefix_cache_hits: metrics::counter!(PREFIX_CACHE_HITS, "worker_id" => worker_id.clone()),
            prefill_local: metrics::counter!(PREFILL_DECISIONS, "worker_id" => worker_id.clone(), "where" => "local"),
            prefill_remote: metrics::counter!(PREFILL_DECISIONS, "worker_id" => worker_id.clone(), "where" => "remote"),
            prefill_queue_depth: metrics::gauge!(PREFILL_QUEUE_DEPTH, "worker_id" => worker_id.clone()),
            steps_queued_ahead_taken: metrics::counter!(DECODE_STEPS_QUEUED_AHEAD, "worker_id" => worker_id.clone(), "outcome" => "taken"),
            steps_queued_ahead_dropped: metrics::counter!(DECODE_STEPS_QUEUED_AHEAD, "worker_id" => worker_id, "outcome" => "dropped"),
        }
    }

    /// A request's input of `queried_tokens` tokens was looked up in the prefix cache; `hit_tokens` were there.
    pub(crate) fn prefix_cache_lookup(&self, queried_tokens: u64, hit_tokens: u64) {
        self.prefix_cache_queries.increment(queried_tokens);
        self.prefix_cache_hits.increment(hit_tokens);
    }

    pub(crate) fn prefill_decision(&self, remote: bool) {
        if remote {
            self.prefill_remote.increment(1);
        } else {
            self.prefill_local.increment(1);
        }
    }

    /// The engine's counts of steps queued ahead so far (its own, so they are set, not added to).
    pub(crate) fn steps_queued_ahead(&self, steps: QueuedAheadSteps) {
        self.steps_queued_ahead_taken.absolute(steps.taken);
        self.steps_queued_ahead_dropped.absolute(steps.dropped);
    }

    /// The batch after an engine step.
    pub(crate) fn batch(
        &self,
        running: usize,
        waiting: usize,
        kv_blocks_total: usize,
        kv_blocks_free: usize,
    ) {
        self.running.set(running as f64);
        self.waiting.set(waiting as f64);
        self.kv_blocks_used
            .set(kv_blocks_total.saturating_sub(kv_blocks_free) as f64);
        self.kv_blocks_free.set(kv_blocks_free as f64);
    }

    pub(crate) fn prefill_queue_depth(&self, jobs: u64) {
        self.prefill_queue_depth.set(jobs as f64);
    }
}

/// A prefill worker's metric handles.
#[derive(Clone)]
pub(crate) struct PrefillMetrics {
    queue_wait: Histogram,
    compute: Histogram,
    tokens: Counter,
}

impl PrefillMetrics {
    pub(crate) fn new(worker_id: &str) -> PrefillMetrics {
        let worker_id = worker_id.to_string();
        PrefillMetrics {
            queue_wait: metrics::histogram!(PREFILL_QUEUE_WAIT, "worker_id" => worker_id.clone()),
            compute: metrics::histogram!(PREFILL_COMPUTE, "worker_id" => worker_id.clone()),
            tokens: metrics::counter!(PREFILL_TOKENS, "worker_id" => worker_id),
        }
    }

    pub(crate) fn queue_wait(&self, waited: Duration) {
        self.queue_wait.record(waited.as_secs_f64());
    }

    /// One prompt computed: `computed_tokens` tokens (its cached prefix not counted) in `compute`.
    pub(crate) fn computed(&self, computed_tokens: u64, compute: Duration) {
        self.compute.record(compute.as_secs_f64());
        self.tokens.increment(computed_tokens);
    }
}
