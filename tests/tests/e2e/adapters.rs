//! PEFT LoRA adapters applied with `--adapter`.

use std::collections::BTreeMap;

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
    let dir = tempfile::tempdir().unwrap();
    let (folder, gguf) = tiny_model(dir.path(), &tiny());
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter);
    let run = |model: &std::path::Path, with_adapter: bool| {
        let mut args = vec![
            "perplexity",
            "--model",
            model.to_str().unwrap(),
            "--json",
            "--window",
            "32",
        ];
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "adapters change what the model predicts").unwrap();
        let text = text.to_str().unwrap().to_string();
        args.extend(["--file", &text]);
        let a = adapter.to_str().unwrap().to_string();
        if with_adapter {
            args.extend(["--adapter", &a]);
        }
        ft(&args).json()["perplexity"].as_f64().unwrap()
    };
    let (hf, gg) = (run(&folder, true), run(&gguf, true));
    assert!((hf - gg).abs() < 1e-4 * hf, "{hf} vs {gg}");
    assert!(
        (hf - run(&folder, false)).abs() > 1e-3,
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

#[test]
fn a_merged_model_scores_like_the_base_with_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter);
    let merged = dir.path().join("merged");
    let out = ft(&[
        "merge",
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(merged.join(file).exists(), "{file}");
    }
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "merging folds the adapter into the weights").unwrap();
    let score = |extra: &[&str]| {
        let mut args = vec![
            "perplexity",
            "--json",
            "--window",
            "32",
            "--file",
            text.to_str().unwrap(),
        ];
        args.extend(extra);
        ft(&args).json()["perplexity"].as_f64().unwrap()
    };
    let adapted = score(&[
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    let folded = score(&["--model", merged.to_str().unwrap()]);
    assert!(
        (adapted - folded).abs() < 1e-4 * adapted,
        "{adapted} vs {folded}"
    );
}

#[test]
fn a_merged_gguf_in_f16_or_q8_0_scores_like_the_adapted_model() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let adapter = dir.path().join("adapter");
    write_adapter(&adapter);
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "merging folds the adapter into the weights").unwrap();
    let score = |extra: &[&str]| {
        let mut args = vec![
            "perplexity",
            "--json",
            "--window",
            "32",
            "--file",
            text.to_str().unwrap(),
        ];
        args.extend(extra);
        ft(&args).json()["perplexity"].as_f64().unwrap()
    };
    let adapted = score(&[
        "--model",
        gguf.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    for (ty, tolerance) in [("f16", 1e-3), ("q8_0", 2e-2)] {
        let out = dir.path().join(format!("merged-{ty}.gguf"));
        let run = ft(&[
            "merge",
            "--model",
            gguf.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--format",
            "gguf",
            "--gguf-type",
            ty,
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let merged = score(&["--model", out.to_str().unwrap()]);
        assert!(
            (merged / adapted - 1.0).abs() < tolerance,
            "{ty}: {merged} vs {adapted}"
        );
    }
}
