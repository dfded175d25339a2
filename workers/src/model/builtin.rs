//! The built-in model: Qwen3-shaped, with weights drawn deterministically from a fixed seed and the real
//! Qwen3 tokenizer's vocabulary size, so the whole system runs with no download.

use rayon::prelude::*;

use super::config::ModelConfig;
use super::weights::{ModelWeights, TensorSpec};
use crate::rng::SplitMix64;

/// The seed all built-in weights derive from; changing it changes every built-in output.
pub const BUILTIN_SEED: u64 = 0x007A_4DE3_2026;

/// The built-in model's shape.
///
/// hidden 256 (not 128) so that `head_dim` (64) differs from `hidden / heads` (32) as in real Qwen3, and the
/// projections are wide enough for the GEMM path to matter in benchmarks. The tied 151936x256 f32 embedding
/// is 155 MB, which loads in well under a second; 4 layers keep a decode step on 2 cores to a few ms plus the
/// lm_head, which is the same size as the embedding and dominates decode, as it does for small real models.
pub fn builtin_config() -> ModelConfig {
    ModelConfig {
        vocab_size: 151_936,
        hidden_size: 256,
        intermediate_size: 768,
        num_layers: 4,
        num_q_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        tie_word_embeddings: true,
        max_position_embeddings: 40_960,
    }
}

/// Builds the built-in model. Same output on every call and every machine.
pub fn builtin_model() -> ModelWeights {
    random_model(builtin_config(), BUILTIN_SEED)
}

/// A model of any Qwen3 shape with weights drawn as the built-in model's are, from `seed`: for benchmarks
/// and backend parity tests at real sizes without a checkpoint.
pub fn random_model(config: ModelConfig, seed: u64) -> ModelWeights {
    let result: Result<ModelWeights, std::convert::Infallible> =
        ModelWeights::from_tensors(config, |spec| Ok(draw_tensor(spec, seed)));
    match result {
        Ok(weights) => weights,
        Err(never) => match never {},
    }
}

/// The shapes of released Qwen3 models by name (`qwen3-0.6b`, `qwen3-8b`), as their `config.json` gives
/// them; with [`random_model`], what `tandem bench engine --shape` measures.
pub fn qwen3_shape(name: &str) -> Option<ModelConfig> {
    let base = ModelConfig {
        vocab_size: 151_936,
        hidden_size: 1024,
        intermediate_size: 3072,
        num_layers: 28,
        num_q_heads: 16,
        num_kv_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        tie_word_embeddings: true,
        max_position_embeddings: 40_960,
    };
    match name {
        "qwen3-0.6b" => Some(base),
        "qwen3-8b" => Some(ModelConfig {
            hidden_size: 4096,
            intermediate_size: 12_288,
            num_layers: 36,
            num_q_heads: 32,
            tie_word_embeddings: false,
            ..base
        }),
        _ => None,
    }
}

/// Norm weights near 1; embeddings with std 0.5 so tied logits are peaked enough for greedy decoding to
/// be meaningful; linear layers with std ~1.5/sqrt(fan_in) so activations neither vanish nor explode.
fn draw_tensor(spec: &TensorSpec, seed: u64) -> Vec<f32> {
    let num_elements: usize = spec.shape.iter().product();
    let fan_in = spec.shape.last().copied().unwrap_or(1) as f32;
    // A uniform draw in [-1, 1) has std 1/sqrt(3).
    let (center, amplitude) = if spec.name.ends_with("norm.weight") {
        (1.0, 0.2)
    } else if spec.name.contains("embed_tokens") {
        (0.0, 0.5 * 3f32.sqrt())
    } else {
        (0.0, 1.5 / fan_in.sqrt() * 3f32.sqrt())
    };
    let name_seed = spec
        .name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3)
        });
    const CHUNK_ELEMENTS: usize = 1 << 16;
    let mut out = vec![0.0f32; num_elements];
    out.par_chunks_mut(CHUNK_ELEMENTS)
        .enumerate()
        .for_each(|(chunk_index, chunk)| {
            let mut rng = SplitMix64::new(
                seed ^ name_seed ^ (chunk_index as u64).wrapping_mul(0xA24B_AED4_963E_E407),
            );
            for value in chunk {
                *value = center + amplitude * rng.next_symmetric_f32();
            }
        });
    out
}
