//! The decode worker's engine thread: continuous batching. Requests join and leave the running batch at every
//! step; a step decodes one token for every running sequence whatever its length; a prompt is prefilled one chunk
//! per step, so a long prompt does not stall the decodes running beside it. Admission is bounded by free KV
//! blocks: a request that cannot get blocks waits in line, it is not dropped.
//!
//! The thread owns the [`Engine`] (CPU work, never on the async runtime). It reports what happens as
//! [`BatchOutput`]s: token updates to stream and events to append, in order per request, and after every step the
//! changes to the engine's prefix cache (for `KvBlocksStored`/`KvBlocksRemoved`).
//!
//! A migrated request (`Routed.attempt` > 1) resumes: its input is the prompt plus the tokens an earlier attempt
//! checkpointed, and before its first new token the sampler, the detokenizer and the stop matcher are brought to
//! the state an unmigrated run had after those tokens, so every later index carries the same token and text.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tandem_events::Event;
use tandem_events::schema::{
    Body, Completed, DecodeStarted, Failed, KvDestination, PrefillLocal, PrefillQueued,
    SamplingParams as WireSampling, TokensDecoded,
};
use tandem_events::tokens::{TokenLogprob, TokenUpdate, TopLogprob};
use tokenizers::Tokenizer;

use crate::engine::{Engine, SequenceId};
use crate::error::EngineError;
use crate::kv_cache::KvCacheEvent;
use crate::roles::detokenizer::IncrementalDetokenizer;
use crate::roles::engine_sampling;
use crate::roles::observe::DecodeMetrics;
use crate::roles::prefill_rule::{PrefillRule, SharedPrefillRule};
use crate::roles::stop::StopMatcher;
use crate::sampling::{RowDraw, RowDrawParams, SampledToken, Sampler, TokenLogprobs};
use crate::transfer::engine_io::import_received;
use crate::transfer::{ExpectedTransfer, ReceivedKv};

/// A routed request handed to the engine thread.
#[derive(Debug, Clone)]
pub struct Job {
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    /// The log must not hold the prompt (`--log-prompts hash|none`): prefilled here, never put on the prefill
    /// queue, whose `PrefillQueued` carries the ids.
    pub prompt_redacted: bool,
    pub sampling: WireSampling,
    /// The `Routed.attempt` this job came from; numbers the dedup ids of the events it causes.
    pub routed_attempt: u32,
    /// Where its `Routed` is on the log: a `Migrated` away from this worker stops the attempts routed before it.
    pub routed_sequence: u64,
    /// Generated tokens `[0, n)` that an earlier attempt checkpointed (empty for a first attempt): the request
    /// continues at index n.
    pub resumed_token_ids: Vec<u32>,
    /// Their sampled logprobs, when the checkpoints carried them (one per token), else empty.
    pub resumed_logprobs: Vec<f32>,
    /// This attempt's `decode.request` span (continuing the `Routed`'s trace); the events it causes carry it, and
    /// it ends when the job leaves the engine thread.
    pub span: tracing::Span,
}

impl Job {
    /// A first attempt at a request outside the log's routing (benchmarks, tests): not resumed, untraced.
    pub fn first_attempt(
        request_id: String,
        prompt_token_ids: Vec<u32>,
        sampling: WireSampling,
    ) -> Job {
        Job {
            request_id,
            prompt_token_ids,
            prompt_redacted: false,
            sampling,
            routed_attempt: 1,
            routed_sequence: 0,
            resumed_token_ids: Vec::new(),
            resumed_logprobs: Vec::new(),
            span: tracing::Span::none(),
        }
    }

    /// What the engine computes before the next token: the prompt, then the tokens already generated.
    fn input_token_ids(&self) -> Vec<u32> {
        let mut input = self.prompt_token_ids.clone();
        input.extend_from_slice(&self.resumed_token_ids);
        input
    }

    /// Sampling draws randomness, so a remote prefill (whose first token is drawn with a fresh sampler on the
    /// prefill worker) would not continue the seeded stream at index n.
    fn samples_randomly(&self) -> bool {
        self.sampling.temperature > 0.0 && self.sampling.top_k != 1
    }
}

/// The occurrence (dedup id `<request_id>:tokens_decoded:<n>`) of the checkpoint starting at `start_index` in
/// routing attempt `attempt`: the start index itself on the first attempt; later attempts set the attempt in the
/// high bits, so a checkpoint at the same index from a superseded attempt (still running when it was declared lost)
/// never collides with this one's. Token indices stay below 2^22 (4M tokens of context).
pub(crate) fn checkpoint_occurrence(attempt: u32, start_index: u32) -> u32 {
    if attempt <= 1 {
        start_index
    } else {
        ((attempt - 1).min(1023) << 22) | (start_index & 0x003F_FFFF)
    }
}

/// What the async side sends to the engine thread.
#[derive(Debug)]
pub enum BatchCommand {
    Start(Job),
    /// The client went away, or someone else ended the request (`Cancelled`, a `Failed` this worker did not append):
    /// drop it, free its blocks, send and append nothing more for it.
    Cancel {
        request_id: String,
    },
    /// The request was migrated away from this worker (declared lost while alive): drop its attempts routed before
    /// `before_sequence` (the `Migrated`), free their blocks, send and append nothing more for them. A later
    /// routing of the same request back to this worker runs.
    Supersede {
        request_id: String,
        before_sequence: u64,
    },
    /// The KV of a remotely prefilled request arrived, verified; decoding can start.
    KvArrived {
        request_id: String,
        received: ReceivedKv,
    },
    /// The KV of a remotely prefilled request did not come (refused, corrupt, timed out): the request fails.
    KvFailed {
        request_id: String,
        reason: String,
    },
    /// Finish running requests, then stop.
    Drain,
    /// Stop now, dropping everything (a crash drill: nothing more is sent or appended).
    Halt,
}

/// What the engine thread reports.
#[derive(Debug)]
pub enum BatchOutput {
    Tokens {
        request_id: String,
        update: TokenUpdate,
    },
    Event {
        event: Event,
        occurrence: u32,
    },
    /// The request is over (completed, failed or cancelled): its routing can be acknowledged.
    Finished {
        request_id: String,
    },
    /// Register the KV transfer this worker awaits, before the `PrefillQueued` that announces it is appended.
    AwaitKv {
        expected: ExpectedTransfer,
    },
    /// Blocks that entered or left the engine's prefix cache during one step, in order.
    KvCache {
        changes: Vec<KvCacheEvent>,
    },
}

/// Settings of the batching loop.
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    pub worker_id: String,
    pub max_batch_sequences: usize,
    /// A `TokensDecoded` checkpoint every this many tokens (and one at the end).
    pub checkpoint_every_tokens: usize,
    /// Tokens per local prefill chunk (one chunk per step).
    pub prefill_chunk_tokens: usize,
    /// Context length of the model: prompt + generated tokens never exceed it.
    pub max_model_len_tokens: usize,
    /// Where prompts are prefilled; remote only when prefill workers can reach this worker (`kv_endpoint`).
    pub prefill_rule: Arc<SharedPrefillRule>,
    /// The transfer endpoint prefill workers write into, when this worker takes remote prefills.
    pub kv_endpoint: Option<String>,
    pub model_fingerprint: u64,
    /// Jobs waiting in the prefill queue, kept fresh by the async side.
    pub prefill_queue_depth: Arc<AtomicU32>,
    /// The worker's metric series (labelled by its id).
    pub metrics: DecodeMetrics,
}

/// What a decode step gives back: every sequence's logits (a row of the vocabulary each), only each one's
/// greedy token, or each one's draw with the parameters it was asked for.
enum StepOutput {
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
    Drawn {
        params: Vec<RowDrawParams>,
        draws: Vec<RowDraw>,
    },
}

enum Phase {
    /// Prompt not fully computed yet.
    Prefilling,
    /// On the prefill queue: a prefill worker computes the prompt and sends its KV.
    AwaitingKv,
    /// The last sampled token is fed at the next step.
    Decoding { next_input_token: u32 },
}

struct Running {
    job: Job,
    sequence_id: SequenceId,
    phase: Phase,
    sampler: Sampler,
    detokenizer: IncrementalDetokenizer,
    stop_matcher: StopMatcher,
    want_logprobs: bool,
    generated_token_ids: Vec<u32>,
    generated_logprobs: Vec<f32>,
    /// Generated tokens already covered by a `TokensDecoded` checkpoint.
    checkpointed_tokens: usize,
    /// The text the updates since the last checkpoint carried; it goes into the next one.
    uncheckpointed_text: String,
    max_tokens: usize,
    /// Set when the last sampled token ended generation: `stop` or `length`.
    finish_reason: Option<&'static str>,
}

/// The continuous batching loop; runs until `Drain` has been received and every request is finished, or the
/// command channel closes.
pub fn run_batcher(
    mut engine: Engine,
    tokenizer: Tokenizer,
    config: BatcherConfig,
    commands: mpsc::Receiver<BatchCommand>,
    outputs: tokio::sync::mpsc::UnboundedSender<BatchOutput>,
) {
    engine.record_kv_cache_events();
    let mut batcher = Batcher {
        engine: &mut engine,
        tokenizer: &tokenizer,
        config,
        outputs,
        waiting: VecDeque::new(),
        running: Vec::new(),
        cancelled: HashSet::new(),
        superseded: HashMap::new(),
        draining: false,
        halted: false,
    };
    loop {
        let idle = batcher.waiting.is_empty() && batcher.running.is_empty();
        if idle && batcher.draining {
            return;
        }
        // Nothing to compute (idle, or every request waits for its KV): block for a command rather than spin, so
        // the cores go to whoever computes (a prefill worker in this process). Busy: take what arrived, no wait.
        let nothing_to_compute = batcher
            .running
            .iter()
            .all(|run| matches!(run.phase, Phase::AwaitingKv));
        let first = if nothing_to_compute {
            match commands.recv_timeout(Duration::from_millis(200)) {
                Ok(command) => Some(command),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            None
        };
        for command in first
            .into_iter()
            .chain(std::iter::from_fn(|| commands.try_recv().ok()))
        {
            batcher.handle(command);
        }
        if batcher.halted {
            return;
        }
        batcher.admit();
        batcher.step();
        batcher.report_kv_cache_changes();
        batcher
            .config
            .metrics
            .steps_queued_ahead(batcher.engine.queued_ahead_steps());
        batcher.config.metrics.batch(
            batcher.running.len(),
            batcher.waiting.len(),
            batcher.engine.config().num_blocks,
            batcher.engine.num_free_blocks(),
        );
    }
}

struct Batcher<'a> {
    engine: &'a mut Engine,
    tokenizer: &'a Tokenizer,
    config: BatcherConfig,
    outputs: tokio::sync::mpsc::UnboundedSender<BatchOutput>,
    waiting: VecDeque<Job>,
    running: Vec<Running>,
    /// Requests cancelled before or while they ran here (a cancellation can overtake its routing).
    cancelled: HashSet<String>,
    /// Requests migrated away from here: routings before this log sequence are not run.
    superseded: HashMap<String, u64>,
    draining: bool,
    halted: bool,
}

impl Batcher<'_> {
    fn emit(&self, output: BatchOutput) {
        // The receiver only goes away when the worker shuts down; then there is nobody left to tell.
        let _ = self.outputs.send(output);
    }

    /// Emits an event of the request whose `decode.request` span is `span`; the event carries the span's trace.
    fn emit_event(&self, request_id: &str, span: &tracing::Span, body: Body, occurrence: u32) {
        let event = Event::new(request_id, self.config.worker_id.clone(), body).with_trace_of(span);
        self.emit(BatchOutput::Event { event, occurrence });
    }

    fn report_kv_cache_changes(&mut self) {
        let changes = self.engine.take_kv_cache_events();
        if !changes.is_empty() {
            self.emit(BatchOutput::KvCache { changes });
        }
    }

    fn is_superseded(&self, job: &Job) -> bool {
        self.superseded
            .get(&job.request_id)
            .is_some_and(|&before| job.routed_sequence < before)
    }

    /// Drops the request's jobs (waiting or running) that `stops` picks, freeing their blocks; nothing more is sent or
    /// appended for them. Their routings are acknowledged: whoever stopped them owns the request now.
    fn drop_jobs(&mut self, request_id: &str, stops: impl Fn(&Job) -> bool) {
        while let Some(position) = self
            .waiting
            .iter()
            .position(|job| job.request_id == request_id && stops(job))
        {
            self.waiting.remove(position);
            self.emit(BatchOutput::Finished {
                request_id: request_id.to_string(),
            });
        }
        while let Some(position) = self
            .running
            .iter()
            .position(|run| run.job.request_id == request_id && stops(&run.job))
        {
            let run = self.running.swap_remove(position);
            self.release(run.sequence_id);
            self.emit(BatchOutput::Finished {
                request_id: request_id.to_string(),
            });
        }
    }

    fn handle(&mut self, command: BatchCommand) {
        match command {
            BatchCommand::Start(job) => {
                if self.cancelled.contains(&job.request_id) || self.is_superseded(&job) {
                    self.emit(BatchOutput::Finished {
                        request_id: job.request_id,
                    });
                } else {
                    self.waiting.push_back(job);
                }
            }
            BatchCommand::Cancel { request_id } => {
                self.drop_jobs(&request_id, |_| true);
                // Bounded memory: forget old cancellations once there are many.
                if self.cancelled.len() > 100_000 {
                    self.cancelled.clear();
                }
                self.cancelled.insert(request_id);
            }
            BatchCommand::Supersede {
                request_id,
                before_sequence,
            } => {
                self.drop_jobs(&request_id, |job| job.routed_sequence < before_sequence);
                if self.superseded.len() > 100_000 {
                    self.superseded.clear();
                }
                let before = self.superseded.entry(request_id).or_insert(0);
                *before = (*before).max(before_sequence);
            }
            BatchCommand::KvArrived {
                request_id,
                received,
            } => self.kv_arrived(&request_id, &received),
            BatchCommand::KvFailed { request_id, reason } => {
                if let Some(index) = self.awaiting_kv(&request_id) {
                    let run = self.running.swap_remove(index);
                    self.release(run.sequence_id);
                    self.fail_job(&run.job, "kv_transfer_failed", &reason);
                }
            }
            BatchCommand::Drain => self.draining = true,
            BatchCommand::Halt => self.halted = true,
        }
    }

    /// Where the request of `sequence_id` sits in the batch, if it still runs.
    fn running_index(&self, sequence_id: SequenceId) -> Option<usize> {
        self.running
            .iter()
            .position(|run| run.sequence_id == sequence_id)
    }

    fn release(&mut self, sequence_id: SequenceId) {
        if let Err(error) = self.engine.remove_sequence(sequence_id) {
            tracing::warn!(%error, "releasing a sequence failed");
        }
    }

    /// Moves waiting requests into the batch while there is room and there are KV blocks for their prompts.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch_sequences {
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            match self.engine.add_sequence(&job.input_token_ids()) {
                Ok(sequence_id) => self.start(job, sequence_id),
                Err(EngineError::OutOfBlocks { .. }) if !self.running.is_empty() => {
                    // Blocks free up as running requests finish; wait in line rather than fail.
                    self.waiting.push_front(job);
                    return;
                }
                Err(error) => self.fail_job(&job, "engine_error", &error.to_string()),
            }
        }
    }

    fn start(&mut self, job: Job, sequence_id: SequenceId) {
        let prompt_tokens = job.prompt_token_ids.len();
        let room = self
            .config
            .max_model_len_tokens
            .saturating_sub(prompt_tokens);
        let max_tokens = if job.sampling.max_tokens == 0 {
            room
        } else {
            (job.sampling.max_tokens as usize).min(room)
        };
        let params = engine_sampling(&job.sampling, max_tokens);
        self.running.push(Running {
            want_logprobs: params.logprobs.is_some(),
            sampler: Sampler::new(params),
            stop_matcher: StopMatcher::new(job.sampling.stop_strings.clone()),
            detokenizer: IncrementalDetokenizer::default(),
            job,
            sequence_id,
            phase: Phase::Prefilling,
            generated_token_ids: Vec::new(),
            generated_logprobs: Vec::new(),
            checkpointed_tokens: 0,
            uncheckpointed_text: String::new(),
            max_tokens,
            finish_reason: None,
        });
        let index = self.running.len() - 1;
        let ended = self.resume(index);
        let job = self.running[index].job.clone();
        let input_tokens = prompt_tokens + job.resumed_token_ids.len();
        let cached_tokens = self.engine.cached_prompt_tokens(sequence_id).unwrap_or(0);
        let remote_allowed = ended.is_none()
            && !job.prompt_redacted
            && (job.resumed_token_ids.is_empty() || !job.samples_randomly());
        let rule = match self.config.kv_endpoint {
            Some(_) if remote_allowed => self.config.prefill_rule.get(),
            _ => PrefillRule::local_only(),
        };
        let queue_depth = self.config.prefill_queue_depth.load(Ordering::Relaxed);
        let (remote, decision) =
            rule.decide(input_tokens as u32, cached_tokens as u32, queue_depth);
        self.config
            .metrics
            .prefix_cache_lookup(input_tokens as u64, cached_tokens as u64);
        job.span.record("cached_tokens", cached_tokens);
        let remote_destination = match (&self.config.kv_endpoint, remote) {
            (Some(endpoint), true) => {
                match ExpectedTransfer::for_sequence(
                    self.engine,
                    sequence_id,
                    &job.request_id,
                    self.config.model_fingerprint,
                ) {
                    Ok(expected) => Some((endpoint.clone(), expected)),
                    Err(error) => {
                        tracing::warn!(%error, "cannot describe the KV destination; prefilling locally");
                        None
                    }
                }
            }
            _ => None,
        };
        let phase = if let Some((endpoint, expected)) = remote_destination {
            // Counted at once, so a burst of long prompts does not all see an empty queue.
            let _ = self.config.prefill_queue_depth.fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |depth| Some(depth.saturating_add(1)),
            );
            let destination = KvDestination {
                decode_worker_id: self.config.worker_id.clone(),
                endpoint,
                block_ids: expected.block_ids.clone(),
                block_size_tokens: expected.layout.block_size_tokens as u32,
                cached_tokens: expected.from_token,
            };
            self.emit(BatchOutput::AwaitKv { expected });
            self.emit_event(
                &job.request_id,
                &job.span,
                Body::PrefillQueued(PrefillQueued {
                    decode_worker_id: self.config.worker_id.clone(),
                    decision: Some(decision),
                    prompt_token_ids: job.input_token_ids(),
                    sampling: Some(job.sampling.clone()),
                    kv_destination: Some(destination),
                }),
                job.routed_attempt,
            );
            self.config.metrics.prefill_decision(true);
            job.span.record("prefill", "remote");
            Phase::AwaitingKv
        } else {
            self.emit_event(
                &job.request_id,
                &job.span,
                Body::PrefillLocal(PrefillLocal {
                    decode_worker_id: self.config.worker_id.clone(),
                    decision: Some(decision),
                }),
                job.routed_attempt,
            );
            self.config.metrics.prefill_decision(false);
            job.span.record("prefill", "local");
            Phase::Prefilling
        };
        self.running[index].phase = phase;
        if let Some(last_update) = ended {
            // The earlier attempt had generated the request's last token already (it was lost between its last
            // checkpoint and `Completed`): nothing to compute; say how it ended and complete it.
            self.emit_event(
                &job.request_id,
                &job.span,
                Body::DecodeStarted(DecodeStarted {
                    decode_worker_id: self.config.worker_id.clone(),
                }),
                job.routed_attempt,
            );
            self.emit(BatchOutput::Tokens {
                request_id: job.request_id.clone(),
                update: last_update,
            });
            self.finish(index);
        }
    }

    /// Brings a migrated request to where an unmigrated run was after its checkpointed tokens: the sampler's random
    /// stream (one draw per token), the detokenizer and the stop matcher (what text is held back). Nothing is sent
    /// or appended. Returns the update of the last token when those tokens already ended the request.
    fn resume(&mut self, index: usize) -> Option<TokenUpdate> {
        let resumed = std::mem::take(&mut self.running[index].job.resumed_token_ids);
        let resumed_logprobs = std::mem::take(&mut self.running[index].job.resumed_logprobs);
        let mut ended = None;
        for (position, &token_id) in resumed.iter().enumerate() {
            self.running[index].sampler.skip_sample();
            // A logprob missing from the checkpoints is unknown, not zero: NaN keeps later indices aligned.
            let logprob = resumed_logprobs.get(position).copied().unwrap_or(f32::NAN);
            // Only a request that wants logprobs keeps them (as its sampler would), so checkpoints stay aligned.
            let sampled = SampledToken {
                token_id,
                logprobs: self.running[index].want_logprobs.then(|| TokenLogprobs {
                    token_id,
                    logprob,
                    top: Vec::new(),
                }),
            };
            let (update, finished) = self.advance(index, sampled);
            if finished {
                ended = Some(update);
                break;
            }
        }
        let run = &mut self.running[index];
        run.job.resumed_token_ids = resumed;
        run.job.resumed_logprobs = resumed_logprobs;
        run.checkpointed_tokens = run.generated_token_ids.len();
        // Their text is on the log already, in the checkpoints this resumed from.
        run.uncheckpointed_text.clear();
        ended
    }

    fn fail_job(&self, job: &Job, reason: &str, message: &str) {
        tracing::warn!(request_id = %job.request_id, reason, message, "request failed");
        job.span.record("finish_reason", "failed");
        self.emit_event(
            &job.request_id,
            &job.span,
            Body::Failed(Failed {
                reason: reason.to_string(),
                message: message.to_string(),
                worker_id: self.config.worker_id.clone(),
            }),
            job.routed_attempt,
        );
        self.emit(BatchOutput::Tokens {
            request_id: job.request_id.clone(),
            update: TokenUpdate {
                error: Some(format!("{reason}: {message}")),
                prompt_tokens: job.prompt_token_ids.len() as u32,
                worker_id: self.config.worker_id.clone(),
                ..Default::default()
            },
        });
        self.emit(BatchOutput::Finished {
            request_id: job.request_id.clone(),
        });
    }

    /// One step: a prefill chunk for the oldest prefilling request, then one decode token for every request that
    /// is decoding.
    fn step(&mut self) {
        // The oldest is the lowest sequence id (ids grow with admission), not the first in `running`: finished
        // requests leave by `swap_remove`, which moves the newest into their place, so under steady load a request
        // admitted later would take the chunk step after step while an older one starved.
        if let Some(index) = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, run)| matches!(run.phase, Phase::Prefilling))
            .min_by_key(|(_, run)| run.sequence_id)
            .map(|(index, _)| index)
        {
            self.prefill_chunk(index);
        }
        self.decode_step();
    }

    fn prefill_chunk(&mut self, index: usize) {
        let sequence_id = self.running[index].sequence_id;
        let started = Instant::now();
        // The first token is drawn like a decode step's where the engine draws on the device and the request
        // fits a row draw (the logits stay on the device). `Some(draw)` once the prompt is done: the draw, or `None` for the logits path.
        let sampler = &self.running[index].sampler;
        let draw_params = (self.engine.draws_on_device() && sampler.fits_row_draw())
            .then(|| sampler.row_draw_params());
        let chunk = match &draw_params {
            Some(params) => self
                .engine
                .prefill_chunk_drawn(sequence_id, self.config.prefill_chunk_tokens, params)
                .map(|draw| draw.cloned().map(Some)),
            None => self
                .engine
                .prefill_chunk(sequence_id, self.config.prefill_chunk_tokens)
                .map(|done| done.then_some(None)),
        };
        match chunk {
            Ok(None) => {}
            Ok(Some(first_draw)) => {
                tracing::debug!(
                    request_id = %self.running[index].job.request_id,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "prefill done"
                );
                let run = &self.running[index];
                self.emit_event(
                    &run.job.request_id,
                    &run.job.span,
                    Body::DecodeStarted(DecodeStarted {
                        decode_worker_id: self.config.worker_id.clone(),
                    }),
                    run.job.routed_attempt,
                );
                let sampled = match (first_draw, draw_params) {
                    (Some(draw), Some(params)) => self.token_from_draw(index, 0, &params, &draw),
                    _ => {
                        let vocab_size = self.engine.model_config().vocab_size;
                        let logits = self.engine.logits();
                        // The logits after the prompt are the last row of the step.
                        let last_row = &logits[logits.len() - vocab_size..];
                        Ok(self.running[index].sampler.sample(last_row))
                    }
                };
                match sampled {
                    Ok(sampled) => {
                        if self.accept_token(index, sampled) {
                            self.finish(index);
                        }
                    }
                    Err(error) => {
                        self.fail_running(index, &error);
                    }
                }
            }
            Err(error) => {
                self.fail_running(index, &error);
            }
        }
    }

    fn decode_step(&mut self) {
        let steps: Vec<(SequenceId, u32)> = self
            .running
            .iter()
            .filter_map(|run| match run.phase {
                Phase::Decoding { next_input_token } => Some((run.sequence_id, next_input_token)),
                Phase::Prefilling | Phase::AwaitingKv => None,
            })
            .collect();
        if steps.is_empty() {
            return;
        }
        // A step whose requests all decode greedily without logprobs takes only the tokens from the engine: on a
        // GPU they are picked there, and the logits (the vocabulary's f32 per sequence) stay on the device. Where
        // the engine draws on the device, one whose requests all fit a row draw takes each row's draw (its
        // candidates and sums), and only a request whose top-p nucleus reaches past the candidates reads its row
        // of logits.
        let decoding = || {
            self.running
                .iter()
                .filter(|run| matches!(run.phase, Phase::Decoding { .. }))
        };
        let only_argmax = decoding().all(|run| run.sampler.needs_only_argmax());
        let fits_row_draws =
            self.engine.draws_on_device() && decoding().all(|run| run.sampler.fits_row_draw());
        // The next step is queued ahead, to run on the GPU while this one's tokens stream out, when the batch should
        // stay as it is: no prompt is computed here or waits to be admitted, and no request reaches its length with
        // this token (a request waiting for its KV from a prefill worker joins when it arrives, dropping the queued
        // step then). A request that stops on a stop token or string, or a command that changes the batch, wastes
        // the queued step (the engine waits for it and drops it).
        let batch_stays = self.waiting.is_empty()
            && self.running.iter().all(|run| match run.phase {
                Phase::Decoding { .. } => run.generated_token_ids.len() + 1 < run.max_tokens,
                Phase::Prefilling => false,
                Phase::AwaitingKv => true,
            });
        let decoded = if only_argmax {
            let picked = if batch_stays {
                self.engine.decode_greedy_ahead(&steps)
            } else {
                self.engine.decode_greedy(&steps)
            };
            picked.map(|tokens| StepOutput::Tokens(tokens.to_vec()))
        } else if fits_row_draws {
            let row_params = |params_of: fn(&Sampler) -> RowDrawParams| -> Vec<RowDrawParams> {
                steps
                    .iter()
                    .map(|&(sequence_id, _)| {
                        self.running
                            .iter()
                            .find(|run| run.sequence_id == sequence_id)
                            .map_or(RowDrawParams::GREEDY, |run| params_of(&run.sampler))
                    })
                    .collect()
            };
            let params = row_params(Sampler::row_draw_params);
            // Queued ahead too where every row's token is its draw's, which the GPU knows first.
            let drawn = if batch_stays && decoding().all(|run| run.sampler.takes_drawn_token()) {
                let next_params = row_params(Sampler::row_draw_params_after_next);
                self.engine
                    .decode_drawn_ahead(&steps, &params, &next_params)
            } else {
                self.engine.decode_drawn(&steps, &params)
            };
            drawn.map(|draws| StepOutput::Drawn {
                draws: draws.to_vec(),
                params,
            })
        } else {
            self.engine
                .decode(&steps)
                .map(|logits| StepOutput::Logits(logits.to_vec()))
        };
        let output = match decoded {
            Ok(output) => output,
            Err(EngineError::OutOfBlocks { .. }) => {
                // No block for the next token of some sequence: give up the newest request so the rest go on.
                if let Some(index) = self
                    .running
                    .iter()
                    .rposition(|run| matches!(run.phase, Phase::Decoding { .. }))
                {
                    let run = self.running.swap_remove(index);
                    self.release(run.sequence_id);
                    self.fail_job(&run.job, "out_of_kv_blocks", "the KV cache is full");
                }
                return;
            }
            Err(error) => {
                for (sequence_id, _) in steps {
                    if let Some(index) = self.running_index(sequence_id) {
                        self.fail_running(index, &error);
                    }
                }
                return;
            }
        };
        let vocab_size = self.engine.model_config().vocab_size;
        // Each row's next token: as the engine picked it, or drawn from its logits by its request's sampler. The
        // rows are drawn in parallel: sampling with a temperature is a few passes over the whole vocabulary a row,
        // a serial loop of them took longer than a GPU's step, and each request's random stream is its own.
        let mut sampled: Vec<Option<SampledToken>> = match output {
            StepOutput::Tokens(tokens) => tokens
                .into_iter()
                .map(|token_id| {
                    Some(SampledToken {
                        token_id,
                        logprobs: None,
                    })
                })
                .collect(),
            StepOutput::Logits(logits) => {
                let rows: HashMap<SequenceId, usize> = steps
                    .iter()
                    .enumerate()
                    .map(|(row, &(sequence_id, _))| (sequence_id, row))
                    .collect();
                let drawn: Vec<(usize, SampledToken)> = self
                    .running
                    .par_iter_mut()
                    .filter_map(|run| {
                        let row = *rows.get(&run.sequence_id)?;
                        let row_logits = &logits[row * vocab_size..(row + 1) * vocab_size];
                        Some((row, run.sampler.sample(row_logits)))
                    })
                    .collect();
                let mut by_row = vec![None; steps.len()];
                for (row, token) in drawn {
                    by_row[row] = Some(token);
                }
                by_row
            }
            StepOutput::Drawn { params, draws } => {
                let mut by_row = Vec::with_capacity(steps.len());
                let mut unread = Vec::new();
                for (row, &(sequence_id, _)) in steps.iter().enumerate() {
                    let Some(index) = self.running_index(sequence_id) else {
                        by_row.push(None);
                        continue;
                    };
                    match self.token_from_draw(index, row, &params[row], &draws[row]) {
                        Ok(token) => by_row.push(Some(token)),
                        Err(error) => {
                            // The engine has taken the step: without its token the request cannot go on.
                            unread.push((sequence_id, error));
                            by_row.push(None);
                        }
                    }
                }
                for (sequence_id, error) in unread {
                    if let Some(index) = self.running_index(sequence_id) {
                        self.fail_running(index, &error);
                    }
                }
                by_row
            }
        };
        let mut finished = Vec::new();
        for (row, (sequence_id, _)) in steps.iter().enumerate() {
            let Some(index) = self.running_index(*sequence_id) else {
                continue;
            };
            let Some(token) = sampled[row].take() else {
                continue;
            };
            if self.accept_token(index, token) {
                finished.push(*sequence_id);
            }
        }
        for sequence_id in finished {
            if let Some(index) = self.running_index(sequence_id) {
                self.finish(index);
            }
        }
    }

    fn awaiting_kv(&self, request_id: &str) -> Option<usize> {
        self.running.iter().position(|run| {
            run.job.request_id == request_id && matches!(run.phase, Phase::AwaitingKv)
        })
    }

    /// Writes a remotely computed prompt's KV into the request's blocks and starts decoding with the first token
    /// the prefill worker sampled.
    fn kv_arrived(&mut self, request_id: &str, received: &ReceivedKv) {
        let Some(index) = self.awaiting_kv(request_id) else {
            tracing::warn!(%request_id, "KV arrived for a request not waiting for it (cancelled?)");
            return;
        };
        let _ = self.config.prefill_queue_depth.fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |depth| Some(depth.saturating_sub(1)),
        );
        let sequence_id = self.running[index].sequence_id;
        let imported = import_received(self.engine, sequence_id, received);
        match (imported, received.first_token_id) {
            (Ok(()), Some(first_token)) => {
                let run = &self.running[index];
                self.emit_event(
                    &run.job.request_id,
                    &run.job.span,
                    Body::DecodeStarted(DecodeStarted {
                        decode_worker_id: self.config.worker_id.clone(),
                    }),
                    run.job.routed_attempt,
                );
                self.running[index].sampler.skip_sample();
                let sampled = SampledToken {
                    token_id: first_token,
                    logprobs: None,
                };
                if self.accept_token(index, sampled) {
                    self.finish(index);
                }
            }
            (result, _) => {
                let reason = match result {
                    Err(error) => error.to_string(),
                    Ok(()) => "the prefill worker sent no first token".to_string(),
                };
                let run = self.running.swap_remove(index);
                self.release(run.sequence_id);
                self.fail_job(&run.job, "kv_transfer_failed", &reason);
            }
        }
    }

    /// Ends request `index` on an engine error: its blocks are released and its `Failed` event says why.
    fn fail_running(&mut self, index: usize, error: &EngineError) {
        let run = self.running.swap_remove(index);
        self.release(run.sequence_id);
        self.fail_job(&run.job, "engine_error", &error.to_string());
    }

    /// The next token of request `index` from its row `row` of the last drawn step: from the draw, or from the
    /// row's logits when the request's top-p nucleus reaches past the draw's candidates.
    fn token_from_draw(
        &mut self,
        index: usize,
        row: usize,
        params: &RowDrawParams,
        draw: &RowDraw,
    ) -> Result<SampledToken, EngineError> {
        if let Some(token) = self.running[index].sampler.sample_from_draw(params, draw) {
            return Ok(token);
        }
        let logits = self.engine.step_logits(row)?;
        Ok(self.running[index]
            .sampler
            .sample_with_params(params, logits))
    }

    /// Takes `sampled` as the request's next token, streams it, and says whether the request finished.
    fn accept_token(&mut self, index: usize, sampled: SampledToken) -> bool {
        let token_id = sampled.token_id;
        let (update, finished) = self.advance(index, sampled);
        let run = &mut self.running[index];
        run.phase = Phase::Decoding {
            next_input_token: token_id,
        };
        let checkpoint_due = run.generated_token_ids.len() - run.checkpointed_tokens
            >= self.config.checkpoint_every_tokens;
        let request_id = run.job.request_id.clone();
        self.emit(BatchOutput::Tokens { request_id, update });
        if finished {
            return true;
        }
        if checkpoint_due {
            self.checkpoint(index);
        }
        false
    }

    /// Adds `sampled` to the request's generated tokens, text and stop state; returns the update that carries it
    /// and whether it ended the request. Sends nothing.
    fn advance(&mut self, index: usize, sampled: SampledToken) -> (TokenUpdate, bool) {
        let tokenizer = self.tokenizer;
        let worker_id = self.config.worker_id.clone();
        let run = &mut self.running[index];
        let token_id = sampled.token_id;
        let start_index = run.generated_token_ids.len() as u32;
        run.generated_token_ids.push(token_id);
        let is_stop_token = run.sampler.is_stop_token(token_id);
        let mut logprobs = Vec::new();
        if let Some(token_logprobs) = &sampled.logprobs {
            run.generated_logprobs.push(token_logprobs.logprob);
            if run.want_logprobs {
                logprobs.push(wire_logprobs(tokenizer, token_logprobs));
            }
        }
        let piece = run
            .detokenizer
            .push(tokenizer, token_id)
            .unwrap_or_else(|error| {
                tracing::warn!(%error, token_id, "token could not be decoded to text");
                String::new()
            });
        let outcome = run.stop_matcher.push(&piece);
        let length_reached = run.generated_token_ids.len() >= run.max_tokens;
        let finish_reason = if outcome.stopped || is_stop_token {
            Some("stop")
        } else if length_reached {
            Some("length")
        } else {
            None
        };
        let mut text = outcome.text;
        if finish_reason.is_some() && !outcome.stopped {
            text.push_str(&run.stop_matcher.finish());
        }
        run.finish_reason = finish_reason;
        run.uncheckpointed_text.push_str(&text);
        let update = TokenUpdate {
            start_index,
            token_ids: vec![token_id],
            text,
            logprobs,
            finish_reason: finish_reason.map(str::to_string),
            error: None,
            prompt_tokens: run.job.prompt_token_ids.len() as u32,
            worker_id,
        };
        (update, finish_reason.is_some())
    }

    /// Appends a `TokensDecoded` with the tokens generated since the last one.
    fn checkpoint(&mut self, index: usize) {
        let run = &mut self.running[index];
        if run.generated_token_ids.len() == run.checkpointed_tokens {
            return;
        }
        let start = run.checkpointed_tokens;
        let body = Body::TokensDecoded(TokensDecoded {
            decode_worker_id: self.config.worker_id.clone(),
            start_index: start as u32,
            token_ids: run.generated_token_ids[start..].to_vec(),
            logprobs: run
                .generated_logprobs
                .get(start..)
                .map(<[f32]>::to_vec)
                .unwrap_or_default(),
            text: Some(std::mem::take(&mut run.uncheckpointed_text)),
        });
        run.checkpointed_tokens = run.generated_token_ids.len();
        let occurrence = checkpoint_occurrence(run.job.routed_attempt, start as u32);
        let request_id = run.job.request_id.clone();
        let span = run.job.span.clone();
        self.emit_event(&request_id, &span, body, occurrence);
    }

    fn finish(&mut self, index: usize) {
        self.checkpoint(index);
        let run = self.running.swap_remove(index);
        self.release(run.sequence_id);
        let finish_reason = run.finish_reason.unwrap_or("length");
        run.job
            .span
            .record("completion_tokens", run.generated_token_ids.len());
        run.job.span.record("finish_reason", finish_reason);
        self.emit_event(
            &run.job.request_id,
            &run.job.span,
            Body::Completed(Completed {
                finish_reason: finish_reason.to_string(),
                prompt_tokens: run.job.prompt_token_ids.len() as u32,
                completion_tokens: run.generated_token_ids.len() as u32,
                decode_worker_id: self.config.worker_id.clone(),
            }),
            run.job.routed_attempt,
        );
        self.emit(BatchOutput::Finished {
            request_id: run.job.request_id,
        });
    }
}

fn top_logprob(tokenizer: &Tokenizer, token_id: u32, logprob: f32) -> TopLogprob {
    let token = tokenizer.decode(&[token_id], false).unwrap_or_default();
    TopLogprob {
        token_id,
        bytes: token.as_bytes().to_vec(),
        token,
        logprob,
    }
}

fn wire_logprobs(tokenizer: &Tokenizer, logprobs: &TokenLogprobs) -> TokenLogprob {
    TokenLogprob {
        chosen: Some(top_logprob(tokenizer, logprobs.token_id, logprobs.logprob)),
        top: logprobs
            .top
            .iter()
            .map(|&(token_id, logprob)| top_logprob(tokenizer, token_id, logprob))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::backend::{Backend, SequenceStep};
    use crate::kv_cache::BlockId;
    use crate::sampling::DRAW_CANDIDATES;
    use crate::{CpuBackend, EngineConfig, KvLayout, ModelConfig, builtin_model};

    /// The CPU backend, counting the kinds of steps asked of it. With `keeps_logits` it says it draws on the
    /// device, and its drawn steps behave as a GPU's: the logits stay with the backend, and a row is read back
    /// only when asked for.
    struct CountingBackend {
        inner: CpuBackend,
        counts: Arc<StepCounts>,
        keeps_logits: bool,
        kept_logits: Vec<f32>,
    }

    #[derive(Default)]
    struct StepCounts {
        logits_steps: AtomicUsize,
        greedy_steps: AtomicUsize,
        drawn_steps: AtomicUsize,
        rows_read: AtomicUsize,
    }

    impl Backend for CountingBackend {
        fn model_config(&self) -> &ModelConfig {
            self.inner.model_config()
        }
        fn kv_layout(&self) -> KvLayout {
            self.inner.kv_layout()
        }
        fn num_blocks(&self) -> usize {
            self.inner.num_blocks()
        }
        fn forward(
            &mut self,
            batch: &[SequenceStep<'_>],
            logits: &mut Vec<f32>,
        ) -> Result<(), EngineError> {
            self.counts.logits_steps.fetch_add(1, Ordering::Relaxed);
            self.inner.forward(batch, logits)
        }
        fn forward_greedy(
            &mut self,
            batch: &[SequenceStep<'_>],
            tokens: &mut Vec<u32>,
        ) -> Result<(), EngineError> {
            self.counts.greedy_steps.fetch_add(1, Ordering::Relaxed);
            self.inner.forward_greedy(batch, tokens)
        }
        fn draws_on_device(&self) -> bool {
            self.keeps_logits
        }
        fn forward_drawn(
            &mut self,
            batch: &[SequenceStep<'_>],
            params: &[RowDrawParams],
            logits: &mut Vec<f32>,
            draws: &mut Vec<RowDraw>,
        ) -> Result<(), EngineError> {
            self.counts.drawn_steps.fetch_add(1, Ordering::Relaxed);
            if !self.keeps_logits {
                return self.inner.forward_drawn(batch, params, logits, draws);
            }
            self.inner
                .forward_drawn(batch, params, &mut self.kept_logits, draws)
        }
        fn read_logits_row(&mut self, row: usize, out: &mut Vec<f32>) -> Result<(), EngineError> {
            self.counts.rows_read.fetch_add(1, Ordering::Relaxed);
            let vocab_size = self.model_config().vocab_size;
            out.clear();
            out.extend_from_slice(&self.kept_logits[row * vocab_size..(row + 1) * vocab_size]);
            Ok(())
        }
        fn read_block(&self, block: BlockId, out: &mut [u8]) -> Result<(), EngineError> {
            self.inner.read_block(block, out)
        }
        fn write_block(&mut self, block: BlockId, bytes: &[u8]) -> Result<(), EngineError> {
            self.inner.write_block(block, bytes)
        }
    }

    fn shipped_tokenizer() -> Tokenizer {
        let tokenizer_path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/qwen3-tokenizer/tokenizer.json"
        );
        Tokenizer::from_file(tokenizer_path).expect("the shipped tokenizer loads")
    }

    fn test_config() -> BatcherConfig {
        BatcherConfig {
            worker_id: "test".into(),
            max_batch_sequences: 8,
            checkpoint_every_tokens: 16,
            prefill_chunk_tokens: 8,
            max_model_len_tokens: 4096,
            prefill_rule: Arc::new(SharedPrefillRule::new(PrefillRule::local_only())),
            kv_endpoint: None,
            model_fingerprint: 0,
            prefill_queue_depth: Arc::new(AtomicU32::new(0)),
            metrics: DecodeMetrics::new("test"),
        }
    }

    /// What each request of a run gave: its generated tokens, and how many logprobs came with them.
    type Generated = HashMap<String, (Vec<u32>, usize)>;

    /// Runs `jobs` together to their end on `engine`.
    fn run_jobs(engine: Engine, jobs: Vec<Job>) -> Generated {
        let (commands, command_receiver) = mpsc::channel();
        let (output_sender, mut outputs) = tokio::sync::mpsc::unbounded_channel();
        for job in jobs {
            commands.send(BatchCommand::Start(job)).expect("send");
        }
        commands.send(BatchCommand::Drain).expect("send");
        let tokenizer = shipped_tokenizer();
        let config = test_config();
        let engine_thread = std::thread::spawn(move || {
            run_batcher(engine, tokenizer, config, command_receiver, output_sender)
        });
        let mut generated = Generated::new();
        while let Some(output) = outputs.blocking_recv() {
            if let BatchOutput::Tokens { request_id, update } = output {
                let (tokens, logprobs) = generated.entry(request_id).or_default();
                tokens.extend(&update.token_ids);
                *logprobs += update.logprobs.len();
            }
        }
        engine_thread.join().expect("the engine thread ends");
        generated
    }

    /// Runs `jobs` together to their end on the CPU backend: each request's generated tokens.
    fn run_together(jobs: Vec<Job>) -> HashMap<String, Vec<u32>> {
        let engine = Engine::cpu(builtin_model(), EngineConfig::default()).expect("engine");
        run_jobs(engine, jobs)
            .into_iter()
            .map(|(request_id, (tokens, _))| (request_id, tokens))
            .collect()
    }

    /// Sampled requests decoding in one batch (their rows drawn in parallel) each get the tokens their seed gives
    /// them alone.
    #[test]
    fn sampled_requests_in_a_batch_draw_what_their_seeds_draw_alone() {
        let sampled = |request_id: &str, seed: u64| {
            let mut job = job(request_id, 8, 12);
            job.sampling.temperature = 1.0;
            job.sampling.seed = Some(seed);
            job
        };
        let together = run_together(vec![sampled("a", 1), sampled("b", 2), sampled("c", 3)]);
        for (request_id, seed) in [("a", 1), ("b", 2), ("c", 3)] {
            let alone = run_together(vec![sampled(request_id, seed)]);
            assert_eq!(together[request_id].len(), 12);
            assert_eq!(
                together[request_id], alone[request_id],
                "request {request_id}"
            );
        }
        assert_ne!(together["a"], together["b"]);
    }

    /// Runs `jobs` together to their end on the counting CPU backend: what each gave, and the steps taken.
    fn run_counted(jobs: Vec<Job>, keeps_logits: bool) -> (Generated, Arc<StepCounts>) {
        run_counted_queueing(jobs, keeps_logits, false)
    }

    /// [`run_counted`], with steps queued ahead where the batcher asks for it when `queue_ahead`.
    fn run_counted_queueing(
        jobs: Vec<Job>,
        keeps_logits: bool,
        queue_ahead: bool,
    ) -> (Generated, Arc<StepCounts>) {
        let counts = Arc::new(StepCounts::default());
        let config = EngineConfig::default();
        let backend = CountingBackend {
            inner: CpuBackend::new(builtin_model(), config.num_blocks, config.block_size_tokens)
                .expect("backend"),
            counts: Arc::clone(&counts),
            keeps_logits,
            kept_logits: Vec::new(),
        };
        let mut engine = Engine::new(Box::new(backend), config).expect("engine");
        engine.set_queue_ahead(queue_ahead).expect("queue ahead");
        (run_jobs(engine, jobs), counts)
    }

    fn counted(counts: &StepCounts) -> [usize; 4] {
        [
            &counts.logits_steps,
            &counts.greedy_steps,
            &counts.drawn_steps,
            &counts.rows_read,
        ]
        .map(|count| count.load(Ordering::Relaxed))
    }

    /// Greedy requests without logprobs decode through `decode_greedy` (on a GPU the tokens are picked there), and
    /// give the tokens the sampler gives from the logits; on a backend that does not draw on its device, a
    /// request with logprobs keeps the logits.
    #[test]
    fn greedy_requests_without_logprobs_take_only_the_greedy_tokens() {
        let greedy = job("greedy", 8, 10);
        let mut with_logprobs = job("with_logprobs", 8, 10);
        with_logprobs.sampling.logprobs = Some(2);

        let (greedy, greedy_counts) = run_counted(vec![greedy], false);
        let (greedy_tokens, greedy_logprobs) = &greedy["greedy"];
        assert_eq!(greedy_tokens.len(), 10);
        assert_eq!(*greedy_logprobs, 0);
        // The prompt (one chunk) gives the first token from its logits; the nine steps after it only tokens.
        assert_eq!(counted(&greedy_counts), [1, 9, 0, 0]);

        let (sampled, sampled_counts) = run_counted(vec![with_logprobs], false);
        let (sampled_tokens, sampled_logprobs) = &sampled["with_logprobs"];
        assert_eq!(sampled_tokens, greedy_tokens);
        assert_eq!(*sampled_logprobs, 10);
        assert_eq!(counted(&sampled_counts), [10, 0, 0, 0]);
    }

    /// Greedy steps queued ahead while the batch stays as it is give every request the tokens of steps run one at a
    /// time. Requests that end by length are seen coming, so as many greedy steps run; a stop token is not, so the
    /// step queued after it runs for nothing, once.
    #[test]
    fn greedy_steps_queued_ahead_give_the_same_tokens_and_waste_only_unforeseen_ends() {
        let jobs = |stop_token: Option<u32>| {
            let mut last = job("c", 5, 20);
            last.sampling.stop_token_ids.extend(stop_token);
            vec![job("a", 8, 6), job("b", 11, 13), last]
        };
        let (one_at_a_time, counts) = run_counted_queueing(jobs(None), false, false);
        let (queued, queued_counts) = run_counted_queueing(jobs(None), false, true);
        assert_eq!(queued, one_at_a_time);
        for (request_id, length) in [("a", 6), ("b", 13), ("c", 20)] {
            assert_eq!(queued[request_id].0.len(), length, "request {request_id}");
        }
        assert_eq!(counted(&queued_counts), counted(&counts));

        // "c" stops on a token it first generates while "a" and "b" still decode.
        let tokens = &one_at_a_time["c"].0;
        let stop_index = (2..5)
            .find(|&index| !tokens[..index].contains(&tokens[index]))
            .expect("a token new to the request among its first five");
        let stop_token = Some(tokens[stop_index]);
        let (one_at_a_time, counts) = run_counted_queueing(jobs(stop_token), false, false);
        let (queued, queued_counts) = run_counted_queueing(jobs(stop_token), false, true);
        assert_eq!(queued, one_at_a_time);
        assert_eq!(queued["c"].0.len(), stop_index + 1);
        let [logits_steps, greedy_steps, drawn_steps, rows_read] = counted(&counts);
        assert_eq!(
            counted(&queued_counts),
            [logits_steps, greedy_steps + 1, drawn_steps, rows_read]
        );
    }

    /// Drawn steps queued ahead (requests at a plain temperature, or greedy with logprobs, whose tokens are their
    /// draws') give every request the tokens and logprobs of steps run one at a time, and as many steps run when
    /// requests end by length.
    #[test]
    fn drawn_steps_queued_ahead_give_the_same_tokens_and_logprobs() {
        let jobs = || {
            let sampled = |request_id: &str, prompt_tokens, max_tokens, seed| {
                let mut job = job(request_id, prompt_tokens, max_tokens);
                job.sampling.temperature = 0.9;
                job.sampling.seed = Some(seed);
                job.sampling.logprobs = Some(3);
                job
            };
            let mut greedy = job("greedy", 6, 9);
            greedy.sampling.logprobs = Some(2);
            vec![sampled("a", 8, 7, 5), sampled("b", 10, 15, 6), greedy]
        };
        let (one_at_a_time, counts) = run_counted_queueing(jobs(), true, false);
        let (queued, queued_counts) = run_counted_queueing(jobs(), true, true);
        assert_eq!(queued, one_at_a_time);
        for (request_id, length) in [("a", 7), ("b", 15), ("greedy", 9)] {
            assert_eq!(queued[request_id].0.len(), length, "request {request_id}");
            assert_eq!(
                queued[request_id].1, length,
                "request {request_id}'s logprobs"
            );
        }
        assert!(counted(&counts)[2] > 0, "no drawn step ran");
        assert_eq!(counted(&queued_counts), counted(&counts));
    }

    /// Requests that sample get the same tokens and logprobs from row draws, with the logits kept by the backend
    /// (a GPU's drawn steps) and only the rows whose top-p nucleus reaches past the candidates read back, as from
    /// their whole rows on the host; also beside a request that needs every row's logits.
    #[test]
    fn row_draws_give_what_the_whole_rows_give() {
        let sampled = |request_id: &str, temperature, top_k, top_p, logprobs| {
            let mut job = job(request_id, 8, 12);
            job.sampling.temperature = temperature;
            job.sampling.top_k = top_k;
            job.sampling.top_p = top_p;
            job.sampling.logprobs = logprobs;
            job.sampling.seed = Some(request_id.len() as u64 * 7);
            job
        };
        let jobs = || {
            vec![
                sampled("plain", 1.0, 0, 1.0, None),
                sampled("nucleus", 0.8, 0, 0.9, None),
                sampled("wide_nucleus", 3.0, 0, 0.999, None),
                sampled("top_k_with_logprobs", 1.2, 5, 1.0, Some(3)),
                sampled("greedy_with_logprobs", 0.0, 0, 1.0, Some(2)),
            ]
        };
        let (on_host, host_counts) = run_counted(jobs(), false);
        let (kept, kept_counts) = run_counted(jobs(), true);
        assert_eq!(kept, on_host);
        let [logits_steps, greedy_steps, drawn_steps, rows_read] = counted(&kept_counts);
        assert_eq!((logits_steps, greedy_steps), (0, 0));
        assert!(drawn_steps >= 12, "{drawn_steps} drawn steps");
        assert!(rows_read > 0, "no nucleus reached past the candidates");
        // Without device draws every step takes the logits.
        assert_eq!(counted(&host_counts)[1..], [0, 0, 0]);
        for (request_id, (tokens, logprobs)) in &on_host {
            assert_eq!(tokens.len(), 12, "request {request_id}");
            assert_eq!(*logprobs > 0, request_id.ends_with("logprobs"));
        }

        // A top-k past the candidates takes the whole rows for its steps; the others' tokens stay theirs.
        let mut with_wide_top_k = jobs();
        with_wide_top_k.push(sampled(
            "wide_top_k",
            1.0,
            DRAW_CANDIDATES as u32 + 1,
            1.0,
            None,
        ));
        let (mixed, mixed_counts) = run_counted(with_wide_top_k, true);
        for (request_id, generated) in &on_host {
            assert_eq!(&mixed[request_id], generated, "request {request_id}");
        }
        assert_eq!(mixed["wide_top_k"].0.len(), 12);
        // wide_top_k's prompt (one chunk) and at least its eleven decode steps; the other prompts are drawn.
        let [logits_steps, ..] = counted(&mixed_counts);
        assert!(logits_steps >= 12, "{logits_steps} logits steps");
    }

    fn job(request_id: &str, prompt_tokens: u32, max_tokens: u32) -> Job {
        Job::first_attempt(
            request_id.into(),
            (0..prompt_tokens).map(|i| 1000 + i).collect(),
            WireSampling {
                max_tokens,
                ignore_eos: true,
                top_p: 1.0,
                ..WireSampling::default()
            },
        )
    }

    /// A finished request's slot is taken by the newest one (`swap_remove`); prefill must still go oldest first.
    #[test]
    fn prefill_chunks_go_to_the_oldest_request_when_the_batch_is_reordered() {
        let tokenizer = shipped_tokenizer();
        let engine = Engine::cpu(builtin_model(), EngineConfig::default()).expect("engine");
        let config = test_config();
        let (commands, command_receiver) = mpsc::channel();
        let (output_sender, mut outputs) = tokio::sync::mpsc::unbounded_channel();
        // One chunk of prompt and two tokens, then two prompts of eight chunks admitted after it, in this order.
        for job in [job("short", 4, 2), job("older", 64, 1), job("newer", 64, 1)] {
            commands.send(BatchCommand::Start(job)).expect("send");
        }
        commands.send(BatchCommand::Drain).expect("send");
        let engine_thread = std::thread::spawn(move || {
            run_batcher(engine, tokenizer, config, command_receiver, output_sender)
        });
        let mut first_tokens = Vec::new();
        while let Some(output) = outputs.blocking_recv() {
            if let BatchOutput::Tokens { request_id, update } = output
                && update.start_index == 0
                && !update.token_ids.is_empty()
            {
                first_tokens.push(request_id);
            }
        }
        engine_thread.join().expect("the engine thread ends");
        assert_eq!(first_tokens, ["short", "older", "newer"]);
    }
}
