//! Scoring answers: exact match after normalization, the choice a generated answer names,
//! and perplexity pooled over examples. Answers that never came (an error or a timeout) are
//! counted apart and never scored as wrong.

use crate::task::Expected;

/// An answer with its whitespace trimmed and collapsed (line breaks included).
pub fn normalize(answer: &str) -> String {
    answer.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `answer` equals `expected` after [`normalize`].
pub fn exact_match(answer: &str, expected: &str) -> bool {
    normalize(answer) == normalize(expected)
}

/// The choice a generated answer names: the choice it equals (case aside), else the longest
/// choice it starts with followed by a non-alphanumeric character, else a capital choice
/// letter (`B`, `B)` or `B.` for the second). `None` when it names none. Generated, not
/// scored by likelihood, so that any OpenAI-compatible server can be measured.
pub fn chosen(answer: &str, choices: &[String]) -> Option<usize> {
    let a = normalize(answer).to_lowercase();
    let norm: Vec<String> = choices
        .iter()
        .map(|c| normalize(c).to_lowercase())
        .collect();
    if let Some(i) = norm.iter().position(|c| !c.is_empty() && *c == a) {
        return Some(i);
    }
    let prefix = norm
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            !c.is_empty()
                && a.strip_prefix(c.as_str())
                    .and_then(|rest| rest.chars().next())
                    .is_some_and(|ch| !ch.is_alphanumeric())
        })
        .max_by_key(|(_, c)| c.len());
    if let Some((i, _)) = prefix {
        return Some(i);
    }
    let letter = normalize(answer);
    let mut chars = letter.trim_end_matches([')', '.', ':']).chars();
    match (chars.next(), chars.next()) {
        (Some(c @ 'A'..='Z'), None) => {
            let i = (c as u8 - b'A') as usize;
            (i < choices.len()).then_some(i)
        }
        _ => None,
    }
}

/// Whether a generated `answer` is right for `expected` (a text to score is never "right";
/// several questions are judged one by one with [`crate::batch_prompting::judge`]).
pub fn is_right(answer: &str, expected: &Expected) -> bool {
    match expected {
        Expected::Answer(e) => exact_match(answer, e),
        Expected::Choice {
            choices,
            answer: right,
        } => chosen(answer, choices) == Some(*right),
        Expected::Text(_) | Expected::Batch { .. } => false,
    }
}

/// A task's score over the answers that came back.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Score {
    /// Fraction right (accuracy) or perplexity; `None` when nothing was scored.
    pub value: Option<f64>,
    /// Examples scored.
    pub scored: usize,
    /// Examples right (for accuracy).
    pub right: usize,
}

/// Accuracy over the answers that came: `right` of `scored`.
pub fn accuracy(right: usize, scored: usize) -> Score {
    Score {
        value: (scored > 0).then(|| right as f64 / scored as f64),
        scored,
        right,
    }
}

/// Perplexity pooled over examples, each `(perplexity, scored tokens)`: exp of the mean
/// negative log-likelihood over all their tokens, so long texts weigh more.
pub fn pooled_perplexity(parts: &[(f64, usize)]) -> Score {
    let tokens: usize = parts.iter().map(|p| p.1).sum();
    let nll: f64 = parts.iter().map(|(ppl, n)| ppl.ln() * *n as f64).sum();
    Score {
        value: (tokens > 0).then(|| (nll / tokens as f64).exp()),
        scored: parts.len(),
        right: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_match_normalizes_whitespace() {
        assert!(exact_match(" 2021-03-05", "2021-03-05"));
        assert!(exact_match("apple  banana\tcherry ", "apple banana cherry"));
        assert!(exact_match("\n 3500\n", " 3500"));
        assert!(!exact_match("3500\nmore text", "3500"), "every line counts");
        assert!(!exact_match("2021-03-5", "2021-03-05"));
        assert!(!exact_match("", "0"));
        assert!(
            !exact_match("Apple", "apple"),
            "case matters in exact match"
        );
    }

    #[test]
    fn the_chosen_answer_is_the_choice_named() {
        let c = choices(&["Paris", "Paris, Texas", "Lyon"]);
        assert_eq!(chosen(" paris", &c), Some(0));
        assert_eq!(
            chosen("Paris, Texas is a town", &c),
            Some(1),
            "the longest prefix"
        );
        assert_eq!(chosen("Lyon.", &c), Some(2));
        assert_eq!(chosen("Lyonnais", &c), None, "a prefix must end at a word");
        assert_eq!(chosen("B)", &c), Some(1));
        assert_eq!(chosen("C.", &c), Some(2));
        assert_eq!(
            chosen("a", &c),
            None,
            "a lower-case letter is a word, not a choice"
        );
        assert_eq!(chosen("D", &c), None, "no fourth choice");
        assert_eq!(chosen("Marseille", &c), None);
        assert_eq!(chosen("", &c), None);
    }

    #[test]
    fn rightness_follows_the_expected_kind() {
        let mc = Expected::Choice {
            choices: choices(&["yes", "no"]),
            answer: 1,
        };
        assert!(is_right(" No", &mc));
        assert!(!is_right("yes", &mc));
        assert!(is_right(" 7", &Expected::Answer("7".into())));
        assert!(!is_right("7", &Expected::Text("7".into())));
    }

    #[test]
    fn scores_skip_what_was_not_answered() {
        assert_eq!(accuracy(3, 4).value, Some(0.75));
        assert_eq!(accuracy(0, 0).value, None);
        let p = pooled_perplexity(&[(2.0, 1), (8.0, 2)]);
        // exp((ln 2 + 2 ln 8) / 3) = exp(7 ln 2 / 3)
        assert!((p.value.unwrap() - 2f64.powf(7.0 / 3.0)).abs() < 1e-12);
        assert_eq!(pooled_perplexity(&[]).value, None);
    }
}
