//! `tandem bench serve` against an OpenAI-compatible server: streaming chat completions as `vllm bench serve
//! --backend openai-chat` sends them (`max_completion_tokens`, `stream_options.include_usage`, `ignore_eos`), timed
//! at each server-sent event that carries choices.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::{RequestOutcome, Sampling};

/// Where requests go and how they are sent.
pub struct HttpTarget {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    model: String,
    /// `Authorization: Bearer` for servers that ask for one (`OPENAI_API_KEY`, as vLLM's client reads it).
    api_key: Option<String>,
}

impl HttpTarget {
    pub fn new(base_url: &str, endpoint: &str, model: &str) -> Result<HttpTarget> {
        let url = format!("{}{}", base_url.trim_end_matches('/'), endpoint);
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--base-url and --endpoint make {url:?}, not a URL"))?;
        if uri.scheme_str() != Some("http") {
            bail!(
                "{url}: only plain http:// is supported (the load generator keeps no TLS stack; put it beside the \
                 server, or behind a TLS-terminating proxy)"
            );
        }
        if !endpoint.ends_with("chat/completions") {
            bail!(
                "--endpoint {endpoint}: the load generator speaks the chat completions API (/v1/chat/completions)"
            );
        }
        let mut connector = HttpConnector::new();
        // Small request writes must leave at once: Nagle's algorithm would add its delay to the measured latency.
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(HttpTarget {
            client,
            uri,
            model: model.to_string(),
            api_key: std::env::var("OPENAI_API_KEY")
                .ok()
                .filter(|key| !key.is_empty()),
        })
    }

    pub fn describe(&self) -> String {
        self.uri.to_string()
    }

    fn body(&self, content: &str, sampling: &Sampling) -> Value {
        json!({
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_completion_tokens": sampling.output_len,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "ignore_eos": sampling.ignore_eos,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    }

    /// One streamed request, timed from just before it is sent.
    pub async fn send(&self, content: &str, sampling: &Sampling) -> RequestOutcome {
        let body = Bytes::from(self.body(content, sampling).to_string());
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json");
        if let Some(key) = &self.api_key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = match request.body(Full::new(body)) {
            Ok(request) => request,
            Err(error) => return RequestOutcome::failed(format!("building the request: {error}")),
        };
        let started = Instant::now();
        match self.stream(request, started).await {
            Ok(outcome) => outcome,
            Err(error) => RequestOutcome::failed(format!("{error:#}")),
        }
    }

    async fn stream(
        &self,
        request: Request<Full<Bytes>>,
        started: Instant,
    ) -> Result<RequestOutcome> {
        let response = self
            .client
            .request(request)
            .await
            .with_context(|| format!("POST {} (is the server running?)", self.uri))?;
        let status = response.status();
        let mut body = response.into_body();
        if status != StatusCode::OK {
            let text = body
                .collect()
                .await
                .map(|collected| String::from_utf8_lossy(&collected.to_bytes()).into_owned())
                .unwrap_or_default();
            bail!(
                "HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            );
        }
        let mut events = SseEvents::default();
        let mut timing = StreamTiming::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading the event stream")?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let arrived_ms = started.elapsed().as_secs_f64() * 1000.0;
            let mut carried_choices = false;
            for event in events.push(&data) {
                match event {
                    SseData::Done => timing.done = true,
                    SseData::Json(value) => {
                        if let Some(error) = value.get("error") {
                            bail!("error event: {error}");
                        }
                        if value
                            .get("choices")
                            .and_then(Value::as_array)
                            .is_some_and(|choices| !choices.is_empty())
                        {
                            carried_choices = true;
                        }
                        if let Some(usage) = value.get("usage").filter(|usage| usage.is_object()) {
                            timing.prompt_tokens = usage["prompt_tokens"].as_u64();
                            timing.completion_tokens = usage["completion_tokens"].as_u64();
                        }
                    }
                }
            }
            if carried_choices {
                timing.chunk_arrivals_ms.push(arrived_ms);
            }
        }
        let e2e_ms = started.elapsed().as_secs_f64() * 1000.0;
        if !timing.done {
            bail!("the event stream ended without [DONE]");
        }
        let (Some(prompt_tokens), Some(output_tokens)) =
            (timing.prompt_tokens, timing.completion_tokens)
        else {
            bail!("no usage chunk (stream_options.include_usage was asked for)");
        };
        let Some(&ttft_ms) = timing.chunk_arrivals_ms.first() else {
            bail!("no chunk carried choices");
        };
        Ok(RequestOutcome::finished(
            ttft_ms,
            e2e_ms,
            &timing.chunk_arrivals_ms,
            prompt_tokens,
            output_tokens,
        ))
    }
}

#[derive(Default)]
struct StreamTiming {
    /// When each network read that carried at least one chunk with choices arrived (one read may carry several
    /// chunks: a server flushing the role chunk with the first token is one arrival, as the client sees it).
    chunk_arrivals_ms: Vec<f64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    done: bool,
}

enum SseData {
    Json(Value),
    Done,
}

/// Splits a server-sent event stream into its `data:` payloads, whatever the network cut.
#[derive(Default)]
struct SseEvents {
    pending: Vec<u8>,
}

impl SseEvents {
    fn push(&mut self, bytes: &[u8]) -> Vec<SseData> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.pending.windows(2).position(|pair| pair == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            for line in event.split(|&byte| byte == b'\n') {
                let Some(payload) = line.strip_prefix(b"data:") else {
                    continue; // comments (":" pings), `event:` and `id:` lines
                };
                let payload = payload.trim_ascii();
                if payload == b"[DONE]" {
                    out.push(SseData::Done);
                } else if let Ok(value) = serde_json::from_slice(payload) {
                    out.push(SseData::Json(value));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_come_out_whole() {
        let mut events = SseEvents::default();
        assert!(events.push(b"data: {\"choices\":[{\"del").is_empty());
        let out = events.push(b"ta\":{}}]}\n\n: ping\n\ndata: [DONE]\n\n");
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0], SseData::Json(value) if value["choices"].is_array()));
        assert!(matches!(out[1], SseData::Done));
    }

    #[test]
    fn only_plain_http_chat_urls_are_taken() {
        assert!(HttpTarget::new("https://example.com", "/v1/chat/completions", "m").is_err());
        assert!(HttpTarget::new("http://127.0.0.1:8000", "/v1/completions", "m").is_err());
    }
}
