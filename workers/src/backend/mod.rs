//! The compute seam: a [`Backend`] runs one forward step over a batch of sequences against the paged KV
//! cache it owns. The engine keeps everything else (block tables, prefix cache, sampling) on the host, so a
//! CUDA backend only has to implement this trait.

pub(crate) mod cpu;
pub(crate) mod cuda;

use crate::error::EngineError;
use crate::kv_cache::BlockId;
use crate::kv_cache::layout::KvLayout;
use crate::model::config::ModelConfig;

/// One sequence's share of a forward step: its new tokens, at positions
/// `start_position..start_position + token_ids.len()`; the KV of positions `0..start_position` is already in
/// the blocks of `block_table`, which has room for the new tokens too.
pub struct SequenceStep<'a> {
    pub token_ids: &'a [u32],
    pub start_position: usize,
    pub block_table: &'a [BlockId],
}

pub trait Backend: Send {
    fn model_config(&self) -> &ModelConfig;

    /// The layout of one KV block, shared with export/import.
    fn kv_layout(&self) -> KvLayout;

    /// How many KV blocks the backend's pool holds.
    fn num_blocks(&self) -> usize;

    /// Runs the new tokens of every sequence in one step (prefill chunks and decode tokens may be mixed),
    /// writes their K/V into the cache, and leaves in `logits` the logits that follow the last new token of
    /// each sequence, row-major `[batch.len(), vocab_size]`.
    fn forward(
        &mut self,
        batch: &[SequenceStep<'_>],
        logits: &mut Vec<f32>,
    ) -> Result<(), EngineError>;

    /// Runs a step like [`Backend::forward`] and leaves in `tokens` the argmax of each sequence's logits
    /// (greedy decoding). A GPU backend overrides this to pick the tokens on the device, so only the ids
    /// cross to the host; ties go to the lowest token id.
    fn forward_greedy(
        &mut self,
        batch: &[SequenceStep<'_>],
        tokens: &mut Vec<u32>,
    ) -> Result<(), EngineError> {
        let mut logits = Vec::new();
        self.forward(batch, &mut logits)?;
        let vocab_size = self.model_config().vocab_size;
        tokens.clear();
        tokens.extend(logits.chunks_exact(vocab_size).map(|row| {
            let mut best = 0;
            for (index, &value) in row.iter().enumerate() {
                if value > row[best] {
                    best = index;
                }
            }
            best as u32
        }));
        Ok(())
    }

    /// Copies one block out in the byte layout of [`KvLayout`]; `out.len()` is `block_bytes()`.
    fn read_block(&self, block: BlockId, out: &mut [u8]) -> Result<(), EngineError>;

    /// Overwrites one block from bytes in the layout of [`KvLayout`].
    fn write_block(&mut self, block: BlockId, bytes: &[u8]) -> Result<(), EngineError>;
}
