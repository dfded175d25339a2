//! Disaggregation across processes on a real nats-server: gateway, scheduler, one decode worker and two prefill
//! workers, each its own `tandem` process. A long prompt is prefilled remotely (KV over TCP), a short one locally,
//! both with the tokens `tandem serve` gives aggregated; and a prefill worker killed with `kill -9` while it holds
//! a job leaves it to the other, and the request completes with the right tokens.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    TandemRole, TandemServe, free_port, kinds_of, lifecycle_states, request, wait_for_workers,
    wait_ready,
};
use tandem_events::lifecycle::RequestState;
use tandem_events::log::jetstream::JetStreamLog;
use tandem_events::log::{EventLog, LogMessage, StartAt};
use tandem_events::nats_server::NatsServer;
use tandem_events::{Body, EventKind};

fn prompt(len: u32, seed: u32) -> Vec<u32> {
    (0..len)
        .map(|t| 1000 + (t * 7 + seed * 13) % 50_000)
        .collect()
}

fn complete(port: u16, prompt: &[u32]) -> (String, String) {
    let body =
        json!({"model": "qwen3", "prompt": prompt, "max_tokens": 10, "temperature": 0}).to_string();
    let (status, text) = request(port, "POST", "/v1/completions", Some(&body)).expect("POST");
    assert_eq!(status, 200, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 10);
    let id = answer["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("cmpl-")
        .to_string();
    (
        answer["choices"][0]["text"].as_str().unwrap().to_string(),
        id,
    )
}

async fn read_all(url: &str) -> Vec<LogMessage> {
    let log = JetStreamLog::connect(url).await.unwrap();
    log.read(StartAt::Beginning, &[], 1_000_000).await.unwrap()
}

#[test]
fn separate_processes_prefill_remotely_and_survive_a_killed_prefill_worker() {
    let long = prompt(200, 1);
    let short = prompt(12, 2);
    let very_long = prompt(3000, 3);

    // The aggregated answers, for comparison.
    let dir = tempfile::tempdir().unwrap();
    let aggregated = TandemServe::start(&dir.path().join("aggregated"), &[]);
    let expected: Vec<String> = [&long, &short, &very_long]
        .iter()
        .map(|p| complete(aggregated.port, p).0)
        .collect();
    aggregated.stop();

    let nats = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
    let url = nats.url();
    let port = free_port();
    let logs = dir.path();
    let _scheduler = TandemRole::spawn("scheduler", &["scheduler", "--nats", &url], logs);
    let mut prefill_a = TandemRole::spawn(
        "prefill-a",
        &["prefill", "--nats", &url, "--worker-id", "prefill-a"],
        logs,
    );
    let mut prefill_b = TandemRole::spawn(
        "prefill-b",
        &["prefill", "--nats", &url, "--worker-id", "prefill-b"],
        logs,
    );
    let mut decode = TandemRole::spawn(
        "decode",
        &[
            "decode",
            "--nats",
            &url,
            "--worker-id",
            "decode-1",
            "--max-local-prefill-tokens",
            "64",
        ],
        logs,
    );
    let mut gateway = TandemRole::spawn(
        "gateway",
        &[
            "gateway",
            "--nats",
            &url,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ],
        logs,
    );
    wait_ready(port, "/ready", "the gateway");
    wait_for_workers(&url, &["prefill-a", "prefill-b"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    let (long_text, long_id) = complete(port, &long);
    let (short_text, short_id) = complete(port, &short);
    assert_eq!(
        long_text, expected[0],
        "remote prefill over TCP gives the aggregated tokens"
    );
    assert_eq!(
        short_text, expected[1],
        "local prefill gives the aggregated tokens"
    );

    let messages = runtime.block_on(read_all(&url));
    let long_kinds = kinds_of(&messages, &long_id);
    let queued_at = long_kinds
        .iter()
        .position(|k| *k == EventKind::PrefillQueued)
        .expect("queued");
    let started_at = long_kinds
        .iter()
        .position(|k| *k == EventKind::PrefillStarted)
        .expect("started");
    let done_at = long_kinds
        .iter()
        .position(|k| *k == EventKind::PrefillDone)
        .expect("done");
    let transferred_at = long_kinds
        .iter()
        .position(|k| *k == EventKind::KvTransferred)
        .expect("transferred");
    assert!(
        queued_at < started_at && started_at < done_at && done_at < transferred_at,
        "{long_kinds:?}"
    );
    assert!(kinds_of(&messages, &short_id).contains(&EventKind::PrefillLocal));
    let tcp_transfer = messages.iter().filter_map(|m| m.event().ok()).any(|e| {
        e.id() == long_id
            && matches!(e.body(), Body::KvTransferred(t) if t.transport == "tcp" && t.bytes > 0)
    });
    assert!(tcp_transfer, "the KV went over TCP");

    // A long prefill; kill -9 whichever prefill worker takes it, while it computes.
    let request_thread = {
        let very_long = very_long.clone();
        std::thread::spawn(move || complete(port, &very_long))
    };
    let started = Instant::now();
    let holder = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no prefill worker took the job"
        );
        let messages = runtime.block_on(read_all(&url));
        let holder = messages
            .iter()
            .filter_map(|m| m.event().ok())
            .find_map(|e| match e.body() {
                Body::PrefillStarted(started) if e.id() != long_id => {
                    Some(started.prefill_worker_id.clone())
                }
                _ => None,
            });
        if let Some(holder) = holder {
            break holder;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    match holder.as_str() {
        "prefill-a" => prefill_a.kill_9(),
        "prefill-b" => prefill_b.kill_9(),
        other => panic!("unknown prefill worker {other}"),
    }
    let (very_long_text, very_long_id) = request_thread.join().expect("the request completes");
    assert_eq!(
        very_long_text, expected[2],
        "the redelivered job gives the right tokens"
    );

    gateway.stop();
    decode.stop();
    let messages = runtime.block_on(read_all(&url));
    let attempts: Vec<(String, u32)> = messages
        .iter()
        .filter_map(|m| m.event().ok())
        .filter(|e| e.id() == very_long_id)
        .filter_map(|e| match e.body() {
            Body::PrefillStarted(started) => {
                Some((started.prefill_worker_id.clone(), started.delivery_attempt))
            }
            _ => None,
        })
        .collect();
    assert!(attempts.len() >= 2, "redelivered: {attempts:?}");
    assert_eq!(attempts[0].0, holder);
    assert_ne!(
        attempts.last().unwrap().0,
        holder,
        "the other worker finished it: {attempts:?}"
    );
    let states = lifecycle_states(&messages);
    assert!(
        states
            .values()
            .all(|state| *state == RequestState::Completed),
        "{states:?}"
    );
}
