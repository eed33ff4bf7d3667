//! Quantized bases through the CLI: `--quant`, `ft quant save` and `ft quant compare`.

use ft_tests::{ft, tiny, tiny_model};

#[test]
fn a_saved_nf4_model_generates_like_the_model_quantized_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let gguf = gguf.to_str().unwrap();
    let saved = dir.path().join("nf4");
    let out = ft(&[
        "quant",
        "save",
        "--model",
        gguf,
        "--format",
        "nf4",
        "--double-quant",
        saved.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let gen = |args: &[&str]| {
        let mut all = vec![
            "generate",
            "--prompt",
            "abc",
            "--max-new-tokens",
            "10",
            "--json",
        ];
        all.extend(args);
        ft(&all).json()["ids"].clone()
    };
    let on_load = gen(&["--model", gguf, "--quant", "nf4", "--double-quant"]);
    assert_eq!(gen(&["--model", saved.to_str().unwrap()]), on_load);
    let config = std::fs::read_to_string(saved.join("config.json")).unwrap();
    assert!(
        config.contains("\"bnb_4bit_quant_type\":\"nf4\""),
        "{config}"
    );
}

#[test]
fn compare_writes_a_table_and_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let text = dir.path().join("t.txt");
    std::fs::write(
        &text,
        "a small text to score, twice: a small text to score.",
    )
    .unwrap();
    let out_dir = dir.path().join("report");
    let out = ft(&[
        "quant",
        "compare",
        "--model",
        gguf.to_str().unwrap(),
        "--formats",
        "int8,nf4+dq",
        "--file",
        text.to_str().unwrap(),
        "--window",
        "32",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let table = std::fs::read_to_string(out_dir.join("quant-compare.md")).unwrap();
    for row in ["| f32 |", "| int8 |", "| nf4+dq |"] {
        assert!(table.contains(row), "{table}");
    }
    assert!(
        table.contains("| 4.127 |") || table.contains("| 4.1"),
        "{table}"
    );
    let svg = std::fs::read_to_string(out_dir.join("perplexity-vs-bytes.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("nf4+dq"));
}

#[test]
fn an_unknown_format_is_a_usage_error() {
    ft(&["generate", "--prompt", "x", "--quant", "q3"]).fails_with(2, &["--quant", "q3"]);
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let out = dir.path().join("x");
    ft(&[
        "quant",
        "save",
        "--model",
        gguf.to_str().unwrap(),
        "--format",
        "int8-block",
        out.to_str().unwrap(),
    ])
    .fails_with(1, &["int8-block has no bitsandbytes layout"]);
}
