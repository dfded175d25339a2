//! The decode worker and the routing loop on a real embedded log: a `Received` appended to the log is routed,
//! decoded with continuous batching, streamed over the token bus, and leaves a lifecycle the state machine accepts.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_events::lifecycle::{RequestState, check_sequence};
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::{EventLog, StartAt};
use tandem_events::schema::{Body, Received, SamplingParams};
use tandem_events::tokens::{InProcessTokenBus, TokenBus, TokenUpdate};
use tandem_events::{Event, EventKind};
use tandem_scheduler::service::{Scheduler, SchedulerConfig};
use tandem_workers::roles::decode::{DecodeWorker, DecodeWorkerConfig};
use tandem_workers::{Engine, EngineConfig, builtin_model};

fn tokenizer() -> tokenizers::Tokenizer {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/qwen3-tokenizer/tokenizer.json"
    );
    tokenizers::Tokenizer::from_file(path).expect("shipped tokenizer loads")
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        num_blocks: 256,
        ..EngineConfig::default()
    }
}

async fn collect(mut stream: tandem_events::tokens::TokenStream) -> Vec<TokenUpdate> {
    let mut updates = Vec::new();
    while let Some(update) = tokio::time::timeout(Duration::from_secs(60), stream.next())
        .await
        .expect("token updates keep coming")
    {
        let last = update.is_last();
        updates.push(update);
        if last {
            break;
        }
    }
    updates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_requests_decode_in_one_batch_and_match_the_engine() {
    let data_dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(data_dir.path()).unwrap());
    let bus = Arc::new(InProcessTokenBus::new());
    // Built twice: the built-in weights are deterministic, so both engines hold the same model.
    let mut reference = Engine::cpu(builtin_model(), engine_config()).unwrap();

    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let router = tokio::spawn(
        Scheduler::open(
            Arc::clone(&log),
            bus.clone(),
            SchedulerConfig::new("scheduler-test", data_dir.path().join("scheduler.redb")),
        )
        .await
        .unwrap()
        .run(stop),
    );
    let worker = DecodeWorker::start(
        DecodeWorkerConfig::new("decode-test", "qwen3"),
        Engine::cpu(builtin_model(), engine_config()).unwrap(),
        tokenizer(),
        Arc::clone(&log),
        bus.clone() as Arc<dyn TokenBus>,
        None,
    )
    .await
    .unwrap();

    // Three requests of different lengths, in flight together.
    let prompts: Vec<Vec<u32>> = vec![
        (0..25).map(|t| 1000 + t).collect(),
        (0..7).map(|t| 500 + 3 * t).collect(),
        (0..40).map(|t| 2000 + t).collect(),
    ];
    let max_tokens = [30u32, 12, 20];
    let mut streams = Vec::new();
    for (index, prompt) in prompts.iter().enumerate() {
        let request_id = format!("REQ{index}");
        streams.push(bus.subscribe(&request_id).await.unwrap());
        let received = Event::new(
            &request_id,
            "gateway-test",
            Body::Received(Received {
                model: "qwen3".into(),
                prompt_token_ids: prompt.clone(),
                prompt_tokens: prompt.len() as u32,
                sampling: Some(SamplingParams {
                    max_tokens: max_tokens[index],
                    ..Default::default()
                }),
                gateway_id: "gateway-test".into(),
                stream: true,
                endpoint: "completion".into(),
                ..Default::default()
            }),
        );
        log.append_event(&received, 1).await.unwrap();
    }
    let mut outputs = Vec::new();
    for stream in streams {
        outputs.push(collect(stream).await);
    }

    for (index, updates) in outputs.iter().enumerate() {
        let tokens: Vec<u32> = updates.iter().flat_map(|u| u.token_ids.clone()).collect();
        let indices: Vec<u32> = updates.iter().map(|u| u.start_index).collect();
        assert_eq!(
            indices,
            (0..max_tokens[index]).collect::<Vec<_>>(),
            "one update per token, in order"
        );
        assert_eq!(
            updates.last().unwrap().finish_reason.as_deref(),
            Some("length")
        );
        let expected = reference
            .generate(
                &prompts[index],
                &tandem_workers::SamplingParams {
                    max_tokens: max_tokens[index] as usize,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            tokens, expected.token_ids,
            "batched decode equals the engine alone (greedy)"
        );
    }

    worker.shutdown().await;
    stop_sender.send(true).unwrap();
    router.await.unwrap().unwrap();

    // The log holds each request's whole life, and the lifecycle accepts it.
    let messages = log.read(StartAt::Beginning, &[], 100_000).await.unwrap();
    for (index, expected_tokens) in max_tokens.iter().enumerate() {
        let request_id = format!("REQ{index}");
        let bodies: Vec<Body> = messages
            .iter()
            .filter_map(|m| m.event().ok())
            .filter(|e| e.id() == request_id)
            .map(|e| e.body().clone())
            .collect();
        let kinds: Vec<EventKind> = bodies.iter().map(Body::kind).collect();
        assert_eq!(
            kinds[..4],
            [
                EventKind::Received,
                EventKind::Routed,
                EventKind::PrefillLocal,
                EventKind::DecodeStarted
            ]
        );
        assert_eq!(kinds.last(), Some(&EventKind::Completed));
        let checkpointed: usize = bodies
            .iter()
            .filter_map(|b| match b {
                Body::TokensDecoded(t) => Some(t.token_ids.len()),
                _ => None,
            })
            .sum();
        assert_eq!(checkpointed, *expected_tokens as usize);
        assert_eq!(check_sequence(&bodies), Ok(RequestState::Completed));
    }
    let worker_kinds: Vec<EventKind> = messages
        .iter()
        .filter_map(|m| m.event().ok())
        .filter(|e| e.id() == "decode-test")
        .map(|e| e.kind())
        .collect();
    // Between joining and leaving, the worker published the blocks its prefix cache took (the scheduler's index).
    assert_eq!(worker_kinds.first(), Some(&EventKind::WorkerJoined));
    assert_eq!(worker_kinds.last(), Some(&EventKind::WorkerLeft));
    let between = &worker_kinds[1..worker_kinds.len() - 1];
    assert!(between.contains(&EventKind::KvBlocksStored));
    assert!(
        between
            .iter()
            .all(|kind| matches!(kind, EventKind::KvBlocksStored | EventKind::KvBlocksRemoved))
    );
}

/// Runs one request through a fresh worker and returns its updates.
async fn run_one(
    max_tokens: u32,
    stop_strings: Vec<String>,
    logprobs: Option<u32>,
) -> Vec<TokenUpdate> {
    let data_dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(data_dir.path()).unwrap());
    let bus = Arc::new(InProcessTokenBus::new());
    let worker = DecodeWorker::start(
        DecodeWorkerConfig::new("decode-stop", "qwen3"),
        Engine::cpu(builtin_model(), engine_config()).unwrap(),
        tokenizer(),
        Arc::clone(&log),
        bus.clone() as Arc<dyn TokenBus>,
        None,
    )
    .await
    .unwrap();
    let stream = bus.subscribe("STOPREQ").await.unwrap();
    let received = Event::new(
        "STOPREQ",
        "gateway-test",
        Body::Received(Received {
            model: "qwen3".into(),
            prompt_token_ids: vec![151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198],
            prompt_tokens: 9,
            sampling: Some(SamplingParams {
                max_tokens,
                stop_strings,
                logprobs,
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let sequence = log.append_event(&received, 1).await.unwrap().sequence;
    // Routed by hand: this test is about the worker, not the routing loop.
    let routed = Event::new(
        "STOPREQ",
        "scheduler-test",
        Body::Routed(tandem_events::schema::Routed {
            decode_worker_id: "decode-stop".into(),
            attempt: 1,
            received_sequence: sequence,
            ..Default::default()
        }),
    );
    log.append_event(&routed, 1).await.unwrap();
    let updates = collect(stream).await;
    worker.shutdown().await;
    updates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_across_tokens_ends_generation_before_it() {
    let free_run = run_one(24, vec![], Some(2)).await;
    let full_text: String = free_run.iter().map(|u| u.text.as_str()).collect();
    let logprobs: Vec<_> = free_run.iter().flat_map(|u| u.logprobs.clone()).collect();
    assert_eq!(logprobs.len(), 24, "one logprob entry per token");
    assert!(logprobs.iter().all(|entry| entry.top.len() == 2));
    // A stop string that starts inside one token's text and ends inside the next one's.
    let texts: Vec<&str> = free_run.iter().map(|u| u.text.as_str()).collect();
    let boundary = (3..texts.len() - 1)
        .find(|&i| !texts[i].is_empty() && !texts[i + 1].is_empty())
        .expect("two adjacent tokens with text");
    let tail_of_first = texts[boundary].chars().last().unwrap();
    let head_of_second = texts[boundary + 1].chars().next().unwrap();
    let stop = format!("{tail_of_first}{head_of_second}");
    let stop_at = full_text
        .find(&stop)
        .expect("the stop string is in the text");

    let stopped = run_one(24, vec![stop.clone()], None).await;
    let text: String = stopped.iter().map(|u| u.text.as_str()).collect();
    assert_eq!(
        text,
        full_text[..stop_at],
        "text ends right before the stop string"
    );
    assert_eq!(
        stopped.last().unwrap().finish_reason.as_deref(),
        Some("stop")
    );
    assert!(stopped.len() < free_run.len(), "generation ended early");
}
