//! Test support: logs with known requests, written with chosen times through the real embedded backend.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;

use tandem_events::Event;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::{EventLog, LogMessage, OutgoingMessage, StartAt};
use tandem_events::schema::*;
use tandem_replay::source::{Progress, ReadRange, Source};
use tandem_replay::synthetic::{Occurrences, event_at};

pub const MS: u64 = 1_000_000;
/// 2026-11-25T12:00:00Z.
pub const T0: u64 = 1_795_608_000_000_000_000;

/// One request's events, written in order with times `T0 + offset`.
pub struct Flow {
    pub id: String,
    pub start_ns: u64,
    pub events: Vec<Event>,
}

impl Flow {
    pub fn new(id: &str, start_ns: u64) -> Flow {
        Flow {
            id: id.to_string(),
            start_ns,
            events: Vec::new(),
        }
    }

    /// Adds an event `offset_ms` after the flow's start.
    pub fn at(mut self, offset_ms: u64, emitter: &str, body: Body) -> Flow {
        let event = event_at(&self.id, emitter, self.start_ns + offset_ms * MS, body);
        self.events.push(event);
        self
    }
}

pub fn prompt(tokens: u32) -> Vec<u32> {
    (0..tokens).map(|i| 500 + i).collect()
}

pub fn received(tokens: u32) -> Body {
    Body::Received(Received {
        model: "qwen3".into(),
        prompt_token_ids: prompt(tokens),
        prompt_tokens: tokens,
        prompt_sha256: vec![0; 32],
        sampling: Some(SamplingParams {
            max_tokens: 32,
            top_p: 1.0,
            ..SamplingParams::default()
        }),
        gateway_id: "gateway-0".into(),
        stream: true,
        endpoint: "chat".into(),
    })
}

pub fn routed(worker: &str, attempt: u32) -> Body {
    Body::Routed(Routed {
        decode_worker_id: worker.into(),
        policy: "kv_aware".into(),
        reason: "lowest cost".into(),
        scores: vec![
            WorkerScore {
                worker_id: worker.into(),
                overlap_blocks: 2,
                prefill_blocks: 3,
                active_decode_blocks: 10,
                cost: 1.5,
            },
            WorkerScore {
                worker_id: "decode-9".into(),
                overlap_blocks: 0,
                prefill_blocks: 5,
                active_decode_blocks: 40,
                cost: 9.0,
            },
        ],
        attempt,
        received_sequence: 1,
    })
}

pub fn local(worker: &str) -> Body {
    Body::PrefillLocal(PrefillLocal {
        decode_worker_id: worker.into(),
        decision: None,
    })
}

/// A `PrefillQueued` reserving `blocks` blocks of 16 tokens at `worker`.
pub fn queued(worker: &str, tokens: u32, blocks: u32) -> Body {
    Body::PrefillQueued(PrefillQueued {
        decode_worker_id: worker.into(),
        decision: None,
        prompt_token_ids: prompt(tokens),
        sampling: None,
        kv_destination: Some(KvDestination {
            decode_worker_id: worker.into(),
            endpoint: "tcp://127.0.0.1:7100".into(),
            block_ids: (0..blocks).collect(),
            block_size_tokens: 16,
            cached_tokens: 0,
        }),
    })
}

pub fn prefill_started(worker: &str, attempt: u32) -> Body {
    Body::PrefillStarted(PrefillStarted {
        prefill_worker_id: worker.into(),
        delivery_attempt: attempt,
    })
}

pub fn prefill_done(worker: &str) -> Body {
    Body::PrefillDone(PrefillDone {
        prefill_worker_id: worker.into(),
        first_token_id: 7,
        compute_ns: 20 * MS,
        cached_tokens: 0,
        first_token_logprob: None,
    })
}

pub fn kv(from: &str, to: &str, blocks: u32, bytes_per_block: u64) -> Body {
    Body::KvTransferred(KvTransferred {
        from_worker_id: from.into(),
        to_worker_id: to.into(),
        bytes: u64::from(blocks) * bytes_per_block,
        blocks,
        duration_ns: 3 * MS,
        transport: "tcp".into(),
    })
}

pub fn decode_started(worker: &str) -> Body {
    Body::DecodeStarted(DecodeStarted {
        decode_worker_id: worker.into(),
    })
}

pub fn tokens(worker: &str, start: u32, count: u32) -> Body {
    Body::TokensDecoded(TokensDecoded {
        decode_worker_id: worker.into(),
        start_index: start,
        token_ids: (start..start + count).map(|i| 9000 + i).collect(),
        logprobs: Vec::new(),
        text: None,
    })
}

pub fn completed(worker: &str, tokens: u32) -> Body {
    Body::Completed(Completed {
        finish_reason: "length".into(),
        prompt_tokens: 0,
        completion_tokens: tokens,
        decode_worker_id: worker.into(),
    })
}

pub fn migrated(from: &str, tokens: u32) -> Body {
    Body::Migrated(Migrated {
        from_worker_id: from.into(),
        reason: "worker_lost".into(),
        tokens_generated: tokens,
    })
}

/// Writes events to the log in the given order.
pub async fn append(log: &dyn EventLog, occurrences: &mut Occurrences, events: &[Event]) {
    let messages: Vec<OutgoingMessage> = events
        .iter()
        .map(|event| occurrences.message(event).expect("valid ids"))
        .collect();
    log.append_batch(messages).await.expect("append");
}

/// Interleaves flows by event time, as they would land on a log.
pub fn interleave(flows: Vec<Flow>) -> Vec<Event> {
    let mut events: Vec<Event> = flows.into_iter().flat_map(|flow| flow.events).collect();
    events.sort_by_key(Event::timestamp_ns);
    events
}

pub async fn read_all(log: &dyn EventLog) -> Vec<LogMessage> {
    log.read(StartAt::Beginning, &[], 1_000_000)
        .await
        .expect("read")
}

pub fn source_of(log: &EmbeddedLog) -> Source {
    Source::from_log(Arc::new(log.clone()), "test log")
}

/// Every message of a source, through the streaming scan.
pub async fn scan_all(source: &Source) -> Vec<LogMessage> {
    let mut messages = Vec::new();
    source
        .scan(&ReadRange::default(), &mut Progress::quiet(), |message| {
            messages.push(message.clone());
            Ok(())
        })
        .await
        .expect("scan");
    messages
}
