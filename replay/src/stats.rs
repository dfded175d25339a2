//! `replay stats`: over a window of the log, latency percentiles per phase, the share of prompts prefilled
//! remotely, queue depth over time, per-worker load, and failures by reason.
//!
//! The request filters (`--request`, `--worker`, `--state`) select the requests behind the latency, prefill and
//! failure tables; queue depth and worker load describe the whole window (with `--worker`, only that worker's
//! load is listed). One pass, memory per request and per second of log, never per event.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tandem_events::lifecycle::RequestLifecycle;
use tandem_events::log::LogMessage;
use tandem_events::schema::Body;

use crate::filter::RequestFilter;
use crate::phases::RequestPhases;
use crate::text::{Table, bytes, maybe_duration, thousands, wall_time};

const NS_PER_S: u64 = 1_000_000_000;

/// What `stats` covers and how finely.
#[derive(Debug, Clone)]
pub struct StatsOptions {
    pub filter: RequestFilter,
    /// Rows of the queue-depth table.
    pub depth_rows: usize,
}

impl Default for StatsOptions {
    fn default() -> Self {
        StatsOptions {
            filter: RequestFilter::default(),
            depth_rows: 12,
        }
    }
}

/// Percentiles of one phase over the selected requests (nearest rank).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhaseStats {
    pub phase: String,
    pub count: usize,
    pub p50_ns: Option<u64>,
    pub p90_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub max_ns: Option<u64>,
}

/// The highest depths seen within one slice of the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DepthRow {
    pub from: String,
    /// Jobs on the prefill queue not yet taken by a prefill worker.
    pub prefill_queue_max: u64,
    /// Requests received and not yet routed.
    pub waiting_for_route_max: u64,
    /// Requests received and not yet ended.
    pub in_flight_max: u64,
}

/// One worker's work in the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorkerLoad {
    pub worker_id: String,
    /// `decode`, `prefill`, or empty when its `WorkerJoined` is outside the window.
    pub role: String,
    pub routed: u64,
    pub completed: u64,
    pub failed: u64,
    pub tokens_generated: u64,
    pub prefills: u64,
    pub prefill_compute_ns: u64,
    pub kv_bytes_sent: u64,
    pub migrated_away: u64,
    /// From heartbeats: the most sequences it ran at once, the most waiting, the fewest free KV blocks.
    pub max_active_sequences: u32,
    pub max_waiting_sequences: u32,
    pub min_free_blocks: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureCount {
    /// `failed` or `cancelled`.
    pub outcome: String,
    pub reason: String,
    pub count: u64,
}

/// The result of `stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsReport {
    pub source: String,
    pub selection: String,
    pub messages: u64,
    pub window_from: String,
    pub window_to: String,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub live: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub phases: Vec<PhaseStats>,
    pub remote_prefills: usize,
    pub local_prefills: usize,
    /// Remote prefills over all prefills, 0..=1.
    pub remote_prefill_share: f64,
    pub migrated_requests: usize,
    pub redelivered_prefills: usize,
    pub queue_depth: Vec<DepthRow>,
    pub workers: Vec<WorkerLoad>,
    pub failures: Vec<FailureCount>,
}

#[derive(Default)]
struct RequestStats {
    phases: RequestPhases,
    lifecycle: RequestLifecycle,
    /// Counted in the queue / waiting / in-flight depths right now.
    queued: bool,
    waiting_route: bool,
    in_flight: bool,
}

#[derive(Clone, Copy, Default)]
struct Depths {
    prefill_queue: u64,
    waiting_for_route: u64,
    in_flight: u64,
}

impl Depths {
    fn max(self, other: Depths) -> Depths {
        Depths {
            prefill_queue: self.prefill_queue.max(other.prefill_queue),
            waiting_for_route: self.waiting_for_route.max(other.waiting_for_route),
            in_flight: self.in_flight.max(other.in_flight),
        }
    }
}

/// Gathers stats from a stream of messages.
pub struct StatsCollector {
    options: StatsOptions,
    requests: HashMap<String, RequestStats>,
    workers: BTreeMap<String, WorkerLoad>,
    depths: Depths,
    /// The highest depths in each second of log time.
    depth_by_second: BTreeMap<u64, Depths>,
    messages: u64,
    first_at_ns: Option<u64>,
    last_at_ns: u64,
}

impl StatsCollector {
    pub fn new(options: StatsOptions) -> StatsCollector {
        StatsCollector {
            options,
            requests: HashMap::new(),
            workers: BTreeMap::new(),
            depths: Depths::default(),
            depth_by_second: BTreeMap::new(),
            messages: 0,
            first_at_ns: None,
            last_at_ns: 0,
        }
    }

    fn worker(&mut self, worker_id: &str) -> &mut WorkerLoad {
        self.workers
            .entry(worker_id.to_string())
            .or_insert_with(|| WorkerLoad {
                worker_id: worker_id.to_string(),
                ..WorkerLoad::default()
            })
    }

    pub fn observe(&mut self, message: &LogMessage) {
        self.messages += 1;
        self.first_at_ns.get_or_insert(message.stored_at_ns);
        self.last_at_ns = message.stored_at_ns;
        // Malformed payloads carry no facts to count; `audit` reports them.
        let Ok(event) = message.event() else {
            return;
        };
        let id = event.id().to_string();
        match event.body() {
            Body::WorkerJoined(joined) => self.worker(&id).role = joined.role.clone(),
            Body::WorkerHeartbeat(heartbeat) => {
                let load = self.worker(&id);
                load.max_active_sequences =
                    load.max_active_sequences.max(heartbeat.active_sequences);
                load.max_waiting_sequences =
                    load.max_waiting_sequences.max(heartbeat.waiting_sequences);
                load.min_free_blocks =
                    Some(load.min_free_blocks.map_or(heartbeat.free_blocks, |free| {
                        free.min(heartbeat.free_blocks)
                    }));
            }
            Body::Routed(routed) => self.worker(&routed.decode_worker_id).routed += 1,
            Body::PrefillDone(done) => {
                let load = self.worker(&done.prefill_worker_id);
                load.prefills += 1;
                load.prefill_compute_ns += done.compute_ns;
            }
            Body::KvTransferred(transferred) => {
                self.worker(&transferred.from_worker_id).kv_bytes_sent += transferred.bytes;
            }
            Body::TokensDecoded(checkpoint) => {
                self.worker(&checkpoint.decode_worker_id).tokens_generated +=
                    checkpoint.token_ids.len() as u64;
            }
            Body::Completed(completed) => self.worker(&completed.decode_worker_id).completed += 1,
            Body::Failed(failed) if !failed.worker_id.is_empty() => {
                self.worker(&failed.worker_id).failed += 1
            }
            Body::Migrated(migrated) => self.worker(&migrated.from_worker_id).migrated_away += 1,
            _ => {}
        }
        if event.kind().is_worker_event() {
            return;
        }
        let request = self.requests.entry(id).or_default();
        // Only the steps the lifecycle took count: a repeat or late work of a superseded attempt would overwrite
        // the times of the attempt that served the request; `audit` reports the violations.
        if !matches!(
            request.lifecycle.apply(event.body()),
            Ok(tandem_events::lifecycle::Applied::Advanced(_))
        ) {
            return;
        }
        request.phases.observe(&event);
        let depths = &mut self.depths;
        let set = |flag: &mut bool, counter: &mut u64, on: bool| {
            if *flag != on {
                *flag = on;
                if on {
                    *counter += 1;
                } else {
                    *counter = counter.saturating_sub(1);
                }
            }
        };
        match event.body() {
            Body::Received(_) => {
                set(&mut request.in_flight, &mut depths.in_flight, true);
                set(
                    &mut request.waiting_route,
                    &mut depths.waiting_for_route,
                    true,
                );
            }
            Body::Routed(_) => set(
                &mut request.waiting_route,
                &mut depths.waiting_for_route,
                false,
            ),
            Body::PrefillQueued(_) => set(&mut request.queued, &mut depths.prefill_queue, true),
            Body::PrefillStarted(_) => set(&mut request.queued, &mut depths.prefill_queue, false),
            Body::Migrated(_) => {
                set(&mut request.queued, &mut depths.prefill_queue, false);
                set(
                    &mut request.waiting_route,
                    &mut depths.waiting_for_route,
                    true,
                );
            }
            Body::Completed(_) | Body::Failed(_) | Body::Cancelled(_) => {
                set(&mut request.queued, &mut depths.prefill_queue, false);
                set(
                    &mut request.waiting_route,
                    &mut depths.waiting_for_route,
                    false,
                );
                set(&mut request.in_flight, &mut depths.in_flight, false);
            }
            _ => {}
        }
        let second = message.stored_at_ns / NS_PER_S;
        let current = self.depths;
        self.depth_by_second
            .entry(second)
            .and_modify(|seen| *seen = seen.max(current))
            .or_insert(current);
    }

    pub fn finish(self, source: &str) -> StatsReport {
        let filter = &self.options.filter;
        let mut selected: Vec<(&String, &RequestStats)> = self
            .requests
            .iter()
            .filter(|(id, request)| {
                // A request seen only by its late events (began before the window) has no Received to time from.
                request.phases.received_at_ns.is_some()
                    && filter.matches(id, &request.phases.workers, request.lifecycle.state())
            })
            .collect();
        selected.sort_by(|a, b| a.0.cmp(b.0));
        let mut report = StatsReport {
            source: source.to_string(),
            selection: filter.describe(),
            messages: self.messages,
            window_from: self.first_at_ns.map(wall_time).unwrap_or_default(),
            window_to: wall_time(self.last_at_ns),
            requests: selected.len(),
            completed: 0,
            failed: 0,
            cancelled: 0,
            live: 0,
            prompt_tokens: 0,
            generated_tokens: 0,
            phases: Vec::new(),
            remote_prefills: 0,
            local_prefills: 0,
            remote_prefill_share: 0.0,
            migrated_requests: 0,
            redelivered_prefills: 0,
            queue_depth: Vec::new(),
            workers: Vec::new(),
            failures: Vec::new(),
        };
        let mut samples: Vec<(&'static str, Vec<u64>)> = Vec::new();
        let mut failures: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (_, request) in &selected {
            let phases = &request.phases;
            report.prompt_tokens += u64::from(phases.prompt_tokens);
            report.generated_tokens += u64::from(phases.tokens_checkpointed);
            match phases.ending.as_ref().map(|ending| ending.kind.as_str()) {
                Some("completed") => report.completed += 1,
                Some("failed") => report.failed += 1,
                Some("cancelled") => report.cancelled += 1,
                _ => report.live += 1,
            }
            if let Some(ending) = &phases.ending
                && ending.kind != "completed"
            {
                *failures
                    .entry((ending.kind.clone(), ending.reason.clone()))
                    .or_insert(0) += 1;
            }
            if phases.remote_prefill {
                report.remote_prefills += 1;
            } else if phases.prefill_local_at_ns.is_some() {
                report.local_prefills += 1;
            }
            report.migrated_requests += usize::from(phases.migrations > 0);
            report.redelivered_prefills += usize::from(phases.prefill_attempts > 1);
            for (index, (name, value)) in phases.durations().named().into_iter().enumerate() {
                if samples.len() <= index {
                    samples.push((name, Vec::new()));
                }
                if let Some(value) = value {
                    samples[index].1.push(value);
                }
            }
        }
        let prefills = report.remote_prefills + report.local_prefills;
        report.remote_prefill_share = if prefills == 0 {
            0.0
        } else {
            report.remote_prefills as f64 / prefills as f64
        };
        report.phases = samples
            .into_iter()
            .map(|(name, mut values)| {
                values.sort_unstable();
                PhaseStats {
                    phase: name.into(),
                    count: values.len(),
                    p50_ns: percentile(&values, 50),
                    p90_ns: percentile(&values, 90),
                    p99_ns: percentile(&values, 99),
                    max_ns: values.last().copied(),
                }
            })
            .collect();
        report.failures = failures
            .into_iter()
            .map(|((outcome, reason), count)| FailureCount {
                outcome,
                reason: if reason.is_empty() {
                    "(none given)".into()
                } else {
                    reason
                },
                count,
            })
            .collect();
        report.queue_depth = depth_rows(&self.depth_by_second, self.options.depth_rows);
        report.workers = self
            .workers
            .into_values()
            .filter(|load| {
                filter
                    .worker
                    .as_deref()
                    .is_none_or(|worker| worker == load.worker_id)
            })
            .collect();
        report
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], percent: usize) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// Folds the per-second maxima into `rows` equal slices of the window.
fn depth_rows(by_second: &BTreeMap<u64, Depths>, rows: usize) -> Vec<DepthRow> {
    let (Some((&first, _)), Some((&last, _))) =
        (by_second.first_key_value(), by_second.last_key_value())
    else {
        return Vec::new();
    };
    let rows = rows.max(1) as u64;
    let span = last - first + 1;
    let slice = span.div_ceil(rows).max(1);
    let mut out = Vec::new();
    let mut from = first;
    // Depth is a level, not a count: a slice with no event keeps the level the previous one ended at.
    let mut level = Depths::default();
    while from <= last {
        let to = from + slice;
        let mut peak = level;
        for (_, depths) in by_second.range(from..to) {
            peak = peak.max(*depths);
            level = *depths;
        }
        out.push(DepthRow {
            from: wall_time(from * NS_PER_S),
            prefill_queue_max: peak.prefill_queue,
            waiting_for_route_max: peak.waiting_for_route,
            in_flight_max: peak.in_flight,
        });
        from = to;
    }
    out
}

impl StatsReport {
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "stats of {}\nwindow {} → {}, {} messages{}\n{} requests: {} completed, {} failed, {} cancelled, {} live; {} prompt tokens, {} generated\n\n",
            self.source,
            self.window_from,
            self.window_to,
            thousands(self.messages),
            if self.selection.is_empty() {
                String::new()
            } else {
                format!(", selecting {}", self.selection)
            },
            thousands(self.requests as u64),
            thousands(self.completed as u64),
            thousands(self.failed as u64),
            thousands(self.cancelled as u64),
            thousands(self.live as u64),
            thousands(self.prompt_tokens),
            thousands(self.generated_tokens),
        );
        let mut phases =
            Table::new(&["phase", "count", "p50", "p90", "p99", "max"]).right(&[1, 2, 3, 4, 5]);
        for phase in &self.phases {
            phases.row(vec![
                phase.phase.replace('_', " "),
                thousands(phase.count as u64),
                maybe_duration(phase.p50_ns),
                maybe_duration(phase.p90_ns),
                maybe_duration(phase.p99_ns),
                maybe_duration(phase.max_ns),
            ]);
        }
        out.push_str(&phases.render());
        out.push_str(&format!(
            "\nprefill: {} remote, {} local ({:.1}% remote); {} requests migrated, {} prefills redelivered\n",
            thousands(self.remote_prefills as u64),
            thousands(self.local_prefills as u64),
            100.0 * self.remote_prefill_share,
            self.migrated_requests,
            self.redelivered_prefills
        ));
        if !self.queue_depth.is_empty() {
            out.push_str("\nqueue depth (highest in each slice)\n");
            let mut depth =
                Table::new(&["from", "prefill queue", "waiting for route", "in flight"])
                    .right(&[1, 2, 3]);
            for row in &self.queue_depth {
                depth.row(vec![
                    row.from.clone(),
                    row.prefill_queue_max.to_string(),
                    row.waiting_for_route_max.to_string(),
                    row.in_flight_max.to_string(),
                ]);
            }
            out.push_str(&depth.render());
        }
        if !self.workers.is_empty() {
            out.push_str("\nworkers\n");
            let mut workers = Table::new(&[
                "worker",
                "role",
                "routed",
                "completed",
                "failed",
                "tokens",
                "prefills",
                "kv sent",
                "migrated off",
                "peak active",
                "min free blocks",
            ])
            .right(&[2, 3, 4, 5, 6, 7, 8, 9, 10]);
            for load in &self.workers {
                workers.row(vec![
                    load.worker_id.clone(),
                    load.role.clone(),
                    thousands(load.routed),
                    thousands(load.completed),
                    thousands(load.failed),
                    thousands(load.tokens_generated),
                    thousands(load.prefills),
                    bytes(load.kv_bytes_sent),
                    thousands(load.migrated_away),
                    load.max_active_sequences.to_string(),
                    load.min_free_blocks
                        .map(|free| free.to_string())
                        .unwrap_or_else(|| "–".into()),
                ]);
            }
            out.push_str(&workers.render());
        }
        out.push_str("\nfailures by reason\n");
        if self.failures.is_empty() {
            out.push_str("  none\n");
        } else {
            let mut failures = Table::new(&["outcome", "reason", "count"]).right(&[2]);
            for failure in &self.failures {
                failures.row(vec![
                    failure.outcome.clone(),
                    failure.reason.clone(),
                    thousands(failure.count),
                ]);
            }
            out.push_str(&failures.render());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50), Some(50));
        assert_eq!(percentile(&values, 90), Some(90));
        assert_eq!(percentile(&values, 99), Some(99));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[], 50), None);
    }
}
