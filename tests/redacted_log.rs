//! `tandem serve --log-prompts hash` with a prefill worker: requests are served (the decode worker reads the prompt
//! from the prompt store), no event on the log holds the prompt's ids (a long prompt is prefilled locally rather
//! than put on the prefill queue), the store is empty once the requests end, `replay rerun` refuses plainly and
//! `replay timeline` shows the prompt's hash and length.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::TandemServe;
use tandem_events::Body;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::{EventLog, StartAt};
use tandem_events::prompts::{PROMPT_BUCKET, PROMPT_TTL};
use tandem_events::subjects::ALL_EVENTS;

/// The gateway's fingerprint: SHA-256 of the ids' little-endian bytes, in hex.
fn sha256_hex(ids: &[u32]) -> String {
    use sha2::Digest;
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[test]
fn a_hash_only_log_serves_requests_without_their_prompts_and_replay_says_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = TandemServe::start(
        &data_dir,
        &[
            "--log-prompts",
            "hash",
            "--prefill-workers",
            "1",
            "--max-local-prefill-tokens",
            "64",
        ],
    );
    // The decode worker would send this prompt away once it has seen a live prefill worker; redacted, it must not.
    std::thread::sleep(Duration::from_millis(800));
    let long_prompt: Vec<u32> = (0..150).map(|t| 1000 + 7 * t).collect();
    let (status, body) = server.post_json(
        "/v1/completions",
        &json!({"model": "qwen3", "prompt": long_prompt, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 150);
    assert_eq!(body["usage"]["completion_tokens"], 12);
    let request_id = body["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("cmpl-")
        .to_string();
    let (status, body) = server.post_json(
        "/v1/chat/completions",
        &json!({"model": "qwen3", "messages": [{"role": "user", "content": "A secret about Roger Federer"}], "max_tokens": 5}),
    );
    assert_eq!(status, 200, "{body}");
    let server_log = server.log();
    server.stop();
    assert!(
        !server_log.contains("Roger Federer"),
        "prompt text in the application log:\n{server_log}"
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let log = EmbeddedLog::open(&data_dir).expect("the served log opens");
        let events = log
            .read(StartAt::Beginning, &[ALL_EVENTS.to_string()], 100_000)
            .await
            .expect("read the log");
        let mut received_count = 0;
        for message in &events {
            let event = message.event().expect("decodes");
            match event.body() {
                Body::Received(received) => {
                    received_count += 1;
                    assert!(received.prompt_token_ids.is_empty(), "{received:?}");
                    assert!(received.prompt_tokens > 0);
                    assert_eq!(received.prompt_sha256.len(), 32);
                    if event.id() == request_id {
                        assert_eq!(received.prompt_tokens, 150);
                        let hex: String = received
                            .prompt_sha256
                            .iter()
                            .map(|byte| format!("{byte:02x}"))
                            .collect();
                        assert_eq!(hex, sha256_hex(&long_prompt));
                    }
                }
                Body::PrefillQueued(queued) => {
                    panic!("a redacted request went to the prefill queue with its ids: {queued:?}")
                }
                _ => {}
            }
        }
        assert_eq!(received_count, 2);
        let store = log
            .kv_bucket(PROMPT_BUCKET, PROMPT_TTL)
            .await
            .expect("prompt bucket");
        // The gateway deletes an entry as its request ends; the deletes are spawned as the answers go out.
        let mut left = store.keys().await.expect("keys");
        for _ in 0..100 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            left = store.keys().await.expect("keys");
        }
        assert!(left.is_empty(), "prompts left in the store: {left:?}");
    });

    let data = data_dir.to_str().unwrap();
    let rerun = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["replay", "--data-dir", data, "rerun", &request_id])
        .output()
        .expect("tandem runs");
    assert!(!rerun.status.success());
    let said = String::from_utf8_lossy(&rerun.stderr);
    assert!(said.contains("the log is redacted"), "{said}");
    assert!(said.contains("--log-prompts full"), "{said}");
    let timeline = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["replay", "--data-dir", data, "timeline", &request_id])
        .output()
        .expect("tandem runs");
    assert!(timeline.status.success());
    let shown = String::from_utf8_lossy(&timeline.stdout);
    assert!(shown.contains("150 prompt tokens"), "{shown}");
    assert!(
        shown.contains(&format!("sha256 {}", sha256_hex(&long_prompt))),
        "{shown}"
    );
    assert!(shown.contains("prefill_local"), "{shown}");
}
