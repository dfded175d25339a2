//! Row draws on the GPU (`Engine::decode_drawn`, and `Engine::prefill_drawn` for a prompt's last chunk) against
//! the host's reference (`RowDraw::from_logits`) on the same step's logits, read back with `Engine::step_logits`:
//! the same candidates to the bit, the same drawn token, and the same sums up to the order they were added in.
//! Rows greedy, cool, plain and hot (a nearly flat distribution, whose draws land far past the candidates), on a
//! random model of the Qwen3-0.6B shape (151,936 tokens: 38 chunks a row). Skips, saying why, where no CUDA
//! driver exists.

use std::time::Instant;

mod common;

use common::{driver_or_skip, random_qwen3_0_6b_on_gpu};
use tandem_workers::{Engine, RowDraw, RowDrawParams};

const STEPS: usize = 24;
/// Per row: the inverse temperature (0: greedy).
const INVERSE_TEMPERATURES: [f64; 4] = [0.0, 1.0 / 0.7, 1.0, 1.0 / 8.0];

fn relative_difference(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(f64::MIN_POSITIVE)
}

/// The device's draw against the host's on the same logits: the same candidates and drawn token to the bit, the
/// sums up to the order they were added in.
fn check_draw(draw: &RowDraw, reference: &RowDraw, at: &str) {
    assert_eq!(draw.candidates, reference.candidates, "{at}: candidates");
    assert_eq!(draw.drawn_token, reference.drawn_token, "{at}: drawn token");
    assert_eq!(
        draw.drawn_logit.to_bits(),
        reference.drawn_logit.to_bits(),
        "{at}: drawn logit"
    );
    assert_eq!(draw.vocab_size, reference.vocab_size, "{at}: vocabulary");
    let normalizer = (draw.log_normalizer - reference.log_normalizer).abs();
    assert!(
        normalizer < 1e-9,
        "{at}: log normalizer off by {normalizer}"
    );
    let total = relative_difference(draw.tempered_total, reference.tempered_total);
    assert!(
        total < 1e-12,
        "{at}: tempered total off by {total} (relative)"
    );
}

/// Runs `STEPS` drawn steps of `ids` (feeding each row its drawn token) and checks every row against the host's
/// reference; returns how many draws landed past the row's candidates.
fn check_drawn_steps(engine: &mut Engine, ids: &[u64], next_tokens: &mut [u32]) -> usize {
    let mut past_candidates = 0;
    for step in 0..STEPS {
        let params: Vec<RowDrawParams> = (0..ids.len())
            .map(|row| RowDrawParams {
                inverse_temperature: INVERSE_TEMPERATURES[row % INVERSE_TEMPERATURES.len()],
                // Spread over [0, 1), both ends included.
                uniform: [0.0, 0.999_999, 0.5][step % 3] * (1.0 - row as f64 / 64.0),
            })
            .collect();
        let batch: Vec<(u64, u32)> = ids
            .iter()
            .copied()
            .zip(next_tokens.iter().copied())
            .collect();
        let draws = engine
            .decode_drawn(&batch, &params)
            .expect("a drawn step")
            .to_vec();
        for (row, draw) in draws.iter().enumerate() {
            let logits = engine.step_logits(row).expect("the row's logits").to_vec();
            let at = format!("step {step}, row {row}");
            check_draw(draw, &RowDraw::from_logits(&logits, &params[row]), &at);
            if params[row].inverse_temperature == 0.0 {
                assert_eq!(draw.drawn_token, draw.candidates[0].0, "{at}: greedy");
            }
            if !draw.candidates.iter().any(|c| c.0 == draw.drawn_token) {
                past_candidates += 1;
            }
            next_tokens[row] = draw.drawn_token;
        }
    }
    past_candidates
}

#[test]
fn gpu_row_draws_match_the_host_on_the_same_logits() {
    if !driver_or_skip("gpu_row_draws_match_the_host_on_the_same_logits") {
        return;
    }
    let mut engine = random_qwen3_0_6b_on_gpu(11, 512);
    let vocab_size = engine.model_config().vocab_size as u64;
    let mut past_candidates = 0;
    // One sequence (the graph of the fused GEMVs, whose lm_head also picks the argmax), then four and eight
    // (the tensor-core GEMVs).
    for batch in [1usize, 4, 8] {
        let mut ids = Vec::new();
        let mut next_tokens = Vec::new();
        for sequence in 0..batch {
            let prompt: Vec<u32> = (0..40 + 30 * sequence as u64)
                .map(|i| ((i * 2_654_435_761 + sequence as u64 * 97 + 5) % vocab_size) as u32)
                .collect();
            let id = engine.add_sequence(&prompt).expect("a sequence");
            // The prompt's last chunk drawn too (the first token of a request), against its logits read back.
            let params = RowDrawParams {
                inverse_temperature: INVERSE_TEMPERATURES[sequence % INVERSE_TEMPERATURES.len()],
                uniform: 0.3,
            };
            let first = engine
                .prefill_drawn(id, &params)
                .expect("a prefill")
                .clone();
            let logits = engine.step_logits(0).expect("the prompt's logits").to_vec();
            let at = format!("prompt {sequence}");
            check_draw(&first, &RowDraw::from_logits(&logits, &params), &at);
            ids.push(id);
            next_tokens.push(first.drawn_token);
        }
        past_candidates += check_drawn_steps(&mut engine, &ids, &mut next_tokens);

        // How long a drawn step takes beside one that copies the logits to the host (no sampling on either).
        let params: Vec<RowDrawParams> = (0..batch)
            .map(|_| RowDrawParams {
                inverse_temperature: 1.0,
                uniform: 0.25,
            })
            .collect();
        let mut timings = [0.0f64; 2];
        for round in 0..4 {
            for (path, timing) in timings.iter_mut().enumerate() {
                let batch_steps: Vec<(u64, u32)> = ids
                    .iter()
                    .copied()
                    .zip(next_tokens.iter().copied())
                    .collect();
                let started = Instant::now();
                if path == 0 {
                    engine
                        .decode_drawn(&batch_steps, &params)
                        .expect("a drawn step");
                } else {
                    engine.decode(&batch_steps).expect("a step");
                }
                if round > 0 {
                    *timing += started.elapsed().as_secs_f64() * 1e3 / 3.0;
                }
            }
        }
        eprintln!(
            "batch {batch}: a drawn step {:.3} ms, a step with its logits copied to the host {:.3} ms",
            timings[0], timings[1]
        );
        for id in ids {
            engine.remove_sequence(id).expect("removed");
        }
    }
    // The hot rows' draws walk the chunks far past the most likely tokens.
    assert!(past_candidates > 0, "no draw landed past the candidates");
    eprintln!("{past_candidates} draws landed past their row's candidates");
}
