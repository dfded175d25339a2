//! One conformance suite for both `EventLog` backends: ordering, reads by sequence and time, dedup, pipelined
//! appends, ack/nak/in-progress/term and redelivery, max-deliver, shared and filtered consumers, the key-value
//! bucket with expiry, restart survival (JetStream: nats-server killed and restarted mid-test; embedded: dropped
//! and reopened), and malformed payloads on the stream.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::jetstream::JetStreamLog;
use tandem_events::log::{ConsumerConfig, EventLog, OutgoingMessage, StartAt};
use tandem_events::nats_server::NatsServer;
use tandem_events::schema::{Body, Received, Routed, TokensDecoded};
use tandem_events::subjects::{self, ALL_EVENTS};
use tandem_events::{Event, EventKind};

/// A backend under test that can be restarted.
#[async_trait]
trait Harness: Send {
    fn log(&self) -> Arc<dyn EventLog>;
    /// Whether appends may race the restart (a server restart: yes; an in-process reopen: the old handle must go).
    fn restart_is_live(&self) -> bool;
    /// JetStream: SIGKILL the server and start it again on the same port and store. Embedded: drop and reopen.
    async fn restart(&mut self);
}

struct EmbeddedHarness {
    data_dir: tempfile::TempDir,
    log: Option<Arc<EmbeddedLog>>,
}

#[async_trait]
impl Harness for EmbeddedHarness {
    fn log(&self) -> Arc<dyn EventLog> {
        self.log.clone().expect("log open")
    }

    fn restart_is_live(&self) -> bool {
        false
    }

    async fn restart(&mut self) {
        let log = self.log.take().expect("log open");
        drop(log);
        self.log = Some(Arc::new(
            EmbeddedLog::open(self.data_dir.path()).expect("reopen"),
        ));
    }
}

async fn embedded() -> Box<dyn Harness> {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let log = Arc::new(EmbeddedLog::open(data_dir.path()).expect("open embedded log"));
    Box::new(EmbeddedHarness {
        data_dir,
        log: Some(log),
    })
}

struct JetStreamHarness {
    server: NatsServer,
    log: Arc<JetStreamLog>,
}

#[async_trait]
impl Harness for JetStreamHarness {
    fn log(&self) -> Arc<dyn EventLog> {
        self.log.clone()
    }

    fn restart_is_live(&self) -> bool {
        true
    }

    async fn restart(&mut self) {
        self.server.restart().expect("restart nats-server");
    }
}

async fn jetstream() -> Box<dyn Harness> {
    let server = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
    let log = Arc::new(JetStreamLog::connect(&server.url()).await.expect("connect"));
    Box::new(JetStreamHarness { server, log })
}

fn received(request_id: &str) -> Event {
    Event::new(
        request_id,
        "gateway-test",
        Body::Received(Received {
            model: "qwen3".into(),
            prompt_token_ids: vec![1, 2, 3],
            prompt_tokens: 3,
            ..Default::default()
        }),
    )
}

fn routed(request_id: &str, worker: &str) -> Event {
    Event::new(
        request_id,
        "scheduler-test",
        Body::Routed(Routed {
            decode_worker_id: worker.into(),
            policy: "round_robin".into(),
            attempt: 1,
            ..Default::default()
        }),
    )
}

fn request_id(index: usize) -> String {
    format!("req{index:05}")
}

async fn append_received(log: &dyn EventLog, count: usize) {
    for index in 0..count {
        log.append_event(&received(&request_id(index)), 1)
            .await
            .expect("append");
    }
}

fn short_consumer(name: &str, filters: Vec<String>) -> ConsumerConfig {
    ConsumerConfig {
        ack_wait: Duration::from_millis(800),
        ..ConsumerConfig::new(name, filters)
    }
}

async fn ordering_and_reads(harness: Box<dyn Harness>) {
    let log = harness.log();
    assert_eq!(log.last_sequence().await.unwrap(), 0);
    append_received(log.as_ref(), 20).await;
    let messages = log.read(StartAt::Beginning, &[], 1000).await.unwrap();
    assert_eq!(messages.len(), 20);
    for (index, message) in messages.iter().enumerate() {
        assert_eq!(message.sequence, index as u64 + 1);
        let event = message.event().expect("decodes");
        assert_eq!(event.id(), request_id(index));
        assert_eq!(
            message.subject,
            format!("tandem.ev.received.{}", request_id(index))
        );
    }
    assert_eq!(log.last_sequence().await.unwrap(), 20);

    let from_ten = log.read(StartAt::Sequence(10), &[], 5).await.unwrap();
    let sequences: Vec<u64> = from_ten.iter().map(|m| m.sequence).collect();
    assert_eq!(sequences, vec![10, 11, 12, 13, 14]);

    // By time: everything stored at or after the 15th message's time starts at or before it.
    let cut_ns = messages[14].stored_at_ns;
    let by_time = log.read(StartAt::TimeNs(cut_ns), &[], 1000).await.unwrap();
    assert!(by_time.first().unwrap().sequence <= 15);
    assert!(by_time.iter().all(|m| m.stored_at_ns >= cut_ns));
    assert_eq!(by_time.last().unwrap().sequence, 20);
    let future = log
        .read(StartAt::TimeNs(u64::MAX / 2), &[], 1000)
        .await
        .unwrap();
    assert!(future.is_empty());

    // Stored times never go backwards.
    assert!(
        messages
            .windows(2)
            .all(|pair| pair[0].stored_at_ns <= pair[1].stored_at_ns)
    );
}

async fn dedup_and_batches(harness: Box<dyn Harness>) {
    let log = harness.log();
    let event = received("dup1");
    let first = log.append_event(&event, 1).await.unwrap();
    let again = log.append_event(&event, 1).await.unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.sequence, first.sequence);
    let other_occurrence = log.append_event(&event, 2).await.unwrap();
    assert!(!other_occurrence.duplicate);
    assert_eq!(other_occurrence.sequence, first.sequence + 1);

    let batch: Vec<OutgoingMessage> = (0..50)
        .map(|index| OutgoingMessage::from_event(&received(&request_id(index)), 1).unwrap())
        .collect();
    let acks = log.append_batch(batch.clone()).await.unwrap();
    assert_eq!(acks.len(), 50);
    assert!(
        acks.windows(2)
            .all(|pair| pair[1].sequence == pair[0].sequence + 1)
    );
    assert!(acks.iter().all(|ack| !ack.duplicate));
    // The same batch again is all duplicates, pointing at the originals.
    let repeated = log.append_batch(batch).await.unwrap();
    assert!(repeated.iter().all(|ack| ack.duplicate));
    assert_eq!(
        repeated.iter().map(|a| a.sequence).collect::<Vec<_>>(),
        acks.iter().map(|a| a.sequence).collect::<Vec<_>>()
    );
    assert_eq!(log.last_sequence().await.unwrap(), 52);
}

async fn ack_nak_and_redelivery(harness: Box<dyn Harness>) {
    let log = harness.log();
    append_received(log.as_ref(), 4).await;
    let consumer = log
        .consumer(short_consumer("work", vec![ALL_EVENTS.into()]))
        .await
        .unwrap();
    assert_eq!(consumer.pending().await.unwrap(), 4, "all four wait");
    let batch = consumer.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(
        consumer.pending().await.unwrap(),
        4,
        "delivered but unacked still count"
    );
    assert_eq!(batch.len(), 4);
    assert!(batch.iter().all(|d| d.delivery_attempt == 1));
    // 1: ack, 2: nak now, 3: left alone (ack-wait expires), 4: term.
    batch[0].ack().await.unwrap();
    batch[1].nak(None).await.unwrap();
    batch[3].term().await.unwrap();

    let nakked = consumer.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(nakked.len(), 1);
    assert_eq!(nakked[0].message.sequence, 2);
    assert_eq!(nakked[0].delivery_attempt, 2);
    nakked[0].ack().await.unwrap();

    let expired = consumer.fetch(10, Duration::from_secs(3)).await.unwrap();
    assert_eq!(
        expired.len(),
        1,
        "the unanswered message comes back after ack-wait"
    );
    assert_eq!(expired[0].message.sequence, 3);
    assert_eq!(expired[0].delivery_attempt, 2);

    // In progress keeps it: keep signalling for longer than ack-wait, nothing is redelivered meanwhile.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        expired[0].in_progress().await.unwrap();
    }
    let during_progress = consumer
        .fetch(10, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        during_progress.is_empty(),
        "in-progress must hold off redelivery"
    );
    expired[0].ack().await.unwrap();

    // Nak with a delay: not before the delay, then redelivered.
    log.append_event(&received("late"), 1).await.unwrap();
    let late = consumer.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(late.len(), 1);
    late[0]
        .nak(Some(Duration::from_millis(1200)))
        .await
        .unwrap();
    let too_early = consumer
        .fetch(10, Duration::from_millis(400))
        .await
        .unwrap();
    assert!(too_early.is_empty());
    let after_delay = consumer.fetch(10, Duration::from_secs(3)).await.unwrap();
    assert_eq!(after_delay.len(), 1);
    assert_eq!(after_delay[0].delivery_attempt, 2);
    after_delay[0].ack().await.unwrap();

    let nothing = consumer
        .fetch(10, Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(
        nothing.is_empty(),
        "acked and termed messages never come back"
    );
    assert_eq!(consumer.pending().await.unwrap(), 0);
}

async fn max_deliver(harness: Box<dyn Harness>) {
    let log = harness.log();
    append_received(log.as_ref(), 1).await;
    let config = ConsumerConfig {
        max_deliver: Some(2),
        ..short_consumer("limited", vec![])
    };
    let consumer = log.consumer(config).await.unwrap();
    let first = consumer.fetch(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(first.len(), 1);
    first[0].nak(None).await.unwrap();
    let second = consumer.fetch(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].delivery_attempt, 2);
    second[0].nak(None).await.unwrap();
    let third = consumer
        .fetch(1, Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(third.is_empty(), "no delivery past max_deliver");
}

async fn shared_and_filtered_consumers(harness: Box<dyn Harness>) {
    let log = harness.log();
    for index in 0..10 {
        let id = request_id(index);
        log.append_event(&received(&id), 1).await.unwrap();
        let worker = if index % 2 == 0 {
            "decode-a"
        } else {
            "decode-b"
        };
        log.append_event(&routed(&id, worker), 1).await.unwrap();
    }
    // Two handles on one durable consumer share the work: each message goes to exactly one of them.
    let config = short_consumer("routed-all", vec![subjects::kind_filter(EventKind::Routed)]);
    let first = log.consumer(config.clone()).await.unwrap();
    let second = log.consumer(config).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..20 {
        for consumer in [&first, &second] {
            for delivery in consumer.fetch(3, Duration::from_millis(200)).await.unwrap() {
                assert_eq!(delivery.message.event().unwrap().kind(), EventKind::Routed);
                seen.push(delivery.message.sequence);
                delivery.ack().await.unwrap();
            }
        }
        if seen.len() == 10 {
            break;
        }
    }
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(seen.len(), 10);
    assert_eq!(unique.len(), 10);

    // By target worker: decode-a sees exactly its five.
    let for_a = log
        .consumer(short_consumer(
            "decode-a",
            vec![subjects::routed_to("decode-a").unwrap()],
        ))
        .await
        .unwrap();
    let mut ids = Vec::new();
    loop {
        let batch = for_a.fetch(10, Duration::from_millis(500)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for delivery in batch {
            let event = delivery.message.event().unwrap();
            match event.body() {
                Body::Routed(routed) => assert_eq!(routed.decode_worker_id, "decode-a"),
                other => panic!("unexpected {:?}", other.kind()),
            }
            ids.push(event.id().to_string());
            delivery.ack().await.unwrap();
        }
    }
    let expected: Vec<String> = (0..10).step_by(2).map(request_id).collect();
    assert_eq!(ids, expected);

    // Reads filter the same way.
    let received_only = log
        .read(
            StartAt::Beginning,
            &[subjects::kind_filter(EventKind::Received)],
            100,
        )
        .await
        .unwrap();
    assert_eq!(received_only.len(), 10);
}

async fn kv_with_expiry(harness: Box<dyn Harness>) {
    let log = harness.log();
    let bucket = log
        .kv_bucket("heartbeats", Duration::from_secs(1))
        .await
        .unwrap();
    bucket
        .put("decode-a", Bytes::from_static(b"alive"))
        .await
        .unwrap();
    bucket
        .put("decode-b", Bytes::from_static(b"alive"))
        .await
        .unwrap();
    assert_eq!(
        bucket.get("decode-a").await.unwrap().as_deref(),
        Some(&b"alive"[..])
    );
    assert_eq!(bucket.keys().await.unwrap(), vec!["decode-a", "decode-b"]);
    bucket.delete("decode-b").await.unwrap();
    assert_eq!(bucket.get("decode-b").await.unwrap(), None);
    assert_eq!(bucket.keys().await.unwrap(), vec!["decode-a"]);
    // Binding again is idempotent and sees the same data.
    let again = log
        .kv_bucket("heartbeats", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(again.get("decode-a").await.unwrap().is_some());
    // Without a fresh put the entry expires.
    let mut expired = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if bucket.get("decode-a").await.unwrap().is_none() {
            expired = true;
            break;
        }
    }
    assert!(expired, "entry outlived the bucket's ttl");
    assert!(bucket.keys().await.unwrap().is_empty());
    // A zero ttl keeps entries until deleted (settings).
    let settings = log.kv_bucket("settings", Duration::ZERO).await.unwrap();
    settings
        .put("max_local_prefill_tokens", Bytes::from_static(b"2000"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        settings
            .get("max_local_prefill_tokens")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"2000"[..])
    );
}

async fn restart_survival(mut harness: Box<dyn Harness>) {
    let log = harness.log();
    append_received(log.as_ref(), 10).await;
    let config = short_consumer("survivor", vec![ALL_EVENTS.into()]);
    let consumer = log.consumer(config.clone()).await.unwrap();
    let batch = consumer.fetch(5, Duration::from_secs(2)).await.unwrap();
    assert_eq!(batch.len(), 5);
    for delivery in &batch[..3] {
        delivery.ack().await.unwrap();
    }
    drop(batch);
    drop(consumer);
    // nats-server writes consumer state at most about ten times a second; give it that long before the kill.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Appends racing the restart (where the backend allows it): every one must land exactly once.
    let writer_log = harness.log();
    let writer = tokio::spawn(async move {
        for index in 10..60 {
            writer_log
                .append_event(&received(&request_id(index)), 1)
                .await
                .expect("append across restart");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    if harness.restart_is_live() {
        tokio::time::sleep(Duration::from_millis(60)).await;
        harness.restart().await;
        writer.await.unwrap();
    } else {
        writer.await.unwrap();
        drop(log);
        harness.restart().await;
    }

    let log = harness.log();
    // A retried append after the restart is still recognised as a duplicate.
    assert!(
        log.append_event(&received(&request_id(10)), 1)
            .await
            .unwrap()
            .duplicate
    );
    let all = log.read(StartAt::Beginning, &[], 10_000).await.unwrap();
    let ids: Vec<String> = all
        .iter()
        .map(|m| m.event().unwrap().id().to_string())
        .collect();
    let expected: Vec<String> = (0..60).map(request_id).collect();
    assert_eq!(ids, expected, "every append present once, in order");

    // The durable consumer resumes: the two unacked come back, then the rest. Acked messages stay done in the
    // embedded log; a hard kill of nats-server may redeliver them (JetStream is at-least-once), never lose one.
    let consumer = log.consumer(config).await.unwrap();
    let mut sequences = Vec::new();
    loop {
        let batch = consumer.fetch(100, Duration::from_secs(3)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for delivery in batch {
            sequences.push(delivery.message.sequence);
            delivery.ack().await.unwrap();
        }
        if sequences.iter().filter(|sequence| **sequence >= 4).count() >= 57 {
            break;
        }
    }
    sequences.sort_unstable();
    let unacked: Vec<u64> = (4..=60).collect();
    if harness.restart_is_live() {
        sequences.retain(|sequence| *sequence >= 4);
    }
    assert_eq!(sequences, unacked);
}

async fn malformed_payloads(harness: Box<dyn Harness>) {
    let log = harness.log();
    log.append_event(&received("good1"), 1).await.unwrap();
    for (index, garbage) in [
        &b"\xff\xff\xff\xff"[..],
        b"",
        b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
        b"not protobuf at all",
    ]
    .iter()
    .enumerate()
    {
        log.append(OutgoingMessage {
            subject: "tandem.ev.received.garbage".into(),
            dedup_id: format!("garbage:{index}"),
            payload: Bytes::copy_from_slice(garbage),
        })
        .await
        .unwrap();
    }
    let checkpoint = Event::new(
        "good1",
        "decode-test",
        Body::TokensDecoded(TokensDecoded {
            decode_worker_id: "decode-a".into(),
            start_index: 0,
            token_ids: vec![5, 6, 7],
            logprobs: vec![],
            text: None,
        }),
    );
    log.append_event(&checkpoint, 1).await.unwrap();

    let messages = log.read(StartAt::Beginning, &[], 100).await.unwrap();
    assert_eq!(messages.len(), 6);
    let decoded: Vec<bool> = messages.iter().map(|m| m.event().is_ok()).collect();
    assert_eq!(decoded, vec![true, false, false, false, false, true]);
    for message in &messages[1..5] {
        let error = message.event().unwrap_err();
        assert!(!error.to_string().is_empty());
    }
    // A consumer hands the bad ones out too, so its owner can report and term them.
    let consumer = log.consumer(short_consumer("audit", vec![])).await.unwrap();
    let batch = consumer.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(batch.len(), 6);
    for delivery in batch {
        match delivery.message.event() {
            Ok(_) => delivery.ack().await.unwrap(),
            Err(_) => delivery.term().await.unwrap(),
        }
    }
}

/// A lease in a bucket with expiry: one holder at a time, renewable by its holder, free again after the
/// time-to-live or a release; racing claimants get it exactly once.
async fn kv_lease(harness: Box<dyn Harness>) {
    let log = harness.log();
    let leases = log
        .kv_bucket("leases", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(leases.claim("leader", "a").await.unwrap());
    assert!(!leases.claim("leader", "b").await.unwrap(), "held by a");
    assert!(leases.claim("leader", "a").await.unwrap(), "a renews");
    // Renewed before expiry: still a's after more than one original time-to-live.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(leases.claim("leader", "a").await.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !leases.claim("leader", "b").await.unwrap(),
        "a's renewal still runs"
    );
    // a stops renewing: b takes over once it expires.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        leases.claim("leader", "b").await.unwrap(),
        "expired: b takes it"
    );
    assert!(!leases.claim("leader", "a").await.unwrap());
    // A release by a non-holder changes nothing; by the holder it frees the key at once.
    leases.release("leader", "a").await.unwrap();
    assert!(!leases.claim("leader", "c").await.unwrap());
    leases.release("leader", "b").await.unwrap();
    assert!(leases.claim("leader", "c").await.unwrap());
    leases.release("leader", "c").await.unwrap();

    // Eight claimants at once for a free key: exactly one wins.
    let claims = (0..8).map(|index| {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let leases = log
                .kv_bucket("leases", Duration::from_secs(1))
                .await
                .unwrap();
            leases
                .claim("race", &format!("claimant-{index}"))
                .await
                .unwrap()
        })
    });
    let mut winners = 0;
    for claim in claims {
        winners += usize::from(claim.await.unwrap());
    }
    assert_eq!(winners, 1);
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ordering_and_reads() {
                super::ordering_and_reads(super::$backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dedup_and_batches() {
                super::dedup_and_batches(super::$backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ack_nak_and_redelivery() {
                super::ack_nak_and_redelivery(super::$backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn max_deliver() {
                super::max_deliver(super::$backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn shared_and_filtered_consumers() {
                super::shared_and_filtered_consumers(super::$backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kv_with_expiry() {
                super::kv_with_expiry(super::$backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kv_lease() {
                super::kv_lease(super::$backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn restart_survival() {
                super::restart_survival(super::$backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn malformed_payloads() {
                super::malformed_payloads(super::$backend().await).await;
            }
        }
    };
}

conformance!(embedded);
conformance!(jetstream);
