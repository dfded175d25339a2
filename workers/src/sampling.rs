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
        if self.draws() {
            self.rng.next_f64();
        }
    }

    /// Whether [`Sampler::sample`] would read nothing of the logits but their argmax: greedy (temperature 0 or
    /// top-k 1) without logprobs. A step of such requests may take the tokens a GPU picked itself
    /// ([`crate::Engine::decode_greedy`]), the same argmax with ties to the lowest id, and skip the logits.
    pub fn needs_only_argmax(&self) -> bool {
        !self.draws() && self.params.logprobs.is_none()
    }

    pub fn is_stop_token(&self, token_id: u32) -> bool {
        self.params.stop_token_ids.contains(&token_id)
    }

    /// Whether a [`RowDraw`] holds all this request needs ([`Sampler::sample_from_draw`]): its top-k and its
    /// logprobs' alternatives fit in the [`DRAW_CANDIDATES`] candidates.
    pub fn fits_row_draw(&self) -> bool {
        let top_k_fits = !self.draws() || self.params.top_k <= DRAW_CANDIDATES;
        top_k_fits
            && self
                .params
                .logprobs
                .is_none_or(|alternatives| alternatives <= DRAW_CANDIDATES)
    }

    /// What the device needs to draw this request's next token: its inverse temperature and the next uniform of
    /// its random stream. The stream advances only when a token is taken ([`Sampler::sample_from_draw`],
    /// [`Sampler::sample_with_params`]), so a step that fails leaves the request's tokens as they would be.
    pub fn row_draw_params(&self) -> RowDrawParams {
        if self.draws() {
            RowDrawParams {
                inverse_temperature: 1.0 / self.params.temperature as f64,
                uniform: self.rng.clone().next_f64(),
            }
        } else {
            RowDrawParams::GREEDY
        }
    }

    /// [`Sampler::row_draw_params`] for the token after the next one: the uniform that follows, for a step queued
    /// ahead ([`crate::Engine::decode_drawn_ahead`]) while the next token is still being drawn. Right once that
    /// token is taken, which uses up one uniform.
    pub fn row_draw_params_after_next(&self) -> RowDrawParams {
        if self.draws() {
            let mut rng = self.rng.clone();
            rng.next_f64();
            RowDrawParams {
                inverse_temperature: 1.0 / self.params.temperature as f64,
                uniform: rng.next_f64(),
            }
        } else {
            RowDrawParams::GREEDY
        }
    }

    /// Whether the token [`Sampler::sample_from_draw`] takes is always the draw's own (`RowDraw::drawn_token`):
    /// greedy, or a temperature over the whole vocabulary (no top-k, no top-p). Then the device knows the token
    /// before the host does, and a step can be queued ahead on it.
    pub fn takes_drawn_token(&self) -> bool {
        !self.draws() || (self.params.top_k == 0 && self.params.top_p >= 1.0)
    }

    /// Picks the next token from what the device gave back for `params`, the same token [`Sampler::sample`]
    /// picks from the whole row. `None` when the request's top-p nucleus reaches past the candidates: then
    /// [`Sampler::sample_with_params`] takes the row's logits with the same `params`.
    pub fn sample_from_draw(
        &mut self,
        params: &RowDrawParams,
        draw: &RowDraw,
    ) -> Option<SampledToken> {
        let token_id = if !self.draws() {
            draw.candidates.first()?.0
        } else if self.params.top_k > 0 && self.params.top_k < draw.vocab_size {
            // `fits_row_draw` kept top_k within the candidates, which are top_n's order.
            let top_k = self.params.top_k.min(draw.candidates.len());
            self.candidates.clear();
            self.candidates.extend_from_slice(&draw.candidates[..top_k]);
            self.draw_from_candidates(params, None)?
        } else if self.params.top_p < 1.0 {
            self.candidates.clear();
            self.candidates.extend_from_slice(&draw.candidates);
            let whole_vocabulary = draw.candidates.len() == draw.vocab_size;
            let total = (!whole_vocabulary).then_some(draw.tempered_total);
            self.draw_from_candidates(params, total)?
        } else {
            draw.drawn_token
        };
        let logprobs = match self.params.logprobs {
            None => None,
            Some(num_top) => {
                let logit = if token_id == draw.drawn_token {
                    draw.drawn_logit
                } else {
                    draw.candidates.iter().find(|c| c.0 == token_id)?.1
                };
                Some(TokenLogprobs {
                    token_id,
                    logprob: (logit as f64 - draw.log_normalizer) as f32,
                    top: draw.candidates[..num_top.min(draw.candidates.len())]
                        .iter()
                        .map(|&(id, logit)| (id, (logit as f64 - draw.log_normalizer) as f32))
                        .collect(),
                })
            }
        };
        // The token is taken: its uniform is used up.
        self.skip_sample();
        Some(SampledToken { token_id, logprobs })
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> SampledToken {
        let params = self.row_draw_params();
        self.sample_with_params(&params, logits)
    }

    /// [`Sampler::sample`] with the uniform `params` took from [`Sampler::row_draw_params`].
    pub fn sample_with_params(&mut self, params: &RowDrawParams, logits: &[f32]) -> SampledToken {
        let token_id = if self.draws() {
            self.sample_with_temperature(params, logits)
        } else {
            argmax(logits)
        };
        self.skip_sample();
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

    /// Whether the next token is drawn at random (a temperature, and no top-k of one).
    fn draws(&self) -> bool {
        self.params.temperature > 0.0 && self.params.top_k != 1
    }

    fn sample_with_temperature(&mut self, params: &RowDrawParams, logits: &[f32]) -> u32 {
        self.candidates.clear();
        if self.params.top_k > 0 && self.params.top_k < logits.len() {
            self.candidates.extend(top_n(logits, self.params.top_k));
        } else {
            self.candidates.extend(
                logits
                    .iter()
                    .enumerate()
                    .map(|(id, &logit)| (id as u32, logit)),
            );
            if self.params.top_p < 1.0 {
                self.candidates
                    .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            }
        }
        // Every candidate is here, so the nucleus always ends within them.
        self.draw_from_candidates(params, None)
            .unwrap_or(self.candidates[0].0)
    }

    /// Draws from `self.candidates` (most likely first wherever top-p applies) at the row's temperature. The
    /// weights are taken relative to the first candidate's logit when they are sorted, as the largest logit is.
    /// `vocabulary_total` is the whole vocabulary's weight when the candidates are only its most likely part:
    /// top-p's threshold is a share of it, and `None` comes back if the candidates do not reach it.
    fn draw_from_candidates(
        &mut self,
        params: &RowDrawParams,
        vocabulary_total: Option<f64>,
    ) -> Option<u32> {
        let max_logit = self
            .candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        // Logits become unnormalized probabilities in place.
        let mut total = 0.0f64;
        for candidate in &mut self.candidates {
            let weight = row_weight(candidate.1, max_logit, params.inverse_temperature);
            candidate.1 = weight as f32;
            total += weight;
        }
        if self.params.top_p < 1.0 {
            // Candidates are sorted most likely first here; keep the shortest prefix reaching top_p.
            let threshold = self.params.top_p.max(0.0) as f64 * vocabulary_total.unwrap_or(total);
            let mut cumulative = 0.0f64;
            let mut keep = None;
            for (index, candidate) in self.candidates.iter().enumerate() {
                cumulative += candidate.1 as f64;
                if cumulative >= threshold {
                    keep = Some(index + 1);
                    break;
                }
            }
            let keep = match keep {
                Some(keep) => keep,
                None if vocabulary_total.is_none() => self.candidates.len(),
                None => return None,
            };
            self.candidates.truncate(keep.max(1));
            total = self.candidates.iter().map(|c| c.1 as f64).sum();
        }
        Some(walk_weights(
            self.candidates.iter().copied(),
            params.uniform * total,
        ))
    }
}

/// How many of a row's most likely tokens a [`RowDraw`] carries: the OpenAI API's 20 top logprobs, and the
/// top-k and top-p nuclei of most requests, fit.
pub const DRAW_CANDIDATES: usize = 64;

/// What a step that samples asks of the backend for one row ([`Sampler::row_draw_params`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowDrawParams {
    /// 1 / temperature; 0 for a row that does not draw, whose [`RowDraw::drawn_token`] is its argmax.
    pub inverse_temperature: f64,
    /// The request's next uniform in [0, 1), taken from its random stream before the step.
    pub uniform: f64,
}

impl RowDrawParams {
    /// A row that does not draw: its argmax.
    pub const GREEDY: RowDrawParams = RowDrawParams {
        inverse_temperature: 0.0,
        uniform: 0.0,
    };
}

/// What a backend gives back for one row of a step that samples: enough for [`Sampler::sample_from_draw`] to
/// pick the token [`Sampler::sample`] would pick from the whole row, in a few hundred bytes (a GPU computes it
/// where the logits are). [`RowDraw::from_logits`] computes it on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct RowDraw {
    /// The row's draw over the whole vocabulary in id order, at its temperature without top-k or top-p; the
    /// argmax for a row that does not draw.
    pub drawn_token: u32,
    pub drawn_logit: f32,
    /// Σ over the vocabulary of exp((logit − largest logit) × inverse temperature); 0 for a row that does not
    /// draw.
    pub tempered_total: f64,
    /// ln Σ exp(logit) over the vocabulary, so a token's logprob is its logit minus this.
    pub log_normalizer: f64,
    /// The [`DRAW_CANDIDATES`] largest logits as (token id, logit), largest first, lower id first on ties.
    pub candidates: Vec<(u32, f32)>,
    pub vocab_size: usize,
}

impl RowDraw {
    /// The host's reference: what a backend that samples on its device must give back for `logits`.
    pub fn from_logits(logits: &[f32], params: &RowDrawParams) -> RowDraw {
        let candidates = top_n(logits, DRAW_CANDIDATES);
        let (drawn_token, tempered_total) = if params.inverse_temperature > 0.0 {
            let max_logit = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f64 = logits
                .iter()
                .map(|&logit| row_weight(logit, max_logit, params.inverse_temperature))
                .sum();
            let weights = logits.iter().enumerate().map(|(id, &logit)| {
                let weight = row_weight(logit, max_logit, params.inverse_temperature);
                (id as u32, weight as f32)
            });
            (walk_weights(weights, params.uniform * total), total)
        } else {
            (argmax(logits), 0.0)
        };
        RowDraw {
            drawn_token,
            drawn_logit: logits
                .get(drawn_token as usize)
                .copied()
                .unwrap_or(f32::NAN),
            tempered_total,
            log_normalizer: log_sum_exp(logits),
            candidates,
            vocab_size: logits.len(),
        }
    }
}

/// A token's weight before normalizing: exp((logit − max) × inverse temperature), with the subtraction in f32.
/// The device computes it the same way, so both round it to f32 alike.
fn row_weight(logit: f32, max_logit: f32, inverse_temperature: f64) -> f64 {
    ((logit - max_logit) as f64 * inverse_temperature).exp()
}

/// The first of `weights` (token id, weight rounded to f32) whose running sum passes `target`; when rounding
/// leaves a sliver past the end, the last with any weight (the first if none has).
fn walk_weights(weights: impl Iterator<Item = (u32, f32)>, mut target: f64) -> u32 {
    let mut last_weighted = None;
    let mut first = None;
    for (id, weight) in weights {
        first.get_or_insert(id);
        target -= weight as f64;
        if target < 0.0 {
            return id;
        }
        if weight > 0.0 {
            last_weighted = Some(id);
        }
    }
    last_weighted.or(first).unwrap_or(0)
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

    /// Logits of a 1000-token vocabulary: a peaked head over a long, nearly flat tail, so that small nuclei end
    /// within the candidates and wide ones do not.
    fn peaked_logits(seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..1000)
            .map(|id| {
                let head = if id % 97 == 3 { 6.0 } else { 0.0 };
                head + rng.next_symmetric_f32()
            })
            .collect()
    }

    #[test]
    fn a_row_draw_gives_the_tokens_and_logprobs_of_the_whole_row() {
        let mut drawn_from_candidates = 0;
        let mut read_the_row = 0;
        for (case, &(temperature, top_k, top_p, logprobs)) in [
            (0.0, 0, 1.0, Some(5)),
            (1.0, 0, 1.0, None),
            (0.7, 0, 1.0, Some(20)),
            (2.0, 5, 1.0, None),
            (1.0, 64, 0.9, Some(3)),
            (1.0, 0, 0.5, None),
            (1.0, 0, 0.95, Some(1)),
            (1.5, 0, 0.999, None),
            (1.0, 1, 1.0, Some(2)),
        ]
        .iter()
        .enumerate()
        {
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                logprobs,
                seed: Some(case as u64),
                ..SamplingParams::default()
            };
            let mut whole_row = Sampler::new(params.clone());
            let mut from_draw = Sampler::new(params);
            assert!(from_draw.fits_row_draw());
            for step in 0..40 {
                let logits = peaked_logits(step);
                let expected = whole_row.sample(&logits);
                let draw_params = from_draw.row_draw_params();
                let draw = RowDraw::from_logits(&logits, &draw_params);
                let got = match from_draw.sample_from_draw(&draw_params, &draw) {
                    Some(token) => {
                        drawn_from_candidates += 1;
                        token
                    }
                    None => {
                        read_the_row += 1;
                        from_draw.sample_with_params(&draw_params, &logits)
                    }
                };
                assert_eq!(got, expected, "case {case}, step {step}");
            }
        }
        assert!(drawn_from_candidates > 0 && read_the_row > 0);
    }

    #[test]
    fn only_requests_within_the_candidates_fit_a_row_draw() {
        let fits = |top_k, logprobs| {
            Sampler::new(SamplingParams {
                temperature: 1.0,
                top_k,
                logprobs,
                ..SamplingParams::default()
            })
            .fits_row_draw()
        };
        assert!(fits(0, None));
        assert!(fits(DRAW_CANDIDATES, Some(DRAW_CANDIDATES)));
        assert!(!fits(DRAW_CANDIDATES + 1, None));
        assert!(!fits(0, Some(DRAW_CANDIDATES + 1)));
    }

    #[test]
    fn the_row_draw_walks_the_vocabulary_in_id_order() {
        // Four equally likely tokens: uniform u lands on token floor(4u).
        let logits = [0.0f32; 4];
        for (uniform, token) in [(0.0, 0), (0.24, 0), (0.26, 1), (0.6, 2), (0.99, 3)] {
            let draw = RowDraw::from_logits(
                &logits,
                &RowDrawParams {
                    inverse_temperature: 1.0,
                    uniform,
                },
            );
            assert_eq!(draw.drawn_token, token, "uniform {uniform}");
            assert_eq!(draw.tempered_total, 4.0);
            assert!((draw.log_normalizer - 4f64.ln()).abs() < 1e-12);
        }
    }
}
