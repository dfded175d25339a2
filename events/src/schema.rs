//! The event schema: protobuf messages (prost derive, no `protoc` at build time) for the envelope and every event
//! body of DESIGN.md §3.
//!
//! Field tags are forever: a released tag is never reused or retyped, new fields get new tags, and old logs keep
//! decoding (the golden test in `tests/golden.rs` holds bytes written by every released schema version).

/// W3C trace context carried by every event, so each role continues the request's trace.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TraceContext {
    /// `traceparent` header value (`00-<trace id>-<span id>-<flags>`); empty when the request is not traced.
    #[prost(string, tag = "1")]
    pub traceparent: String,
    #[prost(string, tag = "2")]
    pub tracestate: String,
}

/// What every event on the log is wrapped in.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    /// The schema version the emitter wrote ([`crate::SCHEMA_VERSION`] at the time).
    #[prost(uint32, tag = "1")]
    pub schema_version: u32,
    /// Request id for request events, worker id for worker events (ULID text, sortable by time).
    #[prost(string, tag = "2")]
    pub id: String,
    /// Id of the process that appended the event (gateway, scheduler or worker id).
    #[prost(string, tag = "3")]
    pub emitter: String,
    /// Wall-clock time at the emitter, nanoseconds since the Unix epoch.
    #[prost(uint64, tag = "4")]
    pub timestamp_ns: u64,
    #[prost(message, optional, tag = "5")]
    pub trace: Option<TraceContext>,
    #[prost(
        oneof = "Body",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 30, 31, 32, 33, 34, 35"
    )]
    pub body: Option<Body>,
}

/// The event bodies. Request lifecycle events use tags 10–29, worker events 30–49.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(message, tag = "10")]
    Received(Received),
    #[prost(message, tag = "11")]
    Routed(Routed),
    #[prost(message, tag = "12")]
    PrefillLocal(PrefillLocal),
    #[prost(message, tag = "13")]
    PrefillQueued(PrefillQueued),
    #[prost(message, tag = "14")]
    PrefillStarted(PrefillStarted),
    #[prost(message, tag = "15")]
    PrefillDone(PrefillDone),
    #[prost(message, tag = "16")]
    KvTransferred(KvTransferred),
    #[prost(message, tag = "17")]
    DecodeStarted(DecodeStarted),
    #[prost(message, tag = "18")]
    TokensDecoded(TokensDecoded),
    #[prost(message, tag = "19")]
    Migrated(Migrated),
    #[prost(message, tag = "20")]
    Completed(Completed),
    #[prost(message, tag = "21")]
    Failed(Failed),
    #[prost(message, tag = "22")]
    Cancelled(Cancelled),
    #[prost(message, tag = "30")]
    WorkerJoined(WorkerJoined),
    #[prost(message, tag = "31")]
    WorkerHeartbeat(WorkerHeartbeat),
    #[prost(message, tag = "32")]
    WorkerLeft(WorkerLeft),
    #[prost(message, tag = "33")]
    WorkerLost(WorkerLost),
    #[prost(message, tag = "34")]
    KvBlocksStored(KvBlocksStored),
    #[prost(message, tag = "35")]
    KvBlocksRemoved(KvBlocksRemoved),
}

/// Sampling parameters as the gateway validated them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SamplingParams {
    #[prost(float, tag = "1")]
    pub temperature: f32,
    #[prost(float, tag = "2")]
    pub top_p: f32,
    /// 0 means no top-k restriction.
    #[prost(uint32, tag = "3")]
    pub top_k: u32,
    #[prost(uint64, optional, tag = "4")]
    pub seed: Option<u64>,
    #[prost(uint32, tag = "5")]
    pub max_tokens: u32,
    #[prost(uint32, repeated, tag = "6")]
    pub stop_token_ids: Vec<u32>,
    #[prost(string, repeated, tag = "7")]
    pub stop_strings: Vec<String>,
    /// Number of alternatives per token to return as logprobs; absent means no logprobs.
    #[prost(uint32, optional, tag = "8")]
    pub logprobs: Option<u32>,
    #[prost(bool, tag = "9")]
    pub ignore_eos: bool,
}

/// The gateway accepted a request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Received {
    /// The model name the client asked for.
    #[prost(string, tag = "1")]
    pub model: String,
    /// The prompt's token ids; empty when the log is redacted (then only `prompt_sha256` and `prompt_tokens`).
    #[prost(uint32, repeated, tag = "2")]
    pub prompt_token_ids: Vec<u32>,
    #[prost(uint32, tag = "3")]
    pub prompt_tokens: u32,
    #[prost(bytes = "vec", tag = "4")]
    pub prompt_sha256: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub sampling: Option<SamplingParams>,
    /// The gateway that holds the client connection and subscribes to the token subject.
    #[prost(string, tag = "6")]
    pub gateway_id: String,
    #[prost(bool, tag = "7")]
    pub stream: bool,
    /// `chat` or `completion`.
    #[prost(string, tag = "8")]
    pub endpoint: String,
}

/// One candidate's routing score, recorded so a decision can be explained after the fact.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerScore {
    #[prost(string, tag = "1")]
    pub worker_id: String,
    /// Prompt blocks already cached on the worker.
    #[prost(uint32, tag = "2")]
    pub overlap_blocks: u32,
    /// Prompt blocks the worker would still have to prefill.
    #[prost(uint32, tag = "3")]
    pub prefill_blocks: u32,
    #[prost(uint32, tag = "4")]
    pub active_decode_blocks: u32,
    #[prost(double, tag = "5")]
    pub cost: f64,
}

/// The scheduler chose a decode worker.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Routed {
    #[prost(string, tag = "1")]
    pub decode_worker_id: String,
    /// `kv_aware`, `round_robin` or `random`.
    #[prost(string, tag = "2")]
    pub policy: String,
    #[prost(string, tag = "3")]
    pub reason: String,
    #[prost(message, repeated, tag = "4")]
    pub scores: Vec<WorkerScore>,
    /// 1 for the first routing, incremented by every migration.
    #[prost(uint32, tag = "5")]
    pub attempt: u32,
    /// Stream sequence of the request's `Received`, so the decode worker reads the prompt without a search.
    #[prost(uint64, tag = "6")]
    pub received_sequence: u64,
}

/// The inputs of the local-vs-remote prefill rule, recorded with its outcome.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrefillDecision {
    #[prost(uint32, tag = "1")]
    pub prompt_tokens: u32,
    #[prost(uint32, tag = "2")]
    pub cached_tokens: u32,
    #[prost(uint32, tag = "3")]
    pub max_local_prefill_tokens: u32,
    #[prost(uint32, tag = "4")]
    pub prefill_queue_depth: u32,
    #[prost(uint32, tag = "5")]
    pub max_prefill_queue_depth: u32,
}

/// The decode worker prefills the prompt itself.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrefillLocal {
    #[prost(string, tag = "1")]
    pub decode_worker_id: String,
    #[prost(message, optional, tag = "2")]
    pub decision: Option<PrefillDecision>,
}

/// Where a prefill worker must write the KV blocks.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KvDestination {
    #[prost(string, tag = "1")]
    pub decode_worker_id: String,
    /// The decode worker's transfer endpoint (e.g. `tcp://10.0.0.5:7100`).
    #[prost(string, tag = "2")]
    pub endpoint: String,
    /// Destination block ids, in sequence order.
    #[prost(uint32, repeated, tag = "3")]
    pub block_ids: Vec<u32>,
    #[prost(uint32, tag = "4")]
    pub block_size_tokens: u32,
    /// Tokens at the start of the prompt whose KV the decode worker already holds (prefix cache).
    #[prost(uint32, tag = "5")]
    pub cached_tokens: u32,
}

/// The decode worker put the prompt on the prefill queue.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrefillQueued {
    #[prost(string, tag = "1")]
    pub decode_worker_id: String,
    #[prost(message, optional, tag = "2")]
    pub decision: Option<PrefillDecision>,
    #[prost(uint32, repeated, tag = "3")]
    pub prompt_token_ids: Vec<u32>,
    #[prost(message, optional, tag = "4")]
    pub sampling: Option<SamplingParams>,
    #[prost(message, optional, tag = "5")]
    pub kv_destination: Option<KvDestination>,
}

/// A prefill worker took the job (once per delivery attempt).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrefillStarted {
    #[prost(string, tag = "1")]
    pub prefill_worker_id: String,
    #[prost(uint32, tag = "2")]
    pub delivery_attempt: u32,
}

/// The prompt is computed and its first token sampled.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PrefillDone {
    #[prost(string, tag = "1")]
    pub prefill_worker_id: String,
    #[prost(uint32, tag = "2")]
    pub first_token_id: u32,
    #[prost(uint64, tag = "3")]
    pub compute_ns: u64,
    #[prost(uint32, tag = "4")]
    pub cached_tokens: u32,
    #[prost(float, optional, tag = "5")]
    pub first_token_logprob: Option<f32>,
}

/// KV blocks reached the decode worker.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KvTransferred {
    #[prost(string, tag = "1")]
    pub from_worker_id: String,
    #[prost(string, tag = "2")]
    pub to_worker_id: String,
    #[prost(uint64, tag = "3")]
    pub bytes: u64,
    #[prost(uint32, tag = "4")]
    pub blocks: u32,
    #[prost(uint64, tag = "5")]
    pub duration_ns: u64,
    /// `tcp`, `in_process`, `cuda_ipc` or `cuda_peer`.
    #[prost(string, tag = "6")]
    pub transport: String,
}

/// The decode worker joined the request to its running batch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DecodeStarted {
    #[prost(string, tag = "1")]
    pub decode_worker_id: String,
}

/// A checkpoint of generated tokens: `token_ids` are the tokens at indices `start_index..`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TokensDecoded {
    #[prost(string, tag = "1")]
    pub decode_worker_id: String,
    #[prost(uint32, tag = "2")]
    pub start_index: u32,
    #[prost(uint32, repeated, tag = "3")]
    pub token_ids: Vec<u32>,
    #[prost(float, repeated, tag = "4")]
    pub logprobs: Vec<f32>,
    /// The text the token updates for these tokens carried (after detokenizing and stop strings), so a gateway
    /// that lost updates on the token bus can finish the stream from the log. `None` from workers that predate it.
    #[prost(string, optional, tag = "5")]
    pub text: Option<String>,
}

/// The request moves to another decode worker, carrying the tokens already checkpointed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Migrated {
    #[prost(string, tag = "1")]
    pub from_worker_id: String,
    #[prost(string, tag = "2")]
    pub reason: String,
    /// Generated tokens already checkpointed; the new decode worker continues after them.
    #[prost(uint32, tag = "3")]
    pub tokens_generated: u32,
}

/// Generation finished.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Completed {
    /// `stop` or `length`.
    #[prost(string, tag = "1")]
    pub finish_reason: String,
    #[prost(uint32, tag = "2")]
    pub prompt_tokens: u32,
    #[prost(uint32, tag = "3")]
    pub completion_tokens: u32,
    #[prost(string, tag = "4")]
    pub decode_worker_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Failed {
    /// A short machine-readable reason (`prefill_max_deliveries`, `worker_lost`, `engine_error`, ...).
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(string, tag = "3")]
    pub worker_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Cancelled {
    /// `client_disconnected`, `deadline`, ...
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// A worker announced itself.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerJoined {
    /// `prefill` or `decode`.
    #[prost(string, tag = "1")]
    pub role: String,
    #[prost(string, tag = "2")]
    pub transfer_endpoint: String,
    #[prost(string, tag = "3")]
    pub device: String,
    #[prost(string, tag = "4")]
    pub model: String,
    #[prost(uint32, tag = "5")]
    pub total_blocks: u32,
    #[prost(uint32, tag = "6")]
    pub block_size_tokens: u32,
    #[prost(uint32, tag = "7")]
    pub max_batch_sequences: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerHeartbeat {
    #[prost(uint32, tag = "1")]
    pub active_sequences: u32,
    #[prost(uint32, tag = "2")]
    pub waiting_sequences: u32,
    #[prost(uint32, tag = "3")]
    pub free_blocks: u32,
    #[prost(uint32, tag = "4")]
    pub queued_prefill_tokens: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerLeft {
    #[prost(string, tag = "1")]
    pub reason: String,
}

/// The scheduler declared a worker lost (its heartbeats stopped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerLost {
    #[prost(uint64, tag = "1")]
    pub last_heartbeat_ns: u64,
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// Full KV blocks a worker now holds, by chained prefix hash (the scheduler's prefix index is built from these).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KvBlocksStored {
    #[prost(uint64, repeated, tag = "1")]
    pub block_hashes: Vec<u64>,
    /// Hash of the block before the first one here; 0 when they start the sequence.
    #[prost(uint64, tag = "2")]
    pub parent_hash: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KvBlocksRemoved {
    #[prost(uint64, repeated, tag = "1")]
    pub block_hashes: Vec<u64>,
}
