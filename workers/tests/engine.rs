//! Engine behaviour over the paged KV cache, on a small fixture checkpoint: prefix caching and chunked
//! prefill give the logits of a plain prefill, KV export/import continues a sequence exactly, batched
//! decode equals one-at-a-time, and generation honours seeds and stop tokens.

mod common;

use common::{argmax, engine, long_prompt, max_abs_diff, small_config};
use tandem_workers::{
    Engine, EngineConfig, EngineError, FinishReason, QueuedAheadSteps, RowDrawParams,
    SamplingParams, builtin_config, builtin_model,
};

const MODEL: &str = "tiny_f32_untied_t5";
/// Different kernels (a packed GEMM for many rows, a streaming one for few) sum in different orders.
const LOGIT_TOLERANCE: f32 = 1e-4;

fn plain_config() -> EngineConfig {
    EngineConfig {
        prefix_caching: false,
        ..small_config()
    }
}

fn prefill_logits(engine: &mut Engine, prompt: &[u32]) -> Vec<f32> {
    let id = engine.add_sequence(prompt).unwrap();
    let logits = engine.prefill(id).unwrap().to_vec();
    engine.remove_sequence(id).unwrap();
    logits
}

/// Greedy-decodes `steps` tokens for a sequence already prefilled, starting from `logits`.
fn greedy_continue(
    engine: &mut Engine,
    id: u64,
    mut logits: Vec<f32>,
    steps: usize,
) -> (Vec<u32>, Vec<f32>) {
    let mut tokens = Vec::new();
    for _ in 0..steps {
        let token = argmax(&logits);
        tokens.push(token);
        logits = engine.decode(&[(id, token)]).unwrap().to_vec();
    }
    (tokens, logits)
}

#[test]
fn prefix_cached_prefill_gives_the_plain_prefill_logits() {
    let prompt = long_prompt(MODEL);
    let mut other = prompt[..200].to_vec();
    other.extend([1, 2, 3, 4, 5, 6, 7]);
    let mut plain = engine(MODEL, plain_config());
    let mut cached = engine(MODEL, small_config());

    let first = prefill_logits(&mut cached, &prompt);
    assert!(max_abs_diff(&first, &prefill_logits(&mut plain, &prompt)) < LOGIT_TOLERANCE);
    assert!(cached.num_cached_blocks() >= prompt.len() / 16);

    // Same prompt again: every full block but the one holding the last token comes from the cache.
    let id = cached.add_sequence(&prompt).unwrap();
    assert_eq!(
        cached.cached_prompt_tokens(id).unwrap(),
        (prompt.len() - 1) / 16 * 16
    );
    let again = cached.prefill(id).unwrap().to_vec();
    cached.remove_sequence(id).unwrap();
    assert!(max_abs_diff(&again, &first) < LOGIT_TOLERANCE);

    // A shared 200-token prefix: 12 full blocks reused, the rest computed.
    let id = cached.add_sequence(&other).unwrap();
    assert_eq!(cached.cached_prompt_tokens(id).unwrap(), 192);
    let shared = cached.prefill(id).unwrap().to_vec();
    assert!(max_abs_diff(&shared, &prefill_logits(&mut plain, &other)) < LOGIT_TOLERANCE);
}

#[test]
fn chunked_prefill_gives_the_plain_prefill_logits() {
    let prompt = long_prompt(MODEL);
    let reference = prefill_logits(&mut engine(MODEL, plain_config()), &prompt);
    for chunk_tokens in [1, 7, 16, 100] {
        let mut config = plain_config();
        config.prefill_chunk_tokens = chunk_tokens;
        let chunked = prefill_logits(&mut engine(MODEL, config), &prompt);
        let difference = max_abs_diff(&chunked, &reference);
        assert!(
            difference < LOGIT_TOLERANCE,
            "chunks of {chunk_tokens}: {difference}"
        );
    }
}

#[test]
fn kv_export_then_import_into_a_fresh_cache_decodes_the_same_tokens() {
    let prompt = long_prompt(MODEL)[..70].to_vec();
    let mut source = engine(MODEL, small_config());
    let id = source.add_sequence(&prompt).unwrap();
    let logits = source.prefill(id).unwrap().to_vec();
    let exported = source.export_kv(id).unwrap();
    let layout = source.kv_layout();
    assert_eq!(
        exported.len(),
        8 + 7 * 4 + prompt.len() * 4 + prompt.len().div_ceil(16) * layout.block_bytes()
    );
    let first_token = argmax(&logits);
    let (in_place, in_place_logits) = greedy_continue(&mut source, id, logits, 12);

    // A fresh engine whose first blocks are taken, so the import lands in different block ids.
    let mut target = engine(MODEL, small_config());
    let _occupant = target.add_sequence(&[9; 40]).unwrap();
    let imported = target.import_kv(&exported).unwrap();
    assert_eq!(target.token_ids(imported).unwrap(), prompt.as_slice());
    let mut tokens = vec![first_token];
    let mut logits = target.decode(&[(imported, first_token)]).unwrap().to_vec();
    for _ in 1..12 {
        let token = argmax(&logits);
        tokens.push(token);
        logits = target.decode(&[(imported, token)]).unwrap().to_vec();
    }
    assert_eq!(tokens, in_place);
    assert!(max_abs_diff(&logits, &in_place_logits) < LOGIT_TOLERANCE);

    // Re-exporting the imported prompt's blocks gives the same bytes (unused slots are zeroed).
    let mut again = engine(MODEL, small_config());
    let reimported = again.import_kv(&exported).unwrap();
    assert_eq!(again.export_kv(reimported).unwrap(), exported);

    // An export for another model shape is refused.
    let mut other_block_size = engine(
        MODEL,
        EngineConfig {
            block_size_tokens: 8,
            ..small_config()
        },
    );
    let error = other_block_size.import_kv(&exported).unwrap_err();
    assert!(matches!(error, EngineError::KvImport(_)), "{error}");
}

#[test]
fn batched_decode_equals_one_at_a_time() {
    let long = long_prompt(MODEL);
    let prompts = [
        long[..5].to_vec(),
        long[..40].to_vec(),
        long.clone(),
        long[100..117].to_vec(),
    ];
    let steps = 6;

    let mut single = engine(MODEL, small_config());
    let mut expected = Vec::new();
    for prompt in &prompts {
        let id = single.add_sequence(prompt).unwrap();
        let logits = single.prefill(id).unwrap().to_vec();
        expected.push(greedy_continue(&mut single, id, logits, steps));
    }

    let mut batched = engine(MODEL, small_config());
    let ids: Vec<u64> = prompts
        .iter()
        .map(|p| batched.add_sequence(p).unwrap())
        .collect();
    let mut next: Vec<u32> = ids
        .iter()
        .map(|&id| argmax(batched.prefill(id).unwrap()))
        .collect();
    let mut tokens = vec![Vec::new(); ids.len()];
    let vocab_size = batched.model_config().vocab_size;
    let mut last_logits = Vec::new();
    for _ in 0..steps {
        let batch: Vec<(u64, u32)> = ids.iter().copied().zip(next.iter().copied()).collect();
        for (sequence_tokens, &token) in tokens.iter_mut().zip(&next) {
            sequence_tokens.push(token);
        }
        last_logits = batched.decode(&batch).unwrap().to_vec();
        next = last_logits.chunks_exact(vocab_size).map(argmax).collect();
    }
    for (index, (expected_tokens, expected_logits)) in expected.iter().enumerate() {
        assert_eq!(&tokens[index], expected_tokens, "sequence {index}");
        let row = &last_logits[index * vocab_size..(index + 1) * vocab_size];
        assert!(
            max_abs_diff(row, expected_logits) < LOGIT_TOLERANCE,
            "sequence {index}"
        );
    }
}

#[test]
fn same_seed_same_tokens_and_stop_tokens_stop() {
    let prompt = long_prompt(MODEL)[..20].to_vec();
    let mut engine = engine(MODEL, small_config());
    let sampled = |engine: &mut Engine, seed| {
        let params = SamplingParams {
            max_tokens: 24,
            temperature: 1.5,
            top_k: 50,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        engine.generate(&prompt, &params).unwrap().token_ids
    };
    let first = sampled(&mut engine, 11);
    assert_eq!(first.len(), 24);
    assert_eq!(first, sampled(&mut engine, 11));
    assert_ne!(first, sampled(&mut engine, 12));

    let greedy = engine
        .generate(&prompt, &SamplingParams::default())
        .unwrap();
    assert_eq!(greedy.finish_reason, FinishReason::Length);
    let stop_at = 3;
    let stop_token = greedy.token_ids[stop_at];
    let first_occurrence = greedy
        .token_ids
        .iter()
        .position(|&t| t == stop_token)
        .unwrap();
    let stopped = engine
        .generate(
            &prompt,
            &SamplingParams {
                stop_token_ids: vec![stop_token],
                ..SamplingParams::default()
            },
        )
        .unwrap();
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.token_ids, greedy.token_ids[..=first_occurrence]);
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let mut engine = engine(
        MODEL,
        EngineConfig {
            num_blocks: 4,
            ..small_config()
        },
    );
    assert!(matches!(
        engine.add_sequence(&[]),
        Err(EngineError::EmptyPrompt)
    ));
    assert!(matches!(
        engine.add_sequence(&[5000]),
        Err(EngineError::TokenOutOfVocabulary { token_id: 5000, .. })
    ));
    assert!(matches!(
        engine.add_sequence(&[1; 100]),
        Err(EngineError::OutOfBlocks { .. })
    ));
    assert_eq!(
        engine.num_free_blocks(),
        4,
        "a refused prompt holds no blocks"
    );
    let id = engine.add_sequence(&[1, 2, 3]).unwrap();
    assert!(matches!(
        engine.decode(&[(id, 4)]),
        Err(EngineError::NotPrefilled { .. })
    ));
    engine.prefill(id).unwrap();
    assert!(matches!(
        engine.decode(&[(id, 4), (id, 5)]),
        Err(EngineError::DuplicateInBatch(_))
    ));
    assert!(matches!(
        engine.decode(&[(99, 4)]),
        Err(EngineError::UnknownSequence(99))
    ));
    assert_eq!(
        engine.token_ids(id).unwrap(),
        &[1, 2, 3],
        "a refused batch appends nothing"
    );
    engine.decode(&[(id, 4)]).unwrap();
    assert_eq!(engine.token_ids(id).unwrap(), &[1, 2, 3, 4]);
}

#[test]
fn the_builtin_model_is_deterministic_and_qwen3_shaped() {
    let config = builtin_config();
    assert_eq!(config.vocab_size, 151_936);
    assert_ne!(config.head_dim, config.hidden_size / config.num_q_heads);
    let engine_config = EngineConfig {
        num_blocks: 16,
        ..EngineConfig::default()
    };
    let params = SamplingParams {
        max_tokens: 3,
        temperature: 0.7,
        seed: Some(1),
        logprobs: Some(2),
        ..SamplingParams::default()
    };
    let prompt = [151_643, 9707, 11, 1879, 0];
    let first = Engine::cpu(builtin_model(), engine_config.clone())
        .unwrap()
        .generate(&prompt, &params)
        .unwrap();
    let second = Engine::cpu(builtin_model(), engine_config)
        .unwrap()
        .generate(&prompt, &params)
        .unwrap();
    assert_eq!(first.token_ids, second.token_ids);
    assert_eq!(first.logprobs, second.logprobs);
    assert!(
        first
            .logprobs
            .iter()
            .all(|l| l.logprob < 0.0 && l.top.len() == 2)
    );
}

/// Adds and prefills `prompts`: their ids, and each one's greedy first token.
fn prefill_all(engine: &mut Engine, prompts: &[Vec<u32>]) -> (Vec<u64>, Vec<u32>) {
    prompts
        .iter()
        .map(|prompt| {
            let id = engine.add_sequence(prompt).unwrap();
            (id, argmax(engine.prefill(id).unwrap()))
        })
        .unzip()
}

/// Greedy steps queued ahead (`decode_greedy_ahead`: each call queues the next step of its batch with the tokens
/// it returns) give the tokens and KV of steps run one call at a time, through what drops a queued step: a
/// sequence leaving, one joining, a caller feeding a token other than the pick, and block boundaries crossed.
#[test]
fn greedy_steps_queued_ahead_give_the_tokens_of_steps_run_one_at_a_time() {
    let long = long_prompt(MODEL);
    let prompts = [
        long[..5].to_vec(),
        long[..40].to_vec(),
        long[100..113].to_vec(),
    ];
    let joining = long[50..70].to_vec();
    let steps = 40;

    let run = |queue_ahead: bool| {
        let mut engine = engine(MODEL, small_config());
        engine.set_queue_ahead(queue_ahead).unwrap();
        let (mut ids, mut next) = prefill_all(&mut engine, &prompts);
        let mut picked_per_step = Vec::new();
        for step in 0..steps {
            match step {
                12 => {
                    engine.remove_sequence(ids.remove(1)).unwrap();
                    next.remove(1);
                }
                20 => {
                    let id = engine.add_sequence(&joining).unwrap();
                    next.push(argmax(engine.prefill(id).unwrap()));
                    ids.push(id);
                }
                // Not the pick: the queued step took the pick, so it cannot serve.
                30 => next[0] = (next[0] + 1) % 64,
                _ => {}
            }
            let batch: Vec<(u64, u32)> = ids.iter().copied().zip(next.iter().copied()).collect();
            let picked = if queue_ahead {
                engine.decode_greedy_ahead(&batch).unwrap()
            } else {
                engine.decode_greedy(&batch).unwrap()
            };
            next = picked.to_vec();
            picked_per_step.push(next.clone());
        }
        // The KV each sequence holds: the logits of one more step, which read all of it.
        let batch: Vec<(u64, u32)> = ids.iter().copied().zip(next.iter().copied()).collect();
        let logits = engine.decode(&batch).unwrap().to_vec();
        let token_ids: Vec<Vec<u32>> = ids
            .iter()
            .map(|&id| engine.token_ids(id).unwrap().to_vec())
            .collect();
        for id in ids {
            engine.remove_sequence(id).unwrap();
        }
        let queued_ahead = engine.queued_ahead_steps();
        (
            picked_per_step,
            logits,
            token_ids,
            engine.num_free_blocks(),
            queued_ahead,
        )
    };
    let (one_at_a_time, logits, token_ids, free_blocks, none_queued) = run(false);
    let (queued, queued_logits, queued_token_ids, queued_free_blocks, queued_ahead) = run(true);
    assert_eq!(none_queued, QueuedAheadSteps::default());
    // Every call queued the next step; the first had none to take, and the calls after the sequence left, the
    // sequence joined, the other token and the last step's (the plain decode) dropped theirs.
    assert_eq!(
        queued_ahead,
        QueuedAheadSteps {
            queued: steps as u64,
            taken: steps as u64 - 4,
            dropped: 4,
        }
    );
    assert_eq!(queued, one_at_a_time);
    assert_eq!(queued_token_ids, token_ids);
    assert_eq!(queued_logits, logits);
    // The blocks reserved for steps queued and dropped went back to the pool.
    assert_eq!(queued_free_blocks, free_blocks);
    assert_eq!(free_blocks, small_config().num_blocks);
}

/// Drawn steps queued ahead (`decode_drawn_ahead`: each call queues the next step with the next uniforms, its
/// inputs the tokens the draws drew) give the draws of steps run one call at a time, through a sequence leaving and
/// parameters other than the queued ones; the rows' logits are kept only where no step was queued after them.
#[test]
fn drawn_steps_queued_ahead_give_the_draws_of_steps_run_one_at_a_time() {
    let long = long_prompt(MODEL);
    let prompts = [
        long[..9].to_vec(),
        long[..33].to_vec(),
        long[60..80].to_vec(),
    ];
    let steps = 24;
    // Row 0 greedy, the others at temperatures; a uniform per step and row.
    let params_at = |step: usize, rows: usize| -> Vec<RowDrawParams> {
        (0..rows)
            .map(|row| RowDrawParams {
                inverse_temperature: [0.0, 1.0 / 0.8, 1.0][row % 3],
                uniform: ((step * 7 + row * 3) % 10) as f64 / 10.0 + 0.05,
            })
            .collect()
    };

    let run = |queue_ahead: bool| {
        let mut engine = engine(MODEL, small_config());
        engine.set_queue_ahead(queue_ahead).unwrap();
        let (mut ids, mut next) = prefill_all(&mut engine, &prompts);
        let mut drawn_per_step = Vec::new();
        for step in 0..steps {
            if step == 9 {
                engine.remove_sequence(ids.remove(2)).unwrap();
                next.remove(2);
            }
            let batch: Vec<(u64, u32)> = ids.iter().copied().zip(next.iter().copied()).collect();
            let mut params = params_at(step, ids.len());
            // Not the uniforms queued with the step before: it cannot serve.
            if step == 15 {
                params[1].uniform = 0.99;
            }
            let draws = if queue_ahead {
                engine
                    .decode_drawn_ahead(&batch, &params, &params_at(step + 1, ids.len()))
                    .unwrap()
                    .to_vec()
            } else {
                engine.decode_drawn(&batch, &params).unwrap().to_vec()
            };
            assert_eq!(engine.step_logits(0).is_ok(), !queue_ahead, "step {step}");
            next = draws.iter().map(|draw| draw.drawn_token).collect();
            drawn_per_step.push(draws);
        }
        // A plain drawn step that takes the one queued by the last call keeps its logits.
        let batch: Vec<(u64, u32)> = ids.iter().copied().zip(next.iter().copied()).collect();
        engine
            .decode_drawn(&batch, &params_at(steps, ids.len()))
            .unwrap();
        let last_logits = engine.step_logits(1).unwrap().to_vec();
        let queued_ahead = engine.queued_ahead_steps();
        for id in ids {
            engine.remove_sequence(id).unwrap();
        }
        (
            drawn_per_step,
            last_logits,
            queued_ahead,
            engine.num_free_blocks(),
        )
    };
    let (one_at_a_time, last_logits, none_queued, free_blocks) = run(false);
    let (queued, queued_last_logits, queued_ahead, queued_free_blocks) = run(true);
    assert_eq!(queued_last_logits, last_logits);
    assert_eq!(none_queued, QueuedAheadSteps::default());
    for (step, (queued, expected)) in queued.iter().zip(&one_at_a_time).enumerate() {
        let tokens = |draws: &[tandem_workers::RowDraw]| -> Vec<u32> {
            draws.iter().map(|draw| draw.drawn_token).collect()
        };
        assert_eq!(tokens(queued), tokens(expected), "step {step}");
        for (row, (queued, expected)) in queued.iter().zip(expected).enumerate() {
            assert_eq!(
                queued.candidates, expected.candidates,
                "step {step}, row {row}"
            );
        }
    }
    // The first step had none to take; the steps after the sequence left and after the other uniform dropped
    // theirs; the plain step after the last took its.
    assert_eq!(
        queued_ahead,
        QueuedAheadSteps {
            queued: steps as u64,
            taken: steps as u64 - 2,
            dropped: 2,
        }
    );
    assert_eq!(queued_free_blocks, free_blocks);
}
