//! The scheduler's decisions against a real embedded log, with workers played by hand (their events and
//! heartbeats written as the workers write them): KV-aware routing follows the cached prefix the workers
//! announced, a worker whose heartbeat stops is lost and its requests migrate, a request stuck in a phase fails
//! with a reason (and the gateway hears it on the token bus), and of two replicas only the lease holder decides.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tandem_events::blocks::block_hashes;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::{EventLog, KvBucket, StartAt};
use tandem_events::schema::{
    Body, DecodeStarted, KvBlocksRemoved, KvBlocksStored, PrefillLocal, Received, TokensDecoded,
    WorkerJoined,
};
use tandem_events::subjects::{WORKER_HEARTBEAT_TTL, WORKERS_BUCKET};
use tandem_events::tokens::{InProcessTokenBus, TokenBus};
use tandem_events::{Event, EventKind};
use tandem_scheduler::control::PhaseTimeouts;
use tandem_scheduler::projection::Projection;
use tandem_scheduler::routing::RoutingPolicy;
use tandem_scheduler::service::{Scheduler, SchedulerConfig, SchedulerStatus};
use tokio::sync::watch;

const BLOCK: usize = 16;

fn prompt(shared: u32, own: u32, seed: u32) -> Vec<u32> {
    (0..shared)
        .map(|t| 100 + t)
        .chain((0..own).map(|t| 9000 + seed * 50 + t))
        .collect()
}

async fn join(log: &dyn EventLog, heartbeats: &dyn KvBucket, worker_id: &str) {
    let joined = Event::new(
        worker_id,
        worker_id,
        Body::WorkerJoined(WorkerJoined {
            role: "decode".into(),
            total_blocks: 256,
            block_size_tokens: BLOCK as u32,
            max_batch_sequences: 8,
            ..Default::default()
        }),
    );
    log.append_event(&joined, 1).await.unwrap();
    heartbeats
        .put(worker_id, Bytes::from_static(b"decode"))
        .await
        .unwrap();
}

async fn receive(log: &dyn EventLog, request_id: &str, prompt: &[u32]) {
    let received = Event::new(
        request_id,
        "gateway-test",
        Body::Received(Received {
            model: "qwen3".into(),
            prompt_token_ids: prompt.to_vec(),
            prompt_tokens: prompt.len() as u32,
            endpoint: "completions".into(),
            ..Default::default()
        }),
    );
    log.append_event(&received, 1).await.unwrap();
}

/// The events of `kind` on the log, decoded.
async fn events_of(log: &dyn EventLog, kind: EventKind) -> Vec<Event> {
    log.read(StartAt::Beginning, &[], 1_000_000)
        .await
        .unwrap()
        .iter()
        .filter_map(|message| message.event().ok())
        .filter(|event| event.kind() == kind)
        .collect()
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(id: &str, dir: &Path) -> SchedulerConfig {
    let mut config = SchedulerConfig::new(id, dir.join(format!("{id}.redb")));
    config.control.join_grace = Duration::from_millis(200);
    config.lease_ttl = Duration::from_secs(1);
    config
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    status: watch::Receiver<SchedulerStatus>,
}

async fn start(
    log: &Arc<dyn EventLog>,
    bus: &Arc<InProcessTokenBus>,
    config: SchedulerConfig,
) -> Running {
    let scheduler = Scheduler::open(Arc::clone(log), bus.clone() as Arc<dyn TokenBus>, config)
        .await
        .unwrap();
    let status = scheduler.status();
    let (stop, stop_receiver) = watch::channel(false);
    let task = tokio::spawn(async move { scheduler.run(stop_receiver).await.unwrap() });
    Running { stop, task, status }
}

impl Running {
    /// Stops once the scheduler has projected everything on the log so far.
    async fn stop_caught_up(mut self, log: &dyn EventLog) {
        let last = log.last_sequence().await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            self.status
                .wait_for(|status| status.last_applied_sequence >= last),
        )
        .await
        .expect("the scheduler catches up")
        .unwrap();
        self.stop().await;
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_aware_routing_follows_the_announced_prefix_and_records_its_scores() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.path().join("log")).unwrap());
    let bus = Arc::new(InProcessTokenBus::new());
    let heartbeats = log
        .kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL)
        .await
        .unwrap();
    join(log.as_ref(), heartbeats.as_ref(), "decode-a").await;
    join(log.as_ref(), heartbeats.as_ref(), "decode-b").await;
    // decode-b holds the first four blocks of the shared 64-token prefix; decode-a held them once, then evicted
    // them.
    let shared = prompt(64, 0, 0);
    let hashes = block_hashes(&shared, BLOCK);
    assert_eq!(hashes.len(), 4);
    for worker in ["decode-a", "decode-b"] {
        let stored = Event::new(
            worker,
            worker,
            Body::KvBlocksStored(KvBlocksStored {
                block_hashes: hashes.clone(),
                parent_hash: 0,
            }),
        );
        log.append_event(&stored, 1).await.unwrap();
    }
    let removed = Event::new(
        "decode-a",
        "decode-a",
        Body::KvBlocksRemoved(KvBlocksRemoved {
            block_hashes: hashes[1..].to_vec(),
        }),
    );
    log.append_event(&removed, 1).await.unwrap();

    let running = start(&log, &bus, config("scheduler-kv", dir.path())).await;
    receive(log.as_ref(), "req-shared", &prompt(64, 20, 1)).await;
    wait_for("the request is routed", async || {
        !events_of(log.as_ref(), EventKind::Routed).await.is_empty()
    })
    .await;
    let routed = events_of(log.as_ref(), EventKind::Routed).await;
    let Body::Routed(routed) = routed[0].body() else {
        unreachable!()
    };
    assert_eq!(routed.decode_worker_id, "decode-b", "{}", routed.reason);
    assert_eq!(routed.policy, "kv");
    assert_eq!(routed.attempt, 1);
    let score_of = |worker: &str| {
        routed
            .scores
            .iter()
            .find(|score| score.worker_id == worker)
            .cloned()
            .unwrap()
    };
    // 84 tokens: 6 blocks; decode-b has 4 of them, decode-a 1.
    assert_eq!(score_of("decode-b").overlap_blocks, 4);
    assert_eq!(score_of("decode-b").prefill_blocks, 2);
    assert_eq!(score_of("decode-a").overlap_blocks, 1);
    assert!(score_of("decode-b").cost < score_of("decode-a").cost);
    assert!(routed.reason.contains("4 of 6"), "{}", routed.reason);
    running.stop_caught_up(log.as_ref()).await;

    // The projection's prefix index is what the events say, and a rebuild agrees.
    let projection = Projection::open(&dir.path().join("scheduler-kv.redb")).unwrap();
    let overlaps = projection.cached_prefix_blocks(&hashes).unwrap();
    assert_eq!(overlaps.get("decode-b"), Some(&4));
    assert_eq!(overlaps.get("decode-a"), Some(&1));
    let active = projection.active_requests().unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].decode_worker_id, "decode-b");
    assert_eq!(active[0].kv_blocks, 6);
    assert!(projection.unrouted().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_is_marked_and_its_requests_migrate_with_their_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.path().join("log")).unwrap());
    let bus = Arc::new(InProcessTokenBus::new());
    let heartbeats = log
        .kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL)
        .await
        .unwrap();
    join(log.as_ref(), heartbeats.as_ref(), "decode-a").await;
    let mut config = config("scheduler-lost", dir.path());
    config.control.policy = RoutingPolicy::RoundRobin;
    let running = start(&log, &bus, config).await;
    receive(log.as_ref(), "req-1", &prompt(10, 30, 1)).await;
    wait_for("routed to decode-a", async || {
        !events_of(log.as_ref(), EventKind::Routed).await.is_empty()
    })
    .await;
    // decode-a starts it and checkpoints 16 tokens, then dies (its heartbeat goes).
    for (occurrence, body) in [
        Body::PrefillLocal(PrefillLocal {
            decode_worker_id: "decode-a".into(),
            decision: None,
        }),
        Body::DecodeStarted(DecodeStarted {
            decode_worker_id: "decode-a".into(),
        }),
        Body::TokensDecoded(TokensDecoded {
            decode_worker_id: "decode-a".into(),
            start_index: 0,
            token_ids: (0..16).collect(),
            logprobs: Vec::new(),
            text: None,
        }),
    ]
    .into_iter()
    .enumerate()
    {
        let event = Event::new("req-1", "decode-a", body);
        log.append_event(&event, occurrence as u32 + 1)
            .await
            .unwrap();
    }
    join(log.as_ref(), heartbeats.as_ref(), "decode-b").await;
    heartbeats.delete("decode-a").await.unwrap();

    wait_for("the request is routed again", async || {
        events_of(log.as_ref(), EventKind::Routed).await.len() == 2
    })
    .await;
    let lost = events_of(log.as_ref(), EventKind::WorkerLost).await;
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].id(), "decode-a");
    let migrated = events_of(log.as_ref(), EventKind::Migrated).await;
    assert_eq!(migrated.len(), 1);
    let Body::Migrated(migrated) = migrated[0].body() else {
        unreachable!()
    };
    assert_eq!(migrated.from_worker_id, "decode-a");
    assert_eq!(migrated.tokens_generated, 16);
    let routed = events_of(log.as_ref(), EventKind::Routed).await;
    let Body::Routed(second) = routed[1].body() else {
        unreachable!()
    };
    assert_eq!(second.decode_worker_id, "decode-b");
    assert_eq!(second.attempt, 2);
    // Nothing more happens: one loss, one migration, one new routing, however many rounds run.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(events_of(log.as_ref(), EventKind::Routed).await.len(), 2);
    assert_eq!(events_of(log.as_ref(), EventKind::Migrated).await.len(), 1);
    running.stop_caught_up(log.as_ref()).await;
    let projection = Projection::open(&dir.path().join("scheduler-lost.redb")).unwrap();
    let record = projection.request("req-1").unwrap().unwrap();
    assert_eq!(record.state, "Routed");
    assert_eq!(record.decode_worker_id, "decode-b");
    assert_eq!(record.migrations, 1);
    assert_eq!(record.tokens_checkpointed, 16);
    let (_, decode_a) = projection
        .workers()
        .unwrap()
        .into_iter()
        .find(|(id, _)| id == "decode-a")
        .unwrap();
    assert!(decode_a.lost_at_ns.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stuck_in_a_phase_fails_with_its_reason_and_the_client_hears_it() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.path().join("log")).unwrap());
    let bus = Arc::new(InProcessTokenBus::new());
    let mut config = config("scheduler-timeouts", dir.path());
    config.control.timeouts = PhaseTimeouts {
        queue: Duration::from_millis(500),
        prefill: Duration::from_secs(60),
        progress: Duration::from_secs(60),
    };
    let running = start(&log, &bus, config).await;
    // No decode worker at all: the request waits, then fails.
    let mut updates = bus.subscribe("req-waiting").await.unwrap();
    receive(log.as_ref(), "req-waiting", &prompt(4, 4, 2)).await;
    let update = tokio::time::timeout(Duration::from_secs(20), updates.next())
        .await
        .expect("the client hears of the timeout")
        .unwrap();
    let message = update.error.expect("an error update");
    assert!(message.contains("waited for a decode worker"), "{message}");
    let failed = events_of(log.as_ref(), EventKind::Failed).await;
    assert_eq!(failed.len(), 1);
    let Body::Failed(failed) = failed[0].body() else {
        unreachable!()
    };
    assert_eq!(failed.reason, "queue_timeout");
    assert!(events_of(log.as_ref(), EventKind::Routed).await.is_empty());
    running.stop_caught_up(log.as_ref()).await;
    let projection = Projection::open(&dir.path().join("scheduler-timeouts.redb")).unwrap();
    assert_eq!(
        projection.request("req-waiting").unwrap().unwrap().state,
        "Failed"
    );
    assert!(projection.unrouted().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_decides_and_a_standby_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.path().join("log")).unwrap());
    let bus = Arc::new(InProcessTokenBus::new());
    let heartbeats = log
        .kv_bucket(WORKERS_BUCKET, WORKER_HEARTBEAT_TTL)
        .await
        .unwrap();
    join(log.as_ref(), heartbeats.as_ref(), "decode-a").await;
    join(log.as_ref(), heartbeats.as_ref(), "decode-b").await;
    let first = start(&log, &bus, config("scheduler-1", dir.path())).await;
    let mut first_status = first.status.clone();
    first_status.wait_for(|status| status.active).await.unwrap();
    let second = start(&log, &bus, config("scheduler-2", dir.path())).await;
    let mut second_status = second.status.clone();
    second_status
        .wait_for(|status| status.caught_up)
        .await
        .unwrap();
    for index in 0..20 {
        receive(log.as_ref(), &format!("req-{index}"), &prompt(8, 8, index)).await;
    }
    wait_for("every request routed", async || {
        events_of(log.as_ref(), EventKind::Routed).await.len() == 20
    })
    .await;
    let routers: std::collections::BTreeSet<String> = events_of(log.as_ref(), EventKind::Routed)
        .await
        .iter()
        .map(|event| event.envelope().emitter.clone())
        .collect();
    assert_eq!(routers.len(), 1, "one scheduler routed: {routers:?}");
    assert!(routers.contains("scheduler-1"));
    assert!(!second.status.borrow().active, "the second is a standby");

    // The active one goes away (once its projection holds its own 20 routings, which the comparison below needs;
    // on a loaded machine it may still be applying them when the last one is on the log); the standby takes the
    // lease and routes what comes next.
    first.stop_caught_up(log.as_ref()).await;
    second_status
        .wait_for(|status| status.active)
        .await
        .unwrap();
    for index in 20..30 {
        receive(log.as_ref(), &format!("req-{index}"), &prompt(8, 8, index)).await;
    }
    wait_for("the standby routes", async || {
        events_of(log.as_ref(), EventKind::Routed).await.len() == 30
    })
    .await;
    let by_second = events_of(log.as_ref(), EventKind::Routed)
        .await
        .iter()
        .filter(|event| event.envelope().emitter == "scheduler-2")
        .count();
    assert_eq!(by_second, 10);
    second.stop_caught_up(log.as_ref()).await;
    // Both replicas projected the same log into the same state.
    let one = Projection::open(&dir.path().join("scheduler-1.redb"))
        .unwrap()
        .snapshot()
        .unwrap();
    let two = Projection::open(&dir.path().join("scheduler-2.redb"))
        .unwrap()
        .snapshot()
        .unwrap();
    assert_eq!(two.requests.len(), 30);
    assert_eq!(
        one.requests.len(),
        20,
        "the first stopped before the last ten"
    );
    for (id, record) in &one.requests {
        let (_, other) = two.requests.iter().find(|(other, _)| other == id).unwrap();
        assert_eq!(record, other, "{id}");
    }
}
