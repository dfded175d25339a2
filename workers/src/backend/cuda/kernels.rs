//! The NVRTC kernels of `kernels.cu`, `decode_gemv.cu`, `decode_qkv_attention.cu` and `draw.cu`: compiled
//! once when a backend starts, and one typed launch function each, all through `cuLaunchKernelEx` so that
//! kernels which wait for their predecessor can launch with programmatic dependent launch. Every pointer
//! argument is a raw device address (`u64`) the caller took from a live allocation of the right size; 0 stands
//! for a null pointer where the kernel accepts one.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{
    CUfunction_attribute, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue,
    CUlaunchAttributeValue_union__bindgen_ty_1, CUlaunchConfig, cuLaunchKernelEx,
    cuOccupancyMaxActiveClusters,
};
use cudarc::driver::{CudaFunction, CudaStream, DriverError, LaunchConfig};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::device::{CudaError, DriverContext, GpuContext};
use crate::sampling::DRAW_CANDIDATES;

const SOURCE: &str = concat!(
    include_str!("kernels.cu"),
    include_str!("decode_gemv.cu"),
    include_str!("decode_qkv_attention.cu"),
    include_str!("draw.cu")
);

/// Logits a block of `draw_chunk_stats` takes (`DRAW_CHUNK` in draw.cu).
pub(crate) const DRAW_CHUNK: usize = 4096;
/// Chunks a row may have (`DRAW_MAX_CHUNKS`: `draw_row` keeps their sums in shared memory).
const DRAW_MAX_CHUNKS: usize = 64;
/// Bytes `draw.cu` leaves per row (`DrawOut`): token, logit, two f64 sums, the candidates' keys.
pub(crate) const DRAW_OUT_BYTES: usize = 4 + 4 + 8 + 8 + 8 * DRAW_CANDIDATES;
/// Dynamic shared memory a block gets without opting in.
const DEFAULT_SHARED_BYTES: usize = 48 * 1024;

/// Chunks of `DRAW_CHUNK` logits in a row.
pub(crate) fn draw_chunks(vocab_size: usize) -> usize {
    vocab_size.div_ceil(DRAW_CHUNK)
}

/// `draw_row`'s dynamic shared memory: the chunks' candidates, padded to a power of two.
fn draw_row_shared_bytes(vocab_size: usize) -> usize {
    8 * (draw_chunks(vocab_size) * DRAW_CANDIDATES).next_power_of_two()
}

/// Whether the device draws fit a vocabulary of `vocab_size` (up to 262,144 tokens); a larger one draws on
/// the host from copied logits.
pub(crate) fn draw_fits(vocab_size: usize) -> bool {
    vocab_size > 0
        && draw_chunks(vocab_size) <= DRAW_MAX_CHUNKS
        && draw_row_shared_bytes(vocab_size) <= DEFAULT_SHARED_BYTES
}

/// Device addresses of the buffers a step's row draws use (sized by the caller for its rows): `params`,
/// a `DrawParams` (two f64) a row; `chunk_top`, two u64 keys a chunk; `chunk_stats`, three f64 a chunk;
/// `chunk_candidates`, `DRAW_CANDIDATES` u64 keys a chunk; `out`, `DRAW_OUT_BYTES` a row.
pub(crate) struct DrawBuffers {
    pub(crate) params: u64,
    pub(crate) chunk_top: u64,
    pub(crate) chunk_stats: u64,
    pub(crate) chunk_candidates: u64,
    pub(crate) out: u64,
    /// Each row's drawn token again, one u32 a row: where a step queued ahead finds its input.
    pub(crate) tokens: u64,
}

/// Tokens of the largest step the decode GEMVs take (`GEMV_MAX_TOKENS`: the graph buckets 1 and 2). At four
/// tokens they measured slower than cuBLAS with the separate norm and SwiGLU kernels (PERF.md).
pub(crate) const DECODE_GEMV_MAX_TOKENS: usize = 2;
/// Tokens of the largest step the tensor-core decode GEMVs take (`MMA_GEMV_MAX_TOKENS`: the graph buckets
/// up to 8); they take 1, 2, 4 or 8. At eight they measured as fast as cuBLAS alone and, with the fused
/// attention they allow, 3 % faster for the 0.6B shape (PERF.md, stop 26).
pub(crate) const MMA_GEMV_MAX_TOKENS: usize = 8;
/// Shared memory a tensor-core decode GEMV's input may take: above it a multiprocessor holds too few blocks
/// to keep the weights streaming (Qwen3-8B at eight tokens, 192 KiB and one block, measured 27 % slower than
/// cuBLAS).
const MMA_GEMV_MAX_SHARED_BYTES: usize = 64 * 1024;
/// Threads of a decode GEMV block (`GEMV_THREADS`), i.e. `GEMV_WARPS` warps; the tensor-core ones too.
const GEMV_THREADS: u32 = 128;
const GEMV_WARPS: usize = 4;
/// Shared memory a block may take without opting in, less what the kernels declare statically.
const GEMV_MAX_SHARED_BYTES: usize = 48 * 1024 - 1024;

/// Threads per block of the attention kernel (4 warps, `ATTENTION_WARPS` in the source).
const ATTENTION_THREADS: u32 = 128;
/// Steps of at most this many tokens merge their attention splits in the last split's block
/// (`attention_partial_merged`): it saves a launch per layer, which pays where launches bound the step (batch
/// 1: 1.77 -> 1.60 ms on the H100), while the same change at batch 8 and 64 measured slower (PERF.md).
const MERGE_IN_PLACE_MAX_TOKENS: usize = 2;
/// Most splits of one token's attention (`MAX_MERGED_SPLITS` in the source: the merging block keeps one
/// weight per split in shared memory).
pub(crate) const MAX_ATTENTION_SPLITS: usize = 1024;
/// The widest head the attention kernel holds in registers (`MAX_DIMS_PER_LANE * 32`).
pub(crate) const MAX_HEAD_DIM: usize = 256;
/// Heads a block of `qk_norm_rope_store` takes, one warp each (`QK_ROPE_WARPS`).
const QK_ROPE_WARPS: usize = 8;
/// Query tokens per block of `prefill_attention` (`PREFILL_TILE_Q`).
pub(crate) const PREFILL_TILE_TOKENS: usize = 64;
/// Dynamic shared memory of `prefill_attention` (`PREFILL_SHARED_BYTES`): its Q tile and two stages of K
/// and V tiles of 64 keys, rows of 136 bf16.
const PREFILL_SHARED_BYTES: u32 = (64 + 4 * 64) * 136 * 2;
/// Threads of a `prefill_attention` block: four warps of 16 queries (`PREFILL_THREADS`).
const PREFILL_THREADS: u32 = 128;

/// Whether `attention_decode_fused` (one 16-byte load per 8 dims of a key) takes this head size.
pub(crate) fn decode_attention_fits(head_dim: usize) -> bool {
    matches!(head_dim, 16 | 32 | 64 | 128 | 256)
}

/// q heads per KV head that `attention_decode_grouped` covers in one block (`MAX_ATTENTION_GROUP`).
const ATTENTION_GROUP: usize = 2;

/// Whether `attention_decode_grouped` (a block per KV head doing its q heads, one pair of a head a thread)
/// takes this shape: head_dim 128 and [`ATTENTION_GROUP`] q heads per KV head.
pub(crate) fn grouped_decode_attention_fits(
    head_dim: usize,
    num_q_heads: usize,
    num_kv_heads: usize,
) -> bool {
    head_dim == 128 && num_q_heads == ATTENTION_GROUP * num_kv_heads
}

/// Blocks of `decode_qkv_attention`'s cluster for one KV head (`QKVA_CLUSTER`): more than the portable 8,
/// so the kernel asks for non-portable cluster sizes.
const QKV_ATTENTION_CLUSTER: u32 = 16;
/// Threads of a `decode_qkv_attention` block (`QKVA_THREADS`).
const QKV_ATTENTION_THREADS: u32 = 256;
/// Dynamic shared memory of a `decode_qkv_attention` block (`QKVA_SHARED_BYTES`): its 32 rows of the qkv
/// weight, up to 1024 wide.
const QKV_ATTENTION_SHARED_BYTES: u32 = 32 * 1024 * 2;

/// Whether `decode_qkv_attention` takes this shape: head_dim 128, [`ATTENTION_GROUP`] q heads per KV head,
/// and a hidden size of whole 256-wide parts up to 1024 (a lane holds at most four 16-byte chunks of a row).
pub(crate) fn qkv_attention_fits(
    head_dim: usize,
    num_q_heads: usize,
    num_kv_heads: usize,
    hidden_size: usize,
) -> bool {
    grouped_decode_attention_fits(head_dim, num_q_heads, num_kv_heads)
        && hidden_size.is_multiple_of(256)
        && (256..=1024).contains(&hidden_size)
}

/// `decode_qkv_attention` on this GPU.
struct QkvAttention {
    function: CudaFunction,
    /// Clusters of [`QKV_ATTENTION_CLUSTER`] blocks the GPU holds at once (`cuOccupancyMaxActiveClusters`).
    max_active_clusters: usize,
}

/// Whether `prefill_attention` (tensor cores, m16n8k16 steps over the head) takes this head size.
pub(crate) fn prefill_kernel_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16) && head_dim <= 128
}

pub(crate) struct Kernels {
    stream: Arc<CudaStream>,
    /// Whether kernels that wait for their predecessor (`wait_for_previous_grid`) launch with programmatic
    /// stream serialization: Hopper and later, unless `TANDEM_CUDA_PDL=0`.
    programmatic: bool,
    multiprocessors: usize,
    /// `[epilogue][tokens 1, 2]`, see [`GemvOp`].
    decode_gemv: [[CudaFunction; 2]; 4],
    /// The tensor-core decode GEMVs, `[epilogue][tokens 1, 2, 4, 8]`.
    decode_gemv_mma: [[CudaFunction; 4]; 4],
    /// Dynamic shared memory a tensor-core decode GEMV may take (its input, `[tokens][k]` bf16): what the
    /// GPU lets a block opt in to, less its static shared memory.
    mma_gemv_shared_limit: usize,
    embed: CudaFunction,
    add_rms_norm: CudaFunction,
    qk_norm_rope_store: CudaFunction,
    attention_partial: CudaFunction,
    attention_partial_merged: CudaFunction,
    attention_decode_fused: CudaFunction,
    attention_decode_grouped: CudaFunction,
    /// `decode_qkv_attention` (thread block clusters, sm_90 and later), and whether clusters of its size fit
    /// the GPU so that a cluster for every KV head of the model is resident at once.
    qkv_attention: Option<QkvAttention>,
    attention_combine: CudaFunction,
    prefill_attention: CudaFunction,
    swiglu: CudaFunction,
    argmax_rows: CudaFunction,
    draw_chunk_top: CudaFunction,
    draw_chunk_stats: CudaFunction,
    draw_row: CudaFunction,
    bf16_to_f32: CudaFunction,
    f32_to_bf16: CudaFunction,
    gather_layer_f32: CudaFunction,
    scatter_layer_f32: CudaFunction,
}

/// Where one layer's part of pool blocks lies, for `gather_layer` / `scatter_layer`.
pub(crate) struct LayerSlice {
    /// Elements of one pool block (every layer).
    pub(crate) block_elems: usize,
    /// Where the layer starts inside a block, in elements.
    pub(crate) layer_offset: usize,
    /// Elements of the layer's part of one block.
    pub(crate) layer_elems: usize,
    pub(crate) head_dim: usize,
    pub(crate) block_size: usize,
}

/// Where `embed` finds a step's tokens: its ids, and for the marks of a step queued ahead of the host the picks of
/// the step before it (that step's fused argmax keys and the tokens of `argmax_rows`, one per row).
#[derive(Clone, Copy)]
pub(crate) struct TokenSource {
    pub(crate) ids: u64,
    pub(crate) previous_keys: u64,
    pub(crate) previous_tokens: u64,
}

/// The token id that has `embed` take row `t`'s token from the previous step's fused argmax key (kernels.cu).
pub(crate) const TOKEN_FROM_PREVIOUS_KEY: u32 = u32::MAX;
/// The token id that has `embed` take row `t`'s token from where the previous step's `argmax_rows` or `draw_row`
/// left it.
pub(crate) const TOKEN_FROM_PREVIOUS_TOKEN: u32 = u32::MAX - 1;

/// One kernel argument, passed to the driver by the address of its value.
#[derive(Clone, Copy)]
enum Arg {
    /// A device address or a `size_t`.
    Ptr(u64),
    Int(i32),
    Float(f32),
}

/// What a decode GEMV does around its product (`decode_gemv.cu`); the input is the hidden state normalized
/// with `norm_weight` for all but `AddTo`, whose input is a bf16 activation.
#[derive(Clone, Copy)]
pub(crate) enum GemvOp {
    /// `out[t, r] = RMSNorm(hidden[t]) · w[r]` (f32).
    NormStore { out: u64 },
    /// `hidden[t, r] += input[t] · w[r]`: a projection and its residual add.
    AddTo { input: u64 },
    /// `out[t, i] = silu(g) * u` (bf16) with `g, u = RMSNorm(hidden[t]) · w[i], w[n + i]`.
    NormSwiglu { out: u64 },
    /// As `NormStore`, and `argmax_keys[t]` (zeroed by `embed`) ends as the greedy token's key.
    NormArgmax { out: u64, argmax_keys: u64 },
}

/// One decode GEMV: `n` outputs (the swiglu's intermediate size for `NormSwiglu`, whose `weight` has `2n`
/// rows) from inputs of `k`, for `num_tokens` tokens; on the tensor cores with `mma`.
pub(crate) struct GemvShape {
    pub(crate) num_tokens: usize,
    pub(crate) k: usize,
    pub(crate) n: usize,
    pub(crate) mma: bool,
}

/// Whether the decode GEMVs take a step of `num_tokens` tokens whose projections read inputs of the
/// `input_widths`: each a whole number of 16-byte chunks, the widest fitting a block's shared memory.
pub(crate) fn decode_gemv_fits(num_tokens: usize, input_widths: &[usize]) -> bool {
    let widest = input_widths.iter().copied().max().unwrap_or(0);
    num_tokens <= DECODE_GEMV_MAX_TOKENS
        && num_tokens.is_power_of_two()
        && input_widths.iter().all(|width| width.is_multiple_of(8))
        && num_tokens * widest * 2 <= GEMV_MAX_SHARED_BYTES
}

/// Whether the tensor-core decode GEMVs take a step of `num_tokens` tokens whose projections read inputs of
/// the `input_widths`: 1, 2, 4 or 8 tokens, inputs of whole 32-wide k blocks, the widest within
/// [`MMA_GEMV_MAX_SHARED_BYTES`] and the `shared_limit` bytes a block may opt in to.
fn decode_gemv_mma_fits(num_tokens: usize, input_widths: &[usize], shared_limit: usize) -> bool {
    let widest = input_widths.iter().copied().max().unwrap_or(0);
    (1..=MMA_GEMV_MAX_TOKENS).contains(&num_tokens)
        && num_tokens.is_power_of_two()
        && input_widths.iter().all(|width| width.is_multiple_of(32))
        && num_tokens * widest * 2 <= shared_limit.min(MMA_GEMV_MAX_SHARED_BYTES)
}

fn grid(x: usize, y: usize, z: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, z as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads for a block that walks `width` elements: a multiple of 32, at most 1024.
fn threads_for(width: usize) -> u32 {
    (width.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// The shape of one layer's attention launch.
pub(crate) struct AttentionShape {
    pub(crate) num_tokens: usize,
    pub(crate) num_q_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) layer: usize,
    pub(crate) block_size: usize,
    pub(crate) block_elems: usize,
    pub(crate) num_splits: usize,
}

/// The launch attribute for thread block clusters of `blocks` blocks along x.
fn cluster_attribute(blocks: u32) -> CUlaunchAttribute {
    CUlaunchAttribute {
        id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
        pad: [0; 4],
        value: CUlaunchAttributeValue {
            clusterDim: CUlaunchAttributeValue_union__bindgen_ty_1 {
                x: blocks,
                y: 1,
                z: 1,
            },
        },
    }
}

impl QkvAttention {
    /// Allows the kernel its non-portable cluster size and asks the driver how many of its clusters fit.
    fn load(function: &CudaFunction, stream: &CudaStream) -> Result<Self, CudaError> {
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )
            .during(|| "allowing decode_qkv_attention clusters of 16".into())?;
        function
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                QKV_ATTENTION_SHARED_BYTES as i32,
            )
            .during(|| "setting decode_qkv_attention's shared memory size".into())?;
        let mut attribute = cluster_attribute(QKV_ATTENTION_CLUSTER);
        let config = CUlaunchConfig {
            gridDimX: QKV_ATTENTION_CLUSTER,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: QKV_ATTENTION_THREADS,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: QKV_ATTENTION_SHARED_BYTES,
            hStream: stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: 1,
        };
        let mut clusters = 0;
        stream
            .context()
            .bind_to_thread()
            .during(|| "binding the context".into())?;
        // SAFETY: `config` is a valid launch configuration with one live attribute; the function belongs
        // to the bound context.
        unsafe { cuOccupancyMaxActiveClusters(&mut clusters, function.cu_function(), &config) }
            .result()
            .during(|| "reading how many decode_qkv_attention clusters fit".into())?;
        Ok(Self {
            function: function.clone(),
            max_active_clusters: usize::try_from(clusters).unwrap_or(0),
        })
    }
}

impl Kernels {
    pub(crate) fn compile(gpu: &GpuContext) -> Result<Self, CudaError> {
        let (major, minor) = gpu
            .context
            .compute_capability()
            .during(|| "reading the compute capability".into())?;
        // NVRTC wants a static string; the few architectures in use are listed, others get PTX for sm_80.
        let arch: &'static str = match (major, minor) {
            (9, 0) => "sm_90",
            (8, 9) => "sm_89",
            (8, 6) => "sm_86",
            (10, 0) => "sm_100",
            (12, 0) => "sm_120",
            _ => "compute_80",
        };
        let options = CompileOptions {
            arch: Some(arch),
            // Exact expf/sqrtf/cosf: parity with the f32 CPU backend matters more than the few cycles.
            use_fast_math: Some(false),
            name: Some("tandem_kernels.cu".into()),
            options: vec![
                format!("-DDRAW_CHUNK={DRAW_CHUNK}"),
                format!("-DDRAW_CANDIDATES={DRAW_CANDIDATES}"),
                format!("-DDRAW_MAX_CHUNKS={DRAW_MAX_CHUNKS}"),
            ],
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(SOURCE, options)
            .map_err(|error| CudaError::Compile(format!("{error:?}")))?;
        let module = gpu
            .context
            .load_module(ptx)
            .during(|| "loading the compiled kernels".into())?;
        let load = |name: &str| {
            module
                .load_function(name)
                .during(|| format!("finding kernel `{name}`"))
        };
        let gemv_set = |epilogue: &str| -> Result<[CudaFunction; 2], CudaError> {
            Ok([
                load(&format!("decode_gemv_{epilogue}_t1"))?,
                load(&format!("decode_gemv_{epilogue}_t2"))?,
            ])
        };
        let shared_optin = gpu
            .context
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .during(|| "reading the shared memory a block may opt in to".into())?;
        // The kernels' static shared memory (partial_tile, block_sum's scratch) is under 2 KiB.
        let mma_gemv_shared_limit = usize::try_from(shared_optin)
            .unwrap_or(0)
            .saturating_sub(2048);
        let mma_gemv_set = |epilogue: &str| -> Result<[CudaFunction; 4], CudaError> {
            let functions = [
                load(&format!("decode_gemv_mma_{epilogue}_t1"))?,
                load(&format!("decode_gemv_mma_{epilogue}_t2"))?,
                load(&format!("decode_gemv_mma_{epilogue}_t4"))?,
                load(&format!("decode_gemv_mma_{epilogue}_t8"))?,
            ];
            for function in &functions {
                function
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        i32::try_from(mma_gemv_shared_limit).unwrap_or(0),
                    )
                    .during(|| "setting a tensor-core decode GEMV's shared memory size".into())?;
            }
            Ok(functions)
        };
        let prefill_attention = load("prefill_attention")?;
        // Above the 48 KiB a kernel gets without asking; every architecture this compiles for has it.
        prefill_attention
            .set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                PREFILL_SHARED_BYTES as i32,
            )
            .during(|| "setting prefill_attention's shared memory size".into())?;
        // A driver that refuses the cluster size or the occupancy query leaves one-sequence steps on the qkv
        // GEMV and the attention kernel, as on GPUs before sm_90.
        let qkv_attention = if major >= 9 {
            QkvAttention::load(&load("decode_qkv_attention")?, &gpu.stream)
                .inspect_err(|error| {
                    tracing::warn!(%error, "decode_qkv_attention is not available on this GPU");
                })
                .ok()
        } else {
            None
        };
        let pdl_wanted = std::env::var("TANDEM_CUDA_PDL").map_or(true, |value| value != "0");
        Ok(Self {
            stream: Arc::clone(&gpu.stream),
            programmatic: major >= 9 && pdl_wanted,
            multiprocessors: gpu.multiprocessors,
            decode_gemv: [
                gemv_set("norm_store")?,
                gemv_set("add")?,
                gemv_set("norm_swiglu")?,
                gemv_set("norm_argmax")?,
            ],
            decode_gemv_mma: [
                mma_gemv_set("norm_store")?,
                mma_gemv_set("add")?,
                mma_gemv_set("norm_swiglu")?,
                mma_gemv_set("norm_argmax")?,
            ],
            mma_gemv_shared_limit,
            embed: load("embed")?,
            add_rms_norm: load("add_rms_norm")?,
            qk_norm_rope_store: load("qk_norm_rope_store")?,
            attention_partial: load("attention_partial")?,
            attention_partial_merged: load("attention_partial_merged")?,
            attention_decode_fused: load("attention_decode_fused")?,
            attention_decode_grouped: load("attention_decode_grouped")?,
            qkv_attention,
            attention_combine: load("attention_combine")?,
            prefill_attention,
            swiglu: load("swiglu")?,
            argmax_rows: load("argmax_rows")?,
            draw_chunk_top: load("draw_chunk_top")?,
            draw_chunk_stats: load("draw_chunk_stats")?,
            draw_row: load("draw_row")?,
            bf16_to_f32: load("bf16_to_f32")?,
            f32_to_bf16: load("f32_to_bf16")?,
            gather_layer_f32: load("gather_layer_f32")?,
            scatter_layer_f32: load("scatter_layer_f32")?,
        })
    }

    /// Asks for the largest shared-memory part of L1 for every kernel of a decode GEMV step. Left to the
    /// driver, they may get different splits of L1 (cache against shared memory), and a multiprocessor
    /// set up for one split takes no block that needs another until it drains: the reading of the
    /// measurements (not of a profile) is that the next kernel's blocks, launched early to load their
    /// weights, waited for the previous kernel's. Whether one split pays depends on the model (see
    /// `one_shared_memory_split` in mod.rs). Of the larger steps' kernels only `embed`, which every step
    /// starts with, asks too; the others keep the driver's choice (the same request for them made batch 64
    /// of the 0.6B shape 7 % slower).
    pub(crate) fn prefer_one_shared_memory_split(&self) -> Result<(), CudaError> {
        for function in self
            .decode_gemv
            .iter()
            .flatten()
            .chain(self.decode_gemv_mma.iter().flatten())
            .chain([
                &self.embed,
                &self.attention_decode_fused,
                &self.attention_decode_grouped,
            ])
            .chain(self.qkv_attention.as_ref().map(|fused| &fused.function))
        {
            function
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                )
                .during(|| "setting a decode kernel's shared memory split".into())?;
        }
        Ok(())
    }

    /// Launches `function` on the stream. `waits`: the kernel calls `wait_for_previous_grid` before it
    /// touches anything an earlier launch writes, so it may launch before its predecessor ends.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and size, every address must be a live
    /// allocation the kernel may access as its launch shape implies, and `shape` must respect the
    /// kernel's block size and shared memory.
    unsafe fn launch(
        &self,
        function: &CudaFunction,
        shape: LaunchConfig,
        args: &[Arg],
        waits: bool,
    ) -> Result<(), DriverError> {
        // SAFETY: the caller's contract; a cluster of one block is a plain launch.
        unsafe { self.launch_clustered(function, shape, args, waits, 1) }
    }

    /// [`Self::launch`] in thread block clusters of `cluster` blocks along x (1: no clusters).
    ///
    /// # Safety
    /// As for [`Self::launch`]; with `cluster` > 1 the grid's x is a multiple of it and the kernel allows
    /// that cluster size.
    unsafe fn launch_clustered(
        &self,
        function: &CudaFunction,
        shape: LaunchConfig,
        args: &[Arg],
        waits: bool,
        cluster: u32,
    ) -> Result<(), DriverError> {
        let mut values = args.to_vec();
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|value| match value {
                Arg::Ptr(value) => (value as *mut u64).cast::<c_void>(),
                Arg::Int(value) => (value as *mut i32).cast::<c_void>(),
                Arg::Float(value) => (value as *mut f32).cast::<c_void>(),
            })
            .collect();
        let mut attributes = Vec::with_capacity(2);
        if waits && self.programmatic {
            attributes.push(CUlaunchAttribute {
                id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value: CUlaunchAttributeValue {
                    programmaticStreamSerializationAllowed: 1,
                },
            });
        }
        if cluster > 1 {
            attributes.push(cluster_attribute(cluster));
        }
        let config = CUlaunchConfig {
            gridDimX: shape.grid_dim.0,
            gridDimY: shape.grid_dim.1,
            gridDimZ: shape.grid_dim.2,
            blockDimX: shape.block_dim.0,
            blockDimY: shape.block_dim.1,
            blockDimZ: shape.block_dim.2,
            sharedMemBytes: shape.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if attributes.is_empty() {
                std::ptr::null_mut()
            } else {
                attributes.as_mut_ptr()
            },
            numAttrs: attributes.len() as u32,
        };
        self.stream.context().bind_to_thread()?;
        // SAFETY: `params` points at one value per kernel parameter (the caller's contract), alive until the
        // call returns (the driver copies them at launch); the stream belongs to the bound context.
        unsafe {
            cuLaunchKernelEx(
                &config,
                function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }

    /// Also zeroes `argmax_keys[t]` for every token, when given (non-zero), for the fused lm_head argmax.
    pub(crate) fn embed(
        &self,
        hidden: u64,
        embedding: u64,
        tokens: TokenSource,
        num_tokens: usize,
        hidden_size: usize,
        argmax_keys: u64,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(hidden),
            Arg::Ptr(embedding),
            Arg::Ptr(tokens.ids),
            Arg::Int(hidden_size as i32),
            Arg::Ptr(argmax_keys),
            Arg::Ptr(tokens.previous_keys),
            Arg::Ptr(tokens.previous_tokens),
        ];
        // SAFETY: the argument list matches `embed` in kernels.cu; the caller passes live buffers of
        // `num_tokens` ids and `num_tokens * hidden_size` floats (and keys, when given), and ids are checked
        // against the vocabulary, except the two marks of a step queued ahead (`TOKEN_FROM_PREVIOUS_KEY`,
        // `TOKEN_FROM_PREVIOUS_TOKEN`), which read the previous picks' row (at least `num_tokens` of each).
        // It launches after the host's metadata upload, not a kernel: no programmatic overlap.
        unsafe { self.launch(&self.embed, grid(num_tokens, 1, 1, 256), &args, false) }
            .during(|| "launching embed".into())
    }

    /// One projection of a decode step of at most [`DECODE_GEMV_MAX_TOKENS`] tokens (`decode_gemv_fits`),
    /// with the work around it that `op` names; `hidden` is the f32 hidden state (`[num_tokens, k]` read for
    /// the norm ops, `[num_tokens, n]` added to by `AddTo`).
    pub(crate) fn decode_gemv(
        &self,
        op: GemvOp,
        weight: u64,
        hidden: u64,
        norm_weight: u64,
        eps: f32,
        shape: &GemvShape,
    ) -> Result<(), CudaError> {
        let token_index = match (shape.num_tokens, shape.mma) {
            (1, _) => 0,
            (2, _) => 1,
            (4, true) => 2,
            (8, true) => 3,
            (other, mma) => {
                let takes = if mma { "1, 2, 4 or 8" } else { "1 or 2" };
                return Err(CudaError::Unsupported(format!(
                    "a decode GEMV of {other} tokens (it takes {takes})"
                )));
            }
        };
        let (epilogue, input, out_f32, out_bf16, keys) = match op {
            GemvOp::NormStore { out } => (0, 0, out, 0, 0),
            GemvOp::AddTo { input } => (1, input, hidden, 0, 0),
            GemvOp::NormSwiglu { out } => (2, 0, 0, out, 0),
            GemvOp::NormArgmax { out, argmax_keys } => (3, 0, out, 0, argmax_keys),
        };
        // Units of work and how many a block takes at once: for the FMA GEMVs, output pairs, `NORM ? 2 : 1` a
        // warp (DECODE_GEMV_ENTRY); for the tensor-core ones, tiles of 8 rows (4 SwiGLU units) a block.
        let (units, units_per_block) = match (op, shape.mma) {
            (GemvOp::NormSwiglu { .. }, true) => (shape.n.div_ceil(4), 1),
            (_, true) => (shape.n.div_ceil(8), 1),
            (GemvOp::NormSwiglu { .. }, false) => (shape.n, 2 * GEMV_WARPS),
            (GemvOp::AddTo { .. }, false) => (shape.n.div_ceil(2), GEMV_WARPS),
            (_, false) => (shape.n.div_ceil(2), 2 * GEMV_WARPS),
        };
        let function = if shape.mma {
            &self.decode_gemv_mma[epilogue][token_index]
        } else {
            &self.decode_gemv[epilogue][token_index]
        };
        let shared_bytes = shape.num_tokens * shape.k * 2;
        // One resident wave: warps walk the rest grid-stride, so no block waits for a second wave.
        let resident = function
            .occupancy_max_active_blocks_per_multiprocessor(GEMV_THREADS, shared_bytes, None)
            .during(|| "reading a decode GEMV's occupancy".into())?
            .max(1) as usize;
        let blocks = units
            .div_ceil(units_per_block)
            .min(resident * self.multiprocessors);
        let launch_shape = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (GEMV_THREADS, 1, 1),
            shared_mem_bytes: shared_bytes as u32,
        };
        let args = [
            Arg::Ptr(weight),
            Arg::Int(shape.k as i32),
            Arg::Int(shape.n as i32),
            Arg::Ptr(hidden),
            Arg::Ptr(norm_weight),
            Arg::Float(eps),
            Arg::Ptr(input),
            Arg::Ptr(out_f32),
            Arg::Ptr(out_bf16),
            Arg::Ptr(keys),
        ];
        // SAFETY: matches `decode_gemv_*` in decode_gemv.cu; `weight` holds n (2n for the swiglu) rows of k
        // bf16, the activations and outputs hold num_tokens rows, k is a multiple of 8 (32 for the tensor-core
        // ones) and the input fits the shared memory (`decode_gemv_fits` / `decode_gemv_mma_fits`, checked by
        // the backend before it takes this path).
        unsafe { self.launch(function, launch_shape, &args, true) }
            .during(|| "launching a decode GEMV".into())
    }

    /// [`decode_gemv_mma_fits`] on this GPU.
    pub(crate) fn decode_gemv_mma_fits(&self, num_tokens: usize, input_widths: &[usize]) -> bool {
        decode_gemv_mma_fits(num_tokens, input_widths, self.mma_gemv_shared_limit)
    }

    /// `rows == 0` means output row r is hidden row r; `delta == 0` skips the residual add.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_rms_norm(
        &self,
        hidden: u64,
        delta: u64,
        weight: u64,
        out: u64,
        rows: u64,
        num_rows: usize,
        hidden_size: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(hidden),
            Arg::Ptr(delta),
            Arg::Ptr(weight),
            Arg::Ptr(out),
            Arg::Ptr(rows),
            Arg::Int(hidden_size as i32),
            Arg::Float(eps),
        ];
        let shape = grid(num_rows, 1, 1, threads_for(hidden_size).min(512));
        // SAFETY: matches `add_rms_norm`; `hidden`/`delta` hold every row named, `out` `num_rows` rows.
        unsafe { self.launch(&self.add_rms_norm, shape, &args, false) }
            .during(|| "launching add_rms_norm".into())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qk_norm_rope_store(
        &self,
        qkv: u64,
        q_out: u64,
        kv_pool: u64,
        q_norm: u64,
        k_norm: u64,
        inv_freq: u64,
        positions: u64,
        kv_blocks: u64,
        shape: &AttentionShape,
        eps: f32,
    ) -> Result<(), CudaError> {
        let mut args = vec![
            Arg::Ptr(qkv),
            Arg::Ptr(q_out),
            Arg::Ptr(kv_pool),
            Arg::Ptr(q_norm),
            Arg::Ptr(k_norm),
            Arg::Ptr(inv_freq),
            Arg::Ptr(positions),
            Arg::Ptr(kv_blocks),
        ];
        args.extend(shape.attention_args());
        args.push(Arg::Float(eps));
        let heads = shape.num_q_heads + 2 * shape.num_kv_heads;
        // One warp a head, QK_ROPE_WARPS of one token a block.
        let launch_shape = grid(
            shape.num_tokens,
            heads.div_ceil(QK_ROPE_WARPS),
            1,
            32 * QK_ROPE_WARPS as u32,
        );
        // SAFETY: matches `qk_norm_rope_store`; every token's KV block is inside the pool (checked by the
        // backend against its block count) and the buffers hold `num_tokens` rows.
        unsafe { self.launch(&self.qk_norm_rope_store, launch_shape, &args, true) }
            .during(|| "launching qk_norm_rope_store".into())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(
        &self,
        q: u64,
        kv_pool: u64,
        block_tables: u64,
        token_meta: u64,
        partial_out: u64,
        partial_max_sum: u64,
        split_counters: u64,
        out: u64,
        shape: &AttentionShape,
    ) -> Result<(), CudaError> {
        let scale = Arg::Float(1.0 / (shape.head_dim as f32).sqrt());
        let launch_shape = grid(
            shape.num_tokens,
            shape.num_q_heads,
            shape.num_splits,
            ATTENTION_THREADS,
        );
        let mut args = vec![
            Arg::Ptr(q),
            Arg::Ptr(kv_pool),
            Arg::Ptr(block_tables),
            Arg::Ptr(token_meta),
            Arg::Ptr(partial_out),
            Arg::Ptr(partial_max_sum),
        ];
        if shape.num_splits > 1 && shape.num_tokens <= MERGE_IN_PLACE_MAX_TOKENS {
            args.extend([Arg::Ptr(split_counters), Arg::Ptr(out)]);
            args.extend(shape.attention_args());
            args.push(scale);
            // SAFETY: matches `attention_partial_merged`; the partial buffers hold num_tokens * heads * splits
            // entries, `split_counters` num_tokens * heads counters left at 0 by every launch, `out` num_tokens *
            // q_dim bf16, splits are at most MAX_ATTENTION_SPLITS, and every block table covers its token's
            // position (checked by the backend).
            return unsafe {
                self.launch(&self.attention_partial_merged, launch_shape, &args, true)
            }
            .during(|| "launching attention_partial_merged".into());
        }
        args.extend(shape.attention_args());
        args.push(scale);
        // SAFETY: matches `attention_partial`; the partial buffers hold num_tokens * heads * splits entries,
        // and every block table covers its token's position (checked by the backend).
        unsafe { self.launch(&self.attention_partial, launch_shape, &args, true) }
            .during(|| "launching attention_partial".into())?;
        let args = [
            Arg::Ptr(partial_out),
            Arg::Ptr(partial_max_sum),
            Arg::Ptr(out),
            Arg::Int(shape.num_q_heads as i32),
            Arg::Int(shape.head_dim as i32),
            Arg::Int(shape.num_splits as i32),
        ];
        let combine_shape = grid(
            shape.num_tokens,
            shape.num_q_heads,
            1,
            threads_for(shape.head_dim).min(256),
        );
        // SAFETY: matches `attention_combine`; `out` holds num_tokens * q_dim bf16.
        unsafe { self.launch(&self.attention_combine, combine_shape, &args, true) }
            .during(|| "launching attention_combine".into())
    }

    /// `qk_norm_rope_store` and `attention` in one launch, for a decode step (one token a sequence; the backend
    /// takes it up to `FUSED_ATTENTION_MAX_TOKENS` sequences) whose head size `decode_attention_fits`: q and
    /// the new K and V come from `qkv`, and the earlier keys' K and V load while the previous kernel ends.
    /// `grouped`: one block per (sequence, KV head, split) doing the KV head's q heads
    /// (`attention_decode_grouped`, where [`grouped_decode_attention_fits`]), else one per q head.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_decode_fused(
        &self,
        qkv: u64,
        norms: (u64, u64),
        inv_freq: u64,
        eps: f32,
        kv_pool: u64,
        block_tables: u64,
        token_meta: u64,
        partials: (u64, u64, u64),
        out: u64,
        shape: &AttentionShape,
        grouped: bool,
    ) -> Result<(), CudaError> {
        if grouped
            && !grouped_decode_attention_fits(shape.head_dim, shape.num_q_heads, shape.num_kv_heads)
        {
            return Err(CudaError::Unsupported(format!(
                "grouped decode attention of {} q heads over {} KV heads with head_dim {}",
                shape.num_q_heads, shape.num_kv_heads, shape.head_dim
            )));
        }
        if !decode_attention_fits(shape.head_dim) {
            return Err(CudaError::Unsupported(format!(
                "fused decode attention of {} tokens with head_dim {}",
                shape.num_tokens, shape.head_dim
            )));
        }
        let (partial_out, partial_max_sum, split_counters) = partials;
        let mut args = vec![
            Arg::Ptr(qkv),
            Arg::Ptr(norms.0),
            Arg::Ptr(norms.1),
            Arg::Ptr(inv_freq),
            Arg::Float(eps),
            Arg::Ptr(kv_pool),
            Arg::Ptr(block_tables),
            Arg::Ptr(token_meta),
            Arg::Ptr(partial_out),
            Arg::Ptr(partial_max_sum),
            Arg::Ptr(split_counters),
            Arg::Ptr(out),
        ];
        args.extend(shape.attention_args());
        args.push(Arg::Float(1.0 / (shape.head_dim as f32).sqrt()));
        let (function, blocks_per_token) = if grouped {
            (&self.attention_decode_grouped, shape.num_kv_heads)
        } else {
            (&self.attention_decode_fused, shape.num_q_heads)
        };
        let launch_shape = grid(
            shape.num_tokens,
            blocks_per_token,
            shape.num_splits,
            ATTENTION_THREADS,
        );
        // SAFETY: matches `attention_decode_fused` and `attention_decode_grouped`; `qkv` holds num_tokens rows
        // of q_dim + 2 * kv_dim floats, the partial buffers and counters as for `attention_partial_merged`,
        // `out` num_tokens * q_dim bf16, every token's block table covers its position (checked by the
        // backend), and the head size (and for the grouped kernel the group) fits.
        unsafe { self.launch(function, launch_shape, &args, true) }
            .during(|| "launching the fused decode attention".into())
    }

    /// Whether `decode_qkv_attention` can run a model of `num_kv_heads` KV heads here: sm_90 or later, and a
    /// cluster for every KV head resident at once (a cluster that waited for another's to leave would
    /// serialize the layer).
    pub(crate) fn qkv_attention_available(&self, num_kv_heads: usize) -> bool {
        let clusters = self
            .qkv_attention
            .as_ref()
            .map_or(0, |fused| fused.max_active_clusters);
        tracing::info!(
            clusters,
            num_kv_heads,
            "decode_qkv_attention: clusters of {QKV_ATTENTION_CLUSTER} blocks resident at once"
        );
        clusters >= num_kv_heads
    }

    /// A decode step of one sequence: the layer's qkv projection of `RMSNorm(hidden)` and its attention in one
    /// launch (`decode_qkv_attention`), a cluster of [`QKV_ATTENTION_CLUSTER`] blocks per KV head, which
    /// are also the attention's splits. Writes the attention output (bf16) for o_proj and the new key's K and
    /// V into the cache. For shapes where [`qkv_attention_fits`] and [`Self::qkv_attention_available`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_qkv_attention(
        &self,
        qkv_weight: u64,
        hidden_size: usize,
        hidden: u64,
        input_norm: u64,
        qk_norms: (u64, u64),
        inv_freq: u64,
        eps: f32,
        kv_pool: u64,
        block_tables: u64,
        token_meta: u64,
        out: u64,
        shape: &AttentionShape,
    ) -> Result<(), CudaError> {
        let fused = match &self.qkv_attention {
            Some(fused)
                if shape.num_tokens == 1
                    && qkv_attention_fits(
                        shape.head_dim,
                        shape.num_q_heads,
                        shape.num_kv_heads,
                        hidden_size,
                    )
                    && fused.max_active_clusters >= shape.num_kv_heads =>
            {
                fused
            }
            _ => {
                return Err(CudaError::Unsupported(format!(
                    "decode_qkv_attention of {} tokens, {} q heads over {} KV heads, head_dim {}, hidden {} \
                     on this GPU",
                    shape.num_tokens,
                    shape.num_q_heads,
                    shape.num_kv_heads,
                    shape.head_dim,
                    hidden_size
                )));
            }
        };
        let mut args = vec![
            Arg::Ptr(qkv_weight),
            Arg::Int(hidden_size as i32),
            Arg::Ptr(hidden),
            Arg::Ptr(input_norm),
            Arg::Float(eps),
            Arg::Ptr(qk_norms.0),
            Arg::Ptr(qk_norms.1),
            Arg::Ptr(inv_freq),
            Arg::Ptr(kv_pool),
            Arg::Ptr(block_tables),
            Arg::Ptr(token_meta),
            Arg::Ptr(out),
        ];
        args.extend(shape.attention_args());
        args.push(Arg::Float(1.0 / (shape.head_dim as f32).sqrt()));
        let launch_shape = LaunchConfig {
            grid_dim: (QKV_ATTENTION_CLUSTER, shape.num_kv_heads as u32, 1),
            block_dim: (QKV_ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: QKV_ATTENTION_SHARED_BYTES,
        };
        // SAFETY: matches `decode_qkv_attention`; the qkv weight holds q_dim + 2 * kv_dim rows of
        // `hidden_size` bf16, `hidden` one row of f32, `out` q_dim bf16, the token's block table covers its
        // position (checked by the backend), the shape fits (checked above) and the grid's x is one cluster.
        unsafe {
            self.launch_clustered(
                &fused.function,
                launch_shape,
                &args,
                true,
                QKV_ATTENTION_CLUSTER,
            )
        }
        .during(|| "launching decode_qkv_attention".into())
    }

    /// Causal attention for the query tiles listed at `tiles` (first token row, count), on the tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prefill_attention(
        &self,
        q: u64,
        kv_pool: u64,
        block_tables: u64,
        token_meta: u64,
        tiles: u64,
        num_tiles: usize,
        out: u64,
        shape: &AttentionShape,
    ) -> Result<(), CudaError> {
        let mut args = vec![
            Arg::Ptr(q),
            Arg::Ptr(kv_pool),
            Arg::Ptr(block_tables),
            Arg::Ptr(token_meta),
            Arg::Ptr(tiles),
            Arg::Ptr(out),
        ];
        args.extend(shape.attention_args());
        args.push(Arg::Float(1.0 / (shape.head_dim as f32).sqrt()));
        let launch_shape = LaunchConfig {
            shared_mem_bytes: PREFILL_SHARED_BYTES,
            ..grid(num_tiles, shape.num_q_heads, 1, PREFILL_THREADS)
        };
        // SAFETY: matches `prefill_attention` (its thread count, the dynamic shared memory `compile` allowed);
        // every tile lies inside one sequence's tokens, whose block table covers its last position (checked
        // by the backend), and head_dim passed `prefill_kernel_fits`.
        unsafe { self.launch(&self.prefill_attention, launch_shape, &args, false) }
            .during(|| "launching prefill_attention".into())
    }

    pub(crate) fn swiglu(
        &self,
        gate_up: u64,
        out: u64,
        num_tokens: usize,
        intermediate: usize,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(gate_up),
            Arg::Ptr(out),
            Arg::Int(intermediate as i32),
            Arg::Int(num_tokens as i32),
        ];
        // Four values a thread along x; tokens along y, the kernel striding past the grid's limit.
        let launch_shape = grid(
            intermediate.div_ceil(4 * 256),
            num_tokens.min(65_535),
            1,
            256,
        );
        // SAFETY: matches `swiglu`; `gate_up` holds num_tokens * 2 * intermediate floats, `out` half that.
        unsafe { self.launch(&self.swiglu, launch_shape, &args, false) }
            .during(|| "launching swiglu".into())
    }

    /// Converts `count` values between bf16 (`to_f32`: from `source` to `target`) and f32 (the other way).
    pub(crate) fn convert(
        &self,
        to_f32: bool,
        source: u64,
        target: u64,
        count: usize,
    ) -> Result<(), CudaError> {
        let function = if to_f32 {
            &self.bf16_to_f32
        } else {
            &self.f32_to_bf16
        };
        let args = [Arg::Ptr(source), Arg::Ptr(target), Arg::Ptr(count as u64)];
        let blocks = count.div_ceil(256).clamp(1, 4096);
        // SAFETY: matches `bf16_to_f32` / `f32_to_bf16`; both buffers hold `count` elements.
        unsafe { self.launch(function, grid(blocks, 1, 1, 256), &args, false) }
            .during(|| "launching a KV block conversion".into())
    }

    /// One layer of the `num_blocks` pool blocks listed at `block_ids` into the f32 `chunk`, slots of the
    /// last block from `last_used_slots` on zeroed.
    pub(crate) fn gather_layer(
        &self,
        kv_pool: u64,
        block_ids: u64,
        num_blocks: usize,
        chunk: u64,
        slice: &LayerSlice,
        last_used_slots: usize,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(kv_pool),
            Arg::Ptr(block_ids),
            Arg::Ptr(chunk),
            Arg::Ptr(slice.block_elems as u64),
            Arg::Ptr(slice.layer_offset as u64),
            Arg::Int(slice.layer_elems as i32),
            Arg::Int(slice.head_dim as i32),
            Arg::Int(slice.block_size as i32),
            Arg::Int(last_used_slots as i32),
        ];
        let x = slice.layer_elems.div_ceil(256).clamp(1, 64);
        // SAFETY: matches `gather_layer_f32`; `block_ids` holds `num_blocks` ids inside the pool and `chunk`
        // has room for `num_blocks * layer_elems` floats.
        unsafe {
            self.launch(
                &self.gather_layer_f32,
                grid(x, num_blocks, 1, 256),
                &args,
                false,
            )
        }
        .during(|| "launching gather_layer_f32".into())
    }

    /// The f32 `chunk` of `num_blocks` blocks into one layer of the pool blocks listed at `block_ids`.
    pub(crate) fn scatter_layer(
        &self,
        chunk: u64,
        block_ids: u64,
        num_blocks: usize,
        kv_pool: u64,
        slice: &LayerSlice,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(chunk),
            Arg::Ptr(block_ids),
            Arg::Ptr(kv_pool),
            Arg::Ptr(slice.block_elems as u64),
            Arg::Ptr(slice.layer_offset as u64),
            Arg::Int(slice.layer_elems as i32),
        ];
        let x = slice.layer_elems.div_ceil(256).clamp(1, 64);
        // SAFETY: matches `scatter_layer_f32`; as in `gather_layer`.
        unsafe {
            self.launch(
                &self.scatter_layer_f32,
                grid(x, num_blocks, 1, 256),
                &args,
                false,
            )
        }
        .during(|| "launching scatter_layer_f32".into())
    }

    pub(crate) fn argmax_rows(
        &self,
        logits: u64,
        tokens: u64,
        num_rows: usize,
        vocab_size: usize,
    ) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(logits),
            Arg::Ptr(tokens),
            Arg::Int(vocab_size as i32),
        ];
        // SAFETY: matches `argmax_rows` (1024 threads, its shared arrays' size).
        unsafe { self.launch(&self.argmax_rows, grid(num_rows, 1, 1, 1024), &args, false) }
            .during(|| "launching argmax_rows".into())
    }

    /// Each row's draw (`draw.cu`): the three launches over the first `num_rows` rows of `logits`, with
    /// `params` a `DrawParams` a row, and the buffers of [`DrawBuffers`] sized for at least `num_rows`.
    /// `mark` is called after each launch with its kernel's name (for `TANDEM_CUDA_LAUNCH_TIMES`).
    pub(crate) fn draw_rows(
        &self,
        logits: u64,
        buffers: &DrawBuffers,
        num_rows: usize,
        vocab_size: usize,
        mark: &dyn Fn(&'static str) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let chunks = draw_chunks(vocab_size);
        let vocab = Arg::Int(vocab_size as i32);
        // SAFETY: each launch matches its kernel's parameters (draw.cu); every buffer holds `num_rows` rows of
        // `chunks` chunks (`DeviceDraws::new` in draw.rs), and `draw_row`'s dynamic shared memory is
        // `draw_row_shared_bytes`, which `draw_fits` keeps within what a block gets without asking.
        unsafe {
            self.launch(
                &self.draw_chunk_top,
                grid(chunks, num_rows, 1, (DRAW_CHUNK / 16) as u32),
                &[Arg::Ptr(logits), vocab, Arg::Ptr(buffers.chunk_top)],
                false,
            )
            .during(|| "launching draw_chunk_top".into())?;
            mark("draw_chunk_top")?;
            self.launch(
                &self.draw_chunk_stats,
                grid(chunks, num_rows, 1, (DRAW_CHUNK / 8) as u32),
                &[
                    Arg::Ptr(logits),
                    vocab,
                    Arg::Ptr(buffers.params),
                    Arg::Ptr(buffers.chunk_top),
                    Arg::Ptr(buffers.chunk_stats),
                    Arg::Ptr(buffers.chunk_candidates),
                ],
                false,
            )
            .during(|| "launching draw_chunk_stats".into())?;
            mark("draw_chunk_stats")?;
            let mut row_shape = grid(num_rows, 1, 1, 1024);
            row_shape.shared_mem_bytes = draw_row_shared_bytes(vocab_size) as u32;
            self.launch(
                &self.draw_row,
                row_shape,
                &[
                    Arg::Ptr(logits),
                    vocab,
                    Arg::Int(chunks as i32),
                    Arg::Ptr(buffers.params),
                    Arg::Ptr(buffers.chunk_top),
                    Arg::Ptr(buffers.chunk_stats),
                    Arg::Ptr(buffers.chunk_candidates),
                    Arg::Ptr(buffers.out),
                    Arg::Ptr(buffers.tokens),
                ],
                false,
            )
            .during(|| "launching draw_row".into())?;
            mark("draw_row")
        }
    }
}

impl AttentionShape {
    /// `num_q_heads, num_kv_heads, head_dim, layer, block_size, block_elems`: the arguments the attention
    /// kernels and `qk_norm_rope_store` take after their buffers.
    fn attention_args(&self) -> [Arg; 6] {
        [
            Arg::Int(self.num_q_heads as i32),
            Arg::Int(self.num_kv_heads as i32),
            Arg::Int(self.head_dim as i32),
            Arg::Int(self.layer as i32),
            Arg::Int(self.block_size as i32),
            Arg::Ptr(self.block_elems as u64),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_gemvs_take_one_or_two_tokens_whose_inputs_fit_shared_memory() {
        let qwen3_0_6b = [1024, 2048, 3072];
        assert!(decode_gemv_fits(1, &qwen3_0_6b));
        assert!(decode_gemv_fits(2, &qwen3_0_6b));
        assert!(!decode_gemv_fits(3, &qwen3_0_6b));
        assert!(
            !decode_gemv_fits(4, &qwen3_0_6b),
            "slower than cuBLAS at four"
        );
        assert!(!decode_gemv_fits(0, &qwen3_0_6b));
        // Qwen3-8B: a 12288-wide down_proj input is 24 KiB a token in bf16.
        let qwen3_8b = [4096, 4096, 12288];
        assert!(decode_gemv_fits(1, &qwen3_8b));
        assert!(!decode_gemv_fits(2, &qwen3_8b));
        // Every input, not only the widest, must be whole 16-byte chunks.
        assert!(!decode_gemv_fits(1, &[1024, 1028, 3072]));
    }

    #[test]
    fn tensor_core_decode_gemvs_take_up_to_eight_tokens_of_whole_k_blocks() {
        // An H100 lets a block opt in to 227 KiB; the kernels keep 2 KiB for their static shared memory.
        let h100 = 227 * 1024 - 2048;
        let qwen3_0_6b = [1024, 2048, 3072];
        // Eight tokens of the 3072-wide down_proj input: 48 KiB.
        for tokens in [1, 2, 4, 8] {
            assert!(decode_gemv_mma_fits(tokens, &qwen3_0_6b, h100), "{tokens}");
        }
        for tokens in [0, 3, 6, 16] {
            assert!(!decode_gemv_mma_fits(tokens, &qwen3_0_6b, h100), "{tokens}");
        }
        // Qwen3-8B: a 12288-wide down_proj input is 24 KiB a token in bf16, so two tokens fit the budget
        // and four (96 KiB) do not.
        let qwen3_8b = [4096, 4096, 12288];
        assert!(decode_gemv_mma_fits(2, &qwen3_8b, h100));
        assert!(!decode_gemv_mma_fits(4, &qwen3_8b, h100));
        // A GPU that lets a block opt in to less bounds it too.
        assert!(!decode_gemv_mma_fits(4, &qwen3_0_6b, 20 * 1024));
        assert!(!decode_gemv_mma_fits(1, &[1024, 1040, 3072], h100));
    }

    /// The value of `#define name <integer>` in the kernels' source.
    fn source_define(name: &str) -> usize {
        let prefix = format!("#define {name} ");
        SOURCE
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no integer #define {name} in the kernels' source"))
    }

    #[test]
    fn launch_shapes_follow_the_kernels_defines() {
        assert_eq!(source_define("PREFILL_TILE_Q"), PREFILL_TILE_TOKENS);
        assert_eq!(source_define("PREFILL_THREADS"), PREFILL_THREADS as usize);
        // PREFILL_SHARED_BYTES: the Q tile and two stages of K and V tiles, rows of PREFILL_MAX_DIM + 8 bf16.
        assert!(SOURCE.contains("#define PREFILL_STRIDE (PREFILL_MAX_DIM + 8)"));
        let rows = source_define("PREFILL_TILE_Q") + 4 * source_define("PREFILL_TILE_K");
        let shared = rows * (source_define("PREFILL_MAX_DIM") + 8) * 2;
        assert_eq!(shared, PREFILL_SHARED_BYTES as usize);
        assert_eq!(source_define("QK_ROPE_WARPS"), QK_ROPE_WARPS);
        assert_eq!(source_define("GEMV_WARPS"), GEMV_WARPS);
        assert_eq!(source_define("GEMV_WARPS") * 32, GEMV_THREADS as usize);
        assert_eq!(source_define("GEMV_MAX_TOKENS"), DECODE_GEMV_MAX_TOKENS);
        assert_eq!(source_define("MMA_GEMV_MAX_TOKENS"), MMA_GEMV_MAX_TOKENS);
        assert!(SOURCE.contains("#define MMA_GEMV_WARPS GEMV_WARPS"));
        assert_eq!(
            source_define("ATTENTION_WARPS") * 32,
            ATTENTION_THREADS as usize
        );
        assert_eq!(
            source_define("QKVA_CLUSTER"),
            QKV_ATTENTION_CLUSTER as usize
        );
        assert_eq!(
            source_define("QKVA_WARPS") * 32,
            QKV_ATTENTION_THREADS as usize
        );
        // QKVA_SHARED_BYTES: a block's share of a KV head's q, k and v rows, QKVA_CHUNKS 16-byte chunks a lane.
        let kv_head_rows = (source_define("QKVA_GROUP") + 2) * source_define("QKVA_HEAD_DIM");
        let block_rows = kv_head_rows / source_define("QKVA_CLUSTER");
        assert_eq!(
            block_rows * 32 * source_define("QKVA_CHUNKS") * 16,
            QKV_ATTENTION_SHARED_BYTES as usize
        );
        assert_eq!(source_define("QKVA_GROUP"), ATTENTION_GROUP);
    }

    #[test]
    fn the_fused_qkv_attention_takes_the_qwen3_0_6b_shape_only() {
        // Qwen3-0.6B: 16 q heads over 8 KV heads of 128, hidden 1024.
        assert!(qkv_attention_fits(128, 16, 8, 1024));
        // Qwen3-1.7B's hidden 2048 is more than a lane holds; Qwen3-8B groups four q heads a KV head.
        assert!(!qkv_attention_fits(128, 16, 8, 2048));
        assert!(!qkv_attention_fits(128, 32, 8, 4096));
        assert!(!qkv_attention_fits(64, 16, 8, 1024));
        assert!(!qkv_attention_fits(128, 16, 8, 1000));
    }

    #[test]
    fn fused_decode_attention_takes_head_sizes_a_warp_tiles() {
        for head_dim in [16, 32, 64, 128, 256] {
            assert!(decode_attention_fits(head_dim), "{head_dim}");
        }
        for head_dim in [8, 24, 80, 96, 512] {
            assert!(!decode_attention_fits(head_dim), "{head_dim}");
        }
    }

    #[test]
    fn grouped_decode_attention_takes_two_q_heads_of_128_per_kv_head() {
        assert_eq!(source_define("MAX_ATTENTION_GROUP"), ATTENTION_GROUP);
        assert!(grouped_decode_attention_fits(128, 16, 8));
        assert!(!grouped_decode_attention_fits(128, 32, 8));
        assert!(!grouped_decode_attention_fits(128, 8, 8));
        assert!(!grouped_decode_attention_fits(64, 16, 8));
    }
}
