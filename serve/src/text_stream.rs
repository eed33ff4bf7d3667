//! Text of a generation as it grows, in deltas safe to send: a delta never ends inside a
//! multi-byte character (the tokenizer decodes its bytes to U+FFFD until they are complete)
//! nor includes text that may turn out to be the start of a stop string. Stop strings end
//! generation where they first occur, and are not part of the text (as in the OpenAI API).

/// Decodes token ids to text.
pub type Detokenize = Box<dyn Fn(&[u32]) -> String + Send>;

/// One request's generated text.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    sent: usize,
    stops: Vec<String>,
}

impl TextStream {
    /// A stream ending at the first of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            ids: Vec::new(),
            sent: 0,
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// Adds `id`; returns the new text that can be sent, and whether a stop string ended it.
    pub fn push(&mut self, id: u32, detokenize: &Detokenize) -> (String, bool) {
        self.ids.push(id);
        let text = detokenize(&self.ids);
        // Search from where a stop string could begin that was not complete before.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let from = floor_char(&text, self.sent.saturating_sub(longest));
        let hit = self
            .stops
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(end) = hit {
            return (self.take(&text, end), true);
        }
        // Hold back an incomplete character and anything that may start a stop string.
        let full = text.trim_end_matches('\u{FFFD}').len();
        let mut end = full;
        for s in &self.stops {
            if let Some(k) = (1..s.len())
                .rev()
                .find(|&k| s.is_char_boundary(k) && text[..full].ends_with(&s[..k]))
            {
                end = end.min(full - k);
            }
        }
        (self.take(&text, end), false)
    }

    /// Everything held back, at the end of generation.
    pub fn finish(&mut self, detokenize: &Detokenize) -> String {
        let text = detokenize(&self.ids);
        let end = text.len();
        self.take(&text, end)
    }

    /// `text[sent..end]`, marking it sent (nothing if `end` is not past what was sent).
    fn take(&mut self, text: &str, end: usize) -> String {
        let end = floor_char(text, end);
        if end <= self.sent || !text.is_char_boundary(self.sent) {
            return String::new();
        }
        let out = text[self.sent..end].to_string();
        self.sent = end;
        out
    }
}

/// The largest char boundary of `s` at or before `i`.
fn floor_char(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token i decodes to the i-th string of `pieces`.
    fn pieces(pieces: &'static [&'static str]) -> Detokenize {
        Box::new(move |ids: &[u32]| ids.iter().map(|&i| pieces[i as usize]).collect())
    }

    #[test]
    fn text_before_a_stop_string_is_sent_and_the_stop_is_not() {
        let d = pieces(&["Hello", " wor", "ld", "\n\n", "Q:", " more"]);
        let mut s = TextStream::new(&["\nQ:".to_string()]);
        assert_eq!(s.push(0, &d), ("Hello".into(), false));
        assert_eq!(s.push(1, &d), (" wor".into(), false));
        assert_eq!(s.push(2, &d), ("ld".into(), false));
        // "\n\n" may start "\nQ:": held back.
        assert_eq!(s.push(3, &d), ("\n".into(), false));
        assert_eq!(s.push(4, &d), (String::new(), true));
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop_and_at_the_end() {
        let d = pieces(&["a", "<", "b", "<"]);
        let mut s = TextStream::new(&["<stop>".to_string()]);
        assert_eq!(s.push(0, &d).0, "a");
        assert_eq!(s.push(1, &d).0, "");
        assert_eq!(s.push(2, &d).0, "<b");
        assert_eq!(s.push(3, &d).0, "");
        assert_eq!(s.finish(&d), "<");
    }

    #[test]
    fn incomplete_characters_wait_for_their_last_byte() {
        let d = pieces(&["caf", "\u{FFFD}", "é"]);
        let mut s = TextStream::new(&[]);
        assert_eq!(s.push(0, &d).0, "caf");
        // Token 1 stands for a first byte: the decoder shows U+FFFD until the next.
        assert_eq!(s.push(1, &d).0, "");
        let d2: Detokenize = Box::new(|ids: &[u32]| {
            if ids.len() == 3 {
                "café".into()
            } else {
                "caf\u{FFFD}".into()
            }
        });
        assert_eq!(s.push(2, &d2).0, "é");
    }
}
