//! `replay rerun ID`: what a logged request asked for (prompt ids and sampling parameters from `Received`) and
//! what it produced (the tokens of its accepted `TokensDecoded` checkpoints), and the comparison with the tokens a
//! re-execution produced. The re-execution itself is the engine's, driven by the `tandem` binary: this crate does
//! not depend on the engine (ARCHITECTURE.md says why).

use serde::Serialize;
use tandem_events::lifecycle::{self, RequestLifecycle};
use tandem_events::log::LogMessage;
use tandem_events::schema::{Body, SamplingParams};

use crate::ReplayError;

/// A logged request, ready to be executed again.
#[derive(Debug, Clone, PartialEq)]
pub struct RerunPlan {
    pub request_id: String,
    /// The model name the client asked for.
    pub model: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// The generated tokens as the checkpoints logged them, index by index (a migration's new worker continues at
    /// the index it was given, overwriting nothing it did not redo).
    pub logged_token_ids: Vec<u32>,
    /// `Completed`'s finish reason, when the request completed.
    pub finish_reason: Option<String>,
    /// The request's state at the end of the log.
    pub state: String,
}

impl RerunPlan {
    /// Builds the plan from the request's messages (as `timeline::read_request` returns them).
    pub fn from_messages(
        request_id: &str,
        messages: &[LogMessage],
    ) -> Result<RerunPlan, ReplayError> {
        let not_rerunnable = |reason: String| ReplayError::NotRerunnable {
            request_id: request_id.to_string(),
            reason,
        };
        let mut lifecycle = RequestLifecycle::default();
        let mut received = None;
        let mut logged = Vec::new();
        let mut finish_reason = None;
        for message in messages {
            // A payload that does not decode is for `audit` to report; the rerun uses what the lifecycle accepted.
            let Ok(event) = message.event() else { continue };
            if event.id() != request_id {
                continue;
            }
            if !matches!(
                lifecycle.apply(event.body()),
                Ok(lifecycle::Applied::Advanced(_))
            ) {
                continue;
            }
            match event.body() {
                Body::Received(body) => received = Some(body.clone()),
                Body::TokensDecoded(checkpoint) => {
                    logged.truncate(checkpoint.start_index as usize);
                    logged.extend_from_slice(&checkpoint.token_ids);
                }
                Body::Completed(completed) => finish_reason = Some(completed.finish_reason.clone()),
                _ => {}
            }
        }
        let received = received.ok_or_else(|| ReplayError::RequestNotFound {
            request_id: request_id.to_string(),
            hint: " (no Received event for it was read)".into(),
        })?;
        if received.prompt_token_ids.is_empty() {
            let kept = if received.prompt_sha256.is_empty() {
                "only the prompt's length"
            } else {
                "only the prompt's SHA-256 and length"
            };
            return Err(not_rerunnable(format!(
                "the log is redacted (the gateway ran with --log-prompts hash or none): Received holds {kept} ({} tokens), not the token ids a rerun feeds the model; `timeline` and `stats` still work, and a rerun needs a log written with --log-prompts full",
                received.prompt_tokens
            )));
        }
        let sampling = received
            .sampling
            .ok_or_else(|| not_rerunnable("Received carries no sampling parameters".into()))?;
        if logged.is_empty() {
            return Err(not_rerunnable(format!(
                "no generated tokens were checkpointed (state {:?}): there is nothing to compare",
                lifecycle.state()
            )));
        }
        Ok(RerunPlan {
            request_id: request_id.to_string(),
            model: received.model,
            prompt_token_ids: received.prompt_token_ids,
            sampling,
            logged_token_ids: logged,
            finish_reason,
            state: format!("{:?}", lifecycle.state()),
        })
    }

    /// Same parameters, same tokens: greedy, or sampled with a seed.
    pub fn is_deterministic(&self) -> bool {
        self.sampling.temperature == 0.0 || self.sampling.seed.is_some()
    }

    /// Tokens to generate again: as many as were logged. Stop strings are matched on text by the decode worker,
    /// which the engine does not see, so the rerun stops where the log does.
    pub fn tokens_to_generate(&self) -> usize {
        self.logged_token_ids.len()
    }
}

/// The first index where the rerun and the log disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Divergence {
    pub index: usize,
    pub logged: Option<u32>,
    pub produced: Option<u32>,
}

/// The rerun's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RerunComparison {
    pub request_id: String,
    /// What ran it (`cpu`, with the model).
    pub executed_on: String,
    pub prompt_tokens: usize,
    pub logged_tokens: usize,
    pub produced_tokens: usize,
    pub matching_prefix: usize,
    pub identical: bool,
    pub deterministic: bool,
    pub divergence: Option<Divergence>,
    pub logged_finish_reason: Option<String>,
}

impl RerunComparison {
    pub fn compare(plan: &RerunPlan, produced: &[u32], executed_on: &str) -> RerunComparison {
        let logged = &plan.logged_token_ids;
        let matching_prefix = logged
            .iter()
            .zip(produced)
            .take_while(|(a, b)| a == b)
            .count();
        let identical = logged.as_slice() == produced;
        let divergence = (!identical).then(|| Divergence {
            index: matching_prefix,
            logged: logged.get(matching_prefix).copied(),
            produced: produced.get(matching_prefix).copied(),
        });
        RerunComparison {
            request_id: plan.request_id.clone(),
            executed_on: executed_on.to_string(),
            prompt_tokens: plan.prompt_token_ids.len(),
            logged_tokens: logged.len(),
            produced_tokens: produced.len(),
            matching_prefix,
            identical,
            deterministic: plan.is_deterministic(),
            divergence,
            logged_finish_reason: plan.finish_reason.clone(),
        }
    }

    pub fn render_text(&self) -> String {
        let mut out = format!(
            "rerun of {} on {}: {} prompt tokens, {} tokens logged, {} produced\n",
            self.request_id,
            self.executed_on,
            self.prompt_tokens,
            self.logged_tokens,
            self.produced_tokens
        );
        if self.identical {
            out.push_str("IDENTICAL: the re-execution reproduces every logged token\n");
            return out;
        }
        let show =
            |token: Option<u32>| token.map_or_else(|| "(none)".to_string(), |t| t.to_string());
        if let Some(divergence) = &self.divergence {
            out.push_str(&format!(
                "DIFFERENT: the first {} tokens match; at index {} the log has {} and the rerun {}\n",
                self.matching_prefix,
                divergence.index,
                show(divergence.logged),
                show(divergence.produced)
            ));
        }
        if !self.deterministic {
            out.push_str(
                "note: the request sampled with a temperature and no seed, so its tokens are not reproducible\n",
            );
        }
        out
    }
}
