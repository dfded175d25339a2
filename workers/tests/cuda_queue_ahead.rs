//! Greedy and drawn steps queued ahead on the GPU (`Engine::decode_greedy_ahead`, `Engine::decode_drawn_ahead`: each
//! call queues the next step of its batch, whose inputs are the tokens it returns, still on the device) against the
//! same steps run one call at a time, on a random model of the Qwen3-0.6B shape: the same tokens (and draws) at every
//! step, through what drops a queued step (a sequence leaving, one joining, a token other than the pick). Greedy at
//! one, two and eight sequences (the decode GEMVs' fused argmax keys) and sixteen (cuBLAS, `argmax_rows`'s tokens),
//! drawn at one and four;
//! sequences pass 256 tokens (a larger block-table capacity: a new graph captured, and the metadata buffer grown,
//! behind a queued step). Skips, saying why, where no CUDA driver exists.

use std::time::Instant;

mod common;

use common::{argmax, driver_or_skip, random_qwen3_0_6b_on_gpu};
use tandem_workers::{Engine, QueuedAheadSteps, RowDrawParams};

const STEPS: usize = 48;

/// A drawn step's parameters for `rows` rows at `step`: row 0 greedy, the others at temperatures 0.7, 1 and 1.3,
/// with uniforms spread over (0, 1).
fn params_at(step: usize, rows: usize) -> Vec<RowDrawParams> {
    (0..rows)
        .map(|row| RowDrawParams {
            inverse_temperature: [0.0, 1.0 / 0.7, 1.0, 1.0 / 1.3][row % 4],
            uniform: ((step * 7 + row * 3) % 10) as f64 / 10.0 + 0.05,
        })
        .collect()
}

/// Runs `STEPS` greedy (or `drawn`) steps over `prompts` on `engine`, with a sequence leaving at step 16, one joining
/// at step 28 (where there is more than one) and row 0 fed another token than its pick at step 36; returns every
/// step's picks (for drawn steps, each row's drawn token then its candidates' ids), the milliseconds steps 1-15
/// took, and the queued-ahead counts of the run.
fn run(
    engine: &mut Engine,
    prompts: &[Vec<u32>],
    joining: &[u32],
    queue_ahead: bool,
    drawn: bool,
) -> (Vec<Vec<u32>>, f64, QueuedAheadSteps) {
    engine.set_queue_ahead(queue_ahead).expect("queue ahead");
    let before = engine.queued_ahead_steps();
    let mut ids = Vec::new();
    let mut next = Vec::new();
    for prompt in prompts {
        let id = engine.add_sequence(prompt).expect("a sequence");
        let logits = engine.prefill(id).expect("a prefill");
        next.push(argmax(logits));
        ids.push(id);
    }
    let mut picks = Vec::new();
    let mut started = Instant::now();
    let mut first_steps_ms = 0.0;
    for step in 0..STEPS {
        match step {
            1 => started = Instant::now(),
            16 => {
                first_steps_ms = started.elapsed().as_secs_f64() * 1e3 / 15.0;
                if ids.len() > 1 {
                    engine
                        .remove_sequence(ids.pop().expect("a sequence"))
                        .expect("removed");
                    next.pop();
                }
            }
            28 if prompts.len() > 1 => {
                let id = engine.add_sequence(joining).expect("a sequence");
                next.push(argmax(engine.prefill(id).expect("a prefill")));
                ids.push(id);
            }
            36 => next[0] = (next[0] + 1) % 1000,
            _ => {}
        }
        let batch: Vec<(u64, u32)> = ids.iter().copied().zip(next.iter().copied()).collect();
        if drawn {
            let params = params_at(step, ids.len());
            let draws = if queue_ahead {
                engine.decode_drawn_ahead(&batch, &params, &params_at(step + 1, ids.len()))
            } else {
                engine.decode_drawn(&batch, &params)
            }
            .unwrap_or_else(|error| panic!("step {step}: {error}"))
            .to_vec();
            next = draws.iter().map(|draw| draw.drawn_token).collect();
            let mut step_picks = next.clone();
            for draw in &draws {
                step_picks.extend(draw.candidates.iter().map(|candidate| candidate.0));
            }
            picks.push(step_picks);
        } else {
            let picked = if queue_ahead {
                engine.decode_greedy_ahead(&batch)
            } else {
                engine.decode_greedy(&batch)
            }
            .unwrap_or_else(|error| panic!("step {step}: {error}"));
            next = picked.to_vec();
            picks.push(next.clone());
        }
    }
    for id in ids {
        engine.remove_sequence(id).expect("removed");
    }
    let after = engine.queued_ahead_steps();
    let counts = QueuedAheadSteps {
        queued: after.queued - before.queued,
        taken: after.taken - before.taken,
        dropped: after.dropped - before.dropped,
    };
    (picks, first_steps_ms, counts)
}

#[test]
fn steps_queued_ahead_give_the_tokens_of_steps_run_one_at_a_time() {
    if !driver_or_skip("steps_queued_ahead_give_the_tokens_of_steps_run_one_at_a_time") {
        return;
    }
    let mut engine = random_qwen3_0_6b_on_gpu(13, 1024);
    let vocab_size = engine.model_config().vocab_size as u64;
    let prompt = |sequence: u64, len: u64| -> Vec<u32> {
        (0..len)
            .map(|i| ((i * 2_654_435_761 + sequence * 97 + 5) % vocab_size) as u32)
            .collect()
    };
    for (batch, drawn) in [
        (1u64, false),
        (2, false),
        (8, false),
        (16, false),
        (1, true),
        (4, true),
    ] {
        let kind = if drawn { "drawn" } else { "greedy" };
        // The first sequence passes 256 tokens (16 blocks) during the run.
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|sequence| prompt(sequence, 230 + 7 * sequence))
            .collect();
        let joining = prompt(99, 61);
        let (one_at_a_time, waiting_ms, none_queued) =
            run(&mut engine, &prompts, &joining, false, drawn);
        let (queued, queued_ms, counts) = run(&mut engine, &prompts, &joining, true, drawn);
        assert_eq!(none_queued, QueuedAheadSteps::default());
        for (step, (queued, expected)) in queued.iter().zip(&one_at_a_time).enumerate() {
            assert_eq!(queued, expected, "{kind} batch {batch}, step {step}");
        }
        // Every step queued the next; the first had none to take, the steps after a change dropped theirs, and so
        // did the removals after the last step.
        let changes = if batch > 1 { 3 } else { 1 };
        assert_eq!(
            counts,
            QueuedAheadSteps {
                queued: STEPS as u64,
                taken: STEPS as u64 - 1 - changes,
                dropped: changes + 1,
            },
            "{kind} batch {batch}"
        );
        eprintln!(
            "{kind} batch {batch}: {STEPS} steps give the same tokens queued ahead; steps 1-15 took {queued_ms:.3} ms each queued ahead, {waiting_ms:.3} ms one at a time"
        );
    }
}
