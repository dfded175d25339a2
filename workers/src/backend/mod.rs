//! The compute seam: a [`Backend`] runs one forward step over a batch of sequences against the paged KV
//! cache it owns. The engine keeps everything else (block tables, prefix cache, sampling) on the host, so a
//! CUDA backend only has to implement this trait.

pub(crate) mod cpu;
pub(crate) mod cuda;

use rayon::prelude::*;

use crate::error::EngineError;
use crate::kv_cache::BlockId;
use crate::kv_cache::layout::KvLayout;
use crate::model::config::ModelConfig;
use crate::sampling::{RowDraw, RowDrawParams};

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

    /// Whether steps can be queued ([`Backend::queue_greedy`], [`Backend::queue_drawn`]) and run while the host
    /// works: a backend whose steps run on a device. Its default, where every step runs inside the call, says no;
    /// the engine then runs a step it would queue at once.
    fn queues_steps(&self) -> bool {
        false
    }

    /// Queues a greedy step like [`Backend::forward_greedy`] without waiting for it; [`Backend::take_greedy`]
    /// gives its tokens, steps in the order queued (at most two are queued at once). With `from_previous`, row
    /// `i` takes as its input the token the last queued step picked (or drew) for its row `i`, which need not have
    /// reached the host: the batch's token ids are then ignored (one a row). So the next step of a batch can run
    /// while the host still streams this one's tokens.
    fn queue_greedy(
        &mut self,
        batch: &[SequenceStep<'_>],
        from_previous: bool,
    ) -> Result<(), EngineError> {
        let _ = (batch, from_previous);
        Err(EngineError::Config(
            "this backend runs its steps inside the call: it queues none".into(),
        ))
    }

    /// The tokens of the oldest queued step, which [`Backend::queue_greedy`] queued, once it has run.
    fn take_greedy(&mut self, tokens: &mut Vec<u32>) -> Result<(), EngineError> {
        let _ = tokens;
        Err(EngineError::Config("no greedy step is queued".into()))
    }

    /// Queues a drawn step like [`Backend::forward_drawn`] without waiting for it; [`Backend::take_drawn`] gives
    /// its draws, and its logits stay on the device as far as [`Backend::read_logits_row`] goes only while no
    /// step is queued after it. With `from_previous`, row `i` takes as its input the token the last queued step
    /// drew (or picked) for its row `i`, as [`Backend::queue_greedy`] does.
    fn queue_drawn(
        &mut self,
        batch: &[SequenceStep<'_>],
        params: &[RowDrawParams],
        from_previous: bool,
    ) -> Result<(), EngineError> {
        let _ = (batch, params, from_previous);
        Err(EngineError::Config(
            "this backend runs its steps inside the call: it queues none".into(),
        ))
    }

    /// The draws of the oldest queued step, which [`Backend::queue_drawn`] queued, once it has run.
    fn take_drawn(&mut self, draws: &mut Vec<RowDraw>) -> Result<(), EngineError> {
        let _ = draws;
        Err(EngineError::Config("no drawn step is queued".into()))
    }

    /// Waits for every queued step and forgets what they picked.
    fn drop_queued_steps(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// Whether [`Backend::forward_drawn`] draws on the device, where the logits are. Where it does not, drawing
    /// from the host's logits costs more than sampling them directly, so callers sample the logits instead.
    fn draws_on_device(&self) -> bool {
        false
    }

    /// Runs a step like [`Backend::forward`] for a batch where some row samples: leaves in `draws` each row's
    /// [`RowDraw`] for its `params`. This default computes them on the host from the logits it leaves in
    /// `logits`. A GPU backend overrides it to compute them on the device and leaves `logits` empty, so a few
    /// hundred bytes a row cross to the host instead of the vocabulary; [`Backend::read_logits_row`] then
    /// gives a row that needs more.
    fn forward_drawn(
        &mut self,
        batch: &[SequenceStep<'_>],
        params: &[RowDrawParams],
        logits: &mut Vec<f32>,
        draws: &mut Vec<RowDraw>,
    ) -> Result<(), EngineError> {
        self.forward(batch, logits)?;
        draw_on_host(logits, self.model_config().vocab_size, params, draws);
        Ok(())
    }

    /// After a [`Backend::forward_drawn`] that left `logits` empty: copies that step's logits of row `row` into
    /// `out`.
    fn read_logits_row(&mut self, row: usize, out: &mut Vec<f32>) -> Result<(), EngineError> {
        let _ = (row, out);
        Err(EngineError::LogitsNotKept(
            "this backend leaves every step's logits on the host".into(),
        ))
    }

    /// Copies one block out in the byte layout of [`KvLayout`]; `out.len()` is `block_bytes()`.
    fn read_block(&self, block: BlockId, out: &mut [u8]) -> Result<(), EngineError>;

    /// Overwrites one block from bytes in the layout of [`KvLayout`].
    fn write_block(&mut self, block: BlockId, bytes: &[u8]) -> Result<(), EngineError>;

    /// Copies layer `layer` of `blocks` out, block after block, each as its `[k, v][kv_head][slot][dim]`
    /// little-endian f32 part of the block layout, with the slots of the last block from `last_used_slots`
    /// on zero; `out.len()` is `blocks.len()` times a layer's part of a block. A GPU backend overrides this
    /// to move the whole layer in one copy.
    fn read_layer(
        &self,
        blocks: &[BlockId],
        layer: usize,
        last_used_slots: usize,
        out: &mut [u8],
    ) -> Result<(), EngineError> {
        let layout = self.kv_layout();
        let layer_bytes = layout.block_bytes() / layout.num_layers;
        let mut block_bytes = vec![0u8; layout.block_bytes()];
        for (index, (&block, part)) in blocks
            .iter()
            .zip(out.chunks_exact_mut(layer_bytes))
            .enumerate()
        {
            self.read_block(block, &mut block_bytes)?;
            if index + 1 == blocks.len() {
                layout.zero_unused_slots(&mut block_bytes, last_used_slots);
            }
            part.copy_from_slice(&block_bytes[layer * layer_bytes..(layer + 1) * layer_bytes]);
        }
        Ok(())
    }

    /// [`Backend::read_layer`] into a buffer of its own: a GPU backend hands out pinned host memory the copy
    /// went straight into (and the TCP transport sends from).
    fn read_layer_bytes(
        &self,
        blocks: &[BlockId],
        layer: usize,
        last_used_slots: usize,
        len: usize,
    ) -> Result<bytes::Bytes, EngineError> {
        let mut out = vec![0u8; len];
        self.read_layer(blocks, layer, last_used_slots, &mut out)?;
        Ok(out.into())
    }

    /// Overwrites every layer of `blocks` from one chunk per layer in the form [`Backend::read_layer`] gives.
    fn write_layers(&mut self, blocks: &[BlockId], layers: &[&[u8]]) -> Result<(), EngineError> {
        let layout = self.kv_layout();
        let layer_bytes = layout.block_bytes() / layout.num_layers;
        let mut block_bytes = vec![0u8; layout.block_bytes()];
        for (position, &block) in blocks.iter().enumerate() {
            for (layer, bytes) in layers.iter().enumerate() {
                block_bytes[layer * layer_bytes..(layer + 1) * layer_bytes]
                    .copy_from_slice(&bytes[position * layer_bytes..(position + 1) * layer_bytes]);
            }
            self.write_block(block, &block_bytes)?;
        }
        Ok(())
    }

    /// Text naming this backend's KV pool for device-to-device transfers
    /// ([`crate::backend::cuda::DeviceKvHandle`]), or `None` where its KV lives in host memory.
    fn device_kv_handle(&self) -> Result<Option<String>, EngineError> {
        Ok(None)
    }

    /// Copies pool blocks `source[i]` into blocks `destination[i]` of the device pool `target` names (a
    /// [`Backend::device_kv_handle`] of another backend, in this process or another on this host), waits
    /// for the copies, and returns the bytes moved and the path taken (`cuda_same_device`, `cuda_peer`,
    /// `cuda_ipc`).
    fn push_blocks(
        &mut self,
        target: &str,
        source: &[BlockId],
        destination: &[BlockId],
    ) -> Result<(u64, &'static str), EngineError> {
        let _ = (target, source, destination);
        Err(EngineError::Config(
            "this backend's KV is in host memory: it cannot push blocks to a GPU".into(),
        ))
    }
}

/// Each row's [`RowDraw`] from the step's logits on the host, rows in parallel: each is a few passes over the
/// vocabulary, and they are independent.
pub(crate) fn draw_on_host(
    logits: &[f32],
    vocab_size: usize,
    params: &[RowDrawParams],
    draws: &mut Vec<RowDraw>,
) {
    logits
        .par_chunks_exact(vocab_size)
        .zip(params)
        .map(|(row, params)| RowDraw::from_logits(row, params))
        .collect_into_vec(draws);
}
