//! `ft train` with a `[distill]` recipe on a tiny teacher, as a user runs it: the student
//! folder it writes loads in `ft generate`, the offline cache is reused, bad students are
//! refused before any compute.

use std::path::PathBuf;

use ft_tests::{ft, tiny, tiny_model};

/// A tiny teacher, text and chat data, and a distillation recipe in one temporary folder.
struct DistillFixture {
    dir: tempfile::TempDir,
    recipe: PathBuf,
}

impl DistillFixture {
    fn new(distill: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (folder, _) = tiny_model(dir.path(), &tiny());
        let text: Vec<String> = (0..16)
            .map(|i| {
                serde_json::json!({"text": format!("line {i}: the cat sat on mat {i}")}).to_string()
            })
            .collect();
        let chat: Vec<String> = (0..8)
            .map(|i| {
                serde_json::json!({"messages": [
                    {"role": "user", "content": format!("count to {i}")},
                    {"role": "assistant", "content": format!("{}", i + 1)},
                ]})
                .to_string()
            })
            .collect();
        std::fs::write(dir.path().join("text.jsonl"), text.join("\n")).unwrap();
        std::fs::write(dir.path().join("chat.jsonl"), chat.join("\n")).unwrap();
        std::fs::write(dir.path().join("held-out.txt"), "the cat sat on the mat 7").unwrap();
        let recipe = dir.path().join("recipe.toml");
        std::fs::write(
            &recipe,
            format!(
                "[model]\nsource = {folder:?}\n\n[distill]\n{distill}\neval_texts = [\"held-out.txt\", \"chat.jsonl\"]\n\n[data]\npacking = true\nmax_seq_len = 64\nval_fraction = 0.2\n\n[[data.mix]]\ntrain = \"text.jsonl\"\nformat = \"text\"\n\n[[data.mix]]\ntrain = \"chat.jsonl\"\nformat = \"chat\"\n\n[train]\nmax_steps = 6\nmicro_batch_size = 2\nlr = 0.003\n\n[output]\ndir = \"run\"\n"
            ),
        )
        .unwrap();
        Self { dir, recipe }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn train(&self, out: &str, extra: &[&str]) -> ft_tests::Run {
        let set = format!("output.dir={}", self.path(out).display());
        let mut args = vec!["train", self.recipe.to_str().unwrap(), "--set", &set];
        args.extend_from_slice(extra);
        ft(&args)
    }

    fn summary(&self, out: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.path(out).join("summary.json")).unwrap())
            .unwrap()
    }
}

#[test]
fn a_distilled_student_is_an_hf_folder_that_generate_loads() {
    let f = DistillFixture::new("init = \"every_other_layer\"\nalpha = 0.5\ntemperature = 2.0");
    let run = f.train("run", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let s = f.summary("run");
    assert_eq!(s["teacher_layers"], 2);
    assert_eq!(s["student_layers"], 1);
    assert!(s["student_weight_bytes"].as_u64() < s["teacher_weight_bytes"].as_u64());
    assert!(
        s["val_loss"].as_f64() < s["val_loss_before"].as_f64(),
        "{s}"
    );
    let texts = s["texts"].as_array().unwrap();
    assert_eq!(texts.len(), 2);
    assert_eq!(texts[0]["file"], "held-out.txt");
    assert!(texts.iter().all(|t| t["scored"].as_u64().unwrap() > 0));
    let student = f.path("run/student");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(student.join(file).is_file(), "{file}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(student.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    let g = ft(&[
        "generate",
        "--model",
        student.to_str().unwrap(),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(g.code, 0, "{}", g.stderr);
}

#[test]
fn the_offline_teacher_cache_is_built_once_and_reused() {
    let f = DistillFixture::new("mode = \"offline\"\ntop_k = 8\nloss = \"jsd\"\nbeta = 0.5");
    let first = f.train("run", &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(f.path("run/teacher-topk.safetensors").is_file());
    let again = f.train("run", &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stdout.contains("reusing the teacher's top-8 logits"),
        "{}",
        again.stdout
    );
    assert_eq!(f.summary("run")["cache_build_s"], 0.0);
    // Another k does not match the file: it is computed again.
    let other = f.train("run", &["--set", "distill.top_k=4"]);
    assert_eq!(other.code, 0, "{}", other.stderr);
    assert!(!other.stdout.contains("reusing"), "{}", other.stdout);
    // Other training text: the cache of the same k is not reused either.
    let text: Vec<String> = (0..16)
        .map(|i| {
            serde_json::json!({"text": format!("line {i}: the dog sat on log {i}")}).to_string()
        })
        .collect();
    std::fs::write(f.path("text.jsonl"), text.join("\n")).unwrap();
    let changed = f.train("run", &["--set", "distill.top_k=4"]);
    assert_eq!(changed.code, 0, "{}", changed.stderr);
    assert!(!changed.stdout.contains("reusing"), "{}", changed.stdout);
}

/// The teacher here is stored in NF4 (`[quant]`), the student made of its second layer.
#[test]
fn on_policy_lora_distillation_samples_from_the_student() {
    let f = DistillFixture::new(
        "init = [1]\nmethod = \"lora\"\nlmbda = 1.0\nmax_new_tokens = 4\nloss = \"reverse_kl\"",
    );
    // Prompts plus sampled tokens must fit the tiny model's 64 positions.
    let run = f.train(
        "run",
        &["--set", "data.max_seq_len=48", "--set", "quant.base=nf4"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let s = f.summary("run");
    assert_eq!(s["on_policy_steps"], 6);
    assert!(f.path("run/adapter_model.safetensors").is_file());
    // The adapter's layers are the student's, so its base is the student folder.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.path("run/adapter_config.json")).unwrap()).unwrap();
    let base = config["base_model_name_or_path"].as_str().unwrap();
    assert!(base.ends_with("student"), "{base}");
    assert!(f.path("run/student/config.json").is_file());
    // Sampled batches are padded up to the length buckets as drawn ones are; the sampled
    // rows longer than the last bucket (48) keep their length, inside the model's 64.
    let run = f.train(
        "bucketed",
        &[
            "--set",
            "data.max_seq_len=48",
            "--set",
            "quant.base=nf4",
            "--set",
            "train.length_buckets=true",
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(f.summary("bucketed")["on_policy_steps"], 6);
}

#[test]
fn a_student_with_another_vocabulary_is_refused_before_training() {
    let f = DistillFixture::new("alpha = 0.5");
    let mut other = tiny();
    other.vocab_size += 8;
    let (student, _) = tiny_model(&f.path("other"), &other);
    let run = f.train(
        "run",
        &["--set", &format!("distill.student={}", student.display())],
    );
    run.fails_with(1, &["distill.student", "vocabularies differ"]);
    assert!(!f.path("run/summary.json").exists());
}

#[test]
fn bad_distill_keys_are_usage_errors_that_name_them() {
    let f = DistillFixture::new("init = \"every_third_layer\"");
    f.train("run", &[])
        .fails_with(2, &["distill.init", "every_other_layer"]);
    let f = DistillFixture::new("mode = \"offline\"\nlmbda = 0.5");
    f.train("run", &[])
        .fails_with(2, &["distill.lmbda", "online"]);
    let f = DistillFixture::new("temperature = 0");
    f.train("run", &[]).fails_with(2, &["distill.temperature"]);
}

/// `(step, loss)` of every line of a run's metrics.jsonl.
fn losses(run: &std::path::Path) -> Vec<(u64, f64)> {
    ft_tests::metrics(run)
        .iter()
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["train/loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_resumed_distillation_continues_as_the_straight_run() {
    let f = DistillFixture::new("alpha = 0.3\nlmbda = 0.5\nmax_new_tokens = 4");
    let fit = [
        "--set",
        "data.max_seq_len=48",
        "--set",
        "train.save_every=3",
    ];
    let straight = f.train("straight", &fit);
    assert_eq!(straight.code, 0, "{}", straight.stderr);
    let checkpoint = f.path("straight/checkpoints/step-000003");
    assert!(checkpoint.join("student/model.safetensors").is_file());
    let mut args = fit.to_vec();
    let from = checkpoint.display().to_string();
    args.extend(["--resume", from.as_str()]);
    let resumed = f.train("resumed", &args);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert!(
        resumed.stdout.contains("resuming from"),
        "{}",
        resumed.stdout
    );
    // Full-parameter gradients on the CPU backend vary in their last bits from run to run
    // (burn sums some of them in parallel), so a resumed run matches the straight one to
    // rounding, not bit for bit.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 + 1e-3 * b.abs();
    let tail: Vec<(u64, f64)> = losses(&f.path("straight")).into_iter().skip(3).collect();
    let resumed_losses = losses(&f.path("resumed"));
    assert_eq!(resumed_losses.len(), tail.len());
    for ((s1, l1), (s2, l2)) in resumed_losses.iter().zip(&tail) {
        assert!(s1 == s2 && close(*l1, *l2), "step {s1}: {l1} vs {l2}");
    }
    let (a, b) = (f.summary("straight"), f.summary("resumed"));
    for key in ["val_loss_before", "teacher_val_loss", "on_policy_steps"] {
        assert_eq!(a[key], b[key], "{key}: kept in the checkpoint");
    }
    let texts = |s: &serde_json::Value| s["texts"].as_array().unwrap().clone();
    for (x, y) in texts(&a).iter().zip(&texts(&b)) {
        assert_eq!(x["student_before"], y["student_before"]);
        assert_eq!(x["teacher"], y["teacher"]);
        let (p, q) = (
            x["student_after"].as_f64().unwrap(),
            y["student_after"].as_f64().unwrap(),
        );
        assert!(close(p, q), "{p} vs {q}");
    }
}
