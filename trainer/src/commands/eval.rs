//! `ft eval --tasks`: held-out exact match of bundled tasks.

use ft_quant::QuantBackend;

use crate::cli::EvalArgs;
use crate::device::{dispatch, Job};
use crate::error::usage;
use crate::eval::exact_match;
use crate::tasks;

/// Runs `ft eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.list_tasks {
        for t in tasks::TASKS {
            println!("{}\t{}", t.name, t.about);
        }
        return Ok(());
    }
    if args.tasks.is_empty() {
        return Err(usage(
            "--tasks",
            "one or more task names (see --list-tasks)",
            "nothing",
        ));
    }
    for name in &args.tasks {
        if tasks::find(name).is_none() {
            return Err(usage(
                "--tasks",
                &format!("names among {}", tasks::names()),
                name,
            ));
        }
    }
    dispatch(args.model.base.device, args)
}

impl Job for EvalArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let p = self.model.load::<B>(&device)?;
        let mut results = Vec::new();
        for name in &self.tasks {
            let task = tasks::find(name).ok_or_else(|| anyhow::anyhow!("unknown task {name}"))?;
            let mut examples = task.test_examples();
            if let Some(limit) = self.limit {
                examples.truncate(limit);
            }
            let em = exact_match(
                &p.model,
                &p.tokenizer,
                &examples,
                self.max_new_tokens,
                self.batch_size as usize,
            )?;
            if !self.json {
                println!(
                    "{name}\texact_match {:.3}\t({} examples)",
                    em.accuracy, em.examples
                );
            }
            results.push(serde_json::json!({
                "task": name,
                "exact_match": em.accuracy,
                "examples": em.examples,
                "answers": em.answers,
            }));
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&results)?);
        }
        Ok(())
    }
}
