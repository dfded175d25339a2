//! The NVRTC kernels of `kernels.cu`: compiled once when a backend starts, and one typed launch function
//! each. Every pointer argument is a raw device address (`u64`) the caller took from a live allocation of
//! the right size; 0 stands for a null pointer where the kernel accepts one.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use super::device::{CudaError, DriverContext, GpuContext};

const SOURCE: &str = include_str!("kernels.cu");

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
/// Query tokens per block of `prefill_attention` (`PREFILL_TILE_Q`).
pub(crate) const PREFILL_TILE_TOKENS: usize = 64;

/// Whether `prefill_attention` (tensor cores, m16n8k16 steps over the head) takes this head size.
pub(crate) fn prefill_kernel_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16) && head_dim <= 128
}

pub(crate) struct Kernels {
    stream: Arc<CudaStream>,
    embed: CudaFunction,
    add_rms_norm: CudaFunction,
    qk_norm_rope_store: CudaFunction,
    attention_partial: CudaFunction,
    attention_partial_merged: CudaFunction,
    attention_combine: CudaFunction,
    prefill_attention: CudaFunction,
    swiglu: CudaFunction,
    argmax_rows: CudaFunction,
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
        Ok(Self {
            stream: Arc::clone(&gpu.stream),
            embed: load("embed")?,
            add_rms_norm: load("add_rms_norm")?,
            qk_norm_rope_store: load("qk_norm_rope_store")?,
            attention_partial: load("attention_partial")?,
            attention_partial_merged: load("attention_partial_merged")?,
            attention_combine: load("attention_combine")?,
            prefill_attention: load("prefill_attention")?,
            swiglu: load("swiglu")?,
            argmax_rows: load("argmax_rows")?,
            bf16_to_f32: load("bf16_to_f32")?,
            f32_to_bf16: load("f32_to_bf16")?,
            gather_layer_f32: load("gather_layer_f32")?,
            scatter_layer_f32: load("scatter_layer_f32")?,
        })
    }

    pub(crate) fn embed(
        &self,
        hidden: u64,
        embedding: u64,
        token_ids: u64,
        num_tokens: usize,
        hidden_size: usize,
    ) -> Result<(), CudaError> {
        let mut launch = self.stream.launch_builder(&self.embed);
        let hidden_size = hidden_size as i32;
        launch
            .arg(&hidden)
            .arg(&embedding)
            .arg(&token_ids)
            .arg(&hidden_size);
        // SAFETY: the argument list matches `embed` in kernels.cu; the caller passes live buffers of
        // `num_tokens` ids and `num_tokens * hidden_size` floats, and ids are checked against the vocabulary.
        unsafe { launch.launch(grid(num_tokens, 1, 1, 256)) }
            .map(drop)
            .during(|| "launching embed".into())
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
        let mut launch = self.stream.launch_builder(&self.add_rms_norm);
        let width = hidden_size as i32;
        launch
            .arg(&hidden)
            .arg(&delta)
            .arg(&weight)
            .arg(&out)
            .arg(&rows)
            .arg(&width)
            .arg(&eps);
        // SAFETY: matches `add_rms_norm`; `hidden`/`delta` hold every row named, `out` `num_rows` rows.
        unsafe { launch.launch(grid(num_rows, 1, 1, threads_for(hidden_size).min(512))) }
            .map(drop)
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
        let mut launch = self.stream.launch_builder(&self.qk_norm_rope_store);
        let (num_q_heads, num_kv_heads, head_dim) = (
            shape.num_q_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
        );
        let (layer, block_size, block_elems) = (
            shape.layer as i32,
            shape.block_size as i32,
            shape.block_elems as u64,
        );
        launch
            .arg(&qkv)
            .arg(&q_out)
            .arg(&kv_pool)
            .arg(&q_norm)
            .arg(&k_norm)
            .arg(&inv_freq)
            .arg(&positions)
            .arg(&kv_blocks)
            .arg(&num_q_heads)
            .arg(&num_kv_heads)
            .arg(&head_dim)
            .arg(&layer)
            .arg(&block_size)
            .arg(&block_elems)
            .arg(&eps);
        let heads = shape.num_q_heads + 2 * shape.num_kv_heads;
        // SAFETY: matches `qk_norm_rope_store`; every token's KV block is inside the pool (checked by the
        // backend against its block count) and the buffers hold `num_tokens` rows.
        unsafe {
            launch.launch(grid(
                shape.num_tokens,
                heads,
                1,
                threads_for(shape.head_dim / 2),
            ))
        }
        .map(drop)
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
        let (num_q_heads, num_kv_heads, head_dim) = (
            shape.num_q_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
        );
        let (layer, block_size, block_elems) = (
            shape.layer as i32,
            shape.block_size as i32,
            shape.block_elems as u64,
        );
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let num_splits = shape.num_splits as i32;
        let launch_shape = grid(
            shape.num_tokens,
            shape.num_q_heads,
            shape.num_splits,
            ATTENTION_THREADS,
        );
        if shape.num_splits > 1 && shape.num_tokens <= MERGE_IN_PLACE_MAX_TOKENS {
            let mut launch = self.stream.launch_builder(&self.attention_partial_merged);
            launch
                .arg(&q)
                .arg(&kv_pool)
                .arg(&block_tables)
                .arg(&token_meta)
                .arg(&partial_out)
                .arg(&partial_max_sum)
                .arg(&split_counters)
                .arg(&out)
                .arg(&num_q_heads)
                .arg(&num_kv_heads)
                .arg(&head_dim)
                .arg(&layer)
                .arg(&block_size)
                .arg(&block_elems)
                .arg(&scale);
            // SAFETY: matches `attention_partial_merged`; the partial buffers hold num_tokens * heads * splits
            // entries, `split_counters` num_tokens * heads counters left at 0 by every launch, `out` num_tokens *
            // q_dim bf16, splits are at most MAX_ATTENTION_SPLITS, and every block table covers its token's
            // position (checked by the backend).
            return unsafe { launch.launch(launch_shape) }
                .map(drop)
                .during(|| "launching attention_partial_merged".into());
        }
        let mut launch = self.stream.launch_builder(&self.attention_partial);
        launch
            .arg(&q)
            .arg(&kv_pool)
            .arg(&block_tables)
            .arg(&token_meta)
            .arg(&partial_out)
            .arg(&partial_max_sum)
            .arg(&num_q_heads)
            .arg(&num_kv_heads)
            .arg(&head_dim)
            .arg(&layer)
            .arg(&block_size)
            .arg(&block_elems)
            .arg(&scale);
        // SAFETY: matches `attention_partial`; the partial buffers hold num_tokens * heads * splits entries,
        // and every block table covers its token's position (checked by the backend).
        unsafe { launch.launch(launch_shape) }
            .map(drop)
            .during(|| "launching attention_partial".into())?;
        let mut launch = self.stream.launch_builder(&self.attention_combine);
        launch
            .arg(&partial_out)
            .arg(&partial_max_sum)
            .arg(&out)
            .arg(&num_q_heads)
            .arg(&head_dim)
            .arg(&num_splits);
        // SAFETY: matches `attention_combine`; `out` holds num_tokens * q_dim bf16.
        unsafe {
            launch.launch(grid(
                shape.num_tokens,
                shape.num_q_heads,
                1,
                threads_for(shape.head_dim).min(256),
            ))
        }
        .map(drop)
        .during(|| "launching attention_combine".into())
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
        let (num_q_heads, num_kv_heads, head_dim) = (
            shape.num_q_heads as i32,
            shape.num_kv_heads as i32,
            shape.head_dim as i32,
        );
        let (layer, block_size, block_elems) = (
            shape.layer as i32,
            shape.block_size as i32,
            shape.block_elems as u64,
        );
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let mut launch = self.stream.launch_builder(&self.prefill_attention);
        launch
            .arg(&q)
            .arg(&kv_pool)
            .arg(&block_tables)
            .arg(&token_meta)
            .arg(&tiles)
            .arg(&out)
            .arg(&num_q_heads)
            .arg(&num_kv_heads)
            .arg(&head_dim)
            .arg(&layer)
            .arg(&block_size)
            .arg(&block_elems)
            .arg(&scale);
        // SAFETY: matches `prefill_attention` (128 threads, static shared memory under 48 KiB); every tile
        // lies inside one sequence's tokens, whose block table covers its last position (checked by the
        // backend), and head_dim passed `prefill_kernel_fits`.
        unsafe { launch.launch(grid(num_tiles, shape.num_q_heads, 1, 128)) }
            .map(drop)
            .during(|| "launching prefill_attention".into())
    }

    pub(crate) fn swiglu(
        &self,
        gate_up: u64,
        out: u64,
        num_tokens: usize,
        intermediate: usize,
    ) -> Result<(), CudaError> {
        let total = (num_tokens * intermediate) as u64;
        let intermediate = intermediate as i32;
        let mut launch = self.stream.launch_builder(&self.swiglu);
        launch
            .arg(&gate_up)
            .arg(&out)
            .arg(&intermediate)
            .arg(&total);
        let blocks = (total as usize).div_ceil(256).min(65_535);
        // SAFETY: matches `swiglu`; `gate_up` holds num_tokens * 2 * intermediate floats, `out` half that.
        unsafe { launch.launch(grid(blocks, 1, 1, 256)) }
            .map(drop)
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
        let total = count as u64;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(&source).arg(&target).arg(&total);
        let blocks = count.div_ceil(256).clamp(1, 4096);
        // SAFETY: matches `bf16_to_f32` / `f32_to_bf16`; both buffers hold `count` elements.
        unsafe { launch.launch(grid(blocks, 1, 1, 256)) }
            .map(drop)
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
        let (block_elems, layer_offset) = (slice.block_elems as u64, slice.layer_offset as u64);
        let (layer_elems, head_dim, block_size, used) = (
            slice.layer_elems as i32,
            slice.head_dim as i32,
            slice.block_size as i32,
            last_used_slots as i32,
        );
        let mut launch = self.stream.launch_builder(&self.gather_layer_f32);
        launch
            .arg(&kv_pool)
            .arg(&block_ids)
            .arg(&chunk)
            .arg(&block_elems)
            .arg(&layer_offset)
            .arg(&layer_elems)
            .arg(&head_dim)
            .arg(&block_size)
            .arg(&used);
        let x = slice.layer_elems.div_ceil(256).clamp(1, 64);
        // SAFETY: matches `gather_layer_f32`; `block_ids` holds `num_blocks` ids inside the pool and `chunk`
        // has room for `num_blocks * layer_elems` floats.
        unsafe { launch.launch(grid(x, num_blocks, 1, 256)) }
            .map(drop)
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
        let (block_elems, layer_offset) = (slice.block_elems as u64, slice.layer_offset as u64);
        let layer_elems = slice.layer_elems as i32;
        let mut launch = self.stream.launch_builder(&self.scatter_layer_f32);
        launch
            .arg(&chunk)
            .arg(&block_ids)
            .arg(&kv_pool)
            .arg(&block_elems)
            .arg(&layer_offset)
            .arg(&layer_elems);
        let x = slice.layer_elems.div_ceil(256).clamp(1, 64);
        // SAFETY: matches `scatter_layer_f32`; as in `gather_layer`.
        unsafe { launch.launch(grid(x, num_blocks, 1, 256)) }
            .map(drop)
            .during(|| "launching scatter_layer_f32".into())
    }

    pub(crate) fn argmax_rows(
        &self,
        logits: u64,
        tokens: u64,
        num_rows: usize,
        vocab_size: usize,
    ) -> Result<(), CudaError> {
        let vocab = vocab_size as i32;
        let mut launch = self.stream.launch_builder(&self.argmax_rows);
        launch.arg(&logits).arg(&tokens).arg(&vocab);
        // SAFETY: matches `argmax_rows` (1024 threads, its shared arrays' size).
        unsafe { launch.launch(grid(num_rows, 1, 1, 1024)) }
            .map(drop)
            .during(|| "launching argmax_rows".into())
    }
}
