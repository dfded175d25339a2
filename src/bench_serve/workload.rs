//! The synthetic workload of `tandem bench serve`: message contents of exactly `--input-len` tokens of the model's
//! tokenizer, the first `--shared-prefix-ratio` of them the same in every request (a shared system prompt or
//! document), the rest drawn per request so that nothing else is in the prefix cache.

use anyhow::{Context, Result, bail};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

/// One request's user message.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub content: String,
}

/// Tokens that are a space and a short lowercase word, and that the tokenizer gives back as that one token. The
/// byte-level pre-tokenizer splits text before every such word, so any sequence of them encodes back to itself:
/// a prompt's length in tokens is exact, in the chat template too (the template puts the content after a newline).
struct WordVocabulary {
    /// Sorted, so the same seed draws the same prompts on every machine.
    ids: Vec<u32>,
    /// Each id's text, with its leading space.
    texts: Vec<String>,
}

/// The byte-level BPE alphabet writes a leading space as this character.
const BYTE_LEVEL_SPACE: char = 'Ġ';

impl WordVocabulary {
    fn of(tokenizer: &Tokenizer) -> Result<WordVocabulary> {
        let mut words: Vec<(u32, String)> = tokenizer
            .get_vocab(false)
            .into_iter()
            .filter_map(|(token, id)| {
                let word = token.strip_prefix(BYTE_LEVEL_SPACE)?;
                let plain = (3..=8).contains(&word.len())
                    && word.bytes().all(|byte| byte.is_ascii_lowercase());
                plain.then(|| (id, format!(" {word}")))
            })
            .collect();
        words.sort_unstable();
        let mut vocabulary = WordVocabulary {
            ids: Vec::with_capacity(words.len()),
            texts: Vec::with_capacity(words.len()),
        };
        for (id, text) in words {
            let encoding = tokenizer
                .encode(text.as_str(), false)
                .map_err(|error| anyhow::anyhow!("encoding {text:?}: {error}"))?;
            if encoding.get_ids() == [id] {
                vocabulary.ids.push(id);
                vocabulary.texts.push(text);
            }
        }
        if vocabulary.ids.len() < 1000 {
            bail!(
                "the tokenizer has only {} plain word tokens (a space and a lowercase word); synthetic prompts need a \
                 byte-level BPE vocabulary such as Qwen3's",
                vocabulary.ids.len()
            );
        }
        Ok(vocabulary)
    }

    fn draw(&self, rng: &mut SmallRng, count: usize) -> Vec<usize> {
        (0..count)
            .map(|_| rng.random_range(0..self.ids.len()))
            .collect()
    }

    fn text(&self, picks: &[usize]) -> String {
        picks
            .iter()
            .map(|&pick| self.texts[pick].as_str())
            .collect()
    }
}

/// `count` prompts of `input_len` tokens each, the first `round(shared_prefix_ratio × input_len)` of them shared.
/// Each prompt's length is checked by encoding it again.
pub fn synthetic_prompts(
    tokenizer: &Tokenizer,
    count: usize,
    input_len: usize,
    shared_prefix_ratio: f64,
    seed: u64,
) -> Result<Vec<Prompt>> {
    if !(0.0..=1.0).contains(&shared_prefix_ratio) {
        bail!("--shared-prefix-ratio must be between 0 and 1 (got {shared_prefix_ratio})");
    }
    if input_len == 0 {
        bail!("--input-len must be at least 1");
    }
    let vocabulary = WordVocabulary::of(tokenizer)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let shared_len = (shared_prefix_ratio * input_len as f64).round() as usize;
    let shared = vocabulary.draw(&mut rng, shared_len);
    let mut prompts = Vec::with_capacity(count);
    for index in 0..count {
        let mut picks = shared.clone();
        picks.extend(vocabulary.draw(&mut rng, input_len - shared_len));
        let content = vocabulary.text(&picks);
        let encoded_len = tokenizer
            .encode(content.as_str(), false)
            .map_err(|error| anyhow::anyhow!("encoding synthetic prompt {index}: {error}"))?
            .len();
        if encoded_len != input_len {
            bail!("synthetic prompt {index} encodes to {encoded_len} tokens, not {input_len}");
        }
        prompts.push(Prompt { content });
    }
    Ok(prompts)
}

/// The tokenizer of `tokenizer.json` in `dir`.
pub fn load_tokenizer(dir: &std::path::Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path)
        .map_err(|error| anyhow::anyhow!("{error}"))
        .with_context(|| format!("loading the tokenizer {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen3_tokenizer() -> Tokenizer {
        load_tokenizer(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/qwen3-tokenizer"
        )))
        .expect("the shipped tokenizer loads")
    }

    #[test]
    fn prompts_have_the_exact_length_and_share_the_prefix() {
        let tokenizer = qwen3_tokenizer();
        let prompts = synthetic_prompts(&tokenizer, 4, 40, 0.5, 7).expect("prompts");
        let encoded: Vec<Vec<u32>> = prompts
            .iter()
            .map(|prompt| {
                tokenizer
                    .encode(prompt.content.as_str(), false)
                    .expect("encodes")
                    .get_ids()
                    .to_vec()
            })
            .collect();
        for ids in &encoded {
            assert_eq!(ids.len(), 40);
            assert_eq!(ids[..20], encoded[0][..20], "the shared half is the same");
        }
        assert_ne!(encoded[0][20..], encoded[1][20..], "the rest differs");
        let again = synthetic_prompts(&tokenizer, 4, 40, 0.5, 7).expect("prompts");
        assert_eq!(
            again[3].content, prompts[3].content,
            "a seed gives the same prompts"
        );
    }

    #[test]
    fn a_ratio_outside_zero_to_one_is_refused() {
        let tokenizer = qwen3_tokenizer();
        assert!(synthetic_prompts(&tokenizer, 1, 8, 1.5, 0).is_err());
    }
}
