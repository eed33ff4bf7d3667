//! PEFT LoRA adapters applied with `--adapter`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ft_adapters::peft::{LoraWeights, Matrix, PeftConfig};
use ft_adapters::PeftAdapter;
use ft_tests::{ft, tiny, tiny_model};

fn matrix(shape: [usize; 2], seed: usize) -> Matrix {
    let data = (0..shape[0] * shape[1])
        .map(|i| (((i * 31 + seed * 17) % 23) as f32 - 11.0) * 0.05)
        .collect();
    Matrix { shape, data }
}

/// A rank-8 adapter on q_proj and k_proj of both tiny layers: q/k are the rows that GGUF
/// stores permuted, so equal outputs from both sources check that the permutation is undone.
fn write_adapter(dir: &std::path::Path) {
    let mut modules = BTreeMap::new();
    for i in 0..2 {
        for (m, out) in [("q_proj", 32), ("k_proj", 16)] {
            modules.insert(
                format!("model.layers.{i}.self_attn.{m}"),
                LoraWeights {
                    a: matrix([8, 32], i),
                    b: matrix([out, 8], i + 5),
                },
            );
        }
    }
    let config: PeftConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj"], "bias": "none"
    }))
    .unwrap();
    PeftAdapter { config, modules }.write(dir).unwrap();
}

#[test]
fn an_adapter_applies_identically_to_the_gguf_and_the_hf_folder() {
    let f = AdapterFixture::new();
    let (hf, gg) = (f.score(&f.folder, true), f.score(&f.gguf, true));
    assert!((hf - gg).abs() < 1e-4 * hf, "{hf} vs {gg}");
    assert!(
        (hf - f.score(&f.folder, false)).abs() > 1e-3,
        "the adapter changes the model"
    );
}

#[test]
fn a_misfit_adapter_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny();
    config.num_hidden_layers = 1;
    let (folder, _) = tiny_model(dir.path(), &config);
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter);
    ft(&[
        "generate",
        "--model",
        folder.to_str().unwrap(),
        "--prompt",
        "x",
        "--adapter",
        adapter.to_str().unwrap(),
    ])
    .fails_with(
        1,
        &[
            "adapter",
            "model.layers.1.self_attn.k_proj",
            "which the base model lacks",
        ],
    );
    ft(&[
        "generate",
        "--model",
        folder.to_str().unwrap(),
        "--prompt",
        "x",
        "--adapter",
        "/no/such/adapter",
    ])
    .fails_with(1, &["/no/such/adapter/adapter_config.json"]);
}

/// A tiny model (HF folder and GGUF), an adapter for it and a text to score, in one
/// temporary folder.
struct AdapterFixture {
    dir: tempfile::TempDir,
    folder: PathBuf,
    gguf: PathBuf,
    adapter: PathBuf,
    text: PathBuf,
}

impl AdapterFixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (folder, gguf) = tiny_model(dir.path(), &tiny());
        let adapter = dir.path().join("adapter");
        write_adapter(&adapter);
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "adapters change what the model predicts").unwrap();
        Self {
            dir,
            folder,
            gguf,
            adapter,
            text,
        }
    }

    /// Perplexity of `model` on the text, with the adapter attached when asked.
    fn score(&self, model: &Path, with_adapter: bool) -> f64 {
        let mut args = vec!["perplexity", "--json", "--window", "32"];
        args.extend([
            "--file",
            self.text.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
        ]);
        if with_adapter {
            args.extend(["--adapter", self.adapter.to_str().unwrap()]);
        }
        ft(&args).json()["perplexity"].as_f64().unwrap()
    }

    /// Runs `ft merge` into `out` with `extra` flags.
    fn merge(&self, out: &Path, extra: &[&str]) {
        let mut args = vec!["merge", "--model", self.gguf.to_str().unwrap()];
        args.extend([
            "--adapter",
            self.adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        args.extend(extra);
        let run = ft(&args);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
}

#[test]
fn a_merged_model_scores_like_the_base_with_its_adapter() {
    let f = AdapterFixture::new();
    let merged = f.dir.path().join("merged");
    f.merge(&merged, &[]);
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(merged.join(file).exists(), "{file}");
    }
    let (adapted, folded) = (f.score(&f.gguf, true), f.score(&merged, false));
    assert!(
        (adapted - folded).abs() < 1e-4 * adapted,
        "{adapted} vs {folded}"
    );
}

#[test]
fn a_merged_gguf_in_f16_or_q8_0_scores_like_the_adapted_model() {
    let f = AdapterFixture::new();
    let adapted = f.score(&f.gguf, true);
    for (ty, tolerance) in [("f16", 1e-3), ("q8_0", 2e-2)] {
        let out = f.dir.path().join(format!("merged-{ty}.gguf"));
        f.merge(&out, &["--format", "gguf", "--gguf-type", ty]);
        let merged = f.score(&out, false);
        assert!(
            (merged / adapted - 1.0).abs() < tolerance,
            "{ty}: {merged} vs {adapted}"
        );
    }
}
