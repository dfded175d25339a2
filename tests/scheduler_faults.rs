//! Fault tests of the whole fleet, each with real processes (gateway, scheduler, decode and prefill workers, each
//! its own `tandem`) on a real nats-server, and 200 streaming requests in flight: `kill -9` of a decode worker
//! mid-stream (its requests migrate; every client still reads exactly the greedy reference, no token twice), of
//! the scheduler (restarted; its projection equals one rebuilt from the log), of nats-server (restarted with its
//! store; nothing accepted is lost), and of a prefill worker (its jobs are redelivered). After each, every request
//! on the log is `Completed` or `Failed` with a reason, none is stuck, and the scheduler's audit is clean.

mod support;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{
    TandemRole, TandemServe, free_port, open_stream, request, wait_for_workers, wait_ready,
};
use tandem_events::lifecycle::RequestState;
use tandem_events::log::jetstream::JetStreamLog;
use tandem_events::log::{EventLog, LogMessage, StartAt};
use tandem_events::nats_server::NatsServer;
use tandem_events::{Body, EventKind};
use tandem_scheduler::projection::Projection;

const REQUESTS: usize = 200;
const CLIENTS: usize = 24;
const MAX_TOKENS: u32 = 24;
/// Distinct prompts; requests cycle through them, so many share a prompt (and KV-aware routing has work).
const DISTINCT_PROMPTS: usize = 8;
/// The fault strikes once this many requests have completed, with about `CLIENTS` others streaming.
const FAULT_AFTER_COMPLETED: usize = 40;

/// Prompts of 40 to 54 tokens, the first 32 shared by all (two full KV blocks of 16).
fn prompts() -> Vec<Vec<u32>> {
    (0..DISTINCT_PROMPTS as u32)
        .map(|index| {
            (0..32)
                .map(|t| 2000 + t * 11)
                .chain((0..8 + 2 * index).map(|t| 5000 + index * 97 + t * 3))
                .collect()
        })
        .collect()
}

fn completion_body(prompt: &[u32], stream: bool) -> Value {
    let mut body = json!({
        "model": "qwen3",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// The greedy answers, from `tandem serve` (all roles in one process, no faults).
fn reference_texts(dir: &std::path::Path) -> Vec<String> {
    let serve = TandemServe::start(&dir.join("reference"), &[]);
    let texts = prompts()
        .iter()
        .map(|prompt| {
            let (status, answer) =
                serve.post_json("/v1/completions", &completion_body(prompt, false));
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer["usage"]["completion_tokens"], MAX_TOKENS);
            answer["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    serve.stop();
    texts
}

/// What one streaming client read.
#[derive(Debug, Clone, Default)]
struct Outcome {
    prompt_index: usize,
    request_id: String,
    text: String,
    error: Option<String>,
    completion_tokens: Option<u64>,
}

/// One streaming completion, read to the end of its event stream.
fn stream_completion(port: u16, prompt_index: usize, prompt: &[u32]) -> Outcome {
    let mut outcome = Outcome {
        prompt_index,
        ..Outcome::default()
    };
    let (status, mut reader) = open_stream(port, "/v1/completions", &completion_body(prompt, true));
    if status != 200 {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut body);
        outcome.error = Some(format!("HTTP {status}: {body}"));
        return outcome;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => {
                outcome
                    .error
                    .get_or_insert_with(|| "stream ended without [DONE]".into());
                return outcome;
            }
            Ok(_) => {}
            Err(error) => {
                outcome.error = Some(format!("reading the stream: {error}"));
                return outcome;
            }
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return outcome;
        }
        let chunk: Value = serde_json::from_str(data).unwrap_or_else(|_| json!({"error": data}));
        if let Some(error) = chunk.get("error") {
            outcome.error = Some(error.to_string());
            continue;
        }
        if let Some(id) = chunk["id"].as_str() {
            outcome.request_id = id.trim_start_matches("cmpl-").to_string();
        }
        if let Some(text) = chunk["choices"][0]["text"].as_str() {
            outcome.text.push_str(text);
        }
        if let Some(tokens) = chunk["usage"]["completion_tokens"].as_u64() {
            outcome.completion_tokens = Some(tokens);
        }
    }
}

/// The greedy reference, then the clients started; returns once `FAULT_AFTER_COMPLETED` requests have finished
/// (with about `CLIENTS` others streaming), for the test to strike.
fn start_clients_until_the_fault_point(
    fleet: &Fleet,
) -> (Vec<String>, std::thread::JoinHandle<Vec<Outcome>>) {
    let reference = reference_texts(fleet.dir.path());
    let completed = Arc::new(AtomicUsize::new(0));
    let clients = run_clients(fleet.gateway_port, Arc::clone(&completed));
    wait_until("the fault point", Duration::from_secs(300), || {
        completed.load(Ordering::SeqCst) >= FAULT_AFTER_COMPLETED
    });
    (reference, clients)
}

/// `REQUESTS` streaming requests from `CLIENTS` threads; `completed` counts the finished ones as they finish.
fn run_clients(port: u16, completed: Arc<AtomicUsize>) -> std::thread::JoinHandle<Vec<Outcome>> {
    std::thread::spawn(move || {
        let prompts = Arc::new(prompts());
        let next = Arc::new(AtomicUsize::new(0));
        let outcomes = Arc::new(Mutex::new(Vec::with_capacity(REQUESTS)));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (prompts, next, outcomes, completed) = (
                    Arc::clone(&prompts),
                    Arc::clone(&next),
                    Arc::clone(&outcomes),
                    Arc::clone(&completed),
                );
                std::thread::spawn(move || {
                    loop {
                        let index = next.fetch_add(1, Ordering::SeqCst);
                        if index >= REQUESTS {
                            return;
                        }
                        let prompt_index = index % DISTINCT_PROMPTS;
                        let outcome = stream_completion(port, prompt_index, &prompts[prompt_index]);
                        outcomes.lock().unwrap().push(outcome);
                        completed.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().expect("client thread");
        }
        Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap()
    })
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fleet on its own nats-server.
struct Fleet {
    dir: tempfile::TempDir,
    nats: NatsServer,
    runtime: tokio::runtime::Runtime,
    gateway: TandemRole,
    gateway_port: u16,
    scheduler: TandemRole,
    scheduler_port: u16,
    decode: Vec<TandemRole>,
    prefill: Vec<TandemRole>,
}

impl Fleet {
    /// Starts a scheduler, decode workers `decode_ids`, prefill workers `prefill_ids` and a gateway, and waits
    /// until every worker's heartbeat is visible and the gateway is ready.
    fn start(decode_ids: &[&str], prefill_ids: &[&str], decode_args: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let nats = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
        let url = nats.url();
        let logs = dir.path();
        let scheduler_port = free_port();
        let scheduler = spawn_scheduler(&url, dir.path(), scheduler_port);
        let decode = decode_ids
            .iter()
            .map(|id| {
                let mut args = vec!["decode", "--nats", &url, "--worker-id", id];
                args.extend_from_slice(decode_args);
                TandemRole::spawn(id, &args, logs)
            })
            .collect();
        let prefill = prefill_ids
            .iter()
            .map(|id| TandemRole::spawn(id, &["prefill", "--nats", &url, "--worker-id", id], logs))
            .collect();
        let gateway_port = free_port();
        let port = gateway_port.to_string();
        let gateway = TandemRole::spawn(
            "gateway",
            &[
                "gateway",
                "--nats",
                &url,
                "--host",
                "127.0.0.1",
                "--port",
                &port,
            ],
            logs,
        );
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let fleet = Fleet {
            dir,
            nats,
            runtime,
            gateway,
            gateway_port,
            scheduler,
            scheduler_port,
            decode,
            prefill,
        };
        wait_ready(fleet.gateway_port, "/ready", "the gateway");
        wait_ready(fleet.scheduler_port, "/ready", "the scheduler");
        let expected: Vec<&str> = decode_ids.iter().chain(prefill_ids).copied().collect();
        wait_for_workers(&fleet.nats.url(), &expected);
        fleet
    }

    fn read_log(&self) -> Vec<LogMessage> {
        self.runtime.block_on(async {
            let log = JetStreamLog::connect(&self.nats.url()).await.unwrap();
            log.read(StartAt::Beginning, &[], 10_000_000).await.unwrap()
        })
    }

    fn scheduler_json(&self, path: &str) -> Value {
        let (status, body) =
            request(self.scheduler_port, "GET", path, None).expect("scheduler API");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Stops every role cleanly (the scheduler last, so it has projected everything), then checks the log and the
    /// scheduler's projection.
    fn stop_and_check(mut self) -> Vec<LogMessage> {
        let audit = self.scheduler_json("/audit");
        assert_eq!(audit["count"], 0, "the scheduler's audit is clean: {audit}");
        self.gateway.stop();
        for worker in self.decode.iter_mut().chain(self.prefill.iter_mut()) {
            worker.stop();
        }
        self.scheduler.stop();
        let messages = self.read_log();
        let states = final_states(&messages);
        assert!(!states.is_empty());
        for (request_id, (state, reason)) in &states {
            assert!(
                *state == RequestState::Completed
                    || (matches!(state, RequestState::Failed | RequestState::Cancelled)
                        && !reason.is_empty()),
                "{request_id} ended {state:?} ({reason:?}); events: {:?}",
                support::kinds_of(&messages, request_id)
            );
        }
        // The scheduler's projection equals one built from scratch from the same events.
        let projection =
            Projection::open(&self.dir.path().join("scheduler/scheduler.redb")).unwrap();
        let live = projection.snapshot().unwrap();
        let rebuilt_path = self.dir.path().join("rebuilt.redb");
        let mut rebuilt = Projection::open(&rebuilt_path).unwrap();
        let upto: Vec<LogMessage> = messages
            .iter()
            .filter(|message| message.sequence <= live.last_applied_sequence)
            .cloned()
            .collect();
        for batch in upto.chunks(500) {
            rebuilt.apply_batch(batch).unwrap();
        }
        let rebuilt = rebuilt.snapshot().unwrap();
        assert_eq!(
            live.last_applied_sequence,
            messages
                .last()
                .unwrap()
                .sequence
                .min(live.last_applied_sequence)
        );
        assert!(live.findings.is_empty(), "{:?}", live.findings);
        assert_eq!(
            live.requests, rebuilt.requests,
            "requests table equals a rebuild"
        );
        assert_eq!(
            live.workers, rebuilt.workers,
            "workers table equals a rebuild"
        );
        assert_eq!(live.prefix_index, rebuilt.prefix_index);
        assert_eq!(live.active_requests, rebuilt.active_requests);
        assert_eq!(live.unrouted, rebuilt.unrouted);
        assert!(live == rebuilt, "the whole projection equals a rebuild");
        assert!(
            live.unrouted.is_empty() && live.active_requests.is_empty(),
            "nothing left in flight"
        );
        messages
    }
}

fn spawn_scheduler(url: &str, dir: &std::path::Path, port: u16) -> TandemRole {
    let data_dir = dir.join("scheduler");
    TandemRole::spawn(
        "scheduler",
        &[
            "scheduler",
            "--nats",
            url,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--scheduler-id",
            "scheduler-0",
            "--http-port",
            &port.to_string(),
            "--lease-ttl-s",
            "2",
        ],
        dir,
    )
}

/// Each request's final lifecycle state and, for a failure, its reason.
fn final_states(messages: &[LogMessage]) -> BTreeMap<String, (RequestState, String)> {
    let states = support::lifecycle_states(messages);
    let mut reasons: BTreeMap<String, String> = BTreeMap::new();
    for event in messages.iter().filter_map(|message| message.event().ok()) {
        match event.body() {
            Body::Failed(failed) => {
                reasons.insert(event.id().to_string(), failed.reason.clone());
            }
            Body::Cancelled(cancelled) => {
                reasons.insert(event.id().to_string(), cancelled.reason.clone());
            }
            _ => {}
        }
    }
    states
        .into_iter()
        .map(|(id, state)| {
            let reason = reasons.get(&id).cloned().unwrap_or_default();
            (id, (state, reason))
        })
        .collect()
}

fn assert_every_client_read_the_reference(outcomes: &[Outcome], reference: &[String]) {
    assert_eq!(outcomes.len(), REQUESTS);
    for outcome in outcomes {
        assert_eq!(outcome.error, None, "request {} failed", outcome.request_id);
        assert_eq!(
            outcome.text, reference[outcome.prompt_index],
            "request {} (prompt {}) read other text than the greedy reference",
            outcome.request_id, outcome.prompt_index
        );
        assert_eq!(outcome.completion_tokens, Some(u64::from(MAX_TOKENS)));
    }
}

fn count_kind(messages: &[LogMessage], kind: EventKind) -> usize {
    messages
        .iter()
        .filter_map(|message| message.event().ok())
        .filter(|event| event.kind() == kind)
        .count()
}

#[test]
fn a_decode_worker_killed_mid_stream_hands_its_requests_over() {
    let mut fleet = Fleet::start(&["decode-a", "decode-b"], &[], &[]);
    let (reference, clients) = start_clients_until_the_fault_point(&fleet);
    fleet.decode[0].kill_9();
    let outcomes = clients.join().expect("clients");
    assert_every_client_read_the_reference(&outcomes, &reference);
    let lost = fleet.scheduler_json("/workers");
    let decode_a = lost["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|worker| worker["id"] == "decode-a")
        .expect("decode-a listed");
    assert_eq!(decode_a["status"], "lost", "{decode_a}");
    fleet.decode.remove(0);
    let messages = fleet.stop_and_check();
    let migrated = count_kind(&messages, EventKind::Migrated);
    assert!(migrated > 0, "the killed worker's requests migrated");
    assert_eq!(count_kind(&messages, EventKind::WorkerLost), 1);
    eprintln!(
        "decode worker killed: {migrated} request(s) migrated; all {REQUESTS} read the reference"
    );
}

#[test]
fn a_scheduler_killed_and_restarted_resumes_its_projection() {
    let mut fleet = Fleet::start(&["decode-a", "decode-b"], &[], &[]);
    let (reference, clients) = start_clients_until_the_fault_point(&fleet);
    fleet.scheduler.kill_9();
    std::thread::sleep(Duration::from_millis(1500));
    fleet.scheduler = spawn_scheduler(&fleet.nats.url(), fleet.dir.path(), fleet.scheduler_port);
    let outcomes = clients.join().expect("clients");
    assert_every_client_read_the_reference(&outcomes, &reference);
    wait_ready(fleet.scheduler_port, "/ready", "the restarted scheduler");
    fleet.stop_and_check();
}

#[test]
fn nats_server_killed_and_restarted_with_its_store_loses_nothing() {
    let mut fleet = Fleet::start(&["decode-a", "decode-b"], &[], &[]);
    let (reference, clients) = start_clients_until_the_fault_point(&fleet);
    fleet.nats.kill().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    fleet.nats.restart().unwrap();
    let outcomes = clients.join().expect("clients");
    // Token updates ride NATS core, which keeps nothing while the server is down: the gateway finishes a stream
    // that lost some from the request's checkpoints on the log, so every client still reads the whole answer.
    assert_every_client_read_the_reference(&outcomes, &reference);
    let gateway_log = fleet.gateway.log();
    let finished_from_the_log = gateway_log
        .lines()
        .filter(|line| {
            line.contains("following the request on the log")
                || line.contains("ended on the log but its last token updates never came")
        })
        .count();
    eprintln!("nats-server killed: {finished_from_the_log} streams were finished from the log");
    let messages = fleet.stop_and_check();
    let accepted: Vec<String> = messages
        .iter()
        .filter_map(|message| message.event().ok())
        .filter(|event| event.kind() == EventKind::Received)
        .map(|event| event.id().to_string())
        .collect();
    // Every request a client saw accepted is on the log, and ended there.
    for outcome in outcomes
        .iter()
        .filter(|outcome| !outcome.request_id.is_empty())
    {
        assert!(
            accepted.contains(&outcome.request_id),
            "{} is on the log",
            outcome.request_id
        );
    }
}

#[test]
fn a_prefill_worker_killed_mid_job_leaves_it_to_the_other() {
    // Every prompt with a token not in the decode worker's prefix cache goes to the prefill queue.
    let mut fleet = Fleet::start(
        &["decode-a", "decode-b"],
        &["prefill-a", "prefill-b"],
        &[
            "--max-local-prefill-tokens",
            "0",
            "--max-prefill-queue-depth",
            "1000",
        ],
    );
    let (reference, clients) = start_clients_until_the_fault_point(&fleet);
    fleet.prefill[0].kill_9();
    let outcomes = clients.join().expect("clients");
    assert_every_client_read_the_reference(&outcomes, &reference);
    fleet.prefill.remove(0);
    let messages = fleet.stop_and_check();
    let queued = count_kind(&messages, EventKind::PrefillQueued);
    assert!(queued >= REQUESTS / 2, "prompts went remote: {queued}");
    let prefill_workers: std::collections::BTreeSet<String> = messages
        .iter()
        .filter_map(|message| message.event().ok())
        .filter_map(|event| match event.body() {
            Body::PrefillDone(done) => Some(done.prefill_worker_id.clone()),
            _ => None,
        })
        .collect();
    assert!(
        prefill_workers.contains("prefill-b"),
        "the survivor prefilled: {prefill_workers:?}"
    );
    eprintln!("prefill worker killed: {queued} remote prefills, all {REQUESTS} read the reference");
}
