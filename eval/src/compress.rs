//! Prompt compression by self-information (Selective Context, Li et al. 2023; LLMLingua,
//! Jiang et al. 2023): a small model reads the prompt, every word of its compressible
//! context is scored by the information its tokens carry (`-log p(token | what precedes)`),
//! and the words that carry least per token are dropped until the whole prompt is down to
//! the asked fraction of its tokens. The instruction before the context and the question
//! after it are kept whole: what to do and what is asked are never guessed at.
//!
//! A word is a run of non-space characters with the spaces before it. Each word is tokenized
//! on its own, as byte-level BPE pre-tokenizers split text at spaces anyway, so the scored
//! tokens are the prompt's own. A dropped word keeps its line breaks, so the lines of what
//! remains stay lines.

use ft_model::perplexity::token_log_probs;
use ft_model::{LlamaForCausalLM, Pretrained, QuantBackend, TextTokenizer};

use crate::error::EvalError;

/// What separates the instruction, the context and the question in a prompt.
pub const SEPARATOR: &str = "\n\n";

/// The longest window a prompt is scored in: its logits over a 49k-token vocabulary take
/// 200 MB, where a model's whole context (8k tokens) would take 1.6 GB.
pub const MAX_WINDOW: usize = 1024;

/// A prompt in its three parts; any may be empty.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    /// What to do: kept whole.
    pub instruction: &'a str,
    /// What may be shortened: documents, demonstrations.
    pub context: &'a str,
    /// Byte ranges of `context` whose words go only with their whole paragraph: the answers
    /// of demonstrations, which a model finds predictable, but without which a demonstration
    /// teaches it to answer nothing.
    pub pinned: &'a [std::ops::Range<usize>],
    /// What is asked: kept whole.
    pub question: &'a str,
}

impl Parts<'_> {
    /// The prompt: the non-empty parts, trimmed, joined by [`SEPARATOR`].
    pub fn join(&self) -> String {
        join(self.instruction, self.context, self.question)
    }
}

fn join(instruction: &str, context: &str, question: &str) -> String {
    [instruction.trim(), context.trim(), question.trim_start()]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(SEPARATOR)
}

/// A compressed prompt and what it saved.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Compressed {
    /// The whole prompt, compressed.
    pub prompt: String,
    /// The context alone, compressed.
    pub context: String,
    /// Tokens of the prompt before.
    pub tokens_before: usize,
    /// Tokens of the prompt after.
    pub tokens_after: usize,
    /// Words of the context dropped.
    pub words_dropped: usize,
}

/// Scores prompts with a (small) causal language model.
pub struct Compressor<'a, B: QuantBackend> {
    model: &'a LlamaForCausalLM<B>,
    tokenizer: &'a TextTokenizer,
    window: usize,
    device: &'a B::Device,
}

impl<'a, B: QuantBackend> Compressor<'a, B> {
    /// A compressor reading with the loaded `model` on `device`, in windows of its context
    /// or [`MAX_WINDOW`] tokens, whichever is shorter.
    pub fn of(model: &'a Pretrained<B>, device: &'a B::Device) -> Self {
        Self::new(
            &model.model,
            &model.tokenizer,
            model.config.max_position_embeddings.min(MAX_WINDOW),
            device,
        )
    }

    /// A compressor reading with `model` and `tokenizer` on `device`, in windows of `window`
    /// tokens (the model's context).
    pub fn new(
        model: &'a LlamaForCausalLM<B>,
        tokenizer: &'a TextTokenizer,
        window: usize,
        device: &'a B::Device,
    ) -> Self {
        Self {
            model,
            tokenizer,
            window,
            device,
        }
    }

    /// `parts` compressed toward `rate` of its tokens (0 < rate <= 1): words go until the
    /// tokens they hold (each word tokenized on its own) make up the excess, or until only
    /// words that go with their whole paragraph (pinned, or not scored) are left.
    pub fn compress(&self, parts: Parts<'_>, rate: f64) -> Result<Compressed, EvalError> {
        if !(rate > 0.0 && rate <= 1.0) {
            return Err(EvalError::Example(format!(
                "a compression rate is a fraction of the prompt's tokens to keep, in (0, 1], \
                 not {rate}"
            )));
        }
        let count =
            |text: &str| -> Result<usize, EvalError> { Ok(self.tokenizer.encode(text)?.len()) };
        let tokens_before = count(&parts.join())?;
        let text = parts.context.trim();
        let lead = parts.context.len() - parts.context.trim_start().len();
        let words = words(text);
        // The instruction is read first, so the context is scored as the model would read it.
        let mut ids = match parts.instruction.trim() {
            "" => Vec::new(),
            i => self.tokenizer.encode(&format!("{i}{SEPARATOR}"))?,
        };
        let mut spans = Vec::with_capacity(words.len());
        for w in &words {
            let start = ids.len();
            ids.extend(self.tokenizer.encode(w)?);
            spans.push(start..ids.len());
        }
        let logp = token_log_probs(self.model, &ids, self.window, self.device);
        let mut segment = 0;
        let scored: Vec<Scored> = spans
            .into_iter()
            .zip(&words)
            .map(|(span, word)| {
                // A blank line (two line breaks in the spaces before the word) starts a paragraph.
                let space = &word[..word.len() - word.trim_start().len()];
                if space.matches('\n').count() >= 2 {
                    segment += 1;
                }
                // The word's own characters, as byte offsets in `parts.context`.
                let end = lead + (word.as_ptr() as usize - text.as_ptr() as usize) + word.len();
                let start = end - word.trim_start().len();
                let pinned = parts.pinned.iter().any(|r| r.start < end && start < r.end);
                let logp: Vec<f64> = span
                    .clone()
                    .filter_map(|i| logp.get(i).copied().flatten())
                    .collect();
                Scored {
                    info: -logp.iter().sum::<f64>(),
                    scored: logp.len(),
                    tokens: span.len(),
                    segment,
                    pinned,
                }
            })
            .collect();
        let target = (rate * tokens_before as f64).ceil() as usize;
        let drop = to_drop(&scored, tokens_before.saturating_sub(target));
        let context = rebuild(&words, &drop);
        let prompt = join(parts.instruction, &context, parts.question);
        Ok(Compressed {
            tokens_after: count(&prompt)?,
            prompt,
            context,
            tokens_before,
            words_dropped: drop.iter().filter(|&&d| d).count(),
        })
    }
}

/// The words of `text`: each run of non-whitespace with the whitespace before it.
fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() && in_word {
            out.push(&text[start..i]);
            start = i;
        }
        in_word = !c.is_whitespace();
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// A word of the context as the model read it.
#[derive(Debug, Clone, Copy)]
struct Scored {
    /// The information of its scored tokens, in nats.
    info: f64,
    /// Its tokens that had context to be scored.
    scored: usize,
    /// Its tokens.
    tokens: usize,
    /// The paragraph it is in (paragraphs are parted by a blank line): a demonstration, a
    /// document.
    segment: usize,
    /// Goes only with its whole paragraph.
    pinned: bool,
}

/// Mean information per scored token; infinite with none scored (unknown, so kept).
fn density(info: f64, scored: usize) -> f64 {
    if scored == 0 {
        f64::INFINITY
    } else {
        info / scored as f64
    }
}

/// Indices `0..n` by `key`, lowest first, ties to the later index.
fn ascending(n: usize, key: impl Fn(usize) -> f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(b.cmp(&a)));
    order
}

/// Which words to drop so that at least `excess` tokens go, as LLMLingua's budget controller
/// does: first whole paragraphs, the least information per token first, each only where it
/// fits in what is still to go (a demonstration is shown whole or not at all); then single
/// words the same way for the rest. A word with a token the model could not score, or a
/// pinned one, goes only with its paragraph.
fn to_drop(words: &[Scored], excess: usize) -> Vec<bool> {
    let mut drop = vec![false; words.len()];
    let mut left = excess;
    let paragraphs = words.last().map_or(0, |w| w.segment + 1);
    let mut totals = vec![(0.0, 0, 0); paragraphs];
    for w in words {
        let t = &mut totals[w.segment];
        *t = (t.0 + w.info, t.1 + w.scored, t.2 + w.tokens);
    }
    for p in ascending(paragraphs, |p| density(totals[p].0, totals[p].1)) {
        let (info, scored, tokens) = totals[p];
        if left > 0 && density(info, scored).is_finite() && tokens <= left {
            for (d, w) in drop.iter_mut().zip(words) {
                *d |= w.segment == p;
            }
            left -= tokens;
        }
    }
    let word_density = |i: usize| {
        let w = words[i];
        if w.scored < w.tokens || w.pinned {
            f64::INFINITY
        } else {
            density(w.info, w.scored)
        }
    };
    for i in ascending(words.len(), word_density) {
        if left == 0 || word_density(i).is_infinite() {
            break;
        }
        if !drop[i] {
            drop[i] = true;
            left = left.saturating_sub(words[i].tokens);
        }
    }
    drop
}

/// The kept words in order. A dropped word leaves its line breaks (no more than one blank
/// line in a row), and a line that lost its first words starts at its first kept word; what
/// is kept stays as written.
fn rebuild(words: &[&str], drop: &[bool]) -> String {
    let mut out = String::new();
    let mut after_drop = false;
    let line_break = |out: &mut String| {
        if !out.ends_with("\n\n") {
            out.push('\n');
        }
    };
    for (w, &dropped) in words.iter().zip(drop) {
        let space = &w[..w.len() - w.trim_start().len()];
        if dropped {
            for _ in space.matches('\n') {
                line_break(&mut out);
            }
            after_drop = true;
            continue;
        }
        if !after_drop {
            out.push_str(w);
            continue;
        }
        match space.rfind('\n') {
            Some(last) => {
                for _ in space.matches('\n') {
                    line_break(&mut out);
                }
                out.push_str(&space[last + 1..]);
            }
            None if !(out.is_empty() || out.ends_with('\n')) => out.push_str(space),
            None => {}
        }
        out.push_str(w.trim_start());
        after_drop = false;
    }
    out
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use ft_model::tiny::{tiny_config, tiny_model, write_hf_folder};

    use super::*;

    type B = NdArray<f32>;

    #[test]
    fn a_random_model_drops_its_least_informative_words_and_keeps_instruction_and_question() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model::<B>(&tiny_config(), 3);
        write_hf_folder(&model, &tiny_config(), dir.path()).unwrap();
        let tokenizer =
            TextTokenizer::from_file(&dir.path().join("tokenizer.json"), vec![258], None, None)
                .unwrap();
        let device = Default::default();
        let c = Compressor::new(&model, &tokenizer, 64, &device);
        let parts = Parts {
            instruction: "Sort.",
            context: "fig kiwi lime\nplum yam\n\nnut oat rye",
            question: "Words: b a c\nSorted:",
            pinned: &[],
        };
        let whole = c.compress(parts, 1.0).unwrap();
        assert_eq!(whole.prompt, parts.join());
        assert_eq!(whole.words_dropped, 0);
        assert_eq!(whole.tokens_after, whole.tokens_before);

        let half = c.compress(parts, 0.6).unwrap();
        let target = (0.6 * half.tokens_before as f64).ceil() as usize;
        assert!(half.tokens_after <= target, "{half:?}");
        assert!(half.prompt.starts_with("Sort.\n\n"), "{half:?}");
        assert!(
            half.prompt.ends_with("\n\nWords: b a c\nSorted:"),
            "{half:?}"
        );
        // The dropped words are the lowest in information per token (the byte tokenizer makes
        // a word's tokens its bytes).
        let kept: Vec<&str> = half.context.split_whitespace().collect();
        let dropped: Vec<&str> = parts
            .context
            .split_whitespace()
            .filter(|w| !kept.contains(w))
            .collect();
        assert_eq!(dropped.len(), half.words_dropped);
        let ids = tokenizer
            .encode(&format!("{}{SEPARATOR}", parts.instruction))
            .unwrap();
        let mut all = ids.clone();
        let mut density = Vec::new();
        for w in words(parts.context) {
            let t = tokenizer.encode(w).unwrap();
            density.push((w.trim(), all.len()..all.len() + t.len()));
            all.extend(t);
        }
        let logp = token_log_probs(&model, &all, 64, &device);
        let info = |w: &str| {
            let (_, span) = density.iter().find(|(d, _)| *d == w).unwrap();
            -span.clone().map(|i| logp[i].unwrap()).sum::<f64>() / span.len() as f64
        };
        let most_dropped = dropped.iter().map(|w| info(w)).fold(f64::MIN, f64::max);
        let least_kept = kept.iter().map(|w| info(w)).fold(f64::MAX, f64::min);
        assert!(most_dropped <= least_kept, "{most_dropped} > {least_kept}");

        let bare = c.compress(parts, 0.01).unwrap();
        assert_eq!(
            bare.prompt, "Sort.\n\nWords: b a c\nSorted:",
            "asked for less than instruction and question, all the context goes"
        );
        assert!(c.compress(parts, 0.0).is_err() && c.compress(parts, 1.5).is_err());

        // A pinned word goes only with its whole paragraph.
        let rye = parts.context.find("rye").unwrap();
        let pinned = vec![std::ops::Range {
            start: rye,
            end: rye + 3,
        }];
        for rate in [0.9, 0.8, 0.7, 0.6, 0.5, 0.4] {
            let out = c
                .compress(
                    Parts {
                        pinned: &pinned,
                        ..parts
                    },
                    rate,
                )
                .unwrap();
            let kept = |w: &str| out.context.split_whitespace().any(|k| k == w);
            assert!(
                kept("rye") || !(kept("nut") || kept("oat")),
                "{rate}: {out:?}"
            );
        }
    }

    #[test]
    fn words_keep_the_spaces_before_them_and_join_back_to_the_text() {
        let text = "Date: 19 April\nISO:  2047-04-19\n\nnext";
        let w = words(text);
        assert_eq!(
            w,
            [
                "Date:",
                " 19",
                " April",
                "\nISO:",
                "  2047-04-19",
                "\n\nnext"
            ]
        );
        assert_eq!(w.concat(), text);
        assert!(words("").is_empty());
    }

    #[test]
    fn whole_paragraphs_go_first_where_they_fit_then_single_words() {
        let w = |info: f64, tokens: usize, segment: usize| Scored {
            info,
            scored: tokens,
            tokens,
            segment,
            pinned: false,
        };
        // Per token: paragraph 0 (6 tokens) 1.75 nats, paragraph 1 (4 tokens) 1, paragraph 2
        // (3 tokens) 3.
        let words = [
            w(0.5, 1, 0),
            w(10.0, 5, 0),
            w(1.5, 1, 1),
            w(2.5, 3, 1),
            w(9.0, 3, 2),
        ];
        assert_eq!(to_drop(&words, 0), [false; 5]);
        // Paragraph 1 fits in 5 and goes whole; the last token is paragraph 0's least
        // informative word.
        assert_eq!(to_drop(&words, 5), [true, false, true, true, false]);
        // Only paragraph 2 fits in 3.
        assert_eq!(to_drop(&words, 3), [false, false, false, false, true]);
        // No paragraph fits in 2: words, least information per token first.
        assert_eq!(to_drop(&words, 2), [true, false, false, true, false]);
        assert_eq!(to_drop(&words, 8), [true, false, true, true, true]);
        // A word with a token the model could not score is not dropped on its own.
        let mut unknown = words;
        unknown[0].scored = 0;
        assert_eq!(to_drop(&unknown, 8), [false, true, true, true, true]);
        let mut pinned = words;
        pinned[0].pinned = true;
        assert_eq!(to_drop(&pinned, 8), [false, true, true, true, true]);
    }

    #[test]
    fn dropped_words_leave_their_line_breaks_and_no_long_gaps() {
        let w = words("a b\nc d\n\ne f\ng");
        let drop = [false, true, true, false, true, true, false];
        assert_eq!(rebuild(&w, &drop), "a\nd\n\ng");
        let all = [true; 7];
        assert_eq!(rebuild(&w, &all), "\n\n");
        // What is kept stays as written: indentation, blank lines.
        let code = "fn f() {\n    x\n\n\n}";
        let w = words(code);
        assert_eq!(rebuild(&w, &vec![false; w.len()]), code);
        let drop: Vec<bool> = (0..w.len()).map(|i| i == 1).collect();
        assert_eq!(rebuild(&w, &drop), "fn {\n    x\n\n\n}");
    }

    #[test]
    fn parts_join_with_blank_lines_and_skip_empty_ones() {
        let p = Parts {
            instruction: "Answer.",
            context: "  ",
            question: "Q: 1+1?",
            pinned: &[],
        };
        assert_eq!(p.join(), "Answer.\n\nQ: 1+1?");
        let p = Parts {
            instruction: "",
            context: "x\n",
            question: "Q: ",
            pinned: &[],
        };
        assert_eq!(
            p.join(),
            "x\n\nQ: ",
            "the question's trailing space is kept"
        );
    }
}
