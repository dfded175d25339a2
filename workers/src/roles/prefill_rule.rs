//! The local-vs-remote prefill rule, as Dynamo has it: prefill remotely when the uncached part of the prompt is
//! longer than a threshold and the prefill queue is not too deep; otherwise prefill locally. A plain function of
//! plain data; its inputs and outcome go into the `PrefillLocal` / `PrefillQueued` event.

use std::sync::atomic::{AtomicU32, Ordering};

use tandem_events::schema::PrefillDecision;

/// Settings-bucket key of [`PrefillRule::max_local_prefill_tokens`].
pub const MAX_LOCAL_PREFILL_TOKENS_KEY: &str = "max_local_prefill_tokens";
/// Settings-bucket key of [`PrefillRule::max_prefill_queue_depth`].
pub const MAX_PREFILL_QUEUE_DEPTH_KEY: &str = "max_prefill_queue_depth";

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

/// A rule that can change while the worker runs (from the settings bucket); read at every decision.
#[derive(Debug)]
pub struct SharedPrefillRule {
    max_local_prefill_tokens: AtomicU32,
    max_prefill_queue_depth: AtomicU32,
}

impl SharedPrefillRule {
    pub fn new(rule: PrefillRule) -> SharedPrefillRule {
        SharedPrefillRule {
            max_local_prefill_tokens: AtomicU32::new(rule.max_local_prefill_tokens),
            max_prefill_queue_depth: AtomicU32::new(rule.max_prefill_queue_depth),
        }
    }

    pub fn get(&self) -> PrefillRule {
        PrefillRule {
            max_local_prefill_tokens: self.max_local_prefill_tokens.load(Ordering::Relaxed),
            max_prefill_queue_depth: self.max_prefill_queue_depth.load(Ordering::Relaxed),
        }
    }

    /// Applies one setting (`key` = decimal value); returns whether it was a rule setting with a valid value.
    pub fn apply_setting(&self, key: &str, value: &[u8]) -> bool {
        let Some(value) = std::str::from_utf8(value)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        else {
            return false;
        };
        let target = match key {
            MAX_LOCAL_PREFILL_TOKENS_KEY => &self.max_local_prefill_tokens,
            MAX_PREFILL_QUEUE_DEPTH_KEY => &self.max_prefill_queue_depth,
            _ => return false,
        };
        target.store(value, Ordering::Relaxed);
        true
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
    fn settings_change_the_shared_rule() {
        let shared = SharedPrefillRule::new(PrefillRule::default());
        assert!(shared.apply_setting(MAX_LOCAL_PREFILL_TOKENS_KEY, b"2000"));
        assert!(shared.apply_setting(MAX_PREFILL_QUEUE_DEPTH_KEY, b" 5\n"));
        assert!(!shared.apply_setting(MAX_PREFILL_QUEUE_DEPTH_KEY, b"many"));
        assert!(!shared.apply_setting("unknown", b"1"));
        assert_eq!(
            shared.get(),
            PrefillRule {
                max_local_prefill_tokens: 2000,
                max_prefill_queue_depth: 5
            }
        );
        assert!(!shared.get().decide(1500, 0, 0).0);
    }

    #[test]
    fn local_only_never_goes_remote() {
        assert!(!PrefillRule::local_only().decide(u32::MAX, 0, 0).0);
    }
}
