//! [`CudaBackend`]: the Qwen3 forward pass on one NVIDIA GPU through cudarc. Weights live on the GPU in
//! bf16 and the paged KV cache in device memory (bf16, the block order of `KV_LAYOUT.md`); projections are
//! cuBLAS GEMMs accumulating in f32, everything else is NVRTC kernels (`kernels.cu`); residuals and
//! reductions stay in f32. Decode steps of up to eight sequences run on fused GEMVs instead of cuBLAS
//! (`decode_gemv.cu`, five launches a layer with the fused attention): FMA ones at one sequence, tensor-core
//! ones at two to eight (while a step's inputs fit their shared memory). At one sequence the qkv projection
//! and the attention are one launch of thread block clusters where the GPU and the shape allow it
//! (`decode_qkv_attention.cu`), four launches a layer.
//! Greedy steps pick their tokens on the GPU, so only the token ids come back; steps that sample draw each
//! row's token there (`draw.cu`, `draw.rs`), so about half a kilobyte a row comes back.
//!
//! Everything runs in order on one stream; the host builds each step's metadata (token ids, positions,
//! block tables) in one buffer and uploads it with one copy. Decode steps replay CUDA graphs captured per
//! batch bucket (`graphs.rs`); prefill and mixed steps launch eagerly.

mod ceilings;
mod device;
mod draw;
mod gemm;
mod graphs;
mod kernels;
mod kv_io;
mod launch_times;
mod step_io;
mod weights;

use std::sync::Mutex;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr, DeviceRepr, ValidAsZeroBits};
use rayon::prelude::*;

pub use ceilings::{Ceilings, measure_ceilings};
pub use device::{CudaError, Device, cuda_device_count, cuda_driver_present};
use device::{DriverContext, GpuContext};
use draw::{DeviceDraws, decode_draws};
use gemm::matmul_bf16;
use graphs::{DecodeGraph, DecodeGraphs, bucket_for, table_capacity};
use kernels::{
    AttentionShape, DRAW_OUT_BYTES, GemvOp, GemvShape, Kernels, LayerSlice, MAX_ATTENTION_SPLITS,
    MAX_HEAD_DIM, MMA_GEMV_MAX_TOKENS, PREFILL_TILE_TOKENS, TOKEN_FROM_PREVIOUS_KEY,
    TOKEN_FROM_PREVIOUS_TOKEN, TokenSource, decode_attention_fits, decode_gemv_fits, draw_fits,
    grouped_decode_attention_fits, prefill_kernel_fits, qkv_attention_fits,
};
use kv_io::{DeviceDestinations, DevicePool, KvStaging, PinnedPool, Staged};
pub use kv_io::{DeviceKvHandle, DevicePath, device_pool_reachable};
use launch_times::LaunchTimes;
use step_io::{Picks, PicksKind, PicksSlot, StepIo};
use weights::{DeviceLayer, DeviceWeights};

use super::{Backend, SequenceStep, draw_on_host};
use crate::error::EngineError;
use crate::kv_cache::BlockId;
use crate::kv_cache::layout::KvLayout;
use crate::model::config::ModelConfig;
use crate::model::weights::ModelWeights;
use crate::sampling::{RowDraw, RowDrawParams};

/// Attention blocks aimed for per launch: splitting a short batch's context over more blocks keeps the
/// GPU's multiprocessors busy at decode (flash-decoding); a long prefill has enough blocks without it.
const ATTENTION_BLOCKS_PER_SM: usize = 4;
/// The fewest keys one attention split walks, so the merge stays cheap beside the work it merges.
const MIN_KEYS_PER_SPLIT: usize = 64;
/// Steps whose longest chunk has this many tokens run attention in query tiles (`prefill_attention`).
const MIN_PREFILL_TILE_TOKENS: usize = 16;
/// Most splits of one token's attention in a captured decode step (its context length is not known when
/// the graph is captured, so the split count depends on the batch alone).
const MAX_GRAPH_SPLITS: usize = 32;
/// Bytes each rayon task copies into the pinned staging buffer of a KV import.
const STAGING_COPY_CHUNK_BYTES: usize = 1 << 20;
/// Decode steps of this many tokens and more (up to `MMA_GEMV_MAX_TOKENS`) take the tensor-core GEMVs, fewer
/// the FMA ones (PERF.md).
const MMA_GEMV_FROM_TOKENS: usize = 2;
/// Decode steps of up to this many sequences take the fused attention (`attention_decode_fused`: q/k norm,
/// RoPE, KV store and split merge in one launch instead of three). At four sequences it measured 1.30 against
/// 1.38 ms a step (0.6B shape, H100); at eight, with the tensor-core GEMVs around it, 1.612-1.644 against
/// 1.665-1.689 for cuBLAS and the three launches (PERF.md, stop 26).
const FUSED_ATTENTION_MAX_TOKENS: usize = 8;
/// Past this many sequences the fused attention is taken only where the step runs on the decode GEMVs: with
/// cuBLAS around it, it measured slower at eight (1.748 against 1.716 ms) and sixteen (PERF.md, stop 20).
const FUSED_ATTENTION_WITH_CUBLAS_MAX_TOKENS: usize = 4;
/// Decode steps of up to this many sequences take the grouped attention (`attention_decode_grouped`, a block
/// per KV head for its q heads) where the model's shape fits it. At one sequence it measured 0.789-0.799
/// against 0.830-0.847 ms a step; at two 1.036-1.052 against 1.030-1.046, at four 1.40-1.45 against 1.30-1.34
/// (0.6B shape, H100, PERF.md).
const GROUPED_ATTENTION_MAX_TOKENS: usize = 1;
/// cuBLAS's workspace, given to it up front so that a captured GEMM never allocates.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

pub struct CudaBackend {
    gpu: GpuContext,
    kernels: Kernels,
    config: ModelConfig,
    layout: KvLayout,
    num_blocks: usize,
    weights: DeviceWeights,
    /// `num_blocks + 1` blocks of `layout.block_floats()` bf16 values each; the last one takes the KV of the
    /// padding rows of captured decode steps and belongs to no sequence.
    /// From plain `cuMemAlloc`, so another process can open it through a CUDA IPC handle.
    kv_pool: DevicePool,
    scratch: Scratch,
    graphs: DecodeGraphs,
    /// One block in f32, where `read_block`/`write_block` convert on the GPU so a block crosses as one copy.
    kv_staging: CudaSlice<f32>,
    /// Whole layers of many blocks to and from the host (`read_layer`, `write_layers`); behind a lock
    /// because reads take `&self`.
    layer_staging: Mutex<KvStaging>,
    /// Pinned host buffers exported layers are copied into and sent from.
    pinned: std::sync::Arc<PinnedPool>,
    /// Other GPUs' pools this backend has pushed KV into.
    destinations: DeviceDestinations,
    /// Handed to cuBLAS with `cublasSetWorkspace`; kept alive as long as the handle.
    _blas_workspace: CudaSlice<u8>,
    /// This step's metadata, built on the host: see [`StepMeta`].
    meta: Vec<u32>,
    /// Page-locked buffers of each step's metadata upload and greedy picks download.
    step_io: StepIo,
    /// Steps queued on the stream whose picks the host has not taken ([`Backend::queue_greedy`],
    /// [`Backend::queue_drawn`]), oldest first; at most two, one per picks buffer.
    queued_steps: std::collections::VecDeque<QueuedStep>,
    /// The picks buffer of the next queued step.
    next_picks_slot: usize,
    /// Whether engines queue steps ahead on this backend ([`Backend::queues_steps`]); on unless
    /// `TANDEM_CUDA_QUEUE_AHEAD=0` (for side-by-side measurements of serving) or launch times are on.
    queues_steps: bool,
    /// Whether decode steps of up to eight sequences run on the fused GEMVs (`decode_gemv.cu`) rather than
    /// cuBLAS; on unless `TANDEM_CUDA_DECODE_GEMV=0` (for side-by-side measurements).
    decode_gemv: bool,
    /// Decode steps of this many tokens and more take the tensor-core GEMVs; fewer, the FMA ones.
    /// `TANDEM_CUDA_MMA_GEMV_FROM` (1, 2, 4, 8, or 9 for never) overrides it for measurements.
    mma_gemv_from: usize,
    /// Decode steps of up to this many tokens take the tensor-core GEMVs: `MMA_GEMV_MAX_TOKENS` unless
    /// `TANDEM_CUDA_MMA_GEMV_MAX` says fewer (4 gives steps of eight cuBLAS again, for measurements).
    mma_gemv_max: usize,
    /// With `TANDEM_CUDA_LAUNCH_TIMES=1`: eager steps log their time per kind of launch (`launch_times.rs`).
    launch_times: Option<LaunchTimes>,
    /// Decode steps of up to this many sequences take the fused attention (`attention_decode_fused`);
    /// [`FUSED_ATTENTION_MAX_TOKENS`] unless `TANDEM_CUDA_FUSED_ATTENTION_TOKENS` says otherwise (for
    /// measurements).
    fused_attention_max_tokens: usize,
    /// Decode steps of up to this many sequences take a block per KV head for its q heads in the fused
    /// attention (`attention_decode_grouped`): [`GROUPED_ATTENTION_MAX_TOKENS`] where the model's shape fits
    /// it, else 0; `TANDEM_CUDA_GROUPED_ATTENTION_TOKENS` overrides it (for measurements).
    grouped_attention_max_tokens: usize,
    /// `TANDEM_CUDA_GRAPH_SPLITS`: the splits of every captured decode step's attention, in place of enough
    /// to fill the GPU up to [`MAX_GRAPH_SPLITS`] (for measurements).
    graph_splits: Option<usize>,
    /// Whether decode steps of one sequence run each layer's qkv projection and attention as one launch of
    /// thread block clusters (`decode_qkv_attention`): where the shape fits it and the GPU holds a cluster
    /// per KV head at once, unless `TANDEM_CUDA_QKV_ATTENTION=0` (for measurements).
    qkv_attention: bool,
    /// The buffers of the row draws (`draw.rs`), made at the first drawn step and grown for larger ones.
    device_draws: Option<DeviceDraws>,
    /// Rows of the logits the last drawn step left in `scratch.logits` for [`Backend::read_logits_row`].
    drawn_rows: usize,
}

/// A step queued on the stream ([`Backend::queue_greedy`], [`Backend::queue_drawn`]) whose picks the host has not
/// taken.
struct QueuedStep {
    /// Where its picks come down; queued right after the step, before anything can overwrite them.
    picks: PicksSlot,
    /// Tokens of the step (a prompt chunk has more than its rows), for the launch times of an eager one.
    num_tokens: usize,
}

/// Device buffers sized for `token_capacity` tokens per step and `row_capacity` sequences, grown on demand.
struct Scratch {
    token_capacity: usize,
    row_capacity: usize,
    partial_capacity: usize,
    meta_capacity: usize,
    hidden: CudaSlice<f32>,
    normed: CudaSlice<u16>,
    qkv: CudaSlice<f32>,
    q: CudaSlice<f32>,
    attention: CudaSlice<u16>,
    projected: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    activated: CudaSlice<u16>,
    partial_out: CudaSlice<f32>,
    partial_max_sum: CudaSlice<f32>,
    /// Per (token, q_head): splits of its attention done so far in this launch (back to 0 after each).
    split_counters: CudaSlice<u32>,
    last_normed: CudaSlice<u16>,
    logits: CudaSlice<f32>,
    tokens: CudaSlice<u32>,
    /// Per row: the fused lm_head argmax's key of the greedy token (`argmax_key` in decode_gemv.cu).
    argmax_keys: CudaSlice<u64>,
    meta: CudaSlice<u32>,
}

/// Offsets (in u32) of the parts of the step metadata buffer, and the step's launch shape.
struct StepMeta {
    num_tokens: usize,
    /// Sequences, i.e. logits rows.
    rows: usize,
    num_splits: usize,
    token_ids: usize,
    positions: usize,
    kv_blocks: usize,
    /// Per token: (position, offset of its sequence's block table from the start of the buffer).
    token_meta: usize,
    /// Per sequence: the row of its last new token.
    last_rows: usize,
    block_tables: usize,
    /// Query tiles for `prefill_attention`: (offset of `num_tiles` pairs (first row, count)), when this
    /// step's attention runs on it rather than on the split kernel.
    prefill_tiles: Option<(usize, usize)>,
}

/// Whether the kernels of decode GEMV steps all ask for one shared-memory split of L1
/// ([`Kernels::prefer_one_shared_memory_split`]). On the H100 at batch 1 it made the Qwen3-0.6B shape
/// (hidden 1024) 5-6 % faster and Qwen3-8B (hidden 4096) 6 % slower (PERF.md), so it is on up to a hidden
/// size of 1024 and left to the driver above; `TANDEM_CUDA_ONE_SHARED_SPLIT=1` or `0` (the override)
/// decides instead, for measurements of the sizes in between.
fn one_shared_memory_split(hidden_size: usize, override_split: Option<&str>) -> bool {
    match override_split {
        Some("1") => true,
        Some("0") => false,
        _ => hidden_size <= 1024,
    }
}

/// A token count a measurement switch sets, when it is set to a number.
fn env_count(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

/// The raw device address of a buffer, for kernel arguments and cuBLAS.
fn addr<T>(buffer: &CudaSlice<T>, gpu: &GpuContext) -> u64 {
    // Event tracking is off (one stream), so the guard returned beside the pointer does nothing.
    let (pointer, _guard) = buffer.device_ptr(&gpu.stream);
    pointer
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    gpu: &GpuContext,
    len: usize,
    what: &str,
) -> Result<CudaSlice<T>, CudaError> {
    gpu.stream
        .alloc_zeros::<T>(len.max(1))
        .during(|| format!("allocating {what} ({len} elements) on cuda:{}", gpu.ordinal))
}

impl Scratch {
    fn sizes(config: &ModelConfig, tokens: usize, rows: usize) -> [usize; 9] {
        let q_dim = config.q_dim();
        [
            tokens * config.hidden_size * 4,
            tokens * config.hidden_size * 2,
            tokens * (q_dim + 2 * config.kv_dim()) * 4,
            tokens * q_dim * (4 + 2),
            tokens * config.hidden_size * 4,
            tokens * 2 * config.intermediate_size * 4,
            tokens * config.intermediate_size * 2,
            rows * config.hidden_size * 2,
            rows * config.vocab_size * 4,
        ]
    }

    fn bytes(config: &ModelConfig, tokens: usize, rows: usize) -> usize {
        Self::sizes(config, tokens, rows).iter().sum()
    }

    fn new(
        gpu: &GpuContext,
        config: &ModelConfig,
        tokens: usize,
        rows: usize,
        partial: usize,
        meta: usize,
    ) -> Result<Self, CudaError> {
        let (h, q_dim, i) = (config.hidden_size, config.q_dim(), config.intermediate_size);
        Ok(Self {
            token_capacity: tokens,
            row_capacity: rows,
            partial_capacity: partial,
            meta_capacity: meta,
            hidden: zeros(gpu, tokens * h, "the hidden states")?,
            normed: zeros(gpu, tokens * h, "the normed activations")?,
            qkv: zeros(gpu, tokens * (q_dim + 2 * config.kv_dim()), "qkv")?,
            q: zeros(gpu, tokens * q_dim, "q")?,
            attention: zeros(gpu, tokens * q_dim, "the attention output")?,
            projected: zeros(gpu, tokens * h, "the projections")?,
            gate_up: zeros(gpu, tokens * 2 * i, "gate_up")?,
            activated: zeros(gpu, tokens * i, "the MLP activations")?,
            partial_out: zeros(gpu, partial * config.head_dim, "attention partials")?,
            partial_max_sum: zeros(gpu, partial * 2, "attention partial sums")?,
            split_counters: zeros(gpu, tokens * config.num_q_heads, "attention split counters")?,
            last_normed: zeros(gpu, rows * h, "the final norm")?,
            logits: zeros(gpu, rows * config.vocab_size, "the logits")?,
            tokens: zeros(gpu, rows, "the greedy tokens")?,
            argmax_keys: zeros(gpu, rows, "the greedy token keys")?,
            meta: zeros(gpu, meta, "the step metadata")?,
        })
    }
}

impl CudaBackend {
    /// Uploads `weights` to `cuda:{ordinal}` in bf16 and allocates a KV pool of `num_blocks` blocks of
    /// `block_size_tokens` tokens. Fails with a clear error when there is no driver or GPU, or when the
    /// model and the pool do not fit in the GPU's free memory.
    pub fn new(
        weights: &ModelWeights,
        ordinal: usize,
        num_blocks: usize,
        block_size_tokens: usize,
    ) -> Result<Self, EngineError> {
        if num_blocks == 0 || block_size_tokens == 0 {
            return Err(EngineError::Config(format!(
                "need at least one block of at least one token (got {num_blocks} blocks of {block_size_tokens})"
            )));
        }
        let config = weights.config.clone();
        if config.head_dim > MAX_HEAD_DIM || !config.head_dim.is_multiple_of(2) {
            return Err(CudaError::Unsupported(format!(
                "head_dim {} (the kernels take even head dims up to {MAX_HEAD_DIM})",
                config.head_dim
            ))
            .into());
        }
        let layout = KvLayout {
            num_layers: config.num_layers,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            block_size_tokens,
        };
        let gpu = GpuContext::open(ordinal)?;

        let initial_tokens = 256;
        let weights_bytes = DeviceWeights::bytes(weights);
        let kv_bytes = num_blocks * layout.block_floats() * 2;
        let scratch_bytes = Scratch::bytes(&config, initial_tokens, 64);
        let (free_bytes, _total) = gpu.memory()?;
        // Headroom for cuBLAS workspaces, the module and growth of the work buffers.
        let headroom = 512 << 20;
        let needed = weights_bytes + kv_bytes + scratch_bytes + headroom;
        if needed > free_bytes {
            let mib = |bytes: usize| bytes >> 20;
            return Err(CudaError::DoesNotFit {
                ordinal,
                needed_mib: mib(needed),
                weights_mib: mib(weights_bytes),
                kv_mib: mib(kv_bytes),
                scratch_mib: mib(scratch_bytes + headroom),
                free_mib: mib(free_bytes),
            }
            .into());
        }

        let kernels = Kernels::compile(&gpu)?;
        let override_split = std::env::var("TANDEM_CUDA_ONE_SHARED_SPLIT").ok();
        if one_shared_memory_split(config.hidden_size, override_split.as_deref()) {
            kernels.prefer_one_shared_memory_split()?;
        }
        let device_weights = DeviceWeights::upload(&gpu, weights)?;
        let kv_pool = DevicePool::new(&gpu, (num_blocks + 1) * layout.block_floats() * 2)?;
        let blas_workspace: CudaSlice<u8> =
            zeros(&gpu, BLAS_WORKSPACE_BYTES, "the cuBLAS workspace")?;
        // SAFETY: the workspace is a live allocation of that size, kept in the backend beside the handle.
        let status = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *gpu.blas.handle(),
                addr(&blas_workspace, &gpu) as *mut std::ffi::c_void,
                BLAS_WORKSPACE_BYTES,
            )
        };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(CudaError::Blas {
                what: "setting the cuBLAS workspace".into(),
                status: format!("{status:?}"),
            }
            .into());
        }
        let scratch = Scratch::new(&gpu, &config, initial_tokens, 64, 1024, 4096)?;
        let grouped_attention_max_tokens = if grouped_decode_attention_fits(
            config.head_dim,
            config.num_q_heads,
            config.num_kv_heads,
        ) {
            env_count("TANDEM_CUDA_GROUPED_ATTENTION_TOKENS")
                .unwrap_or(GROUPED_ATTENTION_MAX_TOKENS)
        } else {
            0
        };
        let launch_times = LaunchTimes::from_env();
        // With launch times on, a step's events would be read after the next step was queued (and wait for it).
        let queues_steps = std::env::var("TANDEM_CUDA_QUEUE_AHEAD")
            .map_or(true, |value| value != "0")
            && launch_times.is_none();
        let qkv_attention = std::env::var("TANDEM_CUDA_QKV_ATTENTION")
            .map_or(true, |value| value != "0")
            && qkv_attention_fits(
                config.head_dim,
                config.num_q_heads,
                config.num_kv_heads,
                config.hidden_size,
            )
            && kernels.qkv_attention_available(config.num_kv_heads);
        let kv_staging = zeros(&gpu, layout.block_floats(), "the KV staging block")?;
        gpu.stream
            .synchronize()
            .during(|| format!("uploading the model to cuda:{ordinal}"))?;
        let pinned = PinnedPool::new(&gpu.context);
        let step_io = StepIo::new(&gpu.context);
        Ok(Self {
            gpu,
            kernels,
            config,
            layout,
            num_blocks,
            weights: device_weights,
            kv_pool,
            scratch,
            graphs: DecodeGraphs::default(),
            kv_staging,
            layer_staging: Mutex::new(KvStaging::new()),
            pinned,
            destinations: DeviceDestinations::default(),
            _blas_workspace: blas_workspace,
            meta: Vec::new(),
            queued_steps: std::collections::VecDeque::new(),
            next_picks_slot: 0,
            queues_steps,
            step_io,
            decode_gemv: std::env::var("TANDEM_CUDA_DECODE_GEMV")
                .map_or(true, |value| value != "0"),
            mma_gemv_from: env_count("TANDEM_CUDA_MMA_GEMV_FROM").unwrap_or(MMA_GEMV_FROM_TOKENS),
            mma_gemv_max: env_count("TANDEM_CUDA_MMA_GEMV_MAX").unwrap_or(MMA_GEMV_MAX_TOKENS),
            launch_times,
            fused_attention_max_tokens: env_count("TANDEM_CUDA_FUSED_ATTENTION_TOKENS")
                .unwrap_or(FUSED_ATTENTION_MAX_TOKENS),
            grouped_attention_max_tokens,
            graph_splits: env_count("TANDEM_CUDA_GRAPH_SPLITS"),
            qkv_attention,
            device_draws: None,
            drawn_rows: 0,
        })
    }

    /// The GPU's name and ordinal, for logs and benchmark reports.
    pub fn device_name(&self) -> String {
        let name = self
            .gpu
            .context
            .name()
            .unwrap_or_else(|_| "unknown GPU".into());
        format!("cuda:{} ({name})", self.gpu.ordinal)
    }

    fn check_batch(&self, batch: &[SequenceStep<'_>]) -> Result<(), EngineError> {
        let vocab_size = self.config.vocab_size;
        for (index, step) in batch.iter().enumerate() {
            if step.token_ids.is_empty() {
                return Err(EngineError::Config(format!(
                    "batch entry {index} has no tokens"
                )));
            }
            if let Some(&token_id) = step.token_ids.iter().find(|&&t| t as usize >= vocab_size) {
                return Err(EngineError::TokenOutOfVocabulary {
                    token_id,
                    vocab_size,
                });
            }
            let end = step.start_position + step.token_ids.len();
            if step.block_table.len() * self.layout.block_size_tokens < end {
                return Err(EngineError::Config(format!(
                    "batch entry {index}: {} blocks cannot hold {end} tokens",
                    step.block_table.len()
                )));
            }
            if let Some(&block) = step
                .block_table
                .iter()
                .find(|&&b| b as usize >= self.num_blocks)
            {
                return Err(EngineError::Config(format!(
                    "batch entry {index}: block {block} is outside the pool"
                )));
            }
        }
        if batch.is_empty() {
            return Err(EngineError::Config("an empty batch".into()));
        }
        Ok(())
    }

    /// Lays out this step's metadata in `self.meta` (one upload) and returns where each part starts.
    fn build_meta(&mut self, batch: &[SequenceStep<'_>]) -> StepMeta {
        let num_tokens: usize = batch.iter().map(|step| step.token_ids.len()).sum();
        let table_words: usize = batch.iter().map(|step| step.block_table.len()).sum();
        let max_keys = batch
            .iter()
            .map(|step| step.start_position + step.token_ids.len())
            .max()
            .unwrap_or(0);
        let parts = StepMeta {
            num_tokens,
            rows: batch.len(),
            num_splits: self.attention_splits(num_tokens, max_keys),
            token_ids: 0,
            positions: num_tokens,
            kv_blocks: 2 * num_tokens,
            token_meta: 3 * num_tokens,
            last_rows: 5 * num_tokens,
            block_tables: 5 * num_tokens + batch.len(),
            prefill_tiles: None,
        };
        let meta = &mut self.meta;
        meta.clear();
        meta.resize(parts.block_tables + table_words, 0);
        let block_size = self.layout.block_size_tokens;
        let (mut token, mut table_offset) = (0, parts.block_tables);
        for (row, step) in batch.iter().enumerate() {
            meta[table_offset..table_offset + step.block_table.len()]
                .copy_from_slice(step.block_table);
            for (i, &token_id) in step.token_ids.iter().enumerate() {
                let position = step.start_position + i;
                meta[parts.token_ids + token] = token_id;
                meta[parts.positions + token] = position as u32;
                meta[parts.kv_blocks + token] = step.block_table[position / block_size];
                meta[parts.token_meta + 2 * token] = position as u32;
                meta[parts.token_meta + 2 * token + 1] = table_offset as u32;
                token += 1;
            }
            meta[parts.last_rows + row] = (token - 1) as u32;
            table_offset += step.block_table.len();
        }
        // A step that carries a prompt chunk runs its attention in query tiles on the tensor cores.
        let longest_chunk = batch
            .iter()
            .map(|step| step.token_ids.len())
            .max()
            .unwrap_or(0);
        let mut parts = parts;
        if longest_chunk >= MIN_PREFILL_TILE_TOKENS && prefill_kernel_fits(self.config.head_dim) {
            let tiles_start = meta.len();
            let mut first_row = 0;
            for step in batch {
                let len = step.token_ids.len();
                for tile_start in (0..len).step_by(PREFILL_TILE_TOKENS) {
                    meta.push((first_row + tile_start) as u32);
                    meta.push(PREFILL_TILE_TOKENS.min(len - tile_start) as u32);
                }
                first_row += len;
            }
            parts.prefill_tiles = Some((tiles_start, (meta.len() - tiles_start) / 2));
        }
        parts
    }

    /// Lays out a decode step (one token per sequence) padded to `bucket` rows at the fixed offsets a captured
    /// graph reads: row `r`'s block table at `block_tables + r * capacity`. Padding rows hold token 0 at
    /// position 0, writing into the padding block.
    fn build_padded_meta(
        &mut self,
        batch: &[SequenceStep<'_>],
        bucket: usize,
        capacity: usize,
    ) -> StepMeta {
        // The grouped attention's blocks each take a KV head's q heads, so it fills the GPU with more splits.
        let grouped = self.grouped_attention(bucket);
        let blocks_per_split = bucket
            * if grouped {
                self.config.num_kv_heads
            } else {
                self.config.num_q_heads
            };
        let splits_to_fill =
            (ATTENTION_BLOCKS_PER_SM * self.gpu.multiprocessors).div_ceil(blocks_per_split);
        let parts = StepMeta {
            num_tokens: bucket,
            rows: bucket,
            num_splits: match self.graph_splits {
                Some(splits) => splits.clamp(1, MAX_ATTENTION_SPLITS),
                None => splits_to_fill.clamp(1, MAX_GRAPH_SPLITS),
            },
            token_ids: 0,
            positions: bucket,
            kv_blocks: 2 * bucket,
            token_meta: 3 * bucket,
            last_rows: 5 * bucket,
            block_tables: 6 * bucket,
            prefill_tiles: None,
        };
        let padding_block = self.num_blocks as u32;
        let meta = &mut self.meta;
        meta.clear();
        meta.resize(parts.block_tables + bucket * capacity, padding_block);
        let block_size = self.layout.block_size_tokens;
        for row in 0..bucket {
            let table = parts.block_tables + row * capacity;
            let (token_id, position, kv_block) = match batch.get(row) {
                Some(step) => {
                    meta[table..table + step.block_table.len()].copy_from_slice(step.block_table);
                    let position = step.start_position;
                    (
                        step.token_ids[0],
                        position,
                        step.block_table[position / block_size],
                    )
                }
                None => (0, 0, padding_block),
            };
            meta[parts.token_ids + row] = token_id;
            meta[parts.positions + row] = position as u32;
            meta[parts.kv_blocks + row] = kv_block;
            meta[parts.token_meta + 2 * row] = position as u32;
            meta[parts.token_meta + 2 * row + 1] = table as u32;
            meta[parts.last_rows + row] = row as u32;
        }
        parts
    }

    /// How many splits the attention of this step uses: enough blocks to fill the GPU, no split of the
    /// longest context shorter than [`MIN_KEYS_PER_SPLIT`] keys.
    fn attention_splits(&self, num_tokens: usize, max_keys: usize) -> usize {
        let blocks = num_tokens * self.config.num_q_heads;
        let wanted = (ATTENTION_BLOCKS_PER_SM * self.gpu.multiprocessors).div_ceil(blocks.max(1));
        wanted
            .min(max_keys.div_ceil(MIN_KEYS_PER_SPLIT))
            .clamp(1, MAX_ATTENTION_SPLITS)
    }

    /// Grows the work buffers to hold this step.
    fn ensure_capacity(&mut self, parts: &StepMeta) -> Result<(), EngineError> {
        if self.fits_capacity(parts) {
            return Ok(());
        }
        let s = &self.scratch;
        let (num_tokens, num_rows) = (parts.num_tokens, parts.rows);
        let partials = self.partials(parts);
        let tokens = s.token_capacity.max(num_tokens.next_power_of_two());
        let rows = s.row_capacity.max(num_rows.next_power_of_two());
        let partial = s.partial_capacity.max(partials.next_power_of_two());
        let meta = s.meta_capacity.max(self.meta.len().next_power_of_two());
        // Free the old buffers before allocating the larger ones.
        self.gpu
            .stream
            .synchronize()
            .during(|| "waiting to grow the work buffers".into())?;
        // Captured graphs point into the old buffers.
        self.graphs.by_shape.clear();
        self.scratch = Scratch::new(&self.gpu, &self.config, 1, 1, 1, 1)?;
        self.scratch = Scratch::new(&self.gpu, &self.config, tokens, rows, partial, meta)?;
        Ok(())
    }

    /// Runs every layer and the lm_head: leaves the logits of each sequence's last new token in the first
    /// `batch.len()` rows of `scratch.logits`. Decode steps replay a captured graph; others launch eagerly.
    /// Returns whether the step also left each row's greedy token key in `scratch.argmax_keys`.
    fn run(
        &mut self,
        batch: &[SequenceStep<'_>],
        from_previous: bool,
    ) -> Result<bool, EngineError> {
        self.check_batch(batch)?;
        let decode_only = batch.iter().all(|step| step.token_ids.len() == 1);
        if from_previous && !decode_only {
            return Err(EngineError::Config(
                "a step queued ahead takes one token a sequence".into(),
            ));
        }
        match bucket_for(batch.len()).filter(|_| decode_only) {
            Some(bucket) => {
                let longest_table = batch
                    .iter()
                    .map(|step| step.block_table.len())
                    .max()
                    .unwrap_or(1);
                let capacity = table_capacity(longest_table);
                let parts = self.build_padded_meta(batch, bucket, capacity);
                if from_previous {
                    self.inputs_from_previous(&parts, batch.len())?;
                }
                self.prepare(&parts)?;
                let fused = self.uses_decode_gemv(&parts);
                let key = (bucket, capacity);
                if let Some(graph) = self.graphs.by_shape.get(&key) {
                    graph
                        .graph()
                        .launch()
                        .during(|| format!("replaying the decode graph of batch {bucket}"))?;
                } else {
                    // This step runs eagerly; the capture that follows only records the same launches
                    // (nothing runs while capturing) for the steps after it. Being eager, it may be timed.
                    self.launch_step(&parts, true)?;
                    let graph = self.capture(&parts)?;
                    self.graphs.by_shape.insert(key, graph);
                }
                Ok(fused)
            }
            None => {
                let parts = self.build_meta(batch);
                if from_previous {
                    self.inputs_from_previous(&parts, batch.len())?;
                }
                self.prepare(&parts)?;
                self.launch_step(&parts, true)?;
                Ok(self.uses_decode_gemv(&parts))
            }
        }
    }

    /// Errors where two steps are queued already (the picks buffers are both in use).
    fn check_queue_room(&self) -> Result<(), EngineError> {
        if self.queued_steps.len() >= 2 {
            return Err(EngineError::Config(
                "two steps are queued already: take one first".into(),
            ));
        }
        Ok(())
    }

    /// Queues the copy of the step just launched's `rows` picks of `kind` from `source`, right behind it (before a
    /// step queued after it overwrites them), and records the step as queued.
    fn queue_picks(
        &mut self,
        kind: PicksKind,
        source: u64,
        rows: usize,
        num_tokens: usize,
    ) -> Result<(), EngineError> {
        let slot = self.next_picks_slot;
        let picks = self
            .step_io
            .queue_picks(slot, kind, source, rows, &self.gpu.stream)?;
        self.next_picks_slot ^= 1;
        self.queued_steps
            .push_back(QueuedStep { picks, num_tokens });
        Ok(())
    }

    /// Takes the oldest queued step, which must be drawn (`drawn`) or greedy, and reports its launch times.
    fn take_queued(&mut self, drawn: bool) -> Result<QueuedStep, EngineError> {
        let is_drawn = |queued: &QueuedStep| queued.picks.kind() == PicksKind::Draws;
        match self.queued_steps.front() {
            None => return Err(EngineError::Config("no step is queued".into())),
            Some(queued) if is_drawn(queued) != drawn => {
                return Err(EngineError::Config(format!(
                    "the oldest queued step is {}",
                    if drawn {
                        "greedy, not drawn"
                    } else {
                        "drawn, not greedy"
                    }
                )));
            }
            Some(_) => {}
        }
        let queued = self
            .queued_steps
            .pop_front()
            .ok_or_else(|| EngineError::Config("no step is queued".into()))?;
        if let Some(times) = &self.launch_times {
            times.report(queued.num_tokens)?;
        }
        Ok(queued)
    }

    /// Has the first `rows` rows of step `parts` (one token a row; a captured step pads more) embed the tokens the
    /// last queued step picked (or drew) for its rows, which need not have reached the host: their token ids become
    /// marks `embed` resolves on the GPU. Where the step grows the work buffers (which drops the picks on the
    /// GPU), it waits for the picks on the host and writes the tokens instead.
    fn inputs_from_previous(&mut self, parts: &StepMeta, rows: usize) -> Result<(), EngineError> {
        let previous = self
            .queued_steps
            .back()
            .map(|queued| queued.picks)
            .ok_or_else(|| {
                EngineError::Config("a step queued ahead follows no queued step".into())
            })?;
        if previous.rows() != rows {
            return Err(EngineError::Config(format!(
                "a step of {rows} sequences queued ahead follows a step of {}",
                previous.rows()
            )));
        }
        let grows = !self.fits_capacity(parts);
        let mut tokens = Vec::new();
        if grows {
            picked_tokens(
                self.step_io.picks(previous)?,
                self.config.vocab_size,
                &mut tokens,
            )?;
        }
        // Row draws leave their tokens where `argmax_rows` does (`draw_row`).
        let mark = match previous.kind() {
            PicksKind::Keys => TOKEN_FROM_PREVIOUS_KEY,
            PicksKind::Tokens | PicksKind::Draws => TOKEN_FROM_PREVIOUS_TOKEN,
        };
        let ids = &mut self.meta[parts.token_ids..parts.token_ids + rows];
        if grows {
            ids.copy_from_slice(&tokens);
        } else {
            ids.fill(mark);
        }
        Ok(())
    }

    /// Where `embed` finds a step's tokens: the ids at `ids`, and the last queued step's picks (or draws) for the
    /// marks of a step queued ahead of the host.
    fn token_source(&self, ids: u64) -> TokenSource {
        TokenSource {
            ids,
            previous_keys: addr(&self.scratch.argmax_keys, &self.gpu),
            previous_tokens: addr(&self.scratch.tokens, &self.gpu),
        }
    }

    /// Whether the work buffers hold step `parts` (whose metadata is `self.meta`) without growing.
    fn fits_capacity(&self, parts: &StepMeta) -> bool {
        let s = &self.scratch;
        parts.num_tokens <= s.token_capacity
            && parts.rows <= s.row_capacity
            && self.partials(parts) <= s.partial_capacity
            && self.meta.len() <= s.meta_capacity
    }

    /// The attention's partial rows of step `parts`.
    fn partials(&self, parts: &StepMeta) -> usize {
        parts.num_tokens * self.config.num_q_heads * parts.num_splits
    }

    /// Whether `parts` runs on the decode GEMVs: a step of one token per sequence (so the logits rows are the
    /// token rows) whose inputs fit a GEMV block's shared memory, of one or two sequences for the FMA GEMVs
    /// and up to eight for the tensor-core ones.
    fn uses_decode_gemv(&self, parts: &StepMeta) -> bool {
        self.decode_gemv
            && parts.prefill_tiles.is_none()
            && parts.rows == parts.num_tokens
            && (self.uses_mma_gemv(parts.num_tokens)
                || decode_gemv_fits(parts.num_tokens, &self.gemv_input_widths()))
    }

    /// Whether a decode GEMV step of `num_tokens` tokens takes the tensor-core GEMVs.
    fn uses_mma_gemv(&self, num_tokens: usize) -> bool {
        num_tokens >= self.mma_gemv_from
            && num_tokens <= self.mma_gemv_max
            && self
                .kernels
                .decode_gemv_mma_fits(num_tokens, &self.gemv_input_widths())
    }

    /// The input widths of a layer's projections: the hidden size, the attention output, the intermediate.
    fn gemv_input_widths(&self) -> [usize; 3] {
        let config = &self.config;
        [config.hidden_size, config.q_dim(), config.intermediate_size]
    }

    /// Grows the work buffers for `parts` and uploads the step metadata.
    fn prepare(&mut self, parts: &StepMeta) -> Result<(), EngineError> {
        self.ensure_capacity(parts)?;
        // `scratch.meta` holds at least `self.meta.len()` u32 (ensure_capacity above).
        self.step_io.upload_meta(
            &self.meta,
            addr(&self.scratch.meta, &self.gpu),
            &self.gpu.stream,
        )?;
        Ok(())
    }

    /// Records the launches of a step as a graph.
    fn capture(&self, parts: &StepMeta) -> Result<DecodeGraph, EngineError> {
        let stream = &self.gpu.stream;
        stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .during(|| "starting a decode graph capture".into())?;
        let launched = self.launch_step(parts, false);
        // End the capture even when a launch failed, so the stream leaves capture mode.
        let captured = stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .during(|| format!("capturing the decode graph of batch {}", parts.rows));
        launched?;
        match captured? {
            Some(graph) => Ok(DecodeGraph::new(graph)),
            None => Err(
                CudaError::Unsupported("the decode graph capture recorded nothing".into()).into(),
            ),
        }
    }

    /// Launches every kernel and GEMM of one step whose metadata is uploaded, in stream order. `timed`: mark
    /// each kind of launch for [`LaunchTimes`] when it is on (never while a graph is captured).
    fn launch_step(&self, parts: &StepMeta, timed: bool) -> Result<(), EngineError> {
        if self.uses_decode_gemv(parts) {
            return self.launch_decode_gemv_step(parts, timed);
        }
        let num_tokens = parts.num_tokens;
        let rows = parts.rows;
        let gpu = &self.gpu;
        let s = &self.scratch;
        let config = &self.config;
        let (h, q_dim) = (config.hidden_size, config.q_dim());
        let qkv_width = q_dim + 2 * config.kv_dim();
        let intermediate = config.intermediate_size;
        let eps = config.rms_norm_eps;
        let k = &self.kernels;
        let w = &self.weights;
        let meta = addr(&s.meta, gpu);
        let at = |offset: usize| meta + 4 * offset as u64;
        let (hidden, normed, qkv) = (
            addr(&s.hidden, gpu),
            addr(&s.normed, gpu),
            addr(&s.qkv, gpu),
        );
        let (attention, projected, gate_up, activated) = (
            addr(&s.attention, gpu),
            addr(&s.projected, gpu),
            addr(&s.gate_up, gpu),
            addr(&s.activated, gpu),
        );
        let blas = &gpu.blas;
        let mark = |kind: &'static str| self.mark_launches(timed, kind);

        if let Some(times) = self.launch_times.as_ref().filter(|_| timed) {
            times.start(&gpu.stream)?;
        }
        k.embed(
            hidden,
            addr(&w.embed_tokens, gpu),
            self.token_source(at(parts.token_ids)),
            num_tokens,
            h,
            0,
        )?;
        mark("embed")?;
        k.add_rms_norm(
            hidden,
            0,
            addr(&w.layers[0].input_norm, gpu),
            normed,
            0,
            num_tokens,
            h,
            eps,
        )?;
        for (layer_index, layer) in w.layers.iter().enumerate() {
            matmul_bf16(
                blas,
                normed,
                num_tokens,
                h,
                addr(&layer.qkv_proj, gpu),
                qkv_width,
                qkv,
                "qkv_proj",
            )?;
            mark("qkv_proj")?;
            self.launch_attention(parts, layer_index, layer, timed)?;
            mark("attention")?;
            matmul_bf16(
                blas,
                attention,
                num_tokens,
                q_dim,
                addr(&layer.o_proj, gpu),
                h,
                projected,
                "o_proj",
            )?;
            mark("o_proj")?;
            k.add_rms_norm(
                hidden,
                projected,
                addr(&layer.post_attention_norm, gpu),
                normed,
                0,
                num_tokens,
                h,
                eps,
            )?;
            mark("residual_norm")?;
            matmul_bf16(
                blas,
                normed,
                num_tokens,
                h,
                addr(&layer.gate_up_proj, gpu),
                2 * intermediate,
                gate_up,
                "gate_up_proj",
            )?;
            mark("gate_up_proj")?;
            k.swiglu(gate_up, activated, num_tokens, intermediate)?;
            mark("swiglu")?;
            matmul_bf16(
                blas,
                activated,
                num_tokens,
                intermediate,
                addr(&layer.down_proj, gpu),
                h,
                projected,
                "down_proj",
            )?;
            mark("down_proj")?;
            // The residual add is fused with the next norm: the next layer's input norm, or after the last
            // layer the final norm of only the rows whose logits are wanted.
            match w.layers.get(layer_index + 1) {
                Some(next) => k.add_rms_norm(
                    hidden,
                    projected,
                    addr(&next.input_norm, gpu),
                    normed,
                    0,
                    num_tokens,
                    h,
                    eps,
                )?,
                None => k.add_rms_norm(
                    hidden,
                    projected,
                    addr(&w.final_norm, gpu),
                    addr(&s.last_normed, gpu),
                    at(parts.last_rows),
                    rows,
                    h,
                    eps,
                )?,
            }
            mark("residual_norm")?;
        }
        matmul_bf16(
            blas,
            addr(&s.last_normed, gpu),
            rows,
            h,
            addr(w.lm_head(), gpu),
            config.vocab_size,
            addr(&s.logits, gpu),
            "lm_head",
        )?;
        mark("lm_head")?;
        Ok(())
    }

    /// Records the [`LaunchTimes`] event after the launches of `kind`, when they are on and the step is timed.
    fn mark_launches(&self, timed: bool, kind: &'static str) -> Result<(), CudaError> {
        match &self.launch_times {
            Some(times) if timed => times.mark(&self.gpu.stream, kind),
            _ => Ok(()),
        }
    }

    /// Logs the launch times of the step that just finished, if it was timed.
    fn report_launches(&self, batch: &[SequenceStep<'_>]) -> Result<(), CudaError> {
        match &self.launch_times {
            Some(times) => times.report(batch.iter().map(|step| step.token_ids.len()).sum()),
            None => Ok(()),
        }
    }

    /// The attention of layer `layer_index`, from `scratch.qkv` to `scratch.attention`: for decode steps of up
    /// to `fused_attention_max_tokens` sequences (past four, only those on the decode GEMVs) one fused launch
    /// (q/k norm, RoPE, KV store and the split merge inside, for the usual head sizes); otherwise q/k norm, RoPE
    /// and the KV store, then the attention.
    fn launch_attention(
        &self,
        parts: &StepMeta,
        layer_index: usize,
        layer: &DeviceLayer,
        timed: bool,
    ) -> Result<(), EngineError> {
        let fused = self.decode_gemv
            && parts.prefill_tiles.is_none()
            && parts.rows == parts.num_tokens
            && parts.num_tokens <= self.fused_attention_max_tokens
            && (parts.num_tokens <= FUSED_ATTENTION_WITH_CUBLAS_MAX_TOKENS
                || self.uses_decode_gemv(parts))
            && decode_attention_fits(self.config.head_dim);
        let gpu = &self.gpu;
        let s = &self.scratch;
        let config = &self.config;
        let meta = addr(&s.meta, gpu);
        let at = |offset: usize| meta + 4 * offset as u64;
        let (q, attention, kv_pool) = (
            addr(&s.q, gpu),
            addr(&s.attention, gpu),
            self.kv_pool.address,
        );
        let partials = (
            addr(&s.partial_out, gpu),
            addr(&s.partial_max_sum, gpu),
            addr(&s.split_counters, gpu),
        );
        let shape = self.attention_shape(parts, layer_index);
        if fused {
            self.kernels.attention_decode_fused(
                addr(&s.qkv, gpu),
                (addr(&layer.q_norm, gpu), addr(&layer.k_norm, gpu)),
                addr(&self.weights.rope_inverse_frequencies, gpu),
                config.rms_norm_eps,
                kv_pool,
                meta,
                at(parts.token_meta),
                partials,
                attention,
                &shape,
                self.grouped_attention(parts.num_tokens),
            )?;
            return Ok(());
        }
        self.kernels.qk_norm_rope_store(
            addr(&s.qkv, gpu),
            q,
            kv_pool,
            addr(&layer.q_norm, gpu),
            addr(&layer.k_norm, gpu),
            addr(&self.weights.rope_inverse_frequencies, gpu),
            at(parts.positions),
            at(parts.kv_blocks),
            &shape,
            config.rms_norm_eps,
        )?;
        self.mark_launches(timed, "qk_norm_rope")?;
        // Block-table offsets in token_meta count from the start of the metadata buffer.
        match parts.prefill_tiles {
            Some((tiles, num_tiles)) => self.kernels.prefill_attention(
                q,
                kv_pool,
                meta,
                at(parts.token_meta),
                at(tiles),
                num_tiles,
                attention,
                &shape,
            )?,
            None => self.kernels.attention(
                q,
                kv_pool,
                meta,
                at(parts.token_meta),
                partials.0,
                partials.1,
                partials.2,
                attention,
                &shape,
            )?,
        }
        Ok(())
    }

    /// Whether a decode step of `num_tokens` sequences that takes the fused attention takes the grouped one.
    fn grouped_attention(&self, num_tokens: usize) -> bool {
        self.decode_gemv
            && num_tokens <= self.fused_attention_max_tokens
            && num_tokens <= self.grouped_attention_max_tokens
    }

    fn attention_shape(&self, parts: &StepMeta, layer_index: usize) -> AttentionShape {
        let config = &self.config;
        AttentionShape {
            num_tokens: parts.num_tokens,
            num_q_heads: config.num_q_heads,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            layer: layer_index,
            block_size: self.layout.block_size_tokens,
            block_elems: self.layout.block_floats(),
            num_splits: parts.num_splits,
        }
    }

    /// A decode step of up to eight sequences ([`Self::uses_decode_gemv`]): each projection a GEMV carrying
    /// its norm, residual add or SwiGLU, and the greedy argmax in the lm_head's GEMV; the attention does the
    /// q/k norm, RoPE and KV store itself (for the usual head sizes), five launches a layer; at one sequence,
    /// with `qkv_attention`, the qkv projection and the attention are one (`decode_qkv_attention`).
    fn launch_decode_gemv_step(&self, parts: &StepMeta, timed: bool) -> Result<(), EngineError> {
        let gpu = &self.gpu;
        let s = &self.scratch;
        let config = &self.config;
        let w = &self.weights;
        let k = &self.kernels;
        let num_tokens = parts.num_tokens;
        let (h, q_dim, eps) = (config.hidden_size, config.q_dim(), config.rms_norm_eps);
        let hidden = addr(&s.hidden, gpu);
        let activated = addr(&s.activated, gpu);
        let argmax_keys = addr(&s.argmax_keys, gpu);
        let mark = |kind: &'static str| self.mark_launches(timed, kind);
        if let Some(times) = self.launch_times.as_ref().filter(|_| timed) {
            times.start(&gpu.stream)?;
        }
        let mma = self.uses_mma_gemv(num_tokens);
        let shape = |k: usize, n: usize| GemvShape {
            num_tokens,
            k,
            n,
            mma,
        };
        k.embed(
            hidden,
            addr(&w.embed_tokens, gpu),
            self.token_source(addr(&s.meta, gpu) + 4 * parts.token_ids as u64),
            num_tokens,
            h,
            argmax_keys,
        )?;
        mark("embed")?;
        let meta = addr(&s.meta, gpu);
        for (layer_index, layer) in w.layers.iter().enumerate() {
            if num_tokens == 1 && self.qkv_attention {
                k.decode_qkv_attention(
                    addr(&layer.qkv_proj, gpu),
                    h,
                    hidden,
                    addr(&layer.input_norm, gpu),
                    (addr(&layer.q_norm, gpu), addr(&layer.k_norm, gpu)),
                    addr(&w.rope_inverse_frequencies, gpu),
                    eps,
                    self.kv_pool.address,
                    meta,
                    meta + 4 * parts.token_meta as u64,
                    addr(&s.attention, gpu),
                    &self.attention_shape(parts, layer_index),
                )?;
                mark("qkv_attention")?;
            } else {
                k.decode_gemv(
                    GemvOp::NormStore {
                        out: addr(&s.qkv, gpu),
                    },
                    addr(&layer.qkv_proj, gpu),
                    hidden,
                    addr(&layer.input_norm, gpu),
                    eps,
                    &shape(h, q_dim + 2 * config.kv_dim()),
                )?;
                mark("qkv_proj")?;
                self.launch_attention(parts, layer_index, layer, timed)?;
                mark("attention")?;
            }
            k.decode_gemv(
                GemvOp::AddTo {
                    input: addr(&s.attention, gpu),
                },
                addr(&layer.o_proj, gpu),
                hidden,
                0,
                eps,
                &shape(q_dim, h),
            )?;
            mark("o_proj")?;
            k.decode_gemv(
                GemvOp::NormSwiglu { out: activated },
                addr(&layer.gate_up_proj, gpu),
                hidden,
                addr(&layer.post_attention_norm, gpu),
                eps,
                &shape(h, config.intermediate_size),
            )?;
            mark("gate_up_proj")?;
            k.decode_gemv(
                GemvOp::AddTo { input: activated },
                addr(&layer.down_proj, gpu),
                hidden,
                0,
                eps,
                &shape(config.intermediate_size, h),
            )?;
            mark("down_proj")?;
        }
        k.decode_gemv(
            GemvOp::NormArgmax {
                out: addr(&s.logits, gpu),
                argmax_keys,
            },
            addr(w.lm_head(), gpu),
            hidden,
            addr(&w.final_norm, gpu),
            eps,
            &shape(h, config.vocab_size),
        )?;
        mark("lm_head")?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn forward(
        &mut self,
        batch: &[SequenceStep<'_>],
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        // The fused argmax's keys, if any, are left unread.
        self.run(batch, false)?;
        let len = batch.len() * self.config.vocab_size;
        logits.clear();
        logits.resize(len, 0.0);
        let stream = &self.gpu.stream;
        stream
            .memcpy_dtoh(&self.scratch.logits.slice(..len), &mut logits[..])
            .during(|| "copying the logits to the host".into())?;
        stream
            .synchronize()
            .during(|| "running a forward step".into())?;
        self.report_launches(batch)?;
        Ok(())
    }

    fn forward_greedy(
        &mut self,
        batch: &[SequenceStep<'_>],
        tokens: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        // Steps queued by someone who never took them would hold the picks buffers.
        self.drop_queued_steps()?;
        self.queue_greedy(batch, false)?;
        self.take_greedy(tokens)
    }

    fn queues_steps(&self) -> bool {
        self.queues_steps
    }

    fn queue_greedy(
        &mut self,
        batch: &[SequenceStep<'_>],
        from_previous: bool,
    ) -> Result<(), EngineError> {
        self.check_queue_room()?;
        let picked_on_gpu = self.run(batch, from_previous)?;
        let gpu = &self.gpu;
        let s = &self.scratch;
        let rows = batch.len();
        if !picked_on_gpu {
            self.kernels.argmax_rows(
                addr(&s.logits, gpu),
                addr(&s.tokens, gpu),
                rows,
                self.config.vocab_size,
            )?;
        }
        // The picks go down right behind the step, before a step queued after it overwrites them.
        let source = if picked_on_gpu {
            addr(&s.argmax_keys, gpu)
        } else {
            addr(&s.tokens, gpu)
        };
        let kind = if picked_on_gpu {
            PicksKind::Keys
        } else {
            PicksKind::Tokens
        };
        self.queue_picks(kind, source, rows, step_tokens(batch))
    }

    fn take_greedy(&mut self, tokens: &mut Vec<u32>) -> Result<(), EngineError> {
        let queued = self.take_queued(false)?;
        picked_tokens(
            self.step_io.picks(queued.picks)?,
            self.config.vocab_size,
            tokens,
        )?;
        Ok(())
    }

    fn queue_drawn(
        &mut self,
        batch: &[SequenceStep<'_>],
        params: &[RowDrawParams],
        from_previous: bool,
    ) -> Result<(), EngineError> {
        let vocab_size = self.config.vocab_size;
        if !draw_fits(vocab_size) {
            return Err(EngineError::Config(format!(
                "rows of {vocab_size} logits are not drawn on this GPU: it queues no drawn step"
            )));
        }
        let rows = batch.len();
        if params.len() != rows {
            return Err(EngineError::Config(format!(
                "a drawn step of {rows} sequences was given {} rows of sampling parameters",
                params.len()
            )));
        }
        self.check_queue_room()?;
        self.drawn_rows = 0;
        self.run(batch, from_previous)?;
        let gpu = &self.gpu;
        if self
            .device_draws
            .as_ref()
            .is_none_or(|device_draws| device_draws.rows() < rows)
        {
            // Buffers of a step still queued are freed in stream order, after it.
            self.device_draws = None;
            self.device_draws = Some(DeviceDraws::new(gpu, vocab_size, rows.next_power_of_two())?);
        }
        let device_draws = self
            .device_draws
            .as_mut()
            .ok_or_else(|| CudaError::Unsupported("the row draw buffers are missing".into()))?;
        device_draws.upload(params, &mut self.step_io, gpu)?;
        // Timed from here when launch times are on (a graph step's own launches are never timed).
        let launch_times = &self.launch_times;
        let mark = |kind: &'static str| match launch_times {
            Some(times) => times.mark(&gpu.stream, kind),
            None => Ok(()),
        };
        mark("draw_params")?;
        self.kernels.draw_rows(
            addr(&self.scratch.logits, gpu),
            &device_draws.buffers(gpu, addr(&self.scratch.tokens, gpu)),
            rows,
            vocab_size,
            &mark,
        )?;
        let out = device_draws.out(gpu);
        self.queue_picks(PicksKind::Draws, out, rows, step_tokens(batch))?;
        self.drawn_rows = rows;
        Ok(())
    }

    fn take_drawn(&mut self, draws: &mut Vec<RowDraw>) -> Result<(), EngineError> {
        let queued = self.take_queued(true)?;
        match self.step_io.picks(queued.picks)? {
            Picks::Draws(out) => decode_draws(out, self.config.vocab_size, draws)?,
            Picks::Keys(_) | Picks::Tokens(_) => {
                return Err(EngineError::Config(
                    "the oldest queued step is greedy, not drawn".into(),
                ));
            }
        }
        Ok(())
    }

    fn drop_queued_steps(&mut self) -> Result<(), EngineError> {
        if self.queued_steps.is_empty() {
            return Ok(());
        }
        self.queued_steps.clear();
        self.gpu
            .stream
            .synchronize()
            .during(|| "waiting for the steps queued ahead".into())?;
        Ok(())
    }

    fn draws_on_device(&self) -> bool {
        draw_fits(self.config.vocab_size)
    }

    fn forward_drawn(
        &mut self,
        batch: &[SequenceStep<'_>],
        params: &[RowDrawParams],
        logits: &mut Vec<f32>,
        draws: &mut Vec<RowDraw>,
    ) -> Result<(), EngineError> {
        let vocab_size = self.config.vocab_size;
        if !draw_fits(vocab_size) {
            self.forward(batch, logits)?;
            draw_on_host(logits, vocab_size, params, draws);
            return Ok(());
        }
        self.drop_queued_steps()?;
        self.queue_drawn(batch, params, false)?;
        self.take_drawn(draws)?;
        logits.clear();
        Ok(())
    }

    fn read_logits_row(&mut self, row: usize, out: &mut Vec<f32>) -> Result<(), EngineError> {
        if !self.queued_steps.is_empty() {
            return Err(EngineError::LogitsNotKept(
                "a step queued after the drawn one overwrites its logits".into(),
            ));
        }
        if row >= self.drawn_rows {
            return Err(EngineError::LogitsNotKept(format!(
                "row {row} of a drawn step of {} rows",
                self.drawn_rows
            )));
        }
        let vocab_size = self.config.vocab_size;
        out.clear();
        out.resize(vocab_size, 0.0);
        let stream = &self.gpu.stream;
        stream
            .memcpy_dtoh(
                &self
                    .scratch
                    .logits
                    .slice(row * vocab_size..(row + 1) * vocab_size),
                &mut out[..],
            )
            .during(|| "copying a row of logits to the host".into())?;
        stream
            .synchronize()
            .during(|| "copying a row of logits to the host".into())?;
        Ok(())
    }

    fn read_block(&self, block: BlockId, out: &mut [u8]) -> Result<(), EngineError> {
        let elems = self.layout.block_floats();
        let source = self.kv_pool.address + (block as usize * elems * 2) as u64;
        let staging = addr(&self.kv_staging, &self.gpu);
        self.kernels.convert(true, source, staging, elems)?;
        // SAFETY: the staging buffer holds `elems` f32, i.e. `4 * elems` initialized bytes (little-endian,
        // the byte order of the wire layout).
        let bytes = unsafe { self.kv_staging.transmute::<u8>(4 * elems) }
            .ok_or_else(|| CudaError::Unsupported("the KV staging block is too small".into()))?;
        let stream = &self.gpu.stream;
        stream
            .memcpy_dtoh(&bytes, out)
            .during(|| format!("reading KV block {block}"))?;
        stream
            .synchronize()
            .during(|| format!("reading KV block {block}"))?;
        Ok(())
    }

    fn write_block(&mut self, block: BlockId, bytes: &[u8]) -> Result<(), EngineError> {
        let elems = self.layout.block_floats();
        let target = self.kv_pool.address + (block as usize * elems * 2) as u64;
        let staging = addr(&self.kv_staging, &self.gpu);
        let stream = &self.gpu.stream;
        // SAFETY: as in `read_block`; any bytes are valid f32 bit patterns.
        let mut staged = unsafe { self.kv_staging.transmute_mut::<u8>(4 * elems) }
            .ok_or_else(|| CudaError::Unsupported("the KV staging block is too small".into()))?;
        stream
            .memcpy_htod(bytes, &mut staged)
            .during(|| format!("writing KV block {block}"))?;
        self.kernels.convert(false, staging, target, elems)?;
        stream
            .synchronize()
            .during(|| format!("writing KV block {block}"))?;
        Ok(())
    }

    fn read_layer(
        &self,
        blocks: &[BlockId],
        layer: usize,
        last_used_slots: usize,
        out: &mut [u8],
    ) -> Result<(), EngineError> {
        let bytes = self.read_layer_bytes(blocks, layer, last_used_slots, out.len())?;
        out.copy_from_slice(&bytes);
        Ok(())
    }

    fn read_layer_bytes(
        &self,
        blocks: &[BlockId],
        layer: usize,
        last_used_slots: usize,
        len: usize,
    ) -> Result<bytes::Bytes, EngineError> {
        let slice = self.layer_slice(layer);
        let floats = blocks.len() * slice.layer_elems;
        if len != 4 * floats || blocks.is_empty() || layer >= self.layout.num_layers {
            return Err(EngineError::KvImport(format!(
                "reading layer {layer} of {} blocks needs {} bytes, got {len}",
                blocks.len(),
                4 * floats,
            )));
        }
        self.check_blocks(blocks)?;
        let gpu = &self.gpu;
        let mut buffer = self.pinned.take(len)?;
        let host = buffer
            .as_mut_ptr()
            .during(|| "waiting for a pinned KV buffer".into())?;
        {
            let mut staging = self
                .layer_staging
                .lock()
                .map_err(|_| CudaError::Unsupported("the KV staging lock is poisoned".into()))?;
            let Staged {
                block_ids: ids,
                chunk,
                ..
            } = staging.ensure(gpu, blocks.len(), floats)?;
            gpu.stream
                .memcpy_htod(blocks, &mut ids.slice_mut(..blocks.len()))
                .during(|| "uploading the block ids of a KV layer".into())?;
            self.kernels.gather_layer(
                self.kv_pool.address,
                addr(ids, gpu),
                blocks.len(),
                addr(chunk, gpu),
                &slice,
                last_used_slots,
            )?;
            // SAFETY: the pinned buffer holds at least `len` bytes and the device chunk `floats` f32; the
            // stream is synchronized before anything reads the buffer.
            unsafe {
                cudarc::driver::sys::cuMemcpyDtoHAsync_v2(
                    host.cast(),
                    addr(chunk, gpu),
                    len,
                    gpu.stream.cu_stream(),
                )
            }
            .result()
            .during(|| format!("copying KV layer {layer} to the host"))?;
            gpu.stream
                .synchronize()
                .during(|| format!("reading KV layer {layer}"))?;
        }
        Ok(self.pinned.into_bytes(buffer, len)?)
    }

    fn write_layers(&mut self, blocks: &[BlockId], layers: &[&[u8]]) -> Result<(), EngineError> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.check_blocks(blocks)?;
        let gpu = &self.gpu;
        let mut staging = self
            .layer_staging
            .lock()
            .map_err(|_| CudaError::Unsupported("the KV staging lock is poisoned".into()))?;
        let layer_elems = self.layout.block_floats() / self.layout.num_layers;
        let floats = blocks.len() * layer_elems;
        // Every layer is checked before any is copied, so no check leaves a copy in flight behind an error.
        for (layer, bytes) in layers.iter().enumerate() {
            if bytes.len() != 4 * floats {
                return Err(EngineError::KvImport(format!(
                    "layer {layer}: {} bytes for {} blocks, {} expected",
                    bytes.len(),
                    blocks.len(),
                    4 * floats
                )));
            }
        }
        let (
            Staged {
                block_ids: ids,
                chunk,
            },
            pinned,
        ) = staging.ensure_import(gpu, blocks.len(), floats)?;
        gpu.stream
            .memcpy_htod(blocks, &mut ids.slice_mut(..blocks.len()))
            .during(|| "uploading the block ids of a KV import".into())?;
        // Layers alternate between the two pinned buffers: the host fills one while the other's copy to the
        // device runs. One device chunk is enough, since the stream orders each copy after the scatter before.
        let mut copied: [Option<CudaEvent>; 2] = [None, None];
        for (layer, bytes) in layers.iter().enumerate() {
            let slot = layer % 2;
            // The copy out of this buffer two layers back must be done before it is refilled.
            if let Some(event) = copied[slot].take() {
                event
                    .synchronize()
                    .during(|| format!("writing KV layer {layer}"))?;
            }
            let host = pinned[slot]
                .as_mut_ptr()
                .during(|| "waiting for a pinned KV buffer".into())?;
            // SAFETY: the pinned buffer holds at least `floats` f32 and no copy reads it now (its last copy is
            // done).
            let staged = unsafe { std::slice::from_raw_parts_mut(host.cast::<u8>(), 4 * floats) };
            // One thread copies a layer at a few GB/s, far below the pinned copy's ~55 GB/s; the rayon pool
            // (idle on a GPU worker) spreads it over the cores.
            staged
                .par_chunks_mut(STAGING_COPY_CHUNK_BYTES)
                .zip(bytes.par_chunks(STAGING_COPY_CHUNK_BYTES))
                .for_each(|(target, source)| target.copy_from_slice(source));
            // SAFETY: both buffers hold at least `floats` f32; the pinned one is not written again before
            // `copied[slot]` says the copy is done.
            unsafe {
                cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                    addr(chunk, gpu),
                    host.cast(),
                    4 * floats,
                    gpu.stream.cu_stream(),
                )
            }
            .result()
            .during(|| format!("copying KV layer {layer} to the GPU"))?;
            copied[slot] = Some(
                gpu.stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .during(|| format!("marking the copy of KV layer {layer}"))?,
            );
            self.kernels.scatter_layer(
                addr(chunk, gpu),
                addr(ids, gpu),
                blocks.len(),
                self.kv_pool.address,
                &self.layer_slice(layer),
            )?;
        }
        gpu.stream
            .synchronize()
            .during(|| "writing KV layers".into())?;
        Ok(())
    }

    fn device_kv_handle(&self) -> Result<Option<String>, EngineError> {
        let handle =
            self.kv_pool
                .handle(&self.gpu, self.num_blocks, self.layout.block_floats() * 2)?;
        Ok(Some(handle.to_string()))
    }

    fn push_blocks(
        &mut self,
        target: &str,
        source: &[BlockId],
        destination: &[BlockId],
    ) -> Result<(u64, &'static str), EngineError> {
        self.check_blocks(source)?;
        let (bytes, path) = self.destinations.push(
            &self.gpu,
            self.kv_pool.address,
            self.layout.block_floats() * 2,
            target,
            source,
            destination,
        )?;
        Ok((bytes, path.as_str()))
    }
}

impl CudaBackend {
    /// Where layer `layer` lies inside a pool block.
    fn layer_slice(&self, layer: usize) -> LayerSlice {
        let layer_elems = self.layout.block_floats() / self.layout.num_layers;
        LayerSlice {
            block_elems: self.layout.block_floats(),
            layer_offset: layer * layer_elems,
            layer_elems,
            head_dim: self.layout.head_dim,
            block_size: self.layout.block_size_tokens,
        }
    }

    fn check_blocks(&self, blocks: &[BlockId]) -> Result<(), EngineError> {
        match blocks
            .iter()
            .find(|&&block| block as usize >= self.num_blocks)
        {
            Some(block) => Err(EngineError::Config(format!(
                "block {block} is outside the pool of {} blocks",
                self.num_blocks
            ))),
            None => Ok(()),
        }
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.gpu.context.bind_to_thread().is_ok() {
            // A step queued ahead may still run and copy its picks into page-locked memory freed below.
            let _ = self.gpu.stream.synchronize();
            self.destinations.close();
        }
    }
}

/// The tokens a step runs, over every sequence of `batch`.
fn step_tokens(batch: &[SequenceStep<'_>]) -> usize {
    batch.iter().map(|step| step.token_ids.len()).sum()
}

/// The tokens of a step's `picks`: a fused argmax key's low half is `u32::MAX - token`
/// (`argmax_key` in decode_gemv.cu), and a key of 0 means the row had no logit to pick.
fn picked_tokens(
    picks: Picks<'_>,
    vocab_size: usize,
    tokens: &mut Vec<u32>,
) -> Result<(), CudaError> {
    tokens.clear();
    match picks {
        Picks::Keys(keys) => {
            for &key in keys {
                let token = u32::MAX - key as u32;
                if key == 0 || token as usize >= vocab_size {
                    return Err(CudaError::Unsupported(format!(
                        "the GPU argmax returned no token (key {key:#x})"
                    )));
                }
                tokens.push(token);
            }
        }
        Picks::Tokens(picked) => tokens.extend_from_slice(picked),
        Picks::Draws(out) => {
            // A `DrawOut` starts with the drawn token (draw.cu).
            for row in out.chunks_exact(DRAW_OUT_BYTES) {
                let token = u32::from_le_bytes([row[0], row[1], row[2], row[3]]);
                if token as usize >= vocab_size {
                    return Err(CudaError::Unsupported(format!(
                        "the GPU drew token {token}, outside the vocabulary ({vocab_size} tokens)"
                    )));
                }
                tokens.push(token);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::one_shared_memory_split;

    #[test]
    fn one_shared_memory_split_for_small_models_unless_overridden() {
        assert!(one_shared_memory_split(1024, None), "Qwen3-0.6B");
        assert!(one_shared_memory_split(64, None), "the fixtures");
        assert!(!one_shared_memory_split(4096, None), "Qwen3-8B");
        assert!(
            !one_shared_memory_split(2048, None),
            "not measured: the driver's choice"
        );
        assert!(one_shared_memory_split(4096, Some("1")));
        assert!(!one_shared_memory_split(1024, Some("0")));
        assert!(
            one_shared_memory_split(1024, Some("yes")),
            "only 0 and 1 override"
        );
    }
}
