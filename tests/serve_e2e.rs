//! `tandem serve` end to end, as a separate process, on both log backends: the seed's request answered with the
//! right usage, streaming, a client disconnect that cancels its request and frees its KV blocks, and a log whose
//! every request the lifecycle state machine accepts.

mod support;

use std::io::BufRead;
use std::time::Duration;

use serde_json::json;
use support::{SEED_MESSAGE, TandemServe, kinds_of, lifecycle_states, open_stream};
use tandem_events::EventKind;
use tandem_events::lifecycle::RequestState;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::jetstream::JetStreamLog;
use tandem_events::log::{EventLog, LogMessage, StartAt};
use tandem_events::nats_server::NatsServer;
use tandem_scheduler::projection::Projection;

fn seed_request() -> serde_json::Value {
    json!({
        "model": "qwen3",
        "messages": [{"role": "user", "content": SEED_MESSAGE}],
        "max_tokens": 30,
        "stream": false
    })
}

/// Sends the seed's request and checks the answer; returns the request id.
fn check_seed_request(server: &TandemServe) -> String {
    let (status, body) = server.post_json("/v1/chat/completions", &seed_request());
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "qwen3");
    assert_eq!(body["usage"]["prompt_tokens"], 25);
    assert_eq!(body["usage"]["completion_tokens"], 30);
    assert_eq!(body["usage"]["total_tokens"], 55);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let id = body["id"].as_str().expect("id").to_string();
    id.strip_prefix("chatcmpl-")
        .expect("chatcmpl- id")
        .to_string()
}

fn check_request_events(messages: &[LogMessage], request_id: &str) {
    let kinds = kinds_of(messages, request_id);
    assert_eq!(
        kinds[..4],
        [
            EventKind::Received,
            EventKind::Routed,
            EventKind::PrefillLocal,
            EventKind::DecodeStarted
        ],
        "{kinds:?}"
    );
    assert!(kinds.contains(&EventKind::TokensDecoded), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&EventKind::Completed), "{kinds:?}");
    let states = lifecycle_states(messages);
    assert_eq!(states.get(request_id), Some(&RequestState::Completed));
}

#[test]
fn seed_request_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = TandemServe::start(&data_dir, &[]);
    let request_id = check_seed_request(&server);
    server.stop();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let messages = runtime.block_on(async {
        let log = EmbeddedLog::open(&data_dir).unwrap();
        log.read(StartAt::Beginning, &[], 100_000).await.unwrap()
    });
    check_request_events(&messages, &request_id);

    // The scheduler kept its projection of the log beside it: the request is there, complete, with no findings.
    let projection = Projection::open(&data_dir.join("scheduler.redb")).unwrap();
    let record = projection.request(&request_id).unwrap().expect("projected");
    assert_eq!(record.state, "Completed");
    assert!(projection.findings().unwrap().is_empty());
    assert_eq!(
        projection.last_applied().unwrap(),
        messages.last().unwrap().sequence
    );
}

#[test]
fn seed_request_on_jetstream() {
    let nats = NatsServer::start().unwrap_or_else(|error| panic!("{error}"));
    let dir = tempfile::tempdir().unwrap();
    let server = TandemServe::start(&dir.path().join("unused"), &["--nats", &nats.url()]);
    let request_id = check_seed_request(&server);
    // The same request streamed gives the same tokens' text (greedy) and ends with usage and [DONE].
    let mut streamed = seed_request();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, mut reader) = open_stream(server.port, "/v1/chat/completions", &streamed);
    assert_eq!(status, 200);
    let mut data_lines = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            data_lines.push(data.to_string());
            if data == "[DONE]" {
                break;
            }
        }
        line.clear();
    }
    assert_eq!(data_lines.last().map(String::as_str), Some("[DONE]"));
    let usage: serde_json::Value = serde_json::from_str(&data_lines[data_lines.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 30);
    assert_eq!(usage["usage"]["prompt_tokens"], 25);
    server.stop();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let messages = runtime.block_on(async {
        let log = JetStreamLog::connect(&nats.url()).await.unwrap();
        log.read(StartAt::Beginning, &[], 100_000).await.unwrap()
    });
    check_request_events(&messages, &request_id);
    // Both requests are complete, and the worker joined and left.
    let states = lifecycle_states(&messages);
    assert_eq!(states.len(), 2);
    assert!(
        states
            .values()
            .all(|state| *state == RequestState::Completed)
    );
    let worker_kinds: Vec<EventKind> = messages
        .iter()
        .filter_map(|m| m.event().ok())
        .filter(|e| e.kind().is_worker_event())
        .map(|e| e.kind())
        .collect();
    // Between joining and leaving, the decode worker published the blocks its prefix cache took.
    let (kv_kinds, membership): (Vec<EventKind>, Vec<EventKind>) = worker_kinds
        .into_iter()
        .partition(|kind| matches!(kind, EventKind::KvBlocksStored | EventKind::KvBlocksRemoved));
    assert_eq!(
        membership,
        vec![EventKind::WorkerJoined, EventKind::WorkerLeft]
    );
    assert!(kv_kinds.contains(&EventKind::KvBlocksStored));
}

#[test]
fn a_client_disconnect_cancels_the_request_and_frees_its_kv_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // 24 blocks of 16 tokens: room for one long request at a time, not two.
    let server = TandemServe::start(&data_dir, &["--kv-blocks", "24"]);
    let long_request = json!({
        "model": "qwen3",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 300,
        "stream": true
    });
    let (status, mut reader) = open_stream(server.port, "/v1/chat/completions", &long_request);
    assert_eq!(status, 200);
    let mut first_id = None;
    let mut line = String::new();
    let mut chunks = 0;
    while chunks < 3 && reader.read_line(&mut line).unwrap() > 0 {
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            let chunk: serde_json::Value = serde_json::from_str(data).unwrap();
            first_id = chunk["id"].as_str().map(str::to_string);
            chunks += 1;
        }
        line.clear();
    }
    drop(reader); // the client goes away mid-stream
    let cancelled_id = first_id
        .expect("chunks came")
        .trim_start_matches("chatcmpl-")
        .to_string();
    // The cancellation travels through the log to the worker; give it ample time on a loaded machine.
    std::thread::sleep(Duration::from_secs(2));

    // Its blocks are free again: another request as long completes in full.
    let mut second = long_request.clone();
    second["stream"] = json!(false);
    let (status, body) = server.post_json("/v1/chat/completions", &second);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 300);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    server.stop();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let messages = runtime.block_on(async {
        let log = EmbeddedLog::open(&data_dir).unwrap();
        log.read(StartAt::Beginning, &[], 100_000).await.unwrap()
    });
    let kinds = kinds_of(&messages, &cancelled_id);
    assert!(kinds.contains(&EventKind::Cancelled), "{kinds:?}");
    assert!(!kinds.contains(&EventKind::Completed), "{kinds:?}");
    let states = lifecycle_states(&messages);
    assert_eq!(states.get(&cancelled_id), Some(&RequestState::Cancelled));
    assert_eq!(
        states
            .values()
            .filter(|state| **state == RequestState::Completed)
            .count(),
        1
    );
}
