//! `tandem bench kv-transfer` (KV transfer throughput against memcpy and raw-socket ceilings) and `tandem bench
//! ttft` (time to first token, aggregated vs disaggregated, at a few prompt lengths), both measured side by side in
//! one run on the built-in model with the real roles in one process (embedded log, in-process KV transport).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use tandem_events::Event;
use tandem_events::log::EventLog;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::schema::{Body, Received, SamplingParams};
use tandem_events::tokens::{InProcessTokenBus, TokenBus};
use tandem_scheduler::service::{Scheduler, SchedulerConfig};
use tandem_workers::roles::decode::{DecodeWorker, DecodeWorkerConfig, RemotePrefill};
use tandem_workers::roles::prefill::{PrefillWorker, PrefillWorkerConfig};
use tandem_workers::roles::prefill_rule::PrefillRule;
use tandem_workers::transfer::bench::KvTransferBenchOptions;
use tandem_workers::transfer::{
    InProcessTransport, KvTransport, TransferTimeouts, model_fingerprint,
};
use tandem_workers::{BUILTIN_SEED, Engine, EngineConfig, builtin_config, builtin_model};

#[derive(clap::Args)]
pub struct KvTransferArgs {
    /// KV bytes per transfer.
    #[arg(long, default_value_t = 256 << 20)]
    transfer_bytes: usize,
    #[arg(long, default_value_t = 5)]
    iterations: usize,
}

pub fn kv_transfer(args: KvTransferArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(tandem_workers::transfer::bench::run(
        KvTransferBenchOptions {
            transfer_bytes: args.transfer_bytes,
            iterations: args.iterations,
        },
    ))?;
    print!("{report}");
    Ok(())
}

#[derive(clap::Args)]
pub struct TtftArgs {
    /// Prompt lengths to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,2048")]
    prompt_lens: Vec<u32>,
    /// Requests per prompt length and setup (the median is printed).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// One process's worth of roles on a fresh embedded log.
struct Setup {
    log: Arc<dyn EventLog>,
    bus: Arc<InProcessTokenBus>,
    decode: DecodeWorker,
    prefill: Option<PrefillWorker>,
    stop: tokio::sync::watch::Sender<bool>,
    _data_dir: tempfile::TempDir,
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        num_blocks: 1024,
        ..EngineConfig::default()
    }
}

async fn setup(disaggregated: bool) -> Result<Setup> {
    let data_dir = tempfile::tempdir()?;
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(data_dir.path())?);
    let bus = Arc::new(InProcessTokenBus::new());
    let (stop, stop_receiver) = tokio::sync::watch::channel(false);
    tokio::spawn(
        Scheduler::open(
            Arc::clone(&log),
            bus.clone(),
            SchedulerConfig::new("scheduler-bench", data_dir.path().join("scheduler.redb")),
        )
        .await?
        .run(stop_receiver),
    );
    let fingerprint = model_fingerprint(
        &builtin_config(),
        format!("builtin:{BUILTIN_SEED}").as_bytes(),
    );
    let transport = Arc::new(InProcessTransport::new(TransferTimeouts::default()));
    let (prefill, remote_prefill) = if disaggregated {
        let prefill = PrefillWorker::start(
            PrefillWorkerConfig {
                worker_id: "prefill-bench".into(),
                model_name: "qwen3".into(),
                device: "cpu".into(),
                model_fingerprint: fingerprint,
            },
            Engine::cpu(builtin_model(), engine_config())?,
            Arc::clone(&log),
            Arc::clone(&transport),
        )
        .await?;
        let remote = RemotePrefill {
            receiver: transport.listen("decode-bench").await?,
            // Every prompt measured goes remote.
            rule: PrefillRule {
                max_local_prefill_tokens: 0,
                max_prefill_queue_depth: 1_000,
            },
            model_fingerprint: fingerprint,
            kv_wait_timeout: Duration::from_secs(120),
        };
        (Some(prefill), Some(remote))
    } else {
        (None, None)
    };
    let tokenizer_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/qwen3-tokenizer/tokenizer.json"
    );
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path)
        .map_err(|error| anyhow::anyhow!("loading {tokenizer_path}: {error}"))?;
    let decode = DecodeWorker::start(
        DecodeWorkerConfig::new("decode-bench", "qwen3"),
        Engine::cpu(builtin_model(), engine_config())?,
        tokenizer,
        Arc::clone(&log),
        bus.clone() as Arc<dyn TokenBus>,
        remote_prefill,
    )
    .await?;
    // Let the decode worker see the prefill worker's heartbeat.
    tokio::time::sleep(Duration::from_millis(800)).await;
    Ok(Setup {
        log,
        bus,
        decode,
        prefill,
        stop,
        _data_dir: data_dir,
    })
}

/// Time from appending `Received` to the first token update.
async fn ttft(setup: &Setup, request_id: &str, prompt: Vec<u32>) -> Result<Duration> {
    let mut stream = setup.bus.subscribe(request_id).await?;
    let received = Event::new(
        request_id,
        "bench",
        Body::Received(Received {
            model: "qwen3".into(),
            prompt_tokens: prompt.len() as u32,
            prompt_token_ids: prompt,
            sampling: Some(SamplingParams {
                max_tokens: 2,
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let started = Instant::now();
    setup.log.append_event(&received, 1).await?;
    let first = tokio::time::timeout(Duration::from_secs(300), stream.next())
        .await
        .context("no first token within 300 s")?
        .context("the token stream ended")?;
    let elapsed = started.elapsed();
    anyhow::ensure!(first.error.is_none(), "request failed: {:?}", first.error);
    while let Some(update) = stream.next().await {
        if update.is_last() {
            break;
        }
    }
    Ok(elapsed)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

pub fn ttft_bench(args: TtftArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let aggregated = setup(false).await?;
        let disaggregated = setup(true).await?;
        println!(
            "TTFT, built-in model on CPU, median of {} (distinct prompts, no prefix reuse)",
            args.repeats
        );
        println!(
            "{:>12} {:>16} {:>18} {:>8}",
            "prompt tok", "aggregated ms", "disaggregated ms", "ratio"
        );
        let mut counter = 0u32;
        for &prompt_len in &args.prompt_lens {
            let mut local = Vec::new();
            let mut remote = Vec::new();
            for _ in 0..args.repeats {
                // Interleaved, so a busy machine slows both alike; distinct prompts so no prefix is cached.
                for (setup, times) in [(&aggregated, &mut local), (&disaggregated, &mut remote)] {
                    counter += 1;
                    let prompt: Vec<u32> = (0..prompt_len)
                        .map(|t| 1 + (t * 31 + counter * 7919) % 150_000)
                        .collect();
                    times.push(ttft(setup, &format!("BENCH{counter}"), prompt).await?);
                }
            }
            let (local, remote) = (median(local), median(remote));
            println!(
                "{:>12} {:>16.1} {:>18.1} {:>8.2}",
                prompt_len,
                local.as_secs_f64() * 1e3,
                remote.as_secs_f64() * 1e3,
                remote.as_secs_f64() / local.as_secs_f64()
            );
        }
        for setup in [aggregated, disaggregated] {
            setup.decode.shutdown().await;
            if let Some(prefill) = setup.prefill {
                prefill.shutdown().await;
            }
            let _ = setup.stop.send(true);
        }
        Ok(())
    })
}
