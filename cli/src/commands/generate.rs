//! `ft generate`: one prompt, streamed or as JSON.

use std::io::Write;

use anyhow::Context;
use ft_model::QuantBackend;
use ft_serve::{generate, Sampler, SamplingParams};

use crate::args::GenerateArgs;
use crate::device::{dispatch, Job};

/// Runs `ft generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    dispatch(args.model.base.device, args)
}

impl Job for GenerateArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let pretrained = self.model.load::<B>(&device)?;
        let text = if self.chat {
            pretrained.chat_prompt(&self.prompt)?
        } else {
            self.prompt.clone()
        };
        let prompt = pretrained.tokenizer.encode(&text)?;
        anyhow::ensure!(!prompt.is_empty(), "--prompt: the prompt has no tokens");
        pretrained
            .check_context(
                "--prompt plus --max-new-tokens",
                prompt.len() + self.max_new_tokens,
            )
            .context("shorten the prompt or lower --max-new-tokens")?;
        let mut sampler = Sampler::new(SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        });
        let tokenizer = &pretrained.tokenizer;
        let mut printed = String::new();
        let mut so_far = Vec::new();
        let mut stdout = std::io::stdout();
        let generation = generate(
            &pretrained.model,
            &prompt,
            self.max_new_tokens,
            &tokenizer.eos_ids,
            &mut sampler,
            |id| {
                if self.json {
                    return;
                }
                // Decode the whole continuation each time: a multi-byte character can span
                // tokens, so only print once the text has grown.
                so_far.push(id);
                if let Ok(text) = tokenizer.decode(&so_far) {
                    if let Some(new) = text.strip_prefix(printed.as_str()) {
                        let _ = write!(stdout, "{new}");
                        let _ = stdout.flush();
                        printed = text;
                    }
                }
            },
        );
        let text = tokenizer.decode(&generation.ids)?;
        if self.json {
            let out = serde_json::json!({
                "ids": generation.ids,
                "text": text,
                "prompt_tokens": generation.prompt_tokens,
                "decode_tokens_per_s": generation.decode_tokens_per_s(),
            });
            println!("{out}");
        } else {
            if let Some(rest) = text.strip_prefix(printed.as_str()) {
                print!("{rest}");
            }
            println!();
        }
        Ok(())
    }
}
