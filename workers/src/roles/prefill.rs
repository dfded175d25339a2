//! The prefill worker role: pulls `PrefillQueued` jobs from the shared prefill queue (one job to one worker),
//! computes the prompt (its own prefix cache helps), samples the first token with the request's sampler, pushes the
//! KV into the decode worker's reserved blocks through a [`KvTransport`], and appends `PrefillStarted`,
//! `PrefillDone` and `KvTransferred`. Stateless: a job is acknowledged only once its KV is delivered, and marked in
//! progress while it computes, so a worker that dies mid-job leaves it to another.
//!
//! The prompt is computed whole before its layers are sent: the CPU backend runs all layers of a chunk in one call,
//! so streaming layers while later ones compute waits for a per-layer forward.
//!
//! When the decode worker offers its GPU's KV pool in its endpoint and this worker's engine is on a GPU of the
//! same host, the KV is not exported: once the decode worker accepts the header, the engine thread copies the
//! blocks device to device (`Engine::push_kv_to_device`), then empty layer frames confirm it
//! (`KvDtype::DevicePush`, `KV_TRANSFER.md`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tandem_events::Event;
use tandem_events::log::{Delivery, EventLog, OutgoingMessage};
use tandem_events::schema::{Body, PrefillDone, PrefillQueued, PrefillStarted};
use tandem_events::subjects::WORKER_HEARTBEAT_TTL;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::engine::{Engine, SequenceId};
use crate::error::EngineError;
use crate::roles::membership::{self, Joining};
use crate::roles::observe::PrefillMetrics;
use crate::roles::{RoleError, engine_sampling, prefill_queue_consumer};
use crate::sampling::{SampledToken, Sampler};
use crate::transfer::engine_io::export_layer;
use crate::transfer::{KvDtype, KvTransport, OutgoingTransfer, TransferHeader, split_device_pool};

/// How a prefill worker runs.
#[derive(Debug, Clone)]
pub struct PrefillWorkerConfig {
    pub worker_id: String,
    pub model_name: String,
    pub device: String,
    /// [`crate::transfer::model_fingerprint`] of this worker's model.
    pub model_fingerprint: u64,
}

/// A running prefill worker.
pub struct PrefillWorker {
    worker_id: String,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// The computed prompt, ready to send.
struct Computed {
    header: TransferHeader,
    layers: Vec<Bytes>,
    first_token_id: u32,
    first_token_logprob: Option<f32>,
    cached_tokens: u32,
    compute_ns: u64,
    /// Set when the KV goes device to device: the engine thread still holds the sequence (until
    /// [`EngineJob::Release`]) and this names the destination pool.
    device_push: Option<DevicePush>,
}

struct DevicePush {
    sequence_id: SequenceId,
    pool: String,
}

/// Work for the engine thread.
enum EngineJob {
    Compute(Box<ComputeJob>),
    /// Copies the held sequence's KV into the destination pool's blocks named in the header.
    Push {
        sequence_id: SequenceId,
        pool: String,
        from_token: usize,
        block_ids: Vec<u32>,
        reply: oneshot::Sender<Result<(u64, &'static str), String>>,
    },
    /// Frees a sequence held for a device push.
    Release(SequenceId),
}

/// Releases a sequence held for a device push when the send ends, whichever way.
struct HeldSequence<'a> {
    compute: &'a std::sync::mpsc::Sender<EngineJob>,
    sequence_id: SequenceId,
}

impl Drop for HeldSequence<'_> {
    fn drop(&mut self) {
        let _ = self.compute.send(EngineJob::Release(self.sequence_id));
    }
}

struct ComputeJob {
    request_id: String,
    job: PrefillQueued,
    trace_context: String,
    reply: oneshot::Sender<Result<Computed, String>>,
}

impl PrefillWorker {
    pub async fn start<T: KvTransport + 'static>(
        config: PrefillWorkerConfig,
        engine: Engine,
        log: Arc<dyn EventLog>,
        transport: Arc<T>,
    ) -> Result<PrefillWorker, RoleError> {
        tandem_events::subjects::check_token(&config.worker_id)
            .map_err(|error| RoleError::Config(error.to_string()))?;
        let queue = log.consumer(prefill_queue_consumer()).await?;
        let heartbeats = membership::join(
            log.as_ref(),
            Joining {
                worker_id: &config.worker_id,
                role: "prefill",
                device: &config.device,
                model_name: &config.model_name,
                max_batch_sequences: 1,
            },
            &engine,
        )
        .await?;

        let (compute_sender, compute_receiver) = std::sync::mpsc::channel::<EngineJob>();
        let fingerprint = config.model_fingerprint;
        std::thread::Builder::new()
            .name(format!("engine-{}", config.worker_id))
            .spawn(move || run_compute(engine, fingerprint, compute_receiver))
            .map_err(|error| {
                RoleError::Config(format!("cannot start the engine thread: {error}"))
            })?;

        let (stop, stop_receiver) = watch::channel(false);
        let worker = Worker {
            config: config.clone(),
            log: Arc::clone(&log),
            transport,
            compute: compute_sender,
            metrics: PrefillMetrics::new(&config.worker_id),
        };
        let task = tokio::spawn(async move {
            let mut stop_receiver = stop_receiver;
            let mut since_beat = Duration::ZERO;
            while !*stop_receiver.borrow() {
                let fetched = tokio::select! {
                    fetched = queue.fetch(1, Duration::from_millis(500)) => fetched,
                    _ = stop_receiver.changed() => break,
                };
                match fetched {
                    Ok(deliveries) => {
                        for delivery in deliveries {
                            worker.handle(delivery).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "fetching prefill jobs failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                since_beat += Duration::from_millis(500);
                if since_beat >= WORKER_HEARTBEAT_TTL / 4 {
                    since_beat = Duration::ZERO;
                    membership::beat(heartbeats.as_ref(), &worker.config.worker_id, "prefill")
                        .await;
                }
            }
            membership::leave(
                worker.log.as_ref(),
                Some(heartbeats.as_ref()),
                &worker.config.worker_id,
            )
            .await;
        });
        tracing::info!(worker_id = %config.worker_id, "prefill worker started");
        Ok(PrefillWorker {
            worker_id: config.worker_id,
            stop,
            task: Some(task),
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Finishes the job in hand, then stops and appends `WorkerLeft`.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

struct Worker<T> {
    config: PrefillWorkerConfig,
    log: Arc<dyn EventLog>,
    transport: Arc<T>,
    compute: std::sync::mpsc::Sender<EngineJob>,
    metrics: PrefillMetrics,
}

impl<T: KvTransport> Worker<T> {
    async fn handle(&self, delivery: Delivery) {
        let event = match delivery.message.event() {
            Ok(event) => event,
            Err(error) => {
                tracing::error!(%error, sequence = delivery.message.sequence, "malformed prefill job");
                let _ = delivery.term().await;
                return;
            }
        };
        let Body::PrefillQueued(job) = event.body().clone() else {
            tracing::error!(kind = %event.kind(), "not a prefill job on the prefill queue");
            let _ = delivery.term().await;
            return;
        };
        let request_id = event.id().to_string();
        let span = self.job_span(&event, &job, delivery.delivery_attempt);
        let started = Event::new(
            &request_id,
            self.config.worker_id.clone(),
            Body::PrefillStarted(PrefillStarted {
                prefill_worker_id: self.config.worker_id.clone(),
                delivery_attempt: delivery.delivery_attempt,
            }),
        )
        .with_trace_from(&event)
        .with_trace_of(&span);
        let occurrences = JobOccurrences::of(delivery.message.sequence);
        if let Err(error) = self
            .log
            .append_event(&started, occurrences.started(delivery.delivery_attempt))
            .await
        {
            tracing::warn!(%error, %request_id, "could not append PrefillStarted; the job goes back");
            let _ = delivery.nak(Some(Duration::from_millis(500))).await;
            return;
        }
        let delivery = Arc::new(delivery);
        let keep_alive = tokio::spawn(mark_in_progress(Arc::clone(&delivery)));
        let outcome = self
            .compute_and_send(&request_id, job, &event, occurrences, &span)
            .instrument(span.clone())
            .await;
        keep_alive.abort();
        match outcome {
            Ok(messages) => {
                if let Err(error) = self.log.append_batch(messages).await {
                    tracing::error!(%error, %request_id, "could not record the prefill");
                }
                if let Err(error) = delivery.ack().await {
                    tracing::warn!(%error, %request_id, "could not ack the prefill job");
                }
            }
            Err(JobFailure::Retry(reason)) => {
                tracing::warn!(%request_id, %reason, "prefill job failed; it goes back to the queue");
                let _ = delivery.nak(Some(Duration::from_millis(500))).await;
            }
            Err(JobFailure::GiveUp(reason)) => {
                // The decode worker waits for this KV with a deadline and fails the request when it passes.
                tracing::error!(%request_id, %reason, "prefill job cannot be done");
                let _ = delivery.term().await;
            }
        }
    }

    /// Records the job's wait on the prefill queue (from its `PrefillQueued` to now) as a span and a metric, and
    /// makes the `prefill.job` span, a child of the decode worker's span that `PrefillQueued` carries.
    fn job_span(&self, event: &Event, job: &PrefillQueued, delivery_attempt: u32) -> tracing::Span {
        use opentelemetry::KeyValue;
        let queued_at = tandem_events::trace::system_time_of(event.timestamp_ns());
        let now = SystemTime::now();
        self.metrics
            .queue_wait(now.duration_since(queued_at).unwrap_or_default());
        tandem_events::trace::record_finished_span(
            "prefill.queue_wait",
            event.trace(),
            // Another host's clock may run ahead of this one: a span never ends before it starts.
            queued_at.min(now),
            now,
            vec![
                KeyValue::new("request_id", event.id().to_string()),
                KeyValue::new("prefill_worker_id", self.config.worker_id.clone()),
                KeyValue::new("delivery_attempt", i64::from(delivery_attempt)),
            ],
        );
        let span = tracing::info_span!(
            parent: None,
            "prefill.job",
            request_id = %event.id(),
            prefill_worker_id = %self.config.worker_id,
            decode_worker_id = %job.decode_worker_id,
            delivery_attempt,
            prompt_tokens = job.prompt_token_ids.len(),
        );
        tandem_events::trace::continue_trace(&span, event.trace());
        span
    }

    async fn compute_and_send(
        &self,
        request_id: &str,
        job: PrefillQueued,
        event: &Event,
        occurrences: JobOccurrences,
        span: &tracing::Span,
    ) -> Result<Vec<OutgoingMessage>, JobFailure> {
        let Some(destination) = job.kv_destination.clone() else {
            return Err(JobFailure::GiveUp("the job has no KV destination".into()));
        };
        let prompt_tokens = job.prompt_token_ids.len();
        let trace_context = tandem_events::trace::context_of(span)
            .map(|context| context.traceparent)
            .unwrap_or_default();
        let compute_span = tracing::info_span!(
            parent: span,
            "prefill.compute",
            request_id,
            prompt_tokens,
            cached_tokens = tracing::field::Empty,
        );
        let (reply, answer) = oneshot::channel();
        self.compute
            .send(EngineJob::Compute(Box::new(ComputeJob {
                request_id: request_id.to_string(),
                job,
                trace_context,
                reply,
            })))
            .map_err(|_| JobFailure::Retry("the engine thread is gone".into()))?;
        let mut computed = answer
            .instrument(compute_span.clone())
            .await
            .map_err(|_| JobFailure::Retry("the engine thread is gone".into()))?
            .map_err(JobFailure::GiveUp)?;
        compute_span.record("cached_tokens", computed.cached_tokens);
        drop(compute_span);
        self.metrics.computed(
            prompt_tokens.saturating_sub(computed.cached_tokens as usize) as u64,
            Duration::from_nanos(computed.compute_ns),
        );

        let held = computed.device_push.as_ref().map(|push| HeldSequence {
            compute: &self.compute,
            sequence_id: push.sequence_id,
        });
        let send_span = tracing::info_span!(
            parent: span,
            "kv_transfer.send",
            request_id,
            decode_worker_id = %destination.decode_worker_id,
            endpoint = %destination.endpoint,
            bytes = tracing::field::Empty,
            blocks = tracing::field::Empty,
            transport = tracing::field::Empty,
        );
        // The receiving end continues this span's trace from the header.
        if let Some(context) = tandem_events::trace::context_of(&send_span) {
            computed.header.trace_context = context.traceparent;
        }
        let started = std::time::Instant::now();
        let (report, pushed) = async {
            let mut outgoing = self
                .transport
                .connect(&destination.endpoint, computed.header.clone())
                .await
                .map_err(|error| classify(error.to_string(), error.refusal_code()))?;
            // The header is accepted, so the destination blocks are reserved for this transfer: copy into them.
            let mut pushed = None;
            if let Some(push) = &computed.device_push {
                let (reply, answer) = oneshot::channel();
                self.compute
                    .send(EngineJob::Push {
                        sequence_id: push.sequence_id,
                        pool: push.pool.clone(),
                        from_token: computed.header.from_token as usize,
                        block_ids: computed.header.block_ids.clone(),
                        reply,
                    })
                    .map_err(|_| JobFailure::Retry("the engine thread is gone".into()))?;
                pushed = Some(
                    answer
                        .await
                        .map_err(|_| JobFailure::Retry("the engine thread is gone".into()))?
                        .map_err(JobFailure::Retry)?,
                );
            }
            for layer in computed.layers {
                outgoing
                    .send_layer(layer)
                    .await
                    .map_err(|error| JobFailure::Retry(error.to_string()))?;
            }
            let report = outgoing
                .finish(Some(computed.first_token_id))
                .await
                .map_err(|error| classify(error.to_string(), error.refusal_code()))?;
            Ok::<_, JobFailure>((report, pushed))
        }
        .instrument(send_span.clone())
        .await?;
        drop(held);
        report.record_metrics("send");
        let mut transferred =
            report.to_event(&self.config.worker_id, &destination.decode_worker_id);
        // A device push names its path (`cuda_same_device`, `cuda_peer`, `cuda_ipc`) and the bytes it copied;
        // the connection only carried the header and the confirmations.
        if let Some((bytes, path)) = pushed {
            transferred.bytes = bytes;
            transferred.duration_ns = started.elapsed().as_nanos() as u64;
            transferred.transport = path.to_owned();
        }
        send_span.record("bytes", transferred.bytes);
        send_span.record("blocks", report.blocks);
        send_span.record("transport", transferred.transport.as_str());
        drop(send_span);

        let done = Event::new(
            request_id,
            self.config.worker_id.clone(),
            Body::PrefillDone(PrefillDone {
                prefill_worker_id: self.config.worker_id.clone(),
                first_token_id: computed.first_token_id,
                compute_ns: computed.compute_ns,
                cached_tokens: computed.cached_tokens,
                first_token_logprob: computed.first_token_logprob,
            }),
        )
        .with_trace_from(event)
        .with_trace_of(span);
        let transferred = Event::new(
            request_id,
            self.config.worker_id.clone(),
            Body::KvTransferred(transferred),
        )
        .with_trace_from(event)
        .with_trace_of(span);
        let to_message = |event: &Event| {
            OutgoingMessage::from_event(event, occurrences.done())
                .map_err(|error| JobFailure::GiveUp(error.to_string()))
        };
        Ok(vec![to_message(&done)?, to_message(&transferred)?])
    }
}

/// Occurrence numbers (dedup ids `<request_id>:<kind>:<n>`) of a job's events. A request prefilled again after a
/// migration is a new job with a new `PrefillQueued`, whose delivery attempts count from 1 again: numbering by the
/// queued event's log sequence keeps the new job's records from being dropped as duplicates of the old job's.
#[derive(Debug, Clone, Copy)]
struct JobOccurrences {
    /// The low 24 bits of the `PrefillQueued`'s sequence, shifted clear of the delivery attempt: two jobs of one
    /// request collide only if queued exactly a multiple of 2^24 messages apart within the duplicate window.
    base: u32,
}

impl JobOccurrences {
    fn of(queued_sequence: u64) -> JobOccurrences {
        JobOccurrences {
            base: ((queued_sequence & 0x00FF_FFFF) as u32) << 8,
        }
    }

    /// `PrefillStarted`: one per delivery attempt.
    fn started(self, delivery_attempt: u32) -> u32 {
        self.base | delivery_attempt.clamp(1, 255)
    }

    /// `PrefillDone` and `KvTransferred`: once per job.
    fn done(self) -> u32 {
        self.base
    }
}

enum JobFailure {
    /// Another try (here or on another worker) may succeed.
    Retry(String),
    /// No try can succeed (the destination refused this model or layout, or the job is malformed).
    GiveUp(String),
}

fn classify(reason: String, refusal: crate::transfer::RefusalCode) -> JobFailure {
    use crate::transfer::RefusalCode;
    match refusal {
        RefusalCode::ModelMismatch | RefusalCode::LayoutMismatch | RefusalCode::UnknownRequest => {
            JobFailure::GiveUp(reason)
        }
        _ => JobFailure::Retry(reason),
    }
}

async fn mark_in_progress(delivery: Arc<Delivery>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Err(error) = delivery.in_progress().await {
            tracing::warn!(%error, "could not mark the prefill job in progress");
        }
    }
}

/// Runs the rest of the prompt of `sequence_id` and takes the token that follows it: drawn where the engine draws
/// on its device and the request fits a row draw (the logits stay on the device), else sampled from the logits.
fn first_token(
    engine: &mut Engine,
    sequence_id: SequenceId,
    sampler: &mut Sampler,
) -> Result<SampledToken, EngineError> {
    if !(engine.draws_on_device() && sampler.fits_row_draw()) {
        let vocab_size = engine.model_config().vocab_size;
        let logits = engine.prefill(sequence_id)?;
        return Ok(sampler.sample(&logits[logits.len() - vocab_size..]));
    }
    let params = sampler.row_draw_params();
    let draw = engine.prefill_drawn(sequence_id, &params)?.clone();
    match sampler.sample_from_draw(&params, &draw) {
        Some(token) => Ok(token),
        None => Ok(sampler.sample_with_params(&params, engine.step_logits(0)?)),
    }
}

/// The engine thread: one prompt at a time, computed, first token sampled, layers exported, blocks released.
fn run_compute(
    mut engine: Engine,
    model_fingerprint: u64,
    jobs: std::sync::mpsc::Receiver<EngineJob>,
) {
    // Device pools a push failed to reach (e.g. CUDA IPC not permitted between these processes): later
    // transfers to them take the host path.
    let mut unreachable_pools = std::collections::HashSet::new();
    while let Ok(job) = jobs.recv() {
        match job {
            EngineJob::Compute(job) => {
                let result = compute(&mut engine, model_fingerprint, &job, &unreachable_pools);
                let _ = job.reply.send(result);
            }
            EngineJob::Push {
                sequence_id,
                pool,
                from_token,
                block_ids,
                reply,
            } => {
                let result = engine
                    .push_kv_to_device(sequence_id, from_token, &pool, &block_ids)
                    .map_err(|error| format!("pushing the KV device to device: {error}"));
                if let Err(error) = &result {
                    tracing::warn!(%error, "a device push failed; this pool gets the KV through the host from now on");
                    unreachable_pools.insert(pool);
                }
                let _ = reply.send(result);
            }
            EngineJob::Release(sequence_id) => {
                if let Err(error) = engine.remove_sequence(sequence_id) {
                    tracing::warn!(%error, "releasing a pushed sequence failed");
                }
            }
        }
    }
}

fn compute(
    engine: &mut Engine,
    model_fingerprint: u64,
    job: &ComputeJob,
    unreachable_pools: &std::collections::HashSet<String>,
) -> Result<Computed, String> {
    let destination = job
        .job
        .kv_destination
        .as_ref()
        .ok_or("the job has no KV destination")?;
    let started = Instant::now();
    let sequence_id = engine
        .add_sequence(&job.job.prompt_token_ids)
        .map_err(|error| error.to_string())?;
    let result = (|| {
        let cached_tokens = engine
            .cached_prompt_tokens(sequence_id)
            .map_err(|e| e.to_string())? as u32;
        let sampling = job.job.sampling.clone().unwrap_or_default();
        let mut sampler = Sampler::new(engine_sampling(&sampling, 1));
        let first = first_token(engine, sequence_id, &mut sampler).map_err(|e| e.to_string())?;
        let compute_ns = started.elapsed().as_nanos() as u64;
        let mut header = TransferHeader::for_sequence(
            engine,
            sequence_id,
            &job.request_id,
            model_fingerprint,
            destination.cached_tokens,
            destination.block_ids.clone(),
            &job.trace_context,
        )
        .map_err(|error| error.to_string())?;
        // Device to device where the decode worker offers its GPU pool and this engine can reach it.
        let pool = split_device_pool(&destination.endpoint)
            .1
            .filter(|pool| crate::device_pool_reachable(pool) && !unreachable_pools.contains(*pool))
            .filter(|_| matches!(engine.device_kv_handle(), Ok(Some(_))));
        let (layers, device_push) = match pool {
            Some(pool) => {
                header.dtype = KvDtype::DevicePush;
                let layers = vec![Bytes::new(); header.layout.num_layers];
                (
                    layers,
                    Some(DevicePush {
                        sequence_id,
                        pool: pool.to_owned(),
                    }),
                )
            }
            None => {
                let layers = (0..header.layout.num_layers)
                    .map(|layer| {
                        export_layer(engine, sequence_id, &header, layer)
                            .map_err(|error| error.to_string())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (layers, None)
            }
        };
        Ok(Computed {
            header,
            layers,
            first_token_id: first.token_id,
            first_token_logprob: first.logprobs.map(|logprobs| logprobs.logprob),
            cached_tokens,
            compute_ns,
            device_push,
        })
    })();
    // A sequence held for a device push is released once the push is done (`EngineJob::Release`).
    let held = matches!(&result, Ok(computed) if computed.device_push.is_some());
    if !held && let Err(error) = engine.remove_sequence(sequence_id) {
        tracing::warn!(%error, "releasing a prefilled sequence failed");
    }
    result
}
