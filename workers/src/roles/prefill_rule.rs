//! The local-vs-remote prefill rule, as Dynamo has it: prefill remotely when the uncached part of the prompt is
//! longer than a threshold and the prefill queue is not too deep; otherwise prefill locally. A plain function of
//! plain data; its inputs and outcome go into the `PrefillLocal` / `PrefillQueued` event.

use tandem_events::schema::PrefillDecision;

/// The rule's two knobs (both changeable at run time by whoever owns the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillRule {
    /// Uncached prompt tokens above which a prompt goes to a prefill worker (Dynamo's default: 1000).
    pub max_local_prefill_tokens: u32,
    /// Prompts go remote only while the prefill queue holds fewer jobs than this (Dynamo's default: 2); 0 means
    /// never remote (no prefill workers).
    pub max_prefill_queue_depth: u32,
}

impl Default for PrefillRule {
    fn default() -> Self {
        PrefillRule {
            max_local_prefill_tokens: 1000,
            max_prefill_queue_depth: 2,
        }
    }
}

impl PrefillRule {
    /// Never remote: every prompt is prefilled where it is decoded.
    pub fn local_only() -> PrefillRule {
        PrefillRule {
            max_local_prefill_tokens: u32::MAX,
            max_prefill_queue_depth: 0,
        }
    }

    /// Decides for one prompt; `cached_tokens` are the prompt tokens whose KV the decode worker already holds.
    pub fn decide(
        &self,
        prompt_tokens: u32,
        cached_tokens: u32,
        prefill_queue_depth: u32,
    ) -> (bool, PrefillDecision) {
        let uncached_tokens = prompt_tokens.saturating_sub(cached_tokens);
        let remote = uncached_tokens > self.max_local_prefill_tokens
            && prefill_queue_depth < self.max_prefill_queue_depth;
        let decision = PrefillDecision {
            prompt_tokens,
            cached_tokens,
            max_local_prefill_tokens: self.max_local_prefill_tokens,
            prefill_queue_depth,
            max_prefill_queue_depth: self.max_prefill_queue_depth,
        };
        (remote, decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_uncached_prompts_go_remote_while_the_queue_is_short() {
        let rule = PrefillRule::default();
        assert!(rule.decide(1500, 0, 0).0);
        assert!(rule.decide(1500, 0, 1).0);
        assert!(!rule.decide(1500, 0, 2).0, "queue too deep: local");
        assert!(!rule.decide(1000, 0, 0).0, "at the threshold: local");
        assert!(
            !rule.decide(1500, 600, 0).0,
            "the cached prefix counts: 900 uncached is local"
        );
        let (remote, decision) = rule.decide(3000, 16, 1);
        assert!(remote);
        assert_eq!(
            decision,
            PrefillDecision {
                prompt_tokens: 3000,
                cached_tokens: 16,
                max_local_prefill_tokens: 1000,
                prefill_queue_depth: 1,
                max_prefill_queue_depth: 2,
            }
        );
    }

    #[test]
    fn local_only_never_goes_remote() {
        assert!(!PrefillRule::local_only().decide(u32::MAX, 0, 0).0);
    }
}
