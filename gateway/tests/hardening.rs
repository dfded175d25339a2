//! The gateway's guards through the router, on a real embedded log with the echo decoder: API keys (401 in
//! OpenAI's shape, open probes), the per-key concurrency limit (429 with `Retry-After`), header and body size
//! (431, 413), and the limits on every request field that sets a size (400 before anything is allocated for it).

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use support::{CONTEXT_LENGTH_TOKENS, DecoderBehaviour, MODEL, TestGateway, error_of};
use tandem_events::EventKind;
use tandem_gateway::{ApiKeys, AuthConfig};
use tower::ServiceExt;

const KEY_A: &str = "sk-tandem-test-a";
const KEY_B: &str = "sk-tandem-test-b";

fn chat_request(content: &str) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8
    })
}

fn post(path: &str, body: &Value, authorization: Option<&str>) -> Request<Body> {
    let mut request = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(authorization) = authorization {
        request = request.header(header::AUTHORIZATION, authorization);
    }
    request.body(Body::from(body.to_string())).expect("request")
}

fn get(path: &str, authorization: Option<&str>) -> Request<Body> {
    let mut request = Request::get(path);
    if let Some(authorization) = authorization {
        request = request.header(header::AUTHORIZATION, authorization);
    }
    request.body(Body::empty()).expect("request")
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(bytes)))
}

async fn keyed_gateway(behaviour: DecoderBehaviour, metrics_require_key: bool) -> TestGateway {
    TestGateway::start_with(behaviour, |config| {
        config.auth = AuthConfig {
            api_keys: ApiKeys::from_plaintext([KEY_A, KEY_B]),
            metrics_require_key,
        };
        config.client_limits.max_concurrent_per_key = Some(1);
        // As the binary's Prometheus recorder would (without one, `/metrics` is a 404).
        config.metrics_text = Some(Arc::new(|| Some("tandem:requests_total 0\n".to_string())));
    })
    .await
}

/// Waits (up to 10 s) until the log holds `count` `Received` events.
async fn wait_for_received(gateway: &TestGateway, count: usize) {
    for _ in 0..400 {
        let received = gateway
            .events()
            .await
            .iter()
            .filter(|event| event.kind() == EventKind::Received)
            .count();
        if received >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the log never held {count} Received events");
}

async fn received_count(gateway: &TestGateway) -> usize {
    gateway
        .events()
        .await
        .iter()
        .filter(|event| event.kind() == EventKind::Received)
        .count()
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_a_401_in_openai_shape_and_the_right_key_is_served() {
    let gateway = keyed_gateway(DecoderBehaviour::default(), false).await;
    let request = chat_request("Hello");

    let response = gateway
        .router
        .clone()
        .oneshot(post("/v1/chat/completions", &request, None))
        .await
        .expect("router answers");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let missing = json_of(&body);
    let error = error_of(&missing);
    assert_eq!(error["type"], "invalid_request_error");
    assert_eq!(error["param"], Value::Null);
    // OpenAI answers a request without a key with a null code, a wrong key with `invalid_api_key`.
    assert_eq!(error["code"], Value::Null);
    assert!(error["message"].as_str().unwrap().contains("Bearer"));

    for wrong in [
        "Bearer sk-tandem-test-c",
        "Bearer ",
        "Basic c2stdGFuZGVtLXRlc3QtYQ==",
        KEY_A,
    ] {
        let (status, body) = gateway
            .send(post("/v1/chat/completions", &request, Some(wrong)))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
        let body = json_of(&body);
        let error = error_of(&body);
        assert_eq!(error["type"], "invalid_request_error", "{wrong}");
        assert_eq!(error["code"], "invalid_api_key", "{wrong}");
        assert!(
            !body.to_string().contains("sk-tandem-test"),
            "the presented key is never echoed: {body}"
        );
    }
    assert_eq!(
        received_count(&gateway).await,
        0,
        "a refused request never reaches the log"
    );

    for key in [KEY_A, KEY_B] {
        let (status, body) = gateway
            .send(post(
                "/v1/chat/completions",
                &request,
                Some(&format!("Bearer {key}")),
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(json_of(&body)["object"], "chat.completion");
    }
    let (status, _) = gateway
        .send(get("/v1/models", Some(&format!("Bearer {KEY_B}"))))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = gateway.send(get("/v1/models", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Unknown routes are behind the key too: no probing of what exists.
    let (status, _) = gateway.send(get("/v1/nothing", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn probes_openapi_and_metrics_are_open_unless_metrics_require_a_key() {
    let open_metrics = keyed_gateway(DecoderBehaviour::default(), false).await;
    for path in ["/health", "/ready", "/openapi.json", "/metrics"] {
        let (status, _) = open_metrics.send(get(path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let keyed_metrics = keyed_gateway(DecoderBehaviour::default(), true).await;
    for path in ["/health", "/ready", "/openapi.json"] {
        let (status, _) = keyed_metrics.send(get(path, None)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (status, body) = keyed_metrics.send(get("/metrics", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    error_of(&json_of(&body));
    let (status, _) = keyed_metrics
        .send(get("/metrics", Some(&format!("Bearer {KEY_A}"))))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_key_over_its_concurrency_limit_gets_429_with_retry_after_and_other_keys_go_on() {
    // A silent decoder: every accepted request stays in flight until its task is dropped.
    let behaviour = DecoderBehaviour {
        silent: true,
        ..DecoderBehaviour::default()
    };
    let gateway = keyed_gateway(behaviour, false).await;
    let request = chat_request("Hold this slot");
    let bearer_a = format!("Bearer {KEY_A}");
    let bearer_b = format!("Bearer {KEY_B}");

    let in_flight_a = tokio::spawn(gateway.router.clone().oneshot(post(
        "/v1/chat/completions",
        &request,
        Some(&bearer_a),
    )));
    wait_for_received(&gateway, 1).await;

    let response = gateway
        .router
        .clone()
        .oneshot(post("/v1/chat/completions", &request, Some(&bearer_a)))
        .await
        .expect("router answers");
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    let body = json_of(&body);
    let error = error_of(&body);
    assert_eq!(error["type"], "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert_eq!(error["param"], Value::Null);
    // Requests that hold no decode slot are not counted.
    let (status, _) = gateway.send(get("/v1/models", Some(&bearer_a))).await;
    assert_eq!(status, StatusCode::OK);

    // Another key has its own slots.
    let in_flight_b = tokio::spawn(gateway.router.clone().oneshot(post(
        "/v1/chat/completions",
        &request,
        Some(&bearer_b),
    )));
    wait_for_received(&gateway, 2).await;

    // The first request ends (its client went away): key A's slot is free again.
    in_flight_a.abort();
    let _ = in_flight_a.await;
    let again_a = tokio::spawn(gateway.router.clone().oneshot(post(
        "/v1/chat/completions",
        &request,
        Some(&bearer_a),
    )));
    wait_for_received(&gateway, 3).await;
    in_flight_b.abort();
    again_a.abort();
}

#[tokio::test]
async fn a_stream_holds_its_slot_until_its_body_is_done() {
    let gateway = TestGateway::start_with(DecoderBehaviour::default(), |config| {
        config.client_limits.max_concurrent_per_key = Some(1);
    })
    .await;
    let mut request = chat_request("Stream to me");
    request["stream"] = json!(true);
    let streaming = gateway
        .router
        .clone()
        .oneshot(post("/v1/chat/completions", &request, None))
        .await
        .expect("router answers");
    assert_eq!(streaming.status(), StatusCode::OK);
    // Without keys, every client counts as one: the open stream holds the only slot.
    let (status, _) = gateway
        .send(post("/v1/chat/completions", &request, None))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let streamed = axum::body::to_bytes(streaming.into_body(), usize::MAX)
        .await
        .expect("stream body");
    assert!(String::from_utf8_lossy(&streamed).ends_with("data: [DONE]\n\n"));
    let (status, _) = gateway
        .send(post("/v1/chat/completions", &request, None))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_headers_are_431_and_an_oversized_body_is_413_in_openai_shape() {
    let gateway = TestGateway::start_with(DecoderBehaviour::default(), |config| {
        config.client_limits.max_header_bytes = 2048;
        config.body_limit_bytes = 16 * 1024;
    })
    .await;
    let request = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-padding", "p".repeat(4096))
        .body(Body::from(chat_request("Hello").to_string()))
        .expect("request");
    let (status, body) = gateway.send(request).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    let body = json_of(&body);
    let error = error_of(&body);
    assert_eq!(error["code"], "request_headers_too_large");
    assert!(error["message"].as_str().unwrap().contains("2048 bytes"));

    let (status, body) = gateway
        .post_json("/v1/chat/completions", &chat_request(&"x".repeat(20_000)))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_of(&body)["code"], "request_too_large");

    // Both under their limits: served.
    let (status, body) = gateway
        .post_json("/v1/chat/completions", &chat_request("Hello"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Every field that sets a size is refused with a 400 naming it, and the log stays empty.
#[tokio::test]
async fn every_field_that_sets_a_size_is_bounded() {
    let gateway = TestGateway::start_with(DecoderBehaviour::default(), |config| {
        config.body_limit_bytes = 8 << 20;
    })
    .await;
    let chat = |extra: Value| {
        let mut request = chat_request("Hello");
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        request
    };
    let completion = |extra: Value| {
        let mut request = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 8});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        request
    };
    let context = CONTEXT_LENGTH_TOKENS as usize;
    let many_messages: Vec<Value> = (0..=context)
        .map(|_| json!({"role": "user", "content": "hi"}))
        .collect();
    let cases: Vec<(&str, &str, Value, &str, &str)> = vec![
        (
            "max_tokens over the window",
            "/v1/chat/completions",
            chat(json!({"max_tokens": context})),
            "messages",
            "maximum context length",
        ),
        (
            "max_tokens beyond u32",
            "/v1/completions",
            completion(json!({"max_tokens": 1u64 << 40})),
            "prompt",
            "maximum context length",
        ),
        (
            "max_completion_tokens zero",
            "/v1/chat/completions",
            chat(json!({"max_completion_tokens": 0})),
            "max_completion_tokens",
            "at least 1",
        ),
        (
            "a prompt of token ids filling the window",
            "/v1/completions",
            completion(json!({"prompt": vec![9707; context]})),
            "prompt",
            "no room for the completion",
        ),
        (
            "a text prompt over the window",
            "/v1/completions",
            completion(json!({"prompt": "Hello ".repeat(context)})),
            "prompt",
            "maximum context length",
        ),
        (
            "more messages than the window",
            "/v1/chat/completions",
            chat(json!({"messages": many_messages})),
            "messages",
            "fewer messages",
        ),
        (
            "one message over the window",
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": "Hello ".repeat(context)}]})),
            "messages",
            "maximum context length",
        ),
        (
            "too many stop strings",
            "/v1/chat/completions",
            chat(json!({"stop": vec!["a"; 17]})),
            "stop",
            "at most 16",
        ),
        (
            "a stop string too long",
            "/v1/completions",
            completion(json!({"stop": "s".repeat(257)})),
            "stop",
            "at most 256 bytes",
        ),
        (
            "too many stop token ids",
            "/v1/chat/completions",
            chat(json!({"stop_token_ids": vec![13; 100_000]})),
            "stop_token_ids",
            "at most 256",
        ),
        (
            "n above 1",
            "/v1/chat/completions",
            chat(json!({"n": 1_000_000})),
            "n",
            "must be 1",
        ),
        (
            "best_of above 1",
            "/v1/completions",
            completion(json!({"best_of": 64})),
            "best_of",
            "must be 1",
        ),
        (
            "top_logprobs over 20",
            "/v1/chat/completions",
            chat(json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs",
            "between 0 and 20",
        ),
        (
            "logprobs over 20",
            "/v1/completions",
            completion(json!({"logprobs": 1_000_000})),
            "logprobs",
            "between 0 and 20",
        ),
        (
            "negative logprobs",
            "/v1/completions",
            completion(json!({"logprobs": -1})),
            "logprobs",
            "between 0 and 20",
        ),
    ];
    for (name, path, body, param, message) in cases {
        let (status, answer) = gateway.post_json(path, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {answer}");
        let error = error_of(&answer);
        assert_eq!(error["type"], "invalid_request_error", "{name}");
        assert_eq!(error["param"], param, "{name}: {answer}");
        assert!(
            error["message"].as_str().unwrap().contains(message),
            "{name}: {answer}"
        );
    }
    assert_eq!(
        received_count(&gateway).await,
        0,
        "no refused request reached the log"
    );
    // At the limits, a request is served.
    let (status, answer) = gateway
        .post_json(
            "/v1/completions",
            &completion(json!({"stop": vec!["s".repeat(256); 16], "stop_token_ids": vec![13; 256], "logprobs": 20})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

/// `--log-prompts hash|none`: `Received` holds no ids (and no hash with `none`); the prompt sits in the prompt
/// store while the request runs and is deleted when it ends here.
#[tokio::test]
async fn a_redacted_log_holds_no_prompt_ids_and_the_store_holds_the_prompt_only_while_it_runs() {
    use tandem_events::Body as EventBody;
    use tandem_events::log::EventLog;
    use tandem_events::prompts::{PROMPT_BUCKET, PROMPT_TTL, decode_prompt};
    use tandem_gateway::PromptLogging;

    for logging in [PromptLogging::Hash, PromptLogging::None] {
        let behaviour = DecoderBehaviour {
            silent: true,
            ..DecoderBehaviour::default()
        };
        let gateway = TestGateway::start_with(behaviour, |config| {
            config.prompt_logging = logging;
        })
        .await;
        let in_flight = tokio::spawn(gateway.router.clone().oneshot(post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": [9707, 1879, 13], "max_tokens": 4}),
            None,
        )));
        wait_for_received(&gateway, 1).await;
        let events = gateway.events().await;
        let received_event = events
            .iter()
            .find(|event| event.kind() == EventKind::Received)
            .expect("Received");
        let EventBody::Received(received) = received_event.body() else {
            unreachable!("filtered on the kind");
        };
        assert!(
            received.prompt_token_ids.is_empty(),
            "{logging}: {received:?}"
        );
        assert_eq!(received.prompt_tokens, 3, "{logging}");
        let expected_hash_bytes = if logging == PromptLogging::Hash {
            32
        } else {
            0
        };
        assert_eq!(
            received.prompt_sha256.len(),
            expected_hash_bytes,
            "{logging}"
        );

        let store = gateway
            .log
            .kv_bucket(PROMPT_BUCKET, PROMPT_TTL)
            .await
            .expect("prompt bucket");
        let stored = store
            .get(received_event.id())
            .await
            .expect("read the store")
            .expect("the prompt is stored while the request runs");
        assert_eq!(decode_prompt(&stored, 3), Ok(vec![9707, 1879, 13]));

        // The client goes away: the request ends here and its prompt leaves the store.
        in_flight.abort();
        let _ = in_flight.await;
        let mut stored = Some(stored);
        for _ in 0..400 {
            stored = store
                .get(received_event.id())
                .await
                .expect("read the store");
            if stored.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            stored.is_none(),
            "{logging}: the prompt outlived its request"
        );
    }
}
