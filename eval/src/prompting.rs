//! How prompts are built from a task's examples when not as written: few-shot, as
//! lm-evaluation-harness's `num_fewshot` does (solved examples from the training split before
//! each held-out prompt), and those demonstrations compressed ([`crate::compress`]). One
//! seeded draw of demonstrations serves every example of a run, so they are one shared
//! context: compression shortens it once, and a server's prefix cache can reuse it.

use std::ops::Range;

use ft_model::QuantBackend;

use crate::compress::{Compressor, Parts, SEPARATOR};
use crate::error::EvalError;
use crate::task::{EvalTask, Item, Metric, Prompting};
use crate::tasks::SplitMix64;

/// The seed of the demonstrations' draw: the same examples in every run.
pub const SEED: u64 = 0x5407;

/// `shots` solved examples of `task`'s training split, drawn with [`SEED`]: the first
/// `shots` places of a seeded shuffle of those that have an answer.
pub fn drawn(task: &EvalTask, shots: usize) -> Result<Vec<&Item>, EvalError> {
    let solvable: Vec<&Item> = task.train.iter().filter(|i| i.solved().is_some()).collect();
    if solvable.len() < shots {
        return Err(EvalError::Shots {
            task: task.name.clone(),
            shots,
            have: solvable.len(),
        });
    }
    // The first `shots` places of a seeded Fisher-Yates shuffle.
    let mut order: Vec<usize> = (0..solvable.len()).collect();
    let mut rng = SplitMix64(SEED);
    for i in 0..shots {
        let j = i + rng.below(order.len() - i);
        order.swap(i, j);
    }
    Ok(order[..shots].iter().map(|&i| solvable[i]).collect())
}

/// [`drawn`]'s examples joined as a few-shot context, and the byte ranges of their answers
/// in it.
pub fn demonstrations(
    task: &EvalTask,
    shots: usize,
) -> Result<(String, Vec<Range<usize>>), EvalError> {
    let mut context = String::new();
    let mut answers = Vec::with_capacity(shots);
    for item in drawn(task, shots)? {
        if !context.is_empty() {
            context.push_str(SEPARATOR);
        }
        let text = item.solved().unwrap_or_default();
        answers.push(context.len() + item.prompt.len()..context.len() + text.len());
        context.push_str(&text);
    }
    Ok((context, answers))
}

/// The prompt variants of `task` to measure: with `shots` demonstrations before each prompt,
/// whole, then asking each of `per_prompt` questions in one prompt
/// ([`crate::batch_prompting`]), then with the demonstrations compressed to each of `rates`
/// of their tokens by `compressor` (each example's own prompt is kept whole). A task without
/// prompts to build on (perplexity) comes back as written.
pub fn variants<B: QuantBackend>(
    task: &EvalTask,
    shots: usize,
    per_prompt: &[usize],
    rates: &[f64],
    compressor: Option<&Compressor<'_, B>>,
) -> Result<Vec<EvalTask>, EvalError> {
    let mut out = vec![few_shot(task, shots)?];
    if task.metric == Metric::Perplexity {
        return Ok(out);
    }
    for &k in per_prompt {
        out.push(crate::batch_prompting::grouped(task, shots, k)?);
    }
    if shots == 0 {
        return Ok(out);
    }
    let (context, answers) = demonstrations(task, shots)?;
    for &rate in rates {
        let Some(compressor) = compressor else { break };
        // A demonstration is shown with its answer or not at all.
        let parts = Parts {
            instruction: "",
            context: &context,
            pinned: &answers,
            question: "",
        };
        let compressed = compressor.compress(parts, rate)?;
        tracing::info!(
            task = %task.name, rate, before = compressed.tokens_before,
            after = compressed.tokens_after, "demonstrations compressed"
        );
        out.push(with_context(task, &compressed.context, shots, Some(rate)));
    }
    Ok(out)
}

/// `task` with `shots` demonstrations before each prompt; as written for `shots` 0 or a task
/// without prompts to build on (perplexity).
pub fn few_shot(task: &EvalTask, shots: usize) -> Result<EvalTask, EvalError> {
    if shots == 0 || task.metric == Metric::Perplexity {
        return Ok(task.clone());
    }
    let (context, _) = demonstrations(task, shots)?;
    Ok(with_context(task, &context, shots, None))
}

/// What [`few_shot`] puts before each of `task`'s prompts (the prompt follows with its
/// leading whitespace dropped): the demonstrations and their separator, or nothing. A
/// served cascade's stage gives it to every request, as its fit did.
pub fn context(task: &EvalTask, shots: usize) -> Result<String, EvalError> {
    if shots == 0 || task.metric == Metric::Perplexity {
        return Ok(String::new());
    }
    let (context, _) = demonstrations(task, shots)?;
    Ok(match context.trim() {
        "" => String::new(),
        c => format!("{c}{SEPARATOR}"),
    })
}

/// `task` with `context` before each prompt.
fn with_context(task: &EvalTask, context: &str, shots: usize, rate: Option<f64>) -> EvalTask {
    let mut t = task.clone();
    for item in &mut t.items {
        item.prompt = Parts {
            instruction: "",
            context,
            pinned: &[],
            question: &item.prompt,
        }
        .join();
    }
    t.prompting = Some(Prompting {
        shots,
        rate,
        per_prompt: 1,
    });
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{self, Expected};

    #[test]
    fn demonstrations_are_solved_training_examples_drawn_the_same_every_time() {
        let task = task::resolve("dates", &[]).unwrap();
        let (context, answers) = demonstrations(&task, 3).unwrap();
        assert_eq!(demonstrations(&task, 3).unwrap().0, context);
        let shown: Vec<&str> = context.split(SEPARATOR).collect();
        assert_eq!(shown.len(), 3);
        for (s, a) in shown.iter().zip(&answers) {
            assert!(
                s.ends_with(&context[a.clone()]),
                "{s:?} ends with its answer"
            );
            assert!(
                context[a.clone()].starts_with(' '),
                "the completion, as written"
            );
        }
        for s in shown {
            let item = task
                .train
                .iter()
                .find(|i| s.starts_with(&i.prompt))
                .expect("a training prompt");
            let Expected::Answer(a) = &item.expected else {
                panic!("exact match")
            };
            assert_eq!(s, format!("{}{a}", item.prompt), "solved");
            assert!(
                task.items.iter().all(|t| t.prompt != item.prompt),
                "never a held-out example"
            );
        }
        let few = variants::<burn::backend::NdArray>(&task, 3, &[], &[], None).unwrap();
        assert_eq!(few.len(), 1);
        assert_eq!(
            few[0].items[0].prompt,
            format!("{context}{SEPARATOR}{}", task.items[0].prompt)
        );
        assert_eq!(
            few[0].prompting,
            Some(Prompting {
                shots: 3,
                rate: None,
                per_prompt: 1,
            })
        );
        let before = super::context(&task, 3).unwrap();
        for (few, item) in few[0].items.iter().zip(&task.items) {
            assert_eq!(few.prompt, format!("{before}{}", item.prompt.trim_start()));
        }
        assert_eq!(super::context(&task, 0).unwrap(), "");
        let mut none = task.clone();
        none.train.clear();
        let err = demonstrations(&none, 2).unwrap_err().to_string();
        assert!(err.contains("--shots 2: task dates has 0"), "{err}");
    }
}
