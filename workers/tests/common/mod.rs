//! Helpers shared by the integration tests: fixture paths and their reference records, and the CUDA tests' skip.

#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;
use tandem_workers::{
    Engine, EngineConfig, ModelWeights, cuda_device_count, cuda_driver_present, load_model,
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
