//! `POST /v1/chat/completions`: validate, render the chat template, tokenize, submit, then answer whole or as
//! SSE chunks (role first, then reasoning/content deltas, the finish chunk, the usage chunk when asked, `[DONE]`).

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
use crate::logprobs::chat_logprobs;
use crate::observe::request_span;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, Usage,
};
use crate::reasoning::{ReasoningSplitter, ReasoningStart, SplitText, split_whole};
use crate::routes::parse_body;
use crate::server::{AppState, now_unix_s};
use crate::sse;
use crate::template::RenderOptions;
use crate::validation::{ChatPlan, Endpoint, GenerateRequest, finish_request, validate_chat};

pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = request_span(&headers, "chat");
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
    let request: ChatCompletionRequest = parse_body(body, state.body_limit_bytes)?;
    let ChatPlan {
        messages,
        tools,
        enable_thinking,
        common,
    } = validate_chat(request, &state.limits)?;
    // Rendering and tokenizing a long prompt takes milliseconds of CPU: keep it off the async workers.
    let render_state = Arc::clone(&state);
    let (prompt, prompt_token_ids) = tokio::task::spawn_blocking(move || {
        let options = RenderOptions {
            add_generation_prompt: true,
            enable_thinking,
            tools,
        };
        let prompt = render_state
            .template
            .render(&messages, &options)
            .map_err(|error| ApiError::invalid_param("messages", error.to_string()))?;
        let ids = render_state
            .tokenizer
            .encode(&prompt)
            .map_err(|error| ApiError::invalid_param("messages", error.to_string()))?;
        Ok::<_, ApiError>((prompt, ids))
    })
    .await
    .map_err(|error| ApiError::unavailable(format!("The tokenizer task failed: {error}")))??;
    let reasoning = enable_thinking.then(|| ReasoningStart::for_prompt(&prompt));
    let request = finish_request(
        Endpoint::Chat,
        common,
        prompt_token_ids,
        reasoning,
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
        logprobs,
        finish_reason,
        ..
    } = generation.collect().await?;
    let (reasoning_content, content) = match request.reasoning {
        Some(start) => split_whole(start, &text),
        None => (None, text),
    };
    let answer = ChatCompletion {
        id: format!("chatcmpl-{}", generation.request_id()),
        object: "chat.completion",
        created: now_unix_s(),
        model: request.model.clone(),
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content,
                reasoning_content,
            },
            logprobs: request.sampling.logprobs.map(|_| chat_logprobs(&logprobs)),
            finish_reason,
        }],
        usage: Usage::new(request.prompt_tokens(), generation.completion_tokens()),
    };
    Ok(Json(answer).into_response())
}

fn stream(request: GenerateRequest, generation: Generation, first: Option<Progress>) -> Response {
    let chat_stream = ChatStream {
        id: format!("chatcmpl-{}", generation.request_id()),
        created: now_unix_s(),
        splitter: request.reasoning.map(ReasoningSplitter::new),
        request,
        generation,
        first,
        done: false,
    };
    let frames = futures::stream::unfold(chat_stream, |mut chat_stream| async move {
        if chat_stream.done {
            // Dropping the state here drops the finished generation (its cancel guard is disarmed).
            return None;
        }
        let frames = chat_stream.next_frames().await;
        Some((Ok::<_, Infallible>(Bytes::from(frames)), chat_stream))
    });
    sse::response(frames)
}

/// The state of one streamed chat answer. Dropped early (client gone), its `Generation` cancels the request.
struct ChatStream {
    id: String,
    created: u64,
    request: GenerateRequest,
    generation: Generation,
    splitter: Option<ReasoningSplitter>,
    /// Progress read before the headers went out; sent after the role chunk.
    first: Option<Progress>,
    done: bool,
}

impl ChatStream {
    async fn next_frames(&mut self) -> Vec<u8> {
        let mut frames = Vec::new();
        if let Some(first) = self.first.take() {
            let role = ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
                reasoning_content: None,
            };
            sse::push_event(&mut frames, &self.chunk(role, None, None));
            self.push_progress(first, &mut frames);
            return frames;
        }
        match self.generation.next().await {
            Ok(Some(progress)) => self.push_progress(progress, &mut frames),
            Ok(None) => {
                frames.extend_from_slice(sse::DONE_EVENT);
                self.done = true;
            }
            Err(error) => {
                // The headers went out with 200: the error travels as an event, as OpenAI's API does.
                sse::push_event(&mut frames, &error.body());
                frames.extend_from_slice(sse::DONE_EVENT);
                self.done = true;
            }
        }
        frames
    }

    fn push_progress(&mut self, progress: Progress, frames: &mut Vec<u8>) {
        let split = match &mut self.splitter {
            Some(splitter) => splitter.push(&progress.text),
            None => SplitText {
                reasoning: String::new(),
                content: progress.text,
            },
        };
        let mut logprobs = self
            .request
            .sampling
            .logprobs
            .map(|_| chat_logprobs(&progress.logprobs))
            .filter(|logprobs| !logprobs.content.is_empty());
        self.push_split(split, &mut logprobs, frames);
        if let Some(logprobs) = logprobs {
            // Tokens whose text is still held back (a partial character or tag): their logprobs go now.
            let delta = ChatDelta {
                content: Some(String::new()),
                ..ChatDelta::default()
            };
            sse::push_event(frames, &self.chunk(delta, Some(logprobs), None));
        }
        let Some(finish_reason) = progress.finish_reason else {
            return;
        };
        if let Some(rest) = self.splitter.as_mut().map(ReasoningSplitter::finish) {
            self.push_split(rest, &mut None, frames);
        }
        let usage_chunk = self.request.include_usage.then(|| ChatCompletionChunk {
            choices: Vec::new(),
            usage: Some(Usage::new(
                self.request.prompt_tokens(),
                self.generation.completion_tokens(),
            )),
            ..self.chunk(ChatDelta::default(), None, None)
        });
        sse::push_end(
            frames,
            &self.chunk(ChatDelta::default(), None, Some(finish_reason)),
            usage_chunk.as_ref(),
        );
        self.done = true;
    }

    fn push_split(
        &self,
        split: SplitText,
        logprobs: &mut Option<ChatLogprobs>,
        frames: &mut Vec<u8>,
    ) {
        if !split.reasoning.is_empty() {
            let delta = ChatDelta {
                reasoning_content: Some(split.reasoning),
                ..ChatDelta::default()
            };
            sse::push_event(frames, &self.chunk(delta, logprobs.take(), None));
        }
        if !split.content.is_empty() {
            let delta = ChatDelta {
                content: Some(split.content),
                ..ChatDelta::default()
            };
            sse::push_event(frames, &self.chunk(delta, logprobs.take(), None));
        }
    }

    fn chunk(
        &self,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<String>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.request.model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: None,
        }
    }
}
