//! Choosing the next token from logits: greedy, temperature, top-k, top-p, a per-request seed (same seed,
//! same tokens), stop token ids, and logprobs with top alternatives.

use std::hash::{BuildHasher, Hasher};

use crate::rng::SplitMix64;

/// How one request samples. The default is greedy, 16 tokens, no logprobs.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 means no limit.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 means no limit.
    pub top_p: f32,
    /// The same seed gives the same tokens for the same logits; `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Generation stops after emitting any of these (the stop token is included in the output).
    pub stop_token_ids: Vec<u32>,
    /// Report the sampled token's logprob and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            stop_token_ids: Vec::new(),
            logprobs: None,
        }
    }
}

/// Log-probabilities under the model's distribution (before temperature, top-k and top-p).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    /// The most likely tokens, most likely first, as (token id, logprob).
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SampledToken {
    pub token_id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// A request's sampling state: its parameters and its random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// (token id, logit) candidates, reused between steps.
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            hasher.finish()
        });
        Self {
            params,
            rng: SplitMix64::new(seed),
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Accounts for a token sampled elsewhere with the same parameters and seed (the first token a prefill worker
    /// sampled): advances the random stream as [`Sampler::sample`] would have, so the tokens after it match a run
    /// where this sampler drew all of them.
    pub fn skip_sample(&mut self) {
        if self.params.temperature > 0.0 && self.params.top_k != 1 {
            self.rng.next_f64();
        }
    }

    /// Whether [`Sampler::sample`] would read nothing of the logits but their argmax: greedy (temperature 0 or
    /// top-k 1) without logprobs. A step of such requests may take the tokens a GPU picked itself
    /// ([`crate::Engine::decode_greedy`]), the same argmax with ties to the lowest id, and skip the logits.
    pub fn needs_only_argmax(&self) -> bool {
        (self.params.temperature <= 0.0 || self.params.top_k == 1) && self.params.logprobs.is_none()
    }

    pub fn is_stop_token(&self, token_id: u32) -> bool {
        self.params.stop_token_ids.contains(&token_id)
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> SampledToken {
        let token_id = if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            argmax(logits)
        } else {
            self.sample_with_temperature(logits)
        };
        let logprobs = self.params.logprobs.map(|num_top| {
            let log_normalizer = log_sum_exp(logits);
            TokenLogprobs {
                token_id,
                logprob: (logits[token_id as usize] as f64 - log_normalizer) as f32,
                top: top_n(logits, num_top)
                    .into_iter()
                    .map(|(id, logit)| (id, (logit as f64 - log_normalizer) as f32))
                    .collect(),
            }
        });
        SampledToken { token_id, logprobs }
    }

    fn sample_with_temperature(&mut self, logits: &[f32]) -> u32 {
        let params = &self.params;
        self.candidates.clear();
        if params.top_k > 0 && params.top_k < logits.len() {
            self.candidates.extend(top_n(logits, params.top_k));
        } else {
            self.candidates.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(id, &logit)| (id as u32, logit)),
            );
            if params.top_p < 1.0 {
                self.candidates
                    .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            }
        }
        let max_logit = self
            .candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let inverse_temperature = 1.0 / params.temperature as f64;
        // Logits become unnormalized probabilities in place.
        let mut total = 0.0f64;
        for candidate in &mut self.candidates {
            let weight = ((candidate.1 - max_logit) as f64 * inverse_temperature).exp();
            candidate.1 = weight as f32;
            total += weight;
        }
        if params.top_p < 1.0 {
            // Candidates are sorted most likely first here; keep the shortest prefix reaching top_p.
            let threshold = params.top_p.max(0.0) as f64 * total;
            let mut cumulative = 0.0f64;
            let mut keep = self.candidates.len();
            for (index, candidate) in self.candidates.iter().enumerate() {
                cumulative += candidate.1 as f64;
                if cumulative >= threshold {
                    keep = index + 1;
                    break;
                }
            }
            self.candidates.truncate(keep.max(1));
            total = self.candidates.iter().map(|c| c.1 as f64).sum();
        }
        let mut target = self.rng.next_f64() * total;
        for &(id, weight) in &self.candidates {
            target -= weight as f64;
            if target < 0.0 {
                return id;
            }
        }
        // Rounding left a sliver: the last candidate with any weight takes it.
        self.candidates
            .iter()
            .rev()
            .find(|c| c.1 > 0.0)
            .map_or(self.candidates[0].0, |c| c.0)
    }
}

/// The index of the largest logit (the first one on ties).
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (index, &logit) in logits.iter().enumerate() {
        if logit > logits[best] {
            best = index;
        }
    }
    best as u32
}

fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The `n` largest logits as (id, logit), largest first (lower id first on ties).
fn top_n(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    // `n` comes from the request's event on the log: reserve for what the logits can fill, never for `n` itself.
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n.min(logits.len()) + 1);
    if n == 0 {
        return top;
    }
    for (id, &logit) in logits.iter().enumerate() {
        if top.len() == n && logit <= top[n - 1].1 {
            continue;
        }
        let at = top.partition_point(|&(_, l)| l >= logit);
        top.insert(at, (id as u32, logit));
        top.truncate(n);
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_asked_for_more_than_the_vocabulary_reserves_only_the_vocabulary() {
        // A `logprobs` of u32::MAX on a (hostile or corrupt) event must not reserve 32 GiB.
        let logits = logits();
        let top = top_n(&logits, u32::MAX as usize);
        assert_eq!(top.len(), logits.len());
        assert!(top.capacity() <= logits.len() + 1);
        assert!(top.windows(2).all(|pair| pair[0].1 >= pair[1].1));
    }

    fn logits() -> Vec<f32> {
        (0..50).map(|i| ((i * 37) % 50) as f32 * 0.1).collect()
    }

    fn ranked(logits: &[f32]) -> Vec<u32> {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        ids
    }

    fn draw(params: SamplingParams, logits: &[f32], count: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(params);
        (0..count)
            .map(|_| sampler.sample(logits).token_id)
            .collect()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let logits = logits();
        let best = ranked(&logits)[0];
        assert!(
            draw(SamplingParams::default(), &logits, 5)
                .iter()
                .all(|&t| t == best)
        );
    }

    #[test]
    fn same_seed_same_tokens_and_different_seeds_differ() {
        let logits = logits();
        let params = |seed| SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        assert_eq!(draw(params(7), &logits, 64), draw(params(7), &logits, 64));
        assert_ne!(draw(params(7), &logits, 64), draw(params(8), &logits, 64));
    }

    #[test]
    fn top_k_restricts_the_support_to_the_k_most_likely() {
        let logits = logits();
        let allowed = &ranked(&logits)[..3];
        let tokens = draw(
            SamplingParams {
                temperature: 5.0,
                top_k: 3,
                seed: Some(1),
                ..SamplingParams::default()
            },
            &logits,
            500,
        );
        assert!(tokens.iter().all(|t| allowed.contains(t)));
        for token in allowed {
            assert!(
                tokens.contains(token),
                "a high temperature should reach all of the top 3"
            );
        }
    }

    #[test]
    fn top_p_restricts_the_support_to_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.1, 0.1: top_p 0.75 keeps exactly the first two.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.1, 0.1].iter().map(|p| p.ln()).collect();
        let tokens = draw(
            SamplingParams {
                temperature: 1.0,
                top_p: 0.75,
                seed: Some(3),
                ..SamplingParams::default()
            },
            &logits,
            400,
        );
        assert!(tokens.iter().all(|&t| t == 0 || t == 1));
        let zeros = tokens.iter().filter(|&&t| t == 0).count();
        // 0.5 / 0.8 = 62.5% of draws expected on token 0.
        assert!((200..300).contains(&zeros), "{zeros} of 400");
    }

    #[test]
    fn logprobs_are_normalized_and_ranked() {
        let logits = logits();
        let mut sampler = Sampler::new(SamplingParams {
            logprobs: Some(4),
            ..SamplingParams::default()
        });
        let sampled = sampler.sample(&logits);
        let logprobs = sampled.logprobs.unwrap();
        assert_eq!(logprobs.top.len(), 4);
        assert_eq!(logprobs.top[0].0, sampled.token_id);
        assert_eq!(logprobs.top[0].1, logprobs.logprob);
        assert!(logprobs.top.windows(2).all(|w| w[0].1 >= w[1].1));
        let total: f64 = logits
            .iter()
            .map(|&l| ((l as f64) - log_sum_exp(&logits)).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert_eq!(
            top_n(&[1.0, 3.0, 2.0, 3.0], 3),
            vec![(1, 3.0), (3, 3.0), (2, 2.0)]
        );
    }
}
