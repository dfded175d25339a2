//! `tandem bench log`: appends/s (publish-and-wait and pipelined) and reads/s of both event-log backends, so later
//! work can see what the log costs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tandem_events::Event;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::jetstream::{JetStreamLog, JetStreamOptions};
use tandem_events::log::{ConsumerConfig, EventLog, OutgoingMessage, StartAt};
use tandem_events::nats_server::NatsServer;
use tandem_events::schema::{Body, Received, SamplingParams};

use crate::nats_args::NatsArgs;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Embedded,
    Jetstream,
    Both,
}

#[derive(clap::Args)]
pub struct BenchLogArgs {
    /// Which backend to measure.
    #[arg(long, value_enum, default_value = "both")]
    backend: Backend,
    /// JetStream server to use; without it a nats-server is started on a free loopback port.
    #[arg(long, env = "TANDEM_NATS")]
    nats: Option<String>,
    /// Credentials and TLS for `--nats`, as the roles take them.
    #[command(flatten)]
    nats_auth: NatsArgs,
    /// Where the embedded log is written; a temp dir when absent.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Events per measurement.
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// Prompt length of the `Received` events appended (sets the payload size).
    #[arg(long, default_value_t = 256)]
    prompt_tokens: u32,
    /// Messages per pipelined batch.
    #[arg(long, default_value_t = 256)]
    batch: usize,
}

struct Figures {
    backend: &'static str,
    payload_bytes: usize,
    sequential_appends_per_s: f64,
    pipelined_appends_per_s: f64,
    reads_per_s: f64,
    consumed_per_s: f64,
}

fn event(run: &str, index: usize, prompt_tokens: u32) -> Event {
    Event::new(
        format!("{run}-{index:08}"),
        "bench",
        Body::Received(Received {
            model: "qwen3".into(),
            prompt_token_ids: (0..prompt_tokens).map(|t| (t * 7919) % 151_936).collect(),
            prompt_tokens,
            sampling: Some(SamplingParams {
                temperature: 0.7,
                max_tokens: 128,
                ..Default::default()
            }),
            gateway_id: "gateway-bench".into(),
            stream: true,
            endpoint: "chat".into(),
            ..Default::default()
        }),
    )
}

fn messages(run: &str, count: usize, prompt_tokens: u32) -> Result<Vec<OutgoingMessage>> {
    (0..count)
        .map(|index| {
            OutgoingMessage::from_event(&event(run, index, prompt_tokens), 1).map_err(Into::into)
        })
        .collect()
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

async fn measure(
    backend: &'static str,
    log: Arc<dyn EventLog>,
    args: &BenchLogArgs,
) -> Result<Figures> {
    let run = format!("bench{}", tandem_events::event::now_ns());
    let first_sequence = log.last_sequence().await? + 1;

    let sequential = messages(&format!("{run}s"), args.count, args.prompt_tokens)?;
    let payload_bytes = sequential
        .first()
        .map_or(0, |message| message.payload.len());
    let started = Instant::now();
    for message in sequential {
        log.append(message).await.context("sequential append")?;
    }
    let sequential_appends_per_s = per_second(args.count, started.elapsed());

    let pipelined = messages(&format!("{run}p"), args.count, args.prompt_tokens)?;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(args.batch);
    for message in pipelined {
        batch.push(message);
        if batch.len() == args.batch {
            log.append_batch(std::mem::take(&mut batch))
                .await
                .context("pipelined append")?;
        }
    }
    if !batch.is_empty() {
        log.append_batch(batch).await.context("pipelined append")?;
    }
    let pipelined_appends_per_s = per_second(args.count, started.elapsed());

    let total = 2 * args.count;
    let started = Instant::now();
    let read = log
        .read(StartAt::Sequence(first_sequence), &[], total)
        .await
        .context("read")?;
    let reads_per_s = per_second(read.len(), started.elapsed());
    anyhow::ensure!(read.len() == total, "read {} of {total} events", read.len());

    let consumer = log
        .consumer(ConsumerConfig {
            start_at: StartAt::Sequence(first_sequence),
            ..ConsumerConfig::new(format!("{run}c"), vec![])
        })
        .await?;
    let started = Instant::now();
    let mut consumed = 0;
    while consumed < total {
        let deliveries = consumer.fetch(args.batch, Duration::from_secs(5)).await?;
        anyhow::ensure!(
            !deliveries.is_empty(),
            "consumer stalled after {consumed} events"
        );
        for delivery in &deliveries {
            delivery.ack().await?;
        }
        consumed += deliveries.len();
    }
    let consumed_per_s = per_second(consumed, started.elapsed());

    Ok(Figures {
        backend,
        payload_bytes,
        sequential_appends_per_s,
        pipelined_appends_per_s,
        reads_per_s,
        consumed_per_s,
    })
}

pub fn run(args: BenchLogArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut results = Vec::new();
        if matches!(args.backend, Backend::Embedded | Backend::Both) {
            let temp_dir = tempfile::tempdir()?;
            let data_dir = args
                .data_dir
                .clone()
                .unwrap_or_else(|| temp_dir.path().to_path_buf());
            let log = Arc::new(EmbeddedLog::open(&data_dir)?);
            results.push(measure("embedded", log, &args).await?);
        }
        if matches!(args.backend, Backend::Jetstream | Backend::Both) {
            let (url, _server) = match &args.nats {
                Some(url) => (url.clone(), None),
                None => {
                    let server = NatsServer::start()?;
                    (server.url(), Some(server))
                }
            };
            let connection = args.nats_auth.connect_options()?;
            let log = Arc::new(
                JetStreamLog::connect_with(&url, &connection, JetStreamOptions::default()).await?,
            );
            results.push(measure("jetstream", log, &args).await?);
        }
        println!(
            "{:<10} {:>9} {:>16} {:>16} {:>12} {:>16}",
            "backend", "event B", "appends/s wait", "appends/s pipe", "reads/s", "fetch+ack/s"
        );
        for figures in results {
            println!(
                "{:<10} {:>9} {:>16.0} {:>16.0} {:>12.0} {:>16.0}",
                figures.backend,
                figures.payload_bytes,
                figures.sequential_appends_per_s,
                figures.pipelined_appends_per_s,
                figures.reads_per_s,
                figures.consumed_per_s
            );
        }
        Ok(())
    })
}
