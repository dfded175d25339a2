//! Running the roles: `tandem serve` (all of them in one process) and `tandem gateway | scheduler | prefill | decode`
//! (one each, against JetStream). This module wires the parts together: the log and token bus, the model, the gateway,
//! the routing loop and the decode workers, and shuts them down in order on Ctrl-C or SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tandem_events::log::EventLog;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::jetstream::{JetStreamLog, JetStreamOptions};
use tandem_events::log::nats_connection::redact_url;
use tandem_events::subjects::{WORKER_HEARTBEAT_TTL, WORKERS_BUCKET};
use tandem_events::tokens::{InProcessTokenBus, NatsTokenBus, TokenBus};
use tandem_gateway::{Gateway, GatewayConfig};
use tandem_scheduler::control::{ControlConfig, PhaseTimeouts};
use tandem_scheduler::projection::projector::named_consumer_config;
use tandem_scheduler::routing::RoutingPolicy;
use tandem_scheduler::service::{Scheduler, SchedulerConfig, SchedulerError};
use tandem_workers::roles::decode::{DecodeWorker, DecodeWorkerConfig, RemotePrefill};
use tandem_workers::roles::prefill::{PrefillWorker, PrefillWorkerConfig};
use tandem_workers::roles::prefill_rule::PrefillRule;
use tandem_workers::transfer::{
    InProcessTransport, KvTransport, TcpTransport, TransferTimeouts, model_fingerprint,
};
use tandem_workers::{
    BUILTIN_SEED, Device, Engine, EngineConfig, ModelConfig, builtin_config, builtin_model,
    load_model, load_model_config,
};
use tokio::sync::watch;

use crate::api_access::ApiAccessArgs;
use crate::nats_args::NatsArgs;
use crate::role_http::{DecodeHttpArgs, PrefillHttpArgs, RoleHttpServer, SchedulerHttpArgs};

/// Where the log is.
#[derive(clap::Args, Clone)]
pub struct LogArgs {
    /// NATS URL of the JetStream log; without it, the embedded log under --data-dir.
    #[arg(long, env = "TANDEM_NATS")]
    nats: Option<String>,
    #[command(flatten)]
    nats_auth: NatsArgs,
    /// Where the embedded log and the scheduler's projection of the log keep their data.
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
    data_dir: PathBuf,
}

/// Which model, and how the engine holds it.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A Hugging Face Qwen3 folder; the built-in model (deterministic weights, real tokenizer) when absent.
    #[arg(long, env = "TANDEM_MODEL")]
    pub(crate) model: Option<PathBuf>,
    /// Folder with tokenizer.json and tokenizer_config.json; the model folder, or the shipped Qwen3 tokenizer.
    #[arg(long, env = "TANDEM_TOKENIZER")]
    tokenizer: Option<PathBuf>,
    /// The model name clients ask for.
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME", default_value = "qwen3")]
    pub(crate) served_model_name: String,
    /// `cpu`, or `cuda:N` for GPU N (bf16 weights and KV cache on the GPU).
    #[arg(long, env = "TANDEM_DEVICE", default_value = "cpu")]
    device: String,
    /// KV blocks per decode worker.
    #[arg(long, env = "TANDEM_KV_BLOCKS", default_value_t = 2048)]
    kv_blocks: usize,
    /// Tokens per KV block.
    #[arg(long, env = "TANDEM_KV_BLOCK_TOKENS", default_value_t = 16)]
    kv_block_tokens: usize,
    /// Most requests decoded together by one worker.
    #[arg(long, env = "TANDEM_MAX_BATCH_SEQUENCES", default_value_t = 64)]
    pub(crate) max_batch_sequences: usize,
}

/// The local-vs-remote prefill rule of decode workers (applied while prefill workers are alive).
#[derive(clap::Args, Clone)]
pub struct PrefillRuleArgs {
    /// Prompts with more uncached tokens than this go to a prefill worker.
    #[arg(long, env = "TANDEM_MAX_LOCAL_PREFILL_TOKENS", default_value_t = 1000)]
    max_local_prefill_tokens: u32,
    /// ... while the prefill queue holds fewer jobs than this.
    #[arg(long, env = "TANDEM_MAX_PREFILL_QUEUE_DEPTH", default_value_t = 2)]
    max_prefill_queue_depth: u32,
    /// How long a queued prompt's KV may take to arrive before the request fails.
    #[arg(long, env = "TANDEM_KV_WAIT_TIMEOUT_S", default_value_t = 60)]
    kv_wait_timeout_s: u64,
}

impl PrefillRuleArgs {
    fn rule(&self) -> PrefillRule {
        PrefillRule {
            max_local_prefill_tokens: self.max_local_prefill_tokens,
            max_prefill_queue_depth: self.max_prefill_queue_depth,
        }
    }
}

/// Where the HTTP API listens.
#[derive(clap::Args, Clone)]
pub struct HttpArgs {
    #[arg(long, env = "TANDEM_HOST", default_value = "0.0.0.0")]
    host: String,
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    port: u16,
    #[command(flatten)]
    access: ApiAccessArgs,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    http: HttpArgs,
    /// Decode workers in this process.
    #[arg(long, env = "TANDEM_DECODE_WORKERS", default_value_t = 1)]
    decode_workers: usize,
    /// Prefill workers in this process; with at least one, long prompts are prefilled there and their KV moved
    /// to the decode worker in memory.
    #[arg(long, env = "TANDEM_PREFILL_WORKERS", default_value_t = 0)]
    prefill_workers: usize,
    #[command(flatten)]
    prefill_rule: PrefillRuleArgs,
    #[command(flatten)]
    scheduling: SchedulingArgs,
}

#[derive(clap::Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    http: HttpArgs,
}

/// How the scheduler routes and when it gives up on a request.
#[derive(clap::Args, Clone)]
pub struct SchedulingArgs {
    /// This scheduler replica's id, stable across its restarts (its projection consumer is named after it); in
    /// Kubernetes, the pod name. Default: the host name.
    #[arg(long, env = "TANDEM_SCHEDULER_ID")]
    scheduler_id: Option<String>,
    /// Routing policy: `kv` (cached prefix weighed against load), `round-robin` or `random`.
    #[arg(long, env = "TANDEM_ROUTING", default_value = "kv")]
    routing: String,
    /// KV-aware cost = this weight × blocks still to prefill + active decode blocks.
    #[arg(long, env = "TANDEM_KV_OVERLAP_WEIGHT", default_value_t = 1.0)]
    kv_overlap_weight: f64,
    /// 0: the lowest KV-aware cost wins; above 0: sample by softmax(-cost / temperature).
    #[arg(long, env = "TANDEM_ROUTING_TEMPERATURE", default_value_t = 0.0)]
    routing_temperature: f64,
    /// A request no decode worker has started on after this many seconds fails.
    #[arg(long, env = "TANDEM_QUEUE_TIMEOUT_S", default_value_t = 300)]
    queue_timeout_s: u64,
    /// A request waiting this many seconds for its remote prefill fails.
    #[arg(long, env = "TANDEM_PREFILL_TIMEOUT_S", default_value_t = 300)]
    prefill_timeout_s: u64,
    /// A prefilling or decoding request with no progress on the log for this many seconds fails.
    #[arg(long, env = "TANDEM_PROGRESS_TIMEOUT_S", default_value_t = 120)]
    progress_timeout_s: u64,
    /// A standby scheduler takes over at most this many seconds after the active one stops.
    #[arg(long, env = "TANDEM_LEASE_TTL_S", default_value_t = 5)]
    lease_ttl_s: u64,
}

impl SchedulingArgs {
    fn config(&self, projection_path: PathBuf) -> Result<SchedulerConfig> {
        let policy = RoutingPolicy::parse(
            &self.routing,
            self.kv_overlap_weight,
            self.routing_temperature,
        )
        .map_err(anyhow::Error::msg)?;
        if !(self.kv_overlap_weight >= 0.0 && self.routing_temperature >= 0.0) {
            bail!("--kv-overlap-weight and --routing-temperature must be 0 or more");
        }
        if self.lease_ttl_s == 0 {
            bail!("--lease-ttl-s must be at least 1");
        }
        let scheduler_id = match &self.scheduler_id {
            Some(id) => id.clone(),
            None => std::env::var("HOSTNAME").unwrap_or_else(|_| "scheduler".into()),
        };
        // It names a durable consumer: keep to the characters every log backend accepts.
        let scheduler_id: String = scheduler_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if scheduler_id.is_empty() {
            bail!("--scheduler-id must not be empty");
        }
        Ok(SchedulerConfig {
            control: ControlConfig {
                scheduler_id: scheduler_id.clone(),
                policy,
                timeouts: PhaseTimeouts {
                    queue: Duration::from_secs(self.queue_timeout_s),
                    prefill: Duration::from_secs(self.prefill_timeout_s),
                    progress: Duration::from_secs(self.progress_timeout_s),
                },
                join_grace: WORKER_HEARTBEAT_TTL + Duration::from_secs(1),
            },
            scheduler_id,
            projection_path,
            lease_ttl: Duration::from_secs(self.lease_ttl_s),
        })
    }
}

#[derive(clap::Args)]
pub struct SchedulerArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    scheduling: SchedulingArgs,
    #[command(flatten)]
    http: SchedulerHttpArgs,
}

#[derive(clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prefill_rule: PrefillRuleArgs,
    /// Where prefill workers send KV (TCP `host:port`; port 0 picks one). The endpoint in `PrefillQueued` uses
    /// this address, so give one that prefill workers can reach.
    #[arg(long, env = "TANDEM_KV_LISTEN", default_value = "127.0.0.1:0")]
    kv_listen: String,
    /// This worker's id (letters, digits, '-', '_'); a fresh one when absent. In Kubernetes, the pod name.
    #[arg(long, env = "TANDEM_WORKER_ID")]
    worker_id: Option<String>,
    #[command(flatten)]
    http: DecodeHttpArgs,
}

#[derive(clap::Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// This worker's id (letters, digits, '-', '_'); a fresh one when absent. In Kubernetes, the pod name.
    #[arg(long, env = "TANDEM_WORKER_ID")]
    worker_id: Option<String>,
    #[command(flatten)]
    http: PrefillHttpArgs,
}

/// The log and the token bus the roles of this process share.
struct Backbone {
    log: Arc<dyn EventLog>,
    tokens: Arc<dyn TokenBus>,
}

async fn open_backbone(args: &LogArgs, role_alone: bool) -> Result<Backbone> {
    match &args.nats {
        Some(url) => {
            let connection = args.nats_auth.connect_options()?;
            let log =
                JetStreamLog::connect_with(url, &connection, JetStreamOptions::default()).await?;
            let tokens = Arc::new(NatsTokenBus::new(log.client().clone()));
            tracing::info!(url = %redact_url(url), "event log: JetStream");
            Ok(Backbone {
                log: Arc::new(log),
                tokens,
            })
        }
        None if role_alone => bail!(
            "a single role needs the shared log: pass --nats nats://HOST:4222 (or run `tandem serve` for all roles \
             in one process on the embedded log)"
        ),
        None => {
            let log = EmbeddedLog::open(&args.data_dir).with_context(|| {
                format!("opening the embedded log under {}", args.data_dir.display())
            })?;
            tracing::info!(data_dir = %args.data_dir.display(), "event log: embedded");
            Ok(Backbone {
                log: Arc::new(log),
                tokens: Arc::new(InProcessTokenBus::new()),
            })
        }
    }
}

/// Parses `--device`: `cpu` or `cuda:N`. Whether the GPU exists and the model fits is checked when the
/// engine starts, with an error that says which.
fn check_device(device: &str) -> Result<Device> {
    device
        .parse()
        .map_err(|message: String| anyhow::anyhow!("--device: {message}"))
}

/// The model's shape, without loading weights (what the gateway needs).
fn model_shape(args: &ModelArgs) -> Result<ModelConfig> {
    match &args.model {
        Some(dir) => load_model_config(dir)
            .with_context(|| format!("reading the model at {}", dir.display())),
        None => Ok(builtin_config()),
    }
}

pub(crate) fn tokenizer_dir(args: &ModelArgs) -> Result<PathBuf> {
    if let Some(dir) = &args.tokenizer {
        return Ok(dir.clone());
    }
    if let Some(dir) = &args.model
        && dir.join("tokenizer.json").is_file()
    {
        return Ok(dir.clone());
    }
    // The shipped Qwen3 tokenizer: next to the sources when run with cargo, or installed beside the binary.
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let candidates = [
        Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/qwen3-tokenizer"
        ))),
        exe_dir
            .as_ref()
            .map(|dir| dir.join("assets/qwen3-tokenizer")),
        exe_dir
            .as_ref()
            .map(|dir| dir.join("../share/tandem/qwen3-tokenizer")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("tokenizer.json").is_file())
        .context("no tokenizer found: pass --tokenizer DIR (a folder with tokenizer.json and tokenizer_config.json)")
}

pub(crate) fn engine(args: &ModelArgs) -> Result<Engine> {
    let device = check_device(&args.device)?;
    let weights = match &args.model {
        Some(dir) => {
            load_model(dir).with_context(|| format!("loading the model at {}", dir.display()))?
        }
        None => builtin_model(),
    };
    let config = EngineConfig {
        num_blocks: args.kv_blocks,
        block_size_tokens: args.kv_block_tokens,
        ..EngineConfig::default()
    };
    Engine::on_device(weights, config, device)
        .with_context(|| format!("starting the engine on {device}"))
}

/// The model's identity for KV transfers: its shape plus what names its weights (the built-in seed, or the
/// checkpoint's config and safetensors file sizes).
fn fingerprint(args: &ModelArgs) -> Result<u64> {
    let shape = model_shape(args)?;
    let tag = match &args.model {
        None => format!("builtin:{BUILTIN_SEED}").into_bytes(),
        Some(dir) => {
            let mut tag = std::fs::read(dir.join("config.json")).unwrap_or_default();
            let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|entry| entry.ok())
                .filter(|entry| {
                    entry
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".safetensors")
                })
                .map(|entry| {
                    let size = entry.metadata().map(|meta| meta.len()).unwrap_or(0);
                    (entry.file_name().to_string_lossy().to_string(), size)
                })
                .collect();
            files.sort();
            for (name, size) in files {
                tag.extend_from_slice(format!("{name}:{size};").as_bytes());
            }
            tag
        }
    };
    Ok(model_fingerprint(&shape, &tag))
}

/// How decode workers take remote prefills: a KV receiver each, on this transport.
enum KvReceivers<'a> {
    None,
    InProcess(&'a InProcessTransport),
    Tcp { listen: &'a str },
}

async fn start_decode_workers(
    args: &ModelArgs,
    count: usize,
    backbone: &Backbone,
    receivers: KvReceivers<'_>,
    rule: &PrefillRuleArgs,
    worker_id: Option<&str>,
) -> Result<Vec<DecodeWorker>> {
    let tokenizer_path = tokenizer_dir(args)?.join("tokenizer.json");
    let model_fingerprint = fingerprint(args)?;
    let mut workers = Vec::with_capacity(count);
    for _ in 0..count {
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|error| anyhow::anyhow!("loading {}: {error}", tokenizer_path.display()))?;
        let engine = engine(args)?;
        let worker_id = match (worker_id, count) {
            (Some(id), 1) => id.to_string(),
            _ => format!("decode-{}", ulid::Ulid::new()),
        };
        let receiver = match &receivers {
            KvReceivers::None => None,
            KvReceivers::InProcess(transport) => Some(transport.listen(&worker_id).await?),
            KvReceivers::Tcp { listen } => Some(
                TcpTransport::new(TransferTimeouts::default())
                    .listen(listen)
                    .await?,
            ),
        };
        let remote_prefill = receiver.map(|receiver| {
            tracing::info!(endpoint = receiver.endpoint(), "taking remote prefills");
            RemotePrefill {
                receiver,
                rule: rule.rule(),
                model_fingerprint,
                kv_wait_timeout: Duration::from_secs(rule.kv_wait_timeout_s),
            }
        });
        let config = DecodeWorkerConfig {
            device: args.device.clone(),
            max_batch_sequences: args.max_batch_sequences,
            ..DecodeWorkerConfig::new(worker_id, args.served_model_name.clone())
        };
        workers.push(
            DecodeWorker::start(
                config,
                engine,
                tokenizer,
                Arc::clone(&backbone.log),
                Arc::clone(&backbone.tokens),
                remote_prefill,
            )
            .await?,
        );
    }
    Ok(workers)
}

async fn start_prefill_workers<T: KvTransport + 'static>(
    args: &ModelArgs,
    count: usize,
    backbone: &Backbone,
    transport: Arc<T>,
    worker_id: Option<&str>,
) -> Result<Vec<PrefillWorker>> {
    let model_fingerprint = fingerprint(args)?;
    let mut workers = Vec::with_capacity(count);
    for _ in 0..count {
        let config = PrefillWorkerConfig {
            worker_id: match (worker_id, count) {
                (Some(id), 1) => id.to_string(),
                _ => format!("prefill-{}", ulid::Ulid::new()),
            },
            model_name: args.served_model_name.clone(),
            device: args.device.clone(),
            model_fingerprint,
        };
        let worker = PrefillWorker::start(
            config,
            engine(args)?,
            Arc::clone(&backbone.log),
            Arc::clone(&transport),
        )
        .await?;
        workers.push(worker);
    }
    Ok(workers)
}

/// Ready when at least one decode worker has a live heartbeat; checked in the background.
fn readiness(
    log: Arc<dyn EventLog>,
    mut stop: watch::Receiver<bool>,
) -> tandem_gateway::ReadinessFn {
    let ready = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ready);
    tokio::spawn(async move {
        let bucket = match log.kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL).await {
            Ok(bucket) => bucket,
            Err(error) => {
                tracing::error!(%error, "readiness: cannot read the workers bucket");
                return;
            }
        };
        while !*stop.borrow() {
            let mut any_decode = false;
            if let Ok(keys) = bucket.keys().await {
                for key in keys {
                    if bucket.get(&key).await.ok().flatten().as_deref() == Some(b"decode") {
                        any_decode = true;
                        break;
                    }
                }
            }
            flag.store(any_decode, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => {}
            }
        }
    });
    Arc::new(move || ready.load(Ordering::Relaxed))
}

/// Starts the gateway's HTTP API, with `extra_routes` (the scheduler's query API in `tandem serve`) on the same
/// port.
async fn start_gateway(
    model: &ModelArgs,
    http: &HttpArgs,
    backbone: &Backbone,
    extra_routes: Option<axum::Router>,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let shape = model_shape(model)?;
    let mut config = GatewayConfig::new(
        model.served_model_name.clone(),
        tokenizer_dir(model)?,
        shape.max_position_embeddings as u32,
        shape.vocab_size as u32,
    );
    config.metrics_text = Some(Arc::new(crate::telemetry::prometheus_text));
    http.access.apply(&mut config)?;
    let ready = readiness(Arc::clone(&backbone.log), stop.clone());
    let gateway = Gateway::new(
        config,
        Arc::clone(&backbone.log),
        Arc::clone(&backbone.tokens),
        ready,
    )?;
    let address = format!("{}:{}", http.host, http.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    tracing::info!(%address, "gateway listening");
    // The extra routes sit behind the gateway's API keys and limits too.
    let routes = match extra_routes {
        Some(extra_routes) => gateway.router_with(extra_routes),
        None => gateway.router(),
    };
    let mut stop = stop;
    Ok(tokio::spawn(async move {
        axum::serve(listener, routes)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })
            .await
    }))
}

/// The running scheduler: its task, the means to stop it last, and what its query API reads.
struct SchedulerTasks {
    task: tokio::task::JoinHandle<Result<(), SchedulerError>>,
    /// The scheduler stops last, once it has caught up with what the other roles appended while stopping.
    stop: watch::Sender<bool>,
    log: Arc<dyn EventLog>,
    consumer_name: String,
    api: axum::Router,
}

impl SchedulerTasks {
    /// Lets the scheduler catch up with the log (the other roles have stopped), then stops it; a scheduler failure
    /// is reported, it does not make the shutdown fail.
    async fn finish(self) -> Result<()> {
        if let Ok(consumer) = self
            .log
            .consumer(named_consumer_config(&self.consumer_name))
            .await
        {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline
                && consumer.pending().await.is_ok_and(|pending| pending > 0)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "the scheduler stopped with an error"),
            Err(error) => tracing::error!(%error, "the scheduler task failed"),
        }
        Ok(())
    }
}

/// Opens the scheduler (its projection in `<state_dir>/scheduler.redb`) and starts it; `api` holds its query
/// routes (with `/health` and `/ready` when `with_probes`).
async fn start_scheduler(
    backbone: &Backbone,
    state_dir: &Path,
    scheduling: &SchedulingArgs,
    with_probes: bool,
) -> Result<SchedulerTasks> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let config = scheduling.config(state_dir.join("scheduler.redb"))?;
    let consumer_name = format!("scheduler-projection-{}", config.scheduler_id);
    tracing::info!(scheduler_id = %config.scheduler_id, policy = config.control.policy.name(), "starting the scheduler");
    let scheduler = Scheduler::open(
        Arc::clone(&backbone.log),
        Arc::clone(&backbone.tokens),
        config,
    )
    .await
    .context("opening the scheduler")?;
    let api = if with_probes {
        tandem_scheduler::api::router(scheduler.reader(), scheduler.status())
    } else {
        tandem_scheduler::api::query_router(scheduler.reader(), scheduler.status())
    };
    let (stop, stop_receiver) = watch::channel(false);
    Ok(SchedulerTasks {
        task: tokio::spawn(scheduler.run(stop_receiver)),
        stop,
        log: Arc::clone(&backbone.log),
        consumer_name,
        api,
    })
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// `tandem serve`: every role in this process.
pub fn serve(args: ServeArgs) -> Result<()> {
    if args.decode_workers == 0 {
        bail!("--decode-workers must be at least 1");
    }
    runtime()?.block_on(async {
        let backbone = open_backbone(&args.log, false).await?;
        let (stop_sender, stop) = watch::channel(false);
        // One process: KV moves between its workers in memory.
        let transport = Arc::new(InProcessTransport::new(TransferTimeouts::default()));
        let receivers = if args.prefill_workers > 0 {
            KvReceivers::InProcess(transport.as_ref())
        } else {
            KvReceivers::None
        };
        let prefill_workers = start_prefill_workers(
            &args.model,
            args.prefill_workers,
            &backbone,
            Arc::clone(&transport),
            None,
        )
        .await?;
        let workers = start_decode_workers(
            &args.model,
            args.decode_workers,
            &backbone,
            receivers,
            &args.prefill_rule,
            None,
        )
        .await?;
        let scheduler =
            start_scheduler(&backbone, &args.log.data_dir, &args.scheduling, false).await?;
        let gateway = start_gateway(
            &args.model,
            &args.http,
            &backbone,
            Some(scheduler.api.clone()),
            stop.clone(),
        )
        .await?;
        // A log line, not a bare print, so that `--log-format json` output stays one JSON object per line.
        tracing::info!(
            "tandem serving {} on http://{}:{} ({} log)",
            args.model.served_model_name,
            args.http.host,
            args.http.port,
            if args.log.nats.is_some() {
                "JetStream"
            } else {
                "embedded"
            }
        );
        shutdown_signal().await;
        tracing::info!("shutting down: finishing requests in flight");
        // Order matters: the gateway stops taking requests and waits for its open ones, which the workers finish.
        let _ = stop_sender.send(true);
        gateway.await??;
        for worker in workers {
            worker.shutdown().await;
        }
        for worker in prefill_workers {
            worker.shutdown().await;
        }
        scheduler.finish().await?;
        drop(backbone);
        tracing::info!("stopped");
        Ok(())
    })
}

/// `tandem gateway`: the HTTP API alone, against JetStream.
pub fn gateway(args: GatewayArgs) -> Result<()> {
    runtime()?.block_on(async {
        let backbone = open_backbone(&args.log, true).await?;
        let (stop_sender, stop) = watch::channel(false);
        let gateway = start_gateway(&args.model, &args.http, &backbone, None, stop).await?;
        shutdown_signal().await;
        let _ = stop_sender.send(true);
        gateway.await??;
        Ok(())
    })
}

/// `tandem scheduler`: the scheduler alone (one replica), against JetStream, with its query API and probes on
/// `--http-port`.
pub fn scheduler(args: SchedulerArgs) -> Result<()> {
    runtime()?.block_on(async {
        let backbone = open_backbone(&args.log, true).await?;
        let scheduler =
            start_scheduler(&backbone, &args.log.data_dir, &args.scheduling, true).await?;
        let address = format!("{}:{}", args.http.http_host, args.http.http_port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| {
                format!("the scheduler API cannot listen on {address} (is the port taken? pass --http-port)")
            })?;
        tracing::info!(%address, "scheduler API listening (GET /requests, /workers, /audit, /health, /ready)");
        let (api_stop, mut api_stopped) = watch::channel(false);
        let routes = scheduler.api.clone().merge(crate::telemetry::metrics_router());
        let api = tokio::spawn(async move {
            axum::serve(listener, routes)
                .with_graceful_shutdown(async move {
                    let _ = api_stopped.wait_for(|stopped| *stopped).await;
                })
                .await
        });
        shutdown_signal().await;
        scheduler.finish().await?;
        let _ = api_stop.send(true);
        api.await??;
        Ok(())
    })
}

/// `tandem decode`: one decode worker, against JetStream.
pub fn decode(args: DecodeArgs) -> Result<()> {
    runtime()?.block_on(async {
        // Up before the engine loads, so liveness passes while a large model is read; ready once joined.
        let http =
            RoleHttpServer::start("decode", &args.http.http_host, args.http.http_port).await?;
        let backbone = open_backbone(&args.log, true).await?;
        let receivers = KvReceivers::Tcp {
            listen: &args.kv_listen,
        };
        let workers = start_decode_workers(
            &args.model,
            1,
            &backbone,
            receivers,
            &args.prefill_rule,
            args.worker_id.as_deref(),
        )
        .await?;
        http.mark_ready();
        shutdown_signal().await;
        http.mark_stopping();
        for worker in workers {
            worker.shutdown().await;
        }
        http.stop().await
    })
}

/// `tandem prefill`: one prefill worker, against JetStream, sending KV over TCP.
pub fn prefill(args: PrefillArgs) -> Result<()> {
    runtime()?.block_on(async {
        // Up before the engine loads, so liveness passes while a large model is read; ready once joined.
        let http =
            RoleHttpServer::start("prefill", &args.http.http_host, args.http.http_port).await?;
        let backbone = open_backbone(&args.log, true).await?;
        let transport = Arc::new(TcpTransport::new(TransferTimeouts::default()));
        let workers = start_prefill_workers(
            &args.model,
            1,
            &backbone,
            transport,
            args.worker_id.as_deref(),
        )
        .await?;
        http.mark_ready();
        shutdown_signal().await;
        http.mark_stopping();
        for worker in workers {
            worker.shutdown().await;
        }
        http.stop().await
    })
}
