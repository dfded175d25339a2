//! The engine against Hugging Face transformers: the reference greedy tokens and top-5 logprobs recorded by
//! `tests/fixtures/gen_fixtures.py` (float32 on CPU) for three small random Qwen3 checkpoints.

mod common;

use common::{FIXTURES, engine, log_softmax, reference, small_config};
use tandem_workers::SamplingParams;

const TOLERANCE: f64 = 1e-3;

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Teacher-forced on the reference tokens through prefill and step-by-step decode over the paged cache:
/// every reference top-5 logprob within 1e-3, and our argmax equal to the reference token wherever the
/// reference's top-2 margin is above the tolerance.
#[test]
fn logprobs_and_greedy_tokens_match_transformers() {
    for name in FIXTURES {
        let reference = reference(name);
        let mut engine = engine(name, small_config());
        let (mut max_error, mut compared_tokens, mut agreeing_tokens) = (0.0f64, 0, 0);
        for case in reference["cases"].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            let id = engine.add_sequence(&prompt).unwrap();
            let mut logits = engine.prefill(id).unwrap().to_vec();
            for step in case["steps"].as_array().unwrap() {
                let ours = log_softmax(&logits);
                for (token, expected) in ids(&step["top_ids"])
                    .iter()
                    .zip(step["top_logprobs"].as_array().unwrap())
                {
                    let error = (ours[*token as usize] - expected.as_f64().unwrap()).abs();
                    max_error = max_error.max(error);
                }
                let reference_token = step["token"].as_u64().unwrap() as u32;
                if step["margin"].as_f64().unwrap() > TOLERANCE {
                    compared_tokens += 1;
                    let argmax = (0..ours.len())
                        .max_by(|&a, &b| ours[a].total_cmp(&ours[b]))
                        .unwrap() as u32;
                    agreeing_tokens += usize::from(argmax == reference_token);
                }
                logits = engine.decode(&[(id, reference_token)]).unwrap().to_vec();
            }
            engine.remove_sequence(id).unwrap();
        }
        eprintln!(
            "{name}: max |logprob error| {max_error:.2e}, greedy tokens {agreeing_tokens}/{compared_tokens} \
             (transformers {}, torch {})",
            reference["transformers_version"], reference["torch_version"]
        );
        assert!(max_error < TOLERANCE, "{name}: logprob error {max_error}");
        assert!(compared_tokens > 0);
        assert_eq!(
            agreeing_tokens, compared_tokens,
            "{name}: greedy tokens differ"
        );
    }
}

/// The public generate path (sampler, logprobs, chunked prefill) reproduces the reference greedy run.
#[test]
fn greedy_generate_with_logprobs_reproduces_the_reference() {
    for name in FIXTURES {
        let reference = reference(name);
        let mut config = small_config();
        config.prefill_chunk_tokens = 64;
        let mut engine = engine(name, config);
        for case in reference["cases"].as_array().unwrap() {
            let steps = case["steps"].as_array().unwrap();
            let params = SamplingParams {
                max_tokens: steps.len(),
                logprobs: Some(5),
                ..SamplingParams::default()
            };
            let generation = engine.generate(&ids(&case["prompt_ids"]), &params).unwrap();
            let expected: Vec<u32> = steps
                .iter()
                .map(|s| s["token"].as_u64().unwrap() as u32)
                .collect();
            assert_eq!(generation.token_ids, expected, "{name}");
            assert_eq!(generation.logprobs.len(), steps.len());
            for (ours, step) in generation.logprobs.iter().zip(steps) {
                let top_ids = ids(&step["top_ids"]);
                let ours_ids: Vec<u32> = ours.top.iter().map(|t| t.0).collect();
                // Near-ties in the tail may swap places; the logprobs themselves must agree.
                for ((id, logprob), expected) in ours
                    .top
                    .iter()
                    .zip(step["top_logprobs"].as_array().unwrap())
                {
                    assert!(
                        (*logprob as f64 - expected.as_f64().unwrap()).abs() < TOLERANCE,
                        "{name} token {id}"
                    );
                }
                assert_eq!(ours_ids[0], top_ids[0]);
            }
        }
    }
}
