//! The CUDA backend (bf16 weights and KV, f32 accumulation) against the CPU backend (f32) on the committed
//! fixtures and on a random model of the Qwen3-0.6B shape. Skips, saying why, where no CUDA driver exists.
//!
//! Both engines run the same sequences as one batch, prefilled then decoded 64 steps teacher-forced on the
//! CPU's greedy tokens. Per step it compares the CPU's top-5 logprobs with the GPU's, the relative L2 error of
//! the whole logits row, and the GPU's on-device argmax (`decode_greedy`, on twin sequences) with the CPU's
//! argmax wherever the CPU's top-2 margin exceeds the row's tolerance. A KV export from the GPU imported
//! into the CPU engine must continue with the same logits.
//!
//! "Within bf16 tolerance" is measured, not guessed: a third engine, the CPU on the same weights rounded to
//! bf16, shows how far bf16 rounding alone moves this model's logprobs (a deep random model amplifies it:
//! rounding only the weights of the Qwen3-0.6B shape moves top logprobs by ~0.6). The GPU rounds weights,
//! activations and the KV cache, about three times the roundings of that probe; independent rounding errors
//! add in quadrature (√3 ≈ 1.7), so the GPU must stay within `PROBE_MULTIPLE` times the probe's error. Where
//! the weights are already bf16 the probe moves nothing, and the floor is the rounding of the activations:
//! `LOGPROB_FLOOR + BF16_ROUNDOFFS` units of bf16 roundoff (2^-8) of the logits' scale (their largest row
//! standard deviation).

mod common;

use common::{FIXTURES, argmax, driver_or_skip, load_fixture, log_softmax, reference};
use tandem_workers::{
    Engine, EngineConfig, ModelConfig, ModelWeights, cuda_driver_present, qwen3_shape, random_model,
};

const DECODE_STEPS: usize = 64;
/// How far past the weight-rounding probe the GPU may be (see the module doc).
const PROBE_MULTIPLE: f64 = 2.0;
/// Floors of the tolerances, for models where the probe moves almost nothing.
const LOGPROB_FLOOR: f64 = 0.05;
const BF16_ROUNDOFFS: f64 = 8.0;
const RELATIVE_LOGITS_FLOOR: f64 = 3e-2;

/// How one engine's logits differ from the reference's.
#[derive(Default)]
struct Stats {
    /// Over the reference's top-5 tokens of every row.
    max_logprob_error: f64,
    max_prefill_logprob_error: f64,
    max_relative_logits_error: f64,
    /// The largest standard deviation of a reference logits row: the logits' scale.
    max_reference_std: f64,
    steps: usize,
}

impl Stats {
    fn add(&mut self, reference: &[f32], other: &[f32], prefill: bool) {
        let (reference_logprobs, other_logprobs) = (log_softmax(reference), log_softmax(other));
        let mut order: Vec<usize> = (0..reference.len()).collect();
        order.sort_by(|&a, &b| reference_logprobs[b].total_cmp(&reference_logprobs[a]));
        for &token in &order[..5.min(order.len())] {
            let error = (reference_logprobs[token] - other_logprobs[token]).abs();
            self.max_logprob_error = self.max_logprob_error.max(error);
            if prefill {
                self.max_prefill_logprob_error = self.max_prefill_logprob_error.max(error);
            }
        }
        let (mut difference, mut norm) = (0.0f64, 0.0f64);
        for (&r, &o) in reference.iter().zip(other) {
            difference += (r as f64 - o as f64).powi(2);
            norm += (r as f64).powi(2);
        }
        let relative = (difference / norm.max(f64::MIN_POSITIVE)).sqrt();
        self.max_relative_logits_error = self.max_relative_logits_error.max(relative);
        let n = reference.len() as f64;
        let mean = reference.iter().map(|&x| x as f64).sum::<f64>() / n;
        let variance = reference
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        self.max_reference_std = self.max_reference_std.max(variance.sqrt());
        self.steps += 1;
    }
}

/// What a comparison found: the GPU and the bf16-weights probe against the f32 CPU reference, the
/// reference's greedy margins with the GPU's device argmax on the same steps.
struct Comparison {
    gpu: Stats,
    probe: Stats,
    /// Per decode row: (CPU top-2 logprob margin, CPU argmax == GPU device argmax).
    greedy: Vec<(f64, bool)>,
    host_device_argmax_mismatches: usize,
}

impl Comparison {
    fn logprob_tolerance(&self) -> f64 {
        let floor = LOGPROB_FLOOR + BF16_ROUNDOFFS * 2f64.powi(-8) * self.gpu.max_reference_std;
        (PROBE_MULTIPLE * self.probe.max_logprob_error).max(floor)
    }

    fn relative_logits_tolerance(&self) -> f64 {
        (PROBE_MULTIPLE * self.probe.max_relative_logits_error).max(RELATIVE_LOGITS_FLOOR)
    }

    /// (compared, agreeing): greedy tokens where the CPU's margin exceeds the logprob tolerance.
    fn greedy_agreement(&self) -> (usize, usize) {
        let tolerance = self.logprob_tolerance();
        let confident = self.greedy.iter().filter(|(margin, _)| *margin > tolerance);
        let compared = confident.clone().count();
        (compared, confident.filter(|(_, agree)| *agree).count())
    }
}

fn top_two_margin(logprobs: &[f64]) -> f64 {
    let (mut first, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &value in logprobs {
        if value > first {
            second = first;
            first = value;
        } else if value > second {
            second = value;
        }
    }
    first - second
}

fn config(num_blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size_tokens: 16,
        num_blocks,
        prefill_chunk_tokens: 512,
        prefix_caching: true,
    }
}

fn steps(ids: &[u64], tokens: &[u32]) -> Vec<(u64, u32)> {
    ids.iter().copied().zip(tokens.iter().copied()).collect()
}

/// Runs `prompts` as one batch on the GPU, on the CPU (reference) and on the CPU with bf16-rounded weights
/// (probe), teacher-forced on the reference's greedy tokens.
fn compare(
    name: &str,
    make_weights: impl Fn() -> ModelWeights,
    prompts: &[Vec<u32>],
) -> Comparison {
    let tokens: usize = prompts.iter().map(|p| p.len() + DECODE_STEPS + 16).sum();
    let num_blocks = 3 * tokens.div_ceil(16) + 8;
    let weights = make_weights();
    let vocab_size = weights.config().vocab_size;
    let mut gpu = Engine::cuda(&weights, config(num_blocks), 0)
        .unwrap_or_else(|error| panic!("{name}: starting the CUDA engine: {error}"));
    let mut cpu = Engine::cpu(weights, config(num_blocks)).unwrap();
    let mut probe = Engine::cpu(make_weights().rounded_to_bf16(), config(num_blocks)).unwrap();
    let mut comparison = Comparison {
        gpu: Stats::default(),
        probe: Stats::default(),
        greedy: Vec::new(),
        host_device_argmax_mismatches: 0,
    };

    let (mut cpu_ids, mut probe_ids, mut gpu_ids, mut twin_ids, mut next) =
        (vec![], vec![], vec![], vec![], vec![]);
    for prompt in prompts {
        let ids = (
            cpu.add_sequence(prompt).unwrap(),
            probe.add_sequence(prompt).unwrap(),
            gpu.add_sequence(prompt).unwrap(),
            gpu.add_sequence(prompt).unwrap(),
        );
        let cpu_logits = cpu.prefill(ids.0).unwrap().to_vec();
        let probe_logits = probe.prefill(ids.1).unwrap().to_vec();
        let gpu_logits = gpu.prefill(ids.2).unwrap().to_vec();
        gpu.prefill(ids.3).unwrap();
        comparison.gpu.add(&cpu_logits, &gpu_logits, true);
        comparison.probe.add(&cpu_logits, &probe_logits, true);
        next.push(argmax(&cpu_logits));
        cpu_ids.push(ids.0);
        probe_ids.push(ids.1);
        gpu_ids.push(ids.2);
        twin_ids.push(ids.3);
    }
    for _ in 0..DECODE_STEPS {
        let cpu_logits = cpu.decode(&steps(&cpu_ids, &next)).unwrap().to_vec();
        let probe_logits = probe.decode(&steps(&probe_ids, &next)).unwrap().to_vec();
        let gpu_logits = gpu.decode(&steps(&gpu_ids, &next)).unwrap().to_vec();
        let device_tokens = gpu
            .decode_greedy(&steps(&twin_ids, &next))
            .unwrap()
            .to_vec();
        next.clear();
        for (row, ((cpu_row, gpu_row), probe_row)) in cpu_logits
            .chunks_exact(vocab_size)
            .zip(gpu_logits.chunks_exact(vocab_size))
            .zip(probe_logits.chunks_exact(vocab_size))
            .enumerate()
        {
            comparison.gpu.add(cpu_row, gpu_row, false);
            comparison.probe.add(cpu_row, probe_row, false);
            let cpu_token = argmax(cpu_row);
            comparison.greedy.push((
                top_two_margin(&log_softmax(cpu_row)),
                device_tokens[row] == cpu_token,
            ));
            comparison.host_device_argmax_mismatches +=
                usize::from(device_tokens[row] != argmax(gpu_row));
            next.push(cpu_token);
        }
    }

    // The GPU's KV, exported in the f32 layout of KV_LAYOUT.md, continues the same way on the CPU.
    let export = gpu.export_kv(gpu_ids[0]).unwrap();
    let imported = cpu.import_kv(&export).unwrap();
    let from_import = cpu.decode(&[(imported, next[0])]).unwrap().to_vec();
    let on_gpu = gpu.decode(&[(gpu_ids[0], next[0])]).unwrap().to_vec();
    comparison.gpu.add(&from_import, &on_gpu, false);

    let (compared, agreeing) = comparison.greedy_agreement();
    eprintln!(
        "{name}: {} sequences, {} rows vs the f32 CPU backend: GPU max |logprob error| (CPU top-5) {:.3e} (prefill rows {:.3e}), \
         max relative L2 logits error {:.3e}; bf16-weights CPU probe {:.3e} / {:.3e}; tolerances {:.3e} / {:.3e}; \
         GPU greedy tokens equal to CPU {agreeing}/{compared} where the CPU margin > the logprob tolerance \
         ({} decode rows in all); device vs host argmax of GPU logits differ {} times",
        prompts.len(),
        comparison.gpu.steps,
        comparison.gpu.max_logprob_error,
        comparison.gpu.max_prefill_logprob_error,
        comparison.gpu.max_relative_logits_error,
        comparison.probe.max_logprob_error,
        comparison.probe.max_relative_logits_error,
        comparison.logprob_tolerance(),
        comparison.relative_logits_tolerance(),
        comparison.greedy.len(),
        comparison.host_device_argmax_mismatches,
    );
    comparison
}

fn check(name: &str, comparison: &Comparison) {
    assert!(
        comparison.gpu.max_logprob_error < comparison.logprob_tolerance(),
        "{name}: logprob error {} over the tolerance {}",
        comparison.gpu.max_logprob_error,
        comparison.logprob_tolerance()
    );
    assert!(
        comparison.gpu.max_relative_logits_error < comparison.relative_logits_tolerance(),
        "{name}: relative logits error {}",
        comparison.gpu.max_relative_logits_error
    );
    let (compared, agreeing) = comparison.greedy_agreement();
    assert!(compared > 0, "{name}: no confident tokens");
    assert_eq!(agreeing, compared, "{name}: greedy tokens differ");
    assert_eq!(
        comparison.host_device_argmax_mismatches, 0,
        "{name}: GPU argmax"
    );
}

#[test]
fn fixtures_match_the_cpu_backend() {
    if !driver_or_skip("fixtures_match_the_cpu_backend") {
        return;
    }
    for name in FIXTURES {
        let prompts: Vec<Vec<u32>> = reference(name)["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|case| {
                case["prompt_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect();
        check(name, &compare(name, || load_fixture(name), &prompts));
    }
}

#[test]
fn a_random_qwen3_0_6b_matches_the_cpu_backend() {
    if !driver_or_skip("a_random_qwen3_0_6b_matches_the_cpu_backend") {
        return;
    }
    let shape = qwen3_0_6b_shape();
    let vocab_size = shape.vocab_size as u64;
    // Lengths that end mid-block, span many blocks, and one long enough for the attention to split.
    let prompts: Vec<Vec<u32>> = [7usize, 100, 333, 1500]
        .iter()
        .enumerate()
        .map(|(index, &len)| {
            (0..len as u64)
                .map(|i| ((i * 2_654_435_761 + index as u64 * 97 + 13) % vocab_size) as u32)
                .collect()
        })
        .collect();
    let name = "qwen3-0.6b (random)";
    check(
        name,
        &compare(name, || random_model(shape.clone(), 7), &prompts),
    );
}

fn qwen3_0_6b_shape() -> ModelConfig {
    qwen3_shape("qwen3-0.6b").expect("the built-in shapes include qwen3-0.6b")
}

/// Prompts of `lengths` tokens for a model of `vocab_size` tokens, from a fixed pattern per sequence.
fn patterned_prompts(lengths: &[usize], vocab_size: usize) -> Vec<Vec<u32>> {
    lengths
        .iter()
        .enumerate()
        .map(|(index, &len)| {
            (0..len as u64)
                .map(|i| ((i * 40_503 + index as u64 * 7_919 + 11) % vocab_size as u64) as u32)
                .collect()
        })
        .collect()
}

/// One sequence, then two, then eight: decode steps of one, two and eight tokens run on the fused decode GEMVs
/// (FMA at one, tensor cores from two) and attention, the shapes whose step is bound by launches. At one
/// sequence each layer's qkv projection and attention are one launch of thread block clusters
/// (`decode_qkv_attention`, sm_90; the grouped attention, a block per KV head, on older GPUs).
#[test]
fn a_random_qwen3_0_6b_decodes_one_two_and_eight_sequences_like_the_cpu_backend() {
    if !driver_or_skip(
        "a_random_qwen3_0_6b_decodes_one_two_and_eight_sequences_like_the_cpu_backend",
    ) {
        return;
    }
    let shape = qwen3_0_6b_shape();
    for lengths in [&[600][..], &[41, 600], &[41, 5, 70, 129, 17, 90, 64, 33]] {
        let prompts = patterned_prompts(lengths, shape.vocab_size);
        let name = format!("qwen3-0.6b (random, prompts of {lengths:?} tokens)");
        check(
            &name,
            &compare(&name, || random_model(shape.clone(), 11), &prompts),
        );
    }
}

/// A hidden size of 2048 (Qwen3-1.7B's widths, four layers): the decode GEMVs' RMSNorm keeps only the first
/// 1024 of the hidden state in registers, so this runs the rest of the norm path, and the down_proj input is
/// 6144 wide. Then four sequences, whose tensor-core GEMVs take their k in more than one pass, and eight,
/// whose inputs no longer fit the GEMVs' shared memory: cuBLAS and the split attention in three launches.
#[test]
fn a_random_wider_model_decodes_one_four_and_eight_sequences_like_the_cpu_backend() {
    if !driver_or_skip(
        "a_random_wider_model_decodes_one_four_and_eight_sequences_like_the_cpu_backend",
    ) {
        return;
    }
    let shape = ModelConfig {
        hidden_size: 2048,
        intermediate_size: 6144,
        num_layers: 4,
        ..qwen3_0_6b_shape()
    };
    for lengths in [
        &[300][..],
        &[300, 5, 70, 129],
        &[300, 5, 70, 129, 17, 250, 64, 33],
    ] {
        let prompts = patterned_prompts(lengths, shape.vocab_size);
        let name = format!("hidden 2048, 4 layers (random, prompts of {lengths:?} tokens)");
        check(
            &name,
            &compare(&name, || random_model(shape.clone(), 13), &prompts),
        );
    }
}

#[test]
fn no_driver_is_a_clear_error() {
    if cuda_driver_present() {
        eprintln!("skipping no_driver_is_a_clear_error: a CUDA driver is present");
        return;
    }
    let error = Engine::cuda(&load_fixture(FIXTURES[0]), config(8), 0)
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default();
    assert!(error.contains("no CUDA driver"), "{error}");
}
