//! Incremental detokenization for streaming: turns generated token ids into text deltas that never end inside a
//! multi-byte character (a byte-level BPE token can hold half of one; its text waits for the next token).

use tokenizers::Tokenizer;

/// The text state of one generated sequence.
#[derive(Debug, Default)]
pub struct IncrementalDetokenizer {
    token_ids: Vec<u32>,
    /// Start of the window decoded together, so merges across token boundaries come out right.
    prefix_offset: usize,
    /// Tokens before this are already turned into text.
    read_offset: usize,
}

/// U+FFFD: what the tokenizer's byte-level decoder yields for an incomplete UTF-8 sequence.
const REPLACEMENT: char = '\u{FFFD}';

impl IncrementalDetokenizer {
    /// Adds one token; returns the text it completes (possibly empty, when it ends mid-character or is a special
    /// token that is not shown).
    pub fn push(
        &mut self,
        tokenizer: &Tokenizer,
        token_id: u32,
    ) -> Result<String, tokenizers::Error> {
        self.token_ids.push(token_id);
        let before =
            tokenizer.decode(&self.token_ids[self.prefix_offset..self.read_offset], true)?;
        let after = tokenizer.decode(&self.token_ids[self.prefix_offset..], true)?;
        if after.len() <= before.len() || after.ends_with(REPLACEMENT) {
            return Ok(String::new());
        }
        // The window's text normally extends the earlier text; when a merge changed it, emit from the first
        // character boundary after the old length rather than panicking on a split character.
        let mut start = before.len();
        while !after.is_char_boundary(start) {
            start += 1;
        }
        let delta = after[start..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.token_ids.len();
        Ok(delta)
    }
}
