//! Plausible request flows on a log, for the replay benchmark and tests: requests interleaved as a busy fleet
//! writes them (a few dozen in flight at once), local and remote prefills, token checkpoints every 16 tokens, a
//! few failures and cancellations, and worker heartbeats. Deterministic for a given seed.

use std::collections::HashMap;

use prost::Message;
use tandem_events::log::{EventLog, LogError, OutgoingMessage};
use tandem_events::schema::{
    Body, Cancelled, Completed, DecodeStarted, Envelope, Failed, KvDestination, KvTransferred,
    PrefillDecision, PrefillDone, PrefillLocal, PrefillQueued, PrefillStarted, Received, Routed,
    SamplingParams, TokensDecoded, WorkerHeartbeat, WorkerJoined,
};
use tandem_events::{Event, EventKind, SCHEMA_VERSION};

use crate::ReplayError;

/// An event stamped with a chosen time (the log's own `Event::new` stamps the current one).
pub fn event_at(id: &str, emitter: &str, at_ns: u64, body: Body) -> Event {
    let envelope = Envelope {
        schema_version: SCHEMA_VERSION,
        id: id.to_string(),
        emitter: emitter.to_string(),
        timestamp_ns: at_ns,
        trace: None,
        body: Some(body),
    };
    // The envelope was just built with a body and this build's version, so it decodes.
    Event::decode(&envelope.encode_to_vec()).expect("a freshly built envelope decodes")
}

/// Numbers each event's dedup occurrence per (id, kind), as the roles do, so none is dropped as a duplicate.
#[derive(Debug, Default)]
pub struct Occurrences {
    /// id → count per kind, indexed as `EventKind::ALL`.
    counts: HashMap<String, [u32; EventKind::ALL.len()]>,
}

impl Occurrences {
    pub fn message(&mut self, event: &Event) -> Result<OutgoingMessage, LogError> {
        let kind_index = EventKind::ALL
            .iter()
            .position(|kind| *kind == event.kind())
            .unwrap_or(0);
        let counts = self.counts.entry(event.id().to_string()).or_default();
        counts[kind_index] += 1;
        OutgoingMessage::from_event(event, counts[kind_index])
    }

    /// Forgets a request whose events are all written (keeps the map small on long runs).
    pub fn forget(&mut self, id: &str) {
        self.counts.remove(id);
    }
}

/// splitmix64: small, fast, good enough to vary synthetic flows.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

const BLOCK_TOKENS: u32 = 16;
const KV_BYTES_PER_BLOCK: u64 = 28 * 2 * 8 * 128 * 16 * 2;
const DECODE_WORKERS: usize = 4;
const PREFILL_WORKERS: usize = 2;

/// The events of one request, in order, with their times.
pub fn request_flow(request_id: &str, start_ns: u64, seed: u64) -> Vec<Event> {
    let mut rng = Rng(seed);
    let prompt_tokens = 16 + rng.below(400) as u32;
    let completion_tokens = 8 + rng.below(120) as u32;
    let decode = format!("decode-{}", rng.below(DECODE_WORKERS as u64));
    let prefill = format!("prefill-{}", rng.below(PREFILL_WORKERS as u64));
    let remote = prompt_tokens > 128;
    let prompt: Vec<u32> = (0..prompt_tokens).map(|i| 1000 + (i * 7) % 5000).collect();
    let sampling = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: completion_tokens,
        ..SamplingParams::default()
    };
    // Each step lands between half and one and a half times its mean after the previous one.
    let mut at = start_ns;
    let mut step = |rng: &mut Rng, mean_us: u64| {
        at += 1_000 * (mean_us / 2 + rng.below(mean_us));
        at
    };
    let mut events = Vec::new();
    events.push(event_at(
        request_id,
        "gateway-0",
        start_ns,
        Body::Received(Received {
            model: "qwen3".into(),
            prompt_token_ids: prompt.clone(),
            prompt_tokens,
            prompt_sha256: vec![0; 32],
            sampling: Some(sampling.clone()),
            gateway_id: "gateway-0".into(),
            stream: true,
            endpoint: "chat".into(),
        }),
    ));
    events.push(event_at(
        request_id,
        "scheduler-0",
        step(&mut rng, 300),
        Body::Routed(Routed {
            decode_worker_id: decode.clone(),
            policy: "round_robin".into(),
            attempt: 1,
            received_sequence: 0,
            ..Routed::default()
        }),
    ));
    let decision = PrefillDecision {
        prompt_tokens,
        cached_tokens: 0,
        max_local_prefill_tokens: 128,
        prefill_queue_depth: 0,
        max_prefill_queue_depth: 8,
    };
    if remote {
        let blocks = prompt_tokens.div_ceil(BLOCK_TOKENS);
        events.push(event_at(
            request_id,
            &decode,
            step(&mut rng, 200),
            Body::PrefillQueued(PrefillQueued {
                decode_worker_id: decode.clone(),
                decision: Some(decision),
                prompt_token_ids: prompt,
                sampling: Some(sampling),
                kv_destination: Some(KvDestination {
                    decode_worker_id: decode.clone(),
                    endpoint: "tcp://10.0.0.1:7100".into(),
                    block_ids: (0..blocks).collect(),
                    block_size_tokens: BLOCK_TOKENS,
                    cached_tokens: 0,
                }),
            }),
        ));
        events.push(event_at(
            request_id,
            &prefill,
            step(&mut rng, 2_000),
            Body::PrefillStarted(PrefillStarted {
                prefill_worker_id: prefill.clone(),
                delivery_attempt: 1,
            }),
        ));
        let compute_ns = 40_000 * u64::from(prompt_tokens);
        events.push(event_at(
            request_id,
            &prefill,
            step(&mut rng, compute_ns / 1_000),
            Body::PrefillDone(PrefillDone {
                prefill_worker_id: prefill.clone(),
                first_token_id: 42,
                compute_ns,
                cached_tokens: 0,
                first_token_logprob: None,
            }),
        ));
        let transfer_ns = 1_000 * (500 + rng.below(1_500));
        events.push(event_at(
            request_id,
            &prefill,
            step(&mut rng, transfer_ns / 1_000),
            Body::KvTransferred(KvTransferred {
                from_worker_id: prefill.clone(),
                to_worker_id: decode.clone(),
                bytes: u64::from(blocks) * KV_BYTES_PER_BLOCK,
                blocks,
                duration_ns: transfer_ns,
                transport: "tcp".into(),
            }),
        ));
    } else {
        events.push(event_at(
            request_id,
            &decode,
            step(&mut rng, 200),
            Body::PrefillLocal(PrefillLocal {
                decode_worker_id: decode.clone(),
                decision: Some(decision),
            }),
        ));
    }
    events.push(event_at(
        request_id,
        &decode,
        step(&mut rng, 5_000),
        Body::DecodeStarted(DecodeStarted {
            decode_worker_id: decode.clone(),
        }),
    ));
    let mut generated = 0u32;
    let ending = rng.below(100);
    // 3% fail mid-decode, 2% are cancelled by their client; the rest complete.
    let stop_after = if ending < 5 {
        completion_tokens / 2
    } else {
        completion_tokens
    };
    while generated < stop_after {
        let count = (stop_after - generated).min(16);
        events.push(event_at(
            request_id,
            &decode,
            step(&mut rng, 16 * 20_000),
            Body::TokensDecoded(TokensDecoded {
                decode_worker_id: decode.clone(),
                start_index: generated,
                token_ids: (generated..generated + count).map(|i| 2000 + i).collect(),
                logprobs: Vec::new(),
                text: None,
            }),
        ));
        generated += count;
    }
    let last = step(&mut rng, 100);
    let body = match ending {
        0..=2 => Body::Failed(Failed {
            reason: "engine_error".into(),
            message: "synthetic failure".into(),
            worker_id: decode.clone(),
        }),
        3..=4 => Body::Cancelled(Cancelled {
            reason: "client_disconnected".into(),
        }),
        _ => Body::Completed(Completed {
            finish_reason: "length".into(),
            prompt_tokens,
            completion_tokens: generated,
            decode_worker_id: decode.clone(),
        }),
    };
    let emitter = if matches!(body, Body::Cancelled(_)) {
        "gateway-0".to_string()
    } else {
        decode
    };
    events.push(event_at(request_id, &emitter, last, body));
    events
}

/// The events of workers joining, as the fleet of [`request_flow`] has them.
pub fn workers_joining(at_ns: u64) -> Vec<Event> {
    let decode = (0..DECODE_WORKERS).map(|i| (format!("decode-{i}"), "decode"));
    let prefill = (0..PREFILL_WORKERS).map(|i| (format!("prefill-{i}"), "prefill"));
    decode
        .chain(prefill)
        .map(|(id, role)| {
            event_at(
                &id,
                &id,
                at_ns,
                Body::WorkerJoined(WorkerJoined {
                    role: role.into(),
                    transfer_endpoint: "tcp://10.0.0.1:7100".into(),
                    device: "cpu".into(),
                    model: "qwen3".into(),
                    total_blocks: 4096,
                    block_size_tokens: BLOCK_TOKENS,
                    max_batch_sequences: 64,
                }),
            )
        })
        .collect()
}

/// A request id: a ULID at `at_ns` with randomness drawn from `seed`.
pub fn request_id(at_ns: u64, seed: u64) -> String {
    let mut rng = Rng(seed);
    let random = (u128::from(rng.next()) << 64) | u128::from(rng.next());
    ulid::Ulid::from_parts(at_ns / 1_000_000, random).to_string()
}

/// Appends about `events` events of interleaved request flows (and heartbeats) to `log`, in batches; returns how
/// many it wrote. `concurrency` requests are in flight at once.
pub async fn write_log(
    log: &dyn EventLog,
    events: u64,
    concurrency: usize,
    seed: u64,
) -> Result<u64, ReplayError> {
    let mut rng = Rng(seed);
    let mut clock_ns = 1_767_225_600_000_000_000u64; // 2026-01-01T00:00:00Z
    let mut occurrences = Occurrences::default();
    let mut in_flight: Vec<(String, std::vec::IntoIter<Event>)> = Vec::new();
    let mut batch = Vec::with_capacity(4_096);
    let mut written = 0u64;
    let mut next_request = 0u64;
    for event in workers_joining(clock_ns) {
        batch.push(occurrences.message(&event)?);
        written += 1;
    }
    while written < events || !in_flight.is_empty() {
        while written < events && in_flight.len() < concurrency.max(1) {
            let id = request_id(clock_ns, seed ^ next_request);
            let flow = request_flow(&id, clock_ns, rng.next()).into_iter();
            in_flight.push((id, flow));
            next_request += 1;
        }
        let pick = rng.below(in_flight.len() as u64) as usize;
        match in_flight[pick].1.next() {
            Some(event) => {
                clock_ns = clock_ns.max(event.timestamp_ns());
                batch.push(occurrences.message(&event)?);
                written += 1;
            }
            None => {
                let (done, _) = in_flight.swap_remove(pick);
                occurrences.forget(&done);
            }
        }
        if written.is_multiple_of(64) {
            let worker = format!("decode-{}", rng.below(DECODE_WORKERS as u64));
            let heartbeat = event_at(
                &worker,
                &worker,
                clock_ns,
                Body::WorkerHeartbeat(WorkerHeartbeat {
                    active_sequences: in_flight.len() as u32,
                    waiting_sequences: 0,
                    free_blocks: 4096 - 8 * in_flight.len() as u32,
                    queued_prefill_tokens: 0,
                }),
            );
            batch.push(occurrences.message(&heartbeat)?);
            written += 1;
        }
        if batch.len() >= 4_096 {
            log.append_batch(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        log.append_batch(batch).await?;
    }
    Ok(written)
}
