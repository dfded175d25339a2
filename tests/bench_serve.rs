//! `tandem bench serve` against a `tandem serve` it is pointed at: a handful of streamed requests, then the JSON it
//! wrote. No timing is asserted, only that every request was counted and the figures are present and sane.

mod support;

use std::process::Command;

use support::TandemServe;

#[test]
fn bench_serve_measures_every_request_and_writes_its_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = TandemServe::start(&dir.path().join("data"), &[]);
    let json_path = dir.path().join("results/run.json");
    let output = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "serve"])
        .args(["--base-url", &format!("http://127.0.0.1:{}", server.port)])
        .args(["--num-requests", "6", "--request-rate", "50"])
        .args(["--max-concurrency", "3", "--warmup-requests", "1"])
        .args(["--input-len", "24", "--output-len", "5"])
        .args(["--shared-prefix-ratio", "0.5", "--slo-ttft-ms", "60000"])
        .args(["--label", "test"])
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("tandem bench serve runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench serve failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
    assert!(stdout.contains("Successful requests:"), "{stdout}");

    let text = std::fs::read_to_string(&json_path).expect("the JSON file is written");
    let document: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let results = &document["results"];
    assert_eq!(results["completed"], 6, "{text}");
    assert_eq!(results["failed"], 0, "{text}");
    // ignore_eos: every answer is exactly --output-len tokens.
    assert_eq!(results["total_output_tokens"], 30, "{text}");
    // 24 message tokens plus the chat template's.
    let mean_prompt_tokens = results["mean_prompt_tokens"].as_f64().expect("number");
    assert!(mean_prompt_tokens > 24.0, "{text}");
    for latency in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        let distribution = &results[latency];
        let p50 = distribution["p50"].as_f64().expect("p50");
        let p99 = distribution["p99"].as_f64().expect("p99");
        assert!(p50 > 0.0 && p50 <= p99, "{latency}: {distribution}");
    }
    assert_eq!(results["ttft_ms"]["samples"], 6);
    assert!(
        results["e2e_ms"]["p50"].as_f64() >= results["ttft_ms"]["p50"].as_f64(),
        "{text}"
    );
    let goodput = results["goodput_req_s"]
        .as_f64()
        .expect("goodput with an SLO");
    assert!(goodput > 0.0, "{text}");
    assert_eq!(document["label"], "test");
    assert_eq!(document["config"]["num_requests"], 6);
    assert!(document["machine"]["cores"].as_u64() > Some(0), "{text}");
    assert!(
        document["command"]
            .as_str()
            .is_some_and(|c| c.contains("bench serve"))
    );
    assert!(
        document["timestamp_utc"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    server.stop();
}
