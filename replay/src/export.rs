//! The export file: the raw messages of a log (or of a window of it), compressed, behind a header that says what
//! the file is, so it can be attached to an incident ticket and replayed elsewhere with `--file`.
//!
//! Layout (version 1):
//! ```text
//! tandem-export v1\n                       magic line, plain text
//! {"format":"tandem-export",...}\n         header: one JSON line, plain text (`head -2 FILE` shows it)
//! zlib stream of records:
//!   0x01 sequence:u64 stored_at_ns:u64 subject_len:u32 subject payload_len:u32 payload   one log message
//!   0x00 messages:u64 last_sequence:u64                                                  the end marker
//! ```
//! Integers are little-endian. Payloads are the event bytes exactly as the log stored them (malformed ones too),
//! so a message read back equals the one exported, field for field. The end marker's count tells a complete file
//! from a truncated one; zlib's checksum catches damage inside the stream.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use serde::{Deserialize, Serialize};
use tandem_events::log::LogMessage;

use crate::ReplayError;

/// The first line of every export file.
pub const MAGIC_LINE: &str = "tandem-export v1";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const RECORD_MESSAGE: u8 = 1;
const RECORD_END: u8 = 0;
/// Longest subject accepted when reading: a subject is a handful of short tokens.
const MAX_SUBJECT_BYTES: u32 = 4 << 10;
/// Largest payload accepted when reading: above any event the log takes (8 MiB), below what a corrupt length
/// could make us allocate.
const MAX_PAYLOAD_BYTES: u32 = 64 << 20;
const MAX_HEADER_BYTES: u64 = 64 << 10;

/// What the header says about the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportHeader {
    /// Always `tandem-export`.
    pub format: String,
    pub version: u32,
    /// How the records after the header are laid out, in words, for someone holding only the file.
    pub layout: String,
    /// The newest event schema version the exporting build knew (older events are in it as stored).
    pub event_schema_version: u32,
    /// The `tandem` version that wrote the file.
    pub written_by: String,
    /// When it was written (RFC 3339, UTC).
    pub created_at: String,
    /// The log it was read from.
    pub source: String,
    /// The filters of the export (time window, request, worker, state), in words; empty for the whole log.
    pub selection: String,
}

impl ExportHeader {
    pub fn new(source: impl Into<String>, selection: impl Into<String>) -> ExportHeader {
        ExportHeader {
            format: "tandem-export".into(),
            version: FORMAT_VERSION,
            layout: "after this line, a zlib stream of records: 0x01 sequence:u64le stored_at_ns:u64le \
                     subject_len:u32le subject payload_len:u32le payload (a protobuf tandem Envelope as stored), \
                     then 0x00 messages:u64le last_sequence:u64le"
                .into(),
            event_schema_version: tandem_events::SCHEMA_VERSION,
            written_by: format!("tandem {}", env!("CARGO_PKG_VERSION")),
            created_at: crate::text::wall_time(tandem_events::event::now_ns()),
            source: source.into(),
            selection: selection.into(),
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportSummary {
    pub messages: u64,
    pub last_sequence: u64,
    pub file_bytes: u64,
    pub payload_bytes: u64,
}

/// Writes an export file. The file appears under its name only when [`ExportWriter::finish`] succeeds: until then
/// it is written beside it as `<name>.partial`, so an interrupted export never looks complete.
pub struct ExportWriter {
    path: PathBuf,
    partial_path: PathBuf,
    encoder: ZlibEncoder<BufWriter<File>>,
    messages: u64,
    last_sequence: u64,
    payload_bytes: u64,
}

impl ExportWriter {
    pub fn create(path: &Path, header: &ExportHeader) -> Result<ExportWriter, ReplayError> {
        let mut partial_name = path.as_os_str().to_owned();
        partial_name.push(".partial");
        let partial_path = PathBuf::from(partial_name);
        let file = File::create(&partial_path).map_err(ReplayError::io(&partial_path, "create"))?;
        let mut out = BufWriter::new(file);
        let header_json = serde_json::to_string(header).map_err(|error| ReplayError::Invalid {
            what: "export header",
            reason: error.to_string(),
        })?;
        writeln!(out, "{MAGIC_LINE}")
            .and_then(|()| writeln!(out, "{header_json}"))
            .map_err(ReplayError::io(&partial_path, "write header"))?;
        Ok(ExportWriter {
            path: path.to_path_buf(),
            partial_path,
            // Level 3: most of level 9's ratio on protobuf events at several times its speed.
            encoder: ZlibEncoder::new(out, Compression::new(3)),
            messages: 0,
            last_sequence: 0,
            payload_bytes: 0,
        })
    }

    pub fn write(&mut self, message: &LogMessage) -> Result<(), ReplayError> {
        let subject = message.subject.as_bytes();
        let mut record =
            Vec::with_capacity(1 + 8 + 8 + 4 + subject.len() + 4 + message.payload.len());
        record.push(RECORD_MESSAGE);
        record.extend_from_slice(&message.sequence.to_le_bytes());
        record.extend_from_slice(&message.stored_at_ns.to_le_bytes());
        record.extend_from_slice(&(subject.len() as u32).to_le_bytes());
        record.extend_from_slice(subject);
        record.extend_from_slice(&(message.payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&message.payload);
        self.encoder
            .write_all(&record)
            .map_err(ReplayError::io(&self.partial_path, "write"))?;
        self.messages += 1;
        self.last_sequence = message.sequence;
        self.payload_bytes += message.payload.len() as u64;
        Ok(())
    }

    /// Writes the end marker, flushes, syncs and moves the file to its name.
    pub fn finish(mut self) -> Result<ExportSummary, ReplayError> {
        let mut end = vec![RECORD_END];
        end.extend_from_slice(&self.messages.to_le_bytes());
        end.extend_from_slice(&self.last_sequence.to_le_bytes());
        self.encoder
            .write_all(&end)
            .map_err(ReplayError::io(&self.partial_path, "write"))?;
        let out = self
            .encoder
            .finish()
            .map_err(ReplayError::io(&self.partial_path, "compress"))?;
        let file = out
            .into_inner()
            .map_err(|error| ReplayError::io(&self.partial_path, "flush")(error.into_error()))?;
        file.sync_all()
            .map_err(ReplayError::io(&self.partial_path, "sync"))?;
        let file_bytes = file
            .metadata()
            .map_err(ReplayError::io(&self.partial_path, "stat"))?
            .len();
        drop(file);
        std::fs::rename(&self.partial_path, &self.path)
            .map_err(ReplayError::io(&self.path, "rename the finished export to"))?;
        Ok(ExportSummary {
            messages: self.messages,
            last_sequence: self.last_sequence,
            file_bytes,
            payload_bytes: self.payload_bytes,
        })
    }
}

/// Reads an export file message by message.
pub struct ExportReader {
    path: PathBuf,
    header: ExportHeader,
    decoder: BufReader<ZlibDecoder<BufReader<File>>>,
    messages: u64,
    ended: bool,
}

impl ExportReader {
    /// Opens the file and checks its magic line and header.
    pub fn open(path: &Path) -> Result<ExportReader, ReplayError> {
        let file = File::open(path).map_err(ReplayError::io(path, "open"))?;
        let mut input = BufReader::new(file);
        let not_export = |reason: String| ReplayError::NotAnExport {
            path: path.display().to_string(),
            reason,
        };
        let magic = read_header_line(&mut input, path)?;
        if magic != MAGIC_LINE {
            return Err(not_export(if magic.starts_with("tandem-export") {
                format!("it is {magic:?}, this build reads {MAGIC_LINE:?}")
            } else {
                format!("its first line is not {MAGIC_LINE:?}")
            }));
        }
        let header_line = read_header_line(&mut input, path)?;
        let header: ExportHeader = serde_json::from_str(&header_line)
            .map_err(|error| not_export(format!("its header does not parse: {error}")))?;
        if header.format != "tandem-export" || header.version != FORMAT_VERSION {
            return Err(not_export(format!(
                "its header says format {:?} version {}, this build reads tandem-export version {FORMAT_VERSION}",
                header.format, header.version
            )));
        }
        Ok(ExportReader {
            path: path.to_path_buf(),
            header,
            decoder: BufReader::with_capacity(256 << 10, ZlibDecoder::new(input)),
            messages: 0,
            ended: false,
        })
    }

    pub fn header(&self) -> &ExportHeader {
        &self.header
    }

    fn corrupt(&self, reason: impl Into<String>) -> ReplayError {
        ReplayError::CorruptExport {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    /// The next message, or `None` after the end marker (whose count is checked).
    pub fn next_message(&mut self) -> Result<Option<LogMessage>, ReplayError> {
        if self.ended {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        match self.decoder.read_exact(&mut tag) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(self.corrupt(format!(
                    "it ends after {} messages without its end marker (truncated?)",
                    self.messages
                )));
            }
            Err(error) => return Err(self.corrupt(format!("decompressing: {error}"))),
        }
        match tag[0] {
            RECORD_MESSAGE => {
                let sequence = self.read_u64("sequence")?;
                let stored_at_ns = self.read_u64("stored time")?;
                let subject = self.read_bytes("subject", MAX_SUBJECT_BYTES)?;
                let subject = String::from_utf8(subject).map_err(|_| {
                    self.corrupt(format!(
                        "message {sequence} has a subject that is not UTF-8"
                    ))
                })?;
                let payload = self.read_bytes("payload", MAX_PAYLOAD_BYTES)?;
                self.messages += 1;
                Ok(Some(LogMessage {
                    sequence,
                    subject,
                    stored_at_ns,
                    payload: Bytes::from(payload),
                }))
            }
            RECORD_END => {
                let count = self.read_u64("end marker")?;
                let _last_sequence = self.read_u64("end marker")?;
                if count != self.messages {
                    return Err(self.corrupt(format!(
                        "its end marker counts {count} messages, {} were read",
                        self.messages
                    )));
                }
                self.ended = true;
                Ok(None)
            }
            other => Err(self.corrupt(format!(
                "unknown record tag {other:#04x} after {} messages",
                self.messages
            ))),
        }
    }

    fn read_exact_field(&mut self, what: &str, buffer: &mut [u8]) -> Result<(), ReplayError> {
        self.decoder.read_exact(buffer).map_err(|error| {
            self.corrupt(format!(
                "reading the {what} of message {}: {error}",
                self.messages + 1
            ))
        })
    }

    fn read_u64(&mut self, what: &str) -> Result<u64, ReplayError> {
        let mut bytes = [0u8; 8];
        self.read_exact_field(what, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn read_bytes(&mut self, what: &str, limit: u32) -> Result<Vec<u8>, ReplayError> {
        let mut len = [0u8; 4];
        self.read_exact_field(what, &mut len)?;
        let len = u32::from_le_bytes(len);
        if len > limit {
            return Err(self.corrupt(format!(
                "message {} has a {what} of {len} bytes, over the {limit}-byte limit",
                self.messages + 1
            )));
        }
        let mut bytes = vec![0u8; len as usize];
        self.read_exact_field(what, &mut bytes)?;
        Ok(bytes)
    }
}

fn read_header_line(input: &mut BufReader<File>, path: &Path) -> Result<String, ReplayError> {
    let mut line = Vec::new();
    input
        .by_ref()
        .take(MAX_HEADER_BYTES)
        .read_until(b'\n', &mut line)
        .map_err(ReplayError::io(path, "read"))?;
    if line.last() != Some(&b'\n') {
        return Err(ReplayError::NotAnExport {
            path: path.display().to_string(),
            reason: "it has no header line".into(),
        });
    }
    line.pop();
    String::from_utf8(line).map_err(|_| ReplayError::NotAnExport {
        path: path.display().to_string(),
        reason: "its header is not text".into(),
    })
}
