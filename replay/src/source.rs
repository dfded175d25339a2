//! Where a replay reads events from, and the streaming scan over them.
//!
//! A source is a live log (a JetStream stream or an embedded log under a data dir, both behind
//! [`EventLog`]) or an export file. [`Source::scan`] hands every message in a [`ReadRange`] to a visitor in
//! sequence order, batch by batch: the next batch is read (and for a file, decompressed) on another task while the
//! visitor works on the current one, so reading overlaps processing and memory stays bounded by two batches.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::jetstream::{JetStreamLog, JetStreamOptions};
use tandem_events::log::nats_connection::NatsConnectOptions;
use tandem_events::log::{EventLog, LogMessage, StartAt};
use tandem_events::subjects::matches_any;
use tokio::sync::mpsc;

use crate::ReplayError;
use crate::export::ExportReader;
use crate::text::thousands;

/// Messages read per call on a live log: big enough that a JetStream read (one ephemeral consumer per call) is
/// cheap per message, small enough that two batches in flight stay a few MiB.
const LOG_BATCH_MESSAGES: usize = 8_192;
/// Messages per batch handed over from an export file's reader thread.
const FILE_BATCH_MESSAGES: usize = 4_096;

/// Which messages a scan visits. Times are the log's stored times (ns since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadRange {
    /// Start at the first message stored at or after this time.
    pub since_ns: Option<u64>,
    /// Stop before the first message stored after this time.
    pub until_ns: Option<u64>,
    /// Stop after this sequence (e.g. the last one a projection applied, to compare like with like).
    pub until_sequence: Option<u64>,
    /// Only messages on these subjects (NATS wildcards); empty: all.
    pub subjects: Vec<String>,
}

impl ReadRange {
    fn start_at(&self) -> StartAt {
        match self.since_ns {
            Some(since_ns) => StartAt::TimeNs(since_ns),
            None => StartAt::Beginning,
        }
    }

    /// Whether a message at or after the start is still inside the range; `false` ends the scan, since both
    /// sequences and stored times only grow along the log.
    fn before_end(&self, message: &LogMessage) -> bool {
        self.until_ns
            .is_none_or(|until| message.stored_at_ns <= until)
            && self
                .until_sequence
                .is_none_or(|until| message.sequence <= until)
    }

    fn after_start(&self, message: &LogMessage) -> bool {
        self.since_ns
            .is_none_or(|since| message.stored_at_ns >= since)
    }
}

/// What a scan went over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanSummary {
    /// Messages handed to the visitor.
    pub messages: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub first_stored_at_ns: u64,
    pub last_stored_at_ns: u64,
}

impl ScanSummary {
    fn count(&mut self, message: &LogMessage) {
        if self.messages == 0 {
            self.first_sequence = message.sequence;
            self.first_stored_at_ns = message.stored_at_ns;
        }
        self.messages += 1;
        self.last_sequence = message.sequence;
        self.last_stored_at_ns = message.stored_at_ns;
    }
}

/// Progress of a long read on stderr: a line every few seconds once a read takes longer than that, so a quick
/// read prints nothing and a long one shows it is moving.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    started: Instant,
    last_report: Instant,
    reported: bool,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    /// Reports to stderr.
    pub fn stderr() -> Progress {
        Progress::new(true)
    }

    /// Reports nothing (tests, benchmarks).
    pub fn quiet() -> Progress {
        Progress::new(false)
    }

    fn new(enabled: bool) -> Progress {
        let now = Instant::now();
        Progress {
            enabled,
            started: now,
            last_report: now,
            reported: false,
        }
    }

    fn tick(&mut self, summary: &ScanSummary, total_hint: Option<u64>) {
        if !self.enabled || self.last_report.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last_report = Instant::now();
        self.reported = true;
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let rate = summary.messages as f64 / elapsed_s.max(1e-9);
        let of_total = match total_hint {
            Some(total) if total > 0 => format!(
                " (sequence {} of {}, {:.0}%)",
                thousands(summary.last_sequence),
                thousands(total),
                100.0 * summary.last_sequence as f64 / total as f64
            ),
            _ => String::new(),
        };
        let line = format!(
            "reading: {} messages{of_total}, {} msg/s",
            thousands(summary.messages),
            thousands(rate as u64)
        );
        if std::io::stderr().is_terminal() {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }

    fn done(&mut self, summary: &ScanSummary) {
        if self.enabled && self.reported {
            let line = format!(
                "read {} messages in {:.1} s",
                thousands(summary.messages),
                self.started.elapsed().as_secs_f64()
            );
            if std::io::stderr().is_terminal() {
                eprintln!("\r{line}                              ");
            } else {
                eprintln!("{line}");
            }
        }
    }
}

enum SourceKind {
    Log(Arc<dyn EventLog>),
    File(PathBuf),
}

/// Where events are read from.
pub struct Source {
    kind: SourceKind,
    description: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// A log already open (tests, or a caller holding one).
    pub fn from_log(log: Arc<dyn EventLog>, description: impl Into<String>) -> Source {
        Source {
            kind: SourceKind::Log(log),
            description: description.into(),
        }
    }

    /// The embedded log under `data_dir`. Refuses a directory without a log rather than creating an empty one.
    pub fn data_dir(data_dir: &Path) -> Result<Source, ReplayError> {
        let file = data_dir.join("events.redb");
        if !file.is_file() {
            return Err(ReplayError::Invalid {
                what: "--data-dir",
                reason: format!(
                    "{} holds no embedded log ({} is missing); pass the --data-dir that `tandem serve` used",
                    data_dir.display(),
                    file.display()
                ),
            });
        }
        let log = EmbeddedLog::open(data_dir).map_err(|error| ReplayError::Invalid {
            what: "--data-dir",
            reason: format!(
                "{error} (a running `tandem serve` holds its data dir: stop it, or read the log through --nats)"
            ),
        })?;
        Ok(Source::from_log(
            Arc::new(log),
            format!("embedded log {}", data_dir.display()),
        ))
    }

    /// The `TANDEM` stream on a nats-server.
    pub async fn nats(url: &str) -> Result<Source, ReplayError> {
        Source::nats_with(url, &NatsConnectOptions::default()).await
    }

    /// The `TANDEM` stream on a nats-server that wants credentials or TLS.
    pub async fn nats_with(
        url: &str,
        connection: &NatsConnectOptions,
    ) -> Result<Source, ReplayError> {
        let log = JetStreamLog::connect_with(url, connection, JetStreamOptions::default()).await?;
        Ok(Source::from_log(
            Arc::new(log),
            format!("JetStream stream TANDEM at {url}"),
        ))
    }

    /// An export file; its header is checked now, so a wrong file is refused before any work.
    pub fn file(path: &Path) -> Result<Source, ReplayError> {
        let reader = ExportReader::open(path)?;
        let description = format!(
            "export file {} (of {}, exported {})",
            path.display(),
            reader.header().source,
            reader.header().created_at
        );
        Ok(Source {
            kind: SourceKind::File(path.to_path_buf()),
            description,
        })
    }

    /// Says where the events come from, for report headers.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The sequence of the last message now on the source (for a file: as its header does not know it, 0).
    pub async fn last_sequence(&self) -> Result<u64, ReplayError> {
        match &self.kind {
            SourceKind::Log(log) => Ok(log.last_sequence().await?),
            SourceKind::File(_) => Ok(0),
        }
    }

    /// Hands every message in `range` to `visit`, in sequence order. A live log is read up to the last sequence it
    /// held when the scan began, so a scan of a busy log ends.
    pub async fn scan(
        &self,
        range: &ReadRange,
        progress: &mut Progress,
        mut visit: impl FnMut(&LogMessage) -> Result<(), ReplayError>,
    ) -> Result<ScanSummary, ReplayError> {
        let (total_hint, mut batches) = match &self.kind {
            SourceKind::Log(log) => {
                let last = log.last_sequence().await?;
                (
                    Some(last),
                    spawn_log_reader(Arc::clone(log), range.clone(), last),
                )
            }
            SourceKind::File(path) => (None, spawn_file_reader(path.clone(), range.clone())),
        };
        let mut summary = ScanSummary::default();
        while let Some(batch) = batches.recv().await {
            for message in batch? {
                summary.count(&message);
                visit(&message)?;
            }
            progress.tick(&summary, total_hint);
        }
        progress.done(&summary);
        Ok(summary)
    }
}

type Batch = Result<Vec<LogMessage>, ReplayError>;

fn spawn_log_reader(
    log: Arc<dyn EventLog>,
    range: ReadRange,
    last_sequence: u64,
) -> mpsc::Receiver<Batch> {
    // Two batches in flight: one being visited, one being read.
    let (sender, receiver) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut start = range.start_at();
        loop {
            let batch = match log.read(start, &range.subjects, LOG_BATCH_MESSAGES).await {
                Ok(batch) => batch,
                Err(error) => {
                    let _ = sender.send(Err(error.into())).await;
                    return;
                }
            };
            let Some(next) = batch.last().map(|message| message.sequence + 1) else {
                return;
            };
            let read = batch.len();
            let kept: Vec<LogMessage> = batch
                .into_iter()
                .take_while(|message| {
                    message.sequence <= last_sequence && range.before_end(message)
                })
                .collect();
            // A short read is the end of the log; a cut batch is the end of the range.
            let ended = read < LOG_BATCH_MESSAGES || kept.len() < read || next > last_sequence;
            if !kept.is_empty() && sender.send(Ok(kept)).await.is_err() {
                return; // the scan stopped early
            }
            if ended {
                return;
            }
            start = StartAt::Sequence(next);
        }
    });
    receiver
}

fn spawn_file_reader(path: PathBuf, range: ReadRange) -> mpsc::Receiver<Batch> {
    let (sender, receiver) = mpsc::channel(1);
    tokio::task::spawn_blocking(move || {
        let mut reader = match ExportReader::open(&path) {
            Ok(reader) => reader,
            Err(error) => {
                let _ = sender.blocking_send(Err(error));
                return;
            }
        };
        let mut batch = Vec::with_capacity(FILE_BATCH_MESSAGES);
        loop {
            match reader.next_message() {
                Ok(Some(message)) => {
                    if !range.after_start(&message)
                        || !matches_any(&range.subjects, &message.subject)
                    {
                        continue;
                    }
                    if !range.before_end(&message) {
                        break;
                    }
                    batch.push(message);
                    if batch.len() == FILE_BATCH_MESSAGES {
                        let full =
                            std::mem::replace(&mut batch, Vec::with_capacity(FILE_BATCH_MESSAGES));
                        if sender.blocking_send(Ok(full)).is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    let _ = sender.blocking_send(Err(error));
                    return;
                }
            }
        }
        if !batch.is_empty() {
            let _ = sender.blocking_send(Ok(batch));
        }
    });
    receiver
}
