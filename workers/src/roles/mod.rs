//! The worker roles around the engine: the decode worker (continuous batching, local prefill, token streaming)
//! and what it needs beside the engine (incremental detokenization, stop strings). Unlike the engine, roles speak
//! the log: they consume and append `tandem-events` types.

pub mod batcher;
pub mod decode;
mod detokenizer;
mod membership;
mod observe;
pub use observe::DecodeMetrics;
pub mod prefill;
pub mod prefill_rule;
mod stop;

/// The shared durable consumer of the prefill queue: every prefill worker pulls from it, one job to one worker.
pub const PREFILL_QUEUE_CONSUMER: &str = "prefill-queue";

/// The prefill queue's consumer settings; decode workers bind to it too, to read the queue's depth.
pub fn prefill_queue_consumer() -> tandem_events::log::ConsumerConfig {
    tandem_events::log::ConsumerConfig {
        // A prefill worker marks its job in progress while computing; one that dies leaves it to another.
        ack_wait: std::time::Duration::from_secs(10),
        max_deliver: Some(5),
        ..tandem_events::log::ConsumerConfig::new(
            PREFILL_QUEUE_CONSUMER,
            vec![tandem_events::subjects::kind_filter(
                tandem_events::EventKind::PrefillQueued,
            )],
        )
    }
}

/// The engine's sampling parameters for a request's wire parameters, generating at most `max_tokens`.
pub(crate) fn engine_sampling(
    wire: &tandem_events::schema::SamplingParams,
    max_tokens: usize,
) -> crate::sampling::SamplingParams {
    crate::sampling::SamplingParams {
        max_tokens,
        temperature: wire.temperature,
        top_k: wire.top_k as usize,
        // 0 on the wire means "not set": no nucleus restriction.
        top_p: if wire.top_p > 0.0 { wire.top_p } else { 1.0 },
        seed: wire.seed,
        stop_token_ids: wire.stop_token_ids.clone(),
        logprobs: wire.logprobs.map(|top| top as usize),
    }
}

/// Errors of the roles.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("event log: {0}")]
    Log(#[from] tandem_events::log::LogError),
    #[error("invalid worker configuration: {0}")]
    Config(String),
}
