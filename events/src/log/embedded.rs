//! The embedded backend of [`EventLog`]: the log in one process, persisted in a redb file under a data dir, with
//! the same semantics as the JetStream backend (dedup window, ordered reads, durable pull consumers, expiring KV).
//!
//! All writes go through one writer thread that commits whatever has queued up in a single redb transaction
//! (group commit): every append is durable (fsync'd) before it is acknowledged, and concurrent appenders share
//! the cost of the sync. Consumer state (deliveries, acks) and KV entries are committed without a sync of their
//! own: they become durable with the next append, and a crash before that only causes redeliveries. redb's commits are atomic, so a crash mid-write leaves the last committed state: a torn
//! tail is rolled back on open, never read as a message.
//!
//! A consumer's durable state is its cursor (the next sequence it has not looked at) and the messages it has
//! delivered but not finished, with their delivery counts. Every matching message below the cursor that is not
//! pending is finished (acked, termed, or given up after `max_deliver`). After a restart, pending messages are
//! redelivered at once, since the process that held them is gone. (`remove_after_idle` is not applied here: one
//! process owns the embedded log, so its consumers do not pile up.)

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::{
    AckHandle, AckKind, AppendAck, Consumer, ConsumerConfig, Delivery, EventLog, KvBucket,
    LogError, LogMessage, OutgoingMessage, StartAt,
};
use crate::event::now_ns;
use crate::subjects::matches_any;

/// sequence → (stored_at_ns, subject, dedup_id, payload)
const MESSAGES: TableDefinition<u64, (u64, &str, &str, &[u8])> = TableDefinition::new("messages");
/// consumer name → next sequence to look at
const CONSUMER_CURSORS: TableDefinition<&str, u64> = TableDefinition::new("consumer_cursors");
/// (consumer name, sequence) → deliveries so far, for delivered but unfinished messages
const CONSUMER_PENDING: TableDefinition<(&str, u64), u32> =
    TableDefinition::new("consumer_pending");
/// (bucket, key) → (expires_at_ns, value)
const KV_ENTRIES: TableDefinition<(&str, &str), (u64, &[u8])> = TableDefinition::new("kv_entries");

/// Most write operations folded into one transaction.
const MAX_GROUP_COMMIT_OPS: usize = 4096;

/// How the embedded log behaves.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Appends with a dedup id seen within this window are dropped as duplicates.
    pub duplicate_window: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// The event log in a redb file under a data dir.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: Arc<Database>,
    writer: Mutex<Option<mpsc::Sender<WriteOp>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    last_sequence: Arc<AtomicU64>,
    /// Bumped on every append and every nak, so waiting fetches look again.
    changes: Arc<watch::Sender<u64>>,
    consumers: Mutex<HashMap<String, Arc<Mutex<ConsumerState>>>>,
    /// Makes a key-value claim's read and write one step: the embedded log has one process, so a process-wide
    /// lock is as atomic as JetStream's compare-and-set.
    kv_claims: tokio::sync::Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer thread; joining it releases its handle on the database file, so the
        // same data dir can be opened again right away.
        if let Ok(mut writer) = self.writer.lock() {
            writer.take();
        }
        if let Ok(mut thread) = self.writer_thread.lock()
            && let Some(thread) = thread.take()
        {
            let _ = thread.join();
        }
    }
}

enum WriteOp {
    Append {
        messages: Vec<OutgoingMessage>,
        reply: oneshot::Sender<Result<Vec<AppendAck>, LogError>>,
    },
    Consumer {
        name: String,
        cursor: Option<u64>,
        set_pending: Vec<(u64, u32)>,
        remove_pending: Vec<u64>,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    KvPut {
        bucket: String,
        key: String,
        /// `None` deletes the key.
        entry: Option<(u64, Bytes)>,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

impl WriteOp {
    fn fail(self, error: LogError) {
        match self {
            WriteOp::Append { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            WriteOp::Consumer { reply, .. } | WriteOp::KvPut { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

fn storage_error(path: &Path, operation: &'static str, error: impl Into<redb::Error>) -> LogError {
    LogError::Embedded {
        path: path.display().to_string(),
        operation,
        reason: error.into().to_string(),
    }
}

impl EmbeddedLog {
    /// Opens (or creates) the log under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<EmbeddedLog, LogError> {
        EmbeddedLog::open_with(data_dir, EmbeddedOptions::default())
    }

    pub fn open_with(data_dir: &Path, options: EmbeddedOptions) -> Result<EmbeddedLog, LogError> {
        std::fs::create_dir_all(data_dir).map_err(|error| LogError::Embedded {
            path: data_dir.display().to_string(),
            operation: "create data dir",
            reason: error.to_string(),
        })?;
        let path = data_dir.join("events.redb");
        let db = Database::create(&path).map_err(|error| storage_error(&path, "open", error))?;
        let (last_sequence, last_stored_at_ns, dedup) =
            initialise(&db, &path, options.duplicate_window)?;
        let db = Arc::new(db);
        let last_sequence = Arc::new(AtomicU64::new(last_sequence));
        let changes = Arc::new(watch::Sender::new(0u64));
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            path: path.clone(),
            db: Arc::clone(&db),
            last_sequence: Arc::clone(&last_sequence),
            changes: Arc::clone(&changes),
            dedup,
            last_stored_at_ns,
            duplicate_window_ns: u64::try_from(options.duplicate_window.as_nanos())
                .unwrap_or(u64::MAX),
        };
        let writer_thread = std::thread::Builder::new()
            .name("tandem-log-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|error| LogError::Embedded {
                path: path.display().to_string(),
                operation: "start writer thread",
                reason: error.to_string(),
            })?;
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                path,
                db,
                writer: Mutex::new(Some(sender)),
                writer_thread: Mutex::new(Some(writer_thread)),
                last_sequence,
                changes,
                consumers: Mutex::new(HashMap::new()),
                kv_claims: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// Creates the tables, finds the last sequence, and rebuilds the dedup window from the tail of the log.
fn initialise(
    db: &Database,
    path: &Path,
    window: Duration,
) -> Result<(u64, u64, DedupWindow), LogError> {
    let txn = db
        .begin_write()
        .map_err(|e| storage_error(path, "open", e))?;
    {
        txn.open_table(MESSAGES)
            .map_err(|e| storage_error(path, "open", e))?;
        txn.open_table(CONSUMER_CURSORS)
            .map_err(|e| storage_error(path, "open", e))?;
        txn.open_table(CONSUMER_PENDING)
            .map_err(|e| storage_error(path, "open", e))?;
        txn.open_table(KV_ENTRIES)
            .map_err(|e| storage_error(path, "open", e))?;
    }
    txn.commit().map_err(|e| storage_error(path, "open", e))?;

    let read = db
        .begin_read()
        .map_err(|e| storage_error(path, "open", e))?;
    let messages = read
        .open_table(MESSAGES)
        .map_err(|e| storage_error(path, "open", e))?;
    let (last_sequence, last_stored_at_ns) = messages
        .last()
        .map_err(|e| storage_error(path, "open", e))?
        .map_or((0, 0), |(sequence, record)| {
            (sequence.value(), record.value().0)
        });
    let window_start_ns =
        now_ns().saturating_sub(u64::try_from(window.as_nanos()).unwrap_or(u64::MAX));
    let mut recent = Vec::new();
    for entry in messages
        .range::<u64>(..)
        .map_err(|e| storage_error(path, "open", e))?
        .rev()
    {
        let (sequence, record) = entry.map_err(|e| storage_error(path, "open", e))?;
        let (stored_at_ns, _, dedup_id, _) = record.value();
        if stored_at_ns < window_start_ns {
            break;
        }
        recent.push((stored_at_ns, dedup_id.to_string(), sequence.value()));
    }
    let mut dedup = DedupWindow::default();
    for (stored_at_ns, dedup_id, sequence) in recent.into_iter().rev() {
        dedup.insert(dedup_id, sequence, stored_at_ns);
    }
    Ok((last_sequence, last_stored_at_ns, dedup))
}

/// Dedup ids seen within the window, oldest first for pruning.
#[derive(Default)]
struct DedupWindow {
    by_id: HashMap<String, u64>,
    by_age: VecDeque<(u64, String)>,
}

impl DedupWindow {
    fn insert(&mut self, dedup_id: String, sequence: u64, stored_at_ns: u64) {
        self.by_id.insert(dedup_id.clone(), sequence);
        self.by_age.push_back((stored_at_ns, dedup_id));
    }

    fn prune(&mut self, oldest_kept_ns: u64) {
        while let Some((stored_at_ns, _)) = self.by_age.front() {
            if *stored_at_ns >= oldest_kept_ns {
                break;
            }
            if let Some((_, dedup_id)) = self.by_age.pop_front() {
                self.by_id.remove(&dedup_id);
            }
        }
    }
}

/// The single writer: owns the sequence counter and the dedup window.
struct Writer {
    path: PathBuf,
    db: Arc<Database>,
    last_sequence: Arc<AtomicU64>,
    changes: Arc<watch::Sender<u64>>,
    dedup: DedupWindow,
    duplicate_window_ns: u64,
    /// Stored time of the last message: stored times never go backwards, so reads by time can binary-search.
    last_stored_at_ns: u64,
}

/// What one transaction decided, applied to the writer's memory only once the commit succeeded.
struct PendingAppends {
    last_sequence: u64,
    last_stored_at_ns: u64,
    new_ids: HashMap<String, u64>,
    new_ids_in_order: Vec<(u64, String)>,
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<WriteOp>) {
        while let Ok(first) = receiver.recv() {
            let mut ops = vec![first];
            while ops.len() < MAX_GROUP_COMMIT_OPS {
                match receiver.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.commit_group(ops);
        }
        // A clean close makes the unsynced consumer and KV state durable too.
        let synced = self.db.begin_write().map(|txn| txn.commit());
        if !matches!(synced, Ok(Ok(()))) {
            tracing::warn!(path = %self.path.display(), "final sync of the embedded log failed");
        }
    }

    fn commit_group(&mut self, ops: Vec<WriteOp>) {
        let now = now_ns();
        self.dedup
            .prune(now.saturating_sub(self.duplicate_window_ns));
        let mut appends = PendingAppends {
            last_sequence: self.last_sequence.load(Ordering::SeqCst),
            last_stored_at_ns: self.last_stored_at_ns,
            new_ids: HashMap::new(),
            new_ids_in_order: Vec::new(),
        };
        let txn = match self.db.begin_write() {
            Ok(mut txn) => {
                // Appends are fsync'd before they are acknowledged. Consumer state and heartbeats are not: losing
                // the last moments of them in a crash only redelivers messages (at-least-once, as JetStream after a
                // hard kill) or drops a heartbeat that the next one replaces, and it spares an fsync per ack.
                if !ops.iter().any(|op| matches!(op, WriteOp::Append { .. }))
                    && let Err(error) = txn.set_durability(redb::Durability::None)
                {
                    tracing::warn!(%error, "could not relax durability; committing immediately");
                }
                txn
            }
            Err(error) => {
                let error = storage_error(&self.path, "begin write", error);
                ops.into_iter().for_each(|op| op.fail(clone_error(&error)));
                return;
            }
        };
        let mut replies = Vec::with_capacity(ops.len());
        let mut failure = None;
        for op in ops {
            if failure.is_some() {
                replies.push((op, None));
                continue;
            }
            match self.apply(&txn, &op, now, &mut appends) {
                Ok(acks) => replies.push((op, acks)),
                Err(error) => {
                    failure = Some(error);
                    replies.push((op, None));
                }
            }
        }
        let committed = match failure {
            Some(error) => {
                let _ = txn.abort();
                Err(error)
            }
            None => txn
                .commit()
                .map_err(|e| storage_error(&self.path, "commit", e)),
        };
        match committed {
            Ok(()) => {
                let appended = appends.last_sequence != self.last_sequence.load(Ordering::SeqCst);
                for (sequence, dedup_id) in appends.new_ids_in_order {
                    self.dedup
                        .insert(dedup_id, sequence, appends.last_stored_at_ns.max(now));
                }
                self.last_sequence
                    .store(appends.last_sequence, Ordering::SeqCst);
                self.last_stored_at_ns = appends.last_stored_at_ns;
                if appended {
                    self.changes.send_modify(|generation| *generation += 1);
                }
                for (op, acks) in replies {
                    match op {
                        WriteOp::Append { reply, .. } => {
                            let _ = reply.send(Ok(acks.unwrap_or_default()));
                        }
                        WriteOp::Consumer { reply, .. } | WriteOp::KvPut { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(error) => {
                for (op, _) in replies {
                    op.fail(clone_error(&error));
                }
            }
        }
    }

    /// Applies one operation inside the group's transaction; appends return their acks.
    fn apply(
        &self,
        txn: &redb::WriteTransaction,
        op: &WriteOp,
        now: u64,
        appends: &mut PendingAppends,
    ) -> Result<Option<Vec<AppendAck>>, LogError> {
        let path = &self.path;
        match op {
            WriteOp::Append { messages, .. } => {
                let mut table = txn
                    .open_table(MESSAGES)
                    .map_err(|e| storage_error(path, "append", e))?;
                let mut acks = Vec::with_capacity(messages.len());
                for message in messages {
                    let known = self
                        .dedup
                        .by_id
                        .get(&message.dedup_id)
                        .or_else(|| appends.new_ids.get(&message.dedup_id));
                    if let Some(&sequence) = known {
                        acks.push(AppendAck {
                            sequence,
                            duplicate: true,
                        });
                        continue;
                    }
                    let stored_at_ns = now.max(appends.last_stored_at_ns);
                    let sequence = appends.last_sequence + 1;
                    table
                        .insert(
                            sequence,
                            (
                                stored_at_ns,
                                message.subject.as_str(),
                                message.dedup_id.as_str(),
                                message.payload.as_ref(),
                            ),
                        )
                        .map_err(|e| storage_error(path, "append", e))?;
                    appends.last_sequence = sequence;
                    appends.last_stored_at_ns = stored_at_ns;
                    appends.new_ids.insert(message.dedup_id.clone(), sequence);
                    appends
                        .new_ids_in_order
                        .push((sequence, message.dedup_id.clone()));
                    acks.push(AppendAck {
                        sequence,
                        duplicate: false,
                    });
                }
                Ok(Some(acks))
            }
            WriteOp::Consumer {
                name,
                cursor,
                set_pending,
                remove_pending,
                ..
            } => {
                if let Some(cursor) = cursor {
                    let mut cursors = txn
                        .open_table(CONSUMER_CURSORS)
                        .map_err(|e| storage_error(path, "consumer state", e))?;
                    cursors
                        .insert(name.as_str(), *cursor)
                        .map_err(|e| storage_error(path, "consumer state", e))?;
                }
                let mut pending = txn
                    .open_table(CONSUMER_PENDING)
                    .map_err(|e| storage_error(path, "consumer state", e))?;
                for (sequence, deliveries) in set_pending {
                    pending
                        .insert((name.as_str(), *sequence), *deliveries)
                        .map_err(|e| storage_error(path, "consumer state", e))?;
                }
                for sequence in remove_pending {
                    pending
                        .remove((name.as_str(), *sequence))
                        .map_err(|e| storage_error(path, "consumer state", e))?;
                }
                Ok(None)
            }
            WriteOp::KvPut {
                bucket, key, entry, ..
            } => {
                let mut entries = txn
                    .open_table(KV_ENTRIES)
                    .map_err(|e| storage_error(path, "kv", e))?;
                match entry {
                    Some((expires_at_ns, value)) => entries
                        .insert(
                            (bucket.as_str(), key.as_str()),
                            (*expires_at_ns, value.as_ref()),
                        )
                        .map(|_| ())
                        .map_err(|e| storage_error(path, "kv", e))?,
                    None => entries
                        .remove((bucket.as_str(), key.as_str()))
                        .map(|_| ())
                        .map_err(|e| storage_error(path, "kv", e))?,
                }
                Ok(None)
            }
        }
    }
}

fn clone_error(error: &LogError) -> LogError {
    match error {
        LogError::Embedded {
            path,
            operation,
            reason,
        } => LogError::Embedded {
            path: path.clone(),
            operation,
            reason: reason.clone(),
        },
        other => LogError::Invalid {
            what: "write",
            reason: other.to_string(),
        },
    }
}

impl Inner {
    fn send(&self, op: WriteOp) -> Result<(), LogError> {
        let writer = self.writer.lock().map_err(|_| LogError::Closed)?;
        let Some(writer) = writer.as_ref() else {
            return Err(LogError::Closed);
        };
        writer.send(op).map_err(|_| LogError::Closed)
    }

    fn storage_error(&self, operation: &'static str, error: impl Into<redb::Error>) -> LogError {
        storage_error(&self.path, operation, error)
    }

    fn read_messages(
        &self,
        start: StartAt,
        filter_subjects: &[String],
        max_messages: usize,
    ) -> Result<Vec<LogMessage>, LogError> {
        let start_sequence = self.start_sequence(start)?;
        let read = self
            .db
            .begin_read()
            .map_err(|e| self.storage_error("read", e))?;
        let table = read
            .open_table(MESSAGES)
            .map_err(|e| self.storage_error("read", e))?;
        let mut messages = Vec::new();
        for entry in table
            .range(start_sequence..)
            .map_err(|e| self.storage_error("read", e))?
        {
            if messages.len() >= max_messages {
                break;
            }
            let (sequence, record) = entry.map_err(|e| self.storage_error("read", e))?;
            let (stored_at_ns, subject, _, payload) = record.value();
            if matches_any(filter_subjects, subject) {
                messages.push(LogMessage {
                    sequence: sequence.value(),
                    subject: subject.to_string(),
                    stored_at_ns,
                    payload: Bytes::copy_from_slice(payload),
                });
            }
        }
        Ok(messages)
    }

    /// The first sequence at or after `start`; a time is found by binary search (stored times never decrease).
    fn start_sequence(&self, start: StartAt) -> Result<u64, LogError> {
        match start {
            StartAt::Beginning => Ok(1),
            StartAt::Sequence(sequence) => Ok(sequence.max(1)),
            StartAt::TimeNs(time_ns) => {
                let read = self
                    .db
                    .begin_read()
                    .map_err(|e| self.storage_error("read", e))?;
                let table = read
                    .open_table(MESSAGES)
                    .map_err(|e| self.storage_error("read", e))?;
                let (mut low, mut high) = (1u64, self.last_sequence.load(Ordering::SeqCst) + 1);
                while low < high {
                    let middle = low + (high - low) / 2;
                    let stored_at_ns = table
                        .get(middle)
                        .map_err(|e| self.storage_error("read", e))?
                        .map_or(u64::MAX, |record| record.value().0);
                    if stored_at_ns < time_ns {
                        low = middle + 1;
                    } else {
                        high = middle;
                    }
                }
                Ok(low)
            }
        }
    }

    async fn write(
        &self,
        make_op: impl FnOnce(oneshot::Sender<Result<(), LogError>>) -> WriteOp,
    ) -> Result<(), LogError> {
        let (reply, answer) = oneshot::channel();
        self.send(make_op(reply))?;
        answer.await.map_err(|_| LogError::Closed)?
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, message: OutgoingMessage) -> Result<AppendAck, LogError> {
        let mut acks = self.append_batch(vec![message]).await?;
        acks.pop().ok_or(LogError::Closed)
    }

    async fn append_batch(
        &self,
        messages: Vec<OutgoingMessage>,
    ) -> Result<Vec<AppendAck>, LogError> {
        let started = std::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        self.inner.send(WriteOp::Append { messages, reply })?;
        let acks = answer.await.map_err(|_| LogError::Closed)??;
        crate::metric_names::record_append("embedded", started, acks.len());
        Ok(acks)
    }

    async fn read(
        &self,
        start: StartAt,
        filter_subjects: &[String],
        max_messages: usize,
    ) -> Result<Vec<LogMessage>, LogError> {
        let inner = Arc::clone(&self.inner);
        let filter_subjects = filter_subjects.to_vec();
        tokio::task::spawn_blocking(move || {
            inner.read_messages(start, &filter_subjects, max_messages)
        })
        .await
        .map_err(|error| LogError::Invalid {
            what: "read task",
            reason: error.to_string(),
        })?
    }

    async fn last_sequence(&self) -> Result<u64, LogError> {
        Ok(self.inner.last_sequence.load(Ordering::SeqCst))
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, LogError> {
        let state = {
            let mut consumers = self.inner.consumers.lock().map_err(|_| LogError::Closed)?;
            match consumers.get(&config.durable_name) {
                Some(state) => Arc::clone(state),
                None => {
                    let state = Arc::new(Mutex::new(self.load_consumer(&config)?));
                    consumers.insert(config.durable_name.clone(), Arc::clone(&state));
                    state
                }
            }
        };
        Ok(Box::new(EmbeddedConsumer {
            inner: Arc::clone(&self.inner),
            name: config.durable_name,
            state,
        }))
    }

    async fn kv_bucket(&self, name: &str, ttl: Duration) -> Result<Box<dyn KvBucket>, LogError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(LogError::Invalid {
                what: "bucket name",
                reason: format!("{name:?}: use letters, digits, '_' and '-'"),
            });
        }
        Ok(Box::new(EmbeddedKv {
            inner: Arc::clone(&self.inner),
            bucket: name.to_string(),
            ttl_ns: u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX),
        }))
    }
}

impl EmbeddedLog {
    /// Loads a durable consumer's state, or starts a new one at `config.start_at`.
    fn load_consumer(&self, config: &ConsumerConfig) -> Result<ConsumerState, LogError> {
        let inner = &self.inner;
        let read = inner
            .db
            .begin_read()
            .map_err(|e| inner.storage_error("consumer set-up", e))?;
        let cursors = read
            .open_table(CONSUMER_CURSORS)
            .map_err(|e| inner.storage_error("consumer set-up", e))?;
        let stored_cursor = cursors
            .get(config.durable_name.as_str())
            .map_err(|e| inner.storage_error("consumer set-up", e))?
            .map(|cursor| cursor.value());
        let mut pending = BTreeMap::new();
        let cursor = match stored_cursor {
            Some(cursor) => {
                let table = read
                    .open_table(CONSUMER_PENDING)
                    .map_err(|e| inner.storage_error("consumer set-up", e))?;
                let name = config.durable_name.as_str();
                let rows = table
                    .range((name, 0u64)..=(name, u64::MAX))
                    .map_err(|e| inner.storage_error("consumer set-up", e))?;
                let now = Instant::now();
                for row in rows {
                    let (key, deliveries) =
                        row.map_err(|e| inner.storage_error("consumer set-up", e))?;
                    pending.insert(
                        key.value().1,
                        Pending {
                            deliveries: deliveries.value(),
                            redeliver_at: now,
                        },
                    );
                }
                cursor
            }
            None => inner.start_sequence(config.start_at)?,
        };
        Ok(ConsumerState {
            config: config.clone(),
            cursor,
            pending,
        })
    }
}

struct Pending {
    deliveries: u32,
    redeliver_at: Instant,
}

struct ConsumerState {
    config: ConsumerConfig,
    cursor: u64,
    pending: BTreeMap<u64, Pending>,
}

/// What one fetch decided, to be made durable before the deliveries are handed out.
struct FetchPlan {
    deliveries: Vec<(LogMessage, u32)>,
    cursor: Option<u64>,
    set_pending: Vec<(u64, u32)>,
    remove_pending: Vec<u64>,
    /// When a pending message next falls due, if nothing was ready now.
    next_due: Option<Instant>,
}

struct EmbeddedConsumer {
    inner: Arc<Inner>,
    name: String,
    state: Arc<Mutex<ConsumerState>>,
}

impl EmbeddedConsumer {
    fn plan(&self, max_messages: usize) -> Result<FetchPlan, LogError> {
        let mut state = self.state.lock().map_err(|_| LogError::Closed)?;
        let now = Instant::now();
        let ack_wait = state.config.ack_wait;
        let max_deliver = state.config.max_deliver;
        let mut plan = FetchPlan {
            deliveries: Vec::new(),
            cursor: None,
            set_pending: Vec::new(),
            remove_pending: Vec::new(),
            next_due: None,
        };
        let read = self
            .inner
            .db
            .begin_read()
            .map_err(|e| self.inner.storage_error("fetch", e))?;
        let messages = read
            .open_table(MESSAGES)
            .map_err(|e| self.inner.storage_error("fetch", e))?;

        // Redeliveries first, oldest sequence first.
        let due: Vec<u64> = state
            .pending
            .iter()
            .filter(|(_, pending)| pending.redeliver_at <= now)
            .map(|(sequence, _)| *sequence)
            .collect();
        for sequence in due {
            if plan.deliveries.len() >= max_messages {
                break;
            }
            let Some(pending) = state.pending.get_mut(&sequence) else {
                continue;
            };
            if max_deliver.is_some_and(|max| pending.deliveries >= max) {
                state.pending.remove(&sequence);
                plan.remove_pending.push(sequence);
                continue;
            }
            let Some(record) = messages
                .get(sequence)
                .map_err(|e| self.inner.storage_error("fetch", e))?
            else {
                state.pending.remove(&sequence);
                plan.remove_pending.push(sequence);
                continue;
            };
            pending.deliveries += 1;
            pending.redeliver_at = now + ack_wait;
            plan.set_pending.push((sequence, pending.deliveries));
            let (stored_at_ns, subject, _, payload) = record.value();
            plan.deliveries.push((
                LogMessage {
                    sequence,
                    subject: subject.to_string(),
                    stored_at_ns,
                    payload: Bytes::copy_from_slice(payload),
                },
                pending.deliveries,
            ));
        }

        // Then messages never looked at.
        if plan.deliveries.len() < max_messages {
            let last_sequence = self.inner.last_sequence.load(Ordering::SeqCst);
            let mut cursor = state.cursor;
            for entry in messages
                .range(state.cursor..=last_sequence)
                .map_err(|e| self.inner.storage_error("fetch", e))?
            {
                if plan.deliveries.len() >= max_messages {
                    break;
                }
                let (sequence, record) = entry.map_err(|e| self.inner.storage_error("fetch", e))?;
                let sequence = sequence.value();
                cursor = sequence + 1;
                let (stored_at_ns, subject, _, payload) = record.value();
                if !matches_any(&state.config.filter_subjects, subject) {
                    continue;
                }
                state.pending.insert(
                    sequence,
                    Pending {
                        deliveries: 1,
                        redeliver_at: now + ack_wait,
                    },
                );
                plan.set_pending.push((sequence, 1));
                plan.deliveries.push((
                    LogMessage {
                        sequence,
                        subject: subject.to_string(),
                        stored_at_ns,
                        payload: Bytes::copy_from_slice(payload),
                    },
                    1,
                ));
            }
            if cursor != state.cursor {
                state.cursor = cursor;
                plan.cursor = Some(cursor);
            }
        }
        plan.next_due = state
            .pending
            .values()
            .map(|pending| pending.redeliver_at)
            .min();
        Ok(plan)
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn fetch(&self, max_messages: usize, wait: Duration) -> Result<Vec<Delivery>, LogError> {
        let deadline = Instant::now() + wait;
        let mut changes = self.inner.changes.subscribe();
        loop {
            changes.mark_unchanged();
            let plan = self.plan(max_messages)?;
            if plan.cursor.is_some()
                || !plan.set_pending.is_empty()
                || !plan.remove_pending.is_empty()
            {
                // Durable before handed out: after a crash, a delivered message is still known to be pending.
                let name = self.name.clone();
                self.inner
                    .write(|reply| WriteOp::Consumer {
                        name,
                        cursor: plan.cursor,
                        set_pending: plan.set_pending,
                        remove_pending: plan.remove_pending,
                        reply,
                    })
                    .await?;
            }
            if !plan.deliveries.is_empty() || max_messages == 0 {
                return Ok(plan
                    .deliveries
                    .into_iter()
                    .map(|(message, attempt)| {
                        let ack = EmbeddedAck {
                            inner: Arc::clone(&self.inner),
                            name: self.name.clone(),
                            state: Arc::clone(&self.state),
                            sequence: message.sequence,
                        };
                        Delivery::new(message, attempt, Box::new(ack))
                    })
                    .collect());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake_at = plan.next_due.map_or(deadline, |due| due.min(deadline));
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn pending(&self) -> Result<u64, LogError> {
        let (cursor, filters, delivered_unfinished) = {
            let state = self.state.lock().map_err(|_| LogError::Closed)?;
            (
                state.cursor,
                state.config.filter_subjects.clone(),
                state.pending.len() as u64,
            )
        };
        let read = self
            .inner
            .db
            .begin_read()
            .map_err(|e| self.inner.storage_error("pending", e))?;
        let messages = read
            .open_table(MESSAGES)
            .map_err(|e| self.inner.storage_error("pending", e))?;
        let mut not_delivered = 0u64;
        for entry in messages
            .range(cursor..)
            .map_err(|e| self.inner.storage_error("pending", e))?
        {
            let (_, record) = entry.map_err(|e| self.inner.storage_error("pending", e))?;
            if matches_any(&filters, record.value().1) {
                not_delivered += 1;
            }
        }
        Ok(not_delivered + delivered_unfinished)
    }
}

struct EmbeddedAck {
    inner: Arc<Inner>,
    name: String,
    state: Arc<Mutex<ConsumerState>>,
    sequence: u64,
}

#[async_trait]
impl AckHandle for EmbeddedAck {
    async fn send(&self, kind: AckKind) -> Result<(), LogError> {
        let finished = {
            let mut state = self.state.lock().map_err(|_| LogError::Closed)?;
            let ack_wait = state.config.ack_wait;
            let Some(pending) = state.pending.get_mut(&self.sequence) else {
                // Already finished (e.g. acked after a redelivery was acked elsewhere): nothing to do.
                return Ok(());
            };
            match kind {
                AckKind::Ack | AckKind::Term => {
                    state.pending.remove(&self.sequence);
                    true
                }
                AckKind::Nak { delay } => {
                    pending.redeliver_at = Instant::now() + delay.unwrap_or_default();
                    false
                }
                AckKind::InProgress => {
                    pending.redeliver_at = Instant::now() + ack_wait;
                    false
                }
            }
        };
        if finished {
            let name = self.name.clone();
            let sequence = self.sequence;
            self.inner
                .write(|reply| WriteOp::Consumer {
                    name,
                    cursor: None,
                    set_pending: Vec::new(),
                    remove_pending: vec![sequence],
                    reply,
                })
                .await
        } else {
            self.inner
                .changes
                .send_modify(|generation| *generation += 1);
            Ok(())
        }
    }
}

struct EmbeddedKv {
    inner: Arc<Inner>,
    bucket: String,
    ttl_ns: u64,
}

#[async_trait]
impl KvBucket for EmbeddedKv {
    async fn put(&self, key: &str, value: Bytes) -> Result<(), LogError> {
        // A zero time-to-live means entries never expire, as JetStream's `max_age` of zero does.
        let expires_at_ns = if self.ttl_ns == 0 {
            u64::MAX
        } else {
            now_ns().saturating_add(self.ttl_ns)
        };
        let (bucket, key) = (self.bucket.clone(), key.to_string());
        self.inner
            .write(|reply| WriteOp::KvPut {
                bucket,
                key,
                entry: Some((expires_at_ns, value)),
                reply,
            })
            .await
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, LogError> {
        let read = self
            .inner
            .db
            .begin_read()
            .map_err(|e| self.inner.storage_error("kv get", e))?;
        let entries = read
            .open_table(KV_ENTRIES)
            .map_err(|e| self.inner.storage_error("kv get", e))?;
        let entry = entries
            .get((self.bucket.as_str(), key))
            .map_err(|e| self.inner.storage_error("kv get", e))?;
        let now = now_ns();
        Ok(entry.and_then(|entry| {
            let (expires_at_ns, value) = entry.value();
            (expires_at_ns > now).then(|| Bytes::copy_from_slice(value))
        }))
    }

    async fn delete(&self, key: &str) -> Result<(), LogError> {
        let (bucket, key) = (self.bucket.clone(), key.to_string());
        self.inner
            .write(|reply| WriteOp::KvPut {
                bucket,
                key,
                entry: None,
                reply,
            })
            .await
    }

    async fn claim(&self, key: &str, holder: &str) -> Result<bool, LogError> {
        let _claiming = self.inner.kv_claims.lock().await;
        match self.get(key).await? {
            Some(current) if current.as_ref() != holder.as_bytes() => Ok(false),
            _ => {
                self.put(key, Bytes::copy_from_slice(holder.as_bytes()))
                    .await?;
                Ok(true)
            }
        }
    }

    async fn keys(&self) -> Result<Vec<String>, LogError> {
        let read = self
            .inner
            .db
            .begin_read()
            .map_err(|e| self.inner.storage_error("kv keys", e))?;
        let entries = read
            .open_table(KV_ENTRIES)
            .map_err(|e| self.inner.storage_error("kv keys", e))?;
        let bucket = self.bucket.as_str();
        let now = now_ns();
        let mut keys = Vec::new();
        for entry in entries
            .range((bucket, "")..)
            .map_err(|e| self.inner.storage_error("kv keys", e))?
        {
            let (key, value) = entry.map_err(|e| self.inner.storage_error("kv keys", e))?;
            let (entry_bucket, entry_key) = key.value();
            if entry_bucket != bucket {
                break;
            }
            if value.value().0 > now {
                keys.push(entry_key.to_string());
            }
        }
        Ok(keys)
    }
}
