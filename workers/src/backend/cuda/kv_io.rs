//! The CUDA backend's side of the KV transfer (DESIGN.md §5, `workers/KV_TRANSFER.md`):
//!
//! - [`DevicePool`]: the KV pool in one plain `cuMemAlloc` allocation, so a CUDA IPC handle can name it
//!   (memory from the stream-ordered pool cannot be exported that way).
//! - [`KvStaging`]: a layer of many blocks to and from the host in one gather/scatter kernel and one copy
//!   through a pinned host buffer, the first and last hops of a transfer that crosses hosts over TCP.
//! - [`DeviceKvHandle`]: a destination pool named across processes (IPC handle, PCI bus id, process id,
//!   geometry) as one line of text that travels inside the transfer endpoint; [`DeviceDestinations`] opens
//!   one and copies blocks straight into it: device to device inside one context, `cuMemcpyPeerAsync`
//!   between two GPUs of one process, and through the opened IPC mapping from another process on the host.

use std::collections::HashMap;
use std::ffi::{CStr, c_char};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaSlice, PinnedHostSlice, result};

use super::device::{CudaError, DriverContext, GpuContext};

/// Turns a raw driver status into the backend's error.
fn check(status: CUresult, what: impl FnOnce() -> String) -> Result<(), CudaError> {
    status.result().during(what)
}

/// The KV pool: one `cuMemAlloc` allocation, freed with the backend.
pub(crate) struct DevicePool {
    pub(crate) address: u64,
    context: Arc<CudaContext>,
}

impl DevicePool {
    /// `bytes` of zeroed device memory from `cuMemAlloc`.
    pub(crate) fn new(gpu: &GpuContext, bytes: usize) -> Result<Self, CudaError> {
        gpu.context
            .bind_to_thread()
            .during(|| format!("binding cuda:{}", gpu.ordinal))?;
        // SAFETY: a plain allocation of `bytes`; zeroed below before anything reads it.
        let address = unsafe { result::malloc_sync(bytes.max(1)) }.during(|| {
            format!(
                "allocating the KV cache ({} MiB) on cuda:{}",
                bytes >> 20,
                gpu.ordinal
            )
        })?;
        let pool = Self {
            address,
            context: Arc::clone(&gpu.context),
        };
        // SAFETY: the allocation is `bytes` long and the stream belongs to its context.
        check(
            unsafe { sys::cuMemsetD8Async(address, 0, bytes, gpu.stream.cu_stream()) },
            || "zeroing the KV cache".into(),
        )?;
        Ok(pool)
    }

    /// A handle another process on this host can open ([`DeviceDestinations::push`]).
    pub(crate) fn handle(
        &self,
        gpu: &GpuContext,
        num_blocks: usize,
        block_bytes: usize,
    ) -> Result<DeviceKvHandle, CudaError> {
        gpu.context
            .bind_to_thread()
            .during(|| format!("binding cuda:{}", gpu.ordinal))?;
        let mut ipc = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: `address` is the base of a live `cuMemAlloc` allocation of this context.
        check(
            unsafe { sys::cuIpcGetMemHandle(&mut ipc, self.address) },
            || "getting a CUDA IPC handle of the KV cache".into(),
        )?;
        Ok(DeviceKvHandle {
            host_id: host_id(),
            pci_bus_id: pci_bus_id(gpu)?,
            process_id: std::process::id(),
            process_nonce: process_nonce(),
            address: self.address,
            num_blocks: num_blocks as u32,
            block_bytes: block_bytes as u64,
            ipc_handle: ipc.reserved.map(|byte| byte as u8),
        })
    }
}

impl Drop for DevicePool {
    fn drop(&mut self) {
        // Nothing to report a failure to while dropping; the context outlives this (it is held here).
        if self.context.bind_to_thread().is_ok() {
            // SAFETY: allocated by `malloc_sync` in this context, freed once.
            let _ = unsafe { result::free_sync(self.address) };
        }
    }
}

/// The PCI bus id of the backend's GPU (`0000:3b:00.0`), which names it across processes.
fn pci_bus_id(gpu: &GpuContext) -> Result<String, CudaError> {
    let mut text = [0 as c_char; 32];
    // SAFETY: the buffer is 32 bytes and the driver writes a NUL-terminated string into it.
    check(
        unsafe { sys::cuDeviceGetPCIBusId(text.as_mut_ptr(), 32, gpu.context.cu_device()) },
        || format!("reading the PCI bus id of cuda:{}", gpu.ordinal),
    )?;
    // SAFETY: NUL-terminated by the driver within the buffer.
    Ok(unsafe { CStr::from_ptr(text.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// This machine's identity for device handles: the kernel's boot id (another host, or this one rebooted,
/// cannot open a handle made here). `unknown` where it cannot be read, which no other host matches.
fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().replace('-', ""))
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".into())
}

/// A random number drawn once per process: tells this process from another with the same process id (two
/// containers of one host each have a process 1), which must never take the same-process path.
fn process_nonce() -> u64 {
    use std::hash::BuildHasher;
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NONCE
        .get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(std::process::id()))
}

/// Whether a prefill worker here can push KV straight into the device pool `handle` names: it parses and
/// was made on this host (the same process, or another one through CUDA IPC).
pub fn device_pool_reachable(handle: &str) -> bool {
    handle
        .parse::<DeviceKvHandle>()
        .is_ok_and(|handle| handle.host_id != "unknown" && handle.host_id == host_id())
}

/// Names a KV pool on a GPU of this host, for a sender to write destination blocks into it directly.
/// Text form (one line, no spaces):
/// `cudakv1:<host id>:<pci bus id>:<process id>:<process nonce hex>:<pool address hex>:<blocks>:<block bytes>:<IPC
/// handle, 128 hex>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKvHandle {
    /// The boot id of the host the pool is on.
    pub host_id: String,
    pub pci_bus_id: String,
    pub process_id: u32,
    /// The owner process's random nonce: the pool is in this process only if it equals ours.
    pub process_nonce: u64,
    /// The pool's device address in its owner's process (used only by senders in that same process).
    pub address: u64,
    pub num_blocks: u32,
    /// Bytes of one block in the pool (bf16).
    pub block_bytes: u64,
    pub ipc_handle: [u8; 64],
}

const HANDLE_PREFIX: &str = "cudakv1";

impl std::fmt::Display for DeviceKvHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A bus id holds colons, which separate the fields here: they travel as '-' (never in a bus id).
        write!(
            f,
            "{HANDLE_PREFIX}:{}:{}:{}:{:x}:{:x}:{}:{}:",
            self.host_id,
            self.pci_bus_id.replace(':', "-"),
            self.process_id,
            self.process_nonce,
            self.address,
            self.num_blocks,
            self.block_bytes
        )?;
        for byte in self.ipc_handle {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for DeviceKvHandle {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |what: &str| format!("device KV handle {text:?}: {what}");
        let parts: Vec<&str> = text.split(':').collect();
        let [
            prefix,
            host,
            bus,
            pid,
            nonce,
            address,
            blocks,
            block_bytes,
            ipc,
        ] = parts[..]
        else {
            return Err(bad("expected 9 fields separated by ':'"));
        };
        if host.is_empty() || host.len() > 64 || !host.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad("bad host id"));
        }
        if prefix != HANDLE_PREFIX {
            return Err(bad("not a cudakv1 handle"));
        }
        if bus.is_empty()
            || bus.len() > 31
            || !bus
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'.')
        {
            return Err(bad("bad PCI bus id"));
        }
        if ipc.len() != 128 {
            return Err(bad("the IPC handle must be 128 hex digits"));
        }
        let mut ipc_handle = [0u8; 64];
        for (index, byte) in ipc_handle.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&ipc[2 * index..2 * index + 2], 16)
                .map_err(|_| bad("the IPC handle is not hex"))?;
        }
        Ok(Self {
            host_id: host.to_owned(),
            pci_bus_id: bus.replace('-', ":"),
            process_id: pid.parse().map_err(|_| bad("bad process id"))?,
            process_nonce: u64::from_str_radix(nonce, 16).map_err(|_| bad("bad process nonce"))?,
            address: u64::from_str_radix(address, 16).map_err(|_| bad("bad address"))?,
            num_blocks: blocks.parse().map_err(|_| bad("bad block count"))?,
            block_bytes: block_bytes.parse().map_err(|_| bad("bad block size"))?,
            ipc_handle,
        })
    }
}

/// How [`DeviceDestinations::push`] reached a destination pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DevicePath {
    /// The same GPU in the same process: one device-to-device copy.
    SameDevice,
    /// Another GPU of this process: `cuMemcpyPeerAsync` (over NVLink/PCIe, peer access enabled if possible).
    Peer,
    /// Another process on this host: the pool opened with `cuIpcOpenMemHandle`, then device copies.
    Ipc,
}

impl DevicePath {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SameDevice => "cuda_same_device",
            Self::Peer => "cuda_peer",
            Self::Ipc => "cuda_ipc",
        }
    }
}

struct OpenDestination {
    base: u64,
    path: DevicePath,
    /// The destination's context, for peer copies.
    peer_context: Option<Arc<CudaContext>>,
}

/// Destination pools this backend has opened, by handle text; IPC mappings are closed with it.
#[derive(Default)]
pub(crate) struct DeviceDestinations {
    open: HashMap<String, OpenDestination>,
}

impl DeviceDestinations {
    /// Copies pool blocks `source_blocks[i]` of this GPU into blocks `destination_blocks[i]` of the pool
    /// `target` names, and waits for the copies. Runs of consecutive ids on both sides go as one copy.
    /// Returns the bytes copied and the path taken.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push(
        &mut self,
        gpu: &GpuContext,
        source_pool: u64,
        block_bytes: usize,
        target: &str,
        source_blocks: &[u32],
        destination_blocks: &[u32],
    ) -> Result<(u64, DevicePath), CudaError> {
        if source_blocks.len() != destination_blocks.len() {
            return Err(CudaError::Unsupported(format!(
                "{} source blocks for {} destination blocks",
                source_blocks.len(),
                destination_blocks.len()
            )));
        }
        let handle: DeviceKvHandle = target.parse().map_err(CudaError::Unsupported)?;
        if handle.block_bytes != block_bytes as u64 {
            return Err(CudaError::Unsupported(format!(
                "the destination's blocks hold {} bytes, this GPU's {block_bytes} (same model and block size needed)",
                handle.block_bytes
            )));
        }
        if let Some(&block) = destination_blocks
            .iter()
            .find(|&&block| block >= handle.num_blocks)
        {
            return Err(CudaError::Unsupported(format!(
                "destination block {block} is outside its pool of {} blocks",
                handle.num_blocks
            )));
        }
        gpu.context
            .bind_to_thread()
            .during(|| format!("binding cuda:{}", gpu.ordinal))?;
        self.close_pools_of_ended_processes();
        if !self.open.contains_key(target) {
            let opened = open(gpu, &handle)?;
            self.open.insert(target.to_owned(), opened);
        }
        let destination = &self.open[target];
        let stream = gpu.stream.cu_stream();
        let mut index = 0;
        while index < source_blocks.len() {
            let mut run = 1;
            while index + run < source_blocks.len()
                && source_blocks[index + run] == source_blocks[index] + run as u32
                && destination_blocks[index + run] == destination_blocks[index] + run as u32
            {
                run += 1;
            }
            let from = source_pool + source_blocks[index] as u64 * block_bytes as u64;
            let to = destination.base + destination_blocks[index] as u64 * block_bytes as u64;
            let bytes = run * block_bytes;
            // SAFETY: both ranges lie inside their pools (ids checked against both sizes; the source ids
            // come from this backend's block tables); the stream belongs to the bound context.
            let status = match &destination.peer_context {
                Some(peer) => unsafe {
                    sys::cuMemcpyPeerAsync(
                        to,
                        peer.cu_ctx(),
                        from,
                        gpu.context.cu_ctx(),
                        bytes,
                        stream,
                    )
                },
                None => unsafe { sys::cuMemcpyDtoDAsync_v2(to, from, bytes, stream) },
            };
            check(status, || {
                format!(
                    "copying {run} KV blocks to {} ({})",
                    handle.pci_bus_id,
                    destination.path.as_str()
                )
            })?;
            index += run;
        }
        gpu.stream
            .synchronize()
            .during(|| "waiting for the KV copies to another pool".into())?;
        Ok(((source_blocks.len() * block_bytes) as u64, destination.path))
    }

    /// Closes the IPC mappings of pools whose process has ended: the driver keeps an exported allocation alive
    /// while another process maps it, so a mapping left open would hold a restarted decode worker's old KV pool
    /// on its GPU. (Linux: a process is alive while `/proc/<pid>` exists.)
    fn close_pools_of_ended_processes(&mut self) {
        let ended: Vec<String> = self
            .open
            .iter()
            .filter(|(_, destination)| destination.path == DevicePath::Ipc)
            .filter(|(text, _)| {
                text.parse::<DeviceKvHandle>().is_ok_and(|handle| {
                    !std::path::Path::new(&format!("/proc/{}", handle.process_id)).exists()
                })
            })
            .map(|(text, _)| text.clone())
            .collect();
        for text in ended {
            if let Some(destination) = self.open.remove(&text) {
                // SAFETY: opened by `cuIpcOpenMemHandle` in this (bound) context, closed once.
                let _ = unsafe { sys::cuIpcCloseMemHandle(destination.base) };
            }
        }
    }

    /// Closes the IPC mappings (the backend's context must be bound).
    pub(crate) fn close(&mut self) {
        for (_, destination) in self.open.drain() {
            if destination.path == DevicePath::Ipc {
                // SAFETY: opened by `cuIpcOpenMemHandle` in this context, closed once.
                let _ = unsafe { sys::cuIpcCloseMemHandle(destination.base) };
            }
        }
    }
}

fn open(gpu: &GpuContext, handle: &DeviceKvHandle) -> Result<OpenDestination, CudaError> {
    let ours = pci_bus_id(gpu)?;
    let same_device = handle.pci_bus_id.eq_ignore_ascii_case(&ours);
    if handle.process_id == std::process::id() && handle.process_nonce == process_nonce() {
        if same_device {
            return Ok(OpenDestination {
                base: handle.address,
                path: DevicePath::SameDevice,
                peer_context: None,
            });
        }
        let bus = std::ffi::CString::new(handle.pci_bus_id.clone())
            .map_err(|_| CudaError::Unsupported("a PCI bus id with a NUL".into()))?;
        let mut device: sys::CUdevice = 0;
        // SAFETY: a NUL-terminated bus id and a place for the device.
        check(
            unsafe { sys::cuDeviceGetByPCIBusId(&mut device, bus.as_ptr()) },
            || format!("finding the GPU at {}", handle.pci_bus_id),
        )?;
        let ordinal = usize::try_from(device).unwrap_or(0);
        let peer = CudaContext::new(ordinal)
            .during(|| format!("opening the context of cuda:{ordinal} for peer copies"))?;
        let mut can_access = 0;
        // SAFETY: plain queries and a flag on this (bound) context.
        unsafe {
            check(
                sys::cuDeviceCanAccessPeer(&mut can_access, gpu.context.cu_device(), device),
                || "asking whether peer access is possible".into(),
            )?;
            gpu.context
                .bind_to_thread()
                .during(|| format!("binding cuda:{}", gpu.ordinal))?;
            if can_access == 1 {
                let status = sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0);
                if status != CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                    check(status, || {
                        format!(
                            "enabling peer access from cuda:{} to cuda:{ordinal}",
                            gpu.ordinal
                        )
                    })?;
                }
            }
        }
        return Ok(OpenDestination {
            base: handle.address,
            path: DevicePath::Peer,
            peer_context: Some(peer),
        });
    }
    let ipc = sys::CUipcMemHandle_st {
        reserved: handle.ipc_handle.map(|byte| byte as c_char),
    };
    let mut base = 0;
    // SAFETY: the handle came from `cuIpcGetMemHandle` in another process (a forged one fails here);
    // the mapping is closed in `close`.
    check(
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut base,
                ipc,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        },
        || {
            format!(
                "opening the KV cache of process {} on {} through CUDA IPC (same host needed)",
                handle.process_id, handle.pci_bus_id
            )
        },
    )?;
    Ok(OpenDestination {
        base,
        path: DevicePath::Ipc,
        peer_context: None,
    })
}

/// Page-locked host buffers that exported layers are copied into and handed out as [`Bytes`] (sent from
/// there by the TCP transport), taken back when the last `Bytes` of one is dropped. Pinned allocation is
/// slow (the pages are locked one by one), so up to [`PINNED_RETAINED_BYTES`] stay for reuse.
pub(crate) struct PinnedPool {
    context: Arc<CudaContext>,
    free: Mutex<Vec<PinnedHostSlice<u8>>>,
}

/// Pinned memory kept for reuse once free: a long prompt's layers of a small model, all in flight at once.
const PINNED_RETAINED_BYTES: usize = 2 << 30;
/// Pinned buffers are sized in steps of this, so layers of similar prompts reuse them.
const PINNED_GRANULE: usize = 1 << 20;

impl PinnedPool {
    pub(crate) fn new(context: &Arc<CudaContext>) -> Arc<Self> {
        Arc::new(Self {
            context: Arc::clone(context),
            free: Mutex::new(Vec::new()),
        })
    }

    /// A pinned buffer of at least `len` bytes: a free one that fits, or a new one.
    pub(crate) fn take(&self, len: usize) -> Result<PinnedHostSlice<u8>, CudaError> {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(index) = free.iter().position(|buffer| buffer.len() >= len) {
            return Ok(free.swap_remove(index));
        }
        drop(free);
        let size = len.div_ceil(PINNED_GRANULE).max(1) * PINNED_GRANULE;
        // Plain page-locked memory: write-combined memory (cudarc's default) is slow for the host to read.
        // SAFETY: every byte handed out is written by a device copy first.
        unsafe { self.context.alloc_pinned_with_flags::<u8>(size, 0) }
            .during(|| format!("allocating {} MiB of pinned host memory", size >> 20))
    }

    fn give_back(&self, buffer: PinnedHostSlice<u8>) {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let retained: usize = free.iter().map(PinnedHostSlice::len).sum();
        if retained + buffer.len() <= PINNED_RETAINED_BYTES {
            free.push(buffer);
        }
    }

    /// The first `len` bytes of `buffer` (written by a finished device copy) as [`Bytes`].
    pub(crate) fn into_bytes(
        self: &Arc<Self>,
        mut buffer: PinnedHostSlice<u8>,
        len: usize,
    ) -> Result<Bytes, CudaError> {
        let address = buffer
            .as_mut_ptr()
            .during(|| "reading a pinned buffer".into())? as usize;
        Ok(Bytes::from_owner(PinnedChunk {
            buffer: Some(buffer),
            address,
            len,
            pool: Arc::clone(self),
        }))
    }
}

/// A filled pinned buffer lent out as the contents of a [`Bytes`].
struct PinnedChunk {
    buffer: Option<PinnedHostSlice<u8>>,
    /// The buffer's host address (kept as a number: the buffer itself is what owns it).
    address: usize,
    len: usize,
    pool: Arc<PinnedPool>,
}

impl AsRef<[u8]> for PinnedChunk {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `address` is the start of `buffer`, alive as long as self, of at least `len` bytes that a
        // finished copy wrote; nothing writes them while lent.
        unsafe { std::slice::from_raw_parts(self.address as *const u8, self.len) }
    }
}

impl Drop for PinnedChunk {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}

/// The device staging buffers, sized for one layer of a transfer.
pub(crate) struct Staged<'a> {
    pub(crate) block_ids: &'a mut CudaSlice<u32>,
    /// One layer of every block, f32, on the device.
    pub(crate) chunk: &'a mut CudaSlice<f32>,
}

/// Device and pinned host buffers for moving one layer of many blocks, grown on demand.
pub(crate) struct KvStaging {
    capacity_floats: usize,
    capacity_blocks: usize,
    block_ids: Option<CudaSlice<u32>>,
    chunk: Option<CudaSlice<f32>>,
    /// Two pinned buffers of an import, so that the host fills one while the other is copied to the device.
    pinned: [Option<PinnedHostSlice<f32>>; 2],
    pinned_capacity_floats: usize,
}

impl KvStaging {
    pub(crate) fn new() -> Self {
        Self {
            capacity_floats: 0,
            capacity_blocks: 0,
            block_ids: None,
            chunk: None,
            pinned: [None, None],
            pinned_capacity_floats: 0,
        }
    }

    /// Makes room for `num_blocks` ids and `floats` f32 on the device.
    pub(crate) fn ensure(
        &mut self,
        gpu: &GpuContext,
        num_blocks: usize,
        floats: usize,
    ) -> Result<Staged<'_>, CudaError> {
        self.grow_device(gpu, num_blocks, floats)?;
        match (&mut self.block_ids, &mut self.chunk) {
            (Some(block_ids), Some(chunk)) => Ok(Staged { block_ids, chunk }),
            _ => Err(CudaError::Unsupported(
                "the KV staging buffers are missing".into(),
            )),
        }
    }

    /// As [`KvStaging::ensure`], and two pinned host buffers of `floats` f32 each for an import.
    pub(crate) fn ensure_import(
        &mut self,
        gpu: &GpuContext,
        num_blocks: usize,
        floats: usize,
    ) -> Result<(Staged<'_>, [&mut PinnedHostSlice<f32>; 2]), CudaError> {
        self.grow_device(gpu, num_blocks, floats)?;
        if floats > self.pinned_capacity_floats || self.pinned.iter().any(Option::is_none) {
            let capacity = floats.next_power_of_two().max(1 << 16);
            self.pinned = [None, None];
            for buffer in &mut self.pinned {
                // Plain page-locked memory (flags 0): the host writes it, a device copy reads it.
                // SAFETY: the host fills every byte a copy reads before the copy.
                *buffer = Some(
                    unsafe { gpu.context.alloc_pinned_with_flags::<f32>(capacity, 0) }
                        .during(|| "allocating a pinned KV import buffer".into())?,
                );
            }
            self.pinned_capacity_floats = capacity;
        }
        match (&mut self.block_ids, &mut self.chunk, &mut self.pinned) {
            (Some(block_ids), Some(chunk), [Some(first), Some(second)]) => {
                Ok((Staged { block_ids, chunk }, [first, second]))
            }
            _ => Err(CudaError::Unsupported(
                "the KV staging buffers are missing".into(),
            )),
        }
    }

    fn grow_device(
        &mut self,
        gpu: &GpuContext,
        num_blocks: usize,
        floats: usize,
    ) -> Result<(), CudaError> {
        if num_blocks > self.capacity_blocks || self.block_ids.is_none() {
            let capacity = num_blocks.next_power_of_two().max(64);
            self.block_ids = Some(
                gpu.stream
                    .alloc_zeros::<u32>(capacity)
                    .during(|| "allocating the KV transfer block ids".into())?,
            );
            self.capacity_blocks = capacity;
        }
        if floats > self.capacity_floats || self.chunk.is_none() {
            let capacity = floats.next_power_of_two().max(1 << 16);
            // Free the old one first: a long prompt's layer can be hundreds of MiB.
            self.chunk = None;
            self.chunk = Some(
                gpu.stream
                    .alloc_zeros::<f32>(capacity)
                    .during(|| "allocating the KV transfer staging chunk".into())?,
            );
            self.capacity_floats = capacity;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_handle_round_trips_through_its_text() {
        let handle = DeviceKvHandle {
            host_id: "0f3c9a1e22d84b7c9d5e6f7a8b9c0d1e".into(),
            pci_bus_id: "00000000:3B:00.0".into(),
            process_id: 4242,
            process_nonce: 0xdead_beef_1234,
            address: 0x7f00_1234_0000,
            num_blocks: 1024,
            block_bytes: 1_835_008,
            ipc_handle: std::array::from_fn(|index| (index * 37) as u8),
        };
        let text = handle.to_string();
        assert!(!text.contains(' '));
        assert_eq!(text.parse::<DeviceKvHandle>(), Ok(handle));
    }

    #[test]
    fn a_malformed_device_handle_is_an_error() {
        let good = DeviceKvHandle {
            host_id: host_id(),
            pci_bus_id: "0000:01:00.0".into(),
            process_id: 1,
            process_nonce: 2,
            address: 1,
            num_blocks: 1,
            block_bytes: 1,
            ipc_handle: [7; 64],
        }
        .to_string();
        for bad in [
            "",
            "cudakv1",
            &good.replacen("cudakv1", "cudakv2", 1),
            &good[..good.len() - 2],
            &good.replace(":1:", ":x:"),
            &format!("{good}:extra"),
        ] {
            assert!(bad.parse::<DeviceKvHandle>().is_err(), "{bad:?} parsed");
        }
        assert!(device_pool_reachable(&good) == (host_id() != "unknown"));
        let elsewhere = good.replacen(&host_id(), "abcdef", 1);
        assert!(!device_pool_reachable(&elsewhere));
    }
}
