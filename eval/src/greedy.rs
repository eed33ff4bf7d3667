//! Exact-match evaluation of a task's held-out split: greedy answers for every prompt, decoded
//! in batches, cut at the first newline (answers are single lines) and compared after
//! whitespace normalization.

use ft_model::{LlamaForCausalLM, QuantBackend, TextTokenizer};
use ft_serve::greedy_batch;
use serde::Serialize;

use crate::error::EvalError;
use crate::metric;
use crate::tasks::Example;

/// The score and every answer.
#[derive(Debug, Clone, Serialize)]
pub struct ExactMatch {
    /// Fraction answered exactly.
    pub accuracy: f64,
    /// Examples scored.
    pub examples: usize,
    /// `(prompt, expected, answer)` per example.
    pub answers: Vec<(String, String, String)>,
}

/// Scores `examples` with greedy decoding of at most `max_new_tokens` per answer.
pub fn exact_match<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &TextTokenizer,
    examples: &[Example],
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<ExactMatch, EvalError> {
    let prompts = examples
        .iter()
        .map(|e| tokenizer.encode(&e.prompt))
        .collect::<Result<Vec<_>, _>>()?;
    let context = model.max_position_embeddings;
    if let Some((i, p)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.is_empty() || p.len() + max_new_tokens > context)
    {
        return Err(EvalError::Example(format!(
            "example {} has a prompt of {} tokens; with {max_new_tokens} new tokens it must fit \
             the model's context of {context} tokens",
            i + 1,
            p.len()
        )));
    }
    // Answers are one line: a newline token ends one as EOS does.
    let mut stop = tokenizer.eos_ids.clone();
    stop.extend(tokenizer.encode("\n")?.first().copied());
    let outputs = greedy_batch(model, &prompts, max_new_tokens, &stop, batch_size);
    let mut answers = Vec::with_capacity(examples.len());
    let mut right = 0;
    for (e, ids) in examples.iter().zip(outputs) {
        let text = tokenizer.decode(&ids)?;
        let answer = text.split('\n').next().unwrap_or("").to_string();
        right += metric::exact_match(&answer, &e.completion) as usize;
        answers.push((e.prompt.clone(), e.completion.clone(), answer));
    }
    Ok(ExactMatch {
        accuracy: right as f64 / examples.len().max(1) as f64,
        examples: examples.len(),
        answers,
    })
}
