//! Row draws on the GPU ([`crate::Backend::forward_drawn`]): the device buffers of `draw.cu`, grown to the
//! largest step seen, the upload of each row's [`RowDrawParams`], and the reading of its `DrawOut` into a
//! [`RowDraw`]. A row's logits stay on the device; about half a kilobyte a row comes back.

use cudarc::driver::CudaSlice;

use super::device::{CudaError, GpuContext};
use super::kernels::{DRAW_OUT_BYTES, DrawBuffers, draw_chunks};
use super::step_io::StepIo;
use super::{addr, zeros};
use crate::sampling::{DRAW_CANDIDATES, RowDraw, RowDrawParams};

pub(super) struct DeviceDraws {
    rows: usize,
    params: CudaSlice<f64>,
    chunk_top: CudaSlice<u64>,
    chunk_stats: CudaSlice<f64>,
    chunk_candidates: CudaSlice<u64>,
    out: CudaSlice<u8>,
    /// The last step's parameters, two f64 a row, as uploaded.
    host_params: Vec<f64>,
}

impl DeviceDraws {
    pub(super) fn new(gpu: &GpuContext, vocab_size: usize, rows: usize) -> Result<Self, CudaError> {
        let chunks = draw_chunks(vocab_size) * rows;
        Ok(Self {
            rows,
            params: zeros(gpu, 2 * rows, "the row draws' parameters")?,
            chunk_top: zeros(gpu, 2 * chunks, "the row draws' chunk maxima")?,
            chunk_stats: zeros(gpu, 3 * chunks, "the row draws' chunk sums")?,
            chunk_candidates: zeros(gpu, DRAW_CANDIDATES * chunks, "the row draws' candidates")?,
            out: zeros(gpu, DRAW_OUT_BYTES * rows, "the row draws")?,
            host_params: Vec::with_capacity(2 * rows),
        })
    }

    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Queues the upload of `params` (at most `rows()` of them) for the next launch of the draw kernels.
    pub(super) fn upload(
        &mut self,
        params: &[RowDrawParams],
        step_io: &mut StepIo,
        gpu: &GpuContext,
    ) -> Result<(), CudaError> {
        self.host_params.clear();
        for row in params {
            self.host_params
                .extend([row.inverse_temperature, row.uniform]);
        }
        step_io.upload_draw_params(&self.host_params, addr(&self.params, gpu), &gpu.stream)
    }

    /// The buffers of a launch of the draw kernels; each row's drawn token also goes to `tokens` (u32 a row).
    pub(super) fn buffers(&self, gpu: &GpuContext, tokens: u64) -> DrawBuffers {
        DrawBuffers {
            tokens,
            params: addr(&self.params, gpu),
            chunk_top: addr(&self.chunk_top, gpu),
            chunk_stats: addr(&self.chunk_stats, gpu),
            chunk_candidates: addr(&self.chunk_candidates, gpu),
            out: addr(&self.out, gpu),
        }
    }

    /// Where the draws of the last launch are, for their copy to the host.
    pub(super) fn out(&self, gpu: &GpuContext) -> u64 {
        addr(&self.out, gpu)
    }
}

/// Decodes the `DrawOut`s a step's draws came down as ([`DRAW_OUT_BYTES`] a row) into `draws`.
pub(super) fn decode_draws(
    out: &[u8],
    vocab_size: usize,
    draws: &mut Vec<RowDraw>,
) -> Result<(), CudaError> {
    draws.clear();
    for row_out in out.chunks_exact(DRAW_OUT_BYTES) {
        draws.push(decode_draw(row_out, vocab_size)?);
    }
    Ok(())
}

/// One `DrawOut` (draw.cu): u32 token, f32 logit, f64 tempered total, f64 log normalizer, then the candidates'
/// keys (u64).
fn decode_draw(out: &[u8], vocab_size: usize) -> Result<RowDraw, CudaError> {
    let word = |at: usize| u32::from_le_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
    let double = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&out[at..at + 8]);
        f64::from_le_bytes(bytes)
    };
    let drawn_token = word(0);
    if drawn_token as usize >= vocab_size {
        return Err(CudaError::Unsupported(format!(
            "the GPU drew token {drawn_token}, outside the vocabulary ({vocab_size} tokens)"
        )));
    }
    let candidates = out[24..]
        .chunks_exact(8)
        .take(DRAW_CANDIDATES.min(vocab_size))
        .map(|key| {
            let key = u64::from_le_bytes(key.try_into().unwrap_or([0; 8]));
            candidate_from_key(key)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RowDraw {
        drawn_token,
        drawn_logit: f32::from_bits(word(4)),
        tempered_total: double(8),
        log_normalizer: double(16),
        candidates,
        vocab_size,
    })
}

/// A candidate's key (`draw_key` in draw.cu) back to (token id, logit).
fn candidate_from_key(key: u64) -> Result<(u32, f32), CudaError> {
    if key == 0 {
        return Err(CudaError::Unsupported(
            "the GPU's row draw has fewer candidates than the vocabulary".into(),
        ));
    }
    let ordered = (key >> 32) as u32;
    let bits = if ordered & 0x8000_0000 != 0 {
        ordered & 0x7fff_ffff
    } else {
        !ordered
    };
    Ok((u32::MAX - key as u32, f32::from_bits(bits)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(logit: f32, id: u32) -> u64 {
        // The CUDA side's draw_key, for the round trip.
        let bits = logit.to_bits();
        let ordered = if bits & 0x8000_0000 != 0 {
            !bits
        } else {
            bits | 0x8000_0000
        };
        ((ordered as u64) << 32) | (u32::MAX - id) as u64
    }

    #[test]
    fn candidate_keys_order_as_top_n_and_decode_back() {
        let candidates = [
            (3, 2.5f32),
            (0, 1.0),
            (7, 1.0),
            (1, 0.0),
            (2, -0.0),
            (9, -3.25),
            (4, f32::NEG_INFINITY),
        ];
        let keys: Vec<u64> = candidates
            .iter()
            .map(|&(id, logit)| key(logit, id))
            .collect();
        // Descending keys: largest logit first, lower id first among equal logits (-0.0 sorts below 0.0).
        assert!(keys.windows(2).all(|pair| pair[0] > pair[1]));
        for (&key, &(id, logit)) in keys.iter().zip(&candidates) {
            let (decoded_id, decoded_logit) = candidate_from_key(key).expect("a real key");
            assert_eq!(decoded_id, id);
            assert_eq!(decoded_logit.to_bits(), logit.to_bits());
        }
        assert!(candidate_from_key(0).is_err());
    }

    #[test]
    fn a_draw_out_decodes_field_by_field() {
        let mut out = vec![0u8; DRAW_OUT_BYTES];
        out[0..4].copy_from_slice(&5u32.to_le_bytes());
        out[4..8].copy_from_slice(&1.5f32.to_bits().to_le_bytes());
        out[8..16].copy_from_slice(&2.25f64.to_le_bytes());
        out[16..24].copy_from_slice(&(-0.5f64).to_le_bytes());
        for (index, slot) in out[24..].chunks_exact_mut(8).enumerate() {
            slot.copy_from_slice(&key(10.0 - index as f32, index as u32).to_le_bytes());
        }
        let draw = decode_draw(&out, 1000).expect("decodes");
        assert_eq!((draw.drawn_token, draw.drawn_logit), (5, 1.5));
        assert_eq!((draw.tempered_total, draw.log_normalizer), (2.25, -0.5));
        assert_eq!(draw.candidates.len(), DRAW_CANDIDATES);
        assert_eq!(draw.candidates[3], (3, 7.0));
        // A vocabulary smaller than the candidates keeps only its own tokens.
        assert_eq!(decode_draw(&out, 10).expect("decodes").candidates.len(), 10);
        assert!(decode_draw(&out, 5).is_err());
    }
}
