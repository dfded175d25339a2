//! `tandem generate` and `tandem bench engine`: the engine driven from the command line, for debugging and
//! measuring it without the server.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tandem_workers::{
    Device, Engine, EngineConfig, ModelConfig, ModelWeights, RowDrawParams, Sampler,
    SamplingParams, builtin_model, load_model, measure_ceilings, qwen3_shape, random_model,
};

/// Engine settings shared by both commands.
#[derive(clap::Args)]
pub struct EngineFlags {
    /// A Hugging Face Qwen3 folder, or `builtin` for the built-in model (no download).
    #[arg(long, env = "TANDEM_MODEL", default_value = "builtin")]
    model: String,
    /// Tokens per KV block.
    #[arg(long, env = "TANDEM_KV_BLOCK_TOKENS", default_value_t = 16)]
    kv_block_tokens: usize,
    /// KV blocks in the pool; 0 sizes it to the work asked for.
    #[arg(long, env = "TANDEM_KV_BLOCKS", default_value_t = 0)]
    kv_blocks: usize,
    /// Prefill runs at most this many tokens per step.
    #[arg(long, env = "TANDEM_PREFILL_CHUNK_TOKENS", default_value_t = 512)]
    prefill_chunk_tokens: usize,
    /// Turn prefix caching off.
    #[arg(long, env = "TANDEM_NO_PREFIX_CACHE")]
    no_prefix_cache: bool,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    engine: EngineFlags,
    /// Prompt token ids, comma-separated (the engine takes ids; no tokenizer here).
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens; 0 is no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold; 1 is no limit.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Same seed, same tokens; a fresh seed when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Report each token's logprob and this many top alternatives.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Stop after any of these token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
}

#[derive(clap::Args)]
pub struct BenchEngineArgs {
    #[command(flatten)]
    engine: EngineFlags,
    /// `cpu` or `cuda:N`. On a GPU the report gives each phase's fraction of its roofline, against ceilings
    /// measured in the same run.
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    device: String,
    /// Bench a released model's shape instead of `--model`: `qwen3-0.6b` or `qwen3-8b` (needs
    /// `--random-weights`).
    #[arg(long)]
    shape: Option<String>,
    /// Draw the `--shape` model's weights from a fixed seed (no checkpoint needed).
    #[arg(long)]
    random_weights: bool,
    /// On a GPU: prompt lengths whose prefill is timed, comma-separated (one step each).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    prefill_lens: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 256)]
    prompt_len: usize,
    /// Decode steps timed for each batch size.
    #[arg(long, default_value_t = 64)]
    decode_steps: usize,
    /// Batch sizes for decode, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    batch: Vec<usize>,
    /// Print one JSON object instead of lines of text.
    #[arg(long)]
    json: bool,
}

fn load(model: &str) -> Result<ModelWeights> {
    if model == "builtin" {
        return Ok(builtin_model());
    }
    let dir = PathBuf::from(model);
    load_model(&dir).with_context(|| format!("loading the model in {}", dir.display()))
}

fn engine_config(flags: &EngineFlags, tokens_needed: usize) -> EngineConfig {
    let num_blocks = if flags.kv_blocks > 0 {
        flags.kv_blocks
    } else {
        tokens_needed.div_ceil(flags.kv_block_tokens.max(1)) + 16
    };
    EngineConfig {
        block_size_tokens: flags.kv_block_tokens,
        num_blocks,
        prefill_chunk_tokens: flags.prefill_chunk_tokens,
        prefix_caching: !flags.no_prefix_cache,
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let load_started = Instant::now();
    let weights = load(&args.engine.model)?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    let config = engine_config(&args.engine, args.prompt_ids.len() + args.max_tokens);
    let mut engine = Engine::cpu(weights, config)?;
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop_token_ids: args.stop_token_ids,
        logprobs: args.logprobs,
    };
    let started = Instant::now();
    let generation = engine.generate(&args.prompt_ids, &params)?;
    let generate_seconds = started.elapsed().as_secs_f64();
    let logprobs: Option<Vec<Value>> = args.logprobs.map(|_| {
        generation
            .logprobs
            .iter()
            .map(|entry| {
                json!({
                    "token_id": entry.token_id,
                    "logprob": entry.logprob,
                    "top": entry.top.iter().map(|&(id, logprob)| json!({"token_id": id, "logprob": logprob})).collect::<Vec<_>>(),
                })
            })
            .collect()
    });
    let output = json!({
        "model": args.engine.model,
        "prompt_ids": args.prompt_ids,
        "token_ids": generation.token_ids,
        "finish_reason": generation.finish_reason.as_str(),
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.token_ids.len(),
        "logprobs": logprobs,
        "load_seconds": load_seconds,
        "generate_seconds": generate_seconds,
    });
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(())
}

/// Prompt ids that differ per sequence (so no prefix is shared) and stay inside the vocabulary.
fn bench_prompt(sequence: usize, len: usize, vocab_size: usize) -> Vec<u32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64
        ^ (sequence as u64)
            .wrapping_add(1)
            .wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab_size as u64) as u32
        })
        .collect()
}

/// The weights a bench runs: a `--shape` drawn at random, or `--model`.
fn bench_weights(args: &BenchEngineArgs) -> Result<ModelWeights> {
    match (&args.shape, args.random_weights) {
        (Some(shape), true) => {
            let config = qwen3_shape(shape).with_context(|| {
                format!("unknown --shape {shape:?}: expected qwen3-0.6b or qwen3-8b")
            })?;
            Ok(random_model(config, 0x5EED))
        }
        (Some(_), false) => {
            bail!(
                "--shape draws its weights: pass --random-weights (or --model DIR for a checkpoint)"
            )
        }
        (None, true) => bail!("--random-weights needs --shape qwen3-0.6b|qwen3-8b"),
        (None, false) => load(&args.engine.model),
    }
}

pub fn bench_engine(args: BenchEngineArgs) -> Result<()> {
    if args.prompt_len == 0 || args.batch.contains(&0) || args.prefill_lens.contains(&0) {
        bail!("--prompt-len, every --batch and every --prefill-lens must be at least 1");
    }
    let device: Device = args
        .device
        .parse()
        .map_err(|message: String| anyhow::anyhow!(message))?;
    if let Device::Cuda(ordinal) = device {
        return bench_engine_cuda(&args, ordinal);
    }
    let load_started = Instant::now();
    let weights = bench_weights(&args)?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    let vocab_size = weights.config().vocab_size;
    let parameters = weights.num_parameters();
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let tokens_needed = max_batch.max(2) * (args.prompt_len + args.decode_steps + 1);
    let mut config = engine_config(&args.engine, tokens_needed);
    // Every timed prefill must compute its whole prompt.
    config.prefix_caching = false;
    let mut engine = Engine::cpu(weights, config)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    // Warm-up: page in the weights and grow the scratch buffers.
    let warmup = engine.add_sequence(&bench_prompt(
        usize::MAX,
        args.prompt_len.min(32),
        vocab_size,
    ))?;
    engine.prefill(warmup)?;
    engine.remove_sequence(warmup)?;

    let prompt = bench_prompt(0, args.prompt_len, vocab_size);
    let id = engine.add_sequence(&prompt)?;
    let started = Instant::now();
    engine.prefill(id)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    engine.remove_sequence(id)?;
    let prefill_tokens_per_s = args.prompt_len as f64 / prefill_seconds;

    let mut decode_results = Vec::new();
    for &batch in &args.batch {
        let (ids, mut next_tokens) = start_bench_sequences(&mut engine, batch, args.prompt_len)?;
        let seconds = decode_sampled(
            &mut engine,
            &ids,
            &mut next_tokens,
            0.0,
            args.decode_steps,
            DrawnWhere::HostLogits,
        )?;
        for id in ids {
            engine.remove_sequence(id)?;
        }
        let tokens = batch * args.decode_steps;
        decode_results.push(json!({
            "batch": batch,
            "steps": args.decode_steps,
            "seconds": seconds,
            "tokens_per_s": tokens as f64 / seconds,
            "ms_per_step": seconds * 1000.0 / args.decode_steps.max(1) as f64,
        }));
    }

    let report = json!({
        "device": args.device,
        "model": args.engine.model,
        "parameters": parameters,
        "threads": threads,
        "load_seconds": load_seconds,
        "prompt_len": args.prompt_len,
        "prefill": {"tokens": args.prompt_len, "seconds": prefill_seconds, "tokens_per_s": prefill_tokens_per_s},
        "decode": decode_results,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "model {} ({:.1}M parameters), device cpu, {threads} threads, loaded in {load_seconds:.2}s",
        args.engine.model,
        parameters as f64 / 1e6
    );
    println!(
        "prefill: {} tokens in {:.3}s = {prefill_tokens_per_s:.1} tokens/s",
        args.prompt_len, prefill_seconds
    );
    for result in &decode_results {
        println!(
            "decode batch {}: {} steps, {:.2} ms/step = {:.1} tokens/s",
            result["batch"],
            result["steps"],
            result["ms_per_step"].as_f64().unwrap_or(0.0),
            result["tokens_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// Runs `warmup + steps` greedy decode steps of the sequences `ids` from `next_tokens` (left holding the tokens to
/// feed next), each queued ahead of the host with `ahead` ([`Engine::decode_greedy_ahead`]); returns the seconds
/// the last `steps` took.
fn decode_greedy_timed(
    engine: &mut Engine,
    ids: &[u64],
    next_tokens: &mut [u32],
    warmup: usize,
    steps: usize,
    ahead: bool,
) -> anyhow::Result<f64> {
    let mut started = Instant::now();
    for step in 0..warmup + steps {
        if step == warmup {
            started = Instant::now();
        }
        let batch: Vec<(u64, u32)> = ids
            .iter()
            .copied()
            .zip(next_tokens.iter().copied())
            .collect();
        let picked = if ahead {
            engine.decode_greedy_ahead(&batch)?
        } else {
            engine.decode_greedy(&batch)?
        };
        next_tokens.copy_from_slice(picked);
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Adds `batch` bench prompts of `prompt_len` tokens and prefills them: their ids, and each one's greedy first
/// token.
fn start_bench_sequences(
    engine: &mut Engine,
    batch: usize,
    prompt_len: usize,
) -> Result<(Vec<u64>, Vec<u32>)> {
    let vocab_size = engine.model_config().vocab_size;
    let mut ids = Vec::with_capacity(batch);
    let mut next_tokens = Vec::with_capacity(batch);
    for sequence in 0..batch {
        let id = engine.add_sequence(&bench_prompt(sequence + 1, prompt_len, vocab_size))?;
        next_tokens.push(
            Sampler::new(SamplingParams::default())
                .sample(engine.prefill(id)?)
                .token_id,
        );
        ids.push(id);
    }
    Ok((ids, next_tokens))
}

/// Where a sampled decode step's tokens are drawn.
#[derive(Clone, Copy)]
enum DrawnWhere {
    /// Each step's logits copied to the host, every sequence's token drawn from its row there (one after
    /// another).
    HostLogits,
    /// Each row's draw made by the backend (`Engine::decode_drawn`: on a GPU, where the logits are); only a row
    /// whose top-p nucleus reaches past the candidates reads its logits.
    RowDraws,
    /// As `RowDraws`, each step queued ahead of the host (`Engine::decode_drawn_ahead`, the serving path of rows
    /// whose token is their draw's).
    RowDrawsAhead,
}

/// Runs `steps` decode steps of the sequences `ids`, every sequence sampling at `temperature` (0: greedy; seeded by
/// its index) and its next token drawn as `drawn_where` says; returns the seconds they took. `next_tokens` holds
/// each sequence's input token, and its next one when this returns.
fn decode_sampled(
    engine: &mut Engine,
    ids: &[u64],
    next_tokens: &mut [u32],
    temperature: f32,
    steps: usize,
    drawn_where: DrawnWhere,
) -> Result<f64> {
    let mut samplers: Vec<Sampler> = (0..ids.len())
        .map(|sequence| {
            Sampler::new(SamplingParams {
                temperature,
                seed: Some(sequence as u64),
                ..SamplingParams::default()
            })
        })
        .collect();
    let vocab_size = engine.model_config().vocab_size;
    let started = Instant::now();
    for _ in 0..steps {
        let batch: Vec<(u64, u32)> = ids
            .iter()
            .copied()
            .zip(next_tokens.iter().copied())
            .collect();
        match drawn_where {
            DrawnWhere::HostLogits => {
                let logits = engine.decode(&batch)?;
                for ((row, sampler), next) in logits
                    .chunks_exact(vocab_size)
                    .zip(samplers.iter_mut())
                    .zip(next_tokens.iter_mut())
                {
                    *next = sampler.sample(row).token_id;
                }
            }
            DrawnWhere::RowDraws | DrawnWhere::RowDrawsAhead => {
                let params: Vec<RowDrawParams> =
                    samplers.iter().map(Sampler::row_draw_params).collect();
                let draws = if let DrawnWhere::RowDrawsAhead = drawn_where {
                    let next_params: Vec<RowDrawParams> = samplers
                        .iter()
                        .map(Sampler::row_draw_params_after_next)
                        .collect();
                    engine.decode_drawn_ahead(&batch, &params, &next_params)?
                } else {
                    engine.decode_drawn(&batch, &params)?
                }
                .to_vec();
                for (row, (sampler, next)) in
                    samplers.iter_mut().zip(next_tokens.iter_mut()).enumerate()
                {
                    *next = match sampler.sample_from_draw(&params[row], &draws[row]) {
                        Some(sampled) => sampled.token_id,
                        None => {
                            let logits = engine.step_logits(row)?;
                            sampler.sample_with_params(&params[row], logits).token_id
                        }
                    };
                }
            }
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Bytes of the matrices one decode step reads (bf16): every layer's projections and the lm_head.
fn decode_weight_bytes(config: &ModelConfig) -> f64 {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let per_layer = (config.q_dim() + 2 * config.kv_dim()) * h + h * config.q_dim() + 3 * i * h;
    2.0 * (config.num_layers * per_layer + config.vocab_size * h) as f64
}

/// FLOPs of a prefill of `tokens` tokens: the projections for every token, causal attention (QKᵀ and PV
/// over `tokens * (tokens + 1) / 2` pairs per head) and the lm_head for the last token.
fn prefill_flops(config: &ModelConfig, tokens: usize) -> f64 {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let per_layer = (config.q_dim() + 2 * config.kv_dim()) * h + h * config.q_dim() + 3 * i * h;
    let projections = 2.0 * (config.num_layers * per_layer) as f64 * tokens as f64;
    let pairs = tokens as f64 * (tokens as f64 + 1.0) / 2.0;
    let attention = 4.0 * (config.num_layers * config.num_q_heads * config.head_dim) as f64 * pairs;
    projections + attention + 2.0 * (config.vocab_size * h) as f64
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Decode steps run before timing starts (the first captures the CUDA graph of its batch).
const DECODE_WARMUP_STEPS: usize = 4;

/// `bench engine --device cuda:N`: prefill tokens/s per prompt length and decode ms/step per batch size
/// (greedy on the GPU), each beside its roofline, with the ceilings measured first in the same run.
fn bench_engine_cuda(args: &BenchEngineArgs, ordinal: usize) -> Result<()> {
    let ceilings = measure_ceilings(ordinal)
        .with_context(|| format!("measuring the ceilings of cuda:{ordinal}"))?;
    let load_started = Instant::now();
    let weights = bench_weights(args)?;
    let config = weights.config().clone();
    let parameters = weights.num_parameters();
    let max_prefill = args.prefill_lens.iter().copied().max().unwrap_or(1);
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    // Each decoding sequence rounds up to whole blocks: prompt, warm-up steps, five rounds of timed steps (greedy
    // on the device queued ahead, greedy with the logits to the host, temperature 1 drawn on the device, the same
    // queued ahead, temperature 1 drawn on the host), one spare and one for a step queued ahead. The round of
    // greedy steps waiting for the host runs on sequences of its own, removed before these start.
    let block_tokens = args.engine.kv_block_tokens.max(1);
    let sequence_tokens = (args.prompt_len + DECODE_WARMUP_STEPS + 5 * args.decode_steps + 2)
        .div_ceil(block_tokens)
        * block_tokens;
    let tokens_needed = max_prefill.max(max_batch * sequence_tokens);
    let mut engine_flags = engine_config(&args.engine, tokens_needed);
    engine_flags.prefix_caching = false;
    engine_flags.prefill_chunk_tokens = engine_flags.prefill_chunk_tokens.max(max_prefill);
    let mut engine = Engine::cuda(&weights, engine_flags.clone(), ordinal)?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    let model_label = args
        .shape
        .clone()
        .unwrap_or_else(|| args.engine.model.clone());
    println!(
        "model {model_label} ({:.2}B parameters), device cuda:{ordinal}, loaded in {load_seconds:.1}s",
        parameters as f64 / 1e9
    );
    println!(
        "ceilings (measured now): device copy {:.0} GB/s (read + write), bf16 GEMM {:.0} TFLOP/s, pinned host->device {:.1} GB/s, device->host {:.1} GB/s",
        ceilings.copy_bytes_per_s / 1e9,
        ceilings.gemm_flops_per_s / 1e12,
        ceilings.host_to_device_bytes_per_s / 1e9,
        ceilings.device_to_host_bytes_per_s / 1e9
    );
    let vocab_size = config.vocab_size;

    let mut prefill_results = Vec::new();
    for (index, &len) in args.prefill_lens.iter().enumerate() {
        let mut samples = Vec::new();
        // The first run grows the work buffers; it is not timed.
        for repeat in 0..4 {
            let prompt = bench_prompt(1000 + index * 10 + repeat, len, vocab_size);
            let id = engine.add_sequence(&prompt)?;
            let started = Instant::now();
            engine.prefill(id)?;
            let seconds = started.elapsed().as_secs_f64();
            engine.remove_sequence(id)?;
            if repeat > 0 {
                samples.push(seconds);
            }
        }
        let seconds = median(samples);
        let flops = prefill_flops(&config, len);
        let fraction = flops / ceilings.gemm_flops_per_s / seconds;
        println!(
            "prefill {len} tokens: {:.2} ms = {:.0} tokens/s, {:.1} TFLOP/s = {:.1}% of the GEMM roofline",
            seconds * 1e3,
            len as f64 / seconds,
            flops / seconds / 1e12,
            fraction * 100.0
        );
        prefill_results.push(json!({
            "tokens": len, "seconds": seconds, "tokens_per_s": len as f64 / seconds,
            "flops": flops, "roofline_fraction": fraction,
        }));
    }

    let kv_bytes_per_token = 2.0 * (config.num_layers * 2 * config.kv_dim()) as f64;
    let weight_bytes = decode_weight_bytes(&config);
    let mut decode_results = Vec::new();
    for &batch in &args.batch {
        let warmup_steps = DECODE_WARMUP_STEPS;
        // Each step waiting for the host, then the serving path: each step queued ahead of the host, so the GPU
        // runs it while the host takes the tokens of the one before (where the engine queues ahead; elsewhere the
        // two rounds are the same). Both from the same prompts, so over the same contexts.
        let (ids, mut next_tokens) = start_bench_sequences(&mut engine, batch, args.prompt_len)?;
        let waiting_ms_per_step = decode_greedy_timed(
            &mut engine,
            &ids,
            &mut next_tokens,
            warmup_steps,
            args.decode_steps,
            false,
        )? * 1e3
            / args.decode_steps as f64;
        for id in ids {
            engine.remove_sequence(id)?;
        }
        let (ids, mut next_tokens) = start_bench_sequences(&mut engine, batch, args.prompt_len)?;
        let seconds = decode_greedy_timed(
            &mut engine,
            &ids,
            &mut next_tokens,
            warmup_steps,
            args.decode_steps,
            true,
        )?;
        let ms_per_step = seconds * 1e3 / args.decode_steps as f64;
        // KV read per step: each sequence's whole context, averaged over the timed steps.
        let mean_context = (args.prompt_len + warmup_steps) as f64 + args.decode_steps as f64 / 2.0;
        let bytes = weight_bytes + kv_bytes_per_token * mean_context * batch as f64;
        let roofline_ms = bytes / ceilings.copy_bytes_per_s * 1e3;
        println!(
            "decode batch {batch}: {ms_per_step:.3} ms/step = {:.0} tokens/s; {:.0} MB per step, roofline {roofline_ms:.3} ms = {:.1}% of it",
            (batch * args.decode_steps) as f64 / seconds,
            bytes / 1e6,
            roofline_ms / ms_per_step * 100.0
        );
        // The same steps with each sequence's logits copied to the host and sampled there (greedy): what a step
        // cost before sampled steps drew on the GPU. Then temperature 1: drawn on the GPU, the same queued ahead,
        // and from the logits copied to the host.
        let mut rounds_ms_per_step = [0.0; 4];
        for (ms_per_step, (temperature, drawn_where)) in rounds_ms_per_step.iter_mut().zip([
            (0.0, DrawnWhere::HostLogits),
            (1.0, DrawnWhere::RowDraws),
            (1.0, DrawnWhere::RowDrawsAhead),
            (1.0, DrawnWhere::HostLogits),
        ]) {
            *ms_per_step = decode_sampled(
                &mut engine,
                &ids,
                &mut next_tokens,
                temperature,
                args.decode_steps,
                drawn_where,
            )? * 1e3
                / args.decode_steps as f64;
        }
        let [
            logits_ms_per_step,
            drawn_ms_per_step,
            drawn_ahead_ms_per_step,
            host_drawn_ms_per_step,
        ] = rounds_ms_per_step;
        println!(
            "decode batch {batch} with each step waiting for the host (none queued ahead): {waiting_ms_per_step:.3} ms/step"
        );
        println!(
            "decode batch {batch} with the logits copied to the host and sampled there: {logits_ms_per_step:.3} ms/step"
        );
        println!(
            "decode batch {batch} at temperature 1: drawn on the GPU {drawn_ms_per_step:.3} ms/step ({drawn_ahead_ms_per_step:.3} queued ahead), from the logits on the host {host_drawn_ms_per_step:.3} ms/step"
        );
        decode_results.push(json!({
            "batch": batch, "steps": args.decode_steps, "ms_per_step": ms_per_step,
            "tokens_per_s": (batch * args.decode_steps) as f64 / seconds,
            "bytes_per_step": bytes, "roofline_ms": roofline_ms, "roofline_fraction": roofline_ms / ms_per_step,
            "not_queued_ahead_ms_per_step": waiting_ms_per_step,
            "logits_to_host_ms_per_step": logits_ms_per_step,
            "temperature_1_drawn_on_device_ms_per_step": drawn_ms_per_step,
            "temperature_1_drawn_on_device_queued_ahead_ms_per_step": drawn_ahead_ms_per_step,
            "temperature_1_drawn_on_host_ms_per_step": host_drawn_ms_per_step,
        }));
        for id in ids {
            engine.remove_sequence(id)?;
        }
    }
    // The KV of the longest prompt measured, moved by every transfer path.
    println!("kv transfer of a {max_prefill}-token prompt:");
    let kv_transfer = crate::bench_kv_cuda::bench_kv_transfer(
        &mut engine,
        &weights,
        &engine_flags,
        ordinal,
        &ceilings,
        &bench_prompt(7, max_prefill, vocab_size),
    )?;
    drop(weights);
    if args.json {
        let report = json!({
            "device": args.device, "model": model_label, "parameters": parameters,
            "ceilings": {
                "copy_bytes_per_s": ceilings.copy_bytes_per_s,
                "gemm_flops_per_s": ceilings.gemm_flops_per_s,
                "host_to_device_bytes_per_s": ceilings.host_to_device_bytes_per_s,
                "device_to_host_bytes_per_s": ceilings.device_to_host_bytes_per_s,
            },
            "prefill": prefill_results, "decode": decode_results, "kv_transfer": kv_transfer,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
