//! Tiny random models the tests write themselves, in both checkpoint formats.

use ft_tests::{ft, ids, tiny, tiny_model};

#[test]
fn hf_folder_and_gguf_of_one_model_generate_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, gguf) = tiny_model(dir.path(), &tiny());
    let run = |model: &std::path::Path| {
        ft(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-new-tokens",
            "12",
            "--json",
        ])
        .json()
    };
    let (a, b) = (run(&folder), run(&gguf));
    assert_eq!(a["ids"], b["ids"]);
    assert_eq!(a["prompt_tokens"], 5);
    assert!(ids(&a["ids"]).len() <= 12);
}

#[test]
fn sampling_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let run = |seed: &str| {
        ft(&[
            "generate",
            "--model",
            gguf.to_str().unwrap(),
            "--prompt",
            "abc",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ])
        .json()["ids"]
            .clone()
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn chat_and_perplexity_work_on_a_tiny_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, _) = tiny_model(dir.path(), &tiny());
    let model = folder.to_str().unwrap();
    let out = ft(&[
        "generate",
        "--model",
        model,
        "--chat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
        "--json",
    ])
    .json();
    // <|im_start|>, "user\nhi" (7 bytes), <|im_end|>, "\n", <|im_start|>, "assistant\n" (10 bytes).
    assert_eq!(out["prompt_tokens"], 1 + 7 + 1 + 1 + 1 + 10);
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "the quick brown fox jumps over the lazy dog ".repeat(3),
    )
    .unwrap();
    let out = ft(&[
        "perplexity",
        "--model",
        model,
        "--file",
        text.to_str().unwrap(),
        "--window",
        "32",
        "--json",
    ])
    .json();
    assert_eq!(out["tokens"], 132);
    assert_eq!(out["scored"], 132 - 5);
    let ppl = out["perplexity"].as_f64().unwrap();
    // A random model is close to uniform over its 259 tokens.
    assert!(ppl > 100.0 && ppl < 600.0, "{ppl}");
}
