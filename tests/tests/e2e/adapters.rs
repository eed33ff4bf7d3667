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

/// A rank-4 adapter on all seven projections of both tiny layers, strong enough to move every
/// log-probability.
fn write_full_adapter(dir: &Path) {
    let mut modules = BTreeMap::new();
    for i in 0..2 {
        for (j, (m, n_out, n_in)) in [
            ("self_attn.q_proj", 32, 32),
            ("self_attn.k_proj", 16, 32),
            ("self_attn.v_proj", 16, 32),
            ("self_attn.o_proj", 32, 32),
            ("mlp.gate_proj", 48, 32),
            ("mlp.up_proj", 48, 32),
            ("mlp.down_proj", 32, 48),
        ]
        .into_iter()
        .enumerate()
        {
            modules.insert(
                format!("model.layers.{i}.{m}"),
                LoraWeights {
                    a: matrix([4, n_in], 7 * i + j),
                    b: matrix([n_out, 4], 7 * i + j + 3),
                },
            );
        }
    }
    let config: PeftConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none"
    }))
    .unwrap();
    PeftAdapter { config, modules }.write(dir).unwrap();
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `ft adapters convert` writes the adapter llama.cpp loads with `--lora`: llama.cpp's greedy
/// tokens and log-probabilities with it (`fixtures/gguf_lora_llamacpp.json`, made by
/// `scripts/gguf_lora_reference.py` with llama-cpp-python from these same bytes) are ft's
/// with the PEFT folder, within 1e-3.
#[test]
fn a_converted_adapter_gives_llama_cpp_the_outputs_ft_gives_with_the_peft_folder() {
    type B = burn::backend::NdArray<f32>;
    let dir = tempfile::tempdir().unwrap();
    let (base, peft, lora) = (
        dir.path().join("base.gguf"),
        dir.path().join("peft"),
        dir.path().join("lora.gguf"),
    );
    let config = tiny();
    ft_model::tiny::write_gguf(&ft_model::tiny::formula_model::<B>(&config), &config, &base)
        .unwrap();
    write_full_adapter(&peft);
    let run = ft(&[
        "adapters",
        "convert",
        peft.to_str().unwrap(),
        lora.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let modelfile = std::fs::read_to_string(dir.path().join("lora.Modelfile")).unwrap();
    assert_eq!(
        modelfile,
        format!("FROM {}\nADAPTER {}\n", base.display(), lora.display())
    );
    let reference = ft_tests::fixture_json("gguf_lora_llamacpp.json");
    assert_eq!(
        (sha256(&base), sha256(&lora)),
        (
            reference["base_sha256"].as_str().unwrap().to_string(),
            reference["adapter_sha256"].as_str().unwrap().to_string()
        ),
        "the fixture was made from other files: rerun scripts/gguf_lora_reference.py"
    );
    let server = ft_tests::Server::start(&[
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        &format!("x={}", peft.display()),
    ]);
    let logprobs = |model: &str, expected: &serde_json::Value| -> Vec<f64> {
        let n = expected["ids"].as_array().unwrap().len();
        let (status, answer) = server.post(
            "/v1/completions",
            &serde_json::json!({
                "model": model, "prompt": reference["prompt"], "max_tokens": n,
                "temperature": 0, "logprobs": 0, "ignore_eos": true,
            }),
        );
        assert_eq!(status, 200, "{answer}");
        let got: Vec<f64> = answer["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<f64> = expected["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{answer}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-3,
                "{model}, token {i}: ft {g}, llama.cpp {w}"
            );
        }
        got
    };
    let adapted = logprobs("x", &reference["with_adapter"]);
    let plain = logprobs(base.to_str().unwrap(), &reference["base_only"]);
    let moved = adapted
        .iter()
        .zip(&plain)
        .map(|(a, p)| (a - p).abs())
        .fold(0.0, f64::max);
    assert!(
        moved > 0.05,
        "the adapter moves the log-probabilities ({moved})"
    );
}

#[test]
fn a_registry_version_exports_as_a_gguf_lora_and_a_wrong_type_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let (peft, reg, out) = (
        dir.path().join("peft"),
        dir.path().join("reg"),
        dir.path().join("x.gguf"),
    );
    write_full_adapter(&peft);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let add = ft(&[
        "adapters",
        "add",
        &s(&peft),
        "--name",
        "x",
        "--registry",
        &s(&reg),
    ]);
    assert_eq!(add.code, 0, "{}", add.stderr);
    let export = ft(&[
        "adapters",
        "export",
        "x",
        &s(&out),
        "--format",
        "gguf",
        "--base",
        &s(&gguf),
        "--type",
        "f16",
        "--registry",
        &s(&reg),
    ]);
    assert_eq!(export.code, 0, "{}", export.stderr);
    let file = ft_model::formats::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(file.get_str("general.type").unwrap(), "adapter");
    assert_eq!(file.tensors.len(), 2 * 2 * 7);
    ft(&[
        "adapters",
        "convert",
        &s(&peft),
        &s(&out),
        "--base",
        &s(&gguf),
        "--type",
        "q8_0",
    ])
    .fails_with(2, &["--type: expected f32 or f16, got q8_0"]);
    // An adapter for another shape is refused before anything is written.
    let wide = dir.path().join("wide");
    write_adapter(&wide);
    let other = ft_model::LlamaConfig {
        num_key_value_heads: 4,
        ..tiny()
    };
    std::fs::create_dir_all(dir.path().join("other")).unwrap();
    let (_, other_gguf) = tiny_model(&dir.path().join("other"), &other);
    ft(&[
        "adapters",
        "convert",
        &s(&wide),
        &s(&dir.path().join("w.gguf")),
        "--base",
        &s(&other_gguf),
    ])
    .fails_with(
        1,
        &["model.layers.0.self_attn.k_proj", "the base's matrix is"],
    );
    assert!(!dir.path().join("w.gguf").exists());
}

#[test]
fn adapters_check_says_which_servers_load_an_adapter_and_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let peft = dir.path().join("peft");
    write_full_adapter(&peft);
    let p = peft.to_str().unwrap();
    let run = ft(&["adapters", "check", p]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stdout.lines().collect::<Vec<_>>(),
        [
            "vllm: loads",
            "lorax: loads",
            "tgi: loads with LORA_ADAPTERS=NAME=DIR at launch"
        ]
    );
    // Fields PEFT means and vLLM refuses; LoRAX and TGI load the files and leave them out.
    let config = peft.join("adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    c["modules_to_save"] = serde_json::json!(["lm_head"]);
    std::fs::write(&config, c.to_string()).unwrap();
    let run = ft(&["adapters", "check", p, "--for", "vllm,lorax"]);
    run.fails_with(1, &["not every server loads it as PEFT means it"]);
    assert!(
        run.stdout
            .contains("vllm: refused: modules_to_save must be empty")
            && run
                .stdout
                .contains("lorax: loads, but modules_to_save is left out"),
        "{}",
        run.stdout
    );
    ft(&["adapters", "check", p, "--for", "sglang"]).fails_with(2, &["--for \"sglang\""]);
}
