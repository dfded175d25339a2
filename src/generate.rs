//! `tandem generate` and `tandem bench engine`: the engine driven from the command line, for debugging and
//! measuring it without the server.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tandem_workers::{
    Engine, EngineConfig, ModelWeights, Sampler, SamplingParams, builtin_model, load_model,
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
    /// Only `cpu` for now.
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    device: String,
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
    let mut state =
        0x9E37_79B9_7F4A_7C15u64 ^ (sequence as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab_size as u64) as u32
        })
        .collect()
}

pub fn bench_engine(args: BenchEngineArgs) -> Result<()> {
    if args.device != "cpu" {
        bail!("device {:?} is not built yet; only `cpu`", args.device);
    }
    if args.prompt_len == 0 || args.batch.contains(&0) {
        bail!("--prompt-len and every --batch must be at least 1");
    }
    let load_started = Instant::now();
    let weights = load(&args.engine.model)?;
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
        let mut ids = Vec::with_capacity(batch);
        let mut samplers = Vec::with_capacity(batch);
        let mut next_tokens = Vec::with_capacity(batch);
        for sequence in 0..batch {
            let id =
                engine.add_sequence(&bench_prompt(sequence + 1, args.prompt_len, vocab_size))?;
            let mut sampler = Sampler::new(SamplingParams {
                seed: Some(sequence as u64),
                ..SamplingParams::default()
            });
            next_tokens.push(sampler.sample(engine.prefill(id)?).token_id);
            ids.push(id);
            samplers.push(sampler);
        }
        let started = Instant::now();
        for _ in 0..args.decode_steps {
            let steps: Vec<(u64, u32)> = ids
                .iter()
                .copied()
                .zip(next_tokens.iter().copied())
                .collect();
            let logits = engine.decode(&steps)?;
            for ((row, sampler), next) in logits
                .chunks_exact(vocab_size)
                .zip(&mut samplers)
                .zip(&mut next_tokens)
            {
                *next = sampler.sample(row).token_id;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
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
