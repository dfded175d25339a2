//! The worker side of migration and KV-aware routing, with the real engine (built-in model), the embedded log and
//! the in-process token bus: a request migrated mid-stream continues token-exact on another decode worker; the
//! `KvBlocksStored`/`KvBlocksRemoved` events rebuild a worker's prefix cache; a worker stops a request migrated
//! away from it or failed by someone else, and frees its blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_events::blocks::block_hashes;
use tandem_events::lifecycle::{RequestState, check_sequence};
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::{EventLog, StartAt};
use tandem_events::schema::{Body, Failed, Migrated, Received, Routed, SamplingParams};
use tandem_events::tokens::{InProcessTokenBus, TokenBus, TokenStream, TokenUpdate};
use tandem_events::{Event, EventKind};
use tandem_workers::roles::decode::{DecodeWorker, DecodeWorkerConfig, RemotePrefill};
use tandem_workers::roles::prefill::{PrefillWorker, PrefillWorkerConfig};
use tandem_workers::roles::prefill_rule::PrefillRule;
use tandem_workers::transfer::{
    InProcessTransport, KvTransport, TransferTimeouts, model_fingerprint,
};
use tandem_workers::{
    BUILTIN_SEED, Engine, EngineConfig, KvCacheEvent, builtin_config, builtin_model,
};

const CHECKPOINT_EVERY_TOKENS: usize = 8;

fn tokenizer() -> tokenizers::Tokenizer {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/qwen3-tokenizer/tokenizer.json"
    );
    tokenizers::Tokenizer::from_file(path).expect("shipped tokenizer loads")
}

fn engine(num_blocks: usize) -> Engine {
    Engine::cpu(
        builtin_model(),
        EngineConfig {
            num_blocks,
            ..EngineConfig::default()
        },
    )
    .expect("built-in engine")
}

fn fingerprint() -> u64 {
    model_fingerprint(
        &builtin_config(),
        format!("builtin:{BUILTIN_SEED}").as_bytes(),
    )
}

struct Fleet {
    log: Arc<dyn EventLog>,
    bus: Arc<InProcessTokenBus>,
    transport: Arc<InProcessTransport>,
    _data_dir: tempfile::TempDir,
}

impl Fleet {
    fn new() -> Fleet {
        let data_dir = tempfile::tempdir().unwrap();
        Fleet {
            log: Arc::new(EmbeddedLog::open(data_dir.path()).unwrap()),
            bus: Arc::new(InProcessTokenBus::new()),
            transport: Arc::new(InProcessTransport::new(TransferTimeouts::default())),
            _data_dir: data_dir,
        }
    }

    async fn worker(&self, worker_id: &str, num_blocks: usize) -> DecodeWorker {
        self.start_worker(worker_id, num_blocks, None).await
    }

    /// A decode worker that sends every prompt to the prefill workers.
    async fn disaggregated_worker(&self, worker_id: &str) -> DecodeWorker {
        let remote = RemotePrefill {
            receiver: self.transport.listen(worker_id).await.unwrap(),
            rule: PrefillRule {
                max_local_prefill_tokens: 0,
                max_prefill_queue_depth: 1_000,
            },
            model_fingerprint: fingerprint(),
            kv_wait_timeout: Duration::from_secs(60),
        };
        self.start_worker(worker_id, 256, Some(remote)).await
    }

    async fn prefill_worker(&self) -> PrefillWorker {
        PrefillWorker::start(
            PrefillWorkerConfig {
                worker_id: "prefill-test".into(),
                model_name: "qwen3".into(),
                device: "cpu".into(),
                model_fingerprint: fingerprint(),
            },
            engine(256),
            Arc::clone(&self.log),
            Arc::clone(&self.transport),
        )
        .await
        .unwrap()
    }

    async fn start_worker(
        &self,
        worker_id: &str,
        num_blocks: usize,
        remote: Option<RemotePrefill>,
    ) -> DecodeWorker {
        DecodeWorker::start(
            DecodeWorkerConfig {
                checkpoint_every_tokens: CHECKPOINT_EVERY_TOKENS,
                ..DecodeWorkerConfig::new(worker_id, "qwen3")
            },
            engine(num_blocks),
            tokenizer(),
            Arc::clone(&self.log),
            self.bus.clone() as Arc<dyn TokenBus>,
            remote,
        )
        .await
        .unwrap()
    }

    /// Appends the request's `Received` (as the gateway does, after subscribing) and returns its stream and the
    /// `Received`'s sequence.
    async fn receive(
        &self,
        request_id: &str,
        prompt: &[u32],
        sampling: SamplingParams,
    ) -> (TokenStream, u64) {
        let stream = self.bus.subscribe(request_id).await.unwrap();
        let received = Event::new(
            request_id,
            "gateway-test",
            Body::Received(Received {
                model: "qwen3".into(),
                prompt_token_ids: prompt.to_vec(),
                prompt_tokens: prompt.len() as u32,
                sampling: Some(sampling),
                gateway_id: "gateway-test".into(),
                stream: true,
                endpoint: "completion".into(),
                ..Default::default()
            }),
        );
        let sequence = self.log.append_event(&received, 1).await.unwrap().sequence;
        (stream, sequence)
    }

    /// A `Routed` as the scheduler appends it: occurrence = attempt.
    async fn route(&self, request_id: &str, worker_id: &str, attempt: u32, received_sequence: u64) {
        let routed = Event::new(
            request_id,
            "scheduler-test",
            Body::Routed(Routed {
                decode_worker_id: worker_id.into(),
                policy: "round_robin".into(),
                attempt,
                received_sequence,
                ..Default::default()
            }),
        );
        self.log.append_event(&routed, attempt).await.unwrap();
    }

    /// Every event about `id` on the log, in order.
    async fn events_of(&self, id: &str) -> Vec<Event> {
        self.log
            .read(StartAt::Beginning, &[], 1_000_000)
            .await
            .unwrap()
            .iter()
            .filter_map(|message| message.event().ok())
            .filter(|event| event.id() == id)
            .collect()
    }

    /// Generated tokens covered by the request's checkpoints on the log (what the scheduler's `Migrated` counts).
    async fn tokens_checkpointed(&self, request_id: &str) -> u32 {
        let mut covered = 0;
        for event in self.events_of(request_id).await {
            if let Body::TokensDecoded(checkpoint) = event.body()
                && checkpoint.start_index == covered
            {
                covered += checkpoint.token_ids.len() as u32;
            }
        }
        covered
    }
}

async fn next_update(stream: &mut TokenStream, wait: Duration) -> Option<TokenUpdate> {
    tokio::time::timeout(wait, stream.next())
        .await
        .ok()
        .flatten()
}

/// Updates until the one that ends the request.
async fn collect_to_end(stream: &mut TokenStream) -> Vec<TokenUpdate> {
    let mut updates = Vec::new();
    loop {
        let update = next_update(stream, Duration::from_secs(120))
            .await
            .expect("token updates keep coming");
        let last = update.is_last();
        updates.push(update);
        if last {
            return updates;
        }
    }
}

/// What was sent for each token index: (token ids, text, finish reason).
type ByIndex = BTreeMap<u32, (Vec<u32>, String, Option<String>)>;

fn by_index(updates: &[TokenUpdate]) -> ByIndex {
    updates
        .iter()
        .map(|update| {
            (
                update.start_index,
                (
                    update.token_ids.clone(),
                    update.text.clone(),
                    update.finish_reason.clone(),
                ),
            )
        })
        .collect()
}

fn prompt(first_token: u32, len: u32) -> Vec<u32> {
    // A chat turn's framing around plain tokens, so the text around it is real text.
    let mut prompt = vec![151644, 872, 198];
    prompt.extend((0..len).map(|offset| first_token + 7 * offset));
    prompt.extend([151645, 198, 151644, 77091, 198]);
    prompt
}

const MAX_TOKENS: u32 = 96;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_request_migrated_mid_stream_continues_token_exact_on_another_worker() {
    migrate_mid_stream(
        SamplingParams {
            max_tokens: MAX_TOKENS,
            ..Default::default()
        },
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_after_the_migration_point_ends_the_request_where_it_would_have() {
    // The stop string: the text of two adjacent tokens well after the migration point, in a free greedy run.
    let fleet = Fleet::new();
    let worker = fleet.worker("decode-free", 256).await;
    let (mut stream, received_sequence) = fleet
        .receive(
            "REQFREE",
            &prompt(9000, 24),
            SamplingParams {
                max_tokens: MAX_TOKENS,
                ..Default::default()
            },
        )
        .await;
    fleet
        .route("REQFREE", "decode-free", 1, received_sequence)
        .await;
    let free_run = collect_to_end(&mut stream).await;
    worker.shutdown().await;
    let texts: Vec<&str> = free_run.iter().map(|u| u.text.as_str()).collect();
    let full_text: String = texts.concat();
    // It must first occur after index 40, so the request is migrated before it stops.
    let text_before_40: usize = texts[..40].iter().map(|t| t.len()).sum();
    let stop = (60..texts.len() - 1)
        .filter(|&i| !texts[i].is_empty() && !texts[i + 1].is_empty())
        .map(|i| {
            format!(
                "{}{}",
                texts[i].chars().last().unwrap(),
                texts[i + 1].chars().next().unwrap()
            )
        })
        .find(|stop| {
            full_text
                .find(stop.as_str())
                .is_some_and(|at| at > text_before_40)
        })
        .expect("a stop string spanning two tokens late in the text");
    migrate_mid_stream(
        SamplingParams {
            max_tokens: MAX_TOKENS,
            stop_strings: vec![stop],
            ..Default::default()
        },
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_request_prefilled_remotely_continues_token_exact() {
    // The prefill worker computes prompt + checkpointed tokens and samples the token at the migration point.
    migrate_mid_stream(
        SamplingParams {
            max_tokens: MAX_TOKENS,
            ..Default::default()
        },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_sampled_request_migrated_mid_stream_draws_the_same_tokens() {
    // One random draw per token: the new worker skips the draws of the checkpointed tokens.
    migrate_mid_stream(
        SamplingParams {
            max_tokens: MAX_TOKENS,
            temperature: 1.5,
            top_p: 0.95,
            seed: Some(20_261_125),
            ..Default::default()
        },
        false,
    )
    .await;
}

/// Runs the request unmigrated, then on decode-a killed mid-stream and migrated to decode-b (both prefilling
/// `remotely` or locally), and compares what was sent for every index and what the log holds.
async fn migrate_mid_stream(sampling: SamplingParams, remotely: bool) {
    let prompt = prompt(9000, 24);

    // The unmigrated run.
    let reference_fleet = Fleet::new();
    let reference_worker = reference_fleet.worker("decode-ref", 256).await;
    let (mut stream, received_sequence) = reference_fleet
        .receive("REQREF", &prompt, sampling.clone())
        .await;
    reference_fleet
        .route("REQREF", "decode-ref", 1, received_sequence)
        .await;
    let reference = by_index(&collect_to_end(&mut stream).await);
    reference_worker.shutdown().await;
    let total_tokens = reference.len() as u32;
    let reference_finish = reference
        .values()
        .last()
        .and_then(|sent| sent.2.clone())
        .expect("the unmigrated run ends with a finish reason");

    // The same request on decode-a, which dies mid-stream; migrated by hand exactly as the scheduler does.
    let fleet = Fleet::new();
    let prefill = match remotely {
        true => Some(fleet.prefill_worker().await),
        false => None,
    };
    let (worker_a, worker_b) = match remotely {
        true => (
            fleet.disaggregated_worker("decode-a").await,
            fleet.disaggregated_worker("decode-b").await,
        ),
        false => (
            fleet.worker("decode-a", 256).await,
            fleet.worker("decode-b", 256).await,
        ),
    };
    let (mut stream, received_sequence) = fleet.receive("REQMIG", &prompt, sampling).await;
    fleet
        .route("REQMIG", "decode-a", 1, received_sequence)
        .await;
    let mut from_a = Vec::new();
    while from_a
        .last()
        .is_none_or(|u: &TokenUpdate| u.start_index < 20)
    {
        from_a.push(
            next_update(&mut stream, Duration::from_secs(60))
                .await
                .expect("decode-a streams"),
        );
    }
    // Die only once a checkpoint is on the log, so the migration has tokens to carry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fleet.tokens_checkpointed("REQMIG").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker_a.kill().await;
    while let Some(update) = next_update(&mut stream, Duration::from_millis(300)).await {
        from_a.push(update);
    }
    assert!(
        from_a.iter().all(|u| u.finish_reason.is_none()),
        "decode-a died before the end"
    );
    let tokens_generated = fleet.tokens_checkpointed("REQMIG").await;
    assert!(tokens_generated >= CHECKPOINT_EVERY_TOKENS as u32);
    assert!(tokens_generated < total_tokens, "migrated before the end");
    let migrated = Event::new(
        "REQMIG",
        "scheduler-test",
        Body::Migrated(Migrated {
            from_worker_id: "decode-a".into(),
            reason: "heartbeat_lost".into(),
            tokens_generated,
        }),
    );
    fleet.log.append_event(&migrated, 1).await.unwrap();
    fleet
        .route("REQMIG", "decode-b", 2, received_sequence)
        .await;
    let from_b = collect_to_end(&mut stream).await;
    worker_b.shutdown().await;
    if let Some(prefill) = prefill {
        prefill.shutdown().await;
    }

    assert_eq!(
        from_b.first().map(|u| u.start_index),
        Some(tokens_generated),
        "decode-b sends nothing before the checkpointed tokens"
    );
    let from_b = by_index(&from_b);
    assert_eq!(
        from_b.keys().copied().collect::<Vec<_>>(),
        (tokens_generated..total_tokens).collect::<Vec<_>>()
    );
    for (index, sent) in by_index(&from_a).iter().chain(from_b.iter()) {
        assert_eq!(
            Some(sent),
            reference.get(index),
            "token and text at index {index} as in the unmigrated run"
        );
    }
    assert_eq!(
        from_b.get(&(total_tokens - 1)).and_then(|s| s.2.clone()),
        Some(reference_finish)
    );

    let events = fleet.events_of("REQMIG").await;
    let bodies: Vec<Body> = events.iter().map(|e| e.body().clone()).collect();
    assert_eq!(check_sequence(&bodies), Ok(RequestState::Completed));
    let completed: Vec<_> = bodies
        .iter()
        .filter_map(|b| match b {
            Body::Completed(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].decode_worker_id, "decode-b");
    assert_eq!(
        completed[0].completion_tokens, total_tokens,
        "the whole request"
    );
    assert_eq!(completed[0].prompt_tokens, prompt.len() as u32);
    // decode-b's own checkpoints continue at the migration point (their dedup ids did not collide with decode-a's),
    // and with decode-a's they hold the unmigrated run's tokens.
    let mut checkpointed = BTreeMap::new();
    let mut b_starts = Vec::new();
    for body in &bodies {
        if let Body::TokensDecoded(checkpoint) = body {
            if checkpoint.decode_worker_id == "decode-b" {
                b_starts.push(checkpoint.start_index);
            }
            for (offset, &token) in checkpoint.token_ids.iter().enumerate() {
                checkpointed
                    .entry(checkpoint.start_index + offset as u32)
                    .or_insert(token);
            }
        }
    }
    assert_eq!(b_starts.first(), Some(&tokens_generated));
    let expected: BTreeMap<u32, u32> = reference
        .iter()
        .map(|(&index, sent)| (index, sent.0[0]))
        .collect();
    assert_eq!(checkpointed, expected);
    // Each checkpoint's text is what the updates for its tokens carried in the unmigrated run (so a gateway that
    // lost updates can finish the stream from the log), on both sides of the migration.
    for body in &bodies {
        if let Body::TokensDecoded(checkpoint) = body {
            let end = checkpoint.start_index + checkpoint.token_ids.len() as u32;
            let streamed: String = (checkpoint.start_index..end)
                .map(|index| reference[&index].1.as_str())
                .collect();
            assert_eq!(
                checkpoint.text.as_deref(),
                Some(streamed.as_str()),
                "text of {}'s checkpoint at {}",
                checkpoint.decode_worker_id,
                checkpoint.start_index
            );
        }
    }
    let b_kinds: Vec<EventKind> = events
        .iter()
        .filter(|e| e.envelope().emitter == "decode-b")
        .map(Event::kind)
        .collect();
    let prefill_kind = match remotely {
        true => EventKind::PrefillQueued,
        false => EventKind::PrefillLocal,
    };
    assert_eq!(b_kinds[..2], [prefill_kind, EventKind::DecodeStarted]);
    if remotely {
        // Both jobs' prefill records are on the log: the second job's were not dropped as duplicates.
        let prefill_done = bodies
            .iter()
            .filter(|b| matches!(b, Body::PrefillDone(_)))
            .count();
        assert_eq!(prefill_done, 2);
        let resumed_job = bodies.iter().rev().find_map(|b| match b {
            Body::PrefillQueued(queued) => Some(queued.prompt_token_ids.len()),
            _ => None,
        });
        assert_eq!(
            resumed_job,
            Some(prompt.len() + tokens_generated as usize),
            "the prefill worker computes the prompt and the checkpointed tokens"
        );
    }
}

/// Applies a worker's KV events in order, checking each against the set so far.
fn rebuild(bodies: &[Body]) -> BTreeSet<u64> {
    let mut cached = BTreeSet::new();
    for body in bodies {
        match body {
            Body::KvBlocksStored(stored) => {
                assert!(
                    stored.parent_hash == 0 || cached.contains(&stored.parent_hash),
                    "a stored chain continues a cached block"
                );
                for &hash in &stored.block_hashes {
                    assert!(cached.insert(hash), "stored twice without removal");
                }
            }
            Body::KvBlocksRemoved(removed) => {
                for hash in &removed.block_hashes {
                    assert!(cached.remove(hash), "removed a block never stored");
                }
            }
            _ => {}
        }
    }
    cached
}

#[test]
fn kv_cache_events_rebuild_the_engines_prefix_cache_exactly() {
    let mut engine = engine(12);
    engine.record_kv_cache_events();
    let mut rebuilt = BTreeSet::new();
    let mut removed_any = false;
    for round in 0..6u32 {
        // Half the prompts share a prefix, so blocks are reused as well as evicted.
        let first_token = if round % 2 == 0 {
            3000
        } else {
            4000 + 100 * round
        };
        let prompt = prompt(first_token, 30 + round);
        let params = tandem_workers::SamplingParams {
            max_tokens: 12,
            ..Default::default()
        };
        engine.generate(&prompt, &params).unwrap();
        for change in engine.take_kv_cache_events() {
            match change {
                KvCacheEvent::Stored {
                    parent_hash,
                    block_hashes,
                } => {
                    if let Some(parent) = parent_hash {
                        assert!(rebuilt.contains(&parent));
                    }
                    rebuilt.extend(block_hashes);
                }
                KvCacheEvent::Removed { block_hashes } => {
                    removed_any = true;
                    for hash in block_hashes {
                        assert!(rebuilt.remove(&hash));
                    }
                }
            }
        }
        assert_eq!(
            rebuilt.iter().copied().collect::<Vec<_>>(),
            engine.cached_block_hashes(),
            "round {round}"
        );
        assert!(rebuilt.is_superset(&block_hashes(&prompt, 16).into_iter().collect()));
    }
    assert!(
        removed_any,
        "12 blocks are too few to keep everything: some were evicted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_logs_its_prefix_cache_and_the_log_rebuilds_it() {
    let fleet = Fleet::new();
    // 16 blocks of 16 tokens: the third request evicts blocks of the first.
    let worker = fleet.worker("decode-kv", 16).await;
    let mut served = Vec::new();
    for (index, first_token) in [5000u32, 6000, 7000].into_iter().enumerate() {
        let request_id = format!("REQKV{index}");
        let prompt = prompt(first_token, 50);
        let (mut stream, received_sequence) = fleet
            .receive(
                &request_id,
                &prompt,
                SamplingParams {
                    max_tokens: 24,
                    ..Default::default()
                },
            )
            .await;
        fleet
            .route(&request_id, "decode-kv", 1, received_sequence)
            .await;
        let updates = collect_to_end(&mut stream).await;
        let generated: Vec<u32> = updates.iter().flat_map(|u| u.token_ids.clone()).collect();
        served.push((prompt, generated));
    }
    // Shut down so every KV event is on the log.
    worker.shutdown().await;
    let events = fleet.events_of("decode-kv").await;
    let kv_bodies: Vec<Body> = events
        .iter()
        .filter(|e| {
            matches!(
                e.kind(),
                EventKind::KvBlocksStored | EventKind::KvBlocksRemoved
            )
        })
        .map(|e| e.body().clone())
        .collect();
    assert!(
        kv_bodies
            .iter()
            .any(|b| matches!(b, Body::KvBlocksRemoved(_))),
        "blocks were evicted and said so"
    );
    let cached = rebuild(&kv_bodies);
    assert!(cached.len() <= 16, "never more blocks than the pool");
    // The last request's blocks are all cached: its prompt and the generated tokens it fed back (all but the last).
    let (prompt, generated) = served.last().unwrap();
    let mut fed = prompt.clone();
    fed.extend_from_slice(&generated[..generated.len() - 1]);
    let expected: BTreeSet<u64> = block_hashes(&fed, 16).into_iter().collect();
    assert!(!expected.is_empty());
    assert!(
        cached.is_superset(&expected),
        "the rebuilt set covers what the worker just served"
    );
    // What the scheduler computes for the prompt: every full block is there.
    let prompt_hashes = block_hashes(prompt, 16);
    assert_eq!(
        prompt_hashes
            .iter()
            .take_while(|h| cached.contains(h))
            .count(),
        prompt_hashes.len()
    );
}

/// A request that would run for a long time, stopped by `stop` once it streams; then a request that needs nearly
/// every block completes, which it could not if the stopped one still held its blocks.
async fn stopped_request_frees_its_blocks(stop: impl Fn(&str) -> Event) {
    let fleet = Fleet::new();
    // 8 blocks of 16 tokens = 128 token slots.
    let worker = fleet.worker("decode-stop", 8).await;
    let (mut stream, received_sequence) = fleet
        .receive(
            "REQLONG",
            &prompt(8000, 12),
            SamplingParams {
                max_tokens: 100,
                ..Default::default()
            },
        )
        .await;
    fleet
        .route("REQLONG", "decode-stop", 1, received_sequence)
        .await;
    next_update(&mut stream, Duration::from_secs(60))
        .await
        .expect("the long request streams");
    fleet.log.append_event(&stop("REQLONG"), 1).await.unwrap();
    // What was in flight when the stop came may still arrive; then nothing more.
    let mut after_stop = Vec::new();
    while let Some(update) = next_update(&mut stream, Duration::from_secs(1)).await {
        after_stop.push(update);
    }
    assert!(
        after_stop.len() < 40,
        "the request stopped ({} more updates)",
        after_stop.len()
    );
    assert!(
        after_stop
            .iter()
            .all(|u| u.finish_reason.is_none() && u.error.is_none())
    );

    let (mut stream, received_sequence) = fleet
        .receive(
            "REQBIG",
            &prompt(8500, 12),
            SamplingParams {
                max_tokens: 100,
                ..Default::default()
            },
        )
        .await;
    fleet
        .route("REQBIG", "decode-stop", 1, received_sequence)
        .await;
    let updates = collect_to_end(&mut stream).await;
    assert_eq!(
        updates.last().unwrap().finish_reason.as_deref(),
        Some("length")
    );
    assert_eq!(
        updates.len(),
        100,
        "all 8 blocks: only free if the stopped request gave its back"
    );
    worker.shutdown().await;

    let worker_ends: Vec<EventKind> = fleet
        .events_of("REQLONG")
        .await
        .iter()
        .filter(|e| e.envelope().emitter == "decode-stop")
        .map(Event::kind)
        .filter(|kind| matches!(kind, EventKind::Completed | EventKind::Failed))
        .collect();
    assert!(
        worker_ends.is_empty(),
        "nothing appended to end it: {worker_ends:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_a_request_migrated_away_from_it() {
    stopped_request_frees_its_blocks(|request_id| {
        Event::new(
            request_id,
            "scheduler-test",
            Body::Migrated(Migrated {
                from_worker_id: "decode-stop".into(),
                reason: "heartbeat_lost".into(),
                tokens_generated: 0,
            }),
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_a_request_the_scheduler_failed() {
    stopped_request_frees_its_blocks(|request_id| {
        Event::new(
            request_id,
            "scheduler-test",
            Body::Failed(Failed {
                reason: "decode_timeout".into(),
                message: "no token for 30 s".into(),
                worker_id: "decode-stop".into(),
            }),
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_migrated_after_its_last_token_completes_without_computing() {
    const TOKENS: u32 = 16;
    let prompt = prompt(9100, 10);
    let sampling = SamplingParams {
        max_tokens: TOKENS,
        ..Default::default()
    };
    let reference_fleet = Fleet::new();
    let reference_worker = reference_fleet.worker("decode-ref", 256).await;
    let (mut stream, received_sequence) = reference_fleet
        .receive("REQDONE", &prompt, sampling.clone())
        .await;
    reference_fleet
        .route("REQDONE", "decode-ref", 1, received_sequence)
        .await;
    let reference = collect_to_end(&mut stream).await;
    reference_worker.shutdown().await;
    let generated: Vec<u32> = reference.iter().flat_map(|u| u.token_ids.clone()).collect();
    assert_eq!(generated.len(), TOKENS as usize);

    // decode-gone checkpointed every token and was lost before appending `Completed`.
    let fleet = Fleet::new();
    let worker = fleet.worker("decode-b", 256).await;
    let (mut stream, received_sequence) = fleet.receive("REQDONE", &prompt, sampling).await;
    fleet
        .route("REQDONE", "decode-gone", 1, received_sequence)
        .await;
    for (body, occurrence) in [
        (
            Body::PrefillLocal(tandem_events::schema::PrefillLocal {
                decode_worker_id: "decode-gone".into(),
                decision: None,
            }),
            1,
        ),
        (
            Body::DecodeStarted(tandem_events::schema::DecodeStarted {
                decode_worker_id: "decode-gone".into(),
            }),
            1,
        ),
        (
            Body::TokensDecoded(tandem_events::schema::TokensDecoded {
                decode_worker_id: "decode-gone".into(),
                start_index: 0,
                token_ids: generated.clone(),
                logprobs: Vec::new(),
                text: None,
            }),
            0,
        ),
        (
            Body::Migrated(Migrated {
                from_worker_id: "decode-gone".into(),
                reason: "heartbeat_lost".into(),
                tokens_generated: TOKENS,
            }),
            1,
        ),
    ] {
        let event = Event::new("REQDONE", "test", body);
        fleet.log.append_event(&event, occurrence).await.unwrap();
    }
    fleet
        .route("REQDONE", "decode-b", 2, received_sequence)
        .await;
    let updates = collect_to_end(&mut stream).await;
    worker.shutdown().await;
    assert_eq!(
        updates.len(),
        1,
        "only the last token's update, with how it ended"
    );
    let last = reference.last().unwrap();
    assert_eq!(updates[0].start_index, TOKENS - 1);
    assert_eq!(updates[0].token_ids, last.token_ids);
    assert_eq!(updates[0].text, last.text);
    assert_eq!(updates[0].finish_reason.as_deref(), Some("length"));
    let bodies: Vec<Body> = fleet
        .events_of("REQDONE")
        .await
        .iter()
        .map(|e| e.body().clone())
        .collect();
    assert_eq!(check_sequence(&bodies), Ok(RequestState::Completed));
    let completed = bodies.iter().find_map(|b| match b {
        Body::Completed(c) => Some(c.clone()),
        _ => None,
    });
    assert_eq!(completed.map(|c| c.completion_tokens), Some(TOKENS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_declared_lost_but_alive_stops_and_takes_the_request_back_when_routed_again() {
    let prompt = prompt(9200, 20);
    let sampling = SamplingParams {
        max_tokens: MAX_TOKENS,
        ..Default::default()
    };
    let reference_fleet = Fleet::new();
    let reference_worker = reference_fleet.worker("decode-ref", 256).await;
    let (mut stream, received_sequence) = reference_fleet
        .receive("REQBACK", &prompt, sampling.clone())
        .await;
    reference_fleet
        .route("REQBACK", "decode-ref", 1, received_sequence)
        .await;
    let reference = by_index(&collect_to_end(&mut stream).await);
    reference_worker.shutdown().await;

    let fleet = Fleet::new();
    let worker = fleet.worker("decode-x", 256).await;
    let (mut stream, received_sequence) = fleet.receive("REQBACK", &prompt, sampling).await;
    fleet
        .route("REQBACK", "decode-x", 1, received_sequence)
        .await;
    let mut updates = Vec::new();
    while updates
        .last()
        .is_none_or(|u: &TokenUpdate| u.start_index < 20)
    {
        updates.push(
            next_update(&mut stream, Duration::from_secs(60))
                .await
                .expect("decode-x streams"),
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while fleet.tokens_checkpointed("REQBACK").await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tokens_generated = fleet.tokens_checkpointed("REQBACK").await;
    let migrated = Event::new(
        "REQBACK",
        "scheduler-test",
        Body::Migrated(Migrated {
            from_worker_id: "decode-x".into(),
            reason: "heartbeat_lost".into(),
            tokens_generated,
        }),
    );
    fleet.log.append_event(&migrated, 1).await.unwrap();
    // The first attempt stops: the stream goes quiet before it would have ended.
    while let Some(update) = next_update(&mut stream, Duration::from_secs(1)).await {
        assert!(
            update.finish_reason.is_none(),
            "the first attempt was stopped"
        );
        updates.push(update);
    }
    // Its heartbeat came back: the scheduler routes the request to it again.
    fleet
        .route("REQBACK", "decode-x", 2, received_sequence)
        .await;
    let resumed = collect_to_end(&mut stream).await;
    worker.shutdown().await;
    assert_eq!(
        resumed.first().map(|u| u.start_index),
        Some(tokens_generated)
    );
    updates.extend(resumed);
    for update in &updates {
        assert_eq!(
            Some(&(
                update.token_ids.clone(),
                update.text.clone(),
                update.finish_reason.clone()
            )),
            reference.get(&update.start_index),
            "index {}",
            update.start_index
        );
    }
    let completed: Vec<u32> = fleet
        .events_of("REQBACK")
        .await
        .iter()
        .filter_map(|e| match e.body() {
            Body::Completed(c) => Some(c.completion_tokens),
            _ => None,
        })
        .collect();
    assert_eq!(
        completed,
        vec![MAX_TOKENS],
        "completed once, by the second attempt"
    );
}
