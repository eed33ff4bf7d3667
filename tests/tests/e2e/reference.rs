//! The default model through the CLI, against the shared reference outputs.

use ft_tests::{fixture, fixture_json, ft, ids};

#[test]
fn tokenize_matches_llama_cpp_on_every_text() {
    let reference = fixture_json("smollm2_llamacpp.json");
    for case in reference["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = ids(&ft(&["tokenize", text]).json());
        assert_eq!(got, ids(&case["ids"]), "text {text:?}");
    }
}

#[test]
fn first_eight_greedy_tokens_match_the_f32_reference() {
    let reference = fixture_json("smollm2_f32.json");
    for case in reference["greedy"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let out = ft(&[
            "generate",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "8",
            "--weights",
            "f32",
            "--json",
        ])
        .json();
        assert_eq!(
            ids(&out["ids"]),
            ids(&case["greedy_ids"])[..8],
            "prompt {prompt:?}"
        );
        assert_eq!(
            out["prompt_tokens"].as_u64().unwrap() as usize,
            ids(&case["prompt_ids"]).len()
        );
        assert!(out["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(out["text"].as_str().unwrap().len() > 8);
    }
}

#[test]
fn perplexity_of_genesis_matches_the_reference() {
    let file = fixture("kjv_genesis_1-3.txt");
    let out = ft(&[
        "perplexity",
        "--file",
        file.to_str().unwrap(),
        "--window",
        "256",
        "--weights",
        "f32",
        "--json",
    ])
    .json();
    assert_eq!(out["tokens"], 2841);
    assert_eq!(out["scored"], 2829);
    let ppl = out["perplexity"].as_f64().unwrap();
    assert!((ppl / 7.8195 - 1.0).abs() < 0.005, "perplexity {ppl}");
}

#[test]
fn chat_prompts_go_through_the_model_template() {
    let out = ft(&[
        "generate",
        "--chat",
        "--prompt",
        "Name three primary colors.",
        "--max-new-tokens",
        "6",
        "--json",
    ])
    .json();
    // The template adds SmolLM2's default system turn around the user message.
    let templated = ft(&[
        "tokenize",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    ])
    .json();
    assert_eq!(
        out["prompt_tokens"].as_u64().unwrap() as usize,
        ids(&templated).len()
    );
    assert!(
        out["text"].as_str().unwrap().contains("primary colors"),
        "{out}"
    );
}
