//! `POST /v1/completions`: a text or token-id prompt, no chat template; answered whole or as SSE chunks
//! (`text_completion` objects, the finish chunk, the usage chunk when asked, `[DONE]`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::time::Instant;
use tracing::Instrument;

use crate::errors::ApiError;
use crate::generation::{Generation, Progress, submit};
use crate::logprobs::CompletionLogprobsBuilder;
use crate::observe::request_span;
use crate::openai::{Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage};
use crate::routes::parse_body;
use crate::server::{AppState, now_unix_s};
use crate::sse;
use crate::validation::{
    CompletionPlan, Endpoint, GenerateRequest, PromptInput, finish_request, validate_completion,
};

pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = request_span(&headers, "completions");
    match handle(state, body, span.clone()).instrument(span).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    span: tracing::Span,
) -> Result<Response, ApiError> {
    let deadline = Instant::now() + state.backplane.request_timeout;
    let request: CompletionRequest = parse_body(body, state.body_limit_bytes)?;
    let CompletionPlan { prompt, common } = validate_completion(request, &state.limits)?;
    let prompt_token_ids = match prompt {
        PromptInput::TokenIds(ids) => ids,
        PromptInput::Text(text) => {
            let tokenizer_state = Arc::clone(&state);
            tokio::task::spawn_blocking(move || tokenizer_state.tokenizer.encode(&text))
                .await
                .map_err(|error| {
                    ApiError::unavailable(format!("The tokenizer task failed: {error}"))
                })?
                .map_err(|error| ApiError::invalid_param("prompt", error.to_string()))?
        }
    };
    let request = finish_request(
        Endpoint::Completion,
        common,
        prompt_token_ids,
        None,
        &state.limits,
    )?;
    let mut generation = submit(&state.backplane, &request, deadline, span).await?;
    if request.stream {
        // Wait for the first tokens before answering, so a failure before any token gets its own status.
        let first = generation.next().await?;
        Ok(stream(request, generation, first))
    } else {
        whole(request, generation).await
    }
}

async fn whole(request: GenerateRequest, mut generation: Generation) -> Result<Response, ApiError> {
    let Progress {
        text,
        logprobs: token_logprobs,
        finish_reason,
        ..
    } = generation.collect().await?;
    let logprobs = request
        .sampling
        .logprobs
        .map(|_| CompletionLogprobsBuilder::default().add(&token_logprobs));
    let answer = Completion {
        id: format!("cmpl-{}", generation.request_id()),
        object: "text_completion",
        created: now_unix_s(),
        model: request.model.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs,
            finish_reason,
        }],
        usage: Some(Usage::new(
            request.prompt_tokens(),
            generation.completion_tokens(),
        )),
    };
    Ok(Json(answer).into_response())
}

fn stream(request: GenerateRequest, generation: Generation, first: Option<Progress>) -> Response {
    let completion_stream = CompletionStream {
        id: format!("cmpl-{}", generation.request_id()),
        created: now_unix_s(),
        request,
        generation,
        first,
        logprobs: CompletionLogprobsBuilder::default(),
        done: false,
    };
    let frames = futures::stream::unfold(completion_stream, |mut state| async move {
        if state.done {
            return None;
        }
        let frames = state.next_frames().await;
        Some((Ok::<_, Infallible>(Bytes::from(frames)), state))
    });
    sse::response(frames)
}

/// The state of one streamed completion. Dropped early (client gone), its `Generation` cancels the request.
struct CompletionStream {
    id: String,
    created: u64,
    request: GenerateRequest,
    generation: Generation,
    first: Option<Progress>,
    logprobs: CompletionLogprobsBuilder,
    done: bool,
}

impl CompletionStream {
    async fn next_frames(&mut self) -> Vec<u8> {
        let mut frames = Vec::new();
        let next = match self.first.take() {
            Some(first) => Ok(Some(first)),
            None => self.generation.next().await,
        };
        match next {
            Ok(Some(progress)) => self.push_progress(progress, &mut frames),
            Ok(None) => {
                frames.extend_from_slice(sse::DONE_EVENT);
                self.done = true;
            }
            Err(error) => {
                sse::push_event(&mut frames, &error.body());
                frames.extend_from_slice(sse::DONE_EVENT);
                self.done = true;
            }
        }
        frames
    }

    fn push_progress(&mut self, progress: Progress, frames: &mut Vec<u8>) {
        let logprobs = self
            .request
            .sampling
            .logprobs
            .map(|_| self.logprobs.add(&progress.logprobs))
            .filter(|logprobs| !logprobs.tokens.is_empty());
        if !progress.text.is_empty() || logprobs.is_some() {
            sse::push_event(frames, &self.chunk(progress.text, logprobs, None));
        }
        let Some(finish_reason) = progress.finish_reason else {
            return;
        };
        let usage_chunk = self.request.include_usage.then(|| Completion {
            choices: Vec::new(),
            usage: Some(Usage::new(
                self.request.prompt_tokens(),
                self.generation.completion_tokens(),
            )),
            ..self.chunk(String::new(), None, None)
        });
        sse::push_end(
            frames,
            &self.chunk(String::new(), None, Some(finish_reason)),
            usage_chunk.as_ref(),
        );
        self.done = true;
    }

    fn chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<String>,
    ) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.request.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs,
                finish_reason,
            }],
            usage: None,
        }
    }
}
