//! Helpers shared by the integration tests: fixture paths and their reference records, the greedy argmax, and the
//! CUDA tests' skip and engine.

#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;
use tandem_workers::{
    Engine, EngineConfig, ModelWeights, cuda_device_count, cuda_driver_present, load_model,
    qwen3_shape, random_model,
};

pub const FIXTURES: [&str; 3] = [
    "tiny_bf16_tied_t4",
    "tiny_f16_sharded_t5",
    "tiny_f32_untied_t5",
];

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn load_fixture(name: &str) -> ModelWeights {
    load_model(&fixture_dir(name)).unwrap_or_else(|error| panic!("loading {name}: {error}"))
}

pub fn reference(name: &str) -> Value {
    let path = fixture_dir(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The ~300-token prompt of a fixture's reference.
pub fn long_prompt(name: &str) -> Vec<u32> {
    reference(name)["cases"][1]["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

pub fn engine(name: &str, config: EngineConfig) -> Engine {
    Engine::cpu(load_fixture(name), config).unwrap()
}

pub fn small_config() -> EngineConfig {
    EngineConfig {
        block_size_tokens: 16,
        num_blocks: 128,
        prefill_chunk_tokens: 512,
        prefix_caching: true,
    }
}

pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| l as f64 - log_sum).collect()
}

/// The greedy token of a row of logits: its largest, the lowest id among equal ones (as the engine picks).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &value) in row.iter().enumerate() {
        if value > row[best] {
            best = index;
        }
    }
    best as u32
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Whether a CUDA test can run here; if not, says why (CUDA tests skip, never fail, without a GPU).
pub fn driver_or_skip(test: &str) -> bool {
    if !cuda_driver_present() {
        eprintln!("skipping {test}: no CUDA driver on this machine (libcuda not found)");
        return false;
    }
    if cuda_device_count() == 0 {
        eprintln!("skipping {test}: the CUDA driver loads but sees no GPU");
        return false;
    }
    true
}

/// An engine on GPU 0 over a random model of the Qwen3-0.6B shape drawn from `seed` (151,936 tokens), with
/// `num_blocks` KV blocks of 16 tokens and no prefix cache.
pub fn random_qwen3_0_6b_on_gpu(seed: u64, num_blocks: usize) -> Engine {
    let shape = qwen3_shape("qwen3-0.6b").expect("the built-in shapes include qwen3-0.6b");
    let config = EngineConfig {
        block_size_tokens: 16,
        num_blocks,
        prefill_chunk_tokens: 512,
        prefix_caching: false,
    };
    Engine::cuda(&random_model(shape, seed), config, 0).expect("a CUDA engine")
}
