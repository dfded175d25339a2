//! The per-step copies between host and GPU of a decode step: its metadata up, the greedy picks (fused argmax keys
//! or `argmax_rows` tokens) down, and for a drawn step its rows' parameters up and their draws down. All go through
//! page-locked buffers kept for the backend's life, not pageable memory that the driver stages itself (a download
//! into pageable memory also waits for the stream inside the call and copies again on the host). The metadata and
//! the picks have two buffers each, used in turn with an event after each copy: a greedy step queued ahead
//! uploads its metadata and the step before it downloads its picks while the GPU still runs (PERF.md, stop 25).

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DeviceRepr, PinnedHostSlice, result};

use super::device::{CudaError, DriverContext};
use super::kernels::DRAW_OUT_BYTES;

/// A page-locked host buffer that grows to the largest copy asked of it.
struct PinnedBuffer<T> {
    buffer: Option<PinnedHostSlice<T>>,
}

impl<T: DeviceRepr + cudarc::driver::ValidAsZeroBits> PinnedBuffer<T> {
    fn new() -> Self {
        Self { buffer: None }
    }

    /// The first `len` elements, growing the buffer first if it is smaller.
    fn slice_mut(&mut self, context: &Arc<CudaContext>, len: usize) -> Result<&mut [T], CudaError> {
        if self.buffer.as_ref().is_none_or(|buffer| buffer.len() < len) {
            let capacity = len.next_power_of_two().max(64);
            // Plain page-locked memory (flags 0): the host reads the keys back, and write-combined memory
            // (cudarc's default) is slow to read.
            // SAFETY: nothing reads the new buffer before a copy or the host writes it.
            let buffer = unsafe { context.alloc_pinned_with_flags::<T>(capacity, 0) }
                .during(|| format!("allocating {capacity} page-locked elements for step copies"))?;
            self.buffer = Some(buffer);
        }
        let buffer = self
            .buffer
            .as_mut()
            .ok_or_else(|| CudaError::Unsupported("a step copy buffer was not allocated".into()))?;
        // The buffer's own event is never recorded (copies here go through the raw driver calls), so this
        // returns at once.
        Ok(&mut buffer
            .as_mut_slice()
            .during(|| "reading a page-locked step buffer".into())?[..len])
    }
}

/// Two page-locked buffers used in turn, each with an event recorded after the last copy queued on it: a copy
/// can be queued while the one on the other buffer is still in flight, and a buffer is not touched by the host
/// while its copy may still run.
struct PinnedSlots<T> {
    buffers: [PinnedBuffer<T>; 2],
    copied: [Option<CudaEvent>; 2],
}

impl<T: DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy> PinnedSlots<T> {
    fn new() -> Self {
        Self {
            buffers: [PinnedBuffer::new(), PinnedBuffer::new()],
            copied: [None, None],
        }
    }

    /// Waits for the last copy queued on buffer `slot`, if any.
    fn wait(&self, slot: usize, what: &str) -> Result<(), CudaError> {
        match &self.copied[slot] {
            Some(event) => event
                .synchronize()
                .during(|| format!("waiting for the copy of {what}")),
            None => Ok(()),
        }
    }

    /// Records on `stream` that the copy just queued on buffer `slot` ends here.
    fn record(
        &mut self,
        context: &Arc<CudaContext>,
        slot: usize,
        stream: &CudaStream,
        what: &str,
    ) -> Result<(), CudaError> {
        if self.copied[slot].is_none() {
            self.copied[slot] = Some(
                context
                    .new_event(None)
                    .during(|| format!("creating the event of {what}'s copies"))?,
            );
        }
        match &self.copied[slot] {
            Some(event) => event
                .record(stream)
                .during(|| format!("recording the copy of {what}")),
            None => Ok(()),
        }
    }

    /// Stages `data` in buffer `slot` once its last copy is done and queues its copy to `target` (at least
    /// `data.len()` elements) on `stream`.
    fn upload(
        &mut self,
        context: &Arc<CudaContext>,
        slot: usize,
        data: &[T],
        target: CUdeviceptr,
        stream: &CudaStream,
        what: &str,
    ) -> Result<(), CudaError> {
        self.wait(slot, what)?;
        let staged = self.buffers[slot].slice_mut(context, data.len())?;
        staged.copy_from_slice(data);
        // SAFETY: `target` holds at least `data.len()` elements (the caller's contract); the host does not
        // write this buffer again before the event recorded below has passed (`wait`).
        unsafe { result::memcpy_htod_async(target, staged, stream.cu_stream()) }
            .during(|| format!("uploading {what}"))?;
        self.record(context, slot, stream, what)
    }

    /// Queues the copy of `len` elements of `what` from `source` into buffer `slot` on `stream`;
    /// [`PinnedSlots::downloaded`] gives them once it is done.
    fn queue_download(
        &mut self,
        context: &Arc<CudaContext>,
        slot: usize,
        source: CUdeviceptr,
        len: usize,
        stream: &CudaStream,
        what: &str,
    ) -> Result<(), CudaError> {
        self.wait(slot, what)?;
        let staged = self.buffers[slot].slice_mut(context, len)?;
        // SAFETY: `source` holds at least `len` elements (the caller's contract); the buffer lives as long as
        // the backend, is not reallocated before the copy's event has passed (`slice_mut` only grows it from
        // `queue_download`, after `wait`), and the host reads it only after that event (`downloaded`).
        unsafe { result::memcpy_dtoh_async(staged, source, stream.cu_stream()) }
            .during(|| format!("copying {what} to the host"))?;
        self.record(context, slot, stream, what)
    }

    /// The first `len` elements of buffer `slot`, once the copy queued on it is done.
    fn downloaded(
        &mut self,
        context: &Arc<CudaContext>,
        slot: usize,
        len: usize,
        what: &str,
    ) -> Result<&[T], CudaError> {
        self.wait(slot, what)?;
        Ok(self.buffers[slot].slice_mut(context, len)?)
    }
}

/// The page-locked buffers of the step copies, each kind two used in turn behind events: a step queued ahead
/// uploads its metadata (and draw parameters) while the step before it runs, and each step's picks come down
/// while the next one runs.
pub(crate) struct StepIo {
    context: Arc<CudaContext>,
    meta: PinnedSlots<u32>,
    /// The buffer of the next metadata upload.
    next_meta_slot: usize,
    draw_params: PinnedSlots<f64>,
    next_draw_params_slot: usize,
    keys: PinnedSlots<u64>,
    tokens: PinnedSlots<u32>,
    draws: PinnedSlots<u8>,
}

/// What a step picked, as it comes down: the fused argmax's keys (u64 a row), `argmax_rows`'s tokens (u32 a row),
/// or row draws (`DrawOut`, [`DRAW_OUT_BYTES`] a row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PicksKind {
    Keys,
    Tokens,
    Draws,
}

/// Which buffer holds a step's picks on their way to the host ([`StepIo::queue_picks`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PicksSlot {
    slot: usize,
    kind: PicksKind,
    rows: usize,
}

impl PicksSlot {
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn kind(&self) -> PicksKind {
        self.kind
    }
}

/// A step's picks on the host.
pub(crate) enum Picks<'a> {
    Keys(&'a [u64]),
    Tokens(&'a [u32]),
    /// [`DRAW_OUT_BYTES`] a row.
    Draws(&'a [u8]),
}

impl StepIo {
    pub(crate) fn new(context: &Arc<CudaContext>) -> Self {
        Self {
            context: Arc::clone(context),
            meta: PinnedSlots::new(),
            next_meta_slot: 0,
            draw_params: PinnedSlots::new(),
            next_draw_params_slot: 0,
            keys: PinnedSlots::new(),
            tokens: PinnedSlots::new(),
            draws: PinnedSlots::new(),
        }
    }

    /// Queues the upload of `meta` to `target` (at least `meta.len()` u32) on `stream`. It may be queued while
    /// the previous step runs: the two buffers take turns.
    pub(crate) fn upload_meta(
        &mut self,
        meta: &[u32],
        target: CUdeviceptr,
        stream: &CudaStream,
    ) -> Result<(), CudaError> {
        let slot = self.next_meta_slot;
        self.next_meta_slot ^= 1;
        self.meta.upload(
            &self.context,
            slot,
            meta,
            target,
            stream,
            "the step metadata",
        )
    }

    /// Queues the copy of a step's `rows` picks of `kind` from `source` into buffer `slot` (0 or 1; a slot is
    /// reused only once its picks were read) on `stream`.
    pub(crate) fn queue_picks(
        &mut self,
        slot: usize,
        kind: PicksKind,
        source: CUdeviceptr,
        rows: usize,
        stream: &CudaStream,
    ) -> Result<PicksSlot, CudaError> {
        let context = &self.context;
        match kind {
            PicksKind::Keys => {
                self.keys
                    .queue_download(context, slot, source, rows, stream, "the greedy keys")?
            }
            PicksKind::Tokens => self.tokens.queue_download(
                context,
                slot,
                source,
                rows,
                stream,
                "the greedy tokens",
            )?,
            PicksKind::Draws => self.draws.queue_download(
                context,
                slot,
                source,
                rows * DRAW_OUT_BYTES,
                stream,
                "the row draws",
            )?,
        }
        Ok(PicksSlot { slot, kind, rows })
    }

    /// The picks of a [`StepIo::queue_picks`], once their copy is done.
    pub(crate) fn picks(&mut self, queued: PicksSlot) -> Result<Picks<'_>, CudaError> {
        let context = &self.context;
        let (slot, rows) = (queued.slot, queued.rows);
        Ok(match queued.kind {
            PicksKind::Keys => {
                Picks::Keys(
                    self.keys
                        .downloaded(context, slot, rows, "the greedy keys")?,
                )
            }
            PicksKind::Tokens => {
                Picks::Tokens(
                    self.tokens
                        .downloaded(context, slot, rows, "the greedy tokens")?,
                )
            }
            PicksKind::Draws => Picks::Draws(self.draws.downloaded(
                context,
                slot,
                rows * DRAW_OUT_BYTES,
                "the row draws",
            )?),
        })
    }

    /// Queues the upload of a drawn step's `params` (two f64 a row) to `target` (at least as long) on `stream`,
    /// from the two buffers in turn like the metadata.
    pub(crate) fn upload_draw_params(
        &mut self,
        params: &[f64],
        target: CUdeviceptr,
        stream: &CudaStream,
    ) -> Result<(), CudaError> {
        let slot = self.next_draw_params_slot;
        self.next_draw_params_slot ^= 1;
        self.draw_params.upload(
            &self.context,
            slot,
            params,
            target,
            stream,
            "the row draws' parameters",
        )
    }
}
