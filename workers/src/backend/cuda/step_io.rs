//! The per-step copies between host and GPU of a decode step: its metadata up, the greedy tokens' keys down, and
//! for a drawn step its rows' parameters up and their draws down. All go through page-locked buffers kept for the backend's life, not pageable memory that the driver stages
//! itself (a download into pageable memory also waits for the stream inside the call and copies again on the
//! host). That measured within the noise of a step (PERF.md, stop 23); copies that overlap a running step, the
//! way to hide the host's part of one, need page-locked memory.

use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, PinnedHostSlice, result};

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

/// The page-locked buffers of the step copies. A step's copies must be complete (its stream synchronized)
/// before the next step's start here, which every forward step does before it returns.
pub(crate) struct StepIo {
    context: Arc<CudaContext>,
    meta: PinnedBuffer<u32>,
    keys: PinnedBuffer<u64>,
    draw_params: PinnedBuffer<f64>,
    draws: PinnedBuffer<u8>,
}

impl StepIo {
    pub(crate) fn new(context: &Arc<CudaContext>) -> Self {
        Self {
            context: Arc::clone(context),
            meta: PinnedBuffer::new(),
            keys: PinnedBuffer::new(),
            draw_params: PinnedBuffer::new(),
            draws: PinnedBuffer::new(),
        }
    }

    /// Queues the upload of `meta` to `target` (at least `meta.len()` u32) on `stream`.
    pub(crate) fn upload_meta(
        &mut self,
        meta: &[u32],
        target: CUdeviceptr,
        stream: CUstream,
    ) -> Result<(), CudaError> {
        self.meta
            .upload(&self.context, meta, target, stream, "the step metadata")
    }

    /// Copies `len` keys from `source` on `stream`, waits for the stream, and returns them.
    pub(crate) fn download_keys(
        &mut self,
        source: CUdeviceptr,
        len: usize,
        stream: &CudaStream,
    ) -> Result<&[u64], CudaError> {
        self.keys
            .download(&self.context, source, len, stream, "the greedy token keys")
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
