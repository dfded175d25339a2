//! [`CpuBackend`]: the Qwen3 forward pass in f32 on the CPU, over a paged KV pool in host memory.
//! Projections and lm_head go through [`kernels::matmul_transposed`] (a packed GEMM for many rows, a
//! weight-streaming kernel for few), parallel over the cores with rayon.

mod attention;
mod kernels;

use attention::{AttentionInput, paged_attention};
pub(crate) use kernels::rope_inverse_frequencies;
use kernels::{apply_rope, matmul_transposed, rms_norm, rms_norm_in_place, rope_angles, swiglu};

use super::{Backend, SequenceStep};
use crate::error::EngineError;
use crate::kv_cache::BlockId;
use crate::kv_cache::layout::KvLayout;
use crate::model::config::ModelConfig;
use crate::model::weights::ModelWeights;

pub struct CpuBackend {
    weights: ModelWeights,
    layout: KvLayout,
    num_blocks: usize,
    /// `num_blocks` blocks, each `layout.block_floats()` f32 in the layout of [`KvLayout`].
    kv_pool: Vec<f32>,
    rope_inverse_frequencies: Vec<f32>,
    scratch: Scratch,
}

/// Buffers reused from step to step so the hot loop does not allocate once they reach their high-water size.
#[derive(Default)]
struct Scratch {
    hidden: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attention: Vec<f32>,
    projected: Vec<f32>,
    gate_up: Vec<f32>,
    activated: Vec<f32>,
    last_normed: Vec<f32>,
    matmul: Vec<f32>,
    token_ids: Vec<u32>,
    token_positions: Vec<usize>,
    token_sequences: Vec<usize>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn resize(buffer: &mut Vec<f32>, len: usize) {
    buffer.clear();
    buffer.resize(len, 0.0);
}

impl CpuBackend {
    /// A backend holding `weights` and a KV pool of `num_blocks` blocks of `block_size_tokens` tokens.
    pub fn new(
        weights: ModelWeights,
        num_blocks: usize,
        block_size_tokens: usize,
    ) -> Result<Self, EngineError> {
        if num_blocks == 0 || block_size_tokens == 0 {
            return Err(EngineError::Config(format!(
                "need at least one block of at least one token (got {num_blocks} blocks of {block_size_tokens})"
            )));
        }
        let config = &weights.config;
        let layout = KvLayout {
            num_layers: config.num_layers,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            block_size_tokens,
        };
        let rope_inverse_frequencies = rope_inverse_frequencies(config.head_dim, config.rope_theta);
        Ok(Self {
            kv_pool: vec![0.0; num_blocks * layout.block_floats()],
            weights,
            layout,
            num_blocks,
            rope_inverse_frequencies,
            scratch: Scratch::default(),
        })
    }

    fn check_batch(&self, batch: &[SequenceStep<'_>]) -> Result<(), EngineError> {
        let vocab_size = self.weights.config.vocab_size;
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
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn model_config(&self) -> &ModelConfig {
        &self.weights.config
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
        self.check_batch(batch)?;
        let Self {
            weights,
            layout,
            kv_pool,
            rope_inverse_frequencies,
            scratch: s,
            ..
        } = self;
        let config = &weights.config;
        let (hidden_size, head_dim) = (config.hidden_size, config.head_dim);
        let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
        let qkv_width = q_dim + 2 * kv_dim;
        let intermediate = config.intermediate_size;
        let eps = config.rms_norm_eps;
        let block_floats = layout.block_floats();
        let block_size = layout.block_size_tokens;

        s.token_ids.clear();
        s.token_positions.clear();
        s.token_sequences.clear();
        for (index, step) in batch.iter().enumerate() {
            s.token_ids.extend_from_slice(step.token_ids);
            s.token_positions
                .extend(step.start_position..step.start_position + step.token_ids.len());
            s.token_sequences
                .extend(std::iter::repeat_n(index, step.token_ids.len()));
        }
        let num_tokens = s.token_ids.len();

        resize(&mut s.hidden, num_tokens * hidden_size);
        for (row, &token) in s.hidden.chunks_exact_mut(hidden_size).zip(&s.token_ids) {
            row.copy_from_slice(
                &weights.embed_tokens[token as usize * hidden_size..][..hidden_size],
            );
        }
        resize(&mut s.normed, num_tokens * hidden_size);
        resize(&mut s.qkv, num_tokens * qkv_width);
        resize(&mut s.attention, num_tokens * q_dim);
        resize(&mut s.projected, num_tokens * hidden_size);
        resize(&mut s.gate_up, num_tokens * 2 * intermediate);
        resize(&mut s.activated, num_tokens * intermediate);
        resize(&mut s.cos, head_dim / 2);
        resize(&mut s.sin, head_dim / 2);

        for (layer_index, layer) in weights.layers.iter().enumerate() {
            for (x, out) in s
                .hidden
                .chunks_exact(hidden_size)
                .zip(s.normed.chunks_exact_mut(hidden_size))
            {
                rms_norm(x, &layer.input_norm, eps, out);
            }
            matmul_transposed(
                &s.normed,
                num_tokens,
                hidden_size,
                &layer.qkv_proj,
                qkv_width,
                &mut s.qkv,
                &mut s.matmul,
            );

            for (token, row) in s.qkv.chunks_exact_mut(qkv_width).enumerate() {
                let position = s.token_positions[token];
                rope_angles(position, rope_inverse_frequencies, &mut s.cos, &mut s.sin);
                let (q, kv) = row.split_at_mut(q_dim);
                for head in q.chunks_exact_mut(head_dim) {
                    rms_norm_in_place(head, &layer.q_norm, eps);
                    apply_rope(head, &s.cos, &s.sin);
                }
                let (k, v) = kv.split_at_mut(kv_dim);
                let step = &batch[s.token_sequences[token]];
                let block = step.block_table[position / block_size] as usize;
                let slot = position % block_size;
                for (kv_head, (k_head, v_head)) in k
                    .chunks_exact_mut(head_dim)
                    .zip(v.chunks_exact(head_dim))
                    .enumerate()
                {
                    rms_norm_in_place(k_head, &layer.k_norm, eps);
                    apply_rope(k_head, &s.cos, &s.sin);
                    let base = block * block_floats;
                    let k_at = base + layout.float_offset(layer_index, 0, kv_head, slot);
                    kv_pool[k_at..k_at + head_dim].copy_from_slice(k_head);
                    let v_at = base + layout.float_offset(layer_index, 1, kv_head, slot);
                    kv_pool[v_at..v_at + head_dim].copy_from_slice(v_head);
                }
            }

            let input = AttentionInput {
                qkv_rows: &s.qkv,
                row_width: qkv_width,
                token_positions: &s.token_positions,
                token_sequences: &s.token_sequences,
                batch,
            };
            paged_attention(
                kv_pool,
                layout,
                layer_index,
                config.num_q_heads,
                &input,
                &mut s.attention,
            );
            matmul_transposed(
                &s.attention,
                num_tokens,
                q_dim,
                &layer.o_proj,
                hidden_size,
                &mut s.projected,
                &mut s.matmul,
            );
            for (x, p) in s.hidden.iter_mut().zip(&s.projected) {
                *x += p;
            }

            for (x, out) in s
                .hidden
                .chunks_exact(hidden_size)
                .zip(s.normed.chunks_exact_mut(hidden_size))
            {
                rms_norm(x, &layer.post_attention_norm, eps, out);
            }
            matmul_transposed(
                &s.normed,
                num_tokens,
                hidden_size,
                &layer.gate_up_proj,
                2 * intermediate,
                &mut s.gate_up,
                &mut s.matmul,
            );
            for (gate_up, out) in s
                .gate_up
                .chunks_exact(2 * intermediate)
                .zip(s.activated.chunks_exact_mut(intermediate))
            {
                let (gate, up) = gate_up.split_at(intermediate);
                swiglu(gate, up, out);
            }
            matmul_transposed(
                &s.activated,
                num_tokens,
                intermediate,
                &layer.down_proj,
                hidden_size,
                &mut s.projected,
                &mut s.matmul,
            );
            for (x, p) in s.hidden.iter_mut().zip(&s.projected) {
                *x += p;
            }
        }

        // Only the last new token of each sequence needs logits.
        resize(&mut s.last_normed, batch.len() * hidden_size);
        let mut last_token = 0;
        for (step, out) in batch
            .iter()
            .zip(s.last_normed.chunks_exact_mut(hidden_size))
        {
            last_token += step.token_ids.len();
            let row = &s.hidden[(last_token - 1) * hidden_size..last_token * hidden_size];
            rms_norm(row, &weights.final_norm, eps, out);
        }
        let vocab_size = config.vocab_size;
        logits.clear();
        logits.resize(batch.len() * vocab_size, 0.0);
        matmul_transposed(
            &s.last_normed,
            batch.len(),
            hidden_size,
            weights.lm_head(),
            vocab_size,
            logits,
            &mut s.matmul,
        );
        Ok(())
    }

    fn read_block(&self, block: BlockId, out: &mut [u8]) -> Result<(), EngineError> {
        let floats = self.layout.block_floats();
        let source = &self.kv_pool[block as usize * floats..][..floats];
        for (bytes, value) in out.chunks_exact_mut(4).zip(source) {
            bytes.copy_from_slice(&value.to_le_bytes());
        }
        Ok(())
    }

    fn write_block(&mut self, block: BlockId, bytes: &[u8]) -> Result<(), EngineError> {
        let floats = self.layout.block_floats();
        let target = &mut self.kv_pool[block as usize * floats..][..floats];
        for (value, b) in target.iter_mut().zip(bytes.chunks_exact(4)) {
            *value = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
}
