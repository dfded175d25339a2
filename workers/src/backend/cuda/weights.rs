//! [`DeviceWeights`]: a model's tensors on the GPU. Matrices (embedding, projections, lm_head) in bf16,
//! rounded to nearest even from the host's f32; norm weights and the RoPE frequencies in f32 (they are
//! small and feed f32 arithmetic).

use cudarc::driver::CudaSlice;
use rayon::prelude::*;

use super::device::{CudaError, DriverContext, GpuContext};
use crate::backend::cpu::rope_inverse_frequencies;
use crate::model::weights::ModelWeights;

pub(crate) struct DeviceLayer {
    pub(crate) input_norm: CudaSlice<f32>,
    pub(crate) qkv_proj: CudaSlice<u16>,
    pub(crate) q_norm: CudaSlice<f32>,
    pub(crate) k_norm: CudaSlice<f32>,
    pub(crate) o_proj: CudaSlice<u16>,
    pub(crate) post_attention_norm: CudaSlice<f32>,
    pub(crate) gate_up_proj: CudaSlice<u16>,
    pub(crate) down_proj: CudaSlice<u16>,
}

pub(crate) struct DeviceWeights {
    pub(crate) embed_tokens: CudaSlice<u16>,
    pub(crate) layers: Vec<DeviceLayer>,
    pub(crate) final_norm: CudaSlice<f32>,
    /// `None` when tied to `embed_tokens`.
    pub(crate) lm_head: Option<CudaSlice<u16>>,
    pub(crate) rope_inverse_frequencies: CudaSlice<f32>,
}

fn upload_bf16(gpu: &GpuContext, values: &[f32], name: &str) -> Result<CudaSlice<u16>, CudaError> {
    let bits: Vec<u16> = values
        .par_iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    gpu.stream
        .clone_htod(&bits)
        .during(|| format!("uploading {name} to cuda:{}", gpu.ordinal))
}

fn upload_f32(gpu: &GpuContext, values: &[f32], name: &str) -> Result<CudaSlice<f32>, CudaError> {
    gpu.stream
        .clone_htod(values)
        .during(|| format!("uploading {name} to cuda:{}", gpu.ordinal))
}

impl DeviceWeights {
    /// Device bytes the weights take once uploaded.
    pub(crate) fn bytes(weights: &ModelWeights) -> usize {
        let matrices: usize = weights.embed_tokens.len()
            + weights.lm_head.as_ref().map_or(0, Vec::len)
            + weights
                .layers
                .iter()
                .map(|l| {
                    l.qkv_proj.len() + l.o_proj.len() + l.gate_up_proj.len() + l.down_proj.len()
                })
                .sum::<usize>();
        let vectors: usize = weights.final_norm.len()
            + weights
                .layers
                .iter()
                .map(|l| {
                    l.input_norm.len()
                        + l.q_norm.len()
                        + l.k_norm.len()
                        + l.post_attention_norm.len()
                })
                .sum::<usize>();
        matrices * 2 + vectors * 4
    }

    pub(crate) fn upload(gpu: &GpuContext, weights: &ModelWeights) -> Result<Self, CudaError> {
        let config = &weights.config;
        let mut layers = Vec::with_capacity(weights.layers.len());
        for (i, layer) in weights.layers.iter().enumerate() {
            let name = |tensor: &str| format!("layer {i} {tensor}");
            layers.push(DeviceLayer {
                input_norm: upload_f32(gpu, &layer.input_norm, &name("input_layernorm"))?,
                qkv_proj: upload_bf16(gpu, &layer.qkv_proj, &name("qkv_proj"))?,
                q_norm: upload_f32(gpu, &layer.q_norm, &name("q_norm"))?,
                k_norm: upload_f32(gpu, &layer.k_norm, &name("k_norm"))?,
                o_proj: upload_bf16(gpu, &layer.o_proj, &name("o_proj"))?,
                post_attention_norm: upload_f32(
                    gpu,
                    &layer.post_attention_norm,
                    &name("post_attention_layernorm"),
                )?,
                gate_up_proj: upload_bf16(gpu, &layer.gate_up_proj, &name("gate_up_proj"))?,
                down_proj: upload_bf16(gpu, &layer.down_proj, &name("down_proj"))?,
            });
        }
        Ok(Self {
            embed_tokens: upload_bf16(gpu, &weights.embed_tokens, "embed_tokens")?,
            layers,
            final_norm: upload_f32(gpu, &weights.final_norm, "model.norm")?,
            lm_head: weights
                .lm_head
                .as_ref()
                .map(|lm_head| upload_bf16(gpu, lm_head, "lm_head"))
                .transpose()?,
            rope_inverse_frequencies: upload_f32(
                gpu,
                &rope_inverse_frequencies(config.head_dim, config.rope_theta),
                "the RoPE frequencies",
            )?,
        })
    }

    pub(crate) fn lm_head(&self) -> &CudaSlice<u16> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}
