//! `ft compress`: a prompt's context shortened to a fraction of the prompt's tokens by the
//! self-information a small model gives its words; the instruction and question kept whole.

use std::io::Read;

use anyhow::Context;
use ft_eval::compress::{Compressor, Parts};
use ft_model::QuantBackend;

use crate::args::CompressArgs;
use crate::device::{dispatch, Job};
use crate::error::usage;

/// Runs `ft compress`.
pub fn run(args: CompressArgs) -> anyhow::Result<()> {
    if !(args.rate > 0.0 && args.rate <= 1.0) {
        return Err(usage(
            "--rate",
            "the fraction of the prompt's tokens to keep, in (0, 1]",
            args.rate,
        ));
    }
    dispatch(args.model.device, args)
}

impl Job for CompressArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let context = if self.context.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the context from standard input")?;
            text
        } else {
            std::fs::read_to_string(&self.context)
                .with_context(|| format!("the context file {}", self.context.display()))?
        };
        let model = self.model.load::<B>(&device)?;
        let parts = Parts {
            instruction: &self.instruction,
            context: &context,
            question: &self.question,
            pinned: &[],
        };
        let out = Compressor::of(&model, &device).compress(parts, self.rate)?;
        if self.json {
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!("{}", out.prompt);
            eprintln!(
                "ft compress: {} of {} tokens kept ({:.2}), {} words dropped",
                out.tokens_after,
                out.tokens_before,
                out.tokens_after as f64 / out.tokens_before.max(1) as f64,
                out.words_dropped
            );
        }
        Ok(())
    }
}
