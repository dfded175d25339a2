//! [`KvLayout`]: the byte layout of a KV block and of an exported sequence. This is what the KV transfer
//! between a prefill and a decode worker moves, so it is fixed and documented here and in
//! `workers/KV_LAYOUT.md`.
//!
//! # A block
//! `block_bytes = num_layers * 2 * num_kv_heads * block_size_tokens * head_dim * 4` bytes of little-endian
//! f32, ordered `[layer][k=0, v=1][kv_head][slot][dim]`: for each layer, its K then its V, each head's slots
//! contiguous. K is stored after q/k-norm and RoPE (exactly what attention reads); V as projected. Slot `s` of
//! the `i`-th block of a sequence holds token `i * block_size_tokens + s`.
//!
//! # An exported sequence
//! All integers little-endian u32 unless said otherwise:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `TNDMKV01` |
//! | 4 | `num_layers` |
//! | 4 | `num_kv_heads` |
//! | 4 | `head_dim` |
//! | 4 | `block_size_tokens` |
//! | 4 | `dtype`: 0 = f32 |
//! | 4 | `num_tokens`: tokens whose KV is included |
//! | 4 | `num_blocks` = ceil(`num_tokens` / `block_size_tokens`) |
//! | 4 × `num_tokens` | the token ids, in order |
//! | `num_blocks` × `block_bytes` | the blocks, in sequence order, each as above |
//!
//! Slots past `num_tokens` in the last block are zero. An importer must check that the layout fields equal
//! its own model's and block size before using the blocks.

use crate::error::EngineError;

pub(crate) const EXPORT_MAGIC: &[u8; 8] = b"TNDMKV01";
const HEADER_BYTES: usize = 8 + 7 * 4;
const DTYPE_F32: u32 = 0;

/// The shape of one KV block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size_tokens: usize,
}

/// A parsed export: its token ids and its blocks' bytes (borrowed from the export).
#[derive(Debug)]
pub(crate) struct ParsedExport<'a> {
    pub(crate) token_ids: Vec<u32>,
    pub(crate) blocks: Vec<&'a [u8]>,
}

impl KvLayout {
    pub fn block_floats(&self) -> usize {
        self.num_layers * 2 * self.num_kv_heads * self.block_size_tokens * self.head_dim
    }

    pub fn block_bytes(&self) -> usize {
        self.block_floats() * 4
    }

    /// Offset in f32 elements, within a block, of the first dim of (`layer`, `kind`: 0 = K / 1 = V, `kv_head`,
    /// `slot`).
    pub(crate) fn float_offset(
        &self,
        layer: usize,
        kind: usize,
        kv_head: usize,
        slot: usize,
    ) -> usize {
        (((layer * 2 + kind) * self.num_kv_heads + kv_head) * self.block_size_tokens + slot)
            * self.head_dim
    }

    /// Zeroes the slots `used_slots..block_size_tokens` of one block's bytes.
    pub(crate) fn zero_unused_slots(&self, block: &mut [u8], used_slots: usize) {
        if used_slots >= self.block_size_tokens {
            return;
        }
        for layer in 0..self.num_layers {
            for kind in 0..2 {
                for kv_head in 0..self.num_kv_heads {
                    let start = self.float_offset(layer, kind, kv_head, used_slots) * 4;
                    let end = self.float_offset(layer, kind, kv_head, self.block_size_tokens) * 4;
                    block[start..end].fill(0);
                }
            }
        }
    }

    /// The header and token ids of an export; the blocks follow.
    pub(crate) fn encode_export_header(&self, token_ids: &[u32], out: &mut Vec<u8>) {
        let num_blocks = token_ids.len().div_ceil(self.block_size_tokens);
        out.reserve(HEADER_BYTES + token_ids.len() * 4 + num_blocks * self.block_bytes());
        out.extend_from_slice(EXPORT_MAGIC);
        for field in [
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.block_size_tokens,
            DTYPE_F32 as usize,
            token_ids.len(),
            num_blocks,
        ] {
            out.extend_from_slice(&(field as u32).to_le_bytes());
        }
        for token in token_ids {
            out.extend_from_slice(&token.to_le_bytes());
        }
    }

    /// Parses an export made for this layout, checking every field and the total length.
    pub(crate) fn parse_export<'a>(
        &self,
        bytes: &'a [u8],
    ) -> Result<ParsedExport<'a>, EngineError> {
        let invalid = |message: String| EngineError::KvImport(message);
        if bytes.len() < HEADER_BYTES || &bytes[..8] != EXPORT_MAGIC {
            return Err(invalid(
                "not a tandem KV export (bad magic or too short)".into(),
            ));
        }
        let field = |index: usize| {
            let at = 8 + index * 4;
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
        };
        let found = KvLayout {
            num_layers: field(0),
            num_kv_heads: field(1),
            head_dim: field(2),
            block_size_tokens: field(3),
        };
        if found != *self {
            return Err(invalid(format!(
                "layout {found:?} does not match this engine's {self:?}"
            )));
        }
        if field(4) as u32 != DTYPE_F32 {
            return Err(invalid(format!(
                "dtype {} is not supported (0 = f32)",
                field(4)
            )));
        }
        let num_tokens = field(5);
        let num_blocks = field(6);
        if num_tokens == 0 || num_blocks != num_tokens.div_ceil(self.block_size_tokens) {
            return Err(invalid(format!(
                "{num_blocks} blocks cannot hold {num_tokens} tokens"
            )));
        }
        let tokens_end = HEADER_BYTES + num_tokens * 4;
        let expected_len = tokens_end + num_blocks * self.block_bytes();
        if bytes.len() != expected_len {
            return Err(invalid(format!(
                "expected {expected_len} bytes, found {}",
                bytes.len()
            )));
        }
        let token_ids = bytes[HEADER_BYTES..tokens_end]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let blocks = bytes[tokens_end..]
            .chunks_exact(self.block_bytes())
            .collect();
        Ok(ParsedExport { token_ids, blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_mismatches_are_refused() {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 2,
            block_size_tokens: 2,
        };
        assert_eq!(layout.block_bytes(), 2 * 2 * 2 * 2 * 4);
        let mut bytes = Vec::new();
        layout.encode_export_header(&[3, 4, 5], &mut bytes);
        bytes.extend(std::iter::repeat_n(7u8, 2 * layout.block_bytes()));
        let parsed = layout.parse_export(&bytes).unwrap();
        assert_eq!(parsed.token_ids, vec![3, 4, 5]);
        assert_eq!(parsed.blocks.len(), 2);

        let other = KvLayout {
            head_dim: 4,
            ..layout
        };
        assert!(
            other
                .parse_export(&bytes)
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
        assert!(layout.parse_export(&bytes[..bytes.len() - 1]).is_err());
        assert!(layout.parse_export(b"garbage").is_err());
    }

    #[test]
    fn unused_slots_are_zeroed_per_head() {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 1,
            block_size_tokens: 3,
        };
        let mut block = vec![1u8; layout.block_bytes()];
        layout.zero_unused_slots(&mut block, 1);
        let floats: Vec<bool> = block
            .chunks_exact(4)
            .map(|b| b.iter().all(|&x| x == 1))
            .collect();
        // [K h0: s0 s1 s2][K h1 ...][V h0 ...][V h1 ...]
        assert_eq!(floats, [true, false, false].repeat(4));
    }
}
