//! The scheduler's redb projections of the log (DESIGN.md §4): requests, their events, workers, audit findings,
//! and the last applied stream sequence.
//!
//! Every message is applied in one redb write transaction together with its stream sequence, and only then
//! acknowledged (by [`projector::run_projector`]): a crash before the commit leaves no trace and the message is
//! delivered again; a crash after the commit and before the ack redelivers a message whose sequence is at or
//! below the stored one, which is skipped. So after `kill -9` at any point the projection resumes and ends equal
//! to one built from scratch. An event that breaks the request lifecycle, or a payload that does not decode, is
//! recorded as an audit finding with its bytes; it never stops the projection.
//!
//! `RequestLifecycle` is not stored: it is rebuilt from a request's rows in `events_by_request` when an event
//! for that request arrives, and kept in a bounded in-memory cache that is only updated after a commit.

pub mod apply;
mod indexes;
pub mod projector;
pub mod tables;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};
use tandem_events::Event;
use tandem_events::lifecycle::{self, RequestLifecycle, RequestState};
use tandem_events::log::LogMessage;
use tandem_events::schema::Body;

use tables::{
    ACTIVE_REQUESTS, AUDIT_FINDINGS, EVENTS_BY_REQUEST, META, META_LAST_APPLIED_SEQUENCE,
    META_SCHEMA_VERSION, PREFIX_INDEX, PROJECTION_SCHEMA_VERSION, REQUESTS, UNROUTED,
    WORKER_BLOCKS, WORKERS,
};
pub use tables::{AuditFinding, RequestRecord, WorkerRecord};

/// Lifecycles kept in memory; past this the cache is emptied and refilled lazily from `events_by_request`.
const MAX_CACHED_LIFECYCLES: usize = 16_384;

/// Errors of the projection's storage. Bad events are not errors: they become audit findings.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("projection at {path}: {operation} failed: {reason}")]
    Storage {
        path: String,
        operation: &'static str,
        reason: String,
    },
    #[error(
        "projection at {path} has layout version {found}, this build writes {PROJECTION_SCHEMA_VERSION} (delete the file: it is rebuilt from the log)"
    )]
    SchemaVersion { path: String, found: u64 },
    #[error("projection at {path}: the {table} row {key} does not decode: {reason}")]
    CorruptRecord {
        path: String,
        table: &'static str,
        key: String,
        reason: String,
    },
    #[error("event log: {0}")]
    Log(#[from] tandem_events::log::LogError),
}

/// What applying one message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Its sequence is at or below the last applied one: a redelivery, nothing changed.
    AlreadyApplied,
    /// A request event the lifecycle accepted (an advance, an idempotent repeat, or work after a cancellation).
    Request {
        request_id: String,
        outcome: lifecycle::Applied,
    },
    /// A worker event.
    Worker { worker_id: String },
    /// The event was recorded as an audit finding (lifecycle violation or malformed payload).
    Finding { violation: String },
}

/// A canonical dump of every table, in key order, for comparing two projections.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProjectionSnapshot {
    pub requests: Vec<(String, RequestRecord)>,
    pub events_by_request: Vec<((String, u64), Vec<u8>)>,
    pub workers: Vec<(String, WorkerRecord)>,
    pub prefix_index: Vec<(u64, String)>,
    pub active_requests: Vec<ActiveRequest>,
    pub unrouted: Vec<(String, u32)>,
    pub findings: Vec<AuditFinding>,
    pub last_applied_sequence: u64,
    pub schema_version: u64,
}

/// A live request on its decode worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRequest {
    pub decode_worker_id: String,
    pub request_id: String,
    /// KV blocks it holds there (prompt plus checkpointed tokens).
    pub kv_blocks: u32,
}

/// The projection in a redb file: the one writer. Its reads are [`ProjectionReader`]'s (through `Deref`).
pub struct Projection {
    reader: ProjectionReader,
    /// Lifecycles of requests as of the last commit; absent entries are rebuilt from `events_by_request`.
    lifecycles: HashMap<String, RequestLifecycle>,
}

/// Read access to a projection, cheap to clone and usable while the projector writes (redb readers see the last
/// committed transaction): what the scheduler's decisions and its query API read.
#[derive(Clone)]
pub struct ProjectionReader {
    path: PathBuf,
    db: Arc<Database>,
}

impl std::ops::Deref for Projection {
    type Target = ProjectionReader;

    fn deref(&self) -> &ProjectionReader {
        &self.reader
    }
}

impl std::fmt::Debug for Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projection")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Projection {
    /// Opens the projection file, creating it (and its tables) when absent.
    pub fn open(path: &Path) -> Result<Projection, ProjectionError> {
        let display = path.display().to_string();
        let storage = |operation: &'static str| {
            let display = display.clone();
            move |error: &dyn std::fmt::Display| ProjectionError::Storage {
                path: display,
                operation,
                reason: error.to_string(),
            }
        };
        let db = Database::create(path).map_err(|e| storage("open")(&e))?;
        let txn = db.begin_write().map_err(|e| storage("begin write")(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| storage("open meta")(&e))?;
            let found = meta
                .get(META_SCHEMA_VERSION)
                .map_err(|e| storage("read meta")(&e))?
                .map(|v| v.value());
            match found {
                None => {
                    meta.insert(META_SCHEMA_VERSION, PROJECTION_SCHEMA_VERSION)
                        .map_err(|e| storage("write meta")(&e))?;
                }
                Some(PROJECTION_SCHEMA_VERSION) => {}
                Some(found) => {
                    return Err(ProjectionError::SchemaVersion {
                        path: display,
                        found,
                    });
                }
            }
            // Created up front so reads never meet a missing table.
            txn.open_table(REQUESTS)
                .map_err(|e| storage("create requests")(&e))?;
            txn.open_table(EVENTS_BY_REQUEST)
                .map_err(|e| storage("create events_by_request")(&e))?;
            txn.open_table(WORKERS)
                .map_err(|e| storage("create workers")(&e))?;
            txn.open_table(AUDIT_FINDINGS)
                .map_err(|e| storage("create audit_findings")(&e))?;
            txn.open_table(PREFIX_INDEX)
                .map_err(|e| storage("create prefix_index")(&e))?;
            txn.open_table(WORKER_BLOCKS)
                .map_err(|e| storage("create worker_blocks")(&e))?;
            txn.open_table(ACTIVE_REQUESTS)
                .map_err(|e| storage("create active_requests")(&e))?;
            txn.open_table(UNROUTED)
                .map_err(|e| storage("create unrouted")(&e))?;
        }
        txn.commit().map_err(|e| storage("commit")(&e))?;
        Ok(Projection {
            reader: ProjectionReader {
                path: path.to_path_buf(),
                db: Arc::new(db),
            },
            lifecycles: HashMap::new(),
        })
    }

    /// A reader of this projection for another task.
    pub fn reader(&self) -> ProjectionReader {
        self.reader.clone()
    }

    /// Applies one message in its own transaction.
    pub fn apply(&mut self, message: &LogMessage) -> Result<Applied, ProjectionError> {
        let mut outcomes = self.apply_batch(std::slice::from_ref(message))?;
        Ok(outcomes.pop().unwrap_or(Applied::AlreadyApplied))
    }

    /// Applies messages in order in ONE transaction, with the last applied sequence stored in it; a message at or
    /// below the stored sequence (or below one earlier in the batch) is skipped. Nothing is kept if it fails.
    ///
    /// Callers pass messages in sequence order and skip none, since a skipped one would later count as a
    /// redelivery; [`projector::run_projector`] reads any gap from the log before applying.
    pub fn apply_batch(
        &mut self,
        messages: &[LogMessage],
    ) -> Result<Vec<Applied>, ProjectionError> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| self.storage("begin write", e))?;
        // Lifecycles touched by this batch; merged into the cache only after the commit, so a failed commit
        // leaves the cache matching the file.
        let mut staged: HashMap<String, RequestLifecycle> = HashMap::new();
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut last_applied = self.read_last_applied(&txn)?;
        for message in messages {
            if message.sequence <= last_applied {
                outcomes.push(Applied::AlreadyApplied);
                continue;
            }
            outcomes.push(self.apply_in(&txn, &mut staged, message)?);
            last_applied = message.sequence;
        }
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| self.storage("open meta", e))?;
            meta.insert(META_LAST_APPLIED_SEQUENCE, last_applied)
                .map_err(|e| self.storage("write meta", e))?;
        }
        txn.commit().map_err(|e| self.storage("commit", e))?;
        if self.lifecycles.len() + staged.len() > MAX_CACHED_LIFECYCLES {
            self.lifecycles.clear();
        }
        self.lifecycles.extend(staged);
        Ok(outcomes)
    }

    fn read_last_applied(&self, txn: &WriteTransaction) -> Result<u64, ProjectionError> {
        let meta = txn
            .open_table(META)
            .map_err(|e| self.storage("open meta", e))?;
        let last = meta
            .get(META_LAST_APPLIED_SEQUENCE)
            .map_err(|e| self.storage("read meta", e))?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok(last)
    }

    fn apply_in(
        &self,
        txn: &WriteTransaction,
        staged: &mut HashMap<String, RequestLifecycle>,
        message: &LogMessage,
    ) -> Result<Applied, ProjectionError> {
        let event = match message.event() {
            Ok(event) => event,
            Err(error) => {
                let finding = AuditFinding {
                    sequence: message.sequence,
                    request_id: String::new(),
                    violation: error.to_string(),
                    event_kind: "malformed".into(),
                    subject: message.subject.clone(),
                    event_bytes: message.payload.to_vec(),
                };
                return self.record_finding(txn, finding);
            }
        };
        let id = event.id().to_string();
        if event.kind().is_worker_event() {
            return self.apply_worker_event(txn, &event, message, id);
        }
        let mut lifecycle = match staged.remove(&id) {
            Some(lifecycle) => lifecycle,
            None => match self.lifecycles.get(&id) {
                Some(lifecycle) => lifecycle.clone(),
                None => self.rebuild_lifecycle(txn, &id)?,
            },
        };
        let outcome = lifecycle.apply(event.body());
        let result = match outcome {
            Ok(outcome) => {
                let mut events = txn
                    .open_table(EVENTS_BY_REQUEST)
                    .map_err(|e| self.storage("open events_by_request", e))?;
                events
                    .insert((id.as_str(), message.sequence), message.payload.as_ref())
                    .map_err(|e| self.storage("write events_by_request", e))?;
                if matches!(outcome, lifecycle::Applied::Advanced(_)) {
                    let mut requests = txn
                        .open_table(REQUESTS)
                        .map_err(|e| self.storage("open requests", e))?;
                    let mut record = match requests
                        .get(id.as_str())
                        .map_err(|e| self.storage("read requests", e))?
                    {
                        Some(bytes) => RequestRecord::decode(bytes.value())
                            .map_err(|e| self.corrupt("requests", &id, e))?,
                        None => RequestRecord::default(),
                    };
                    let previous_worker = record.decode_worker_id.clone();
                    apply::fold_request_event(&mut record, &event, message.sequence, &lifecycle);
                    if let Body::Routed(routed) = event.body() {
                        record.block_size_tokens =
                            self.worker_block_size(txn, &routed.decode_worker_id)?;
                    }
                    requests
                        .insert(id.as_str(), record.encode_to_vec().as_slice())
                        .map_err(|e| self.storage("write requests", e))?;
                    drop(requests);
                    indexes::track_request(txn, &id, &previous_worker, &record, lifecycle.state())
                        .map_err(|e| self.storage("update request indexes", e))?;
                }
                Ok(Applied::Request {
                    request_id: id.clone(),
                    outcome,
                })
            }
            Err(violation) => {
                tracing::warn!(request_id = %id, sequence = message.sequence, %violation, "lifecycle violation on the log");
                let finding = AuditFinding {
                    sequence: message.sequence,
                    request_id: id.clone(),
                    violation: violation.to_string(),
                    event_kind: event.kind().as_str().into(),
                    subject: message.subject.clone(),
                    event_bytes: message.payload.to_vec(),
                };
                self.record_finding(txn, finding)
            }
        };
        // A violation leaves the lifecycle unchanged, so it is staged either way.
        staged.insert(id, lifecycle);
        result
    }

    fn apply_worker_event(
        &self,
        txn: &WriteTransaction,
        event: &Event,
        message: &LogMessage,
        worker_id: String,
    ) -> Result<Applied, ProjectionError> {
        let mut workers = txn
            .open_table(WORKERS)
            .map_err(|e| self.storage("open workers", e))?;
        let mut record = match workers
            .get(worker_id.as_str())
            .map_err(|e| self.storage("read workers", e))?
        {
            Some(bytes) => WorkerRecord::decode(bytes.value())
                .map_err(|e| self.corrupt("workers", &worker_id, e))?,
            None => WorkerRecord::default(),
        };
        if apply::fold_worker_event(&mut record, event) {
            workers
                .insert(worker_id.as_str(), record.encode_to_vec().as_slice())
                .map_err(|e| self.storage("write workers", e))?;
        } else {
            tracing::trace!(sequence = message.sequence, kind = %event.kind(), "worker event not projected");
        }
        drop(workers);
        let indexed = match event.body() {
            Body::KvBlocksStored(stored) => {
                indexes::store_blocks(txn, &worker_id, &stored.block_hashes)
            }
            Body::KvBlocksRemoved(removed) => {
                indexes::remove_blocks(txn, &worker_id, &removed.block_hashes)
            }
            Body::WorkerJoined(_) | Body::WorkerLeft(_) | Body::WorkerLost(_) => {
                indexes::forget_worker_blocks(txn, &worker_id)
            }
            _ => Ok(()),
        };
        indexed.map_err(|e| self.storage("update the prefix index", e))?;
        Ok(Applied::Worker { worker_id })
    }

    /// The block size a decode worker announced when it joined (0 when it has not).
    fn worker_block_size(
        &self,
        txn: &WriteTransaction,
        worker_id: &str,
    ) -> Result<u32, ProjectionError> {
        let workers = txn
            .open_table(WORKERS)
            .map_err(|e| self.storage("open workers", e))?;
        let found = workers
            .get(worker_id)
            .map_err(|e| self.storage("read workers", e))?;
        match found {
            Some(bytes) => Ok(WorkerRecord::decode(bytes.value())
                .map_err(|e| self.corrupt("workers", worker_id, e))?
                .block_size_tokens),
            None => Ok(0),
        }
    }

    fn record_finding(
        &self,
        txn: &WriteTransaction,
        finding: AuditFinding,
    ) -> Result<Applied, ProjectionError> {
        let mut findings = txn
            .open_table(AUDIT_FINDINGS)
            .map_err(|e| self.storage("open audit_findings", e))?;
        findings
            .insert(finding.sequence, finding.encode_to_vec().as_slice())
            .map_err(|e| self.storage("write audit_findings", e))?;
        Ok(Applied::Finding {
            violation: finding.violation,
        })
    }

    /// The request's lifecycle, replayed from the events the projection accepted for it.
    fn rebuild_lifecycle(
        &self,
        txn: &WriteTransaction,
        request_id: &str,
    ) -> Result<RequestLifecycle, ProjectionError> {
        let events = txn
            .open_table(EVENTS_BY_REQUEST)
            .map_err(|e| self.storage("open events_by_request", e))?;
        let mut lifecycle = RequestLifecycle::default();
        for row in events
            .range((request_id, 0)..=(request_id, u64::MAX))
            .map_err(|e| self.storage("read events_by_request", e))?
        {
            let (key, bytes) = row.map_err(|e| self.storage("read events_by_request", e))?;
            let sequence = key.value().1;
            let event = Event::decode(bytes.value())
                .map_err(|e| self.corrupt("events_by_request", sequence, e))?;
            // Every stored event was accepted when it was applied, and `apply` is deterministic, so replaying
            // them in sequence order reaches the same lifecycle; a rejection here means the file is not ours.
            lifecycle
                .apply(event.body())
                .map_err(|e| self.corrupt("events_by_request", sequence, e))?;
        }
        Ok(lifecycle)
    }
}

impl ProjectionReader {
    fn storage(&self, operation: &'static str, error: impl std::fmt::Display) -> ProjectionError {
        ProjectionError::Storage {
            path: self.path.display().to_string(),
            operation,
            reason: error.to_string(),
        }
    }

    fn corrupt(
        &self,
        table: &'static str,
        key: impl std::fmt::Display,
        error: impl std::fmt::Display,
    ) -> ProjectionError {
        ProjectionError::CorruptRecord {
            path: self.path.display().to_string(),
            table,
            key: key.to_string(),
            reason: error.to_string(),
        }
    }

    /// The stream sequence of the last applied message (0 when none).
    pub fn last_applied(&self) -> Result<u64, ProjectionError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.storage("begin read", e))?;
        let meta = txn
            .open_table(META)
            .map_err(|e| self.storage("open meta", e))?;
        let last = meta
            .get(META_LAST_APPLIED_SEQUENCE)
            .map_err(|e| self.storage("read meta", e))?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok(last)
    }

    /// One request's record.
    pub fn request(&self, request_id: &str) -> Result<Option<RequestRecord>, ProjectionError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.storage("begin read", e))?;
        let requests = txn
            .open_table(REQUESTS)
            .map_err(|e| self.storage("open requests", e))?;
        let found = requests
            .get(request_id)
            .map_err(|e| self.storage("read requests", e))?;
        match found {
            Some(bytes) => Ok(Some(
                RequestRecord::decode(bytes.value())
                    .map_err(|e| self.corrupt("requests", request_id, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Requests in `state` (any state when `None`) received at or after `since_ns`, in id order (ULIDs sort by
    /// time). A scan of the table: an index by state waits for a caller that needs it.
    pub fn requests(
        &self,
        state: Option<RequestState>,
        since_ns: u64,
    ) -> Result<Vec<(String, RequestRecord)>, ProjectionError> {
        let wanted_state = state.map(|state| format!("{state:?}"));
        Ok(self
            .all_requests()?
            .into_iter()
            .filter(|(_, record)| {
                wanted_state
                    .as_deref()
                    .is_none_or(|wanted| record.state == wanted)
                    && record.received_at_ns.unwrap_or(0) >= since_ns
            })
            .collect())
    }

    fn all_requests(&self) -> Result<Vec<(String, RequestRecord)>, ProjectionError> {
        self.read_all(REQUESTS, "requests", |key: &str, bytes: &[u8]| {
            RequestRecord::decode(bytes).map(|record| (key.to_string(), record))
        })
    }

    /// Every worker seen on the log, in id order.
    pub fn workers(&self) -> Result<Vec<(String, WorkerRecord)>, ProjectionError> {
        self.read_all(WORKERS, "workers", |key: &str, bytes: &[u8]| {
            WorkerRecord::decode(bytes).map(|record| (key.to_string(), record))
        })
    }

    /// Requests waiting for a routing, with the attempt each waits for, in id order.
    pub fn unrouted(&self) -> Result<Vec<(String, u32)>, ProjectionError> {
        self.read_all(UNROUTED, "unrouted", |key: &str, attempt: u32| {
            Ok::<_, std::convert::Infallible>((key.to_string(), attempt))
        })
    }

    /// Live routed requests: (decode worker id, request id, KV blocks), by worker then request.
    pub fn active_requests(&self) -> Result<Vec<ActiveRequest>, ProjectionError> {
        self.read_all(
            ACTIVE_REQUESTS,
            "active_requests",
            |key: (&str, &str), kv_blocks: u32| {
                Ok::<_, std::convert::Infallible>(ActiveRequest {
                    decode_worker_id: key.0.to_string(),
                    request_id: key.1.to_string(),
                    kv_blocks,
                })
            },
        )
    }

    /// For each decode worker caching a prefix of `block_hashes` (chained hashes of a prompt's full blocks, in
    /// order), how many leading blocks it holds. Workers holding none are absent.
    pub fn cached_prefix_blocks(
        &self,
        block_hashes: &[u64],
    ) -> Result<HashMap<String, u32>, ProjectionError> {
        let mut overlaps: HashMap<String, u32> = HashMap::new();
        // Workers that held every block so far; a chained hash covers its whole prefix, so a worker missing block
        // i cannot use blocks after it.
        let mut still_matching: Option<Vec<String>> = None;
        for (position, holders) in self.prefix_holders(block_hashes)?.into_iter().enumerate() {
            let matching: Vec<String> = holders
                .into_iter()
                .filter(|worker_id| {
                    still_matching
                        .as_ref()
                        .is_none_or(|matching| matching.contains(worker_id))
                })
                .collect();
            if matching.is_empty() {
                break;
            }
            for worker_id in &matching {
                overlaps.insert(worker_id.clone(), position as u32 + 1);
            }
            still_matching = Some(matching);
        }
        Ok(overlaps)
    }

    /// For each of `block_hashes`, the decode workers that announced it cached (in order; empty where none did).
    pub fn prefix_holders(
        &self,
        block_hashes: &[u64],
    ) -> Result<Vec<Vec<String>>, ProjectionError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.storage("begin read", e))?;
        let prefix_index = txn
            .open_table(PREFIX_INDEX)
            .map_err(|e| self.storage("open prefix_index", e))?;
        let mut holders = Vec::with_capacity(block_hashes.len());
        for &hash in block_hashes {
            let mut workers = Vec::new();
            for row in prefix_index
                .range((hash, "")..)
                .map_err(|e| self.storage("read prefix_index", e))?
            {
                let (key, _) = row.map_err(|e| self.storage("read prefix_index", e))?;
                let (row_hash, worker_id) = key.value();
                if row_hash != hash {
                    break;
                }
                workers.push(worker_id.to_string());
            }
            holders.push(workers);
        }
        Ok(holders)
    }

    /// Blocks each decode worker has announced as cached, by worker id.
    pub fn cached_block_counts(&self) -> Result<HashMap<String, u64>, ProjectionError> {
        let mut counts: HashMap<String, u64> = HashMap::new();
        let rows = self.read_all(WORKER_BLOCKS, "worker_blocks", |key: (&str, u64), _: ()| {
            Ok::<_, std::convert::Infallible>(key.0.to_string())
        })?;
        for worker_id in rows {
            *counts.entry(worker_id).or_default() += 1;
        }
        Ok(counts)
    }

    /// A request's accepted events in log order, with their sequences.
    pub fn request_events(&self, request_id: &str) -> Result<Vec<(u64, Event)>, ProjectionError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.storage("begin read", e))?;
        let events = txn
            .open_table(EVENTS_BY_REQUEST)
            .map_err(|e| self.storage("open events_by_request", e))?;
        let mut found = Vec::new();
        for row in events
            .range((request_id, 0)..=(request_id, u64::MAX))
            .map_err(|e| self.storage("read events_by_request", e))?
        {
            let (key, bytes) = row.map_err(|e| self.storage("read events_by_request", e))?;
            let sequence = key.value().1;
            let event = Event::decode(bytes.value())
                .map_err(|e| self.corrupt("events_by_request", sequence, e))?;
            found.push((sequence, event));
        }
        Ok(found)
    }

    /// The event stored for `request_id` at `sequence` (e.g. its `Received`, at the record's `received_sequence`).
    pub fn request_event(
        &self,
        request_id: &str,
        sequence: u64,
    ) -> Result<Option<Event>, ProjectionError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.storage("begin read", e))?;
        let events = txn
            .open_table(EVENTS_BY_REQUEST)
            .map_err(|e| self.storage("open events_by_request", e))?;
        let found = events
            .get((request_id, sequence))
            .map_err(|e| self.storage("read events_by_request", e))?;
        match found {
            Some(bytes) => {
                Ok(Some(Event::decode(bytes.value()).map_err(|e| {
                    self.corrupt("events_by_request", sequence, e)
                })?))
            }
            None => Ok(None),
        }
    }

    /// Every audit finding, in sequence order.
    pub fn findings(&self) -> Result<Vec<AuditFinding>, ProjectionError> {
        self.read_all(AUDIT_FINDINGS, "audit_findings", |_: u64, bytes: &[u8]| {
            AuditFinding::decode(bytes)
        })
    }

    /// Every table in key order: two projections of the same log give equal snapshots.
    pub fn snapshot(&self) -> Result<ProjectionSnapshot, ProjectionError> {
        let events_by_request = self.read_all(
            EVENTS_BY_REQUEST,
            "events_by_request",
            |key: (&str, u64), bytes: &[u8]| {
                Ok::<_, std::convert::Infallible>(((key.0.to_string(), key.1), bytes.to_vec()))
            },
        )?;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.storage("begin read", e))?;
        let meta = txn
            .open_table(META)
            .map_err(|e| self.storage("open meta", e))?;
        let read_meta = |key: &str| -> Result<u64, ProjectionError> {
            Ok(meta
                .get(key)
                .map_err(|e| self.storage("read meta", e))?
                .map(|v| v.value())
                .unwrap_or(0))
        };
        let prefix_index =
            self.read_all(PREFIX_INDEX, "prefix_index", |key: (u64, &str), _: ()| {
                Ok::<_, std::convert::Infallible>((key.0, key.1.to_string()))
            })?;
        Ok(ProjectionSnapshot {
            requests: self.all_requests()?,
            events_by_request,
            workers: self.workers()?,
            prefix_index,
            active_requests: self.active_requests()?,
            unrouted: self.unrouted()?,
            findings: self.findings()?,
            last_applied_sequence: read_meta(META_LAST_APPLIED_SEQUENCE)?,
            schema_version: read_meta(META_SCHEMA_VERSION)?,
        })
    }

    /// Reads a whole table in key order, decoding each row with `decode`.
    fn read_all<K, V, T, E>(
        &self,
        table: redb::TableDefinition<K, V>,
        table_name: &'static str,
        decode: impl for<'a> Fn(K::SelfType<'a>, V::SelfType<'a>) -> Result<T, E>,
    ) -> Result<Vec<T>, ProjectionError>
    where
        K: redb::Key + 'static,
        V: redb::Value + 'static,
        E: std::fmt::Display,
    {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| self.storage("begin read", e))?;
        let table = txn
            .open_table(table)
            .map_err(|e| self.storage("open table", e))?;
        let mut rows = Vec::new();
        for row in table.iter().map_err(|e| self.storage("read table", e))? {
            let (key, value) = row.map_err(|e| self.storage("read table", e))?;
            let row_number = rows.len();
            rows.push(
                decode(key.value(), value.value())
                    .map_err(|e| self.corrupt(table_name, format!("#{row_number}"), e))?,
            );
        }
        Ok(rows)
    }
}
