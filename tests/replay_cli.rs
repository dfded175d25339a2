//! `tandem replay` on the log of a real `tandem serve` with a prefill worker: `rerun` reproduces the logged tokens
//! of a remotely prefilled, a locally prefilled and a seeded sampled request on the CPU engine; `timeline`, `audit`
//! (also against the scheduler's projection), `stats` and `export` work from the command line, and an export gives
//! the same stats as the data dir.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::json;
use support::TandemServe;

fn replay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("replay")
        .args(args)
        .output()
        .expect("tandem runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn check_ok(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(output)
}

/// Posts a completion of token ids; returns the request id.
fn complete(server: &TandemServe, prompt: Vec<u32>, temperature: f64, seed: Option<u64>) -> String {
    let (status, body) = server.post_json(
        "/v1/completions",
        &json!({"model": "qwen3", "prompt": prompt, "max_tokens": 20, "temperature": temperature, "seed": seed}),
    );
    assert_eq!(status, 200, "{body}");
    body["id"]
        .as_str()
        .unwrap()
        .trim_start_matches("cmpl-")
        .to_string()
}

fn stats_json(source: &[&str]) -> serde_json::Value {
    let mut args = source.to_vec();
    args.extend(["stats", "--format", "json"]);
    let mut value: serde_json::Value =
        serde_json::from_str(&check_ok(&replay(&args), "stats")).unwrap();
    // The source's name is the one thing that differs between a data dir and its export.
    value["source"] = json!(null);
    value
}

#[test]
fn replay_reads_a_served_log_and_reruns_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = TandemServe::start(
        &data_dir,
        &["--prefill-workers", "1", "--max-local-prefill-tokens", "64"],
    );
    // The decode worker sends prompts away only once it has seen a live prefill worker.
    std::thread::sleep(std::time::Duration::from_millis(800));
    let long: Vec<u32> = (0..150).map(|t| 1000 + 7 * t).collect();
    let other_long: Vec<u32> = (0..150).map(|t| 3000 + 11 * t).collect();
    let short: Vec<u32> = (0..10).map(|t| 400 + t).collect();
    let remote_greedy = complete(&server, long, 0.0, None);
    let remote_seeded = complete(&server, other_long, 1.5, Some(7));
    let local_greedy = complete(&server, short, 0.0, None);
    server.stop();
    let data = data_dir.to_str().unwrap();

    for id in [&remote_greedy, &remote_seeded, &local_greedy] {
        let out = check_ok(&replay(&["--data-dir", data, "rerun", id]), "rerun");
        assert!(out.contains("IDENTICAL"), "{out}");
        assert!(out.contains("20 tokens logged, 20 produced"), "{out}");
    }

    let svg = dir.path().join("remote.svg");
    let out = check_ok(
        &replay(&[
            "--data-dir",
            data,
            "timeline",
            &remote_greedy,
            "--svg",
            svg.to_str().unwrap(),
        ]),
        "timeline",
    );
    for shown in [
        "prefill_queued",
        "kv_transferred",
        "decode_started",
        "completed",
        "queue wait",
        "kv transfer",
    ] {
        assert!(out.contains(shown), "{shown} missing:\n{out}");
    }
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));

    let out = check_ok(&replay(&["--data-dir", data, "audit"]), "audit");
    assert!(out.contains("no findings"), "{out}");
    let projection = data_dir.join("scheduler.redb");
    let out = check_ok(
        &replay(&[
            "--data-dir",
            data,
            "audit",
            "--projection",
            projection.to_str().unwrap(),
        ]),
        "audit --projection",
    );
    assert!(out.contains("3 requests and"), "{out}");
    assert!(out.contains("0 differ"), "{out}");

    let from_dir = stats_json(&["--data-dir", data]);
    assert_eq!(from_dir["requests"], 3);
    assert_eq!(from_dir["completed"], 3);
    assert_eq!(from_dir["remote_prefills"], 2);
    assert_eq!(from_dir["local_prefills"], 1);

    let file = dir.path().join("incident.tlog");
    check_ok(
        &replay(&["--data-dir", data, "export", file.to_str().unwrap()]),
        "export",
    );
    assert_eq!(stats_json(&["--file", file.to_str().unwrap()]), from_dir);
    let out = check_ok(
        &replay(&["--file", file.to_str().unwrap(), "rerun", &remote_seeded]),
        "rerun from file",
    );
    assert!(out.contains("IDENTICAL"), "{out}");

    // Only one request, selected by id, goes into a filtered export.
    let one = dir.path().join("one.tlog");
    check_ok(
        &replay(&[
            "--data-dir",
            data,
            "--request",
            &local_greedy,
            "export",
            one.to_str().unwrap(),
        ]),
        "filtered export",
    );
    let only = stats_json(&["--file", one.to_str().unwrap()]);
    assert_eq!(only["requests"], 1);
    assert_eq!(only["local_prefills"], 1);
    assert!(!Path::new(&format!("{}.partial", one.display())).exists());
}

#[test]
fn replay_without_a_log_says_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .current_dir(dir.path())
        .args(["replay", "stats"])
        .env_remove("TANDEM_NATS")
        .env_remove("TANDEM_DATA_DIR")
        .env_remove("TANDEM_REPLAY_FILE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pass --file FILE, --data-dir DIR or --nats URL"),
        "{stderr}"
    );
}
