//! Prompt compression as a user meets it: `ft compress` shortens a context with the default
//! model and keeps the instruction and question; `ft eval --shots N --compress R` measures
//! few-shot prompts whole and compressed, with the prompt tokens the server counted.

use std::path::Path;

use ft_tests::{ft, tiny, tiny_model};
use serde_json::Value;

/// Four solved examples of the bundled `dates` task, one paragraph each.
const DEMOS: &str =
    "Write the date in ISO format (YYYY-MM-DD).\nDate: September 16, 1994\nISO: 1994-09-16\n\n\
Write the date in ISO format (YYYY-MM-DD).\nDate: March 26, 1953\nISO: 1953-03-26\n\n\
Write the date in ISO format (YYYY-MM-DD).\nDate: 19 March 1975\nISO: 1975-03-19\n\n\
Write the date in ISO format (YYYY-MM-DD).\nDate: July 4, 2012\nISO: 2012-07-04";

const QUESTION: &str = "Write the date in ISO format (YYYY-MM-DD).\nDate: 2 November 2001\nISO:";

#[test]
fn the_default_model_shortens_demonstrations_and_keeps_instruction_and_question() {
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("demos.txt");
    std::fs::write(&context, DEMOS).unwrap();
    let compress = |rate: &str| {
        ft(&[
            "compress",
            "--rate",
            rate,
            "--instruction",
            "Answer like the examples.",
            "--question",
            QUESTION,
            "--json",
            context.to_str().unwrap(),
        ])
        .json()
    };
    let whole = compress("1");
    assert_eq!(
        whole["prompt"],
        format!("Answer like the examples.\n\n{DEMOS}\n\n{QUESTION}")
    );
    assert_eq!(whole["tokens_after"], whole["tokens_before"]);
    assert_eq!(whole["words_dropped"], 0);

    let half = compress("0.5");
    let before = half["tokens_before"].as_u64().unwrap();
    let after = half["tokens_after"].as_u64().unwrap();
    assert_eq!(before, whole["tokens_before"].as_u64().unwrap());
    assert!(
        after <= before.div_ceil(2) && after > before / 4,
        "{after} of {before}"
    );
    let prompt = half["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with("Answer like the examples.\n\n"),
        "{prompt}"
    );
    assert!(prompt.ends_with(&format!("\n\n{QUESTION}")), "{prompt}");
    // Demonstrations go whole first: fewer paragraphs than the four shown.
    let shown = half["context"].as_str().unwrap().split("\n\n").count();
    assert!(shown < 4, "{half}");

    // Standard input is read when no file is named.
    let piped = std::process::Command::new(ft_tests::ft_bin())
        .args(["compress", "--rate", "0.5", "--question", QUESTION])
        .stdin(std::fs::File::open(&context).unwrap())
        .output()
        .unwrap();
    assert!(piped.status.success());
    let text = String::from_utf8(piped.stdout).unwrap();
    assert!(text.trim_end().ends_with(QUESTION), "{text}");
    assert!(String::from_utf8_lossy(&piped.stderr).contains("tokens kept"));

    ft(&["compress", "--rate", "0", "x"]).fails_with(2, &["--rate"]);
    ft(&["compress", "--rate", "1.5", "x"]).fails_with(2, &["--rate"]);
    let missing = dir.path().join("missing.txt");
    ft(&["compress", "--rate", "0.5", missing.to_str().unwrap()]).fails_with(1, &["missing.txt"]);
}

/// A task of short sums (the tiny model's context is 64 byte tokens): `sums` with solved
/// examples to show, `bare` without.
fn write_tasks(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let lines = |sums: &[(u32, u32)]| {
        sums.iter()
            .map(|(a, b)| format!("{{\"prompt\":\"{a}+{b}=\",\"completion\":\"{}\"}}\n", a + b))
            .collect::<String>()
    };
    std::fs::write(dir.join("test.jsonl"), lines(&[(2, 2), (3, 1), (4, 4)])).unwrap();
    std::fs::write(
        dir.join("train.jsonl"),
        lines(&[(1, 1), (5, 2), (6, 3), (7, 1)]),
    )
    .unwrap();
    std::fs::write(
        dir.join("sums.toml"),
        "name = \"sums\"\nmetric = \"exact_match\"\ndata = \"test.jsonl\"\ntrain = \"train.jsonl\"\nmax_tokens = 2\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("bare.toml"),
        "name = \"bare\"\nmetric = \"exact_match\"\ndata = \"test.jsonl\"\nmax_tokens = 2\n",
    )
    .unwrap();
}

#[test]
fn eval_measures_few_shot_prompts_whole_and_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let tasks = dir.path().join("tasks");
    write_tasks(&tasks);
    let out = dir.path().join("report");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            gguf.to_str().unwrap(),
            "--task-dir",
            tasks.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ft(&args)
    };
    let run = eval(&["--tasks", "sums", "--shots", "3", "--compress", "0.5,0.5"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["tasks"].as_array().unwrap().len(), 1, "one section");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "whole and one rate (given twice): {rows:?}");
    assert_eq!(
        rows[0]["prompting"],
        serde_json::json!({"shots": 3, "rate": null})
    );
    assert_eq!(
        rows[1]["prompting"],
        serde_json::json!({"shots": 3, "rate": 0.5})
    );
    let tokens = |r: &Value| r["timing"]["prompt_tokens"].as_f64().unwrap();
    // Three sums of 5-6 bytes and their blank lines before a 4-byte question.
    assert!(tokens(&rows[0]) > 20.0, "{}", rows[0]);
    assert!(
        tokens(&rows[1]) < tokens(&rows[0]),
        "{} then {}",
        tokens(&rows[0]),
        tokens(&rows[1])
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "| 3-shot |",
        "| 3-shot, compressed to 0.5 |",
        "Compressed prompts against the whole prompt",
    ] {
        assert!(md.contains(needle), "{needle:?} not in\n{md}");
    }

    // Batch prompting: two sums a prompt (the tiny model's context holds no demonstrations
    // besides), set against one a prompt.
    let run = eval(&["--tasks", "sums", "--batch-prompting", "2"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows[0]["prompting"].is_null(), "as written: {}", rows[0]);
    assert_eq!(
        rows[1]["prompting"],
        serde_json::json!({"shots": 0, "rate": null, "per_prompt": 2})
    );
    for r in rows {
        assert_eq!(r["examples"], 3, "every question counted: {r}");
        assert_eq!(r["answers"].as_array().unwrap().len(), 3, "{r}");
        assert_eq!(r["score"]["scored"], 3, "{r}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "| 0-shot, 2 questions a prompt |",
        "Batch prompting against one question a prompt",
    ] {
        assert!(md.contains(needle), "{needle:?} not in\n{md}");
    }
    for bad in ["1", "33", "2,x"] {
        eval(&["--tasks", "sums", "--batch-prompting", bad]).fails_with(2, &["--batch-prompting"]);
    }

    eval(&["--tasks", "sums", "--compress", "0.5"]).fails_with(2, &["--compress: needs --shots"]);
    eval(&["--tasks", "sums", "--shots", "2", "--compress", "1"]).fails_with(2, &["--compress"]);
    eval(&["--tasks", "sums", "--shots", "9"])
        .fails_with(2, &["--shots 9: task sums has 4 solved example(s)"]);
    eval(&["--tasks", "bare", "--shots", "1"]).fails_with(2, &["task bare has 0", "train ="]);
}
