//! What a stage's answer says about itself: the features a cascade's scorer reads to decide
//! whether to accept it (FrugalGPT's scorer, from signals the serving path already returns):
//! the answer tokens' log-probabilities (mean and least), the entropy of the model's top
//! choices, the answer's and the prompt's length, whether it ended on its own, and, for
//! self-consistency, how many samples agree. The token scores are read from a completion's
//! `logprobs` object ([`parse_logprobs`]), so the same features come from our engine and from
//! any OpenAI-compatible server.

use serde_json::Value;

/// One generated token's log-probability and its top alternatives'.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    /// log p(the token).
    pub logprob: f64,
    /// log p of the most likely tokens.
    pub top: Vec<f64>,
}

/// The token scores of a `/v1/completions` choice's `logprobs` object (`token_logprobs` and
/// `top_logprobs`); entries without a log-probability are skipped.
pub fn parse_logprobs(logprobs: &Value) -> Vec<TokenScore> {
    let Some(lps) = logprobs["token_logprobs"].as_array() else {
        return Vec::new();
    };
    let tops = logprobs["top_logprobs"].as_array();
    lps.iter()
        .enumerate()
        .filter_map(|(i, lp)| {
            let top = tops
                .and_then(|t| t.get(i))
                .and_then(Value::as_object)
                .map(|m| m.values().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            Some(TokenScore {
                logprob: lp.as_f64()?,
                top,
            })
        })
        .collect()
}

/// The features' names, in the order of [`Features::vector`].
pub const NAMES: [&str; 7] = [
    "mean_logprob",
    "min_logprob",
    "mean_entropy",
    "answer_tokens",
    "prompt_tokens",
    "stopped",
    "agreement",
];

/// The entropy (nats) of a distribution known by its top log-probabilities, the mass they
/// leave counted as one more outcome: a lower bound on the whole distribution's entropy.
pub fn top_entropy(top: &[f64]) -> f64 {
    let p: Vec<f64> = top.iter().map(|lp| lp.exp()).collect();
    let rest = (1.0 - p.iter().sum::<f64>()).max(0.0);
    p.iter()
        .chain(std::iter::once(&rest))
        .filter(|&&q| q > 0.0)
        .map(|q| -q * q.ln())
        .sum()
}

/// The features of one answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features {
    /// Mean log-probability of the answer's tokens (NaN without log-probabilities).
    pub mean_logprob: f64,
    /// The least log-probability among them.
    pub min_logprob: f64,
    /// Mean entropy of the top choices at each token.
    pub mean_entropy: f64,
    /// Tokens generated.
    pub answer_tokens: usize,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// The answer ended on a stop string or token, not on the length limit.
    pub stopped: bool,
    /// The share of samples that gave this answer (1 for a single answer).
    pub agreement: f64,
}

impl Features {
    /// The features of an answer whose tokens scored `tokens`.
    pub fn of(
        tokens: &[TokenScore],
        answer_tokens: usize,
        prompt_tokens: usize,
        stopped: bool,
        agreement: f64,
    ) -> Self {
        let n = tokens.len() as f64;
        let (mean_logprob, min_logprob, mean_entropy) = if tokens.is_empty() {
            (f64::NAN, f64::NAN, f64::NAN)
        } else {
            (
                tokens.iter().map(|t| t.logprob).sum::<f64>() / n,
                tokens
                    .iter()
                    .map(|t| t.logprob)
                    .fold(f64::INFINITY, f64::min),
                tokens.iter().map(|t| top_entropy(&t.top)).sum::<f64>() / n,
            )
        };
        Self {
            mean_logprob,
            min_logprob,
            mean_entropy,
            answer_tokens,
            prompt_tokens,
            stopped,
            agreement,
        }
    }

    /// The features as the scorer reads them, in [`NAMES`] order; lengths as `ln(1 + n)`.
    pub fn vector(&self) -> Vec<f64> {
        vec![
            self.mean_logprob,
            self.min_logprob,
            self.mean_entropy,
            (self.answer_tokens as f64).ln_1p(),
            (self.prompt_tokens as f64).ln_1p(),
            if self.stopped { 1.0 } else { 0.0 },
            self.agreement,
        ]
    }
}

/// Self-consistency's vote: the index of the first answer of the most common one (answers
/// compared word by word, whitespace aside) and the share of answers that agree with it.
pub fn vote(answers: &[String]) -> (usize, f64) {
    let norm: Vec<Vec<&str>> = answers
        .iter()
        .map(|a| a.split_whitespace().collect())
        .collect();
    let mut best = (0, 0);
    for (i, a) in norm.iter().enumerate() {
        let count = norm.iter().filter(|b| *b == a).count();
        if count > best.1 {
            best = (i, count);
        }
    }
    (best.0, best.1 as f64 / answers.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_completions_logprobs_object_gives_each_tokens_scores() {
        let v = json!({
            "tokens": [" 1", "9", "\n"],
            "token_logprobs": [-0.1, -2.0, -0.5],
            "top_logprobs": [{" 1": -0.1, " 2": -2.5}, {"9": -2.0, "8": -0.3}, null],
            "text_offset": [0, 2, 3],
        });
        let t = parse_logprobs(&v);
        assert_eq!(t.len(), 3);
        assert_eq!(t[1].logprob, -2.0);
        assert_eq!(t[0].top.len(), 2);
        assert!(t[2].top.is_empty());
        assert!(parse_logprobs(&json!(null)).is_empty());
    }

    #[test]
    fn entropy_of_the_top_choices_counts_the_mass_they_leave() {
        let uniform = [(0.2f64).ln(); 5];
        assert!((top_entropy(&uniform) - 5f64.ln()).abs() < 1e-12);
        assert!(top_entropy(&[0.0]).abs() < 1e-12, "a certain token");
        // Top 1 at 0.5: the other half is one outcome, ln 2.
        assert!((top_entropy(&[0.5f64.ln()]) - 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn features_summarize_an_answer() {
        let t = |lp: f64| TokenScore {
            logprob: lp,
            top: vec![lp],
        };
        let f = Features::of(&[t(-0.5), t(-1.5)], 2, 30, true, 0.6);
        assert_eq!((f.mean_logprob, f.min_logprob), (-1.0, -1.5));
        let v = f.vector();
        assert_eq!(v.len(), NAMES.len());
        assert!((v[3] - 3f64.ln()).abs() < 1e-12 && v[5] == 1.0 && v[6] == 0.6);
        let none = Features::of(&[], 0, 30, false, 1.0);
        assert!(none.mean_logprob.is_nan() && none.vector()[5] == 0.0);
    }

    #[test]
    fn the_vote_picks_the_most_common_answer_first_seen() {
        let a = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(vote(&a(&[" 12", "13", "12 ", " 13"])), (0, 0.5));
        assert_eq!(vote(&a(&["x", "y", "y"])), (1, 2.0 / 3.0));
        assert_eq!(vote(&[]), (0, 0.0));
    }
}
