//! `ft recipe export`: the README's recipe as axolotl's and torchtune's configs, held against
//! their schemas (`fixtures/reference/export_schemas.json`, read from axolotl 0.18.0 and
//! torchtune 0.6.1), with ft's own examples, split and masks in the data files; and, where
//! their Python packages install, axolotl's own validation of the config and both trainers'
//! tokenization of the data.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ft_tests::ft;
use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../recipes/{name}.toml"))
}

fn schemas() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/reference/export_schemas.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn names(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// Exports the README's recipe to `target` under `dir`; returns the folder, the config and
/// what `ft` printed.
fn export(dir: &Path, target: &str) -> (PathBuf, Yaml, String) {
    let out = dir.join(target);
    let r = recipe("qlora");
    let run = ft(&[
        "recipe",
        "export",
        r.to_str().unwrap(),
        "--to",
        target,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let text = std::fs::read_to_string(out.join(format!("{target}.yaml"))).unwrap();
    let config = YamlLoader::load_from_str(&text).unwrap().remove(0);
    (out, config, run.stdout)
}

fn keys(y: &Yaml) -> Vec<String> {
    y.as_hash()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

/// Every line of a data file: its segments as (text, label).
fn segments(path: &Path) -> Vec<Vec<(String, bool)>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["segments"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["text"].as_str().unwrap().to_string(),
                        s["label"].as_bool().unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_main_recipe_exports_to_axolotl_within_its_schema_with_fts_examples() {
    let dir = tempfile::tempdir().unwrap();
    let (out, c, stdout) = export(dir.path(), "axolotl");
    let schema = &schemas()["axolotl"];
    let fields = names(&schema["config_fields"]);
    for k in keys(&c) {
        assert!(fields.contains(&k), "{k} is not an axolotl 0.18 field");
    }
    let dataset_fields = names(&schema["dataset_fields"]);
    for d in c["datasets"]
        .as_vec()
        .unwrap()
        .iter()
        .chain(c["test_datasets"].as_vec().unwrap())
    {
        for k in keys(d) {
            assert!(dataset_fields.contains(&k), "datasets: {k}");
        }
    }

    // The recipe's settings, in axolotl's words.
    assert_eq!(
        c["base_model"].as_str(),
        Some("HuggingFaceTB/SmolLM2-135M-Instruct")
    );
    assert_eq!(c["adapter"].as_str(), Some("qlora"));
    assert_eq!(c["load_in_4bit"].as_bool(), Some(true));
    assert_eq!(
        c["bnb_config_kwargs"]["bnb_4bit_quant_type"].as_str(),
        Some("nf4")
    );
    assert_eq!(
        c["bnb_config_kwargs"]["bnb_4bit_use_double_quant"].as_bool(),
        Some(true)
    );
    assert_eq!(c["lora_r"].as_i64(), Some(16));
    assert_eq!(c["lora_alpha"].as_i64(), Some(32));
    assert_eq!(c["lora_dropout"].as_f64(), Some(0.05));
    assert_eq!(c["lora_target_modules"].as_vec().unwrap().len(), 7);
    assert_eq!(c["max_steps"].as_i64(), Some(100));
    assert_eq!(c["micro_batch_size"].as_i64(), Some(8));
    assert_eq!(c["learning_rate"].as_f64(), Some(1e-3));
    assert_eq!(c["adam_epsilon"].as_f64(), Some(1e-8));
    assert_eq!(c["lr_scheduler"].as_str(), Some("cosine"));
    assert_eq!(c["warmup_steps"].as_i64(), Some(10));
    assert_eq!(c["optimizer"].as_str(), Some("paged_adamw_32bit"));
    assert_eq!(c["sequence_len"].as_i64(), Some(64));
    assert_eq!(c["excess_length_strategy"].as_str(), Some("truncate"));
    assert_eq!(c["train_on_inputs"].as_bool(), Some(false));

    // ft's split of the task: 5% of its 2,000 training examples held out, 64 of them scored.
    let train = segments(&out.join("data/task-train.jsonl"));
    let val = segments(&out.join("data/task-val.jsonl"));
    assert_eq!((train.len(), val.len()), (1900, 64));
    // Each example: the prompt masked, the answer and the EOS trained.
    for e in train.iter().chain(&val) {
        let labels: Vec<bool> = e.iter().map(|s| s.1).collect();
        assert_eq!(labels, [false, true, true], "{e:?}");
        assert!(e[0].0.starts_with("Write the date in ISO format"), "{e:?}");
        assert_eq!(e[2].0, "<|im_end|>");
    }

    // What does not translate is said, in the config and on stdout.
    for said in [
        std::fs::read_to_string(out.join("axolotl.yaml")).unwrap(),
        stdout,
    ] {
        assert!(said.contains("[eval]: the exact-match score"), "{said}");
        assert!(said.contains("train.micro_batch_size = 8"), "{said}");
    }
}

#[test]
fn the_main_recipe_exports_to_torchtune_within_its_components() {
    let dir = tempfile::tempdir().unwrap();
    let (out, c, stdout) = export(dir.path(), "torchtune");
    let schema = &schemas()["torchtune"];
    let recipe_keys = names(&schema["recipe_keys"]);
    for k in keys(&c) {
        assert!(
            recipe_keys.contains(&k),
            "{k} is not read by lora_finetune_distributed"
        );
    }
    let components = schema["components"].as_object().unwrap();
    let mut checked = 0;
    for (key, node) in c.as_hash().unwrap() {
        let Some(path) = node["_component_"].as_str() else {
            continue;
        };
        let Some(known) = components.get(path) else {
            // ft's own module, written beside the config, and torch's optimizer.
            assert!(
                path.starts_with("ft_data.")
                    || path == "torch.optim.AdamW"
                    || path == "bitsandbytes.optim.PagedAdamW",
                "{key:?}: unknown component {path}"
            );
            continue;
        };
        let params = names(&known["parameters"]);
        for arg in keys(node).into_iter().filter(|a| a != "_component_") {
            assert!(
                params.contains(&arg) || known["kwargs"] == Value::Bool(true),
                "{path} takes no {arg}"
            );
        }
        checked += 1;
    }
    assert_eq!(
        checked, 6,
        "model, checkpointer, scheduler, loss, logger and profiler"
    );

    // The model's shape: SmolLM2-135M, a plain Llama with tied embeddings.
    let m = &c["model"];
    assert_eq!(m["num_layers"].as_i64(), Some(30));
    assert_eq!(m["embed_dim"].as_i64(), Some(576));
    assert_eq!(m["num_kv_heads"].as_i64(), Some(3));
    assert_eq!(m["scale_factor"].as_i64(), Some(1));
    assert_eq!(m["tie_word_embeddings"].as_bool(), Some(true));
    assert_eq!(m["quantize_base"].as_bool(), Some(true));
    assert_eq!(m["apply_lora_to_mlp"].as_bool(), Some(true));
    assert_eq!(m["lora_attn_modules"].as_vec().unwrap().len(), 4);
    assert_eq!(c["max_steps_per_epoch"].as_i64(), Some(100));

    // The tokenizer and the data module travel with it.
    assert!(out.join("ft_data.py").exists());
    let tok: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("tokenizer/tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert!(tok["model"]["vocab"].as_object().unwrap().len() > 49_000);
    assert_eq!(segments(&out.join("data/task-train.jsonl")).len(), 1900);
    assert!(
        stdout.contains("validation (64 examples held out)"),
        "{stdout}"
    );
}

#[test]
fn a_distillation_recipe_does_not_export() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe("distill");
    let out = dir.path().join("x");
    let run = ft(&[
        "recipe",
        "export",
        r.to_str().unwrap(),
        "--to",
        "axolotl",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("[distill]"), "{}", run.stderr);
    assert!(!out.exists(), "nothing written");
    let run = ft(&["recipe", "export", r.to_str().unwrap(), "--to", "deepspeed"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("axolotl or torchtune"),
        "{}",
        run.stderr
    );
}

/// `pip install --target site ARGS` with the PEFT environment's interpreter.
fn pip(python: &Path, site: &Path, args: &[&str]) {
    let status = std::process::Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(site)
        .args(args)
        .status()
        .expect("pip");
    assert!(status.success(), "pip install {args:?}");
}

#[test]
#[ignore = "needs the PEFT environment ($FT_HOME/venvs/peft, made by `ft bench train --vs-peft`); installs axolotl 0.18.0 beside it"]
fn axolotl_validates_the_config_and_both_trainers_get_fts_tokens() {
    let python = ft_tests::ft_home().join("venvs/peft/bin/python");
    assert!(
        python.exists(),
        "run `ft bench train recipes/lora.toml --vs-peft` once first"
    );
    let site = ft_tests::ft_home().join("venvs/export-site");
    if !site.join("axolotl").exists() {
        // axolotl's own pins would replace torch; what its schema and strategies import is
        // enough.
        pip(
            &python,
            &site,
            &[
                "--no-deps",
                "axolotl==0.18.0",
                "pillow",
                "addict",
                "colorama",
            ],
        );
        pip(&python, &site, &["datasets"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let (ax, _, _) = export(dir.path(), "axolotl");
    let (tt, _, _) = export(dir.path(), "torchtune");
    let n = 4;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/export_check.py");
    let run = std::process::Command::new(&python)
        .arg(&script)
        .args([ax.as_os_str(), tt.as_os_str()])
        .arg(n.to_string())
        .env("PYTHONPATH", &site)
        .output()
        .expect("python");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let got: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(got["axolotl_unknown"], serde_json::json!([]), "{got}");
    assert_eq!(got["axolotl_optimizer"], "paged_adamw_32bit");
    assert_eq!(got["torchtune_examples"], 1900);

    // ft's tokens and masks for the same examples: each piece through `ft tokenize`.
    for (i, example) in segments(&ax.join("data/task-train.jsonl"))
        .iter()
        .take(n)
        .enumerate()
    {
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for (text, trained) in example {
            let run = ft(&["tokenize", text]);
            assert_eq!(run.code, 0, "{}", run.stderr);
            let piece: Vec<i64> = serde_json::from_str(run.stdout.trim()).unwrap();
            labels.extend(piece.iter().map(|&t| if *trained { t } else { -100 }));
            ids.extend(piece);
        }
        let want_ids = serde_json::json!(ids);
        let want_labels = serde_json::json!(labels);
        assert_eq!(
            got["axolotl"][i]["input_ids"], want_ids,
            "axolotl, example {i}"
        );
        assert_eq!(
            got["axolotl"][i]["labels"], want_labels,
            "axolotl, example {i}"
        );
        assert_eq!(
            got["torchtune"][i]["tokens"], want_ids,
            "torchtune, example {i}"
        );
        assert_eq!(
            got["torchtune"][i]["labels"], want_labels,
            "torchtune, example {i}"
        );
    }
}
