//! The KV transfer service (DESIGN.md §5): a prefill worker pushes a prompt's KV, layer by layer, straight
//! into the blocks a decode worker reserved for it. Format and flow: `workers/KV_TRANSFER.md`.
//!
//! - [`KvTransport`] is the seam, with two implementations passing one conformance suite
//!   (`workers/tests/transfer.rs`): [`TcpTransport`] (any two hosts) and [`InProcessTransport`]
//!   (`tandem serve`, no copies).
//! - The decode worker owns a [`KvReceiver`] ([`KvTransport::listen`]), announces each transfer it awaits
//!   with [`KvReceiver::expect`], and gets the verified layers from [`PendingTransfer::wait`].
//! - The prefill worker opens a transfer with [`KvTransport::connect`] (the header is checked and accepted
//!   before any KV moves), streams layers with [`OutgoingTransfer::send_layer`] as they are produced, and
//!   gets a [`TransferReport`] from [`OutgoingTransfer::finish`] once the receiver confirms.
//! - [`engine_io`] moves the bytes between an [`crate::Engine`] and a transfer.
//!
//! Everything is checked (model fingerprint, layout, destination blocks, sizes, a crc32 per layer) and a
//! mismatch is refused on both sides with the same message; every wait has a timeout.

pub mod bench;
mod buffer_pool;
pub mod engine_io;
mod in_process;
mod receiver;
mod tcp;
pub mod wire;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

pub use in_process::{InProcessOutgoing, InProcessTransport};
pub use receiver::{ExpectedTransfer, KvReceiver, PendingTransfer, ReceivedKv};
pub use tcp::{TcpOutgoing, TcpTransport};
pub use wire::{KvDtype, TransferHeader};

use crate::model::config::ModelConfig;

/// Which transport moved a transfer; its `as_str` is the `transport` field of the `KvTransferred` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    InProcess,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::InProcess => "in_process",
        }
    }
}

/// Separates an endpoint from the device pool a decode worker offers in it
/// ([`KvReceiver::offer_device_pool`]).
pub const DEVICE_POOL_MARK: &str = "?cudakv=";

/// An endpoint without its device pool, and the pool's handle if it names one.
pub fn split_device_pool(endpoint: &str) -> (&str, Option<&str>) {
    match endpoint.split_once(DEVICE_POOL_MARK) {
        Some((base, handle)) => (base, Some(handle)),
        None => (endpoint, None),
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one transfer moved and how long it took, as seen by the side that reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferReport {
    pub request_id: String,
    /// KV bytes (every layer chunk; framing and checksums not counted).
    pub bytes: u64,
    /// Destination blocks written.
    pub blocks: u32,
    pub layers: u32,
    /// Sender: from connecting to the receiver's final confirmation. Receiver: from accepting the header
    /// to verifying the last layer.
    pub duration_ns: u64,
    pub transport: TransportKind,
}

impl TransferReport {
    /// Counts this transfer in `tandem:kv_transfer_bytes_total` and `tandem:kv_transfer_seconds` for one `side`
    /// (`send` on the prefill worker, `receive` on the decode worker).
    pub fn record_metrics(&self, side: &'static str) {
        use tandem_events::metric_names::{KV_TRANSFER_BYTES, KV_TRANSFER_SECONDS};
        let transport = self.transport.as_str();
        metrics::counter!(KV_TRANSFER_BYTES, "side" => side, "transport" => transport)
            .increment(self.bytes);
        metrics::histogram!(KV_TRANSFER_SECONDS, "side" => side, "transport" => transport)
            .record(self.duration_ns as f64 / 1e9);
    }

    /// The `KvTransferred` event body for this transfer.
    pub fn to_event(
        &self,
        from_worker_id: &str,
        to_worker_id: &str,
    ) -> tandem_events::schema::KvTransferred {
        tandem_events::schema::KvTransferred {
            from_worker_id: from_worker_id.to_owned(),
            to_worker_id: to_worker_id.to_owned(),
            bytes: self.bytes,
            blocks: self.blocks,
            duration_ns: self.duration_ns,
            transport: self.transport.as_str().to_owned(),
        }
    }

    /// Bytes per second over the transfer's duration, in GB/s (10^9 bytes).
    pub fn gigabytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.duration_ns.max(1) as f64
    }
}

/// How long each wait may last.
#[derive(Clone, Copy, Debug)]
pub struct TransferTimeouts {
    /// Connecting, and the receiver's answer to the header.
    pub handshake: Duration,
    /// Each write or read of a frame (a stalled peer fails the transfer after this long).
    pub io: Duration,
    /// The receiver's final confirmation after the last layer.
    pub ack: Duration,
}

impl Default for TransferTimeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(5),
            io: Duration::from_secs(10),
            ack: Duration::from_secs(10),
        }
    }
}

/// Why a receiver refused a transfer; travels on the wire as one byte (0 is "accepted").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalCode {
    UnknownRequest,
    ModelMismatch,
    LayoutMismatch,
    DestinationMismatch,
    Checksum,
    Malformed,
    UnsupportedVersion,
    Timeout,
    ReceiverClosed,
    /// A code this build does not know (a newer peer): the reason string still says why.
    Other(u8),
}

impl RefusalCode {
    pub fn as_u8(self) -> u8 {
        match self {
            Self::UnknownRequest => 1,
            Self::ModelMismatch => 2,
            Self::LayoutMismatch => 3,
            Self::DestinationMismatch => 4,
            Self::Checksum => 5,
            Self::Malformed => 6,
            Self::UnsupportedVersion => 7,
            Self::Timeout => 8,
            Self::ReceiverClosed => 9,
            Self::Other(code) => code,
        }
    }

    pub fn from_u8(code: u8) -> Self {
        match code {
            1 => Self::UnknownRequest,
            2 => Self::ModelMismatch,
            3 => Self::LayoutMismatch,
            4 => Self::DestinationMismatch,
            5 => Self::Checksum,
            6 => Self::Malformed,
            7 => Self::UnsupportedVersion,
            8 => Self::Timeout,
            9 => Self::ReceiverClosed,
            other => Self::Other(other),
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownRequest => f.write_str("unknown request"),
            Self::ModelMismatch => f.write_str("model mismatch"),
            Self::LayoutMismatch => f.write_str("layout mismatch"),
            Self::DestinationMismatch => f.write_str("destination mismatch"),
            Self::Checksum => f.write_str("checksum mismatch"),
            Self::Malformed => f.write_str("malformed transfer"),
            Self::UnsupportedVersion => f.write_str("unsupported version"),
            Self::Timeout => f.write_str("timeout"),
            Self::ReceiverClosed => f.write_str("receiver closed"),
            Self::Other(code) => write!(f, "refusal code {code}"),
        }
    }
}

/// Why a transfer failed. On the receiver, the variant says what was wrong; the sender gets the same
/// message inside [`TransferError::Refused`].
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{endpoint} refused KV transfer {request_id} ({code}): {reason}")]
    Refused {
        endpoint: String,
        request_id: String,
        code: RefusalCode,
        reason: String,
    },
    #[error(
        "KV transfer {request_id} is not expected by this receiver (never announced, already received, timed out or cancelled)"
    )]
    UnknownRequest { request_id: String },
    #[error("KV transfer {request_id} is already expected by this receiver")]
    AlreadyExpected { request_id: String },
    #[error(
        "KV transfer {request_id}: model fingerprint {found:#018x} differs from this worker's {expected:#018x} (prefill and decode workers must serve the same model)"
    )]
    ModelMismatch {
        request_id: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "KV transfer {request_id}: layout {found} differs from this worker's {expected} (same model, block size and KV dtype needed)"
    )]
    LayoutMismatch {
        request_id: String,
        expected: String,
        found: String,
    },
    #[error("KV transfer {request_id}: destination differs from the reserved one: {detail}")]
    DestinationMismatch { request_id: String, detail: String },
    #[error(
        "KV transfer {request_id}: layer {layer} checksum {found:#010x} differs from the {expected:#010x} sent (corrupted in transit)"
    )]
    Checksum {
        request_id: String,
        layer: u32,
        expected: u32,
        found: u32,
    },
    #[error("malformed KV transfer ({context}): {detail}")]
    Malformed { context: String, detail: String },
    #[error("KV transfer wire version {found} is not supported (this build speaks {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("KV transfer {request_id}: timed out after {after_ms} ms {waiting_for}")]
    Timeout {
        request_id: String,
        waiting_for: String,
        after_ms: u64,
    },
    #[error("KV transfer {request_id}: the receiver at {endpoint} closed ({detail})")]
    ReceiverClosed {
        request_id: String,
        endpoint: String,
        detail: String,
    },
    #[error("KV transfer endpoint {endpoint:?}: {detail}")]
    BadEndpoint { endpoint: String, detail: String },
    #[error("KV transfer {request_id}: {context}: {source}")]
    Io {
        request_id: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl TransferError {
    /// The code a receiver sends when this error makes it refuse a transfer.
    pub fn refusal_code(&self) -> RefusalCode {
        match self {
            Self::Refused { code, .. } => *code,
            Self::UnknownRequest { .. } | Self::AlreadyExpected { .. } => {
                RefusalCode::UnknownRequest
            }
            Self::ModelMismatch { .. } => RefusalCode::ModelMismatch,
            Self::LayoutMismatch { .. } => RefusalCode::LayoutMismatch,
            Self::DestinationMismatch { .. } => RefusalCode::DestinationMismatch,
            Self::Checksum { .. } => RefusalCode::Checksum,
            Self::Malformed { .. } | Self::BadEndpoint { .. } | Self::Io { .. } => {
                RefusalCode::Malformed
            }
            Self::UnsupportedVersion { .. } => RefusalCode::UnsupportedVersion,
            Self::Timeout { .. } => RefusalCode::Timeout,
            Self::ReceiverClosed { .. } => RefusalCode::ReceiverClosed,
        }
    }

    pub(crate) fn timeout(
        request_id: &str,
        waiting_for: impl Into<String>,
        after: Duration,
    ) -> Self {
        Self::Timeout {
            request_id: request_id.to_owned(),
            waiting_for: waiting_for.into(),
            after_ms: after.as_millis() as u64,
        }
    }
}

/// A transport between prefill and decode workers. Implementations: [`TcpTransport`],
/// [`InProcessTransport`]; both pass `workers/tests/transfer.rs`.
pub trait KvTransport: Send + Sync {
    type Outgoing: OutgoingTransfer;

    fn kind(&self) -> TransportKind;

    /// Starts a receiver: for TCP `address` is `host:port` (port 0 picks one), in process it is a name. The
    /// receiver's [`KvReceiver::endpoint`] is what a prefill worker passes to [`KvTransport::connect`].
    fn listen(
        &self,
        address: &str,
    ) -> impl Future<Output = Result<KvReceiver, TransferError>> + Send;

    /// Opens a transfer to `endpoint`: sends `header` and waits for the receiver to accept it, so a refusal
    /// (unknown request, other model or layout) arrives before any KV is computed or sent.
    fn connect(
        &self,
        endpoint: &str,
        header: TransferHeader,
    ) -> impl Future<Output = Result<Self::Outgoing, TransferError>> + Send;
}

/// An accepted transfer on the sending side: layers in order `0..num_layers`, then [`finish`].
///
/// [`finish`]: OutgoingTransfer::finish
pub trait OutgoingTransfer: Send {
    /// The header the receiver accepted.
    fn header(&self) -> &TransferHeader;

    /// Sends the next layer's chunk ([`TransferHeader::layer_chunk_bytes`] bytes) with the crc32 the
    /// producer computed of it (e.g. while exporting); the receiver refuses the transfer if they differ.
    fn send_layer_with_crc32(
        &mut self,
        bytes: Bytes,
        crc32: u32,
    ) -> impl Future<Output = Result<(), TransferError>> + Send;

    /// Sends the next layer's chunk, checksummed here.
    fn send_layer(
        &mut self,
        bytes: Bytes,
    ) -> impl Future<Output = Result<(), TransferError>> + Send {
        let crc32 = crc32fast::hash(&bytes);
        self.send_layer_with_crc32(bytes, crc32)
    }

    /// Ends the transfer after the last layer, with the first token the prefill side sampled if it has
    /// one, and waits for the receiver to confirm that everything arrived intact.
    fn finish(
        self,
        first_token_id: Option<u32>,
    ) -> impl Future<Output = Result<TransferReport, TransferError>> + Send;
}

/// Sends a whole transfer whose layers are all at hand.
pub async fn send_all<T: KvTransport>(
    transport: &T,
    endpoint: &str,
    header: TransferHeader,
    layers: Vec<Bytes>,
    first_token_id: Option<u32>,
) -> Result<TransferReport, TransferError> {
    let mut outgoing = transport.connect(endpoint, header).await?;
    for layer in layers {
        outgoing.send_layer(layer).await?;
    }
    outgoing.finish(first_token_id).await
}

/// A stable 64-bit identity of a model, compared by the receiver before it takes any KV: FNV-1a over the
/// config fields that shape or change the KV (layers, q and kv heads, head dim, hidden, intermediate,
/// vocabulary, RoPE theta, RMS-norm epsilon, tied embeddings), then over `weights_tag`: bytes that name
/// the weights (for a checkpoint, e.g. its safetensors headers or a revision string; for the built-in
/// model, [`crate::BUILTIN_SEED`]). FNV rather than std's hasher because std's may change between Rust
/// releases and the two workers may be built apart. Hashing all weights would cost seconds per start on
/// large checkpoints, so it is left to the tag.
pub fn model_fingerprint(config: &ModelConfig, weights_tag: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(PRIME);
        }
    };
    for field in [
        config.num_layers,
        config.num_q_heads,
        config.num_kv_heads,
        config.head_dim,
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    ] {
        feed(&(field as u64).to_le_bytes());
    }
    feed(&config.rope_theta.to_bits().to_le_bytes());
    feed(&config.rms_norm_eps.to_bits().to_le_bytes());
    feed(&[config.tie_word_embeddings as u8]);
    feed(&(weights_tag.len() as u64).to_le_bytes());
    feed(weights_tag);
    hash
}

/// The sender's view of a receiver's refusal.
pub(crate) fn refused(endpoint: &str, request_id: &str, reply: wire::Reply) -> TransferError {
    match reply {
        wire::Reply::Refused { code, reason } => TransferError::Refused {
            endpoint: endpoint.to_owned(),
            request_id: request_id.to_owned(),
            code,
            reason,
        },
        wire::Reply::Ok => TransferError::Malformed {
            context: format!("transfer {request_id}"),
            detail: "an acceptance where a refusal was expected".into(),
        },
    }
}

/// Splits `tcp://host:port` or `inproc://name` (a device pool after it left out) into scheme and rest.
pub(crate) fn split_endpoint<'a>(
    endpoint: &'a str,
    scheme: &str,
) -> Result<&'a str, TransferError> {
    split_device_pool(endpoint)
        .0
        .strip_prefix(scheme)
        .and_then(|rest| rest.strip_prefix("://"))
        .filter(|rest| !rest.is_empty())
        .ok_or_else(|| TransferError::BadEndpoint {
            endpoint: endpoint.to_owned(),
            detail: format!("expected {scheme}://…"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin_config;

    #[test]
    fn fingerprint_is_stable_and_sees_config_and_weights() {
        let config = builtin_config();
        let tag = crate::BUILTIN_SEED.to_le_bytes();
        assert_eq!(
            model_fingerprint(&config, &tag),
            model_fingerprint(&config, &tag)
        );
        assert_ne!(
            model_fingerprint(&config, &tag),
            model_fingerprint(&config, b"other")
        );
        let other = ModelConfig {
            rope_theta: 10_000.0,
            ..config.clone()
        };
        assert_ne!(
            model_fingerprint(&config, &tag),
            model_fingerprint(&other, &tag)
        );
    }

    #[test]
    fn refusal_codes_round_trip() {
        for code in 1..=12u8 {
            assert_eq!(RefusalCode::from_u8(code).as_u8(), code);
        }
    }
}
