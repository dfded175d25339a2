//! The HTTP API through the router, on a real embedded log and in-process token bus with the echo decoder (see
//! `support`): response shapes, streaming, the log's `Received`, and every refusal in OpenAI's error shape.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use support::{DecoderBehaviour, MODEL, TestGateway, error_of};
use tandem_events::{Body, EventKind};

const SEED_MESSAGE: &str =
    "Explain why Roger Federer is considered one of the greatest tennis players of all time";
/// `<|im_start|>user\n{SEED_MESSAGE}<|im_end|>\n<|im_start|>assistant\n` as transformers tokenizes it.
const SEED_PROMPT_IDS: [u32; 25] = [
    151644, 872, 198, 840, 20772, 3170, 28507, 21099, 261, 374, 6509, 825, 315, 279, 12196, 31415,
    4217, 315, 678, 882, 151645, 198, 151644, 77091, 198,
];
/// Tokens the echo decoder sends for a chat with thinking on, `<|im_end|>` included.
const CHAT_COMPLETION_TOKENS: u64 = 15;

fn seed_request() -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": SEED_MESSAGE}],
        "max_tokens": 30,
        "stream": false
    })
}

/// SHA-256 of the token ids' little-endian bytes, as `Received.prompt_sha256` holds it.
fn prompt_sha256(ids: &[u32]) -> Vec<u8> {
    use sha2::Digest;
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    sha2::Sha256::digest(bytes).to_vec()
}

fn request_id_of(response_id: &str) -> &str {
    response_id.split_once('-').expect("prefixed id").1
}

#[tokio::test]
async fn seed_request_answers_with_openai_shape_and_25_prompt_tokens() {
    let gateway = TestGateway::start().await;
    let (status, body) = gateway
        .post_json("/v1/chat/completions", &seed_request())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello from the echo decoder.");
    assert_eq!(choice["message"]["reasoning_content"], "Echo thinks.");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": CHAT_COMPLETION_TOKENS, "total_tokens": 25 + CHAT_COMPLETION_TOKENS})
    );

    // The log holds the request as the gateway saw it.
    let request_id = request_id_of(id);
    let received = gateway
        .wait_for_event(request_id, EventKind::Received)
        .await;
    assert_eq!(received.envelope().emitter, "gateway-test");
    let Body::Received(received) = received.body() else {
        unreachable!()
    };
    assert_eq!(received.model, MODEL);
    assert_eq!(received.prompt_token_ids, SEED_PROMPT_IDS);
    assert_eq!(received.prompt_tokens, 25);
    assert_eq!(received.prompt_sha256, prompt_sha256(&SEED_PROMPT_IDS));
    assert_eq!(received.gateway_id, "gateway-test");
    assert_eq!(received.endpoint, "chat");
    assert!(!received.stream);
    let sampling = received.sampling.as_ref().unwrap();
    assert_eq!(sampling.max_tokens, 30);
    assert_eq!(sampling.stop_token_ids, vec![151_645, 151_643]);
    assert_eq!(
        (sampling.temperature, sampling.top_p, sampling.top_k),
        (1.0, 1.0, 0)
    );
    assert_eq!(sampling.logprobs, None);
}

#[tokio::test]
async fn sampling_parameters_reach_the_log() {
    let gateway = TestGateway::start().await;
    let (status, body) = gateway
        .post_json(
            "/v1/chat/completions",
            &json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}],
                "max_completion_tokens": 40, "max_tokens": 5,
                "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 11,
                "stop": ["\n\n", "END"], "stop_token_ids": [42], "ignore_eos": true,
                "logprobs": true, "top_logprobs": 2, "n": 1,
                "frequency_penalty": 0, "user": "someone", "some_future_field": {"x": 1}
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let received = gateway
        .wait_for_event(
            request_id_of(body["id"].as_str().unwrap()),
            EventKind::Received,
        )
        .await;
    let Body::Received(received) = received.body() else {
        unreachable!()
    };
    let sampling = received.sampling.clone().unwrap();
    assert_eq!(
        sampling.max_tokens, 40,
        "max_completion_tokens wins over max_tokens"
    );
    assert_eq!(
        (sampling.temperature, sampling.top_p, sampling.top_k),
        (0.7, 0.9, 20)
    );
    assert_eq!(sampling.seed, Some(11));
    assert_eq!(
        sampling.stop_strings,
        vec!["\n\n".to_string(), "END".to_string()]
    );
    assert_eq!(
        sampling.stop_token_ids,
        vec![42],
        "ignore_eos drops the EOS ids"
    );
    assert!(sampling.ignore_eos);
    assert_eq!(sampling.logprobs, Some(2));
    // ignore_eos: the decoder runs to max_tokens.
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 40);
    let logprobs = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(logprobs.len(), 40);
    assert_eq!(logprobs[0]["token"], "<think>");
    assert_eq!(logprobs[0]["logprob"], -0.25);
    assert_eq!(logprobs[0]["bytes"], json!(b"<think>".to_vec()));
    assert_eq!(logprobs[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn max_tokens_cuts_the_output_and_absent_means_the_rest_of_the_window() {
    let gateway = TestGateway::start().await;
    let mut request = seed_request();
    request["max_tokens"] = json!(3);
    let (status, body) = gateway.post_json("/v1/chat/completions", &request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    // `<think>`, `\n`, `Echo`: cut inside the reasoning.
    assert_eq!(body["choices"][0]["message"]["reasoning_content"], "Echo");
    assert_eq!(body["choices"][0]["message"]["content"], "");

    request.as_object_mut().unwrap().remove("max_tokens");
    let (_, body) = gateway.post_json("/v1/chat/completions", &request).await;
    let received = gateway
        .wait_for_event(
            request_id_of(body["id"].as_str().unwrap()),
            EventKind::Received,
        )
        .await;
    let Body::Received(received) = received.body() else {
        unreachable!()
    };
    assert_eq!(
        received.sampling.as_ref().unwrap().max_tokens,
        support::CONTEXT_LENGTH_TOKENS - 25
    );
}

#[tokio::test]
async fn thinking_off_gives_plain_content() {
    let gateway = TestGateway::start().await;
    let mut request = seed_request();
    request["chat_template_kwargs"] = json!({"enable_thinking": false});
    let (status, body) = gateway.post_json("/v1/chat/completions", &request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let message = &body["choices"][0]["message"];
    assert_eq!(message["content"], "Hello from the echo decoder.");
    assert!(message.get("reasoning_content").is_none(), "{message}");
    // The template added `<think>\n\n</think>\n\n`: 4 more prompt tokens.
    assert_eq!(body["usage"]["prompt_tokens"], 29);
}

#[tokio::test]
async fn chat_stream_sends_role_deltas_finish_usage_and_done() {
    let gateway = TestGateway::start().await;
    let mut request = seed_request();
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, events) = gateway.post_stream("/v1/chat/completions", &request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], MODEL);
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": CHAT_COMPLETION_TOKENS, "total_tokens": 25 + CHAT_COMPLETION_TOKENS})
    );
    let (finish_chunk, deltas) = rest.split_last().unwrap();
    assert_eq!(finish_chunk["choices"][0]["delta"], json!({}));
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], "stop");
    let mut reasoning = String::new();
    let mut content = String::new();
    for chunk in &deltas[1..] {
        let choice = &chunk["choices"][0];
        assert_eq!(choice["finish_reason"], Value::Null);
        assert!(chunk.get("usage").is_none());
        reasoning.push_str(choice["delta"]["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
    }
    assert_eq!(reasoning, "Echo thinks.\n");
    assert_eq!(content, "Hello from the echo decoder.");
    // No reasoning is ever routed to content: every reasoning delta comes before the first content delta.
    let first_content = deltas[1..]
        .iter()
        .position(|chunk| chunk["choices"][0]["delta"].get("content").is_some())
        .unwrap();
    assert!(deltas[1..][first_content..].iter().all(|chunk| {
        chunk["choices"][0]["delta"]
            .get("reasoning_content")
            .is_none()
    }));
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage_chunk() {
    let gateway = TestGateway::start().await;
    let mut request = seed_request();
    request["stream"] = json!(true);
    let (_, events) = gateway.post_stream("/v1/chat/completions", &request).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let before_done: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(before_done["choices"][0]["finish_reason"], "stop");
    assert!(events.iter().all(|event| !event.contains("\"usage\"")));
}

#[tokio::test]
async fn completions_take_text_and_token_id_prompts() {
    let gateway = TestGateway::start().await;
    let (status, body) = gateway
        .post_json(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "logprobs": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "Hello from the echo decoder.");
    assert_eq!(choice["finish_reason"], "stop");
    let logprobs = &choice["logprobs"];
    assert_eq!(
        logprobs["tokens"],
        json!(["Hello", " from", " the", " echo", " decoder", ".", ""])
    );
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), 7);
    assert_eq!(logprobs["text_offset"], json!([0, 5, 10, 14, 19, 27, 28]));
    assert_eq!(logprobs["top_logprobs"][0], json!({"alt0": -0.25}));
    // "The capital of France is" is 5 tokens; no template on this endpoint.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})
    );
    let received = gateway
        .wait_for_event(
            request_id_of(body["id"].as_str().unwrap()),
            EventKind::Received,
        )
        .await;
    let Body::Received(received) = received.body() else {
        unreachable!()
    };
    assert_eq!(received.endpoint, "completion");
    assert_eq!(received.prompt_token_ids, vec![785, 6722, 315, 9625, 374]);

    let (status, body) = gateway
        .post_json(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": [9707, 1879], "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "Hello from");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    assert_eq!(body["usage"]["prompt_tokens"], 2);
    let received = gateway
        .wait_for_event(
            request_id_of(body["id"].as_str().unwrap()),
            EventKind::Received,
        )
        .await;
    let Body::Received(received) = received.body() else {
        unreachable!()
    };
    assert_eq!(received.prompt_token_ids, vec![9707, 1879]);
}

#[tokio::test]
async fn completions_stream() {
    let gateway = TestGateway::start().await;
    let (status, events) = gateway
        .post_stream(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Hi", "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"].get(0))
        .map(|choice| choice["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "Hello from the echo decoder.");
    assert!(
        chunks
            .iter()
            .all(|chunk| chunk["object"] == "text_completion")
    );
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 7);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn models_health_ready_metrics() {
    let gateway = TestGateway::start().await;
    let (status, body) = gateway.get("/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    assert_eq!(body["data"][0]["id"], MODEL);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["owned_by"], "tandem");

    assert_eq!(gateway.get("/health").await.0, StatusCode::OK);
    assert_eq!(gateway.get("/ready").await.0, StatusCode::OK);
    gateway
        .ready
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = gateway.get("/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    error_of(&serde_json::from_slice(&body).unwrap());
    assert_eq!(gateway.get("/health").await.0, StatusCode::OK);

    // No recorder in this process (the binary installs it; tests/observability.rs scrapes it): an OpenAI 404.
    let (status, body) = gateway.get("/metrics").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&serde_json::from_slice(&body).unwrap());
}

/// A refused request: its name, body, status, the error's `param`, and a part of its message.
type Refusal<B> = (
    &'static str,
    B,
    StatusCode,
    Option<&'static str>,
    &'static str,
);

/// Each bad request gets its status and OpenAI's error shape, and the server keeps serving.
#[tokio::test]
async fn bad_requests_are_refused_in_openai_shape_and_serving_goes_on() {
    let gateway = TestGateway::start_with(DecoderBehaviour::default(), |config| {
        config.body_limit_bytes = 64 * 1024;
    })
    .await;
    let chat = |extra: Value| {
        let mut request = seed_request();
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        request
    };
    let cases: Vec<Refusal<Vec<u8>>> = vec![
        ("malformed JSON", b"{\"model\": \"qwen3\", \"messages\": [".to_vec(), StatusCode::BAD_REQUEST, None, "parse"),
        ("not an object", b"[1, 2]".to_vec(), StatusCode::BAD_REQUEST, None, "parse"),
        ("trailing garbage", b"{} x".to_vec(), StatusCode::BAD_REQUEST, None, "parse"),
        ("missing messages", br#"{"model": "qwen3"}"#.to_vec(), StatusCode::BAD_REQUEST, Some("messages"), "required"),
        ("empty messages", br#"{"model": "qwen3", "messages": []}"#.to_vec(), StatusCode::BAD_REQUEST, Some("messages"), "at least one"),
        ("unknown model", chat(json!({"model": "gpt-9"})).to_string().into_bytes(), StatusCode::NOT_FOUND, Some("model"), "gpt-9"),
        ("bad role", chat(json!({"messages": [{"role": "robot", "content": "x"}]})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("messages[0].role"), "robot"),
        ("image part", chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("messages[0].content[0].type"), "text parts"),
        ("context overflow", chat(json!({"max_tokens": 5000})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("messages"), "maximum context length is 4096 tokens. However, you requested 5025 tokens (25 in the messages, 5000 in the completion)"),
        ("prompt fills the window", chat(json!({"max_tokens": null, "messages": [{"role": "user", "content": "hi ".repeat(5000)}]})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("messages"), "maximum context length is 4096 tokens"),
        ("negative max_tokens", chat(json!({"max_tokens": -1})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("max_tokens"), "at least 1"),
        ("zero max_completion_tokens", chat(json!({"max_completion_tokens": 0})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("max_completion_tokens"), "at least 1"),
        ("absurd max_tokens", chat(json!({"max_tokens": 1_000_000_000_000_i64})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("messages"), "maximum context length"),
        ("max_tokens of the wrong type", chat(json!({"max_tokens": "many"})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("max_tokens"), "max_tokens"),
        ("temperature", chat(json!({"temperature": 5})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("temperature"), "between 0 and 2"),
        ("negative temperature", chat(json!({"temperature": -0.1})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("temperature"), "between 0 and 2"),
        ("top_p", chat(json!({"top_p": 0})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("top_p"), "(0, 1]"),
        ("top_k", chat(json!({"top_k": -2})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("top_k"), "top_k"),
        ("n", chat(json!({"n": 2})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("n"), "must be 1"),
        ("seed", chat(json!({"seed": -3})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("seed"), "negative"),
        ("top_logprobs", chat(json!({"logprobs": true, "top_logprobs": 50})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("top_logprobs"), "between 0 and 20"),
        ("top_logprobs without logprobs", chat(json!({"top_logprobs": 2})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("top_logprobs"), "logprobs"),
        ("too many stops", chat(json!({"stop": vec!["x"; 17]})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("stop"), "at most 16"),
        ("stop token out of vocabulary", chat(json!({"stop_token_ids": [999_999]})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("stop_token_ids"), "out of the vocabulary"),
        ("stream_options without stream", chat(json!({"stream_options": {"include_usage": true}})).to_string().into_bytes(), StatusCode::BAD_REQUEST, Some("stream_options"), "stream"),
        ("body too large", chat(json!({"messages": [{"role": "user", "content": "x".repeat(100_000)}]})).to_string().into_bytes(), StatusCode::PAYLOAD_TOO_LARGE, None, "65536 bytes"),
    ];
    for (name, body, status, param, message_part) in cases {
        let (got_status, got) = gateway.post_raw("/v1/chat/completions", body).await;
        assert_eq!(got_status, status, "{name}: {got}");
        let error = error_of(&got);
        assert_eq!(error["param"].as_str(), param, "{name}: {got}");
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(message_part), "{name}: {message}");
        if status == StatusCode::NOT_FOUND {
            assert_eq!(error["code"], "model_not_found");
        }
        // Still serving.
        let (ok, answer) = gateway
            .post_json("/v1/chat/completions", &seed_request())
            .await;
        assert_eq!(ok, StatusCode::OK, "after {name}: {answer}");
    }

    let completion_cases: Vec<Refusal<Value>> = vec![
        (
            "token id out of vocabulary",
            json!({"prompt": [9707, 151_669]}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "151669 at position 1",
        ),
        (
            "negative token id",
            json!({"prompt": [-1]}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "out of the vocabulary",
        ),
        (
            "empty prompt",
            json!({"prompt": ""}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "empty",
        ),
        (
            "missing prompt",
            json!({}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "required",
        ),
        (
            "batch",
            json!({"prompt": ["a", "b"]}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "Batched",
        ),
        (
            "logprobs",
            json!({"prompt": "a", "logprobs": 21}),
            StatusCode::BAD_REQUEST,
            Some("logprobs"),
            "between 0 and 20",
        ),
        (
            "n",
            json!({"prompt": "a", "n": 3}),
            StatusCode::BAD_REQUEST,
            Some("n"),
            "must be 1",
        ),
        (
            "echo",
            json!({"prompt": "a", "echo": true}),
            StatusCode::BAD_REQUEST,
            Some("echo"),
            "not supported",
        ),
        (
            "unknown model",
            json!({"prompt": "a", "model": "llama"}),
            StatusCode::NOT_FOUND,
            Some("model"),
            "llama",
        ),
        (
            "overflow",
            json!({"prompt": [1, 2, 3], "max_tokens": 4094}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "(3 in the prompt, 4094 in the completion)",
        ),
    ];
    for (name, body, status, param, message_part) in completion_cases {
        let (got_status, got) = gateway.post_json("/v1/completions", &body).await;
        assert_eq!(got_status, status, "{name}: {got}");
        let error = error_of(&got);
        assert_eq!(error["param"].as_str(), param, "{name}: {got}");
        assert!(
            error["message"].as_str().unwrap().contains(message_part),
            "{name}: {got}"
        );
    }

    let (status, body) = gateway.get("/v1/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        error_of(&serde_json::from_slice(&body).unwrap())["code"],
        "route_not_found"
    );
    let (status, body) = gateway.get("/v1/chat/completions").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        error_of(&serde_json::from_slice(&body).unwrap())["code"],
        "method_not_allowed"
    );

    let (ok, answer) = gateway
        .post_json("/v1/chat/completions", &seed_request())
        .await;
    assert_eq!(ok, StatusCode::OK, "{answer}");
    // Refused requests never reached the log: only the successful ones did.
    let received = gateway
        .events()
        .await
        .into_iter()
        .filter(|event| event.kind() == EventKind::Received)
        .count();
    assert_eq!(received, 27);
}

#[tokio::test]
async fn deadline_cancels_the_request_on_the_log() {
    let behaviour = DecoderBehaviour {
        silent: true,
        ..Default::default()
    };
    let gateway = TestGateway::start_with(behaviour, |config| {
        config.request_timeout = Duration::from_millis(300);
    })
    .await;
    let (status, body) = gateway
        .post_json("/v1/chat/completions", &seed_request())
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(error_of(&body)["code"], "request_timeout");
    let received = gateway
        .events()
        .await
        .into_iter()
        .find(|event| event.kind() == EventKind::Received)
        .expect("Received on the log");
    let cancelled = gateway
        .wait_for_event(received.id(), EventKind::Cancelled)
        .await;
    let Body::Cancelled(cancelled) = cancelled.body() else {
        unreachable!()
    };
    assert_eq!(cancelled.reason, "deadline");
}

#[tokio::test]
async fn worker_failure_is_a_server_error() {
    let behaviour = DecoderBehaviour {
        fail_with: Some("decode worker ran out of KV blocks".into()),
        ..Default::default()
    };
    let gateway = TestGateway::start_with(behaviour, |_| {}).await;
    let (status, body) = gateway
        .post_json("/v1/chat/completions", &seed_request())
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        error_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("out of KV blocks")
    );
}

#[tokio::test]
async fn a_request_whose_last_update_is_lost_is_finished_from_the_log() {
    let behaviour = DecoderBehaviour {
        lose_last_update: true,
        ..Default::default()
    };
    let gateway = TestGateway::start_with(behaviour, |_| {}).await;
    let mut request = seed_request();
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, events) = gateway.post_stream("/v1/chat/completions", &request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    assert!(
        chunks.iter().all(|chunk| chunk.get("error").is_none()),
        "{chunks:?}"
    );
    let content: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello from the echo decoder.");
    let finish = chunks
        .iter()
        .find_map(|chunk| chunk["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("stop"));
    let usage = chunks.last().unwrap()["usage"].clone();
    assert_eq!(usage["completion_tokens"], CHAT_COMPLETION_TOKENS);
}

#[tokio::test]
async fn a_lost_last_update_of_a_request_with_logprobs_ends_with_an_error_from_the_log() {
    let behaviour = DecoderBehaviour {
        lose_last_update: true,
        ..Default::default()
    };
    let gateway = TestGateway::start_with(behaviour, |_| {}).await;
    let mut request = seed_request();
    // The log's checkpoints keep the sampled logprob, not the alternatives asked for.
    request["logprobs"] = json!(true);
    request["top_logprobs"] = json!(2);
    let started = std::time::Instant::now();
    let (status, body) = gateway.post_json("/v1/chat/completions", &request).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let message = error_of(&body)["message"].as_str().unwrap();
    assert!(message.contains("last tokens were lost"), "{message}");
    // Two stall checks, not the request deadline.
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}

#[tokio::test]
async fn tokens_resent_after_a_migration_are_not_sent_twice() {
    let behaviour = DecoderBehaviour {
        resend_after_tokens: Some(10),
        ..Default::default()
    };
    let gateway = TestGateway::start_with(behaviour, |_| {}).await;
    let (status, body) = gateway
        .post_json("/v1/chat/completions", &seed_request())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from the echo decoder."
    );
    assert_eq!(
        body["choices"][0]["message"]["reasoning_content"],
        "Echo thinks."
    );
    assert_eq!(body["usage"]["completion_tokens"], CHAT_COMPLETION_TOKENS);
}

#[tokio::test]
async fn streamed_logprobs_ride_with_their_deltas() {
    let gateway = TestGateway::start().await;
    let mut request = seed_request();
    request["stream"] = json!(true);
    request["logprobs"] = json!(true);
    request["top_logprobs"] = json!(1);
    request["chat_template_kwargs"] = json!({"enable_thinking": false});
    let (status, events) = gateway.post_stream("/v1/chat/completions", &request).await;
    assert_eq!(status, StatusCode::OK);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).unwrap())
        .collect();
    let mut tokens = Vec::new();
    for chunk in &chunks {
        let Some(content) = chunk["choices"][0]["logprobs"]["content"].as_array() else {
            continue;
        };
        for entry in content {
            assert_eq!(entry["top_logprobs"].as_array().unwrap().len(), 1);
            tokens.push(entry["token"].as_str().unwrap().to_string());
        }
    }
    // The stop token `<|im_end|>` has a logprob but no text.
    assert_eq!(
        tokens,
        ["Hello", " from", " the", " echo", " decoder", ".", ""]
    );
}
