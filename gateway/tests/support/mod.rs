//! Test support shared by the gateway's integration tests: a gateway on a real embedded log and in-process token
//! bus, and an "echo decoder" test peer that consumes `Received` events from that log and answers on the bus with
//! a known script, speaking the same protocol as the decode worker.

#![allow(dead_code)] // each test binary uses part of this module

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tandem_events::log::embedded::EmbeddedLog;
use tandem_events::log::{ConsumerConfig, EventLog, StartAt};
use tandem_events::schema::{Completed, Received, TokensDecoded};
use tandem_events::subjects::{ALL_EVENTS, kind_filter};
use tandem_events::tokens::{InProcessTokenBus, TokenBus, TokenLogprob, TokenUpdate, TopLogprob};
use tandem_events::{Body as EventBody, Event, EventKind};
use tandem_gateway::{Gateway, GatewayConfig};
use tower::ServiceExt;

/// The served model name in these tests.
pub const MODEL: &str = "qwen3";
/// Qwen3's context window in these tests (small, so overflow is easy to provoke).
pub const CONTEXT_LENGTH_TOKENS: u32 = 4096;
/// Qwen3's embedding rows; the tokenizer knows 151,669 ids.
pub const VOCAB_SIZE: u32 = 151_936;
pub const IM_END: u32 = 151_645;
const THINK_START: u32 = 151_667;
const THINK_END: u32 = 151_668;

/// What the echo decoder says when thinking is on: `(token id, text)`. Then `ANSWER`, then `<|im_end|>`.
pub const THINKING: &[(u32, &str)] = &[
    (THINK_START, "<think>"),
    (198, "\n"),
    (80022, "Echo"),
    (15482, " thinks"),
    (13, "."),
    (198, "\n"),
    (THINK_END, "</think>"),
    (271, "\n\n"),
];
pub const ANSWER: &[(u32, &str)] = &[
    (9707, "Hello"),
    (504, " from"),
    (279, " the"),
    (1687, " echo"),
    (24551, " decoder"),
    (13, "."),
];
/// After the answer: `<|im_end|>` (no text), or when EOS is ignored, this word over and over.
pub const FILLER: (u32, &str) = (3409, " la");

pub fn tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/qwen3-tokenizer")
}

/// How the echo decoder behaves.
#[derive(Debug, Clone, Default)]
pub struct DecoderBehaviour {
    /// Pause before each token update.
    pub token_delay: Duration,
    /// Never answer (for deadline tests).
    pub silent: bool,
    /// After sending this many tokens, send everything again from index 0 (as after a migration).
    pub resend_after_tokens: Option<u32>,
    /// Fail instead of answering, with this reason.
    pub fail_with: Option<String>,
    /// Append a checkpoint of every token (with its text) and `Completed` to the log, as a decode worker does, but
    /// never publish the last update (as when the token bus drops it).
    pub lose_last_update: bool,
}

/// The script the echo decoder follows for a prompt: thinking first unless the prompt already closed an empty
/// thinking block (`enable_thinking: false`) or is not a chat prompt.
pub fn script_for(received: &Received) -> Vec<(u32, String)> {
    let prompt = &received.prompt_token_ids;
    let thinking_off = prompt.ends_with(&[THINK_END, 271]);
    let mut script: Vec<(u32, String)> = Vec::new();
    if received.endpoint == "chat" && !thinking_off {
        script.extend(THINKING.iter().map(|(id, text)| (*id, text.to_string())));
    }
    script.extend(ANSWER.iter().map(|(id, text)| (*id, text.to_string())));
    script
}

/// Plays one request: token by token on the bus, stopping at a stop token id (finish `stop`) or at max_tokens
/// (finish `length`).
async fn play(
    log: Arc<EmbeddedLog>,
    bus: Arc<InProcessTokenBus>,
    request_id: String,
    received: Received,
    behaviour: DecoderBehaviour,
) {
    if behaviour.silent {
        return;
    }
    let sampling = received.sampling.clone().unwrap_or_default();
    if let Some(reason) = behaviour.fail_with {
        let update = TokenUpdate {
            error: Some(reason),
            ..Default::default()
        };
        let _ = bus.publish(&request_id, update).await;
        return;
    }
    let script = script_for(&received);
    let token_at = |index: usize| -> (u32, String) {
        match script.get(index) {
            Some(entry) => entry.clone(),
            None if index == script.len() && !sampling.ignore_eos => (IM_END, String::new()),
            None => (FILLER.0, FILLER.1.to_string()),
        }
    };
    let mut index = 0u32;
    let mut resent = false;
    // What each generated index carried, for the checkpoint.
    let mut played: Vec<(u32, String)> = Vec::new();
    loop {
        if let Some(after) = behaviour.resend_after_tokens
            && index == after
            && !resent
        {
            resent = true;
            index = 0;
        }
        tokio::time::sleep(behaviour.token_delay).await;
        let (token_id, text) = token_at(index as usize);
        let is_stop = sampling.stop_token_ids.contains(&token_id);
        let generated = index + 1;
        let finish_reason = if is_stop {
            Some("stop".to_string())
        } else if generated >= sampling.max_tokens {
            Some("length".to_string())
        } else {
            None
        };
        let logprobs = match sampling.logprobs {
            None => Vec::new(),
            Some(top) => vec![TokenLogprob {
                chosen: Some(top_logprob(token_id, &text, -0.25)),
                top: (0..top)
                    .map(|rank| {
                        top_logprob(token_id + rank, &format!("alt{rank}"), -0.25 - rank as f32)
                    })
                    .collect(),
            }],
        };
        // A stop token's text is never shown.
        let text = if is_stop { String::new() } else { text };
        played.truncate(index as usize);
        played.push((token_id, text.clone()));
        let update = TokenUpdate {
            start_index: index,
            token_ids: vec![token_id],
            text,
            logprobs,
            finish_reason: finish_reason.clone(),
            error: None,
            prompt_tokens: received.prompt_tokens,
            worker_id: "echo-decoder".into(),
        };
        if finish_reason.is_some() && behaviour.lose_last_update {
            let checkpoint = Event::new(
                request_id.as_str(),
                "echo-decoder",
                EventBody::TokensDecoded(TokensDecoded {
                    decode_worker_id: "echo-decoder".into(),
                    start_index: 0,
                    token_ids: played.iter().map(|(token_id, _)| *token_id).collect(),
                    logprobs: Vec::new(),
                    text: Some(played.iter().map(|(_, text)| text.as_str()).collect()),
                }),
            );
            let _ = log.append_event(&checkpoint, 1).await;
            let completed = Event::new(
                request_id.as_str(),
                "echo-decoder",
                EventBody::Completed(Completed {
                    finish_reason: finish_reason.unwrap_or_default(),
                    prompt_tokens: received.prompt_tokens,
                    completion_tokens: generated,
                    decode_worker_id: "echo-decoder".into(),
                }),
            );
            let _ = log.append_event(&completed, 1).await;
            return;
        }
        if bus.publish(&request_id, update).await.is_err() || finish_reason.is_some() {
            return;
        }
        index += 1;
    }
}

fn top_logprob(token_id: u32, token: &str, logprob: f32) -> TopLogprob {
    TopLogprob {
        token_id,
        token: token.to_string(),
        bytes: token.as_bytes().to_vec(),
        logprob,
    }
}

/// A gateway on a real embedded log in a temp dir, with the echo decoder consuming that log.
pub struct TestGateway {
    pub router: Router,
    pub gateway: Option<Gateway>,
    pub log: Arc<EmbeddedLog>,
    pub bus: Arc<InProcessTokenBus>,
    pub ready: Arc<AtomicBool>,
    decoder: tokio::task::JoinHandle<()>,
    _data_dir: tempfile::TempDir,
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.decoder.abort();
    }
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        TestGateway::start_with(DecoderBehaviour::default(), |_| {}).await
    }

    pub async fn start_with(
        behaviour: DecoderBehaviour,
        configure: impl FnOnce(&mut GatewayConfig),
    ) -> TestGateway {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let log = Arc::new(EmbeddedLog::open(data_dir.path()).expect("embedded log"));
        let bus = Arc::new(InProcessTokenBus::new());
        let mut config =
            GatewayConfig::new(MODEL, tokenizer_dir(), CONTEXT_LENGTH_TOKENS, VOCAB_SIZE);
        config.gateway_id = "gateway-test".into();
        configure(&mut config);
        let ready = Arc::new(AtomicBool::new(true));
        let ready_probe = Arc::clone(&ready);
        let gateway = Gateway::new(
            config,
            Arc::clone(&log) as Arc<dyn EventLog>,
            Arc::clone(&bus) as Arc<dyn TokenBus>,
            Arc::new(move || ready_probe.load(Ordering::SeqCst)),
        )
        .expect("gateway");
        let router = gateway.router();
        let decoder = tokio::spawn(run_echo_decoder(
            Arc::clone(&log),
            Arc::clone(&bus),
            behaviour,
        ));
        TestGateway {
            router,
            gateway: Some(gateway),
            log,
            bus,
            ready,
            decoder,
            _data_dir: data_dir,
        }
    }

    /// Sends one request through the router; returns the status and the body bytes.
    pub async fn send(&self, request: Request<Body>) -> (StatusCode, Vec<u8>) {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("router answers");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, body.to_vec())
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.post_raw(path, body.to_string().into_bytes()).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let (status, bytes) = self.send(request).await;
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("not JSON ({status}): {}", String::from_utf8_lossy(&bytes)));
        (status, json)
    }

    pub async fn post_stream(&self, path: &str, body: &Value) -> (StatusCode, Vec<String>) {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        let (status, bytes) = self.send(request).await;
        let text = String::from_utf8(bytes).expect("utf-8");
        (status, sse_data(&text))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Vec<u8>) {
        self.send(Request::get(path).body(Body::empty()).expect("request"))
            .await
    }

    /// Every event on the log, in order.
    pub async fn events(&self) -> Vec<Event> {
        let messages = self
            .log
            .read(StartAt::Beginning, &[ALL_EVENTS.to_string()], 10_000)
            .await
            .expect("read log");
        messages
            .iter()
            .map(|message| message.event().expect("decodes"))
            .collect()
    }

    /// Waits until the log holds an event of `kind` for `request_id`.
    pub async fn wait_for_event(&self, request_id: &str, kind: EventKind) -> Event {
        for _ in 0..200 {
            if let Some(event) = self
                .events()
                .await
                .into_iter()
                .find(|event| event.id() == request_id && event.kind() == kind)
            {
                return event;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no {kind} event for {request_id} on the log");
    }
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_string()
        })
        .collect()
}

/// Checks OpenAI's error shape and returns the error object.
pub fn error_of(body: &Value) -> &serde_json::Map<String, Value> {
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {body}"));
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.contains_key("param"), "{body}");
    assert!(error.contains_key("code"), "{body}");
    error
}

async fn run_echo_decoder(
    log: Arc<EmbeddedLog>,
    bus: Arc<InProcessTokenBus>,
    behaviour: DecoderBehaviour,
) {
    let config = ConsumerConfig::new("echo-decoder", vec![kind_filter(EventKind::Received)]);
    let consumer = log.consumer(config).await.expect("consumer");
    loop {
        let deliveries = match consumer.fetch(16, Duration::from_millis(50)).await {
            Ok(deliveries) => deliveries,
            Err(_) => return,
        };
        for delivery in deliveries {
            if let Ok(event) = delivery.message.event()
                && let EventBody::Received(received) = event.body()
            {
                tokio::spawn(play(
                    Arc::clone(&log),
                    Arc::clone(&bus),
                    event.id().to_string(),
                    received.clone(),
                    behaviour.clone(),
                ));
            }
            let _ = delivery.ack().await;
        }
    }
}
