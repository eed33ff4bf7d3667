//! The table of `ft bench train --vs-peft`: per recipe, ft's training row and PEFT's on the
//! same job, with ft's speed over PEFT's.

use std::fmt;

use super::peft::PeftTrain;

/// What ft's run of a recipe measured (from its `summary.json` and `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq)]
pub struct FtTrain {
    /// Storage of the base: `f32`, `nf4+dq`, ...
    pub base: String,
    /// `adamw` or `paged_adamw`.
    pub optimizer: String,
    /// CPU threads of ft's kernels.
    pub threads: usize,
    /// Optimizer steps.
    pub steps: usize,
    /// Median seconds of a step (`None` for runs that did not record step times).
    pub step_s: Option<f64>,
    /// Non-padding tokens per second of training.
    pub tokens_per_s: f64,
    /// Peak resident memory of the run in bytes.
    pub peak_rss: u64,
    /// The loss of the first step.
    pub first_loss: Option<f64>,
}

/// One recipe's pair of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct VsPeftRow {
    /// The recipe's name.
    pub recipe: String,
    /// ft's run.
    pub ft: FtTrain,
    /// PEFT's run of the same job.
    pub peft: PeftTrain,
}

/// The table; `Display` writes it as Markdown with its notes below.
#[derive(Debug, Clone, PartialEq)]
pub struct VsPeftTable {
    /// The recipes in order.
    pub rows: Vec<VsPeftRow>,
    /// PEFT's untimed leading steps.
    pub warmup: usize,
}

impl fmt::Display for VsPeftTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let loss = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.4}"));
        writeln!(
            f,
            "| recipe | engine | base | optimizer | threads | steps | step (median) | train tok/s | peak RSS | step-1 loss | ft speed / PEFT |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|---|")?;
        for VsPeftRow { recipe, ft, peft } in &self.rows {
            // Median step times: the two run the same micro-batches, and a median is not
            // moved by a step that shared the cores with something else.
            let ratio = match ft.step_s {
                Some(ft_step) => peft.step_s / ft_step.max(1e-12),
                None => ft.tokens_per_s / peft.tokens_per_s.max(1e-12),
            };
            writeln!(
                f,
                "| {recipe} | ft | {} | {} | {} | {} | {} | {:.1} | {:.0} MiB | {} | {ratio:.2}x |",
                ft.base,
                ft.optimizer,
                ft.threads,
                ft.steps,
                ft.step_s.map_or("-".into(), |s| format!("{s:.3} s")),
                ft.tokens_per_s,
                mib(ft.peak_rss),
                loss(ft.first_loss),
            )?;
            writeln!(
                f,
                "| {recipe} | PEFT {} (transformers {}, torch {}) | f32 | adamw | {} | {} | {:.3} s | {:.1} | {:.0} MiB | {:.4} | 1.00x |",
                peft.peft,
                peft.transformers,
                peft.torch,
                peft.threads,
                peft.steps,
                peft.step_s,
                peft.tokens_per_s,
                mib(peft.peak_rss),
                peft.first_loss,
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "Both rows train the same job: ft's f32 base weights, LoRA, micro-batches (labels -100 on prompt tokens), learning rates and AdamW; PEFT's steps are ft's first ones, after {} untimed warm-up step(s), on torch's CPU backend. Train tok/s counts non-padding tokens; ft's is over all its steps, PEFT's over its timed ones. ft speed / PEFT is PEFT's median step time over ft's. The step-1 losses should agree: every adapter starts at B = 0.",
            self.warmup
        )?;
        if self.rows.iter().any(|r| r.ft.base != "f32") {
            writeln!(
                f,
                "\nQuantized (QLoRA) bases: the PEFT row is LoRA on the f32 base, since bitsandbytes has no 4-bit path on the CPU."
            )?;
        }
        if self.rows.iter().any(|r| r.ft.optimizer == "paged_adamw") {
            writeln!(
                f,
                "\npaged_adamw: PEFT runs torch's plain AdamW (paging optimizer state to host memory is a CUDA feature)."
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(recipe: &str, base: &str, optimizer: &str) -> VsPeftRow {
        VsPeftRow {
            recipe: recipe.into(),
            ft: FtTrain {
                base: base.into(),
                optimizer: optimizer.into(),
                threads: 2,
                steps: 100,
                step_s: Some(0.5),
                tokens_per_s: 354.0,
                peak_rss: 1 << 30,
                first_loss: Some(2.34567),
            },
            peft: PeftTrain {
                torch: "2.15.0".into(),
                transformers: "5.23.0".into(),
                peft: "0.21.2".into(),
                threads: 2,
                steps: 20,
                step_s: 1.83,
                tokens_per_s: 177.0,
                peak_rss: 3 << 30,
                first_loss: 2.34571,
            },
        }
    }

    #[test]
    fn each_recipe_has_an_ft_and_a_peft_row_and_the_speed_ratio() {
        let table = VsPeftTable {
            rows: vec![row("lora", "f32", "adamw")],
            warmup: 2,
        }
        .to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[2],
            "| lora | ft | f32 | adamw | 2 | 100 | 0.500 s | 354.0 | 1024 MiB | 2.3457 | 3.66x |"
        );
        assert_eq!(
            lines[3],
            "| lora | PEFT 0.21.2 (transformers 5.23.0, torch 2.15.0) | f32 | adamw | 2 | 20 | 1.830 s | 177.0 | 3072 MiB | 2.3457 | 1.00x |"
        );
        assert!(table.contains("after 2 untimed warm-up step(s)"));
        assert!(!table.contains("bitsandbytes"));
        assert!(!table.contains("paged"));
    }

    #[test]
    fn a_quantized_base_and_paged_adamw_are_called_out() {
        let mut r = row("qlora", "nf4+dq", "paged_adamw");
        r.ft.step_s = None;
        r.ft.first_loss = None;
        let table = VsPeftTable {
            rows: vec![r],
            warmup: 2,
        }
        .to_string();
        assert!(table.contains(
            "| qlora | ft | nf4+dq | paged_adamw | 2 | 100 | - | 354.0 | 1024 MiB | - | 2.00x |"
        ));
        assert!(table.contains("the PEFT row is LoRA on the f32 base"));
        assert!(table.contains("PEFT runs torch's plain AdamW"));
    }
}
