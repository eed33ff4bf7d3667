//! `ft bench train --vs-peft` on a tiny model: the whole Rust side through a stand-in
//! interpreter that prints a canned result, and (ignored: it needs torch, transformers and
//! PEFT, installed from PyPI on first use) the real PEFT run agreeing with ft on the first loss.

use std::path::{Path, PathBuf};

use ft_tests::{ft, tiny, tiny_model};

/// A tiny model, a completion dataset and a two-step recipe in `dir`.
fn recipe(dir: &Path) -> PathBuf {
    let (folder, _) = tiny_model(dir, &tiny());
    let lines: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"prompt": format!("{i} plus one is"), "completion": format!(" {}", i + 1)})
                .to_string()
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), lines.join("\n")).unwrap();
    let recipe = dir.join("tiny.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\nsource = {folder:?}\n\n[lora]\nr = 4\nalpha = 8\ndropout = 0.0\ntargets = [\"q_proj\", \"v_proj\"]\n\n[data]\ntrain = \"train.jsonl\"\nformat = \"completion\"\nval_fraction = 0.25\n\n[train]\nmax_steps = 3\nmicro_batch_size = 4\nlr = 0.001\n\n[eval]\nexact_match = false\n\n[output]\ndir = \"run\"\n"
        ),
    )
    .unwrap();
    recipe
}

/// A virtual environment whose `python` passes the import check and prints a fixed result.
fn stand_in_venv(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let venv = dir.join("venv");
    std::fs::create_dir_all(venv.join("bin")).unwrap();
    let python = venv.join("bin").join("python");
    std::fs::write(
        &python,
        "#!/bin/sh\n[ \"$1\" = \"-c\" ] && exit 0\necho 'PEFT step 1/3' >&2\necho 'a notice'\necho '{\"torch\": \"0.0.0\", \"transformers\": \"0.0.1\", \"peft\": \"0.0.2\", \"threads\": 1, \"steps\": 2, \"step_s\": 0.25, \"tokens_per_s\": 100.0, \"peak_rss\": 1048576, \"first_loss\": 9.5}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    venv
}

#[test]
fn vs_peft_writes_the_job_and_tabulates_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let venv = stand_in_venv(dir.path());
    let out = dir.path().join("bench");
    let record = dir.path().join("BENCH.md");
    let run = ft(&[
        "bench",
        "train",
        recipe.to_str().unwrap(),
        "--vs-peft",
        "--peft-venv",
        venv.to_str().unwrap(),
        "--peft-steps",
        "2",
        "--peft-warmup",
        "1",
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let peer_row = "| tiny | PEFT 0.0.2 (transformers 0.0.1, torch 0.0.0) | f32 | adamw | 1 | 2 | 0.250 s | 100.0 | 1 MiB | 9.5000 | 1.00x |";
    assert!(run.stdout.contains(peer_row), "{}", run.stdout);
    assert!(
        run.stdout.contains("| tiny | ft | f32 | adamw |"),
        "{}",
        run.stdout
    );

    // The job: warm-up plus timed steps of ft's micro-batches, prompt tokens masked out.
    let job: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tiny/peft/job.json")).unwrap()).unwrap();
    assert_eq!(job["steps"].as_array().unwrap().len(), 3);
    assert_eq!(job["optimizer"]["lr"].as_array().unwrap().len(), 3);
    assert_eq!(job["lora"]["r"], 4);
    assert_eq!(
        job["lora"]["targets"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    assert_eq!(job["threads"], 1);
    assert_eq!(job["warmup"], 1);
    let batch = &job["steps"][0][0];
    assert_eq!(batch["input_ids"].as_array().unwrap().len(), 4);
    let row0: Vec<i64> = batch["labels"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(row0[0], -100, "the first token is never a label");
    assert!(
        row0.iter().any(|&l| l != -100),
        "the completion is labelled"
    );
    let base = PathBuf::from(job["model"].as_str().unwrap());
    assert!(base.join("config.json").is_file() && base.join("model.safetensors").is_file());
    assert!(out.join("tiny/peft/peft_train.py").is_file());
    assert_eq!(
        std::fs::read_to_string(out.join("tiny/peft/peft.log")).unwrap(),
        "PEFT step 1/3\n"
    );

    let recorded = std::fs::read_to_string(&record).unwrap();
    assert!(recorded.contains("Command: `"), "{recorded}");
    assert!(recorded.contains("Machine: "), "{recorded}");
    assert!(recorded.contains(peer_row), "{recorded}");
}

#[test]
#[ignore = "needs torch, transformers and peft: the first run installs them from PyPI into $FT_HOME/venvs/peft"]
fn real_peft_starts_from_the_same_loss_as_ft() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let out = dir.path().join("bench");
    let run = ft(&[
        "bench",
        "train",
        recipe.to_str().unwrap(),
        "--vs-peft",
        "--peft-steps",
        "2",
        "--peft-warmup",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let step_one_loss = |engine: &str| -> f64 {
        let line = run
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("| tiny | {engine}")))
            .unwrap_or_else(|| panic!("no {engine} row in\n{}", run.stdout));
        line.split('|').nth(10).unwrap().trim().parse().unwrap()
    };
    let (ft_loss, peft_loss) = (step_one_loss("ft"), step_one_loss("PEFT"));
    assert!(
        (ft_loss - peft_loss).abs() <= 1e-3 * ft_loss.abs().max(1.0),
        "ft {ft_loss} vs PEFT {peft_loss}"
    );
}
