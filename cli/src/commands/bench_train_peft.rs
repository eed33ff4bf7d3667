//! `ft bench train --vs-peft`: after ft's run of a recipe, the same job trained by Hugging Face
//! transformers + PEFT in a child process ([`ft_eval::peers::peft`]), its job written by
//! [`ft_trainer::run::peft_job`], and ft's row read from the run's summary and metrics.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ft_eval::peers::peft;
use ft_eval::peers::peft_table::{FtTrain, VsPeftRow, VsPeftTable};
use ft_eval::peers::peft_venv;
use ft_trainer::recipe::{LoadedRecipe, OptimizerKind};
use ft_trainer::run::{peft_job, Summary, Twin};

use crate::args::BenchTrainArgs;
use crate::device::Cpu;

/// The PEFT side of one bench: its interpreter and what every recipe's twin replays.
pub struct PeftPeer {
    python: PathBuf,
    warmup: usize,
    steps: usize,
    threads: usize,
    /// Where the f32 base is written for transformers (shared by the recipes).
    base_dir: PathBuf,
    sets: Vec<String>,
}

impl PeftPeer {
    /// Makes (or finds) the virtual environment the flags name.
    pub fn new(args: &BenchTrainArgs) -> anyhow::Result<Self> {
        let venv = args
            .peft_venv
            .clone()
            .unwrap_or_else(|| ft_model::source::ft_home().join("venvs").join("peft"));
        let python = peft_venv::ensure(&venv)
            .with_context(|| format!("the PEFT environment {}", venv.display()))?;
        Ok(Self {
            python,
            warmup: args.peft_warmup as usize,
            steps: args.peft_steps as usize,
            threads: args
                .threads
                .map_or_else(ft_model::kernels::threads, |t| t as usize),
            base_dir: args.out.join("peft-base"),
            sets: args.sets.clone(),
        })
    }

    /// Trains `recipe`'s job with PEFT in `out/peft` and pairs it with ft's run in `out`.
    pub fn run(
        &self,
        recipe: &Path,
        stem: &str,
        out: &Path,
        summary: &Summary,
    ) -> anyhow::Result<VsPeftRow> {
        let loaded = LoadedRecipe::load(recipe, &self.sets)?;
        eprintln!(
            "training {} with PEFT into {}",
            recipe.display(),
            out.join("peft").display()
        );
        let twin = Twin {
            warmup: self.warmup,
            steps: self.steps,
            threads: self.threads,
            base_dir: &self.base_dir,
        };
        let job = peft_job::<Cpu>(&loaded, &twin, &Default::default())?;
        let peft = peft::train(&self.python, &job, &out.join("peft"))?;
        let optimizer = match loaded.recipe.train.optimizer {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::PagedAdamW => "paged_adamw",
        };
        let ft = FtTrain {
            base: summary.base_format.clone(),
            optimizer: optimizer.into(),
            threads: ft_model::kernels::threads(),
            steps: summary.steps,
            step_s: summary.step_s_median,
            tokens_per_s: summary.train_tokens_per_s,
            peak_rss: summary.peak_rss_bytes,
            first_loss: first_loss(&out.join("metrics.jsonl")),
        };
        Ok(VsPeftRow {
            recipe: stem.into(),
            ft,
            peft,
        })
    }

    /// The side-by-side table of `rows`.
    pub fn table(&self, rows: Vec<VsPeftRow>) -> String {
        VsPeftTable {
            rows,
            warmup: self.warmup,
        }
        .to_string()
    }
}

/// `train/loss` of step 1 in a run's `metrics.jsonl`, if it has one.
fn first_loss(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("step").and_then(|s| s.as_u64()) == Some(1))
        .and_then(|v| v.get("train/loss").and_then(|l| l.as_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_loss_is_step_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"train/loss\":2.5}\nnot json\n{\"step\":2,\"train/loss\":2.0}\n",
        )
        .unwrap();
        assert_eq!(first_loss(&path), Some(2.5));
        assert_eq!(first_loss(&dir.path().join("none.jsonl")), None);
    }
}
