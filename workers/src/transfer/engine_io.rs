//! Between an [`Engine`] and a transfer: what a decode worker awaits for a sequence it reserved
//! ([`ExpectedTransfer::for_sequence`]), the header a prefill worker sends for a sequence it computed
//! ([`TransferHeader::for_sequence`]), one layer's chunk out of the prefill engine ([`export_layer`]), and a
//! verified transfer into the decode engine's reserved blocks ([`import_received`]).

use bytes::Bytes;

use super::receiver::{ExpectedTransfer, ReceivedKv};
use super::wire::{KvDtype, TransferHeader};
use crate::engine::{Engine, SequenceId};
use crate::error::EngineError;
use crate::kv_cache::BlockId;

impl ExpectedTransfer {
    /// The transfer that fills sequence `id` of `engine`, just added with [`Engine::add_sequence`]: its
    /// prompt from the end of its cached prefix, into the blocks reserved for it. Put `block_ids` and
    /// `from_token` into the `KvDestination` of `PrefillQueued` (as `block_ids` and `cached_tokens`).
    pub fn for_sequence(
        engine: &Engine,
        id: SequenceId,
        request_id: &str,
        model_fingerprint: u64,
    ) -> Result<Self, EngineError> {
        let layout = engine.kv_layout();
        let num_tokens = engine.token_ids(id)?.len();
        let from_token = engine.cached_prompt_tokens(id)?;
        let block_size = layout.block_size_tokens;
        let block_ids = engine.kv_block_ids(id)?
            [from_token / block_size..num_tokens.div_ceil(block_size)]
            .to_vec();
        Ok(Self {
            request_id: request_id.to_owned(),
            model_fingerprint,
            layout,
            dtype: KvDtype::F32,
            num_tokens: num_tokens as u32,
            from_token: from_token as u32,
            block_ids,
        })
    }
}

impl TransferHeader {
    /// The header for sending the computed prompt of sequence `id` of `engine` from `from_token` on into
    /// the destination blocks `block_ids` (both from the request's `KvDestination`).
    pub fn for_sequence(
        engine: &Engine,
        id: SequenceId,
        request_id: &str,
        model_fingerprint: u64,
        from_token: u32,
        block_ids: Vec<BlockId>,
        trace_context: &str,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            request_id: request_id.to_owned(),
            model_fingerprint,
            layout: engine.kv_layout(),
            dtype: KvDtype::F32,
            num_tokens: engine.token_ids(id)?.len() as u32,
            from_token,
            block_ids,
            trace_context: trace_context.to_owned(),
        })
    }
}

/// One layer's chunk of the transfer described by `header`, read from sequence `id` of the prefill
/// engine.
pub fn export_layer(
    engine: &Engine,
    id: SequenceId,
    header: &TransferHeader,
    layer: usize,
) -> Result<Bytes, EngineError> {
    engine.export_kv_layer_bytes(id, layer, header.from_token as usize)
}

/// Writes a verified transfer into the blocks reserved for sequence `id` of the decode engine; the next
/// call for `id` is [`Engine::decode`] with `received.first_token_id`.
pub fn import_received(
    engine: &mut Engine,
    id: SequenceId,
    received: &ReceivedKv,
) -> Result<(), EngineError> {
    if engine.kv_layout() != received.header.layout {
        return Err(EngineError::KvImport(format!(
            "transfer {} has layout {:?}, this engine {:?}",
            received.header.request_id,
            received.header.layout,
            engine.kv_layout()
        )));
    }
    match received.header.dtype {
        // The sender already copied the KV into the reserved device blocks and the frames confirmed it.
        KvDtype::DevicePush => engine.accept_pushed_kv(id, received.header.from_token as usize),
        KvDtype::F32 => {
            engine.import_kv_layers(id, received.header.from_token as usize, &received.layers)
        }
    }
}
