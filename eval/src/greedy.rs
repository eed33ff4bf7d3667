//! A task's held-out split answered in process: greedy answers for every prompt, decoded in
//! batches, cut at the task's first stop string and scored by the task's metric
//! ([`metric::is_right`]). The task, its stop strings and its scoring are the ones `ft eval`
//! sends through a server, so training's exact match before and after and `ft eval`'s rows
//! score the same thing; only the decoding engine differs.

use ft_model::{LlamaForCausalLM, QuantBackend, TextTokenizer};
use ft_serve::greedy_batch;
use serde::Serialize;

use crate::error::EvalError;
use crate::metric;
use crate::task::{EvalTask, Expected, Metric};

/// The score and every answer.
#[derive(Debug, Clone, Serialize)]
pub struct ExactMatch {
    /// Fraction answered right.
    pub accuracy: f64,
    /// Examples scored.
    pub examples: usize,
    /// `(prompt, expected, answer)` per example.
    pub answers: Vec<(String, String, String)>,
}

/// Scores the first `limit` items of `task` (all when `None`) with greedy decoding of at most
/// `max_new_tokens` per answer, `batch_size` prompts at a time.
pub fn exact_match<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    tokenizer: &TextTokenizer,
    task: &EvalTask,
    limit: Option<usize>,
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<ExactMatch, EvalError> {
    if task.metric == Metric::Perplexity {
        return Err(EvalError::Example(format!(
            "task {}: a perplexity task has no answers to match",
            task.name
        )));
    }
    let items = &task.items[..limit.map_or(task.items.len(), |l| l.min(task.items.len()))];
    let prompts = items
        .iter()
        .map(|i| tokenizer.encode(&i.prompt))
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
    // A stop string that is one token ends an answer as EOS does; longer ones cut the text.
    let mut stop = tokenizer.eos_ids.clone();
    for s in &task.stop {
        if let [id] = tokenizer.encode(s)?[..] {
            stop.push(id);
        }
    }
    let outputs = greedy_batch(model, &prompts, max_new_tokens, &stop, batch_size)
        .map_err(|e| EvalError::Example(format!("task {}: {e}", task.name)))?;
    let mut answers = Vec::with_capacity(items.len());
    let mut right = 0;
    for (item, ids) in items.iter().zip(outputs) {
        let text = tokenizer.decode(&ids)?;
        let answer = cut_at_stop(&text, &task.stop).to_string();
        right += metric::is_right(&answer, &item.expected) as usize;
        let expected = match &item.expected {
            Expected::Answer(a) | Expected::Text(a) => a.clone(),
            Expected::Choice { choices, answer } => {
                choices.get(*answer).cloned().unwrap_or_default()
            }
            // Tasks are scored here as written, one question a prompt.
            Expected::Batch { .. } => String::new(),
        };
        answers.push((item.prompt.clone(), expected, answer));
    }
    Ok(ExactMatch {
        accuracy: right as f64 / items.len().max(1) as f64,
        examples: items.len(),
        answers,
    })
}

/// `text` up to the first occurrence of any stop string.
fn cut_at_stop<'a>(text: &'a str, stops: &[String]) -> &'a str {
    let end = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
        .unwrap_or(text.len());
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_ends_at_the_first_stop_string() {
        let stops = ["\n".to_string(), "###".to_string()];
        assert_eq!(cut_at_stop(" 1976-07-04\nDate:", &stops), " 1976-07-04");
        assert_eq!(cut_at_stop(" B###\nmore", &stops), " B");
        assert_eq!(cut_at_stop(" no stop", &stops), " no stop");
        assert_eq!(cut_at_stop("x", &[String::new()]), "x");
    }
}
