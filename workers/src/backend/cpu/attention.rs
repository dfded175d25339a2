//! Grouped-query causal attention that reads K/V straight from the paged cache through each sequence's
//! block table.

use rayon::prelude::*;

use super::kernels::dot;
use crate::backend::SequenceStep;
use crate::kv_cache::layout::KvLayout;

/// The per-token inputs of one layer's attention.
pub(crate) struct AttentionInput<'a> {
    /// `[num_tokens, row_width]`; each row starts with the token's q heads (normed and rotated).
    pub(crate) qkv_rows: &'a [f32],
    pub(crate) row_width: usize,
    pub(crate) token_positions: &'a [usize],
    /// For each token, the index of its sequence in `batch`.
    pub(crate) token_sequences: &'a [usize],
    pub(crate) batch: &'a [SequenceStep<'a>],
}

/// Writes `[num_tokens, num_q_heads * head_dim]` into `out`. Token at position `p` attends to positions
/// `0..=p` of its own sequence, whose K/V must already be in `kv_pool` (the new tokens' included).
pub(crate) fn paged_attention(
    kv_pool: &[f32],
    layout: &KvLayout,
    layer: usize,
    num_q_heads: usize,
    input: &AttentionInput<'_>,
    out: &mut [f32],
) {
    let head_dim = layout.head_dim;
    let block_floats = layout.block_floats();
    let block_size = layout.block_size_tokens;
    let group = num_q_heads / layout.num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    out.par_chunks_mut(head_dim)
        .enumerate()
        .with_min_len(4)
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (task, head_out)| {
            let token = task / num_q_heads;
            let q_head = task % num_q_heads;
            let kv_head = q_head / group;
            let q = &input.qkv_rows[token * input.row_width + q_head * head_dim..][..head_dim];
            let position = input.token_positions[token];
            let block_table = input.batch[input.token_sequences[token]].block_table;
            let num_keys = position + 1;

            scores.clear();
            scores.reserve(num_keys);
            let mut max_score = f32::NEG_INFINITY;
            for (block_index, &block) in block_table
                .iter()
                .enumerate()
                .take(num_keys.div_ceil(block_size))
            {
                let slots = block_size.min(num_keys - block_index * block_size);
                let keys_start =
                    block as usize * block_floats + layout.float_offset(layer, 0, kv_head, 0);
                let keys = &kv_pool[keys_start..keys_start + slots * head_dim];
                for key in keys.chunks_exact(head_dim) {
                    let score = dot(q, key) * scale;
                    max_score = max_score.max(score);
                    scores.push(score);
                }
            }
            let mut total = 0.0f32;
            for score in scores.iter_mut() {
                *score = (*score - max_score).exp();
                total += *score;
            }
            let inverse_total = 1.0 / total;

            head_out.fill(0.0);
            for (block_index, &block) in block_table
                .iter()
                .enumerate()
                .take(num_keys.div_ceil(block_size))
            {
                let first_key = block_index * block_size;
                let slots = block_size.min(num_keys - first_key);
                let values_start =
                    block as usize * block_floats + layout.float_offset(layer, 1, kv_head, 0);
                let values = &kv_pool[values_start..values_start + slots * head_dim];
                for (slot, value) in values.chunks_exact(head_dim).enumerate() {
                    let weight = scores[first_key + slot] * inverse_total;
                    for (o, &v) in head_out.iter_mut().zip(value) {
                        *o += weight * v;
                    }
                }
            }
        });
}
