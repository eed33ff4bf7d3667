//! The adapter registry through `ft adapters` and `ft train`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ft_adapters::peft::{LoraWeights, Matrix, PeftConfig};
use ft_adapters::PeftAdapter;
use ft_tests::{ft, ft_bin, tiny, tiny_model};

fn write_adapter(dir: &Path, seed: f32) {
    let config: PeftConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["v_proj"], "bias": "none", "base_model_name_or_path": "tiny"
    }))
    .unwrap();
    let m = |shape: [usize; 2]| Matrix {
        shape,
        data: (0..shape[0] * shape[1])
            .map(|i| (i % 7) as f32 * seed)
            .collect(),
    };
    let mut modules = BTreeMap::new();
    for i in 0..2 {
        modules.insert(
            format!("model.layers.{i}.self_attn.v_proj"),
            LoraWeights {
                a: m([4, 32]),
                b: m([16, 4]),
            },
        );
    }
    PeftAdapter { config, modules }.write(dir).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn add_list_show_export_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, a) = (dir.path().join("reg"), dir.path().join("a"));
    write_adapter(&a, 0.01);
    let added = ft(&[
        "adapters",
        "add",
        s(&a),
        "--name",
        "v-adapter",
        "--task",
        "dates",
        "--registry",
        s(&reg),
    ]);
    assert_eq!(added.stdout.trim(), "added v-adapter:1", "{}", added.stderr);
    assert_eq!(
        ft(&[
            "adapters",
            "add",
            s(&a),
            "--name",
            "v-adapter",
            "--registry",
            s(&reg)
        ])
        .stdout
        .trim(),
        "added v-adapter:2"
    );

    let list = ft(&["adapters", "list", "--json", "--registry", s(&reg)]).json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["task"], "dates");
    assert_eq!(list[0]["r"], 4);
    assert_eq!(list[0]["target_modules"], serde_json::json!(["v_proj"]));
    assert_eq!(list[0]["base_model"], "tiny");
    assert_eq!(list[0]["files"].as_object().unwrap().len(), 2);
    assert_eq!(
        ft(&["adapters", "show", "v-adapter", "--registry", s(&reg)]).json()["version"],
        2
    );

    let out = dir.path().join("out");
    assert_eq!(
        ft(&[
            "adapters",
            "export",
            "v-adapter:1",
            s(&out),
            "--registry",
            s(&reg)
        ])
        .code,
        0
    );
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(a.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        ft(&["adapters", "rm", "v-adapter:1", "--registry", s(&reg)])
            .stdout
            .trim(),
        "removed v-adapter:1"
    );
    ft(&["adapters", "show", "v-adapter:1", "--registry", s(&reg)])
        .fails_with(1, &["no adapter v-adapter:1 in the registry"]);
    ft(&["adapters", "show", "../etc", "--registry", s(&reg)])
        .fails_with(2, &["adapter name \"../etc\""]);
    ft(&[
        "adapters",
        "add",
        s(&a),
        "--name",
        "a/b",
        "--registry",
        s(&reg),
    ])
    .fails_with(2, &["adapter name \"a/b\""]);
    ft(&[
        "adapters",
        "add",
        s(&dir.path().join("none")),
        "--name",
        "x",
        "--registry",
        s(&reg),
    ])
    .fails_with(1, &["adapter_config.json"]);
    assert_eq!(
        ft(&["adapters", "list", "--json", "--registry", s(&reg)])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "failed adds leave no record"
    );
}

#[test]
fn two_processes_adding_at_once_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, a) = (dir.path().join("reg"), dir.path().join("a"));
    write_adapter(&a, 0.02);
    let script = format!(
        "for i in 1 2 3 4 5 6; do {} adapters add {} --name shared --registry {} || exit 1; done",
        s(&ft_bin()),
        s(&a),
        s(&reg)
    );
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new("sh")
                .args(["-c", &script])
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let list = ft(&["adapters", "list", "--json", "--registry", s(&reg)]).json();
    let versions: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=12).collect::<Vec<u64>>());
}

#[test]
fn train_registers_its_adapter_with_recipe_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, _) = tiny_model(dir.path(), &tiny());
    std::fs::write(
        dir.path().join("t.jsonl"),
        "{\"text\": \"abc abc abc\"}\n{\"text\": \"abd abd\"}\n",
    )
    .unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!("[model]\nsource = {folder:?}\n[data]\ntrain = \"t.jsonl\"\nformat = \"text\"\nval_fraction = 0.0\n[train]\nmax_steps = 2\n[output]\ndir = {:?}\nadapter_name = \"abc\"\nregistry = {:?}\n", dir.path().join("run"), dir.path().join("reg")),
    )
    .unwrap();
    let run = ft(&["train", s(&recipe)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("registered abc:1"), "{}", run.stdout);
    let record = ft(&[
        "adapters",
        "show",
        "abc",
        "--registry",
        s(&dir.path().join("reg")),
    ])
    .json();
    assert!(record["recipe"]
        .as_str()
        .unwrap()
        .contains("adapter_name = \"abc\""));
    assert_eq!(record["metrics"]["steps"], 2);
    assert!(
        record["base_sha256"].is_null(),
        "an HF folder has no single-file hash"
    );
}

/// Runs `ft args` as a user who may read but not write `dir`: as root, the process drops to
/// `nobody` (root writes anywhere); as anyone else, `dir` is made read-only.
fn ft_without_write_access(dir: &Path, args: &[&str]) -> ft_tests::Run {
    let chmod = |mode: &str| {
        let status = Command::new("chmod")
            .args(["-R", mode, s(dir)])
            .status()
            .unwrap();
        assert!(status.success());
    };
    chmod("a+rX,a-w");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    let run: ft_tests::Run = if root {
        // The temporary folders above `dir` must let `nobody` through.
        let mut up = dir.parent();
        while let Some(p) =
            up.filter(|p| p.starts_with(std::env::temp_dir()) && *p != std::env::temp_dir())
        {
            Command::new("chmod").args(["a+x", s(p)]).status().unwrap();
            up = p.parent();
        }
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(ft_bin())
            .args(args)
            .output()
            .expect("setpriv (util-linux)")
            .into()
    } else {
        ft(args)
    };
    chmod("u+w");
    run
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn a_registry_that_cannot_be_written_can_still_be_listed_shown_and_exported() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, a) = (dir.path().join("reg"), dir.path().join("a"));
    write_adapter(&a, 0.01);
    let added = ft(&[
        "adapters",
        "add",
        s(&a),
        "--name",
        "x",
        "--registry",
        s(&reg),
    ]);
    assert_eq!(added.code, 0, "{}", added.stderr);
    let out = tempfile::tempdir().unwrap();
    Command::new("chmod")
        .args(["a+rwx", s(out.path())])
        .status()
        .unwrap();
    let list =
        ft_without_write_access(&reg, &["adapters", "list", "--json", "--registry", s(&reg)]);
    assert_eq!(list.json().as_array().unwrap().len(), 1, "{}", list.stderr);
    let show = ft_without_write_access(&reg, &["adapters", "show", "x", "--registry", s(&reg)]);
    assert_eq!(show.json()["name"], "x");
    let dest = out.path().join("x");
    let export = ft_without_write_access(
        &reg,
        &["adapters", "export", "x", s(&dest), "--registry", s(&reg)],
    );
    assert_eq!(export.code, 0, "{}", export.stderr);
    assert!(dest.join("adapter_model.safetensors").is_file());
    // Writing still fails, with an error naming the registry: the folder really is
    // read-only to that user.
    ft_without_write_access(
        &reg,
        &[
            "adapters",
            "add",
            s(&a),
            "--name",
            "y",
            "--registry",
            s(&reg),
        ],
    )
    .fails_with(1, &[s(&reg)]);
}
