//! The decode worker role: consumes the `Routed` events addressed to it, reads each request's `Received`, runs it
//! in the continuous batch (prefilling locally), streams tokens to the gateway over the token bus, and appends
//! `PrefillLocal`, `DecodeStarted`, `TokensDecoded` checkpoints and `Completed` (or `Failed`). It announces itself
//! with `WorkerJoined`, keeps a heartbeat in the workers bucket, and says `WorkerLeft` on shutdown.
//!
//! It publishes its prefix cache as `KvBlocksStored`/`KvBlocksRemoved` (id: the worker id, occurrences counting from
//! 1 in this process), so the scheduler can route to the worker holding a prompt's longest prefix. A `Routed` with
//! attempt > 1 is a migrated request: it resumes after the tokens its `Migrated` counts (read with the request's
//! checkpoints from the log). It stops a request on `Cancelled`, on a `Failed` it did not append (the scheduler's
//! timeout), and on a `Migrated` away from itself (declared lost while alive).
//!
//! A routing is acknowledged only when its request is over, so a worker that dies mid-request leaves it to be
//! delivered again; while a request runs longer than the ack wait, the worker keeps marking it in progress.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tandem_events::log::{ConsumerConfig, Delivery, EventLog, StartAt};
use tandem_events::schema::{Body, Failed, KvBlocksRemoved, KvBlocksStored};
use tandem_events::subjects::{SETTINGS_BUCKET, WORKER_HEARTBEAT_TTL, WORKERS_BUCKET};
use tandem_events::tokens::TokenBus;
use tandem_events::{Event, EventKind, prompts, subjects};
use tokenizers::Tokenizer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::engine::Engine;
use crate::kv_cache::KvCacheEvent;
use crate::roles::batcher::{BatchCommand, BatchOutput, BatcherConfig, Job, run_batcher};
use crate::roles::membership::{self, Joining};
use crate::roles::observe::DecodeMetrics;
use crate::roles::prefill_rule::{
    MAX_LOCAL_PREFILL_TOKENS_KEY, MAX_PREFILL_QUEUE_DEPTH_KEY, PrefillRule, SharedPrefillRule,
};
use crate::roles::{RoleError, prefill_queue_consumer};
use crate::transfer::{ExpectedTransfer, KvReceiver, RefusalCode, TransferError};

/// How a decode worker runs.
#[derive(Debug, Clone)]
pub struct DecodeWorkerConfig {
    pub worker_id: String,
    pub model_name: String,
    pub device: String,
    pub max_batch_sequences: usize,
    pub checkpoint_every_tokens: usize,
    pub prefill_chunk_tokens: usize,
    /// A routing not acknowledged (or marked in progress) within this is delivered again.
    pub ack_wait: Duration,
}

impl DecodeWorkerConfig {
    pub fn new(worker_id: impl Into<String>, model_name: impl Into<String>) -> DecodeWorkerConfig {
        DecodeWorkerConfig {
            worker_id: worker_id.into(),
            model_name: model_name.into(),
            device: "cpu".into(),
            max_batch_sequences: 64,
            checkpoint_every_tokens: 16,
            prefill_chunk_tokens: 256,
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// What a decode worker needs to send prompts to prefill workers: where they write the KV and when to ask them.
pub struct RemotePrefill {
    /// Listening already; its endpoint goes into each `PrefillQueued`.
    pub receiver: KvReceiver,
    pub rule: PrefillRule,
    /// [`crate::transfer::model_fingerprint`] of this worker's model; a prefill worker with another model is
    /// refused.
    pub model_fingerprint: u64,
    /// How long a queued prompt's KV may take to arrive before the request fails.
    pub kv_wait_timeout: Duration,
}

/// A running decode worker.
pub struct DecodeWorker {
    worker_id: String,
    stop_intake: watch::Sender<bool>,
    commands: std::sync::mpsc::Sender<BatchCommand>,
    engine_thread: Option<std::thread::JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    output_task: Option<JoinHandle<()>>,
    log: Arc<dyn EventLog>,
}

/// A worker's own consumers outlive it by this much on JetStream (a restarted process gets a new worker id).
const WORKER_CONSUMER_IDLE_REMOVAL: Duration = Duration::from_secs(3600);

/// Deliveries of requests running here, acknowledged when the request is over.
type InFlight = Arc<Mutex<HashMap<String, Arc<Delivery>>>>;

impl DecodeWorker {
    /// Registers the worker on the log and starts consuming its routings.
    pub async fn start(
        config: DecodeWorkerConfig,
        engine: Engine,
        tokenizer: Tokenizer,
        log: Arc<dyn EventLog>,
        tokens: Arc<dyn TokenBus>,
        mut remote_prefill: Option<RemotePrefill>,
    ) -> Result<DecodeWorker, RoleError> {
        subjects::check_token(&config.worker_id)
            .map_err(|error| RoleError::Config(error.to_string()))?;
        // A GPU engine offers its KV pool: a prefill worker on this host with a GPU engine then copies the
        // KV device to device (same GPU, peer GPU or CUDA IPC) instead of sending it through the host.
        if let Some(remote) = remote_prefill.as_mut() {
            match engine.device_kv_handle() {
                Ok(Some(handle)) => remote.receiver.offer_device_pool(&handle),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "no device KV handle; prefills arrive through the host")
                }
            }
        }
        let routed = log
            .consumer(ConsumerConfig {
                ack_wait: config.ack_wait,
                remove_after_idle: Some(WORKER_CONSUMER_IDLE_REMOVAL),
                ..ConsumerConfig::new(
                    config.worker_id.clone(),
                    vec![
                        subjects::routed_to(&config.worker_id)
                            .map_err(|e| RoleError::Config(e.to_string()))?,
                    ],
                )
            })
            .await?;
        // Only stops from now on matter to a worker that is just starting: it runs nothing older.
        let stops = log
            .consumer(ConsumerConfig {
                start_at: StartAt::TimeNs(tandem_events::event::now_ns()),
                remove_after_idle: Some(WORKER_CONSUMER_IDLE_REMOVAL),
                ..ConsumerConfig::new(
                    format!("{}-stops", config.worker_id),
                    [EventKind::Cancelled, EventKind::Migrated, EventKind::Failed]
                        .into_iter()
                        .map(subjects::kind_filter)
                        .collect(),
                )
            })
            .await?;
        let heartbeats = membership::join(
            log.as_ref(),
            Joining {
                worker_id: &config.worker_id,
                role: "decode",
                device: &config.device,
                model_name: &config.model_name,
                max_batch_sequences: config.max_batch_sequences,
            },
            &engine,
        )
        .await?;

        let (stop_intake, stop_receiver) = watch::channel(false);
        let prefill_queue_depth = Arc::new(AtomicU32::new(0));
        let prefill_rule = Arc::new(SharedPrefillRule::new(
            remote_prefill
                .as_ref()
                .map_or(PrefillRule::local_only(), |remote| remote.rule),
        ));
        let metrics = DecodeMetrics::new(&config.worker_id);
        let mut depth_task = None;
        if remote_prefill.is_some() {
            let prefill_queue = log.consumer(prefill_queue_consumer()).await?;
            let workers = log.kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL).await?;
            let settings = log.kv_bucket(SETTINGS_BUCKET, Duration::ZERO).await?;
            depth_task = Some(tokio::spawn(track_prefill_queue_depth(
                prefill_queue,
                workers,
                settings,
                Arc::clone(&prefill_queue_depth),
                Arc::clone(&prefill_rule),
                metrics.clone(),
                stop_receiver.clone(),
            )));
        }
        let batcher_config = BatcherConfig {
            prefill_rule: Arc::clone(&prefill_rule),
            kv_endpoint: remote_prefill
                .as_ref()
                .map(|remote| remote.receiver.endpoint().to_string()),
            model_fingerprint: remote_prefill
                .as_ref()
                .map_or(0, |remote| remote.model_fingerprint),
            prefill_queue_depth,
            worker_id: config.worker_id.clone(),
            max_batch_sequences: config.max_batch_sequences,
            checkpoint_every_tokens: config.checkpoint_every_tokens.max(1),
            prefill_chunk_tokens: config.prefill_chunk_tokens.max(1),
            max_model_len_tokens: engine.model_config().max_position_embeddings,
            metrics,
        };
        let (command_sender, command_receiver) = std::sync::mpsc::channel();
        let (output_sender, output_receiver) = tokio::sync::mpsc::unbounded_channel();
        let engine_thread = std::thread::Builder::new()
            .name(format!("engine-{}", config.worker_id))
            .spawn(move || {
                run_batcher(
                    engine,
                    tokenizer,
                    batcher_config,
                    command_receiver,
                    output_sender,
                )
            })
            .map_err(|error| {
                RoleError::Config(format!("cannot start the engine thread: {error}"))
            })?;

        let in_flight: InFlight = Arc::new(Mutex::new(HashMap::new()));
        let worker_id = config.worker_id.clone();
        let tasks: Vec<JoinHandle<()>> = vec![
            tokio::spawn(intake_routings(
                routed,
                Arc::clone(&log),
                command_sender.clone(),
                Arc::clone(&in_flight),
                worker_id.clone(),
                stop_receiver.clone(),
            )),
            tokio::spawn(intake_stops(
                stops,
                command_sender.clone(),
                worker_id.clone(),
                stop_receiver.clone(),
            )),
            tokio::spawn(keep_alive(
                heartbeats,
                worker_id.clone(),
                Arc::clone(&in_flight),
                config.ack_wait,
                stop_receiver,
            )),
        ];
        let kv_waits = remote_prefill.map(|remote| KvWaits {
            receiver: Arc::new(remote.receiver),
            timeout: remote.kv_wait_timeout,
            commands: command_sender.clone(),
        });
        let output_task = tokio::spawn(deliver_outputs(
            output_receiver,
            Arc::clone(&log),
            tokens,
            in_flight,
            kv_waits,
            worker_id.clone(),
        ));
        let mut tasks = tasks;
        tasks.extend(depth_task);
        tracing::info!(worker_id = %config.worker_id, "decode worker started");
        Ok(DecodeWorker {
            worker_id,
            stop_intake,
            commands: command_sender,
            engine_thread: Some(engine_thread),
            tasks,
            output_task: Some(output_task),
            log,
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Stops taking new routings, lets the requests already here finish, appends `WorkerLeft`.
    pub async fn shutdown(mut self) {
        let _ = self.stop_intake.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let _ = self.commands.send(BatchCommand::Drain);
        if let Some(thread) = self.engine_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some(output_task) = self.output_task.take() {
            let _ = output_task.await;
        }
        // The heartbeat went with the keep-alive task.
        membership::leave(self.log.as_ref(), None, &self.worker_id).await;
    }

    /// Stops at once, as a crash would: no more tokens or events, running requests dropped, their routings left
    /// unacknowledged, no `WorkerLeft`, the heartbeat left to expire. For fault drills and tests of recovery.
    pub async fn kill(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some(output_task) = self.output_task.take() {
            output_task.abort();
            let _ = output_task.await;
        }
        let _ = self.commands.send(BatchCommand::Halt);
        if let Some(thread) = self.engine_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Turns each `Routed` delivery into a job for the engine thread.
async fn intake_routings(
    routed: Box<dyn tandem_events::log::Consumer>,
    log: Arc<dyn EventLog>,
    commands: std::sync::mpsc::Sender<BatchCommand>,
    in_flight: InFlight,
    worker_id: String,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let deliveries = tokio::select! {
            fetched = routed.fetch(16, Duration::from_millis(500)) => fetched,
            _ = stop.changed() => break,
        };
        let deliveries = match deliveries {
            Ok(deliveries) => deliveries,
            Err(error) => {
                tracing::warn!(%error, "fetching routings failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        for delivery in deliveries {
            match job_for(&delivery, log.as_ref(), &worker_id).await {
                Ok(job) => {
                    // `Some(delivery)` back when a routing of this request is running here already.
                    let not_taken = {
                        let mut in_flight = in_flight
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        match in_flight.get(&job.request_id) {
                            Some(running) => Some((running.message.sequence, delivery)),
                            None => {
                                in_flight.insert(job.request_id.clone(), Arc::new(delivery));
                                None
                            }
                        }
                    };
                    match not_taken {
                        None => {
                            if commands.send(BatchCommand::Start(job)).is_err() {
                                return;
                            }
                        }
                        // A redelivery of a request still running here (a slow ack) must not run it twice.
                        Some((running, delivery)) if running == delivery.message.sequence => {}
                        // Routed back here after a migration while the attempt it superseded is still being
                        // stopped: take it again shortly, once that one is gone.
                        Some((_, delivery)) => {
                            if let Err(error) = delivery.nak(Some(Duration::from_secs(1))).await {
                                tracing::warn!(%error, "could not put back a routing");
                            }
                        }
                    }
                }
                Err(problem) if problem.is_transient() => {
                    // The log could not be read (nats-server restarting): the routing is fine, try it again.
                    tracing::warn!(%problem, sequence = delivery.message.sequence, "routing put back until the log can be read");
                    if let Err(error) = delivery.nak(Some(Duration::from_millis(500))).await {
                        tracing::warn!(%error, "could not put back a routing");
                    }
                }
                Err(problem) => {
                    tracing::warn!(%problem, sequence = delivery.message.sequence, "routing cannot be served");
                    if let Some(request_id) = problem.request_id() {
                        let failed = Event::new(
                            request_id,
                            worker_id.clone(),
                            Body::Failed(Failed {
                                reason: "bad_routing".into(),
                                message: problem.to_string(),
                                worker_id: worker_id.clone(),
                            }),
                        );
                        if let Err(error) = log.append_event(&failed, 1).await {
                            tracing::warn!(%error, "could not append Failed");
                        }
                    }
                    if let Err(error) = delivery.term().await {
                        tracing::warn!(%error, "could not terminate a bad routing");
                    }
                }
            }
        }
    }
}

/// Why a routing delivery cannot become a job.
#[derive(Debug, thiserror::Error)]
enum RoutingProblem {
    #[error("malformed Routed event: {0}")]
    Malformed(String),
    #[error("event on the routing subject is a {0}, not Routed")]
    NotRouted(EventKind),
    #[error("request {request_id}: its Received event was not found on the log")]
    ReceivedMissing { request_id: String },
    #[error("request {request_id}: reading its Received failed: {reason}")]
    ReadFailed { request_id: String, reason: String },
    #[error("request {request_id}: reading its Migrated and checkpoints failed: {reason}")]
    ResumeReadFailed { request_id: String, reason: String },
    #[error("request {request_id}: its prompt is not available: {reason}")]
    PromptUnavailable { request_id: String, reason: String },
}

impl RoutingProblem {
    /// A failed read of the log, which a retry may get past; the others will never change.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            RoutingProblem::ReadFailed { .. } | RoutingProblem::ResumeReadFailed { .. }
        )
    }

    fn request_id(&self) -> Option<String> {
        match self {
            RoutingProblem::ReceivedMissing { request_id }
            | RoutingProblem::ReadFailed { request_id, .. }
            | RoutingProblem::ResumeReadFailed { request_id, .. }
            | RoutingProblem::PromptUnavailable { request_id, .. } => Some(request_id.clone()),
            RoutingProblem::Malformed(_) | RoutingProblem::NotRouted(_) => None,
        }
    }
}

async fn job_for(
    delivery: &Delivery,
    log: &dyn EventLog,
    worker_id: &str,
) -> Result<Job, RoutingProblem> {
    let event = delivery
        .message
        .event()
        .map_err(|error| RoutingProblem::Malformed(error.to_string()))?;
    let Body::Routed(routed) = event.body() else {
        return Err(RoutingProblem::NotRouted(event.kind()));
    };
    let request_id = event.id().to_string();
    let received_subject = subjects::event_subject(EventKind::Received, &request_id)
        .map_err(|error| RoutingProblem::Malformed(error.to_string()))?;
    let read_failed = |error: tandem_events::log::LogError| RoutingProblem::ReadFailed {
        request_id: request_id.clone(),
        reason: error.to_string(),
    };
    // The scheduler records where the Received is; without that, search the request's subject.
    let start = if routed.received_sequence > 0 {
        StartAt::Sequence(routed.received_sequence)
    } else {
        StartAt::Beginning
    };
    let found = log
        .read(start, std::slice::from_ref(&received_subject), 1)
        .await
        .map_err(read_failed)?;
    let received = found
        .first()
        .and_then(|message| message.event().ok())
        .filter(|received| received.id() == request_id)
        .and_then(|received| match received.body() {
            Body::Received(body) => Some(body.clone()),
            _ => None,
        })
        .ok_or_else(|| RoutingProblem::ReceivedMissing {
            request_id: request_id.clone(),
        })?;
    let routed_attempt = routed.attempt.max(1);
    let resumed = if routed_attempt > 1 {
        resume_point(log, &request_id, start, delivery.message.sequence)
            .await
            .map_err(|error| RoutingProblem::ResumeReadFailed {
                request_id: request_id.clone(),
                reason: error.to_string(),
            })?
    } else {
        ResumePoint::default()
    };
    let prompt_redacted = prompts::prompt_is_redacted(&received);
    let prompt_token_ids = if prompt_redacted {
        stored_prompt(log, &request_id, received.prompt_tokens).await?
    } else {
        received.prompt_token_ids
    };
    // No parent where it is made: the routing's trace is its parent.
    let span = tracing::info_span!(
        parent: None,
        "decode.request",
        request_id = %request_id,
        decode_worker_id = worker_id,
        attempt = routed_attempt,
        prompt_tokens = prompt_token_ids.len(),
        resumed_tokens = resumed.token_ids.len(),
        cached_tokens = tracing::field::Empty,
        prefill = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
    );
    tandem_events::trace::continue_trace(&span, event.trace());
    Ok(Job {
        span,
        request_id,
        prompt_token_ids,
        prompt_redacted,
        sampling: received.sampling.unwrap_or_default(),
        routed_attempt,
        routed_sequence: delivery.message.sequence,
        resumed_token_ids: resumed.token_ids,
        resumed_logprobs: resumed.logprobs,
    })
}

/// The prompt of a request whose `Received` leaves it off the log (`--log-prompts hash|none`), from the prompt
/// store, where its gateway keeps it while the request runs.
async fn stored_prompt(
    log: &dyn EventLog,
    request_id: &str,
    prompt_tokens: u32,
) -> Result<Vec<u32>, RoutingProblem> {
    let read_failed = |error: tandem_events::log::LogError| RoutingProblem::ReadFailed {
        request_id: request_id.to_string(),
        reason: format!(
            "reading its prompt from the {} bucket: {error}",
            prompts::PROMPT_BUCKET
        ),
    };
    let bucket = log
        .kv_bucket(prompts::PROMPT_BUCKET, prompts::PROMPT_TTL)
        .await
        .map_err(read_failed)?;
    let stored = bucket.get(request_id).await.map_err(read_failed)?;
    let unavailable = |reason: String| RoutingProblem::PromptUnavailable {
        request_id: request_id.to_string(),
        reason,
    };
    let stored = stored.ok_or_else(|| {
        unavailable(format!(
            "the log is redacted (--log-prompts hash|none) and the {} bucket no longer holds the prompt (the request ended at its gateway, or the entry expired)",
            prompts::PROMPT_BUCKET
        ))
    })?;
    prompts::decode_prompt(&stored, prompt_tokens).map_err(|error| unavailable(error.to_string()))
}

/// The generated tokens a migrated request continues after.
#[derive(Debug, Default, PartialEq)]
struct ResumePoint {
    /// Tokens `[0, Migrated.tokens_generated)`.
    token_ids: Vec<u32>,
    /// Their logprobs, when every checkpoint carried them; else empty.
    logprobs: Vec<f32>,
}

/// Reads the request's `Migrated` and `TokensDecoded` events logged before its `Routed` (at `routed_sequence`) and
/// takes the generated tokens `[0, tokens_generated)` of the last `Migrated` ([`tokens_to_resume`]). Without a
/// `Migrated`, or with fewer checkpointed tokens than it counts, the request resumes from what is there: the gateway
/// drops indices it already sent, and the lifecycle audit reports the gap.
async fn resume_point(
    log: &dyn EventLog,
    request_id: &str,
    start: StartAt,
    routed_sequence: u64,
) -> Result<ResumePoint, tandem_events::log::LogError> {
    let subject = |kind| {
        subjects::event_subject(kind, request_id).map_err(|error| {
            tandem_events::log::LogError::Invalid {
                what: "request id",
                reason: error.to_string(),
            }
        })
    };
    let filters = vec![
        subject(EventKind::Migrated)?,
        subject(EventKind::TokensDecoded)?,
    ];
    let mut messages = Vec::new();
    let mut from = start;
    // Read in pages up to the routing: a long request has many checkpoints.
    loop {
        let page = log.read(from, &filters, 1024).await?;
        let Some(last) = page.last().map(|message| message.sequence) else {
            break;
        };
        let full_page = page.len() == 1024;
        messages.extend(
            page.into_iter()
                .filter(|message| message.sequence < routed_sequence),
        );
        if !full_page || last >= routed_sequence {
            break;
        }
        from = StartAt::Sequence(last + 1);
    }
    let bodies: Vec<Body> = messages
        .iter()
        .filter_map(|message| message.event().ok())
        .filter(|event| event.id() == request_id)
        .map(|event| event.body().clone())
        .collect();
    let Some((resumed, tokens_generated)) = tokens_to_resume(&bodies) else {
        tracing::warn!(%request_id, "a migrated routing without its Migrated on the log; starting over");
        return Ok(ResumePoint::default());
    };
    if resumed.token_ids.len() < tokens_generated {
        tracing::warn!(
            %request_id,
            tokens_generated,
            found = resumed.token_ids.len(),
            "fewer checkpointed tokens than the migration counts; resuming after those found"
        );
    }
    Ok(resumed)
}

/// The tokens a migrated request resumes after, from its `Migrated` and `TokensDecoded` events in log order up to
/// its `Routed`, with the last `Migrated`'s `tokens_generated`; `None` without a `Migrated`. As the lifecycle
/// does: attempt k ran on the worker the k-th `Migrated` took it from, so between two migrations only that
/// worker's checkpoints count (a superseded worker still running may log late ones), each `Migrated` cuts the
/// tokens back to what it counts, and a checkpoint must continue the tokens so far (overlap skipped).
fn tokens_to_resume(bodies: &[Body]) -> Option<(ResumePoint, usize)> {
    let migrations: Vec<&tandem_events::schema::Migrated> = bodies
        .iter()
        .filter_map(|body| match body {
            Body::Migrated(migrated) => Some(migrated),
            _ => None,
        })
        .collect();
    let last = migrations.last()?;
    let mut resumed = ResumePoint::default();
    let mut logprobs_complete = true;
    let mut attempt = 0;
    for body in bodies {
        match body {
            Body::Migrated(migrated) => {
                resumed
                    .token_ids
                    .truncate(migrated.tokens_generated as usize);
                resumed
                    .logprobs
                    .truncate(migrated.tokens_generated as usize);
                attempt += 1;
            }
            Body::TokensDecoded(checkpoint) => {
                let Some(attempt_worker) = migrations.get(attempt) else {
                    // After the last migration: the next attempt has not started (late work).
                    continue;
                };
                if checkpoint.decode_worker_id != attempt_worker.from_worker_id {
                    continue;
                }
                let start_index = checkpoint.start_index as usize;
                let have = resumed.token_ids.len();
                if start_index > have {
                    continue;
                }
                let skip = have - start_index;
                if skip >= checkpoint.token_ids.len() {
                    continue;
                }
                resumed
                    .token_ids
                    .extend_from_slice(&checkpoint.token_ids[skip..]);
                if checkpoint.logprobs.len() == checkpoint.token_ids.len() {
                    resumed
                        .logprobs
                        .extend_from_slice(&checkpoint.logprobs[skip..]);
                } else {
                    logprobs_complete = false;
                }
            }
            _ => {}
        }
    }
    let tokens_generated = last.tokens_generated as usize;
    if !logprobs_complete || resumed.logprobs.len() != resumed.token_ids.len() {
        resumed.logprobs.clear();
    }
    Some((resumed, tokens_generated))
}

/// Stops requests that someone else ended or took away: `Cancelled` (the client went away), a `Failed` this worker
/// did not append (the scheduler's timeout), a `Migrated` away from this worker (it was declared lost but is alive).
async fn intake_stops(
    stops: Box<dyn tandem_events::log::Consumer>,
    commands: std::sync::mpsc::Sender<BatchCommand>,
    worker_id: String,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let deliveries = tokio::select! {
            fetched = stops.fetch(64, Duration::from_millis(500)) => fetched,
            _ = stop.changed() => break,
        };
        match deliveries {
            Ok(deliveries) => {
                for delivery in deliveries {
                    if let Ok(event) = delivery.message.event()
                        && let Some(command) =
                            stop_command(&event, delivery.message.sequence, &worker_id)
                        && commands.send(command).is_err()
                    {
                        return;
                    }
                    if let Err(error) = delivery.ack().await {
                        tracing::warn!(%error, "could not ack a stop event");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "fetching stop events failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// What a `Cancelled`, `Failed` or `Migrated` (at log sequence `sequence`) means for this worker's requests.
fn stop_command(event: &Event, sequence: u64, worker_id: &str) -> Option<BatchCommand> {
    let request_id = event.id().to_string();
    match event.body() {
        Body::Cancelled(_) => Some(BatchCommand::Cancel { request_id }),
        // Its own `Failed` was appended after it dropped the request already.
        Body::Failed(_) if event.envelope().emitter != worker_id => {
            Some(BatchCommand::Cancel { request_id })
        }
        Body::Migrated(migrated) if migrated.from_worker_id == worker_id => {
            Some(BatchCommand::Supersede {
                request_id,
                before_sequence: sequence,
            })
        }
        _ => None,
    }
}

/// Heartbeats in the workers bucket, and in-progress marks for requests running longer than the ack wait.
async fn keep_alive(
    heartbeats: Box<dyn tandem_events::log::KvBucket>,
    worker_id: String,
    in_flight: InFlight,
    ack_wait: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let beat = WORKER_HEARTBEAT_TTL / 4;
    let progress_every = ack_wait / 3;
    let mut since_progress = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(beat) => {}
            _ = stop.changed() => break,
        }
        if let Err(error) = heartbeats
            .put(&worker_id, Bytes::from_static(b"decode"))
            .await
        {
            tracing::warn!(%error, "heartbeat failed");
        }
        since_progress += beat;
        if since_progress >= progress_every {
            since_progress = Duration::ZERO;
            let running: Vec<(String, Arc<Delivery>)> = in_flight
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .iter()
                .map(|(request_id, delivery)| (request_id.clone(), Arc::clone(delivery)))
                .collect();
            for (request_id, delivery) in running {
                if let Err(error) = delivery.in_progress().await {
                    tracing::warn!(%error, %request_id, "could not mark a routing in progress");
                }
            }
        }
    }
    if let Err(error) = heartbeats.delete(&worker_id).await {
        tracing::warn!(%error, "could not remove the heartbeat");
    }
}

/// Waits for announced KV transfers and tells the engine thread how each ended.
struct KvWaits {
    receiver: Arc<KvReceiver>,
    timeout: Duration,
    commands: std::sync::mpsc::Sender<BatchCommand>,
}

impl KvWaits {
    /// Awaits the transfer for `expected`. A transfer that breaks off (its prefill worker died or sent garbage) is
    /// awaited again until the deadline, since the prefill queue redelivers the job to another worker.
    fn start(&self, expected: ExpectedTransfer) {
        let receiver = Arc::clone(&self.receiver);
        let commands = self.commands.clone();
        let deadline = tokio::time::Instant::now() + self.timeout;
        tokio::spawn(async move {
            let request_id = expected.request_id.clone();
            let command = loop {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                let outcome = match receiver.expect(expected.clone(), remaining) {
                    Ok(pending) => pending.wait().await,
                    Err(error) => Err(error),
                };
                match outcome {
                    Ok(received) => {
                        break BatchCommand::KvArrived {
                            request_id,
                            received,
                        };
                    }
                    Err(error) if broke_off(&error) && tokio::time::Instant::now() < deadline => {
                        tracing::warn!(%error, %request_id, "KV transfer broke off; waiting for a retry");
                    }
                    Err(error) => {
                        break BatchCommand::KvFailed {
                            request_id,
                            reason: error.to_string(),
                        };
                    }
                }
            };
            let _ = commands.send(command);
        });
    }
}

/// A transfer that failed on the way (broken off, corrupt, stalled) rather than refused for a mismatch: another
/// try may succeed while the deadline lasts.
fn broke_off(error: &TransferError) -> bool {
    matches!(
        error.refusal_code(),
        RefusalCode::Malformed | RefusalCode::Checksum | RefusalCode::Timeout
    )
}

/// Keeps the prefill queue's depth and the rule's settings fresh for the prefill rule. With no prefill worker alive the queue counts as
/// full, so prompts are prefilled here rather than wait for a worker that is not there.
async fn track_prefill_queue_depth(
    prefill_queue: Box<dyn tandem_events::log::Consumer>,
    workers: Box<dyn tandem_events::log::KvBucket>,
    settings: Box<dyn tandem_events::log::KvBucket>,
    depth: Arc<AtomicU32>,
    rule: Arc<SharedPrefillRule>,
    metrics: DecodeMetrics,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        // The rule's knobs can be changed while running, in the settings bucket (e.g. with the nats CLI).
        for key in [MAX_LOCAL_PREFILL_TOKENS_KEY, MAX_PREFILL_QUEUE_DEPTH_KEY] {
            if let Ok(Some(value)) = settings.get(key).await
                && !rule.apply_setting(key, &value)
            {
                tracing::warn!(key, "ignoring a setting that is not a number");
            }
        }
        let mut prefill_alive = false;
        for worker_id in workers.keys().await.unwrap_or_default() {
            if workers.get(&worker_id).await.ok().flatten().as_deref() == Some(b"prefill") {
                prefill_alive = true;
                break;
            }
        }
        match prefill_queue.pending().await {
            Ok(pending) if !prefill_alive => {
                metrics.prefill_queue_depth(pending);
                depth.store(u32::MAX, Ordering::Relaxed)
            }
            Ok(pending) => {
                metrics.prefill_queue_depth(pending);
                depth.store(
                    u32::try_from(pending).unwrap_or(u32::MAX),
                    Ordering::Relaxed,
                )
            }
            Err(error) => tracing::debug!(%error, "prefill queue depth unknown"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Streams tokens at once; appends events in order, batched (one group commit for everything queued); acks a
/// request's routing after the events before its end are on the log.
async fn deliver_outputs(
    mut outputs: tokio::sync::mpsc::UnboundedReceiver<BatchOutput>,
    log: Arc<dyn EventLog>,
    tokens: Arc<dyn TokenBus>,
    in_flight: InFlight,
    kv_waits: Option<KvWaits>,
    worker_id: String,
) {
    // Occurrences of this process's KV events; a restarted worker has a new id, so they never repeat.
    let mut kv_event_occurrence = 0u32;
    let mut queued = Vec::new();
    while outputs.recv_many(&mut queued, 512).await > 0 {
        let mut events = Vec::new();
        let mut finished = Vec::new();
        for output in queued.drain(..) {
            match output {
                BatchOutput::Tokens { request_id, update } => {
                    if let Err(error) = tokens.publish(&request_id, update).await {
                        tracing::warn!(%error, %request_id, "token update not delivered");
                    }
                }
                BatchOutput::Event { event, occurrence } => {
                    match tandem_events::log::OutgoingMessage::from_event(&event, occurrence) {
                        Ok(message) => events.push(message),
                        Err(error) => tracing::warn!(%error, "event not appendable"),
                    }
                }
                BatchOutput::Finished { request_id } => finished.push(request_id),
                // Registered before the `PrefillQueued` below is appended, so the prefill worker always finds it.
                BatchOutput::AwaitKv { expected } => match &kv_waits {
                    Some(kv_waits) => kv_waits.start(expected),
                    None => tracing::error!("a remote prefill without a KV receiver"),
                },
                BatchOutput::KvCache { changes } => {
                    for change in changes {
                        kv_event_occurrence += 1;
                        let event =
                            Event::new(&worker_id, worker_id.clone(), kv_cache_body(change));
                        match tandem_events::log::OutgoingMessage::from_event(
                            &event,
                            kv_event_occurrence,
                        ) {
                            Ok(message) => events.push(message),
                            Err(error) => tracing::warn!(%error, "KV event not appendable"),
                        }
                    }
                }
            }
        }
        if !events.is_empty()
            && let Err(error) = log.append_batch(events).await
        {
            tracing::error!(%error, "appending events failed");
        }
        for request_id in finished {
            let delivery = in_flight
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&request_id);
            if let Some(delivery) = delivery
                && let Err(error) = delivery.ack().await
            {
                tracing::warn!(%error, %request_id, "could not ack a routing");
            }
        }
    }
}

/// The log's form of a prefix-cache change: `parent_hash` 0 when the stored blocks start a sequence.
fn kv_cache_body(change: KvCacheEvent) -> Body {
    match change {
        KvCacheEvent::Stored {
            parent_hash,
            block_hashes,
        } => Body::KvBlocksStored(KvBlocksStored {
            block_hashes,
            parent_hash: parent_hash.unwrap_or(0),
        }),
        KvCacheEvent::Removed { block_hashes } => {
            Body::KvBlocksRemoved(KvBlocksRemoved { block_hashes })
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem_events::schema::{Migrated, TokensDecoded};

    use super::*;

    fn checkpoint(worker: &str, start_index: u32, token_ids: &[u32]) -> Body {
        Body::TokensDecoded(TokensDecoded {
            decode_worker_id: worker.into(),
            start_index,
            token_ids: token_ids.to_vec(),
            logprobs: token_ids.iter().map(|&t| -(t as f32)).collect(),
            text: None,
        })
    }

    fn migrated(from: &str, tokens_generated: u32) -> Body {
        Body::Migrated(Migrated {
            from_worker_id: from.into(),
            reason: "heartbeat_lost".into(),
            tokens_generated,
        })
    }

    #[test]
    fn resumes_after_the_tokens_the_migration_counts_ignoring_repeats_and_late_work() {
        let bodies = [
            checkpoint("a", 0, &[1, 2, 3, 4]),
            checkpoint("a", 0, &[1, 2, 3, 4]),
            checkpoint("a", 4, &[5, 6, 7, 8]),
            // The migration counts 6 of the 8 (say the scheduler saw fewer): cut back to them.
            migrated("a", 6),
            // decode-a was alive: its late checkpoint is not the new attempt's.
            checkpoint("a", 8, &[90, 91]),
        ];
        let (resumed, tokens_generated) = tokens_to_resume(&bodies).unwrap();
        assert_eq!(tokens_generated, 6);
        assert_eq!(resumed.token_ids, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(resumed.logprobs, vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
        assert!(tokens_to_resume(&bodies[..3]).is_none(), "no Migrated");
    }

    #[test]
    fn a_second_migration_takes_the_second_attempts_tokens_not_the_first_ones_late_ones() {
        let bodies = [
            checkpoint("a", 0, &[1, 2]),
            migrated("a", 2),
            // Late work of decode-a (attempt 1), then decode-b's own (attempt 2) for the same indices.
            checkpoint("a", 2, &[70, 71]),
            checkpoint("b", 2, &[3, 4]),
            checkpoint("b", 4, &[5]),
            migrated("b", 5),
        ];
        let (resumed, tokens_generated) = tokens_to_resume(&bodies).unwrap();
        assert_eq!(tokens_generated, 5);
        assert_eq!(resumed.token_ids, vec![1, 2, 3, 4, 5]);
        // A checkpoint without logprobs drops them all rather than misalign them.
        let mut no_logprobs = bodies.to_vec();
        no_logprobs[3] = Body::TokensDecoded(TokensDecoded {
            decode_worker_id: "b".into(),
            start_index: 2,
            token_ids: vec![3, 4],
            logprobs: Vec::new(),
            text: None,
        });
        let (resumed, _) = tokens_to_resume(&no_logprobs).unwrap();
        assert_eq!(resumed.token_ids, vec![1, 2, 3, 4, 5]);
        assert!(resumed.logprobs.is_empty());
    }
}
