//! [`Engine`]: sequences over the paged KV cache, driven step by step. It owns the host-side bookkeeping
//! (block tables, prefix cache, which tokens are computed) and asks its [`Backend`] to run forward steps.
//! Prefill runs a prompt in chunks; decode runs one new token for each of a batch of sequences of any
//! lengths in one step, which is what continuous batching builds on.

use std::collections::{HashMap, VecDeque};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, Device};
use crate::backend::{Backend, SequenceStep};
use crate::error::EngineError;
use crate::kv_cache::layout::KvLayout;
use crate::kv_cache::{BlockTable, KvCacheEvent, KvCacheManager};
use crate::model::config::ModelConfig;
use crate::model::weights::ModelWeights;
use crate::sampling::{RowDraw, RowDrawParams, Sampler, SamplingParams, TokenLogprobs};

/// Identifies a sequence within one engine.
pub type SequenceId = u64;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size_tokens: usize,
    /// Blocks in the KV pool; with the block size, this bounds the tokens held at once.
    pub num_blocks: usize,
    /// Prefill runs at most this many tokens per forward step.
    pub prefill_chunk_tokens: usize,
    /// Reuse the KV of full blocks shared with earlier prompts.
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size_tokens: 16,
            num_blocks: 1024,
            prefill_chunk_tokens: 512,
            prefix_caching: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` were generated.
    Length,
    /// A stop token id was generated (it is the last output token).
    Stop,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
        }
    }
}

/// The outcome of [`Engine::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    /// One entry per output token when logprobs were requested, else empty.
    pub logprobs: Vec<TokenLogprobs>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_prompt_tokens: usize,
}

struct Sequence {
    /// Every token of the sequence: the prompt, then each decoded token.
    token_ids: Vec<u32>,
    /// The KV of `token_ids[..num_computed_tokens]` is in the cache.
    num_computed_tokens: usize,
    block_table: BlockTable,
    cached_prompt_tokens: usize,
}

pub struct Engine {
    backend: Box<dyn Backend>,
    kv_cache: KvCacheManager,
    sequences: HashMap<SequenceId, Sequence>,
    next_sequence_id: SequenceId,
    config: EngineConfig,
    /// The last step's logits, `[batch, vocab_size]`.
    logits: Vec<f32>,
    /// The last greedy step's tokens, one per sequence.
    greedy_tokens: Vec<u32>,
    /// The last drawn step's rows ([`Engine::decode_drawn`]).
    draws: Vec<RowDraw>,
    /// Whether the last step was drawn: then [`Engine::step_logits`] may read its rows.
    last_step_drawn: bool,
    /// A row of the last drawn step's logits read back from the backend.
    logits_row: Vec<f32>,
    /// Whether [`Engine::decode_greedy_ahead`] and [`Engine::decode_drawn_ahead`] queue the next step: by default
    /// where the backend runs steps while the host works ([`Backend::queues_steps`]); [`Engine::set_queue_ahead`]
    /// overrides it.
    queue_ahead: bool,
    /// The step the last `decode_*_ahead` call queued after its own.
    queued_ahead: Option<QueuedAhead>,
    /// Where the backend runs steps inside the call: what the steps the engine ran when it queued them picked,
    /// oldest first.
    ran_steps: VecDeque<RanStep>,
    /// Steps queued ahead so far, and how many of them a call took.
    queued_ahead_steps: QueuedAheadSteps,
}

/// A step queued after a call's own ([`Engine::decode_greedy_ahead`], [`Engine::decode_drawn_ahead`]): its
/// sequences in row order, its inputs (the tokens that call returned), and for a drawn step its rows' parameters.
struct QueuedAhead {
    ids: Vec<SequenceId>,
    inputs: Vec<u32>,
    params: Option<Vec<RowDrawParams>>,
}

/// What a step run at once in place of being queued picked (the engine's `ran_steps`): its tokens, or its draws
/// and the logits they were drawn from.
enum RanStep {
    Greedy(Vec<u32>),
    Drawn(Vec<RowDraw>, Vec<f32>),
}

impl RanStep {
    fn token(&self, row: usize) -> Option<u32> {
        match self {
            Self::Greedy(tokens) => tokens.get(row).copied(),
            Self::Drawn(draws, _) => draws.get(row).map(|draw| draw.drawn_token),
        }
    }
}

/// The kind of a step the engine queues: greedy, or drawn with each row's parameters.
#[derive(Clone, Copy)]
enum StepKind<'p> {
    Greedy,
    Drawn(&'p [RowDrawParams]),
}

/// How many steps [`Engine::decode_greedy_ahead`] and [`Engine::decode_drawn_ahead`] queued ahead, how many of
/// them the next call took, and how many were dropped (the GPU ran them for nothing); at most one is neither yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueuedAheadSteps {
    pub queued: u64,
    pub taken: u64,
    pub dropped: u64,
}

impl Engine {
    /// An engine over `backend`, whose KV pool must match `config`'s block size and count.
    pub fn new(backend: Box<dyn Backend>, config: EngineConfig) -> Result<Self, EngineError> {
        let layout = backend.kv_layout();
        if layout.block_size_tokens != config.block_size_tokens
            || backend.num_blocks() != config.num_blocks
        {
            return Err(EngineError::Config(format!(
                "backend pool ({} blocks of {} tokens) differs from the engine config ({} of {})",
                backend.num_blocks(),
                layout.block_size_tokens,
                config.num_blocks,
                config.block_size_tokens
            )));
        }
        if config.prefill_chunk_tokens == 0 {
            return Err(EngineError::Config(
                "prefill_chunk_tokens must be at least 1".into(),
            ));
        }
        let queue_ahead = backend.queues_steps();
        Ok(Self {
            queue_ahead,
            queued_ahead: None,
            ran_steps: VecDeque::new(),
            queued_ahead_steps: QueuedAheadSteps::default(),
            kv_cache: KvCacheManager::new(
                config.num_blocks,
                config.block_size_tokens,
                config.prefix_caching,
            ),
            backend,
            sequences: HashMap::new(),
            next_sequence_id: 0,
            config,
            logits: Vec::new(),
            greedy_tokens: Vec::new(),
            draws: Vec::new(),
            last_step_drawn: false,
            logits_row: Vec::new(),
        })
    }

    /// An engine on the CPU backend.
    pub fn cpu(weights: ModelWeights, config: EngineConfig) -> Result<Self, EngineError> {
        let backend = CpuBackend::new(weights, config.num_blocks, config.block_size_tokens)?;
        Self::new(Box::new(backend), config)
    }

    /// An engine on the CUDA backend, with the weights and the KV pool on GPU `ordinal`.
    pub fn cuda(
        weights: &ModelWeights,
        config: EngineConfig,
        ordinal: usize,
    ) -> Result<Self, EngineError> {
        let backend = CudaBackend::new(
            weights,
            ordinal,
            config.num_blocks,
            config.block_size_tokens,
        )?;
        Self::new(Box::new(backend), config)
    }

    /// An engine on `device` (`cpu` or `cuda:N`).
    pub fn on_device(
        weights: ModelWeights,
        config: EngineConfig,
        device: Device,
    ) -> Result<Self, EngineError> {
        match device {
            Device::Cpu => Self::cpu(weights, config),
            Device::Cuda(ordinal) => Self::cuda(&weights, config, ordinal),
        }
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.backend.model_config()
    }

    pub fn kv_layout(&self) -> KvLayout {
        self.backend.kv_layout()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn num_free_blocks(&self) -> usize {
        self.kv_cache.num_free_blocks()
    }

    /// Full blocks currently registered in the prefix cache.
    pub fn num_cached_blocks(&self) -> usize {
        self.kv_cache.num_cached_blocks()
    }

    /// From now on, record every change to the prefix cache's set of blocks for
    /// [`Engine::take_kv_cache_events`] (off by default: nobody would drain them).
    pub fn record_kv_cache_events(&mut self) {
        self.kv_cache.record_events();
    }

    /// The changes to the prefix cache since the last call, in order (blocks stored, blocks evicted).
    pub fn take_kv_cache_events(&mut self) -> Vec<KvCacheEvent> {
        self.kv_cache.take_events()
    }

    /// The chained hashes ([`tandem_events::blocks`]) of every block in the prefix cache, sorted.
    pub fn cached_block_hashes(&self) -> Vec<u64> {
        self.kv_cache.cached_block_hashes()
    }

    fn sequence(&self, id: SequenceId) -> Result<&Sequence, EngineError> {
        self.sequences
            .get(&id)
            .ok_or(EngineError::UnknownSequence(id))
    }

    fn check_tokens(&self, token_ids: &[u32]) -> Result<(), EngineError> {
        let vocab_size = self.model_config().vocab_size;
        match token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            Some(&token_id) => Err(EngineError::TokenOutOfVocabulary {
                token_id,
                vocab_size,
            }),
            None => Ok(()),
        }
    }

    /// Registers a prompt and reserves KV blocks for all of it, reusing cached prefix blocks.
    pub fn add_sequence(&mut self, prompt: &[u32]) -> Result<SequenceId, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        self.check_tokens(prompt)?;
        let (mut block_table, cached_prompt_tokens) = self.kv_cache.start_sequence(prompt);
        if let Err(error) = self.kv_cache.reserve(&mut block_table, prompt.len()) {
            self.kv_cache.release(block_table);
            return Err(error);
        }
        let id = self.next_sequence_id;
        self.next_sequence_id += 1;
        self.sequences.insert(
            id,
            Sequence {
                token_ids: prompt.to_vec(),
                num_computed_tokens: cached_prompt_tokens,
                block_table,
                cached_prompt_tokens,
            },
        );
        Ok(id)
    }

    /// Prompt tokens of `id` whose KV was reused from the prefix cache.
    pub fn cached_prompt_tokens(&self, id: SequenceId) -> Result<usize, EngineError> {
        Ok(self.sequence(id)?.cached_prompt_tokens)
    }

    /// Every token of `id` so far.
    pub fn token_ids(&self, id: SequenceId) -> Result<&[u32], EngineError> {
        Ok(&self.sequence(id)?.token_ids)
    }

    /// Runs the rest of the prompt of `id`, chunk by chunk, and returns the logits that follow it.
    pub fn prefill(&mut self, id: SequenceId) -> Result<&[f32], EngineError> {
        while !self.prefill_chunk(id, self.config.prefill_chunk_tokens)? {}
        Ok(&self.logits)
    }

    /// Runs up to `max_tokens` of the prompt of `id` not yet computed; returns true when the prompt is done,
    /// and then [`Engine::logits`] holds the logits that follow it.
    pub fn prefill_chunk(
        &mut self,
        id: SequenceId,
        max_tokens: usize,
    ) -> Result<bool, EngineError> {
        self.prefill_chunk_with(id, max_tokens, None)
    }

    /// Runs the rest of the prompt of `id` like [`Engine::prefill`], and returns the draw of the token that
    /// follows it for `params` (as [`Engine::decode_drawn`] does for a decode step: on a GPU, the logits stay
    /// there unless [`Engine::step_logits`] reads them).
    pub fn prefill_drawn(
        &mut self,
        id: SequenceId,
        params: &RowDrawParams,
    ) -> Result<&RowDraw, EngineError> {
        while self
            .prefill_chunk_drawn(id, self.config.prefill_chunk_tokens, params)?
            .is_none()
        {}
        self.draws.first().ok_or_else(|| {
            EngineError::LogitsNotKept("the prompt's last chunk left no draw".into())
        })
    }

    /// Like [`Engine::prefill_chunk`]; the chunk that ends the prompt also draws the token that follows it for
    /// `params`, and returns that draw.
    pub fn prefill_chunk_drawn(
        &mut self,
        id: SequenceId,
        max_tokens: usize,
        params: &RowDrawParams,
    ) -> Result<Option<&RowDraw>, EngineError> {
        let done = self.prefill_chunk_with(id, max_tokens, Some(params))?;
        Ok(if done { self.draws.first() } else { None })
    }

    /// One prompt chunk; with `draw`, the chunk that ends the prompt is a drawn step.
    fn prefill_chunk_with(
        &mut self,
        id: SequenceId,
        max_tokens: usize,
        draw: Option<&RowDrawParams>,
    ) -> Result<bool, EngineError> {
        self.settle_queued()?;
        let sequence = self
            .sequences
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        let start = sequence.num_computed_tokens;
        let pending = sequence.token_ids.len() - start;
        if pending == 0 {
            if draw.is_some() {
                // Nothing left to run, so nothing to draw from.
                return Err(EngineError::LogitsNotKept(format!(
                    "the prompt of sequence {id} is already computed"
                )));
            }
            return Ok(true);
        }
        let end = start + pending.min(max_tokens.max(1));
        let step = SequenceStep {
            token_ids: &sequence.token_ids[start..end],
            start_position: start,
            block_table: &sequence.block_table.blocks,
        };
        let done = end == sequence.token_ids.len();
        match draw {
            Some(params) if done => {
                self.logits.clear();
                self.last_step_drawn = false;
                self.backend.forward_drawn(
                    &[step],
                    std::slice::from_ref(params),
                    &mut self.logits,
                    &mut self.draws,
                )?;
                self.last_step_drawn = true;
            }
            _ => {
                self.last_step_drawn = false;
                self.backend.forward(&[step], &mut self.logits)?;
            }
        }
        sequence.num_computed_tokens = end;
        self.kv_cache
            .register_full_blocks(&mut sequence.block_table, &sequence.token_ids, end);
        Ok(done)
    }

    /// The logits of the last step, `[batch, vocab_size]` (empty after a drawn step whose backend kept them).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Appends one token to each listed (fully prefilled) sequence and runs them all in one step; returns
    /// the logits that follow each, `[steps.len(), vocab_size]` in the order given.
    pub fn decode(&mut self, steps: &[(SequenceId, u32)]) -> Result<&[f32], EngineError> {
        self.decode_step(steps)?;
        Ok(&self.logits)
    }

    /// Like [`Engine::decode`] for greedy sequences: returns the argmax token that follows each, picked by
    /// the backend (on the GPU for CUDA, so no logits cross to the host).
    pub fn decode_greedy(&mut self, steps: &[(SequenceId, u32)]) -> Result<&[u32], EngineError> {
        self.decode_queued(steps, StepKind::Greedy, None)?;
        Ok(&self.greedy_tokens)
    }

    /// Like [`Engine::decode_greedy`], and before it returns, queues the next greedy step of the same
    /// sequences, whose inputs are the tokens it returns, so that the GPU runs it while the caller handles
    /// them (where queueing ahead is on: [`Engine::set_queue_ahead`]). The next call whose steps are exactly
    /// those (the same sequences in the same order, with these tokens) takes that step's tokens instead of
    /// running one. Any other step, and any change to the sequences' blocks (a removal, an import, a push),
    /// first waits for the queued step and drops it, so its only cost is the GPU time of a step nobody takes
    /// (its KV writes go to the slot past each sequence's computed tokens, in a block reserved for it).
    pub fn decode_greedy_ahead(
        &mut self,
        steps: &[(SequenceId, u32)],
    ) -> Result<&[u32], EngineError> {
        self.decode_queued(steps, StepKind::Greedy, Some(StepKind::Greedy))?;
        Ok(&self.greedy_tokens)
    }

    /// Like [`Engine::decode_drawn`], and before it returns, queues the next drawn step of the same sequences
    /// with `next_params`, each row's input being the token its draw drew (`RowDraw::drawn_token`), as
    /// [`Engine::decode_greedy_ahead`] does for greedy steps. Only for rows whose sampler takes the drawn token
    /// (greedy or a plain temperature: [`crate::Sampler::takes_drawn_token`]), with the uniforms that follow
    /// ([`crate::Sampler::row_draw_params_after_next`]); the next call takes the queued step when its steps are
    /// those sequences with the drawn tokens and its parameters are `next_params`. Where a step is queued after
    /// this one, its logits are not kept: [`Engine::step_logits`] errors.
    pub fn decode_drawn_ahead(
        &mut self,
        steps: &[(SequenceId, u32)],
        params: &[RowDrawParams],
        next_params: &[RowDrawParams],
    ) -> Result<&[RowDraw], EngineError> {
        for given in [params, next_params] {
            if given.len() != steps.len() {
                return Err(EngineError::Config(format!(
                    "a drawn step of {} sequences was given {} rows of sampling parameters",
                    steps.len(),
                    given.len()
                )));
            }
        }
        self.decode_queued(
            steps,
            StepKind::Drawn(params),
            Some(StepKind::Drawn(next_params)),
        )?;
        Ok(&self.draws)
    }

    /// Turns queueing ahead ([`Engine::decode_greedy_ahead`], [`Engine::decode_drawn_ahead`]) on or off. On by
    /// default where the backend runs steps while the host works (a GPU); where it does not, a step queued ahead
    /// runs inside the call, which only serves to test the bookkeeping.
    pub fn set_queue_ahead(&mut self, on: bool) -> Result<(), EngineError> {
        self.settle_queued()?;
        self.queue_ahead = on;
        Ok(())
    }

    /// How many steps were queued ahead so far, and how many of them were taken.
    pub fn queued_ahead_steps(&self) -> QueuedAheadSteps {
        self.queued_ahead_steps
    }

    /// Waits for the steps queued on the backend and forgets them.
    fn settle_queued(&mut self) -> Result<(), EngineError> {
        if self.queued_ahead.take().is_some() {
            self.queued_ahead_steps.dropped += 1;
        }
        self.ran_steps.clear();
        self.backend.drop_queued_steps()
    }

    /// A decode step of `kind` through the backend's queue, which leaves its picks in `greedy_tokens` or `draws`:
    /// taken from the step queued ahead where it is this one, else queued now; with `next`, the step after it is
    /// queued before this one's picks are taken.
    fn decode_queued(
        &mut self,
        steps: &[(SequenceId, u32)],
        kind: StepKind<'_>,
        next: Option<StepKind<'_>>,
    ) -> Result<(), EngineError> {
        self.last_step_drawn = false;
        // The step queued ahead is this one when it has these sequences in this order, as inputs the tokens the
        // last call returned (which it took on the device), and the same kind and parameters.
        let queued =
            self.queued_ahead.as_ref().is_some_and(|ahead| {
                let same_kind = match (kind, &ahead.params) {
                    (StepKind::Greedy, None) => true,
                    (StepKind::Drawn(params), Some(queued_params)) => {
                        params == queued_params.as_slice()
                    }
                    _ => false,
                };
                same_kind
                    && ahead.ids.len() == steps.len()
                    && ahead.ids.iter().zip(&ahead.inputs).zip(steps).all(
                        |((&queued_id, &input), &(id, token))| queued_id == id && input == token,
                    )
            });
        if queued {
            self.queued_ahead = None;
        } else {
            self.settle_queued()?;
        }
        if let Err(error) = self.append_decode_tokens(steps) {
            if queued {
                self.queued_ahead_steps.dropped += 1;
            }
            let _ = self.settle_queued();
            return Err(error);
        }
        match self.run_queued(steps, kind, queued, next) {
            Ok(queued_next) => {
                if queued {
                    self.queued_ahead_steps.taken += 1;
                }
                self.commit_decode_tokens(steps);
                if let StepKind::Drawn(_) = kind {
                    // This step's logits are still where the backend keeps them unless a step was queued after it.
                    self.last_step_drawn = queued_next.is_none();
                }
                self.queued_ahead = queued_next;
                Ok(())
            }
            Err(error) => {
                self.pop_decode_tokens(steps);
                if queued {
                    self.queued_ahead_steps.dropped += 1;
                }
                // What failed may have left steps queued; none of them is what a caller expects any more.
                let _ = self.settle_queued();
                Err(error)
            }
        }
    }

    /// Queues the step of `steps` (whose tokens are appended) unless `queued` says it is queued already, queues
    /// the step after it when `next` asks and queueing ahead is on, and takes this step's picks. Returns the
    /// step queued after it, if one was.
    fn run_queued(
        &mut self,
        steps: &[(SequenceId, u32)],
        kind: StepKind<'_>,
        queued: bool,
        next: Option<StepKind<'_>>,
    ) -> Result<Option<QueuedAhead>, EngineError> {
        if let StepKind::Drawn(_) = kind {
            // Left empty by a backend that keeps the logits, so no earlier step's rows pass for this one's.
            self.logits.clear();
        }
        if !queued {
            let batch = decode_batch(&self.sequences, steps, 0)?;
            queue_step(
                self.backend.as_mut(),
                &mut self.ran_steps,
                &batch,
                kind,
                false,
            )?;
        }
        let mut queued_next = None;
        if let Some(next_kind) = next.filter(|_| self.queue_ahead)
            && self.reserve_next_tokens(steps)
        {
            let batch = decode_batch(&self.sequences, steps, 1)?;
            queue_step(
                self.backend.as_mut(),
                &mut self.ran_steps,
                &batch,
                next_kind,
                true,
            )?;
            self.queued_ahead_steps.queued += 1;
            queued_next = Some(QueuedAhead {
                ids: steps.iter().map(|&(id, _)| id).collect(),
                inputs: Vec::new(),
                params: match next_kind {
                    StepKind::Greedy => None,
                    StepKind::Drawn(params) => Some(params.to_vec()),
                },
            });
        }
        match kind {
            StepKind::Greedy => take_greedy_step(
                self.backend.as_mut(),
                &mut self.ran_steps,
                &mut self.greedy_tokens,
            )?,
            StepKind::Drawn(_) => take_drawn_step(
                self.backend.as_mut(),
                &mut self.ran_steps,
                &mut self.draws,
                &mut self.logits,
            )?,
        }
        // The queued step's inputs are this step's picks.
        if let Some(ahead) = &mut queued_next {
            ahead.inputs = match kind {
                StepKind::Greedy => self.greedy_tokens.clone(),
                StepKind::Drawn(_) => self.draws.iter().map(|draw| draw.drawn_token).collect(),
            };
        }
        Ok(queued_next)
    }

    /// Reserves room for one more token after the appended ones of every sequence of `steps`, for the step
    /// queued ahead; false when the pool has no block for one (then none is queued: the next step takes the
    /// usual way and gives up the newest request as it would have).
    fn reserve_next_tokens(&mut self, steps: &[(SequenceId, u32)]) -> bool {
        steps.iter().all(|&(id, _)| {
            self.sequences.get_mut(&id).is_some_and(|sequence| {
                let tokens = sequence.token_ids.len() + 1;
                self.kv_cache
                    .reserve(&mut sequence.block_table, tokens)
                    .is_ok()
            })
        })
    }

    /// Whether drawn steps ([`Engine::decode_drawn`], [`Engine::prefill_drawn`]) draw on the device. Where they
    /// do not, sampling the logits directly is cheaper, and gives the same tokens.
    pub fn draws_on_device(&self) -> bool {
        self.backend.draws_on_device()
    }

    /// Like [`Engine::decode`] for a batch where some sequence samples: returns each row's [`RowDraw`] for its
    /// `params` (one per step, in the order given). A GPU backend computes them on the device, so the logits
    /// stay there; a row whose top-p nucleus reaches past the candidates reads its logits with
    /// [`Engine::step_logits`].
    pub fn decode_drawn(
        &mut self,
        steps: &[(SequenceId, u32)],
        params: &[RowDrawParams],
    ) -> Result<&[RowDraw], EngineError> {
        if params.len() != steps.len() {
            return Err(EngineError::Config(format!(
                "a drawn step of {} sequences was given {} rows of sampling parameters",
                steps.len(),
                params.len()
            )));
        }
        self.decode_queued(steps, StepKind::Drawn(params), None)?;
        Ok(&self.draws)
    }

    /// Row `row`'s logits of the last step, which must have been [`Engine::decode_drawn`]'s.
    pub fn step_logits(&mut self, row: usize) -> Result<&[f32], EngineError> {
        let rows = self.draws.len();
        if !self.last_step_drawn || row >= rows {
            return Err(EngineError::LogitsNotKept(format!(
                "row {row} of the last step: only the rows of the last drawn step ({rows}) are kept"
            )));
        }
        let vocab_size = self.model_config().vocab_size;
        if self.logits.len() == rows * vocab_size {
            return Ok(&self.logits[row * vocab_size..(row + 1) * vocab_size]);
        }
        self.backend.read_logits_row(row, &mut self.logits_row)?;
        Ok(&self.logits_row)
    }

    fn decode_step(&mut self, steps: &[(SequenceId, u32)]) -> Result<(), EngineError> {
        self.settle_queued()?;
        self.last_step_drawn = false;
        self.append_decode_tokens(steps)?;
        let batch = decode_batch(&self.sequences, steps, 0)?;
        let result = self.backend.forward(&batch, &mut self.logits);
        drop(batch);
        match result {
            Ok(()) => self.commit_decode_tokens(steps),
            Err(_) => self.pop_decode_tokens(steps),
        }
        result
    }

    /// Checks `steps` and appends each token to its sequence, with a block for it where it starts one.
    fn append_decode_tokens(&mut self, steps: &[(SequenceId, u32)]) -> Result<(), EngineError> {
        let block_size = self.config.block_size_tokens;
        let mut needed_blocks = 0;
        for (index, &(id, token_id)) in steps.iter().enumerate() {
            self.check_tokens(&[token_id])?;
            if steps[..index].iter().any(|&(other, _)| other == id) {
                return Err(EngineError::DuplicateInBatch(id));
            }
            let sequence = self.sequence(id)?;
            let pending_tokens = sequence.token_ids.len() - sequence.num_computed_tokens;
            if pending_tokens > 0 {
                return Err(EngineError::NotPrefilled {
                    sequence_id: id,
                    pending_tokens,
                });
            }
            needed_blocks += (sequence.token_ids.len() + 1)
                .div_ceil(block_size)
                .saturating_sub(sequence.block_table.blocks.len());
        }
        if needed_blocks > self.kv_cache.num_free_blocks() {
            return Err(EngineError::OutOfBlocks {
                needed_blocks,
                free_blocks: self.kv_cache.num_free_blocks(),
            });
        }
        for &(id, token_id) in steps {
            let Some(sequence) = self.sequences.get_mut(&id) else {
                return Err(EngineError::UnknownSequence(id));
            };
            sequence.token_ids.push(token_id);
            self.kv_cache
                .reserve(&mut sequence.block_table, sequence.token_ids.len())?;
        }
        Ok(())
    }

    /// After a step of `steps` ran: their appended tokens are computed.
    fn commit_decode_tokens(&mut self, steps: &[(SequenceId, u32)]) {
        for &(id, _) in steps {
            if let Some(sequence) = self.sequences.get_mut(&id) {
                sequence.num_computed_tokens = sequence.token_ids.len();
                self.kv_cache.register_full_blocks(
                    &mut sequence.block_table,
                    &sequence.token_ids,
                    sequence.num_computed_tokens,
                );
            }
        }
    }

    /// After a step of `steps` failed: their appended tokens are taken back (the blocks reserved for them stay).
    fn pop_decode_tokens(&mut self, steps: &[(SequenceId, u32)]) {
        for &(id, _) in steps {
            if let Some(sequence) = self.sequences.get_mut(&id) {
                sequence.token_ids.pop();
            }
        }
    }

    /// Forgets a sequence and frees its blocks; its full blocks stay in the prefix cache until reused.
    pub fn remove_sequence(&mut self, id: SequenceId) -> Result<(), EngineError> {
        // A step queued ahead may still write into this sequence's blocks.
        self.settle_queued()?;
        let sequence = self
            .sequences
            .remove(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        self.kv_cache.release(sequence.block_table);
        Ok(())
    }

    /// The computed KV of `id` with its token ids, in the byte layout documented in [`KvLayout`] and
    /// `workers/KV_LAYOUT.md`.
    pub fn export_kv(&self, id: SequenceId) -> Result<Vec<u8>, EngineError> {
        let sequence = self.sequence(id)?;
        let num_tokens = sequence.num_computed_tokens;
        if num_tokens == 0 {
            return Err(EngineError::NotPrefilled {
                sequence_id: id,
                pending_tokens: sequence.token_ids.len(),
            });
        }
        let layout = self.kv_layout();
        let mut bytes = Vec::new();
        layout.encode_export_header(&sequence.token_ids[..num_tokens], &mut bytes);
        let num_blocks = num_tokens.div_ceil(layout.block_size_tokens);
        for (index, &block) in sequence.block_table.blocks[..num_blocks].iter().enumerate() {
            let start = bytes.len();
            bytes.resize(start + layout.block_bytes(), 0);
            self.backend.read_block(block, &mut bytes[start..])?;
            let used_slots =
                (num_tokens - index * layout.block_size_tokens).min(layout.block_size_tokens);
            layout.zero_unused_slots(&mut bytes[start..], used_slots);
        }
        Ok(bytes)
    }

    /// Creates a sequence from an export (of this engine or another with the same model and block size).
    /// Its tokens are all computed: the next call for it is [`Engine::decode`].
    pub fn import_kv(&mut self, bytes: &[u8]) -> Result<SequenceId, EngineError> {
        self.settle_queued()?;
        let layout = self.kv_layout();
        let parsed = layout.parse_export(bytes)?;
        self.check_tokens(&parsed.token_ids)?;
        let mut block_table = BlockTable::default();
        self.kv_cache
            .reserve(&mut block_table, parsed.token_ids.len())?;
        for (&block, block_bytes) in block_table.blocks.iter().zip(&parsed.blocks) {
            self.backend.write_block(block, block_bytes)?;
        }
        let num_tokens = parsed.token_ids.len();
        self.kv_cache
            .register_full_blocks(&mut block_table, &parsed.token_ids, num_tokens);
        let id = self.next_sequence_id;
        self.next_sequence_id += 1;
        self.sequences.insert(
            id,
            Sequence {
                token_ids: parsed.token_ids,
                num_computed_tokens: num_tokens,
                block_table,
                cached_prompt_tokens: 0,
            },
        );
        Ok(id)
    }

    /// Generates for one prompt from start to finish: prefill, then decode until `max_tokens` or a stop
    /// token. The sequence is removed at the end (its full blocks stay cached for later prompts).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
    ) -> Result<Generation, EngineError> {
        let id = self.add_sequence(prompt)?;
        let result = self.generate_for(id, params);
        self.remove_sequence(id)?;
        result
    }

    fn generate_for(
        &mut self,
        id: SequenceId,
        params: &SamplingParams,
    ) -> Result<Generation, EngineError> {
        let mut sampler = Sampler::new(params.clone());
        let mut generation = Generation {
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens: self.sequence(id)?.token_ids.len(),
            cached_prompt_tokens: self.cached_prompt_tokens(id)?,
        };
        if params.max_tokens == 0 {
            return Ok(generation);
        }
        self.prefill(id)?;
        loop {
            let sampled = sampler.sample(&self.logits);
            generation.token_ids.push(sampled.token_id);
            generation.logprobs.extend(sampled.logprobs);
            if sampler.is_stop_token(sampled.token_id) {
                generation.finish_reason = FinishReason::Stop;
                break;
            }
            if generation.token_ids.len() >= params.max_tokens {
                break;
            }
            self.decode(&[(id, sampled.token_id)])?;
        }
        Ok(generation)
    }

    /// The KV blocks reserved for `id`, in token order: what a decode worker names as the destination of a
    /// KV transfer.
    pub fn kv_block_ids(&self, id: SequenceId) -> Result<&[crate::kv_cache::BlockId], EngineError> {
        Ok(&self.sequence(id)?.block_table.blocks)
    }

    /// One layer's K and V for the computed tokens of `id` from `from_token` on, for the KV transfer: for
    /// each block from `from_token / block_size_tokens` to the last computed one, that block's
    /// `[k, v][kv_head][slot][dim]` little-endian f32 (the layer's contiguous part of the block layout in
    /// `KV_LAYOUT.md`), slots past the computed tokens zero. `from_token` must be a multiple of the block
    /// size (a destination's cached prefix is whole blocks) and below the computed tokens.
    pub fn export_kv_layer(
        &self,
        id: SequenceId,
        layer: usize,
        from_token: usize,
    ) -> Result<Vec<u8>, EngineError> {
        Ok(self.export_kv_layer_bytes(id, layer, from_token)?.to_vec())
    }

    /// [`Engine::export_kv_layer`] into a buffer the backend picks: on a GPU, pinned host memory the copy went
    /// straight into, which the TCP transport then sends from.
    pub fn export_kv_layer_bytes(
        &self,
        id: SequenceId,
        layer: usize,
        from_token: usize,
    ) -> Result<bytes::Bytes, EngineError> {
        let sequence = self.sequence(id)?;
        let layout = self.kv_layout();
        let block_size = layout.block_size_tokens;
        let num_tokens = sequence.num_computed_tokens;
        if num_tokens == 0 {
            return Err(EngineError::NotPrefilled {
                sequence_id: id,
                pending_tokens: sequence.token_ids.len(),
            });
        }
        if layer >= layout.num_layers
            || !from_token.is_multiple_of(block_size)
            || from_token >= num_tokens
        {
            return Err(EngineError::KvImport(format!(
                "cannot export layer {layer} from token {from_token} of sequence {id}: the model has {} layers, \
                 blocks hold {block_size} tokens and {num_tokens} tokens are computed",
                layout.num_layers
            )));
        }
        let layer_bytes = layout.block_bytes() / layout.num_layers;
        let first_block = from_token / block_size;
        let end_block = num_tokens.div_ceil(block_size);
        let last_used_slots = num_tokens - (end_block - 1) * block_size;
        self.backend.read_layer_bytes(
            &sequence.block_table.blocks[first_block..end_block],
            layer,
            last_used_slots,
            (end_block - first_block) * layer_bytes,
        )
    }

    /// Text naming this engine's KV pool on its GPU, for a prefill engine on this host to write a prompt's
    /// KV straight into it ([`Engine::push_kv_to_device`]); `None` on the CPU backend.
    pub fn device_kv_handle(&self) -> Result<Option<String>, EngineError> {
        self.backend.device_kv_handle()
    }

    /// Copies the computed KV of `id` from `from_token` on (a multiple of the block size) straight into the
    /// blocks `destination_blocks` of the device pool `target` names ([`Engine::device_kv_handle`] of the
    /// decode engine): one device copy on the same GPU, a peer copy to another GPU of this process, or
    /// through CUDA IPC into another process on this host. Slots past the computed tokens of the last block
    /// are copied as they are (attention never reads them). Returns the bytes moved and the path taken.
    pub fn push_kv_to_device(
        &mut self,
        id: SequenceId,
        from_token: usize,
        target: &str,
        destination_blocks: &[crate::kv_cache::BlockId],
    ) -> Result<(u64, &'static str), EngineError> {
        self.settle_queued()?;
        let sequence = self.sequence(id)?;
        let block_size = self.kv_layout().block_size_tokens;
        let num_tokens = sequence.num_computed_tokens;
        if num_tokens == 0 || !from_token.is_multiple_of(block_size) || from_token >= num_tokens {
            return Err(EngineError::KvImport(format!(
                "cannot push the KV of sequence {id} from token {from_token}: blocks hold {block_size} tokens and {num_tokens} tokens are computed"
            )));
        }
        let source =
            &sequence.block_table.blocks[from_token / block_size..num_tokens.div_ceil(block_size)];
        if source.len() != destination_blocks.len() {
            return Err(EngineError::KvImport(format!(
                "sequence {id} fills {} blocks from token {from_token}, the destination names {}",
                source.len(),
                destination_blocks.len()
            )));
        }
        let source = source.to_vec();
        self.backend
            .push_blocks(target, &source, destination_blocks)
    }

    /// Marks the prompt of `id` computed from `from_token` on after a prefill engine pushed its KV straight
    /// into the reserved blocks ([`Engine::push_kv_to_device`]); the next call for `id` is [`Engine::decode`].
    /// The same conditions as [`Engine::import_kv_layers`] hold.
    pub fn accept_pushed_kv(
        &mut self,
        id: SequenceId,
        from_token: usize,
    ) -> Result<(), EngineError> {
        self.settle_queued()?;
        let sequence = awaiting_kv_from(&mut self.sequences, id, from_token)?;
        let num_tokens = sequence.token_ids.len();
        sequence.num_computed_tokens = num_tokens;
        self.kv_cache.register_full_blocks(
            &mut sequence.block_table,
            &sequence.token_ids,
            num_tokens,
        );
        Ok(())
    }

    /// Writes the K and V of every layer (each in the form [`Engine::export_kv_layer`] gives) for the prompt
    /// tokens `from_token..` of `id` into the blocks [`Engine::add_sequence`] reserved for them, and marks
    /// the prompt computed: the next call for `id` is [`Engine::decode`] with the token the prefill side
    /// sampled. `from_token` must be exactly the prompt tokens this engine already holds (its cached prefix),
    /// so blocks shared with other sequences are never written. Nothing is written unless every layer has
    /// the right length.
    pub fn import_kv_layers<L: AsRef<[u8]>>(
        &mut self,
        id: SequenceId,
        from_token: usize,
        layers: &[L],
    ) -> Result<(), EngineError> {
        self.settle_queued()?;
        let layout = self.kv_layout();
        let block_size = layout.block_size_tokens;
        let layer_bytes = layout.block_bytes() / layout.num_layers;
        let sequence = awaiting_kv_from(&mut self.sequences, id, from_token)?;
        let num_tokens = sequence.token_ids.len();
        let first_block = from_token / block_size;
        let end_block = num_tokens.div_ceil(block_size);
        let expected_bytes = (end_block - first_block) * layer_bytes;
        if layers.len() != layout.num_layers {
            return Err(EngineError::KvImport(format!(
                "{} layers sent, the model has {}",
                layers.len(),
                layout.num_layers
            )));
        }
        if let Some((layer, bytes)) = layers
            .iter()
            .enumerate()
            .find(|(_, bytes)| bytes.as_ref().len() != expected_bytes)
        {
            return Err(EngineError::KvImport(format!(
                "layer {layer}: {} bytes sent, {expected_bytes} expected for tokens {from_token}..{num_tokens}",
                bytes.as_ref().len()
            )));
        }
        let layers: Vec<&[u8]> = layers.iter().map(|bytes| bytes.as_ref()).collect();
        self.backend.write_layers(
            &sequence.block_table.blocks[first_block..end_block],
            &layers,
        )?;
        sequence.num_computed_tokens = num_tokens;
        self.kv_cache.register_full_blocks(
            &mut sequence.block_table,
            &sequence.token_ids,
            num_tokens,
        );
        Ok(())
    }
}

/// The one-token steps of `steps`' sequences after their appended tokens, `offset` positions on: 0 for the step of
/// the appended tokens, 1 for the step queued after it (whose token the backend takes from that step's picks; the
/// last appended token stands in for it).
fn decode_batch<'s>(
    sequences: &'s HashMap<SequenceId, Sequence>,
    steps: &[(SequenceId, u32)],
    offset: usize,
) -> Result<Vec<SequenceStep<'s>>, EngineError> {
    steps
        .iter()
        .map(|&(id, _)| {
            let sequence = sequences.get(&id).ok_or(EngineError::UnknownSequence(id))?;
            let last = sequence.token_ids.len() - 1;
            Ok(SequenceStep {
                token_ids: &sequence.token_ids[last..],
                start_position: last + offset,
                block_table: &sequence.block_table.blocks,
            })
        })
        .collect()
}

/// Whether `backend` queues steps of `kind` itself: where it runs steps while the host works, and for drawn steps
/// where it draws on its device (elsewhere its drawn steps fall back to the host, inside the call).
fn backend_queues(backend: &dyn Backend, kind: StepKind<'_>) -> bool {
    backend.queues_steps()
        && match kind {
            StepKind::Greedy => true,
            StepKind::Drawn(_) => backend.draws_on_device(),
        }
}

/// Queues a step of `kind` on `backend` ([`Backend::queue_greedy`], [`Backend::queue_drawn`]); where
/// [`backend_queues`] says no, the engine runs it now and its picks wait in `ran` (with `from_previous`, its
/// inputs are the tokens of the last one there).
fn queue_step(
    backend: &mut dyn Backend,
    ran: &mut VecDeque<RanStep>,
    batch: &[SequenceStep<'_>],
    kind: StepKind<'_>,
    from_previous: bool,
) -> Result<(), EngineError> {
    if backend_queues(backend, kind) {
        return match kind {
            StepKind::Greedy => backend.queue_greedy(batch, from_previous),
            StepKind::Drawn(params) => backend.queue_drawn(batch, params, from_previous),
        };
    }
    let inputs: Vec<u32> = if from_previous {
        let previous = ran
            .back()
            .ok_or_else(|| EngineError::Config("a step queued ahead follows no step".into()))?;
        (0..batch.len())
            .map(|row| {
                previous.token(row).ok_or_else(|| {
                    EngineError::Config(format!(
                        "a step of {} sequences queued ahead follows a smaller one",
                        batch.len()
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let rebuilt: Vec<SequenceStep<'_>>;
    let batch = if from_previous {
        rebuilt = batch
            .iter()
            .zip(&inputs)
            .map(|(step, token)| SequenceStep {
                token_ids: std::slice::from_ref(token),
                ..*step
            })
            .collect();
        &rebuilt
    } else {
        batch
    };
    let picked = match kind {
        StepKind::Greedy => {
            let mut tokens = Vec::new();
            backend.forward_greedy(batch, &mut tokens)?;
            RanStep::Greedy(tokens)
        }
        StepKind::Drawn(params) => {
            let (mut draws, mut logits) = (Vec::new(), Vec::new());
            backend.forward_drawn(batch, params, &mut logits, &mut draws)?;
            RanStep::Drawn(draws, logits)
        }
    };
    ran.push_back(picked);
    Ok(())
}

/// The tokens of the oldest step [`queue_step`] queued, which was greedy.
fn take_greedy_step(
    backend: &mut dyn Backend,
    ran: &mut VecDeque<RanStep>,
    tokens: &mut Vec<u32>,
) -> Result<(), EngineError> {
    if backend_queues(backend, StepKind::Greedy) {
        return backend.take_greedy(tokens);
    }
    match ran.pop_front() {
        Some(RanStep::Greedy(picked)) => {
            *tokens = picked;
            Ok(())
        }
        _ => Err(EngineError::Config("no greedy step is queued".into())),
    }
}

/// The draws of the oldest step [`queue_step`] queued, which was drawn; where the engine ran it, the logits they
/// were drawn from go to `logits` (a backend that queues keeps them itself).
fn take_drawn_step(
    backend: &mut dyn Backend,
    ran: &mut VecDeque<RanStep>,
    draws: &mut Vec<RowDraw>,
    logits: &mut Vec<f32>,
) -> Result<(), EngineError> {
    if backend_queues(backend, StepKind::Drawn(&[])) {
        return backend.take_drawn(draws);
    }
    match ran.pop_front() {
        Some(RanStep::Drawn(drawn, drawn_from)) => {
            *draws = drawn;
            *logits = drawn_from;
            Ok(())
        }
        _ => Err(EngineError::Config("no drawn step is queued".into())),
    }
}

/// The sequence `id`, when it holds exactly its first `from_token` prompt tokens and still lacks the rest: the KV
/// a prefill engine imports or pushes may only fill blocks that no other sequence shares.
fn awaiting_kv_from(
    sequences: &mut HashMap<SequenceId, Sequence>,
    id: SequenceId,
    from_token: usize,
) -> Result<&mut Sequence, EngineError> {
    let sequence = sequences
        .get_mut(&id)
        .ok_or(EngineError::UnknownSequence(id))?;
    let num_tokens = sequence.token_ids.len();
    if sequence.num_computed_tokens != from_token || from_token >= num_tokens {
        return Err(EngineError::KvImport(format!(
            "sequence {id} holds {} of its {num_tokens} prompt tokens; the KV sent starts at token {from_token}",
            sequence.num_computed_tokens
        )));
    }
    Ok(sequence)
}
