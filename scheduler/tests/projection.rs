//! The redb projections against a real embedded log: request lifecycles project to the right records, a
//! redelivery is a no-op, bad events become audit findings, and after a crash (simulated, and a real `kill -9` of
//! a child process running the projector) the projection resumes and equals one rebuilt from scratch.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tandem_events::lifecycle::{self, RequestState};
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::jetstream::JetStreamLog;
use tandem_events::log::{EventLog, OutgoingMessage, StartAt};
use tandem_events::nats_server::NatsServer;
use tandem_events::schema::{
    Body, Cancelled, Completed, DecodeStarted, Envelope, Failed, KvTransferred, Migrated,
    PrefillDone, PrefillLocal, PrefillQueued, PrefillStarted, Received, Routed, TokensDecoded,
    WorkerHeartbeat, WorkerJoined, WorkerLeft, WorkerLost,
};
use tandem_events::{Event, SCHEMA_VERSION, subjects};
use tandem_scheduler::projection::projector::{consumer_config, run_projector};
use tandem_scheduler::projection::{Applied, Projection, ProjectionSnapshot};
use tokio::sync::watch;

const CHILD_DIR_VAR: &str = "TANDEM_PROJECTION_CRASH_CHILD_DIR";

/// Builds the events of a test log with deterministic timestamps (`timestamp_ns` = 1000 × position).
#[derive(Default)]
struct Script {
    messages: Vec<OutgoingMessage>,
}

impl Script {
    fn push(&mut self, id: &str, body: Body) -> &mut Self {
        let position = self.messages.len() as u64 + 1;
        let envelope = Envelope {
            schema_version: SCHEMA_VERSION,
            id: id.into(),
            emitter: "test".into(),
            timestamp_ns: position * 1000,
            trace: None,
            body: Some(body),
        };
        let event = Event::decode(&envelope.encode_to_vec()).unwrap();
        // The position makes every dedup id unique, so a deliberate repeat is stored too.
        self.messages
            .push(OutgoingMessage::from_event(&event, position as u32).unwrap());
        self
    }

    /// A payload that is not an event, on an event subject.
    fn push_malformed(&mut self, id: &str) -> &mut Self {
        self.messages.push(OutgoingMessage {
            subject: subjects::event_subject(tandem_events::EventKind::Received, id).unwrap(),
            dedup_id: format!("{id}:malformed:{}", self.messages.len()),
            payload: bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0x01]),
        });
        self
    }

    async fn append_to(&self, log: &dyn EventLog) {
        for message in &self.messages {
            log.append(message.clone()).await.unwrap();
        }
    }
}

fn received(prompt_tokens: u32) -> Body {
    Body::Received(Received {
        model: "qwen3-test".into(),
        prompt_token_ids: (0..prompt_tokens).collect(),
        prompt_tokens,
        endpoint: "chat".into(),
        ..Default::default()
    })
}

fn routed(decode: &str, attempt: u32) -> Body {
    Body::Routed(Routed {
        decode_worker_id: decode.into(),
        policy: "round_robin".into(),
        attempt,
        ..Default::default()
    })
}

fn prefill_local(decode: &str) -> Body {
    Body::PrefillLocal(PrefillLocal {
        decode_worker_id: decode.into(),
        decision: None,
    })
}

fn prefill_queued(decode: &str) -> Body {
    Body::PrefillQueued(PrefillQueued {
        decode_worker_id: decode.into(),
        ..Default::default()
    })
}

fn prefill_started(prefill: &str, attempt: u32) -> Body {
    Body::PrefillStarted(PrefillStarted {
        prefill_worker_id: prefill.into(),
        delivery_attempt: attempt,
    })
}

fn prefill_done(prefill: &str) -> Body {
    Body::PrefillDone(PrefillDone {
        prefill_worker_id: prefill.into(),
        first_token_id: 7,
        ..Default::default()
    })
}

fn kv_transferred(prefill: &str, decode: &str) -> Body {
    Body::KvTransferred(KvTransferred {
        from_worker_id: prefill.into(),
        to_worker_id: decode.into(),
        bytes: 4096,
        blocks: 2,
        duration_ns: 10,
        transport: "in_process".into(),
    })
}

fn decode_started(decode: &str) -> Body {
    Body::DecodeStarted(DecodeStarted {
        decode_worker_id: decode.into(),
    })
}

fn tokens(decode: &str, start_index: u32, count: u32) -> Body {
    Body::TokensDecoded(TokensDecoded {
        decode_worker_id: decode.into(),
        start_index,
        token_ids: (start_index..start_index + count).collect(),
        logprobs: vec![],
        text: None,
    })
}

fn completed(decode: &str, finish_reason: &str, completion_tokens: u32) -> Body {
    Body::Completed(Completed {
        finish_reason: finish_reason.into(),
        prompt_tokens: 8,
        completion_tokens,
        decode_worker_id: decode.into(),
    })
}

fn joined(role: &str) -> Body {
    Body::WorkerJoined(WorkerJoined {
        role: role.into(),
        transfer_endpoint: "tcp://127.0.0.1:7100".into(),
        device: "cpu".into(),
        model: "qwen3-test".into(),
        total_blocks: 512,
        block_size_tokens: 16,
        max_batch_sequences: 8,
    })
}

/// Appends request `n`'s whole life, one of five shapes chosen by `n`: local prefill, remote prefill with the
/// prefill worker's records landing after decoding started, cancellation with late work, failure after two
/// prefill attempts, and a migration.
fn push_request(script: &mut Script, id: &str, n: usize) {
    match n % 5 {
        0 => {
            script
                .push(id, received(8))
                .push(id, routed("decode-1", 1))
                .push(id, prefill_local("decode-1"))
                .push(id, decode_started("decode-1"))
                .push(id, tokens("decode-1", 0, 16))
                .push(id, tokens("decode-1", 16, 4))
                .push(id, completed("decode-1", "stop", 20));
        }
        1 => {
            script
                .push(id, received(64))
                .push(id, routed("decode-2", 1))
                .push(id, prefill_queued("decode-2"))
                .push(id, prefill_started("prefill-1", 1))
                .push(id, decode_started("decode-2"))
                .push(id, prefill_done("prefill-1"))
                .push(id, kv_transferred("prefill-1", "decode-2"))
                .push(id, tokens("decode-2", 0, 16))
                .push(id, completed("decode-2", "length", 16));
        }
        2 => {
            script
                .push(id, received(8))
                .push(id, routed("decode-1", 1))
                .push(id, prefill_local("decode-1"))
                .push(
                    id,
                    Body::Cancelled(Cancelled {
                        reason: "client_disconnected".into(),
                    }),
                )
                // The worker learns of the cancellation through the log: its work may still land.
                .push(id, decode_started("decode-1"));
        }
        3 => {
            script
                .push(id, received(64))
                .push(id, routed("decode-2", 1))
                .push(id, prefill_queued("decode-2"))
                .push(id, prefill_started("prefill-1", 1))
                .push(id, prefill_started("prefill-2", 2))
                .push(
                    id,
                    Body::Failed(Failed {
                        reason: "prefill_max_deliveries".into(),
                        message: "no prefill worker finished the job".into(),
                        worker_id: "decode-2".into(),
                    }),
                );
        }
        _ => {
            script
                .push(id, received(8))
                .push(id, routed("decode-1", 1))
                .push(id, prefill_local("decode-1"))
                .push(id, decode_started("decode-1"))
                .push(id, tokens("decode-1", 0, 16))
                .push(
                    id,
                    Body::Migrated(Migrated {
                        from_worker_id: "decode-1".into(),
                        reason: "worker_lost".into(),
                        tokens_generated: 16,
                    }),
                )
                .push(id, routed("decode-2", 2))
                .push(id, prefill_local("decode-2"))
                .push(id, decode_started("decode-2"))
                .push(id, tokens("decode-2", 16, 4))
                .push(id, completed("decode-2", "stop", 20));
        }
    }
}

/// A log of every shape of request plus workers, a repeated event, an illegal order and a malformed payload.
fn scripted_log() -> Script {
    let mut script = Script::default();
    script
        .push("decode-1", joined("decode"))
        .push("decode-2", joined("decode"))
        .push("prefill-1", joined("prefill"));
    for (n, id) in [
        "req-local",
        "req-remote",
        "req-cancelled",
        "req-failed",
        "req-migrated",
    ]
    .into_iter()
    .enumerate()
    {
        push_request(&mut script, id, n);
    }
    script
        // A retried append that was not deduplicated: an idempotent repeat.
        .push("req-local", completed("decode-1", "stop", 20))
        // Decoding before routing: a lifecycle violation.
        .push("req-illegal", received(8))
        .push("req-illegal", decode_started("decode-1"))
        .push_malformed("req-garbage")
        // The projection goes on after both.
        .push("req-illegal", routed("decode-1", 1))
        .push(
            "decode-1",
            Body::WorkerHeartbeat(WorkerHeartbeat {
                active_sequences: 2,
                free_blocks: 300,
                ..Default::default()
            }),
        )
        .push(
            "decode-2",
            Body::WorkerLeft(WorkerLeft {
                reason: "shutdown".into(),
            }),
        )
        .push(
            "prefill-1",
            Body::WorkerLost(WorkerLost {
                last_heartbeat_ns: 5,
                reason: "heartbeat_expired".into(),
            }),
        );
    script
}

async fn all_messages(log: &dyn EventLog) -> Vec<tandem_events::log::LogMessage> {
    log.read(StartAt::Beginning, &[], usize::MAX).await.unwrap()
}

/// A projection built from scratch, one message per transaction, from the whole log.
async fn rebuild(log: &dyn EventLog) -> ProjectionSnapshot {
    let dir = tempfile::tempdir().unwrap();
    let mut projection = Projection::open(&dir.path().join("rebuild.redb")).unwrap();
    for message in all_messages(log).await {
        projection.apply(&message).unwrap();
    }
    projection.snapshot().unwrap()
}

/// Runs the projector until its consumer has nothing left to finish, then stops it.
async fn project_until_drained(log: Arc<dyn EventLog>, db_path: PathBuf) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let projector = tokio::spawn(run_projector(log.clone(), db_path, stop_rx));
    let watcher = log.consumer(consumer_config()).await.unwrap();
    // Bounded wait for the projector to finish the log; no assertion on how long it takes.
    let mut drained = false;
    for _ in 0..3000 {
        // An error (a JetStream server coming back) is just not drained yet.
        if matches!(watcher.pending().await, Ok(0)) {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    projector.await.unwrap().unwrap();
    assert!(drained, "the projector did not finish the log");
}

fn state(record: &tandem_scheduler::projection::RequestRecord) -> &str {
    record.state.as_str()
}

#[tokio::test]
async fn lifecycles_project_to_states_timestamps_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    scripted_log().append_to(&log).await;
    let mut projection = Projection::open(&dir.path().join("projection.redb")).unwrap();
    let messages = all_messages(&log).await;
    let outcomes = projection.apply_batch(&messages).unwrap();
    assert_eq!(projection.last_applied().unwrap(), messages.len() as u64);

    // Timestamps are 1000 × the event's position in the script.
    let local = projection.request("req-local").unwrap().unwrap();
    assert_eq!(state(&local), "Completed");
    assert_eq!(local.model, "qwen3-test");
    assert_eq!(local.prompt_tokens, 8);
    assert_eq!(local.received_at_ns, Some(4000));
    assert_eq!(local.routed_at_ns, Some(5000));
    assert_eq!(local.prefill_local_at_ns, Some(6000));
    assert_eq!(local.prefill_queued_at_ns, None);
    assert_eq!(local.decode_started_at_ns, Some(7000));
    assert_eq!(local.first_checkpoint_at_ns, Some(8000));
    assert_eq!(local.last_checkpoint_at_ns, Some(9000));
    assert_eq!(
        local.terminal_at_ns,
        Some(10_000),
        "the later repeat changes nothing"
    );
    assert_eq!(local.decode_worker_id, "decode-1");
    assert_eq!(local.prefill_worker_id, "");
    assert_eq!(local.tokens_checkpointed, 20);
    assert_eq!(local.completion_tokens, 20);
    assert_eq!(local.finish_reason, "stop");
    assert_eq!(local.routing_attempts, 1);
    assert_eq!(local.received_sequence, 4);

    let remote = projection.request("req-remote").unwrap().unwrap();
    assert_eq!(state(&remote), "Completed");
    assert_eq!(remote.prefill_queued_at_ns, Some(13_000));
    assert_eq!(remote.prefill_started_at_ns, Some(14_000));
    // Decoding started before the prefill worker's records landed; they still get their times.
    assert_eq!(remote.decode_started_at_ns, Some(15_000));
    assert_eq!(remote.prefill_done_at_ns, Some(16_000));
    assert_eq!(remote.kv_transferred_at_ns, Some(17_000));
    assert_eq!(remote.prefill_worker_id, "prefill-1");
    assert_eq!(remote.decode_worker_id, "decode-2");
    assert_eq!(remote.finish_reason, "length");

    let cancelled = projection.request("req-cancelled").unwrap().unwrap();
    assert_eq!(state(&cancelled), "Cancelled");
    assert_eq!(cancelled.failure_reason, "client_disconnected");
    assert_eq!(cancelled.terminal_at_ns, Some(23_000));
    assert_eq!(
        cancelled.decode_started_at_ns, None,
        "late work changes nothing"
    );

    let failed = projection.request("req-failed").unwrap().unwrap();
    assert_eq!(state(&failed), "Failed");
    assert_eq!(failed.failure_reason, "prefill_max_deliveries");
    assert_eq!(
        failed.prefill_worker_id, "prefill-2",
        "the latest attempt's worker"
    );
    assert_eq!(failed.prefill_started_at_ns, Some(29_000));

    let migrated = projection.request("req-migrated").unwrap().unwrap();
    assert_eq!(state(&migrated), "Completed");
    assert_eq!(migrated.migrations, 1);
    assert_eq!(migrated.routing_attempts, 2);
    assert_eq!(migrated.decode_worker_id, "decode-2");
    assert_eq!(migrated.tokens_checkpointed, 20);
    assert_eq!(migrated.routed_at_ns, Some(37_000));
    assert_eq!(migrated.first_checkpoint_at_ns, Some(35_000));
    assert_eq!(migrated.last_checkpoint_at_ns, Some(40_000));

    let illegal = projection.request("req-illegal").unwrap().unwrap();
    assert_eq!(
        state(&illegal),
        "Routed",
        "the projection went on after the violation"
    );

    // Outcomes: the repeat, the late work and the violation are told apart.
    let outcome_of = |sequence: usize| &outcomes[sequence - 1];
    assert_eq!(
        outcome_of(42),
        &Applied::Request {
            request_id: "req-local".into(),
            outcome: lifecycle::Applied::Repeat
        }
    );
    assert_eq!(
        outcome_of(24),
        &Applied::Request {
            request_id: "req-cancelled".into(),
            outcome: lifecycle::Applied::AfterCancellation
        }
    );

    let completed_ids: Vec<String> = projection
        .requests(Some(RequestState::Completed), 0)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(completed_ids, ["req-local", "req-migrated", "req-remote"]);
    let since_ids: Vec<String> = projection
        .requests(None, 25_000)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(since_ids, ["req-failed", "req-illegal", "req-migrated"]);

    let workers = projection.workers().unwrap();
    let worker_ids: Vec<&str> = workers.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(worker_ids, ["decode-1", "decode-2", "prefill-1"]);
    let (_, decode_1) = &workers[0];
    assert_eq!(decode_1.role, "decode");
    assert_eq!(decode_1.total_blocks, 512);
    assert_eq!(decode_1.joined_at_ns, Some(1000));
    assert_eq!(decode_1.last_heartbeat_at_ns, Some(47_000));
    assert_eq!(decode_1.free_blocks, 300);
    assert_eq!(decode_1.left_at_ns, None);
    let (_, decode_2) = &workers[1];
    assert_eq!(decode_2.left_at_ns, Some(48_000));
    assert_eq!(decode_2.departure_reason, "shutdown");
    let (_, prefill_1) = &workers[2];
    assert_eq!(prefill_1.role, "prefill");
    assert_eq!(prefill_1.lost_at_ns, Some(49_000));

    // Every accepted request event is kept under its request, including the repeat and the late work.
    let snapshot = projection.snapshot().unwrap();
    let events_of = |id: &str| {
        snapshot
            .events_by_request
            .iter()
            .filter(|((request, _), _)| request == id)
            .count()
    };
    assert_eq!(events_of("req-local"), 8);
    assert_eq!(events_of("req-cancelled"), 5);
    assert_eq!(
        events_of("req-illegal"),
        2,
        "the violating event is a finding instead"
    );
    assert_eq!(snapshot.schema_version, 2);
}

#[tokio::test]
async fn illegal_orders_and_malformed_payloads_are_findings_and_the_projector_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.path().join("log")).unwrap());
    scripted_log().append_to(log.as_ref()).await;
    let db_path = dir.path().join("projection.redb");
    project_until_drained(log.clone(), db_path.clone()).await;

    let projection = Projection::open(&db_path).unwrap();
    assert_eq!(
        projection.last_applied().unwrap(),
        log.last_sequence().await.unwrap()
    );
    let findings = projection.findings().unwrap();
    assert_eq!(findings.len(), 2, "{findings:?}");
    let illegal = &findings[0];
    assert_eq!(illegal.sequence, 44);
    assert_eq!(illegal.request_id, "req-illegal");
    assert_eq!(illegal.event_kind, "decode_started");
    assert!(
        illegal.violation.contains("cannot follow"),
        "{}",
        illegal.violation
    );
    let offending = Event::decode(&illegal.event_bytes).unwrap();
    assert_eq!(offending.body(), &decode_started("decode-1"));

    let malformed = &findings[1];
    assert_eq!(malformed.sequence, 45);
    assert_eq!(malformed.event_kind, "malformed");
    assert_eq!(malformed.request_id, "");
    assert_eq!(malformed.subject, "tandem.ev.received.req-garbage");
    assert_eq!(malformed.event_bytes, [0xff, 0xff, 0xff, 0x01]);

    // Applied after the findings.
    assert_eq!(
        state(&projection.request("req-illegal").unwrap().unwrap()),
        "Routed"
    );
    assert_eq!(projection.snapshot().unwrap(), rebuild(log.as_ref()).await);
}

#[tokio::test]
async fn a_redelivered_message_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(&dir.path().join("log")).unwrap();
    scripted_log().append_to(&log).await;
    let messages = all_messages(&log).await;
    let mut projection = Projection::open(&dir.path().join("projection.redb")).unwrap();
    for message in &messages[..20] {
        projection.apply(message).unwrap();
    }
    let before = projection.snapshot().unwrap();
    // The last one again, an earlier one, and a batch that straddles the stored sequence.
    assert_eq!(
        projection.apply(&messages[19]).unwrap(),
        Applied::AlreadyApplied
    );
    assert_eq!(
        projection.apply(&messages[3]).unwrap(),
        Applied::AlreadyApplied
    );
    assert_eq!(projection.snapshot().unwrap(), before);
    let outcomes = projection.apply_batch(&messages[15..25]).unwrap();
    assert!(
        outcomes[..5]
            .iter()
            .all(|outcome| *outcome == Applied::AlreadyApplied)
    );
    assert!(
        outcomes[5..]
            .iter()
            .all(|outcome| *outcome != Applied::AlreadyApplied)
    );
    assert_eq!(projection.last_applied().unwrap(), 25);
    // And after reopening (the lifecycle cache is gone), still a no-op, and the rest applies as from scratch.
    drop(projection);
    let mut projection = Projection::open(&dir.path().join("projection.redb")).unwrap();
    assert_eq!(
        projection.apply(&messages[24]).unwrap(),
        Applied::AlreadyApplied
    );
    projection.apply_batch(&messages[25..]).unwrap();
    assert_eq!(projection.snapshot().unwrap(), rebuild(&log).await);
}

#[tokio::test]
async fn resumes_after_crashes_between_apply_commit_and_ack() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let db_path = dir.path().join("projection.redb");
    let mut script = scripted_log();
    let total_first = script.messages.len();
    {
        let log = EmbeddedLog::open(&log_dir).unwrap();
        script.append_to(&log).await;
        let consumer = log.consumer(consumer_config()).await.unwrap();
        let deliveries = consumer.fetch(30, Duration::from_secs(5)).await.unwrap();
        assert_eq!(deliveries.len(), 30);
        let mut projection = Projection::open(&db_path).unwrap();
        let messages: Vec<_> = deliveries.iter().map(|d| d.message.clone()).collect();
        // 1..=10 committed and acked.
        projection.apply_batch(&messages[..10]).unwrap();
        for delivery in &deliveries[..10] {
            delivery.ack().await.unwrap();
        }
        // 11..=20 committed, crash before the ack.
        projection.apply_batch(&messages[10..20]).unwrap();
        // 21..=30 fetched, crash before the commit: a redb write transaction that is never committed is rolled
        // back (on drop, or on open after a kill), so they are fetched and unacked with no trace in the file.
        assert_eq!(projection.last_applied().unwrap(), 20);
        drop(deliveries);
        drop(consumer);
        drop(projection);
    }
    // Restart: the log redelivers 11..=30; 11..=20 are skipped, 21.. applied; more requests arrive meanwhile.
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&log_dir).unwrap());
    script.messages.clear();
    for n in 0..10 {
        push_request(&mut script, &format!("req-late-{n:02}"), n);
    }
    script.append_to(log.as_ref()).await;
    assert!(script.messages.len() > 10);
    project_until_drained(log.clone(), db_path.clone()).await;

    let projection = Projection::open(&db_path).unwrap();
    let snapshot = projection.snapshot().unwrap();
    assert_eq!(
        snapshot.last_applied_sequence,
        (total_first + script.messages.len()) as u64
    );
    assert_eq!(snapshot, rebuild(log.as_ref()).await);
    assert_eq!(
        projection
            .requests(Some(RequestState::Completed), 0)
            .unwrap()
            .len(),
        3 + 6
    );
}

#[tokio::test]
async fn messages_lost_on_the_way_to_the_projector_are_applied_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.path().join("log")).unwrap());
    scripted_log().append_to(log.as_ref()).await;
    // A fetch whose messages never reach the projector (a cancelled fetch, a lost reply): they come again only
    // after the ack wait, while the projector is handed the later ones at once.
    let consumer = log.consumer(consumer_config()).await.unwrap();
    let lost = consumer.fetch(12, Duration::from_secs(5)).await.unwrap();
    assert_eq!(lost.len(), 12);
    drop(lost);
    let db_path = dir.path().join("projection.redb");
    project_until_drained(log.clone(), db_path.clone()).await;

    let projection = Projection::open(&db_path).unwrap();
    let snapshot = projection.snapshot().unwrap();
    assert_eq!(snapshot.findings.len(), 2, "{:?}", snapshot.findings);
    assert_eq!(snapshot, rebuild(log.as_ref()).await);
}

/// Requests `4 × chunk ..` (one of each of four shapes) with their events interleaved, so that wherever the log
/// is cut, requests are in mid-life. Deterministic, dedup ids included: appending a chunk again stores only what
/// is missing.
fn interleaved_chunk(chunk: usize) -> Script {
    let scripts: Vec<Script> = (chunk * 4..chunk * 4 + 4)
        .map(|n| {
            let mut script = Script::default();
            push_request(&mut script, &format!("req-{n:05}"), n);
            script
        })
        .collect();
    let mut merged = Script::default();
    let longest = scripts.iter().map(|s| s.messages.len()).max().unwrap_or(0);
    for position in 0..longest {
        for script in &scripts {
            if let Some(message) = script.messages.get(position) {
                merged.messages.push(message.clone());
            }
        }
    }
    merged
}

/// The child: runs the projector while appending interleaved request lifecycles, until killed.
#[test]
fn child_projector() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.join("log")).unwrap());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let projector = tokio::spawn(run_projector(
            log.clone(),
            dir.join("projection.redb"),
            stop_rx,
        ));
        for chunk in 0.. {
            for message in interleaved_chunk(chunk).messages {
                log.append(message).await.unwrap();
                println!("appended {chunk}");
            }
            if projector.is_finished() {
                panic!("the projector stopped: {:?}", projector.await);
            }
        }
    });
}

#[test]
fn projection_survives_kill_9_of_the_projector() {
    if std::env::var_os(CHILD_DIR_VAR).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_projector",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR_VAR, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut appended = 0;
    let mut last_chunk = 0;
    for line in BufReader::new(stdout).lines() {
        if let Some(chunk) = line.unwrap().strip_prefix("appended ") {
            last_chunk = chunk.parse::<usize>().unwrap();
            appended += 1;
            if appended >= 150 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(appended >= 150, "child stopped early");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&dir.path().join("log")).unwrap());
        // Finish the lives the kill cut short (the child may have got one chunk further than it printed): the
        // resumed projector then continues requests whose lifecycles it must rebuild from its tables.
        for chunk in 0..=last_chunk + 1 {
            interleaved_chunk(chunk).append_to(log.as_ref()).await;
        }
        let db_path = dir.path().join("projection.redb");
        project_until_drained(log.clone(), db_path.clone()).await;
        let projection = Projection::open(&db_path).unwrap();
        let snapshot = projection.snapshot().unwrap();
        assert_eq!(
            snapshot.last_applied_sequence,
            log.last_sequence().await.unwrap()
        );
        assert!(snapshot.findings.is_empty(), "{:?}", snapshot.findings);
        assert_eq!(snapshot.requests.len(), (last_chunk + 2) * 4);
        assert_eq!(snapshot, rebuild(log.as_ref()).await);
    });
}

/// On JetStream: the projector stops, nats-server is killed -9 and restarted, more requests arrive, a new
/// projector resumes, and the result equals a rebuild. Needs `nats-server` ≥ 2.11 on PATH or in
/// `NATS_SERVER_BIN` (CI has it).
#[tokio::test]
async fn resumes_on_jetstream_after_a_server_kill() {
    let mut server = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
    let log: Arc<dyn EventLog> = Arc::new(JetStreamLog::connect(&server.url()).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("projection.redb");
    scripted_log().append_to(log.as_ref()).await;
    interleaved_chunk(0).append_to(log.as_ref()).await;
    project_until_drained(log.clone(), db_path.clone()).await;
    let halfway = Projection::open(&db_path).unwrap().last_applied().unwrap();
    assert_eq!(halfway, log.last_sequence().await.unwrap());

    server.restart().unwrap();
    // Appends retry across the reconnect with the same dedup ids.
    interleaved_chunk(1).append_to(log.as_ref()).await;
    interleaved_chunk(2).append_to(log.as_ref()).await;
    project_until_drained(log.clone(), db_path.clone()).await;

    let projection = Projection::open(&db_path).unwrap();
    let snapshot = projection.snapshot().unwrap();
    assert!(snapshot.last_applied_sequence > halfway);
    assert_eq!(
        snapshot.last_applied_sequence,
        log.last_sequence().await.unwrap()
    );
    assert_eq!(snapshot.findings.len(), 2, "{:?}", snapshot.findings);
    assert_eq!(snapshot, rebuild(log.as_ref()).await);
}
