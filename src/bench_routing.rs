//! `tandem bench routing`: KV-aware routing against the baselines on a shared-prefix workload. Each policy gets a
//! fresh fleet in this process (embedded log, the real scheduler, several decode workers on the built-in model)
//! and the same requests: groups of prompts that share a long prefix (a system prompt, a document) and differ in a
//! short suffix, arriving interleaved at a fixed concurrency. It prints, per policy, the prefix-cache hit rate
//! (cached prompt tokens over all prompt tokens, from the decode workers' `PrefillLocal` decisions on the log) and
//! the time to first token, measured side by side in one run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::{EventLog, StartAt};
use tandem_events::schema::{Body, Received, SamplingParams};
use tandem_events::subjects::{WORKER_HEARTBEAT_TTL, WORKERS_BUCKET};
use tandem_events::tokens::{InProcessTokenBus, TokenBus};
use tandem_events::{Event, EventKind};
use tandem_scheduler::routing::RoutingPolicy;
use tandem_scheduler::service::{Scheduler, SchedulerConfig};
use tandem_workers::roles::decode::{DecodeWorker, DecodeWorkerConfig};
use tandem_workers::{Engine, EngineConfig, builtin_model};
use tokio::sync::Semaphore;

#[derive(clap::Args)]
pub struct RoutingArgs {
    /// Policies to compare, comma-separated (kv, round-robin, random).
    #[arg(long, value_delimiter = ',', default_value = "kv,round-robin")]
    policies: Vec<String>,
    #[arg(long, default_value_t = 4)]
    decode_workers: usize,
    /// Distinct shared prefixes.
    #[arg(long, default_value_t = 8)]
    groups: u32,
    #[arg(long, default_value_t = 512)]
    prefix_tokens: u32,
    /// Tokens after the shared prefix, distinct per request.
    #[arg(long, default_value_t = 32)]
    suffix_tokens: u32,
    #[arg(long, default_value_t = 96)]
    requests: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// KV-aware cost weight of a block still to prefill.
    #[arg(long, default_value_t = 1.0)]
    kv_overlap_weight: f64,
}

/// What one policy measured.
struct PolicyResult {
    policy: String,
    hit_rate: f64,
    ttft_ms: Vec<f64>,
    requests_per_worker: BTreeMap<String, u32>,
    wall: Duration,
}

fn prompt(args: &RoutingArgs, request: u32) -> Vec<u32> {
    // Groups in a scrambled order (a multiplicative hash of the request number), as independent clients would
    // arrive: no policy gets a regular pattern for free.
    let group = (request.wrapping_mul(2_654_435_761) >> 8) % args.groups;
    (0..args.prefix_tokens)
        .map(|t| 1000 + group * 4099 + t * 13 % 50_000)
        .chain((0..args.suffix_tokens).map(|t| 60_000 + (request * 211 + t) % 90_000))
        .collect()
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn run_policy(args: &RoutingArgs, name: &str) -> Result<PolicyResult> {
    let policy =
        RoutingPolicy::parse(name, args.kv_overlap_weight, 0.0).map_err(anyhow::Error::msg)?;
    let data_dir = tempfile::tempdir()?;
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&data_dir.path().join("log"))?);
    let bus = Arc::new(InProcessTokenBus::new());
    let tokenizer_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/qwen3-tokenizer/tokenizer.json"
    );
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
        .map_err(|error| anyhow::anyhow!("loading {tokenizer_path}: {error}"))?;
    let mut workers = Vec::new();
    for index in 0..args.decode_workers {
        let engine = Engine::cpu(
            builtin_model(),
            EngineConfig {
                num_blocks: 4096,
                ..EngineConfig::default()
            },
        )?;
        workers.push(
            DecodeWorker::start(
                DecodeWorkerConfig::new(format!("decode-{index}"), "qwen3"),
                engine,
                tokenizer.clone(),
                Arc::clone(&log),
                bus.clone() as Arc<dyn TokenBus>,
                None,
            )
            .await?,
        );
    }
    let mut config = SchedulerConfig::new(
        format!("scheduler-{name}"),
        data_dir.path().join("scheduler.redb"),
    );
    config.control.policy = policy;
    let scheduler =
        Scheduler::open(Arc::clone(&log), bus.clone() as Arc<dyn TokenBus>, config).await?;
    let (stop, stop_receiver) = tokio::sync::watch::channel(false);
    let scheduler = tokio::spawn(scheduler.run(stop_receiver));
    // Every worker's heartbeat visible before the first request, so all of them are candidates from the start.
    let heartbeats = log.kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL).await?;
    while heartbeats.keys().await?.len() < args.decode_workers {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::new();
    for request in 0..args.requests {
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let (log, bus) = (Arc::clone(&log), Arc::clone(&bus));
        let prompt = prompt(args, request);
        let max_tokens = args.max_tokens;
        let request_id = format!("ROUTE{name}{request:05}").replace('-', "");
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut stream = bus.subscribe(&request_id).await?;
            let received = Event::new(
                request_id.as_str(),
                "bench",
                Body::Received(Received {
                    model: "qwen3".into(),
                    prompt_tokens: prompt.len() as u32,
                    prompt_token_ids: prompt,
                    sampling: Some(SamplingParams {
                        max_tokens,
                        ignore_eos: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            );
            let sent = Instant::now();
            log.append_event(&received, 1).await?;
            let first = tokio::time::timeout(Duration::from_secs(300), stream.next())
                .await
                .context("no first token within 300 s")?
                .context("the token stream ended")?;
            let ttft = sent.elapsed();
            anyhow::ensure!(first.error.is_none(), "request failed: {:?}", first.error);
            let mut last = first.is_last();
            while !last {
                match stream.next().await {
                    Some(update) => last = update.is_last(),
                    None => break,
                }
            }
            Ok::<Duration, anyhow::Error>(ttft)
        }));
    }
    let mut ttft_ms = Vec::new();
    for task in tasks {
        ttft_ms.push(task.await??.as_secs_f64() * 1e3);
    }
    let wall = started.elapsed();
    ttft_ms.sort_by(f64::total_cmp);

    let (mut cached, mut prompt_total) = (0u64, 0u64);
    let mut requests_per_worker: BTreeMap<String, u32> = BTreeMap::new();
    for message in log.read(StartAt::Beginning, &[], usize::MAX).await? {
        let Ok(event) = message.event() else { continue };
        match event.body() {
            Body::PrefillLocal(local) => {
                if let Some(decision) = &local.decision {
                    cached += u64::from(decision.cached_tokens);
                    prompt_total += u64::from(decision.prompt_tokens);
                }
            }
            Body::Routed(routed) if event.kind() == EventKind::Routed => {
                *requests_per_worker
                    .entry(routed.decode_worker_id.clone())
                    .or_default() += 1;
            }
            _ => {}
        }
    }
    for worker in workers {
        worker.shutdown().await;
    }
    let _ = stop.send(true);
    scheduler.await??;
    Ok(PolicyResult {
        policy: name.to_string(),
        hit_rate: if prompt_total == 0 {
            0.0
        } else {
            cached as f64 / prompt_total as f64
        },
        ttft_ms,
        requests_per_worker,
        wall,
    })
}

pub fn run(args: RoutingArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!(
            "routing: {} requests, {} groups × {}-token shared prefix + {}-token suffix, {} in flight, {} decode \
             workers, {} tokens each (built-in model, CPU)",
            args.requests,
            args.groups,
            args.prefix_tokens,
            args.suffix_tokens,
            args.concurrency,
            args.decode_workers,
            args.max_tokens
        );
        let mut results = Vec::new();
        for policy in &args.policies {
            results.push(run_policy(&args, policy).await?);
        }
        println!(
            "{:>12} {:>10} {:>12} {:>12} {:>12} {:>9}  requests per worker",
            "policy", "hit rate", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "wall s"
        );
        for result in &results {
            println!(
                "{:>12} {:>9.1}% {:>12.1} {:>12.1} {:>12.1} {:>9.2}  {:?}",
                result.policy,
                result.hit_rate * 100.0,
                percentile(&result.ttft_ms, 0.5),
                percentile(&result.ttft_ms, 0.9),
                percentile(&result.ttft_ms, 0.99),
                result.wall.as_secs_f64(),
                result.requests_per_worker.values().collect::<Vec<_>>()
            );
        }
        if let [first, rest @ ..] = results.as_slice() {
            for other in rest {
                println!(
                    "{} vs {}: TTFT p50 ratio {:.2}, hit rate {:.1}% vs {:.1}%",
                    first.policy,
                    other.policy,
                    percentile(&first.ttft_ms, 0.5) / percentile(&other.ttft_ms, 0.5),
                    first.hit_rate * 100.0,
                    other.hit_rate * 100.0
                );
            }
        }
        Ok(())
    })
}
