//! `ft perplexity`: the reference protocol over a text file.

use ft_model::perplexity::perplexity;
use ft_model::QuantBackend;

use crate::args::PerplexityArgs;
use crate::device::{dispatch, Job};
use crate::error::usage;

/// Runs `ft perplexity`.
pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    dispatch(args.model.base.device, args)
}

impl Job for PerplexityArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.file)
            .map_err(|e| anyhow::anyhow!("--file {}: {e}", self.file.display()))?;
        let pretrained = self.model.load::<B>(&device)?;
        let window = self.window as usize;
        let context = pretrained.config.max_position_embeddings;
        if window > context {
            return Err(usage(
                "--window",
                &format!("at most the model context of {context} tokens"),
                window,
            ));
        }
        let ids = pretrained.tokenizer.encode(&text)?;
        anyhow::ensure!(
            ids.len() >= 2,
            "--file {}: fewer than 2 tokens to score",
            self.file.display()
        );
        let result = perplexity(&pretrained.model, &ids, window, &device);
        if self.json {
            println!("{}", serde_json::to_string(&result)?);
        } else {
            println!(
                "perplexity {:.4} over {} scored tokens ({} tokens, window {window})",
                result.perplexity, result.scored, result.tokens
            );
        }
        Ok(())
    }
}
