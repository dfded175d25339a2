//! `tandem bench serve --direct`: the same workload straight into the decode worker's engine thread (the
//! continuous-batching loop `tandem serve` runs, with the same model, sampling and detokenization), in this process:
//! no HTTP, no gateway, no log, no scheduler, no token bus. Its TTFT against a server's is what those cost.

use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use tandem_events::schema::SamplingParams as WireSampling;
use tandem_events::tokens::TokenUpdate;
use tandem_gateway::template::{ChatTemplate, RenderOptions, TemplateMessage};
use tandem_gateway::tokenizer::PromptTokenizer;
use tandem_workers::roles::DecodeMetrics;
use tandem_workers::roles::batcher::{BatchCommand, BatchOutput, BatcherConfig, Job, run_batcher};
use tandem_workers::roles::decode::DecodeWorkerConfig;
use tandem_workers::roles::prefill_rule::{PrefillRule, SharedPrefillRule};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use super::{RequestOutcome, Sampling};
use crate::roles::{self, ModelArgs};

/// Token updates of the requests in flight, by request id.
type Waiters = Arc<Mutex<HashMap<String, UnboundedSender<TokenUpdate>>>>;

/// The engine thread of one decode worker, driven without the log.
pub struct DirectTarget {
    commands: std::sync::mpsc::Sender<BatchCommand>,
    waiters: Waiters,
    engine_thread: Option<std::thread::JoinHandle<()>>,
    template: ChatTemplate,
    prompt_tokenizer: PromptTokenizer,
}

impl DirectTarget {
    /// Loads the model as `tandem serve` does (same flags) and starts its engine thread; call inside a runtime.
    pub fn start(model: &ModelArgs) -> Result<DirectTarget> {
        let tokenizer_dir = roles::tokenizer_dir(model)?;
        let template = ChatTemplate::load(&tokenizer_dir).context("loading the chat template")?;
        let prompt_tokenizer =
            PromptTokenizer::load(&tokenizer_dir).context("loading the prompt tokenizer")?;
        let detokenizer = super::workload::load_tokenizer(&tokenizer_dir)?;
        let engine = roles::engine(model)?;
        // The decode worker's own defaults, so the loop batches exactly as it does under `tandem serve`.
        let worker_defaults = DecodeWorkerConfig::new("direct", model.served_model_name.clone());
        let config = BatcherConfig {
            worker_id: "direct".into(),
            max_batch_sequences: model.max_batch_sequences,
            checkpoint_every_tokens: worker_defaults.checkpoint_every_tokens,
            prefill_chunk_tokens: worker_defaults.prefill_chunk_tokens,
            max_model_len_tokens: engine.model_config().max_position_embeddings,
            prefill_rule: Arc::new(SharedPrefillRule::new(PrefillRule::local_only())),
            kv_endpoint: None,
            model_fingerprint: 0,
            prefill_queue_depth: Arc::new(AtomicU32::new(0)),
            metrics: DecodeMetrics::new("direct"),
        };
        let (commands, command_receiver) = std::sync::mpsc::channel();
        let (output_sender, mut outputs) = unbounded_channel();
        let engine_thread = std::thread::Builder::new()
            .name("engine-direct".into())
            .spawn(move || {
                run_batcher(engine, detokenizer, config, command_receiver, output_sender)
            })
            .context("starting the engine thread")?;
        let waiters: Waiters = Arc::default();
        let routes = Arc::clone(&waiters);
        // The events the engine thread reports (what the worker would append to the log) are dropped: leaving the
        // log out is the point of this mode.
        tokio::spawn(async move {
            while let Some(output) = outputs.recv().await {
                if let BatchOutput::Tokens { request_id, update } = output {
                    let mut waiters = routes.lock().unwrap_or_else(|poison| poison.into_inner());
                    let last = update.is_last();
                    if let Some(waiter) = waiters.get(&request_id) {
                        let _ = waiter.send(update);
                    }
                    if last {
                        waiters.remove(&request_id);
                    }
                }
            }
        });
        Ok(DirectTarget {
            commands,
            waiters,
            engine_thread: Some(engine_thread),
            template,
            prompt_tokenizer,
        })
    }

    /// The prompt's token ids as the gateway makes them for a chat request with this user message (chat template,
    /// then the tokenizer); done before the clock starts, the gateway's share of the work is in its TTFT.
    pub fn prompt_ids(&self, content: &str) -> Result<Vec<u32>> {
        let options = RenderOptions {
            add_generation_prompt: true,
            enable_thinking: true,
            tools: None,
        };
        let text = self
            .template
            .render(&[TemplateMessage::new("user", content)], &options)?;
        Ok(self.prompt_tokenizer.encode(&text)?)
    }

    /// One request through the engine thread, timed from handing it over.
    pub async fn send(&self, prompt_token_ids: Vec<u32>, sampling: &Sampling) -> RequestOutcome {
        let request_id = ulid::Ulid::new().to_string();
        let prompt_tokens = prompt_token_ids.len() as u64;
        let wire = WireSampling {
            temperature: sampling.temperature as f32,
            top_p: sampling.top_p as f32,
            top_k: 0,
            seed: None,
            max_tokens: sampling.output_len,
            stop_token_ids: if sampling.ignore_eos {
                Vec::new()
            } else {
                self.prompt_tokenizer.eos_token_ids().to_vec()
            },
            stop_strings: Vec::new(),
            logprobs: None,
            ignore_eos: sampling.ignore_eos,
        };
        let job = Job::first_attempt(request_id.clone(), prompt_token_ids, wire);
        let (sender, mut updates) = unbounded_channel();
        self.waiters
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(request_id, sender);
        let started = Instant::now();
        if self.commands.send(BatchCommand::Start(job)).is_err() {
            return RequestOutcome::failed("the engine thread has stopped".into());
        }
        let mut arrivals_ms = Vec::new();
        let mut output_tokens = 0u64;
        while let Some(update) = updates.recv().await {
            arrivals_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            output_tokens += update.token_ids.len() as u64;
            if let Some(error) = update.error {
                return RequestOutcome::failed(error);
            }
            if update.finish_reason.is_some() {
                break;
            }
        }
        let e2e_ms = started.elapsed().as_secs_f64() * 1000.0;
        let Some(&ttft_ms) = arrivals_ms.first() else {
            return RequestOutcome::failed("the engine thread sent nothing".into());
        };
        RequestOutcome::finished(ttft_ms, e2e_ms, &arrivals_ms, prompt_tokens, output_tokens)
    }

    /// Lets running requests finish, then stops the engine thread.
    pub fn shutdown(mut self) {
        let _ = self.commands.send(BatchCommand::Drain);
        if let Some(thread) = self.engine_thread.take() {
            let _ = thread.join();
        }
    }
}
