//! FrugalGPT cascades (Chen, Zaharia and Zou 2023): stages of rising cost ([`config`]), each
//! answer kept or passed on by a learned [`scorer`] of its features
//! ([`ft_serve::cascade::features`], which serving computes the same way), with the stages and
//! thresholds that maximise accuracy within a budget ([`search`]), fitted and measured on
//! every stage's answers to a split ([`collect`], [`plan`]).

pub mod collect;
pub mod config;
pub mod plan;
pub mod scorer;
pub mod search;

use crate::error::EvalError;
use crate::task::{EvalTask, Item, TaskError};
use crate::tasks::{self, SplitMix64};

/// The split a cascade is fitted on: `n` examples never held out and never trained on. A
/// bundled task draws new ones from its generator ([`tasks::Task::dev_examples`]); a task
/// file's are a seeded draw from its `train` examples (an adapter trained on those will look
/// better there than on held-out ones).
pub fn dev_split(task: &EvalTask, n: usize) -> Result<EvalTask, EvalError> {
    let mut dev = task.clone();
    dev.items = match tasks::find(&task.name) {
        Some(bundled) => bundled
            .dev_examples(n)
            .into_iter()
            .map(|e| Item {
                prompt: e.prompt,
                expected: crate::task::Expected::Answer(e.completion),
            })
            .collect(),
        None => {
            let mut pool = task.train.clone();
            let mut rng = SplitMix64(plan::SEED);
            for i in 0..n.min(pool.len()) {
                let j = i + rng.below(pool.len() - i);
                pool.swap(i, j);
            }
            // The rest stay the demonstrations a few-shot stage draws from.
            dev.train = pool.split_off(n.min(pool.len()));
            pool
        }
    };
    if dev.items.is_empty() {
        return Err(TaskError::Invalid(format!(
            "task {}: no development examples to fit a cascade on (a task file names them \
             with `train = \"FILE.jsonl\"`)",
            task.name
        ))
        .into());
    }
    Ok(dev)
}
