//! Hugging Face transformers + PEFT training the same LoRA job as ft, on torch's CPU backend:
//! the peer of `ft bench train --vs-peft`.
//!
//! The job ([`PeftJob`]) is ft's, written out whole: an HF folder of ft's own f32 base weights,
//! the LoRA and AdamW hyperparameters, every step's learning rate and micro-batches as ft's
//! plan drew them. `peft_train.py` (beside this file, written next to the job so that it can be
//! rerun by hand) replays it in a `python` child process, so the peer's memory and failures are
//! its own, and prints one JSON line that [`parse`] reads. The interpreter comes from the
//! virtual environment of [`super::peft_venv`].

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{write_atomic, EvalError};

/// One micro-batch as PEFT takes it: rows right-padded to the longest, an attention mask of 1
/// on real tokens, and labels that are the ids where ft trains the token and -100 elsewhere
/// (prompt tokens, padding), transformers' convention.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeftBatch {
    /// `[b][s]` token ids.
    pub input_ids: Vec<Vec<u32>>,
    /// `[b][s]`: 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<Vec<u8>>,
    /// `[b][s]`: the id of each trained token, -100 on the others.
    pub labels: Vec<Vec<i64>>,
}

/// The adapter, in the terms of PEFT's `LoraConfig`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeftLora {
    /// Rank (`r`).
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout`.
    pub dropout: f64,
    /// `target_modules`.
    pub targets: Vec<String>,
    /// `layers_to_transform` (all layers when `None`).
    pub layers: Option<Vec<usize>>,
    /// `use_rslora`.
    pub rslora: bool,
}

/// torch's AdamW and the clipping before it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeftOptimizer {
    /// The learning rate of each step, as ft's schedule gives it.
    pub lr: Vec<f64>,
    /// Adam's beta1 and beta2.
    pub betas: [f64; 2],
    /// Adam's epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub max_grad_norm: f64,
}

/// Everything the script needs, written as `job.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeftJob {
    /// An HF folder with the base in f32 (`config.json`, `model.safetensors`).
    pub model: PathBuf,
    /// The adapter.
    pub lora: PeftLora,
    /// The optimizer.
    pub optimizer: PeftOptimizer,
    /// Seed of the adapters' initialization and dropout.
    pub seed: u64,
    /// torch's intra-op threads.
    pub threads: usize,
    /// Leading steps left out of the timing.
    pub warmup: usize,
    /// The micro-batches of each step.
    pub steps: Vec<Vec<PeftBatch>>,
}

/// What one PEFT run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftTrain {
    /// torch's version.
    pub torch: String,
    /// transformers' version.
    pub transformers: String,
    /// PEFT's version.
    pub peft: String,
    /// The threads torch ran on.
    pub threads: usize,
    /// Timed steps (after the warm-up).
    pub steps: usize,
    /// Median seconds of a timed step.
    pub step_s: f64,
    /// Non-padding tokens per second over the timed steps.
    pub tokens_per_s: f64,
    /// The child process's peak resident memory in bytes.
    pub peak_rss: u64,
    /// The loss of the first step (the base's, since every adapter starts at B = 0).
    pub first_loss: f64,
}

/// The script, as committed beside this file.
const SCRIPT: &str = include_str!("peft_train.py");

/// Runs `job` with the interpreter `python` (a virtual environment's, with torch, transformers
/// and PEFT), writing `job.json` and `peft_train.py` into `dir` first and the script's stderr
/// (one line per step) to `peft.log` after.
pub fn train(python: &Path, job: &PeftJob, dir: &Path) -> Result<PeftTrain, EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    let job_path = dir.join("job.json");
    let script = dir.join("peft_train.py");
    write_atomic(&job_path, &serde_json::to_vec(job)?)?;
    write_atomic(&script, SCRIPT.as_bytes())?;
    tracing::info!(
        "PEFT: {} steps ({} warm-up) on {} threads, job in {}",
        job.steps.len(),
        job.warmup,
        job.threads,
        job_path.display()
    );
    let threads = job.threads.to_string();
    let out = Command::new(python)
        .arg(&script)
        .arg(&job_path)
        // torch reads these before `set_num_threads`; the hub must not be asked for anything.
        .env("OMP_NUM_THREADS", &threads)
        .env("MKL_NUM_THREADS", &threads)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .map_err(|source| EvalError::PeerSpawn {
            program: python.display().to_string(),
            source,
        })?;
    // The script's progress, one line per step, kept beside the job.
    write_atomic(&dir.join("peft.log"), &out.stderr)?;
    if !out.status.success() {
        return Err(EvalError::PeerFailed {
            peer: "PEFT".into(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 40),
        });
    }
    parse(&out.stdout)
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Reads the script's result: the last line of stdout that is a JSON object (libraries may
/// print above it).
fn parse(stdout: &[u8]) -> Result<PeftTrain, EvalError> {
    #[derive(Deserialize)]
    struct Printed {
        torch: String,
        transformers: String,
        peft: String,
        threads: usize,
        steps: usize,
        step_s: f64,
        tokens_per_s: f64,
        peak_rss: u64,
        first_loss: f64,
    }
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_default();
    let p: Printed =
        serde_json::from_str(line).map_err(|source| EvalError::PeerOutput { source })?;
    Ok(PeftTrain {
        torch: p.torch,
        transformers: p.transformers,
        peft: p.peft,
        threads: p.threads,
        steps: p.steps,
        step_s: p.step_s,
        tokens_per_s: p.tokens_per_s,
        peak_rss: p.peak_rss,
        first_loss: p.first_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_is_the_last_json_line_of_stdout() {
        let out = b"some library's notice\n{\"torch\": \"2.15.0+cpu\", \"transformers\": \"5.23.0\", \"peft\": \"0.21.2\", \"threads\": 2, \"steps\": 5, \"step_s\": 1.83, \"tokens_per_s\": 177.0, \"peak_rss\": 3100000000, \"first_loss\": 2.5}\n";
        let r = parse(out).unwrap();
        assert_eq!(
            (r.torch.as_str(), r.transformers.as_str(), r.peft.as_str()),
            ("2.15.0+cpu", "5.23.0", "0.21.2")
        );
        assert_eq!((r.threads, r.steps), (2, 5));
        assert_eq!((r.step_s, r.tokens_per_s, r.first_loss), (1.83, 177.0, 2.5));
        assert_eq!(r.peak_rss, 3_100_000_000);
    }

    #[test]
    fn an_unreadable_or_incomplete_result_is_an_error() {
        for out in [
            &b"Traceback (most recent call last):"[..],
            b"{\"torch\": \"2.15.0\"}",
            b"",
        ] {
            assert!(matches!(parse(out), Err(EvalError::PeerOutput { .. })));
        }
    }

    #[test]
    fn the_job_is_written_in_the_scripts_terms() {
        let job = PeftJob {
            model: "base".into(),
            lora: PeftLora {
                r: 16,
                alpha: 32.0,
                dropout: 0.05,
                targets: vec!["q_proj".into()],
                layers: None,
                rslora: false,
            },
            optimizer: PeftOptimizer {
                lr: vec![0.0, 1e-4],
                betas: [0.9, 0.999],
                eps: 1e-8,
                weight_decay: 0.0,
                max_grad_norm: 1.0,
            },
            seed: 42,
            threads: 2,
            warmup: 1,
            steps: vec![vec![PeftBatch {
                input_ids: vec![vec![5, 6, 2]],
                attention_mask: vec![vec![1, 1, 0]],
                labels: vec![vec![-100, 6, -100]],
            }]],
        };
        let v = serde_json::to_value(&job).unwrap();
        // Every key the script reads.
        for key in [
            "model",
            "lora",
            "optimizer",
            "seed",
            "threads",
            "warmup",
            "steps",
        ] {
            assert!(v.get(key).is_some(), "{key}");
            assert!(SCRIPT.contains(&format!("job[\"{key}\"]")), "{key}");
        }
        for key in ["r", "alpha", "dropout", "targets", "layers", "rslora"] {
            assert!(SCRIPT.contains(&format!("lora[\"{key}\"]")), "{key}");
        }
        for key in ["lr", "betas", "eps", "weight_decay", "max_grad_norm"] {
            assert!(v["optimizer"].get(key).is_some(), "{key}");
            assert!(SCRIPT.contains(&format!("opt[\"{key}\"]")), "{key}");
        }
        for key in ["input_ids", "attention_mask", "labels"] {
            assert!(SCRIPT.contains(&format!("b[\"{key}\"]")), "{key}");
        }
        assert_eq!(v["lora"]["layers"], serde_json::Value::Null);
        assert_eq!(v["steps"][0][0]["labels"][0][0], -100);
    }
}
