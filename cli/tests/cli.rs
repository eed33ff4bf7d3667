//! The command line's own contract: help, version and usage exit codes. (The behaviour of each
//! command is tested end to end in the `tests/` crate; this file also makes `cargo test`
//! build the `ft` binary those tests run.)

use std::process::Command;

fn ft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ft"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_lists_every_command() {
    let out = ft(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["tokenize", "generate", "perplexity", "bench"] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = ft(&[
        "generate",
        "--device",
        "cuda",
        "--model",
        "/no/such/model.gguf",
        "--prompt",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("built without CUDA"), "{err}");
}

#[test]
fn training_on_cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.toml");
    std::fs::write(&recipe, "[data]\ntask = \"dates\"\n").unwrap();
    let out = ft(&["train", recipe.to_str().unwrap(), "--device", "cuda:1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("built without CUDA"), "{err}");
}
