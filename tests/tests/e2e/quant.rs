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

/// The tiny model with every projection's inputs a whole number of NF4's blocks of 64.
fn whole_blocks() -> ft_model::LlamaConfig {
    ft_model::LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        head_dim: 16,
        ..tiny()
    }
}

/// `ft quant gptq` and `ft quant rtn` on a tiny model whose projections hold whole groups of
/// 64: the files load where `--model` goes, and bad input is a one-line usage error.
#[test]
fn gptq_and_rtn_write_models_that_load_and_bad_input_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &whole_blocks());
    let gguf = gguf.to_str().unwrap();
    let calib = dir.path().join("calib.txt");
    std::fs::write(
        &calib,
        "In the beginning was the word, and the word was with it. ".repeat(20),
    )
    .unwrap();
    let calib = calib.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["quant"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--model", gguf]);
        ft(&all)
    };
    let gptq = |format: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "gptq",
            "--format",
            format,
            "--out",
            out,
            "--calib",
            calib,
            "--calib-samples",
            "6",
            "--calib-len",
            "32",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let generate = |model: &str| {
        let out = ft(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "abc",
            "--max-new-tokens",
            "5",
            "--json",
        ]);
        assert_eq!(out.code, 0, "{model}: {}", out.stderr);
        out.json()["ids"].as_array().unwrap().len()
    };
    for (format, file, extra) in [
        ("q4_0", "gptq-q4_0.gguf", vec!["--act-order"]),
        ("q8_0", "gptq-q8_0.gguf", vec![]),
        ("int3", "gptq-int3", vec!["--group", "16"]),
        ("nf4", "gptq-nf4", vec!["--double-quant"]),
    ] {
        let out = dir.path().join(file);
        let done = gptq(format, out.to_str().unwrap(), &extra);
        assert_eq!(done.code, 0, "{format}: {}", done.stderr);
        assert!(
            done.stdout.contains("with GPTQ on 6 windows of 32 tokens"),
            "{}",
            done.stdout
        );
        assert!(generate(out.to_str().unwrap()) > 0);
    }
    let config = std::fs::read_to_string(dir.path().join("gptq-nf4/config.json")).unwrap();
    assert!(
        config.contains("\"bnb_4bit_use_double_quant\":true"),
        "{config}"
    );
    let rtn = dir.path().join("rtn-q4_1.gguf");
    let done = run(&["rtn", "--format", "q4_1", "--out", rtn.to_str().unwrap()]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    assert!(generate(rtn.to_str().unwrap()) > 0);

    let out = dir.path().join("bad.gguf");
    let out = out.to_str().unwrap();
    gptq("q4_0", out, &["--group", "16"]).fails_with(2, &["--group"]);
    gptq("int3", out, &["--group", "24"]).fails_with(2, &["--group", "24"]);
    gptq("q5_0", out, &[]).fails_with(2, &["--format"]);
    gptq("q4_0", out, &["--double-quant"]).fails_with(2, &["--double-quant"]);
    run(&[
        "gptq",
        "--format",
        "q4_0",
        "--out",
        out,
        "--calib",
        calib,
        "--calib-len",
        "100",
    ])
    .fails_with(2, &["--calib-len", "64"]);
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    run(&[
        "gptq",
        "--format",
        "q4_0",
        "--out",
        out,
        "--calib",
        empty.to_str().unwrap(),
        "--calib-len",
        "32",
    ])
    .fails_with(2, &["--calib", "0 tokens"]);
    assert!(
        !std::path::Path::new(out).exists(),
        "nothing written on a usage error"
    );
}

/// `ft quant awq` on a tiny model: with clipping and RTN, with GPTQ after, without
/// clipping; every file loads where `--model` goes, and bad input is a usage error.
#[test]
fn awq_writes_models_that_load_and_bad_input_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &whole_blocks());
    let gguf = gguf.to_str().unwrap();
    let awq = |format: &str, out: &str, extra: &[&str]| {
        let mut args = vec![
            "quant",
            "awq",
            "--model",
            gguf,
            "--format",
            format,
            "--out",
            out,
            "--calib-samples",
            "6",
        ];
        args.extend_from_slice(extra);
        if !extra.contains(&"--calib-len") {
            args.extend_from_slice(&["--calib-len", "32"]);
        }
        ft(&args)
    };
    for (format, file, extra, says) in [
        ("q4_0", "awq-q4_0.gguf", vec![], "(rtn)"),
        (
            "nf4",
            "awq-gptq-nf4",
            vec!["--then", "gptq", "--double-quant"],
            "(gptq)",
        ),
        (
            "int3",
            "awq-int3",
            vec!["--no-clip", "--group", "16"],
            "(rtn)",
        ),
    ] {
        let out = dir.path().join(file);
        let done = awq(format, out.to_str().unwrap(), &extra);
        assert_eq!(done.code, 0, "{format}: {}", done.stderr);
        assert!(
            done.stdout.contains("AWQ scales") && done.stdout.contains(says),
            "{}",
            done.stdout
        );
        assert_eq!(
            done.stdout.contains("clipping"),
            !extra.contains(&"--no-clip"),
            "{}",
            done.stdout
        );
        let generated = ft(&[
            "generate",
            "--model",
            out.to_str().unwrap(),
            "--prompt",
            "abc",
            "--max-new-tokens",
            "4",
        ]);
        assert_eq!(generated.code, 0, "{format}: {}", generated.stderr);
    }
    let out = dir.path().join("bad.gguf");
    let out = out.to_str().unwrap();
    awq("q4_0", out, &["--then", "exact"]).fails_with(2, &["--then", "exact"]);
    awq("q4_0", out, &["--grid", "0"]).fails_with(2, &["--grid"]);
    awq("q4_0", out, &["--then", "gptq", "--damp", "0"]).fails_with(2, &["--damp"]);
    awq("q4_0", out, &["--calib-len", "100"]).fails_with(2, &["--calib-len", "64"]);
    assert!(!std::path::Path::new(out).exists());
}

/// `ft quant compare --ptq`: one row per format and method, each written by its command and
/// scored as written, with the share of RTN's excess each method removes.
#[test]
fn compare_tabulates_the_methods_of_each_format() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &whole_blocks());
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
        "f32",
        "--ptq",
        "q4_0,int3",
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
        "--file",
        text.to_str().unwrap(),
        "--second-file",
        text.to_str().unwrap(),
        "--window",
        "32",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let table = std::fs::read_to_string(out_dir.join("quant-compare.md")).unwrap();
    for row in [
        "| f32 | - | ft |",
        "| q4_0 | RTN | ft |",
        "| q4_0 | GPTQ | ft |",
        "| q4_0 | AWQ | ft |",
        "| int3 | AWQ + GPTQ | ft |",
        "RTN's excess removed",
    ] {
        assert!(table.contains(row), "{row}: {table}");
    }
    // The second text is the first here: both perplexities agree on every row.
    for line in table.lines().filter(|l| l.starts_with("| q4_0 | GPTQ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cells[11], cells[14], "{line}");
    }
    ft(&["quant", "compare", "--ptq", "q5_0"]).fails_with(2, &["--ptq", "q5_0"]);
    ft(&["quant", "compare", "--ptq", "q4_0", "--methods", "hqq"]).fails_with(2, &["hqq"]);
}

/// `quant.method = "gptq"`: a fine-tuning run quantizes its base to NF4 with GPTQ on the
/// bundled calibration text, or (`quant.calib = "data"`) on its own training examples, then
/// trains over it.
#[test]
fn a_recipe_trains_over_a_base_gptq_quantized_to_nf4() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, _) = tiny_model(dir.path(), &whole_blocks());
    let lines: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "{{\"prompt\": \"{i} plus one is\", \"completion\": \" {}\"}}",
                i + 1
            )
        })
        .collect();
    std::fs::write(dir.path().join("train.jsonl"), lines.join("\n")).unwrap();
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\nsource = {folder:?}\n\n[quant]\nbase = \"nf4\"\ndouble_quant = true\nmethod = \"gptq\"\n\n[lora]\nr = 4\nalpha = 8\ntargets = [\"q_proj\", \"down_proj\"]\n\n[data]\ntrain = \"train.jsonl\"\nformat = \"completion\"\nval_fraction = 0.25\n\n[train]\nmax_steps = 2\nmicro_batch_size = 2\neval_every = 0\nsave_every = 0\n\n[output]\ndir = \"run\"\n"
        ),
    )
    .unwrap();
    for calib in ["bundled", "data"] {
        let out = dir.path().join(format!("run-{calib}"));
        let set = format!("output.dir={out:?}");
        let calib_set = format!("quant.calib=\"{calib}\"");
        let run = ft(&[
            "train",
            recipe.to_str().unwrap(),
            "--set",
            &set,
            "--set",
            &calib_set,
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let said = format!("quantized the base to NF4 with GPTQ on {calib} calibration text");
        assert!(run.stdout.contains(&said), "{}", run.stdout);
        assert!(out.join("adapter_model.safetensors").exists());
    }
}
