//! Prefill/decode disaggregation in `tandem serve`: a long prompt is prefilled by a prefill worker and its KV moved
//! into the decode worker's blocks, a short one is prefilled locally, and both give the same tokens (greedy) as
//! the aggregated server. The log shows each path, and the lifecycle state machine accepts it.

mod support;

use serde_json::json;
use support::{TandemServe, first_kv_transferred, kinds_of, lifecycle_states, read_embedded_log};
use tandem_events::EventKind;
use tandem_events::lifecycle::RequestState;

fn long_prompt() -> Vec<u32> {
    (0..150).map(|t| 1000 + 7 * t).collect()
}

/// A second long prompt, sharing no prefix with the first (a shared one would be prefix-cached, hence local).
fn other_long_prompt() -> Vec<u32> {
    (0..150).map(|t| 3000 + 11 * t).collect()
}

fn short_prompt() -> Vec<u32> {
    (0..10).map(|t| 400 + t).collect()
}

/// Completions of both prompts (greedy), and of the long one sampled with a seed; (text, request id) for each.
fn complete_both(server: &TandemServe) -> Vec<(String, String)> {
    [
        (long_prompt(), json!(0), json!(null)),
        (short_prompt(), json!(0), json!(null)),
        (other_long_prompt(), json!(2.0), json!(7)),
    ]
    .into_iter()
    .map(|(prompt, temperature, seed)| {
        let (status, body) = server.post_json(
            "/v1/completions",
            &json!({"model": "qwen3", "prompt": prompt, "max_tokens": 12, "temperature": temperature, "seed": seed}),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 12);
        let id = body["id"].as_str().unwrap().trim_start_matches("cmpl-").to_string();
        (body["choices"][0]["text"].as_str().unwrap().to_string(), id)
    })
    .collect()
}

#[test]
fn long_prompts_prefill_remotely_short_ones_locally_with_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let aggregated_dir = dir.path().join("aggregated");
    let aggregated = TandemServe::start(&aggregated_dir, &[]);
    let expected = complete_both(&aggregated);
    aggregated.stop();

    let disaggregated_dir = dir.path().join("disaggregated");
    let disaggregated = TandemServe::start(
        &disaggregated_dir,
        &["--prefill-workers", "1", "--max-local-prefill-tokens", "64"],
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
    assert_eq!(
        answers[2].0, expected[2].0,
        "a seeded sampled request gives the same tokens whichever worker sampled the first one"
    );

    let messages = read_embedded_log(&disaggregated_dir);
    let long_kinds = kinds_of(&messages, &answers[0].1);
    for kind in [
        EventKind::PrefillQueued,
        EventKind::PrefillStarted,
        EventKind::PrefillDone,
        EventKind::KvTransferred,
        EventKind::DecodeStarted,
        EventKind::Completed,
    ] {
        assert!(
            long_kinds.contains(&kind),
            "{kind:?} missing from {long_kinds:?}"
        );
    }
    assert!(
        !long_kinds.contains(&EventKind::PrefillLocal),
        "{long_kinds:?}"
    );
    let sampled_kinds = kinds_of(&messages, &answers[2].1);
    assert!(
        sampled_kinds.contains(&EventKind::PrefillQueued),
        "{sampled_kinds:?}"
    );
    let short_kinds = kinds_of(&messages, &answers[1].1);
    assert!(
        short_kinds.contains(&EventKind::PrefillLocal),
        "{short_kinds:?}"
    );
    assert!(
        !short_kinds.contains(&EventKind::PrefillQueued),
        "{short_kinds:?}"
    );
    let transferred = first_kv_transferred(&messages);
    assert_eq!(transferred.transport, "in_process");
    assert_eq!(transferred.blocks, 150u32.div_ceil(16));
    assert!(transferred.bytes > 0);
    let states = lifecycle_states(&messages);
    assert!(
        states
            .values()
            .all(|state| *state == RequestState::Completed),
        "{states:?}"
    );
}
