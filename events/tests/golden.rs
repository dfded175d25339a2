//! Golden bytes: events encoded by schema version 1 are committed in `tests/golden/v1.bin` and must decode, to
//! exactly these values, forever. A new schema version adds its own file beside it; old files are never rewritten.
//!
//! To write a file for a new version (once, when that version is released): `TANDEM_WRITE_GOLDEN=1 cargo test -p
//! tandem-events --test golden`.

use prost::Message;
use tandem_events::schema::*;
use tandem_events::{Event, EventKind};

const V1_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/v1.bin");

fn sampling() -> SamplingParams {
    SamplingParams {
        temperature: 0.7,
        top_p: 0.9,
        top_k: 40,
        seed: Some(1234),
        max_tokens: 64,
        stop_token_ids: vec![151645, 151643],
        stop_strings: vec!["</s>".into()],
        logprobs: Some(5),
        ignore_eos: true,
    }
}

fn decision() -> PrefillDecision {
    PrefillDecision {
        prompt_tokens: 2048,
        cached_tokens: 512,
        max_local_prefill_tokens: 1000,
        prefill_queue_depth: 1,
        max_prefill_queue_depth: 2,
    }
}

/// One envelope of every body kind, with every field set, as schema version 1 wrote them.
fn v1_envelopes() -> Vec<Envelope> {
    let request = "01JD7Q5ZJ8M3V9X2K4T6N8P0RS";
    let worker = "01JD7Q5ZJ8M3V9X2K4T6N8P0WK";
    let bodies_about_request = vec![
        Body::Received(Received {
            model: "qwen3".into(),
            prompt_token_ids: vec![151644, 872, 198, 9707, 0, 300000],
            prompt_tokens: 6,
            prompt_sha256: vec![0xab; 32],
            sampling: Some(sampling()),
            gateway_id: "gateway-0".into(),
            stream: true,
            endpoint: "chat".into(),
        }),
        Body::Routed(Routed {
            decode_worker_id: "decode-0".into(),
            policy: "kv_aware".into(),
            reason: "lowest cost".into(),
            scores: vec![
                WorkerScore {
                    worker_id: "decode-0".into(),
                    overlap_blocks: 3,
                    prefill_blocks: 5,
                    active_decode_blocks: 10,
                    cost: 15.0,
                },
                WorkerScore {
                    worker_id: "decode-1".into(),
                    overlap_blocks: 0,
                    prefill_blocks: 8,
                    active_decode_blocks: 2,
                    cost: 18.5,
                },
            ],
            attempt: 1,
            received_sequence: 1,
        }),
        Body::PrefillLocal(PrefillLocal {
            decode_worker_id: "decode-0".into(),
            decision: Some(decision()),
        }),
        Body::PrefillQueued(PrefillQueued {
            decode_worker_id: "decode-0".into(),
            decision: Some(decision()),
            prompt_token_ids: vec![1, 2, 3, 4],
            sampling: Some(sampling()),
            kv_destination: Some(KvDestination {
                decode_worker_id: "decode-0".into(),
                endpoint: "tcp://10.0.0.5:7100".into(),
                block_ids: vec![7, 8, 9],
                block_size_tokens: 16,
                cached_tokens: 16,
            }),
        }),
        Body::PrefillStarted(PrefillStarted {
            prefill_worker_id: "prefill-0".into(),
            delivery_attempt: 2,
        }),
        Body::PrefillDone(PrefillDone {
            prefill_worker_id: "prefill-0".into(),
            first_token_id: 9707,
            compute_ns: 12_345_678,
            cached_tokens: 16,
            first_token_logprob: Some(-0.25),
        }),
        Body::KvTransferred(KvTransferred {
            from_worker_id: "prefill-0".into(),
            to_worker_id: "decode-0".into(),
            bytes: 1 << 20,
            blocks: 3,
            duration_ns: 250_000,
            transport: "tcp".into(),
        }),
        Body::DecodeStarted(DecodeStarted {
            decode_worker_id: "decode-0".into(),
        }),
        Body::TokensDecoded(TokensDecoded {
            decode_worker_id: "decode-0".into(),
            start_index: 16,
            token_ids: vec![11, 12, 13],
            logprobs: vec![-0.5, -1.25, -0.125],
            text: None,
        }),
        Body::Migrated(Migrated {
            from_worker_id: "decode-0".into(),
            reason: "worker_lost".into(),
            tokens_generated: 19,
        }),
        Body::Completed(Completed {
            finish_reason: "length".into(),
            prompt_tokens: 6,
            completion_tokens: 64,
            decode_worker_id: "decode-1".into(),
        }),
        Body::Failed(Failed {
            reason: "prefill_max_deliveries".into(),
            message: "prefill failed 5 times".into(),
            worker_id: "prefill-0".into(),
        }),
        Body::Cancelled(Cancelled {
            reason: "client_disconnected".into(),
        }),
    ];
    let bodies_about_worker = vec![
        Body::WorkerJoined(WorkerJoined {
            role: "decode".into(),
            transfer_endpoint: "tcp://10.0.0.5:7100".into(),
            device: "cuda:0".into(),
            model: "qwen3".into(),
            total_blocks: 4096,
            block_size_tokens: 16,
            max_batch_sequences: 256,
        }),
        Body::WorkerHeartbeat(WorkerHeartbeat {
            active_sequences: 12,
            waiting_sequences: 3,
            free_blocks: 1000,
            queued_prefill_tokens: 4096,
        }),
        Body::WorkerLeft(WorkerLeft {
            reason: "shutdown".into(),
        }),
        Body::WorkerLost(WorkerLost {
            last_heartbeat_ns: 1_732_000_000_000_000_000,
            reason: "heartbeat expired".into(),
        }),
        Body::KvBlocksStored(KvBlocksStored {
            block_hashes: vec![u64::MAX, 1, 0xdead_beef],
            parent_hash: 42,
        }),
        Body::KvBlocksRemoved(KvBlocksRemoved {
            block_hashes: vec![0xdead_beef],
        }),
    ];
    let envelope = |id: &str, index: usize, body: Body| Envelope {
        schema_version: 1,
        id: id.into(),
        emitter: "golden-emitter".into(),
        timestamp_ns: 1_732_000_000_000_000_000 + index as u64,
        trace: Some(TraceContext {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            tracestate: "tandem=1".into(),
        }),
        body: Some(body),
    };
    bodies_about_request
        .into_iter()
        .map(|body| (request, body))
        .chain(bodies_about_worker.into_iter().map(|body| (worker, body)))
        .enumerate()
        .map(|(index, (id, body))| envelope(id, index, body))
        .collect()
}

fn encode_all(envelopes: &[Envelope]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for envelope in envelopes {
        envelope
            .encode_length_delimited(&mut bytes)
            .expect("Vec grows as needed");
    }
    bytes
}

#[test]
fn v1_golden_bytes_decode_forever() {
    let expected = v1_envelopes();
    if std::env::var_os("TANDEM_WRITE_GOLDEN").is_some() && !std::path::Path::new(V1_PATH).exists()
    {
        std::fs::create_dir_all(std::path::Path::new(V1_PATH).parent().unwrap()).unwrap();
        std::fs::write(V1_PATH, encode_all(&expected)).unwrap();
    }
    let golden = std::fs::read(V1_PATH).expect("tests/golden/v1.bin is committed");
    let mut cursor = &golden[..];
    let mut decoded = Vec::new();
    while !cursor.is_empty() {
        let length = prost::decode_length_delimiter(&mut cursor).expect("length prefix");
        let (record, rest) = cursor.split_at(length);
        let event = Event::decode(record).expect("a v1 event decodes with this build");
        decoded.push(event.envelope().clone());
        cursor = rest;
    }
    assert_eq!(decoded.len(), EventKind::ALL.len(), "one event per kind");
    let kinds: Vec<EventKind> = decoded
        .iter()
        .map(|envelope| envelope.body.as_ref().unwrap().kind())
        .collect();
    assert_eq!(kinds, EventKind::ALL.to_vec());
    assert_eq!(decoded, expected);
}

#[test]
fn this_build_still_writes_v1_bytes_for_v1_fields() {
    // While the schema is at version 1, encoding is byte-for-byte what was committed.
    if tandem_events::SCHEMA_VERSION == 1 {
        let golden = std::fs::read(V1_PATH).expect("tests/golden/v1.bin is committed");
        assert_eq!(encode_all(&v1_envelopes()), golden);
    }
}
