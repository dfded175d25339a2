//! The receiving side shared by every transport: the table of transfers a decode worker awaits
//! ([`KvReceiver::expect`]), the checks of an arriving header against them, and the per-transfer
//! [`Session`] that verifies each layer and hands the result to the [`PendingTransfer`]. Transports only
//! move bytes; every decision to accept or refuse is made here, once, for all of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::buffer_pool::BufferPool;
use super::wire::{KvDtype, TransferHeader};
use super::{DEVICE_POOL_MARK, TransferError, TransferReport, TransportKind};
use crate::kv_cache::BlockId;
use crate::kv_cache::layout::KvLayout;

/// What a decode worker awaits for one request: the transfer must match all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedTransfer {
    pub request_id: String,
    pub model_fingerprint: u64,
    pub layout: KvLayout,
    pub dtype: KvDtype,
    pub num_tokens: u32,
    /// Prompt tokens already held here (cached prefix); the transfer starts at this token.
    pub from_token: u32,
    /// The reserved blocks for tokens `from_token..num_tokens`.
    pub block_ids: Vec<BlockId>,
}

/// A transfer that arrived whole and verified: per layer, that layer's part of every destination block.
/// Dropping it (once the KV is copied into the engine) gives its buffers back to the receiver that read
/// them, so the next transfer reads into memory already faulted in.
#[derive(Debug)]
pub struct ReceivedKv {
    pub header: TransferHeader,
    /// `header.layout.num_layers` chunks of `header.layer_chunk_bytes()` bytes.
    pub layers: Vec<Bytes>,
    pub first_token_id: Option<u32>,
    pub report: TransferReport,
    buffers: PoolHandle,
}

/// Where a [`ReceivedKv`]'s buffers go back to (none in process, where the sender's buffers arrive).
struct PoolHandle(Option<Arc<BufferPool>>);

impl std::fmt::Debug for PoolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "pooled"
        } else {
            "unpooled"
        })
    }
}

impl Drop for ReceivedKv {
    fn drop(&mut self) {
        let Some(pool) = self.buffers.0.take() else {
            return;
        };
        for layer in self.layers.drain(..) {
            // Only a buffer nobody else holds a view of can be written again.
            if let Ok(buffer) = layer.try_into_mut() {
                pool.give(buffer);
            }
        }
    }
}

type Completion = oneshot::Sender<Result<ReceivedKv, TransferError>>;

struct Expectation {
    expected: ExpectedTransfer,
    deadline: Instant,
    ticket: u64,
    completion: Completion,
}

/// State shared by a receiver, its pending transfers and its transport's connection tasks.
pub(crate) struct ReceiverCore {
    endpoint: String,
    expectations: Mutex<HashMap<String, Expectation>>,
    next_ticket: AtomicU64,
    /// Receive buffers, for transports that read into memory of their own (TCP); `None` where the
    /// sender's buffers are handed over (in process).
    buffers: Option<Arc<BufferPool>>,
    /// Whether senders may push KV straight into this worker's device pool ([`KvReceiver::offer_device_pool`]).
    accepts_device_push: std::sync::atomic::AtomicBool,
}

impl ReceiverCore {
    /// `pool_bytes`: how much receive memory to keep for reuse (0: none).
    pub(crate) fn new(endpoint: String, pool_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            expectations: Mutex::new(HashMap::new()),
            next_ticket: AtomicU64::new(0),
            buffers: (pool_bytes > 0).then(|| Arc::new(BufferPool::new(pool_bytes))),
            accepts_device_push: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// An empty buffer with room for `len` bytes, reused when one is retained.
    pub(crate) fn take_buffer(&self, len: usize) -> BytesMut {
        match &self.buffers {
            Some(pool) => pool.take(len),
            None => BytesMut::with_capacity(len),
        }
    }

    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn table(&self) -> MutexGuard<'_, HashMap<String, Expectation>> {
        // A panic while holding this lock cannot leave the map half-updated (every update is one insert or
        // remove), so a poisoned lock is still usable.
        self.expectations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn forget(&self, request_id: &str, ticket: u64) {
        let mut table = self.table();
        if table.get(request_id).is_some_and(|e| e.ticket == ticket) {
            table.remove(request_id);
        }
    }

    /// Checks an arriving header against what is expected. On success the expectation becomes this
    /// transfer's [`Session`] (a second sender for the same request is then unknown). On a mismatch the
    /// pending transfer fails with the same error the sender is refused with.
    pub(crate) fn admit(
        &self,
        header: TransferHeader,
        transport: TransportKind,
    ) -> Result<Session, TransferError> {
        let Some(expectation) = self.table().remove(&header.request_id) else {
            tracing::warn!(request_id = %header.request_id, endpoint = %self.endpoint, "refused an unexpected KV transfer");
            return Err(TransferError::UnknownRequest {
                request_id: header.request_id,
            });
        };
        let expected = &expectation.expected;
        let request_id = header.request_id.clone();
        let mismatch = if Instant::now() >= expectation.deadline {
            Some(TransferError::timeout(
                &request_id,
                "for the sender (it connected after the deadline)",
                Duration::ZERO,
            ))
        } else if header.model_fingerprint != expected.model_fingerprint {
            Some(TransferError::ModelMismatch {
                request_id,
                expected: expected.model_fingerprint,
                found: header.model_fingerprint,
            })
        } else if header.layout != expected.layout
            || !(header.dtype == expected.dtype
                || (header.dtype == KvDtype::DevicePush
                    && expected.dtype == KvDtype::F32
                    && self.accepts_device_push.load(Ordering::Relaxed)))
        {
            Some(TransferError::LayoutMismatch {
                request_id,
                expected: describe_layout(&expected.layout, expected.dtype),
                found: describe_layout(&header.layout, header.dtype),
            })
        } else if (header.num_tokens, header.from_token)
            != (expected.num_tokens, expected.from_token)
        {
            Some(TransferError::DestinationMismatch {
                request_id,
                detail: format!(
                    "tokens {}..{} sent, {}..{} expected",
                    header.from_token, header.num_tokens, expected.from_token, expected.num_tokens
                ),
            })
        } else if header.block_ids != expected.block_ids {
            Some(TransferError::DestinationMismatch {
                request_id,
                detail: format!(
                    "blocks {:?} sent, {:?} reserved",
                    abbreviate(&header.block_ids),
                    abbreviate(&expected.block_ids)
                ),
            })
        } else {
            None
        };
        if let Some(error) = mismatch {
            tracing::warn!(endpoint = %self.endpoint, %error, "refused a KV transfer");
            let refusal = Session::refusal_copy(&error);
            let _ = expectation.completion.send(Err(error));
            return Err(refusal);
        }
        Ok(Session {
            buffers: self.buffers.clone(),
            layers: Vec::with_capacity(header.layout.num_layers),
            header,
            completion: expectation.completion,
            deadline: expectation.deadline,
            started: Instant::now(),
            transport,
        })
    }

    /// Fails every awaited transfer: the receiver is going away.
    fn close(&self) {
        for (request_id, expectation) in self.table().drain() {
            let _ = expectation
                .completion
                .send(Err(TransferError::ReceiverClosed {
                    request_id,
                    endpoint: self.endpoint.clone(),
                    detail: "the receiver was dropped".into(),
                }));
        }
    }
}

fn describe_layout(layout: &KvLayout, dtype: KvDtype) -> String {
    format!(
        "{} layers x {} kv heads x head dim {} x {} tokens per block, {dtype:?}",
        layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size_tokens
    )
}

/// At most 8 ids then a count, so a refusal's reason stays short.
fn abbreviate(ids: &[BlockId]) -> String {
    if ids.len() <= 8 {
        format!("{ids:?}")
    } else {
        format!("{:?} and {} more", &ids[..8], ids.len() - 8)
    }
}

/// One accepted transfer on the receiving side: takes layers in order, verifies each.
pub(crate) struct Session {
    buffers: Option<Arc<BufferPool>>,
    header: TransferHeader,
    layers: Vec<Bytes>,
    completion: Completion,
    deadline: Instant,
    started: Instant,
    transport: TransportKind,
}

impl Session {
    pub(crate) fn header(&self) -> &TransferHeader {
        &self.header
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The layer the next frame must carry.
    pub(crate) fn next_layer(&self) -> u32 {
        self.layers.len() as u32
    }

    /// Checks a frame's announced layer and length before its payload is read (or allocated).
    pub(crate) fn check_frame(&self, layer: u32, len: usize) -> Result<(), TransferError> {
        let expected_len = self.header.layer_chunk_bytes();
        if layer != self.next_layer() || layer as usize >= self.header.layout.num_layers {
            return Err(self.malformed(format!(
                "layer {layer} arrived, layer {} of {} was next",
                self.next_layer(),
                self.header.layout.num_layers
            )));
        }
        if len != expected_len {
            return Err(self.malformed(format!(
                "layer {layer} chunk of {len} bytes, {expected_len} expected"
            )));
        }
        Ok(())
    }

    pub(crate) fn accept_layer(
        &mut self,
        layer: u32,
        bytes: Bytes,
        crc32: u32,
    ) -> Result<(), TransferError> {
        let found = crc32fast::hash(&bytes);
        self.accept_hashed_layer(layer, bytes, found, crc32)
    }

    /// [`Session::accept_layer`] for a transport that hashed the bytes as they arrived (`found`), while
    /// they were still in cache.
    pub(crate) fn accept_hashed_layer(
        &mut self,
        layer: u32,
        bytes: Bytes,
        found: u32,
        crc32: u32,
    ) -> Result<(), TransferError> {
        self.check_frame(layer, bytes.len())?;
        if found != crc32 {
            return Err(TransferError::Checksum {
                request_id: self.header.request_id.clone(),
                layer,
                expected: crc32,
                found,
            });
        }
        self.layers.push(bytes);
        Ok(())
    }

    /// Hands the verified transfer to the waiting decode worker. Fails (and the sender is refused) when a
    /// layer is missing or the worker stopped waiting.
    pub(crate) fn finish(self, first_token_id: Option<u32>) -> Result<(), TransferError> {
        if self.layers.len() != self.header.layout.num_layers {
            let error = self.malformed(format!(
                "ended after {} of {} layers",
                self.layers.len(),
                self.header.layout.num_layers
            ));
            return Err(self.fail(error));
        }
        let report = TransferReport {
            request_id: self.header.request_id.clone(),
            bytes: self.header.kv_bytes(),
            blocks: self.header.block_ids.len() as u32,
            layers: self.header.layout.num_layers as u32,
            duration_ns: self.started.elapsed().as_nanos() as u64,
            transport: self.transport,
        };
        report.record_metrics("receive");
        record_receive_span(&self.header, &report);
        let request_id = self.header.request_id.clone();
        let received = ReceivedKv {
            header: self.header,
            layers: self.layers,
            first_token_id,
            report,
            buffers: PoolHandle(self.buffers),
        };
        self.completion
            .send(Ok(received))
            .map_err(|_| TransferError::UnknownRequest { request_id })
    }

    /// Fails the pending transfer with `error`; returns a copy of it for the refusal sent to the sender.
    pub(crate) fn fail(self, error: TransferError) -> TransferError {
        tracing::warn!(%error, "KV transfer failed on the receiving side");
        let refusal = Self::refusal_copy(&error);
        let _ = self.completion.send(Err(error));
        refusal
    }

    /// The sender only needs the code and the message: a refusal with both.
    fn refusal_copy(error: &TransferError) -> TransferError {
        TransferError::Refused {
            endpoint: String::new(),
            request_id: String::new(),
            code: error.refusal_code(),
            reason: error.to_string(),
        }
    }

    fn malformed(&self, detail: String) -> TransferError {
        TransferError::Malformed {
            context: format!("transfer {}", self.header.request_id),
            detail,
        }
    }
}

/// The receiving end a decode worker owns: awaits the transfers it announced, refuses all others. Dropping
/// it stops its listener and fails every transfer still awaited.
pub struct KvReceiver {
    core: Arc<ReceiverCore>,
    task: JoinHandle<()>,
    /// The transport's endpoint with this worker's device pool appended, once offered.
    device_endpoint: Option<String>,
}

impl KvReceiver {
    pub(crate) fn new(core: Arc<ReceiverCore>, task: JoinHandle<()>) -> Self {
        Self {
            core,
            task,
            device_endpoint: None,
        }
    }

    /// Where prefill workers send (`tcp://127.0.0.1:PORT`, `inproc://NAME`, either followed by
    /// `?cudakv=<handle>` once a device pool is offered): goes into `KvDestination`.
    pub fn endpoint(&self) -> &str {
        self.device_endpoint
            .as_deref()
            .unwrap_or_else(|| self.core.endpoint())
    }

    /// Lets prefill workers that can reach `handle` (a GPU backend's
    /// [`crate::Engine::device_kv_handle`]: same host) copy the KV straight into the reserved device blocks
    /// ([`KvDtype::DevicePush`]) instead of sending it in the frames; others still send it the usual way.
    /// The handle travels in the endpoint.
    pub fn offer_device_pool(&mut self, handle: &str) {
        self.core.accepts_device_push.store(true, Ordering::Relaxed);
        self.device_endpoint = Some(format!(
            "{}{DEVICE_POOL_MARK}{handle}",
            self.core.endpoint()
        ));
    }

    /// Announces a transfer; it must arrive, whole and matching `expected`, within `timeout`.
    pub fn expect(
        &self,
        expected: ExpectedTransfer,
        timeout: Duration,
    ) -> Result<PendingTransfer, TransferError> {
        let (completion, result) = oneshot::channel();
        let ticket = self.core.next_ticket.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let request_id = expected.request_id.clone();
        let mut table = self.core.table();
        if table.contains_key(&request_id) {
            return Err(TransferError::AlreadyExpected { request_id });
        }
        table.insert(
            request_id.clone(),
            Expectation {
                expected,
                deadline,
                ticket,
                completion,
            },
        );
        Ok(PendingTransfer {
            request_id,
            deadline,
            timeout,
            ticket,
            result,
            core: Arc::clone(&self.core),
        })
    }
}

impl KvReceiver {
    /// Gives a transfer's buffers back once its KV is copied into the engine: the same as dropping it,
    /// spelled out where the reuse matters.
    pub fn recycle(&self, received: ReceivedKv) {
        drop(received);
    }
}

impl Drop for KvReceiver {
    fn drop(&mut self) {
        self.task.abort();
        self.core.close();
    }
}

/// A transfer a decode worker awaits. Dropping it (the request was cancelled) withdraws the expectation:
/// a sender arriving later is refused.
pub struct PendingTransfer {
    request_id: String,
    deadline: Instant,
    timeout: Duration,
    ticket: u64,
    result: oneshot::Receiver<Result<ReceivedKv, TransferError>>,
    core: Arc<ReceiverCore>,
}

impl PendingTransfer {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The verified transfer, or why there is none (refused, corrupted, or not complete by the deadline).
    pub async fn wait(mut self) -> Result<ReceivedKv, TransferError> {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        match tokio::time::timeout_at(deadline, &mut self.result).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(TransferError::ReceiverClosed {
                request_id: self.request_id.clone(),
                endpoint: self.core.endpoint().to_owned(),
                detail: "the transfer was dropped without a result".into(),
            }),
            Err(_) => Err(TransferError::timeout(
                &self.request_id,
                "for the KV to arrive",
                self.timeout,
            )),
        }
    }
}

impl Drop for PendingTransfer {
    fn drop(&mut self) {
        self.core.forget(&self.request_id, self.ticket);
        // A session already running learns it when it tries to deliver: the receiver end is closed here.
        self.result.close();
    }
}

/// The receiving end of a transfer as a span of the request's trace: a child of the sender's span, whose context
/// the header carries, from the header's acceptance to the last layer verified.
fn record_receive_span(header: &TransferHeader, report: &TransferReport) {
    use opentelemetry::KeyValue;
    let carried = tandem_events::schema::TraceContext {
        traceparent: header.trace_context.clone(),
        tracestate: String::new(),
    };
    let end = std::time::SystemTime::now();
    let start = end
        .checked_sub(Duration::from_nanos(report.duration_ns))
        .unwrap_or(end);
    tandem_events::trace::record_finished_span(
        "kv_transfer.receive",
        Some(&carried),
        start,
        end,
        vec![
            KeyValue::new("request_id", report.request_id.clone()),
            KeyValue::new("bytes", report.bytes as i64),
            KeyValue::new("blocks", i64::from(report.blocks)),
            KeyValue::new("layers", i64::from(report.layers)),
            KeyValue::new("transport", report.transport.as_str()),
        ],
    );
}
