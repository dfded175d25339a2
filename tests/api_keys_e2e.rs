//! `tandem serve` with API keys from the environment and the command line: the probes and the OpenAPI document stay
//! open, the API (the scheduler's query routes on the same port included) needs a key, `/metrics` too with
//! `--metrics-require-key`, and a chat request with a key is served.

mod support;

use serde_json::json;
use support::{TandemServe, request_with_headers};

#[test]
fn serve_with_keys_guards_every_route_but_the_probes() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: set before any thread of this test binary reads the environment; the child inherits it.
    unsafe { std::env::set_var("TANDEM_API_KEYS", "sk-from-env-1,sk-from-env-2") };
    let server = TandemServe::start(
        &dir.path().join("data"),
        &["--metrics-require-key", "--max-concurrent-per-key", "2"],
    );
    let port = server.port;
    let with_key = |path: &str, key: Option<&str>| {
        let authorization = key.map(|key| format!("Bearer {key}"));
        let headers: Vec<(&str, &str)> = authorization
            .as_deref()
            .map(|value| vec![("Authorization", value)])
            .unwrap_or_default();
        request_with_headers(port, "GET", path, None, &headers)
            .expect("GET")
            .0
    };
    for open in ["/health", "/ready", "/openapi.json"] {
        assert_eq!(with_key(open, None), 200, "{open}");
    }
    for keyed in ["/v1/models", "/metrics", "/requests", "/workers"] {
        assert_eq!(with_key(keyed, None), 401, "{keyed}");
        assert_eq!(with_key(keyed, Some("sk-wrong")), 401, "{keyed}");
        assert_eq!(with_key(keyed, Some("sk-from-env-2")), 200, "{keyed}");
    }
    let body = json!({"model": "qwen3", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3});
    let (status, answer) = request_with_headers(
        port,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
        &[("Authorization", "Bearer sk-from-env-1")],
    )
    .expect("POST");
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = request_with_headers(
        port,
        "POST",
        "/v1/chat/completions",
        Some(&body.to_string()),
        &[],
    )
    .expect("POST");
    assert_eq!(status, 401, "{answer}");
    let error: serde_json::Value = serde_json::from_str(&answer).expect("JSON error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    server.stop();
}
