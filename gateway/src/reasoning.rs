//! Splitting a thinking model's output into reasoning and answer: Qwen3 writes `<think>…</think>` before its
//! answer. The text before `</think>` is `reasoning_content`, the rest `content`. Incremental, so streamed deltas
//! are routed as they come; a tag split across deltas is held back until it is whole.

const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

/// Where the output begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningStart {
    /// The output may open with `<think>`; if it does not, it is all answer.
    MayOpenWithThinkTag,
    /// The prompt already ends with `<think>\n` (the template opened the block): the output starts as reasoning.
    InsideThinking,
}

impl ReasoningStart {
    /// Decides from the rendered prompt.
    pub fn for_prompt(prompt: &str) -> ReasoningStart {
        if prompt.trim_end_matches('\n').ends_with(THINK_START) {
            ReasoningStart::InsideThinking
        } else {
            ReasoningStart::MayOpenWithThinkTag
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingThinkTag,
    Thinking { started: bool },
    Answering { started: bool },
}

/// Text routed to each field by one step of the splitter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitText {
    pub reasoning: String,
    pub content: String,
}

/// The incremental splitter of one output.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    phase: Phase,
    /// Text not routed yet: it could still be (the start of) a tag.
    held: String,
    thinking_seen: bool,
}

impl ReasoningSplitter {
    pub fn new(start: ReasoningStart) -> ReasoningSplitter {
        let phase = match start {
            ReasoningStart::MayOpenWithThinkTag => Phase::AwaitingThinkTag,
            ReasoningStart::InsideThinking => Phase::Thinking { started: false },
        };
        ReasoningSplitter {
            phase,
            held: String::new(),
            thinking_seen: start == ReasoningStart::InsideThinking,
        }
    }

    /// Routes the next piece of output.
    pub fn push(&mut self, text: &str) -> SplitText {
        self.held.push_str(text);
        let mut out = SplitText::default();
        loop {
            match self.phase {
                Phase::AwaitingThinkTag => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(THINK_START) {
                        self.held = rest.to_string();
                        self.phase = Phase::Thinking { started: false };
                        self.thinking_seen = true;
                    } else if THINK_START.starts_with(trimmed) {
                        return out; // still could be `<think>`
                    } else {
                        self.phase = Phase::Answering { started: false };
                    }
                }
                Phase::Thinking { started } => {
                    let text = if started {
                        std::mem::take(&mut self.held)
                    } else {
                        // The model writes `<think>\n`: the newline is layout, not reasoning.
                        let trimmed = self.held.trim_start_matches('\n').to_string();
                        self.held.clear();
                        trimmed
                    };
                    if let Some(position) = text.find(THINK_END) {
                        out.reasoning.push_str(&text[..position]);
                        self.held = text[position + THINK_END.len()..].to_string();
                        self.phase = Phase::Answering { started: false };
                        continue;
                    }
                    let keep = partial_tag_suffix_len(&text, THINK_END);
                    let (emit, hold) = text.split_at(text.len() - keep);
                    out.reasoning.push_str(emit);
                    self.held = hold.to_string();
                    if !emit.is_empty() || started {
                        self.phase = Phase::Thinking { started: true };
                    }
                    return out;
                }
                Phase::Answering { started } => {
                    let text = std::mem::take(&mut self.held);
                    let text = if started {
                        text
                    } else {
                        // `</think>\n\n` separates reasoning from the answer.
                        text.trim_start_matches('\n').to_string()
                    };
                    if !text.is_empty() {
                        self.phase = Phase::Answering { started: true };
                    }
                    out.content.push_str(&text);
                    return out;
                }
            }
        }
    }

    /// Routes whatever was held back when the output ended.
    pub fn finish(&mut self) -> SplitText {
        let held = std::mem::take(&mut self.held);
        let mut out = SplitText::default();
        match self.phase {
            Phase::AwaitingThinkTag | Phase::Answering { .. } => out.content = held,
            Phase::Thinking { .. } => out.reasoning = held,
        }
        out
    }

    /// Whether the output had a reasoning block: the field is present in the answer only then.
    pub fn thinking_seen(&self) -> bool {
        self.thinking_seen
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_tag_suffix_len(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&len| {
            text.len() >= len
                && text.is_char_boundary(text.len() - len)
                && tag.starts_with(&text[text.len() - len..])
        })
        .unwrap_or(0)
}

/// Splits a whole output at once (the non-streaming answer): the streamed deltas concatenated, the reasoning's
/// trailing newlines dropped. `reasoning` is `None` when the output had no reasoning block.
pub fn split_whole(start: ReasoningStart, text: &str) -> (Option<String>, String) {
    let mut splitter = ReasoningSplitter::new(start);
    let mut whole = splitter.push(text);
    let rest = splitter.finish();
    whole.reasoning.push_str(&rest.reasoning);
    whole.content.push_str(&rest.content);
    let reasoning = splitter
        .thinking_seen()
        .then(|| whole.reasoning.trim_end_matches('\n').to_string());
    (reasoning, whole.content)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(start: ReasoningStart, pieces: &[&str]) -> SplitText {
        let mut splitter = ReasoningSplitter::new(start);
        let mut all = SplitText::default();
        for piece in pieces {
            let out = splitter.push(piece);
            all.reasoning.push_str(&out.reasoning);
            all.content.push_str(&out.content);
        }
        let out = splitter.finish();
        all.reasoning.push_str(&out.reasoning);
        all.content.push_str(&out.content);
        all
    }

    #[test]
    fn think_block_is_split_whatever_the_delta_boundaries() {
        let text = "<think>\nThe user greets.\n</think>\n\nHello!";
        for cut_a in 0..text.len() {
            for cut_b in cut_a..text.len() {
                let pieces = [&text[..cut_a], &text[cut_a..cut_b], &text[cut_b..]];
                let out = stream(ReasoningStart::MayOpenWithThinkTag, &pieces);
                assert_eq!(out.reasoning, "The user greets.\n", "{pieces:?}");
                assert_eq!(out.content, "Hello!", "{pieces:?}");
            }
        }
        assert_eq!(
            split_whole(ReasoningStart::MayOpenWithThinkTag, text),
            (Some("The user greets.".to_string()), "Hello!".to_string())
        );
    }

    #[test]
    fn output_without_think_tag_is_all_content() {
        let out = stream(
            ReasoningStart::MayOpenWithThinkTag,
            &["<thi", "s is not a tag"],
        );
        assert_eq!(out.content, "<this is not a tag");
        assert_eq!(out.reasoning, "");
        assert_eq!(
            split_whole(ReasoningStart::MayOpenWithThinkTag, "Paris."),
            (None, "Paris.".to_string())
        );
    }

    #[test]
    fn template_opened_block_starts_inside_thinking() {
        let prompt = "<|im_start|>assistant\n<think>\n";
        assert_eq!(
            ReasoningStart::for_prompt(prompt),
            ReasoningStart::InsideThinking
        );
        assert_eq!(
            split_whole(ReasoningStart::InsideThinking, "Hmm.\n</think>\n\nYes."),
            (Some("Hmm.".to_string()), "Yes.".to_string())
        );
        // Cut off by max_tokens inside the reasoning: everything is reasoning.
        assert_eq!(
            split_whole(ReasoningStart::InsideThinking, "Still thinking </th"),
            (Some("Still thinking </th".to_string()), String::new())
        );
        // An empty thinking block (enable_thinking=false renders one in the prompt) ends the block.
        assert_eq!(
            ReasoningStart::for_prompt("assistant\n<think>\n\n</think>\n\n"),
            ReasoningStart::MayOpenWithThinkTag
        );
    }
}
