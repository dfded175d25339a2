//! Stop strings over streamed text: a stop string may span token boundaries, so text that could still be the
//! start of one is held back until it either completes the stop (and is cut) or cannot anymore (and is sent).

/// Matches a request's stop strings against its generated text.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stop_strings: Vec<String>,
    held_back: String,
}

/// What one piece of text gives after stop matching.
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that can be sent now.
    pub text: String,
    /// A stop string was completed: generation ends, and the stop string itself is not part of the output.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stop_strings: Vec<String>) -> StopMatcher {
        StopMatcher {
            stop_strings: stop_strings
                .into_iter()
                .filter(|stop| !stop.is_empty())
                .collect(),
            held_back: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stop_strings.is_empty() {
            return StopOutcome {
                text: text.to_string(),
                stopped: false,
            };
        }
        self.held_back.push_str(text);
        let earliest_stop = self
            .stop_strings
            .iter()
            .filter_map(|stop| self.held_back.find(stop.as_str()))
            .min();
        if let Some(position) = earliest_stop {
            let text = self.held_back[..position].to_string();
            self.held_back.clear();
            return StopOutcome {
                text,
                stopped: true,
            };
        }
        let keep = self.longest_partial_stop_suffix();
        let send_up_to = self.held_back.len() - keep;
        let text = self.held_back[..send_up_to].to_string();
        self.held_back.drain(..send_up_to);
        StopOutcome {
            text,
            stopped: false,
        }
    }

    /// Text still held back, sent when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held_back)
    }

    /// Length in bytes of the longest suffix of the held-back text that is a proper prefix of a stop string.
    fn longest_partial_stop_suffix(&self) -> usize {
        let text = self.held_back.as_str();
        let mut longest = 0;
        for stop in &self.stop_strings {
            for (boundary, _) in stop.char_indices().skip(1) {
                let prefix = &stop[..boundary];
                if boundary > longest && text.ends_with(prefix) {
                    longest = boundary;
                }
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_string_spanning_pieces_is_cut() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("hello E").text, "hello ");
        let outcome = matcher.push("NDING");
        assert_eq!(
            outcome,
            StopOutcome {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_back_text_is_released_when_it_cannot_be_a_stop() {
        let mut matcher = StopMatcher::new(vec!["END".into(), "<|x|>".into()]);
        assert_eq!(matcher.push("abc EN").text, "abc ");
        assert_eq!(matcher.push("D? no, ENx").text, "");
        assert!(matcher.finish().is_empty());
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("EN").text, "");
        assert_eq!(matcher.push("x").text, "ENx");
        assert_eq!(matcher.push("E").text, "");
        assert_eq!(matcher.finish(), "E");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_text_is_kept_whole() {
        let mut matcher = StopMatcher::new(vec!["é!".into(), "b".into()]);
        let outcome = matcher.push("ééa b é!");
        assert_eq!(outcome.text, "ééa ");
        assert!(outcome.stopped);
        let mut matcher = StopMatcher::new(vec!["éx".into()]);
        assert_eq!(matcher.push("aé").text, "a");
        assert_eq!(matcher.push("é").text, "é");
    }

    #[test]
    fn no_stop_strings_pass_text_through() {
        let mut matcher = StopMatcher::new(vec![]);
        assert_eq!(matcher.push("anything").text, "anything");
    }
}
