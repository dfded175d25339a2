//! The projection's redb tables and the records stored in them.
//!
//! Records are protobuf messages (prost derive, as `tandem_events::schema` is): the projection is rebuilt from
//! the log whenever its layout changes, but protobuf still lets a newer scheduler read an older file field by
//! field, keeps the crate on the encoding the log already uses (no serde dependency), and gives compact rows.
//! Timestamps are the emitters' wall-clock times from the event envelopes, in ns since the Unix epoch.

use redb::TableDefinition;

/// request id → [`RequestRecord`] bytes.
pub const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("requests");
/// (request id, stream sequence) → the event's bytes as stored on the log. Holds the events the lifecycle
/// accepted (advances, idempotent repeats, work landing after a cancellation); rejected ones are in
/// [`AUDIT_FINDINGS`]. Replaying a request's rows through a fresh `RequestLifecycle` gives its current lifecycle.
pub const EVENTS_BY_REQUEST: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("events_by_request");
/// worker id → [`WorkerRecord`] bytes.
pub const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
/// stream sequence of the offending event → [`AuditFinding`] bytes.
pub const AUDIT_FINDINGS: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_findings");
/// (block hash, decode worker id) → (): which workers hold a full KV block with this chained hash in their prefix
/// cache, as their `KvBlocksStored/Removed` events tell it. The routing policy's prefix index.
pub const PREFIX_INDEX: TableDefinition<(u64, &str), ()> = TableDefinition::new("prefix_index");
/// (decode worker id, block hash) → (): [`PREFIX_INDEX`] by worker, so a departed worker's blocks go without a scan.
pub const WORKER_BLOCKS: TableDefinition<(&str, u64), ()> = TableDefinition::new("worker_blocks");
/// (decode worker id, request id) → KV blocks the request holds there (prompt plus checkpointed tokens, rounded
/// up to whole blocks): the live requests of each decode worker, for load and for migration when it is lost.
pub const ACTIVE_REQUESTS: TableDefinition<(&str, &str), u32> =
    TableDefinition::new("active_requests");
/// request id → the routing attempt it waits for (1: never routed; n + 1 after the n-th attempt migrated).
pub const UNROUTED: TableDefinition<&str, u32> = TableDefinition::new("unrouted");
/// [`META_LAST_APPLIED_SEQUENCE`] and [`META_SCHEMA_VERSION`] → value.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The stream sequence of the last message applied (0: none yet). Written in the same transaction as the
/// message's effects, so the two never disagree.
pub const META_LAST_APPLIED_SEQUENCE: &str = "last_applied_sequence";
/// The layout version of these tables ([`PROJECTION_SCHEMA_VERSION`]).
pub const META_SCHEMA_VERSION: &str = "schema_version";
/// Version of the table layout and records written by this build; a file with another version is refused (a
/// projection is rebuilt from the log, never migrated in place).
pub const PROJECTION_SCHEMA_VERSION: u64 = 2;

/// One request as the log tells it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestRecord {
    /// The lifecycle state's name (`RequestState` as `Debug` prints it: `Received`, `Decoding`, `Completed`, ...).
    #[prost(string, tag = "1")]
    pub state: String,
    #[prost(string, tag = "2")]
    pub model: String,
    #[prost(uint32, tag = "3")]
    pub prompt_tokens: u32,
    #[prost(uint64, optional, tag = "4")]
    pub received_at_ns: Option<u64>,
    /// The latest routing (a migration routes again).
    #[prost(uint64, optional, tag = "5")]
    pub routed_at_ns: Option<u64>,
    /// When the decode worker chose to prefill locally (`PrefillLocal`).
    #[prost(uint64, optional, tag = "6")]
    pub prefill_local_at_ns: Option<u64>,
    #[prost(uint64, optional, tag = "7")]
    pub prefill_queued_at_ns: Option<u64>,
    /// The latest prefill attempt's start.
    #[prost(uint64, optional, tag = "8")]
    pub prefill_started_at_ns: Option<u64>,
    #[prost(uint64, optional, tag = "9")]
    pub prefill_done_at_ns: Option<u64>,
    #[prost(uint64, optional, tag = "10")]
    pub kv_transferred_at_ns: Option<u64>,
    #[prost(uint64, optional, tag = "11")]
    pub decode_started_at_ns: Option<u64>,
    #[prost(uint64, optional, tag = "12")]
    pub first_checkpoint_at_ns: Option<u64>,
    #[prost(uint64, optional, tag = "13")]
    pub last_checkpoint_at_ns: Option<u64>,
    /// `Completed`, `Failed` or `Cancelled`.
    #[prost(uint64, optional, tag = "14")]
    pub terminal_at_ns: Option<u64>,
    #[prost(string, tag = "15")]
    pub decode_worker_id: String,
    /// Empty unless the prompt went to the prefill queue and a prefill worker took it.
    #[prost(string, tag = "16")]
    pub prefill_worker_id: String,
    /// Generated tokens recorded by `TokensDecoded` checkpoints (kept across a migration).
    #[prost(uint32, tag = "17")]
    pub tokens_checkpointed: u32,
    /// `Completed`'s count of generated tokens.
    #[prost(uint32, tag = "18")]
    pub completion_tokens: u32,
    /// `stop` or `length` for a completed request.
    #[prost(string, tag = "19")]
    pub finish_reason: String,
    /// `Failed`'s or `Cancelled`'s reason.
    #[prost(string, tag = "20")]
    pub failure_reason: String,
    /// How many times it was routed (1 + migrations that were routed again).
    #[prost(uint32, tag = "21")]
    pub routing_attempts: u32,
    #[prost(uint32, tag = "22")]
    pub migrations: u32,
    /// Stream sequence of the request's `Received` (where its prompt is on the log).
    #[prost(uint64, tag = "23")]
    pub received_sequence: u64,
    /// Stream sequence of the last event applied to this request.
    #[prost(uint64, tag = "24")]
    pub last_event_sequence: u64,
    /// When the last event applied to this request was written: the scheduler's measure of progress.
    #[prost(uint64, optional, tag = "25")]
    pub last_event_at_ns: Option<u64>,
    /// Block size of the decode worker it is routed to (0 before routing), for its KV block count.
    #[prost(uint32, tag = "26")]
    pub block_size_tokens: u32,
}

/// One worker as its events tell it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerRecord {
    /// `prefill` or `decode`; empty when no `WorkerJoined` has been seen.
    #[prost(string, tag = "1")]
    pub role: String,
    #[prost(string, tag = "2")]
    pub device: String,
    #[prost(string, tag = "3")]
    pub model: String,
    #[prost(string, tag = "4")]
    pub transfer_endpoint: String,
    #[prost(uint32, tag = "5")]
    pub total_blocks: u32,
    #[prost(uint32, tag = "6")]
    pub block_size_tokens: u32,
    #[prost(uint32, tag = "7")]
    pub max_batch_sequences: u32,
    /// The latest join (a worker that comes back joins again).
    #[prost(uint64, optional, tag = "8")]
    pub joined_at_ns: Option<u64>,
    /// Set by `WorkerLeft`, cleared by a later join.
    #[prost(uint64, optional, tag = "9")]
    pub left_at_ns: Option<u64>,
    /// Set by `WorkerLost`, cleared by a later join.
    #[prost(uint64, optional, tag = "10")]
    pub lost_at_ns: Option<u64>,
    #[prost(string, tag = "11")]
    pub departure_reason: String,
    #[prost(uint64, optional, tag = "12")]
    pub last_heartbeat_at_ns: Option<u64>,
    /// Load reported by the last heartbeat event.
    #[prost(uint32, tag = "13")]
    pub active_sequences: u32,
    #[prost(uint32, tag = "14")]
    pub waiting_sequences: u32,
    #[prost(uint32, tag = "15")]
    pub free_blocks: u32,
    #[prost(uint32, tag = "16")]
    pub queued_prefill_tokens: u32,
}

/// An event that the projection could not accept: it breaks the request lifecycle, or it does not decode.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditFinding {
    #[prost(uint64, tag = "1")]
    pub sequence: u64,
    /// The request (or worker) id; empty when the payload did not decode.
    #[prost(string, tag = "2")]
    pub request_id: String,
    /// What is wrong, as the `LifecycleViolation` or `DecodeError` says it.
    #[prost(string, tag = "3")]
    pub violation: String,
    /// The event kind (`routed`, ...), or `malformed` when the payload did not decode.
    #[prost(string, tag = "4")]
    pub event_kind: String,
    /// The offending message's subject on the log.
    #[prost(string, tag = "5")]
    pub subject: String,
    /// The offending payload, as stored on the log.
    #[prost(bytes = "vec", tag = "6")]
    pub event_bytes: Vec<u8>,
}
