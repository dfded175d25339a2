//! Prefill/decode disaggregation in `tandem serve --device cuda:0`: with both engines on the GPU, the prefill
//! worker copies a long prompt's KV straight into the decode worker's reserved device blocks (a device push,
//! `KvTransferred.transport = cuda_same_device`), and the completions equal the aggregated server's on the same GPU.
//! Skips, saying why, where no CUDA driver or GPU exists.

mod support;

use serde_json::json;
use support::{TandemServe, first_kv_transferred, kinds_of, read_embedded_log};
use tandem_events::EventKind;
use tandem_workers::{cuda_device_count, cuda_driver_present};

fn long_prompt() -> Vec<u32> {
    (0..150).map(|t| 1000 + 7 * t).collect()
}

fn short_prompt() -> Vec<u32> {
    (0..10).map(|t| 400 + t).collect()
}

/// Greedy completions of the long and the short prompt: (text, request id) for each.
fn complete_both(server: &TandemServe) -> Vec<(String, String)> {
    [long_prompt(), short_prompt()]
        .into_iter()
        .map(|prompt| {
            let (status, body) = server.post_json(
                "/v1/completions",
                &json!({"model": "qwen3", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
            );
            assert_eq!(status, 200, "{body}");
            let id = body["id"]
                .as_str()
                .unwrap()
                .trim_start_matches("cmpl-")
                .to_string();
            (body["choices"][0]["text"].as_str().unwrap().to_string(), id)
        })
        .collect()
}

#[test]
fn gpu_prefill_pushes_the_kv_device_to_device() {
    if !cuda_driver_present() {
        eprintln!(
            "skipping gpu_prefill_pushes_the_kv_device_to_device: no CUDA driver on this machine"
        );
        return;
    }
    if cuda_device_count() == 0 {
        eprintln!(
            "skipping gpu_prefill_pushes_the_kv_device_to_device: the CUDA driver sees no GPU"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let aggregated_dir = dir.path().join("aggregated");
    let aggregated = TandemServe::start(&aggregated_dir, &["--device", "cuda:0"]);
    let expected = complete_both(&aggregated);
    aggregated.stop();

    let disaggregated_dir = dir.path().join("disaggregated");
    let disaggregated = TandemServe::start(
        &disaggregated_dir,
        &[
            "--device",
            "cuda:0",
            "--prefill-workers",
            "1",
            "--max-local-prefill-tokens",
            "64",
        ],
    );
    // The decode worker sends prompts away only once it has seen a live prefill worker.
    std::thread::sleep(std::time::Duration::from_millis(800));
    let answers = complete_both(&disaggregated);
    disaggregated.stop();
    assert_eq!(
        answers[0].0, expected[0].0,
        "remote prefill gives the aggregated tokens"
    );
    assert_eq!(
        answers[1].0, expected[1].0,
        "local prefill gives the aggregated tokens"
    );

    let messages = read_embedded_log(&disaggregated_dir);
    let long_kinds = kinds_of(&messages, &answers[0].1);
    assert!(
        long_kinds.contains(&EventKind::KvTransferred),
        "{long_kinds:?}"
    );
    assert!(
        !long_kinds.contains(&EventKind::PrefillLocal),
        "{long_kinds:?}"
    );
    let transferred = first_kv_transferred(&messages);
    eprintln!(
        "KvTransferred: {} bytes in {} blocks over {} in {} µs",
        transferred.bytes,
        transferred.blocks,
        transferred.transport,
        transferred.duration_ns / 1000
    );
    assert_eq!(transferred.transport, "cuda_same_device");
    assert_eq!(transferred.blocks, 150u32.div_ceil(16));
    assert!(transferred.bytes > 0);
}
