//! `--weights q8|q4`: the default model decoded by the CPU kernels over blocked weights,
//! against its f32 forward and the shared f32 reference.
//!
//! The default model's GGUF stores Q4_1 blocks: `q4` keeps them (only the activations are
//! rounded to 8 bits), `q8` requantizes their f32 values to Q8_0 (a second rounding on top of
//! the file's). Tolerances, measured on this model: perplexity with 64-token windows (so every
//! forward goes through the kernels) within 0.5% of f32 for q8 and 2% for q4; greedy tokens
//! equal to the f32 reference for the first 3 tokens of every prompt, where near-ties between
//! logits start to flip (measured: q8 keeps 8, 8, 3, 8 of the four prompts' 8 tokens, q4 5, 4,
//! 3, 8; which tokens flip moves with the kernels' summation order).

use ft_tests::{fixture, fixture_json, ft, ids};

fn perplexity(weights: &str) -> f64 {
    let file = fixture("kjv_genesis_1-3.txt");
    let out = ft(&[
        "perplexity",
        "--file",
        file.to_str().unwrap(),
        "--window",
        "64",
        "--weights",
        weights,
        "--json",
    ])
    .json();
    out["perplexity"].as_f64().unwrap()
}

#[test]
fn blocked_weights_keep_perplexity_within_tolerance() {
    let f32 = perplexity("f32");
    let q8 = perplexity("q8");
    let q4 = perplexity("q4");
    assert!((q8 / f32 - 1.0).abs() < 0.005, "q8 {q8} against f32 {f32}");
    assert!((q4 / f32 - 1.0).abs() < 0.02, "q4 {q4} against f32 {f32}");
}

#[test]
fn blocked_weights_start_with_the_reference_greedy_tokens() {
    let reference = fixture_json("smollm2_f32.json");
    for (weights, agree) in [("q4", 3), ("q8", 3)] {
        for case in reference["greedy"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            let n = agree.to_string();
            let out = ft(&[
                "generate",
                "--prompt",
                prompt,
                "--max-new-tokens",
                &n,
                "--weights",
                weights,
                "--json",
            ])
            .json();
            assert_eq!(
                ids(&out["ids"]),
                ids(&case["greedy_ids"])[..agree],
                "{weights}, prompt {prompt:?}"
            );
        }
    }
}

#[test]
fn weights_and_quant_together_are_a_usage_error() {
    ft(&[
        "generate",
        "--prompt",
        "x",
        "--weights",
        "q8",
        "--quant",
        "nf4",
    ])
    .fails_with(2, &["--weights", "--quant"]);
}

/// Perplexity of `weights` with the kernels capped at `isa` (`FT_MAX_ISA`).
fn perplexity_on(weights: &str, isa: &str) -> f64 {
    let file = fixture("kjv_genesis_1-3.txt");
    let run: ft_tests::Run = std::process::Command::new(ft_tests::ft_bin())
        .args(["perplexity", "--file", file.to_str().unwrap()])
        .args(["--window", "64", "--weights", weights, "--json"])
        .env("FT_MAX_ISA", isa)
        .output()
        .expect("spawn ft")
        .into();
    run.json()["perplexity"].as_f64().unwrap()
}

#[test]
fn the_avx2_and_vnni_kernels_give_the_same_perplexity_to_the_bit() {
    // Without AVX-512 both runs take the AVX2 kernels; with it, the VNNI ones must agree.
    for weights in ["q8", "q4"] {
        assert_eq!(
            perplexity_on(weights, "avx2").to_bits(),
            perplexity_on(weights, "avx512-vnni").to_bits(),
            "{weights}"
        );
    }
}
