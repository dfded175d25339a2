//! `replay audit`: the projection rebuilt from the log, in memory and in one streaming pass, and every request
//! checked against the lifecycle state machine and the log's invariants:
//!
//! - every event follows the lifecycle (`RequestLifecycle`): an illegal order, a token index written twice or
//!   skipped, is a finding ([`FindingKind::IllegalOrder`]); a payload that does not decode is one too;
//! - every accepted request reaches a terminal state, or is still live: a live request with no event for longer
//!   than the stuck threshold before the end of the log is [`FindingKind::Stuck`];
//! - every `PrefillQueued` ends in `PrefillDone`, or in a redelivery, failure, cancellation or migration;
//! - the KV moved matches the prompt: the destination holds one block per uncached prompt block, the transfer
//!   moved that many, and every block to one decode worker has the same size;
//! - with `--projection`, the scheduler's redb projection equals the rebuild (requests, workers, findings), read
//!   up to the sequence that projection last applied.
//!
//! Migrations and prefill redeliveries are recovery working as designed: they are listed as notices, not errors.
//! The rebuild folds events with the scheduler's own `fold_request_event` / `fold_worker_event`, so its records
//! are the projection's records, without a redb write per event.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tandem_events::Event;
use tandem_events::EventKind;
use tandem_events::lifecycle::{self, RequestLifecycle, RequestState};
use tandem_events::log::LogMessage;
use tandem_events::schema::Body;
use tandem_scheduler::projection::apply::{fold_request_event, fold_worker_event};
use tandem_scheduler::projection::{Projection, RequestRecord, WorkerRecord};

use crate::ReplayError;
use crate::filter::RequestFilter;
use crate::phases::workers_named;
use crate::text::{Table, duration, thousands, wall_time};

/// What an audit looks for, and in which requests.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// A live request whose last event is older than this, measured back from the last message on the log, is
    /// stuck. Measured against the log's end, not the clock, so an export audited next week says the same.
    pub stuck_after_ns: u64,
    /// Requests whose findings are reported (the rebuild covers every request either way).
    pub filter: RequestFilter,
    /// The read starts inside the log (a time window): a request whose first event read is not `Received` began
    /// before the window and is left out rather than reported as out of order.
    pub partial_window: bool,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            stuck_after_ns: 5 * 60 * 1_000_000_000,
            filter: RequestFilter::default(),
            partial_window: false,
        }
    }
}

/// What kind of problem (or notice) a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A payload on the log that is not a valid event.
    Malformed,
    /// An event the lifecycle does not allow where it is (includes a token index twice or skipped).
    IllegalOrder,
    /// A live request with no event for longer than the stuck threshold.
    Stuck,
    /// A `PrefillQueued` that never got its `PrefillDone`, though the request went on to end.
    PrefillUnfinished,
    /// KV blocks or bytes that do not match the prompt.
    KvMismatch,
    /// The scheduler's projection disagrees with the rebuild.
    ProjectionMismatch,
    /// Notice: the request moved to another decode worker.
    Migrated,
    /// Notice: the prefill job was delivered more than once.
    PrefillRedelivered,
}

impl FindingKind {
    /// Errors make `audit` exit non-zero; notices are recovery that worked.
    pub fn is_error(self) -> bool {
        !matches!(
            self,
            FindingKind::Migrated | FindingKind::PrefillRedelivered
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Malformed => "malformed",
            FindingKind::IllegalOrder => "illegal_order",
            FindingKind::Stuck => "stuck",
            FindingKind::PrefillUnfinished => "prefill_unfinished",
            FindingKind::KvMismatch => "kv_mismatch",
            FindingKind::ProjectionMismatch => "projection_mismatch",
            FindingKind::Migrated => "migrated",
            FindingKind::PrefillRedelivered => "prefill_redelivered",
        }
    }
}

/// One event a finding points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FindingEvent {
    pub sequence: u64,
    pub kind: String,
    pub at: String,
}

/// One problem or notice, with the events that show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub severity: &'static str,
    /// The request (or worker) concerned; empty when a payload did not decode.
    pub request_id: String,
    pub summary: String,
    pub events: Vec<FindingEvent>,
}

/// How the scheduler's projection compared with the rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProjectionComparison {
    pub path: String,
    pub last_applied_sequence: u64,
    pub requests_compared: usize,
    pub workers_compared: usize,
    pub differences: usize,
}

/// The comparison with a projection, to attach to the report.
#[derive(Debug, Clone)]
pub struct ProjectionCheck {
    pub comparison: ProjectionComparison,
    pub findings: Vec<Finding>,
}

/// The audit's result.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub source: String,
    pub messages: u64,
    pub last_sequence: u64,
    /// The latest event time read: "now" for the stuck check.
    pub log_end: String,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    /// Live and recent: still being served when the log ends.
    pub live: usize,
    /// Left out: they began before the time window.
    pub began_before_window: usize,
    pub workers: usize,
    pub findings: Vec<Finding>,
    pub projection: Option<ProjectionComparison>,
}

impl AuditReport {
    pub fn attach_projection(&mut self, check: ProjectionCheck) {
        self.projection = Some(check.comparison);
        self.findings.extend(check.findings);
    }

    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.kind.is_error()).count()
    }

    pub fn notices(&self) -> usize {
        self.findings.len() - self.errors()
    }

    /// Finding kinds with their counts, for tests and the summary line.
    pub fn counts(&self) -> BTreeMap<FindingKind, usize> {
        let mut counts = BTreeMap::new();
        for finding in &self.findings {
            *counts.entry(finding.kind).or_insert(0) += 1;
        }
        counts
    }

    pub fn render_text(&self) -> String {
        let mut out = format!(
            "audit of {}\n{} messages up to sequence {} (log ends {})\n{} requests: {} completed, {} failed, {} cancelled, {} live{}; {} workers\n",
            self.source,
            thousands(self.messages),
            thousands(self.last_sequence),
            self.log_end,
            thousands(self.requests as u64),
            thousands(self.completed as u64),
            thousands(self.failed as u64),
            thousands(self.cancelled as u64),
            thousands(self.live as u64),
            if self.began_before_window > 0 {
                format!(", {} began before the window", self.began_before_window)
            } else {
                String::new()
            },
            self.workers,
        );
        if let Some(projection) = &self.projection {
            out.push_str(&format!(
                "projection {} (applied up to sequence {}): {} requests and {} workers compared, {} differ\n",
                projection.path,
                thousands(projection.last_applied_sequence),
                projection.requests_compared,
                projection.workers_compared,
                projection.differences
            ));
        }
        out.push('\n');
        if self.findings.is_empty() {
            out.push_str(
                "no findings: every request follows the lifecycle and the log's invariants\n",
            );
            return out;
        }
        for (index, finding) in self.findings.iter().enumerate() {
            out.push_str(&format!(
                "{}. [{}] {} {}: {}\n",
                index + 1,
                finding.severity,
                finding.kind.as_str(),
                if finding.request_id.is_empty() {
                    "(no id)"
                } else {
                    &finding.request_id
                },
                finding.summary
            ));
            for event in &finding.events {
                out.push_str(&format!(
                    "     #{:<8} {}  {}\n",
                    event.sequence, event.at, event.kind
                ));
            }
        }
        let mut table = Table::new(&["finding", "severity", "count"]).right(&[2]);
        for (kind, count) in self.counts() {
            let severity = if kind.is_error() { "error" } else { "notice" };
            table.row(vec![
                kind.as_str().into(),
                severity.into(),
                count.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&table.render());
        out.push_str(&format!(
            "\n{} errors, {} notices\n",
            self.errors(),
            self.notices()
        ));
        out
    }
}

/// An event of a request, as much as findings need of it.
#[derive(Debug, Clone, Copy)]
struct EventRef {
    sequence: u64,
    kind: EventKind,
    at_ns: u64,
}

impl EventRef {
    fn show(&self) -> FindingEvent {
        FindingEvent {
            sequence: self.sequence,
            kind: self.kind.as_str().into(),
            at: wall_time(self.at_ns),
        }
    }
}

/// A `PrefillQueued` waiting for its outcome.
#[derive(Debug, Clone)]
struct OpenPrefill {
    queued_sequence: u64,
}

#[derive(Debug, Default)]
struct RequestAudit {
    lifecycle: RequestLifecycle,
    record: RequestRecord,
    events: Vec<EventRef>,
    workers: Vec<String>,
    prompt_tokens: u32,
    open_prefill: Option<OpenPrefill>,
    /// Blocks the last `PrefillQueued` reserved at the decode worker (kept past `PrefillDone`, which comes before
    /// `KvTransferred`).
    destination_blocks: Option<u32>,
    redelivery_reported: bool,
    /// Began before the time window: not audited.
    outside_window: bool,
}

impl RequestAudit {
    fn shown(&self, kinds: &[EventKind]) -> Vec<FindingEvent> {
        self.events
            .iter()
            .filter(|event| kinds.is_empty() || kinds.contains(&event.kind))
            .map(EventRef::show)
            .collect()
    }

    /// The first few and the last events, enough to see where a request stopped.
    fn shown_ends(&self) -> Vec<FindingEvent> {
        const HEAD: usize = 3;
        const TAIL: usize = 6;
        if self.events.len() <= HEAD + TAIL {
            return self.shown(&[]);
        }
        self.events[..HEAD]
            .iter()
            .chain(&self.events[self.events.len() - TAIL..])
            .map(EventRef::show)
            .collect()
    }
}

/// The in-memory rebuild: fed every message in order, then turned into a report.
#[derive(Debug)]
pub struct Rebuild {
    options: AuditOptions,
    requests: HashMap<String, RequestAudit>,
    workers: BTreeMap<String, WorkerRecord>,
    /// Bytes per KV block seen for each destination worker (all its blocks are one size).
    kv_block_bytes: HashMap<String, (u64, u64)>,
    /// Findings found while reading, with the request they belong to.
    findings: Vec<Finding>,
    /// Sequences of the events the projection would record as findings (violations, malformed).
    projection_finding_sequences: Vec<u64>,
    last_sequence: u64,
    /// The latest emitter time of any event read: "now" for the stuck check, in the same clocks as the events
    /// it is compared with (the log's stored times may be later, e.g. for events copied from another log).
    last_event_at_ns: u64,
    messages: u64,
}

fn finding(
    kind: FindingKind,
    request_id: &str,
    summary: String,
    events: Vec<FindingEvent>,
) -> Finding {
    Finding {
        kind,
        severity: if kind.is_error() { "error" } else { "notice" },
        request_id: request_id.to_string(),
        summary,
        events,
    }
}

impl Rebuild {
    pub fn new(options: AuditOptions) -> Rebuild {
        Rebuild {
            options,
            requests: HashMap::new(),
            workers: BTreeMap::new(),
            kv_block_bytes: HashMap::new(),
            findings: Vec::new(),
            projection_finding_sequences: Vec::new(),
            last_sequence: 0,
            last_event_at_ns: 0,
            messages: 0,
        }
    }

    /// Requests rebuilt so far.
    pub fn request_count(&self) -> usize {
        self.requests.len()
    }

    /// A request's record as the projection would hold it.
    pub fn request_record(&self, request_id: &str) -> Option<&RequestRecord> {
        self.requests.get(request_id).map(|audit| &audit.record)
    }

    /// Applies one message: the next in sequence order.
    pub fn observe(&mut self, message: &LogMessage) {
        self.messages += 1;
        self.last_sequence = message.sequence;
        let event = match message.event() {
            Ok(event) => event,
            Err(error) => {
                self.projection_finding_sequences.push(message.sequence);
                let id = message.subject.rsplit('.').next().unwrap_or_default();
                self.findings.push(finding(
                    FindingKind::Malformed,
                    id,
                    format!(
                        "the payload on {} does not decode: {error}",
                        message.subject
                    ),
                    vec![FindingEvent {
                        sequence: message.sequence,
                        kind: "malformed".into(),
                        at: wall_time(message.stored_at_ns),
                    }],
                ));
                return;
            }
        };
        self.last_event_at_ns = self.last_event_at_ns.max(event.timestamp_ns());
        if event.kind().is_worker_event() {
            let record = self.workers.entry(event.id().to_string()).or_default();
            let mut updated = record.clone();
            if fold_worker_event(&mut updated, &event) {
                *record = updated;
            } else if *record == WorkerRecord::default() {
                // The projection writes a worker row only for events it tracks; keep the rebuild the same.
                self.workers.remove(event.id());
            }
            return;
        }
        self.observe_request_event(message.sequence, &event);
    }

    fn observe_request_event(&mut self, sequence: u64, event: &Event) {
        let id = event.id();
        let partial_window = self.options.partial_window;
        let audit = self.requests.entry(id.to_string()).or_default();
        if audit.events.is_empty() && partial_window && event.kind() != EventKind::Received {
            audit.outside_window = true;
        }
        audit.events.push(EventRef {
            sequence,
            kind: event.kind(),
            at_ns: event.timestamp_ns(),
        });
        for worker in workers_named(event.body()) {
            if !audit.workers.iter().any(|known| known == worker) {
                audit.workers.push(worker.to_string());
            }
        }
        if audit.outside_window {
            return;
        }
        match audit.lifecycle.apply(event.body()) {
            Ok(outcome) => {
                if matches!(outcome, lifecycle::Applied::Advanced(_)) {
                    fold_request_event(&mut audit.record, event, sequence, &audit.lifecycle);
                    // As the projection does beside the fold: a routing takes the block size of its worker.
                    if let Body::Routed(routed) = event.body() {
                        audit.record.block_size_tokens = self
                            .workers
                            .get(&routed.decode_worker_id)
                            .map_or(0, |worker| worker.block_size_tokens);
                    }
                }
            }
            Err(violation) => {
                self.projection_finding_sequences.push(sequence);
                let context_from = audit.events.len().saturating_sub(5);
                let events = audit.events[context_from..]
                    .iter()
                    .map(EventRef::show)
                    .collect();
                self.findings.push(finding(
                    FindingKind::IllegalOrder,
                    id,
                    format!("event #{sequence} breaks the lifecycle: {violation}"),
                    events,
                ));
                return;
            }
        }
        let mut kv_findings = Vec::new();
        match event.body() {
            Body::Received(received) => audit.prompt_tokens = received.prompt_tokens,
            Body::PrefillQueued(queued) => {
                let destination = queued.kv_destination.clone().unwrap_or_default();
                let blocks = destination.block_ids.len() as u32;
                let block_size = destination.block_size_tokens;
                audit.open_prefill = Some(OpenPrefill {
                    queued_sequence: sequence,
                });
                audit.destination_blocks = Some(blocks);
                if block_size == 0 {
                    kv_findings.push(format!(
                        "PrefillQueued #{sequence} names a KV destination with a block size of 0"
                    ));
                } else {
                    let prompt_blocks = audit.prompt_tokens.div_ceil(block_size);
                    let cached_blocks = destination.cached_tokens / block_size;
                    let expected = prompt_blocks.saturating_sub(cached_blocks);
                    if blocks != expected {
                        kv_findings.push(format!(
                            "PrefillQueued #{sequence} reserves {blocks} KV blocks, but the {}-token prompt with {} cached tokens needs {expected} blocks of {block_size}",
                            audit.prompt_tokens, destination.cached_tokens
                        ));
                    }
                }
            }
            Body::PrefillStarted(started)
                if started.delivery_attempt > 1 && !audit.redelivery_reported =>
            {
                audit.redelivery_reported = true;
                self.findings.push(finding(
                    FindingKind::PrefillRedelivered,
                    id,
                    format!(
                        "the prefill job was delivered again (attempt {}, on {})",
                        started.delivery_attempt, started.prefill_worker_id
                    ),
                    audit.shown(&[EventKind::PrefillQueued, EventKind::PrefillStarted]),
                ));
            }
            Body::PrefillDone(_) | Body::Failed(_) | Body::Cancelled(_) | Body::Migrated(_) => {
                audit.open_prefill = None;
            }
            Body::KvTransferred(transferred) => {
                if let Some(destination_blocks) = audit.destination_blocks
                    && transferred.blocks != destination_blocks
                {
                    kv_findings.push(format!(
                        "KvTransferred #{sequence} moved {} blocks into a destination of {destination_blocks}",
                        transferred.blocks
                    ));
                }
                if transferred.blocks == 0 || transferred.bytes % u64::from(transferred.blocks) != 0
                {
                    kv_findings.push(format!(
                        "KvTransferred #{sequence} moved {} bytes in {} blocks: not a whole number of blocks",
                        transferred.bytes, transferred.blocks
                    ));
                } else {
                    let per_block = transferred.bytes / u64::from(transferred.blocks);
                    let (known, first_sequence) = *self
                        .kv_block_bytes
                        .entry(transferred.to_worker_id.clone())
                        .or_insert((per_block, sequence));
                    if known != per_block {
                        kv_findings.push(format!(
                            "KvTransferred #{sequence} moved {per_block} bytes per block to {}, where #{first_sequence} moved {known}",
                            transferred.to_worker_id
                        ));
                    }
                }
            }
            _ => {}
        }
        if !kv_findings.is_empty() {
            let audit = &self.requests[id];
            let events = audit.shown(&[
                EventKind::Received,
                EventKind::PrefillQueued,
                EventKind::KvTransferred,
            ]);
            for summary in kv_findings {
                self.findings.push(finding(
                    FindingKind::KvMismatch,
                    id,
                    summary,
                    events.clone(),
                ));
            }
        }
    }

    /// Ends the read: the checks that need the whole log (stuck, unfinished prefills, migrations), the filter,
    /// and the report.
    pub fn finish(mut self, source: &str) -> AuditReport {
        let log_end_ns = self.last_event_at_ns;
        let mut ids: Vec<&String> = self.requests.keys().collect();
        ids.sort();
        let mut report = AuditReport {
            source: source.to_string(),
            messages: self.messages,
            last_sequence: self.last_sequence,
            log_end: wall_time(log_end_ns),
            requests: 0,
            completed: 0,
            failed: 0,
            cancelled: 0,
            live: 0,
            began_before_window: 0,
            workers: self.workers.len(),
            findings: Vec::new(),
            projection: None,
        };
        let mut end_findings = Vec::new();
        for id in ids {
            let audit = &self.requests[id];
            if audit.outside_window {
                report.began_before_window += 1;
                continue;
            }
            report.requests += 1;
            let state = audit.lifecycle.state();
            match state {
                RequestState::Completed => report.completed += 1,
                RequestState::Failed => report.failed += 1,
                RequestState::Cancelled => report.cancelled += 1,
                _ => {}
            }
            let last_at_ns = audit.events.last().map(|event| event.at_ns).unwrap_or(0);
            let quiet_ns = log_end_ns.saturating_sub(last_at_ns);
            if state.is_live() {
                if quiet_ns > self.options.stuck_after_ns {
                    let waiting = match &audit.open_prefill {
                        Some(open) => format!(
                            ", waiting for the prefill queued at #{}",
                            open.queued_sequence
                        ),
                        None => String::new(),
                    };
                    end_findings.push(finding(
                        FindingKind::Stuck,
                        id,
                        format!(
                            "live in state {state:?} with no event for {} before the log ends (threshold {}){waiting}",
                            duration(quiet_ns),
                            duration(self.options.stuck_after_ns)
                        ),
                        audit.shown_ends(),
                    ));
                } else {
                    report.live += 1;
                }
            } else if let Some(open) = &audit.open_prefill
                && state == RequestState::Completed
            {
                end_findings.push(finding(
                    FindingKind::PrefillUnfinished,
                    id,
                    format!(
                        "PrefillQueued #{} has no PrefillDone, redelivery, failure or migration, yet the request completed",
                        open.queued_sequence
                    ),
                    audit.shown(&[
                        EventKind::PrefillQueued,
                        EventKind::PrefillStarted,
                        EventKind::PrefillDone,
                        EventKind::KvTransferred,
                        EventKind::DecodeStarted,
                        EventKind::Completed,
                    ]),
                ));
            }
            if audit.record.migrations > 0 {
                end_findings.push(finding(
                    FindingKind::Migrated,
                    id,
                    format!(
                        "moved {} time(s) to another decode worker; workers: {}",
                        audit.record.migrations,
                        audit.workers.join(", ")
                    ),
                    audit.shown(&[
                        EventKind::Routed,
                        EventKind::Migrated,
                        EventKind::DecodeStarted,
                        EventKind::Completed,
                        EventKind::Failed,
                        EventKind::Cancelled,
                    ]),
                ));
            }
        }
        self.findings.extend(end_findings);
        let filter = self.options.filter.clone();
        let requests = &self.requests;
        self.findings
            .retain(|finding| match requests.get(&finding.request_id) {
                Some(audit) => {
                    !audit.outside_window
                        && filter.matches(
                            &finding.request_id,
                            &audit.workers,
                            audit.lifecycle.state(),
                        )
                }
                // Malformed payloads and worker-level findings belong to no request: kept unless a request is asked for.
                None => filter.is_empty(),
            });
        self.findings.sort_by(|a, b| {
            let first = |f: &Finding| f.events.first().map(|e| e.sequence).unwrap_or(0);
            (!a.kind.is_error(), first(a), a.kind).cmp(&(!b.kind.is_error(), first(b), b.kind))
        });
        report.findings = std::mem::take(&mut self.findings);
        report
    }

    /// Compares the scheduler's projection with this rebuild (read up to the sequence the projection last
    /// applied); each difference becomes a finding. Call before [`Rebuild::finish`], then
    /// [`AuditReport::attach_projection`].
    pub fn compare_with_projection(
        &self,
        projection: &Projection,
        path: &str,
    ) -> Result<ProjectionCheck, ReplayError> {
        let last_applied = projection.last_applied()?;
        let stored = projection.requests(None, 0)?;
        let mut differences = Vec::new();
        let mut seen = 0usize;
        for (id, stored_record) in &stored {
            match self.requests.get(id) {
                Some(audit) => {
                    seen += 1;
                    if &audit.record != stored_record {
                        differences.push(finding(
                            FindingKind::ProjectionMismatch,
                            id,
                            describe_record_difference(stored_record, &audit.record),
                            audit.shown_ends(),
                        ));
                    }
                }
                None => differences.push(finding(
                    FindingKind::ProjectionMismatch,
                    id,
                    format!(
                        "the projection holds this request (state {}), the log up to #{last_applied} does not",
                        stored_record.state
                    ),
                    Vec::new(),
                )),
            }
        }
        let mut rebuilt_ids: Vec<&String> = self
            .requests
            .iter()
            .filter(|(_, audit)| audit.record != RequestRecord::default())
            .map(|(id, _)| id)
            .collect();
        rebuilt_ids.sort();
        for id in rebuilt_ids {
            if stored
                .binary_search_by(|(stored_id, _)| stored_id.cmp(id))
                .is_err()
            {
                differences.push(finding(
                    FindingKind::ProjectionMismatch,
                    id,
                    format!(
                        "the log holds this request (state {}), the projection does not",
                        self.requests[id].record.state
                    ),
                    self.requests[id].shown_ends(),
                ));
            }
        }
        let stored_workers = projection.workers()?;
        let rebuilt_workers: Vec<(String, WorkerRecord)> = self
            .workers
            .iter()
            .map(|(id, record)| (id.clone(), record.clone()))
            .collect();
        if stored_workers != rebuilt_workers {
            let stored_ids: Vec<&str> = stored_workers.iter().map(|(id, _)| id.as_str()).collect();
            for (id, record) in &rebuilt_workers {
                let stored_record = stored_workers
                    .iter()
                    .find(|(sid, _)| sid == id)
                    .map(|(_, r)| r);
                if stored_record != Some(record) {
                    differences.push(finding(
                        FindingKind::ProjectionMismatch,
                        id,
                        format!(
                            "worker record differs: projection {stored_record:?}, rebuild {record:?}"
                        ),
                        Vec::new(),
                    ));
                }
            }
            for id in stored_ids {
                if !self.workers.contains_key(id) {
                    differences.push(finding(
                        FindingKind::ProjectionMismatch,
                        id,
                        "the projection holds this worker, the log does not".into(),
                        Vec::new(),
                    ));
                }
            }
        }
        let stored_findings: Vec<u64> = projection.findings()?.iter().map(|f| f.sequence).collect();
        if stored_findings != self.projection_finding_sequences {
            differences.push(finding(
                FindingKind::ProjectionMismatch,
                "",
                format!(
                    "the projection's audit findings are at sequences {:?}, the rebuild's at {:?}",
                    stored_findings, self.projection_finding_sequences
                ),
                Vec::new(),
            ));
        }
        Ok(ProjectionCheck {
            comparison: ProjectionComparison {
                path: path.to_string(),
                last_applied_sequence: last_applied,
                requests_compared: seen,
                workers_compared: stored_workers.len(),
                differences: differences.len(),
            },
            findings: differences,
        })
    }
}

/// Names the fields in which two request records differ, from their `Debug` forms, so fields added to the record
/// later are compared too.
fn describe_record_difference(stored: &RequestRecord, rebuilt: &RequestRecord) -> String {
    let stored_text = format!("{stored:#?}");
    let rebuilt_text = format!("{rebuilt:#?}");
    let fields: Vec<String> = stored_text
        .lines()
        .zip(rebuilt_text.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| {
            let a = a.trim().trim_end_matches(',');
            let b = b.trim().trim_end_matches(',');
            let name = a.split(':').next().unwrap_or(a);
            let log_value = b.split_once(':').map_or(b, |(_, value)| value.trim());
            format!("{a} in the projection, {log_value} from the log (field {name})")
        })
        .collect();
    if fields.is_empty() {
        "the records differ".into()
    } else {
        format!("the projection's record differs: {}", fields.join("; "))
    }
}
