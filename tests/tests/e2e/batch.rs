//! `ft batch run` as a user runs it: a file of OpenAI Batch API requests answered with no
//! server, one output line per request in input order, a bad body answered with its error
//! while the other lines run, a malformed file refused with its line numbers, and a run
//! stopped part way resumed from its journal without asking again.

use ft_tests::{ft, tiny, tiny_model, write_adapter};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn line(id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": id, "method": "POST", "url": url, "body": body}).to_string() + "\n"
}

#[test]
fn a_batch_file_is_answered_line_by_line_in_order_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let gguf = gguf.to_str().unwrap();
    write_adapter(&dir.path().join("a"), 2, 32, 16, 1);
    let adapter = format!("a={}", dir.path().join("a").display());
    let input = dir.path().join("in.jsonl");
    let text = [
        line(
            "r0",
            "/v1/completions",
            json!({"model": "tiny", "prompt": "ab", "max_tokens": 3, "temperature": 0}),
        ),
        line(
            "r1",
            "/v1/completions",
            json!({"model": "a", "prompt": "cd", "max_tokens": 2, "stream": true}),
        ),
        line(
            "r2",
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "temperature": 3.0}),
        ),
        line(
            "r3",
            "/v1/completions",
            json!({"model": "nobody", "prompt": "x"}),
        ),
        line(
            "r4",
            "/v1/completions",
            json!({"model": "a", "prompt": ["e", "f"], "max_tokens": 2}),
        ),
    ]
    .concat();
    std::fs::write(&input, &text).unwrap();
    let output = dir.path().join("out.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "batch",
            "run",
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--model",
            gguf,
            "--served-model-name",
            "tiny",
            "--adapter",
            &adapter,
            "--concurrency",
            "3",
        ];
        args.extend_from_slice(extra);
        ft(&args)
    };
    let first = run(&[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(
        first.stdout.contains("5 requests: 3 succeeded, 2 failed"),
        "{}",
        first.stdout
    );
    let lines: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4"]);
    let status: Vec<u64> = lines
        .iter()
        .map(|l| l["response"]["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(status, [200, 200, 400, 404, 200]);
    for l in &lines {
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"), "{l}");
        assert!(l["error"].is_null(), "{l}");
        assert_eq!(
            l["response"]["request_id"]
                .as_str()
                .map(|r| l["id"] == format!("batch_req_{r}")),
            Some(true)
        );
    }
    let answer = &lines[0]["response"]["body"];
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    assert_eq!(
        lines[1]["response"]["body"]["model"], "a",
        "answered whole, not streamed"
    );
    assert_eq!(
        lines[4]["response"]["body"]["choices"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(
        lines[2]["response"]["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature"),
        "{}",
        lines[2]
    );
    let journal = dir.path().join("out.jsonl.partial");
    assert!(!journal.exists());

    // A run stopped after two answers: its journal holds them, and the next run asks only the
    // other three (the journal's r0 answer is kept as it is, not asked again).
    let sha: String = Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut kept = lines[0].clone();
    kept["response"]["body"]["marker"] = json!("from the journal");
    std::fs::write(
        &journal,
        format!(
            "{}\n{kept}\n{}\n{{\"custom_id\": \"r2\", \"resp",
            json!({"input_sha256": sha}),
            lines[3]
        ),
    )
    .unwrap();
    std::fs::remove_file(&output).unwrap();
    let resumed = run(&[]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert!(
        resumed.stdout.contains("(2 answered by an earlier run)"),
        "{}",
        resumed.stdout
    );
    let again: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(again.len(), 5);
    assert_eq!(again[0]["response"]["body"]["marker"], "from the journal");
    assert_eq!(
        again[2]["response"]["status_code"], 400,
        "the torn line asked again"
    );

    // A journal of another input is not dropped.
    std::fs::write(&journal, format!("{}\n", json!({"input_sha256": "0"}))).unwrap();
    run(&[]).fails_with(2, &["out.jsonl.partial", "another input"]);
    std::fs::remove_file(&journal).unwrap();

    // A malformed file is refused whole, before the model loads, every fault with its line.
    std::fs::write(
        &input,
        [
            line("r0", "/v1/completions", json!({})),
            "not json\n".to_string(),
            line("r0", "/v1/completions", json!({})),
            line("r3", "/v1/embeddings", json!({})),
        ]
        .concat(),
    )
    .unwrap();
    run(&[]).fails_with(
        2,
        &[
            "in.jsonl",
            "line 2: not a JSON object",
            "line 3: custom_id: \"r0\" is also the custom_id of line 1",
            "line 4: url:",
        ],
    );
    run(&["--concurrency", "0"]).fails_with(2, &["--concurrency"]);
}
