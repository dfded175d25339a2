//! The per-step copies between host and GPU of a decode step: its metadata up, the greedy picks (fused argmax keys
//! or `argmax_rows` tokens) down, and for a drawn step its rows' parameters up and their draws down. All go through
//! page-locked buffers kept for the backend's life, not pageable memory that the driver stages itself (a download
//! into pageable memory also waits for the stream inside the call and copies again on the host). The metadata and
//! the picks have two buffers each, used in turn with an event after each copy: a greedy step queued ahead
//! uploads its metadata and the step before it downloads its picks while the GPU still runs (PERF.md, stop 25).

use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DeviceRepr, PinnedHostSlice, result};

use super::device::{CudaError, DriverContext};

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

impl<T: DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy> PinnedBuffer<T> {
    /// Stages `data` (`what`, for errors) here and queues its copy to `target` (at least `data.len()` elements)
    /// on `stream`.
    fn upload(
        &mut self,
        context: &Arc<CudaContext>,
        data: &[T],
        target: CUdeviceptr,
        stream: CUstream,
        what: &str,
    ) -> Result<(), CudaError> {
        let staged = self.slice_mut(context, data.len())?;
        staged.copy_from_slice(data);
        // SAFETY: `target` holds at least `data.len()` elements (the caller's contract); the page-locked source
        // is not written again before the stream is synchronized (see `StepIo`).
        unsafe { result::memcpy_htod_async(target, staged, stream) }
            .during(|| format!("uploading {what}"))
    }

    /// Copies `len` elements of `what` from `source` on `stream`, waits for the stream, and returns them.
    fn download(
        &mut self,
        context: &Arc<CudaContext>,
        source: CUdeviceptr,
        len: usize,
        stream: &CudaStream,
        what: &str,
    ) -> Result<&[T], CudaError> {
        let staged = self.slice_mut(context, len)?;
        // SAFETY: `source` holds at least `len` elements (the caller's contract), and the destination outlives
        // the copy: the stream is synchronized before this returns.
        unsafe { result::memcpy_dtoh_async(staged, source, stream.cu_stream()) }
            .during(|| format!("copying {what} to the host"))?;
        stream
            .synchronize()
            .during(|| format!("waiting for {what}"))?;
        Ok(staged)
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

/// The page-locked buffers of the step copies. A drawn step's copies must be complete (its stream synchronized)
/// before the next drawn step starts here, which every drawn step does before it returns; the metadata and the
/// picks alternate between two buffers guarded by events instead.
pub(crate) struct StepIo {
    context: Arc<CudaContext>,
    meta: PinnedSlots<u32>,
    /// The buffer of the next metadata upload.
    next_meta_slot: usize,
    keys: PinnedSlots<u64>,
    tokens: PinnedSlots<u32>,
    draw_params: PinnedBuffer<f64>,
    draws: PinnedBuffer<u8>,
}

/// Which buffer holds a greedy step's picks on their way to the host ([`StepIo::queue_picks`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PicksSlot {
    slot: usize,
    /// Fused argmax keys (u64) rather than `argmax_rows` tokens (u32).
    keys: bool,
    rows: usize,
}

impl PicksSlot {
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Whether the picks are fused argmax keys rather than `argmax_rows` tokens.
    pub(crate) fn holds_keys(&self) -> bool {
        self.keys
    }
}

/// A greedy step's picks on the host: the fused argmax's keys or `argmax_rows`'s tokens.
pub(crate) enum Picks<'a> {
    Keys(&'a [u64]),
    Tokens(&'a [u32]),
}

impl StepIo {
    pub(crate) fn new(context: &Arc<CudaContext>) -> Self {
        Self {
            context: Arc::clone(context),
            meta: PinnedSlots::new(),
            next_meta_slot: 0,
            keys: PinnedSlots::new(),
            tokens: PinnedSlots::new(),
            draw_params: PinnedBuffer::new(),
            draws: PinnedBuffer::new(),
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

    /// Queues the copy of a greedy step's `rows` picks from `source` (keys with `keys`, else tokens) into
    /// buffer `slot` (0 or 1; a slot is reused only once its picks were read) on `stream`.
    pub(crate) fn queue_picks(
        &mut self,
        slot: usize,
        keys: bool,
        source: CUdeviceptr,
        rows: usize,
        stream: &CudaStream,
    ) -> Result<PicksSlot, CudaError> {
        if keys {
            self.keys.queue_download(
                &self.context,
                slot,
                source,
                rows,
                stream,
                "the greedy keys",
            )?;
        } else {
            self.tokens.queue_download(
                &self.context,
                slot,
                source,
                rows,
                stream,
                "the greedy tokens",
            )?;
        }
        Ok(PicksSlot { slot, keys, rows })
    }

    /// The picks of a [`StepIo::queue_picks`], once their copy is done.
    pub(crate) fn picks(&mut self, queued: PicksSlot) -> Result<Picks<'_>, CudaError> {
        Ok(if queued.keys {
            Picks::Keys(self.keys.downloaded(
                &self.context,
                queued.slot,
                queued.rows,
                "the greedy keys",
            )?)
        } else {
            Picks::Tokens(self.tokens.downloaded(
                &self.context,
                queued.slot,
                queued.rows,
                "the greedy tokens",
            )?)
        })
    }

    /// Queues the upload of a drawn step's `params` (two f64 a row) to `target` (at least as long) on `stream`.
    pub(crate) fn upload_draw_params(
        &mut self,
        params: &[f64],
        target: CUdeviceptr,
        stream: CUstream,
    ) -> Result<(), CudaError> {
        self.draw_params.upload(
            &self.context,
            params,
            target,
            stream,
            "the row draws' parameters",
        )
    }

    /// Copies `len` bytes of row draws from `source` on `stream`, waits for the stream, and returns them.
    pub(crate) fn download_draws(
        &mut self,
        source: CUdeviceptr,
        len: usize,
        stream: &CudaStream,
    ) -> Result<&[u8], CudaError> {
        self.draws
            .download(&self.context, source, len, stream, "the row draws")
    }
}
