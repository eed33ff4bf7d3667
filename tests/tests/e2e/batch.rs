//! `ft batch run` as a user runs it: a file of OpenAI Batch API requests answered with no
//! server, one output line per request in input order, a bad body answered with its error
//! while the other lines run, a malformed file refused with its line numbers, and a run
//! stopped part way resumed from its journal without asking again.

use ft_serve::batches::client::Client;
use ft_tests::{ft, tiny, tiny_model, write_adapter, Server};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The JSON lines of the file at `path`.
fn jsonl(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

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
    let lines = jsonl(&output);
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
    let again = jsonl(&output);
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

/// Uploads `bytes` as a batch file.
fn upload(server: &Server, name: &str, bytes: &[u8]) -> Value {
    Client::new(&server.url, None, std::time::Duration::from_secs(60))
        .upload(name, bytes)
        .expect("upload")
}

/// Creates a batch of file `file` on `/v1/completions`.
fn create(server: &Server, file: &Value) -> Value {
    let (status, batch) = server.post(
        "/v1/batches",
        &json!({"input_file_id": file["id"], "endpoint": "/v1/completions",
                "completion_window": "24h", "metadata": {"run": "test"}}),
    );
    assert_eq!(status, 200, "{batch}");
    batch
}

/// Batch `id` once its status is one of `until` (at most 120 s).
fn wait(server: &Server, id: &str, until: &[&str]) -> Value {
    let start = std::time::Instant::now();
    loop {
        let b: Value = serde_json::from_str(&server.get(&format!("/v1/batches/{id}"))).unwrap();
        if until.contains(&b["status"].as_str().unwrap_or_default()) {
            return b;
        }
        assert!(start.elapsed().as_secs() < 120, "still {b}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The lines of file `id`.
fn content(server: &Server, id: &Value) -> Vec<Value> {
    server
        .get(&format!("/v1/files/{}/content", id.as_str().unwrap()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn requests(n: usize, max_tokens: usize) -> String {
    (0..n)
        .map(|i| {
            line(
                &format!("q{i}"),
                "/v1/completions",
                json!({"model": "tiny", "prompt": format!("n{i}"), "max_tokens": max_tokens,
                       "ignore_eos": true, "temperature": 0}),
            )
        })
        .collect()
}

#[test]
fn the_batch_api_runs_files_through_its_states_and_loses_nothing_to_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let gguf = gguf.to_str().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let start = |rows: &str| {
        Server::start(&[
            "--model",
            gguf,
            "--served-model-name",
            "tiny",
            "--state-dir",
            state,
            "--batch-max-rows",
            rows,
        ])
    };
    let server = start("8");

    // A file whose third line the server refuses: its error goes to the error file, the
    // others to the output file, each in input order.
    let text = [
        line(
            "a",
            "/v1/completions",
            json!({"model": "tiny", "prompt": "ab", "max_tokens": 3}),
        ),
        line(
            "b",
            "/v1/completions",
            json!({"model": "tiny", "prompt": "cd", "max_tokens": 2, "stream": true}),
        ),
        line(
            "c",
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "temperature": 3.0}),
        ),
        line(
            "d",
            "/v1/completions",
            json!({"model": "tiny", "prompt": ["e", "f"], "max_tokens": 1}),
        ),
    ]
    .concat();
    let file = upload(&server, "in.jsonl", text.as_bytes());
    assert_eq!(
        (file["object"].as_str(), file["purpose"].as_str()),
        (Some("file"), Some("batch"))
    );
    assert_eq!(file["bytes"], text.len());
    let batch = create(&server, &file);
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["metadata"]["run"], "test");
    let done = wait(
        &server,
        batch["id"].as_str().unwrap(),
        &["completed", "failed"],
    );
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 4, "completed": 3, "failed": 1})
    );
    for at in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[at].as_u64().is_some(), "{at}: {done}");
    }
    let out = content(&server, &done["output_file_id"]);
    let ids: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b", "d"]);
    assert_eq!(out[0]["response"]["status_code"], 200);
    assert_eq!(out[0]["response"]["body"]["usage"]["completion_tokens"], 3);
    assert_eq!(
        out[2]["response"]["body"]["choices"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let errors = content(&server, &done["error_file_id"]);
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (
            errors[0]["custom_id"].as_str(),
            errors[0]["response"]["status_code"].as_u64()
        ),
        (Some("c"), Some(400))
    );
    let files = server.get("/v1/files");
    assert!(
        files.contains(done["output_file_id"].as_str().unwrap()),
        "{files}"
    );
    let listed: Value = serde_json::from_str(&server.get("/v1/batches?limit=1")).unwrap();
    assert_eq!(listed["data"][0]["id"], batch["id"]);

    // A malformed file fails validation with every fault's line.
    let bad = format!("{}not json\n{}", requests(1, 1), requests(1, 1));
    let failed = create(&server, &upload(&server, "bad.jsonl", bad.as_bytes()));
    let failed = wait(
        &server,
        failed["id"].as_str().unwrap(),
        &["failed", "completed"],
    );
    assert_eq!(failed["status"], "failed", "{failed}");
    let data = failed["errors"]["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (data[0]["line"].as_u64(), data[0]["code"].as_str()),
        (Some(2), Some("invalid_json_line"))
    );
    assert_eq!(
        (data[1]["line"].as_u64(), data[1]["code"].as_str()),
        (Some(3), Some("duplicate_custom_id"))
    );
    for (body, needle) in [
        (
            json!({"input_file_id": file["id"], "endpoint": "/v1/embeddings", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "1h"}),
            "completion_window",
        ),
    ] {
        let (status, e) = server.post("/v1/batches", &body);
        assert_eq!(status, 400, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{e}"
        );
    }
    let (status, _) = server.post(
        "/v1/batches",
        &json!({"input_file_id": "file-nothing", "endpoint": "/v1/completions", "completion_window": "24h"}),
    );
    assert_eq!(status, 404);
    drop(server);

    // Cancelled part way: what ran is kept, the rest is listed as cancelled.
    let server = start("1");
    let slow_file = upload(&server, "slow.jsonl", requests(200, 24).as_bytes());
    let slow = create(&server, &slow_file);
    let id = slow["id"].as_str().unwrap().to_string();
    wait(&server, &id, &["in_progress"]);
    // The input of a batch that has not ended stays.
    let url = format!(
        "{}/v1/files/{}",
        server.url,
        slow_file["id"].as_str().unwrap()
    );
    let kept = ureq::delete(&url).call();
    assert!(matches!(kept, Err(ureq::Error::Status(400, _))), "{kept:?}");
    let (status, cancelling) = server.post(&format!("/v1/batches/{id}/cancel"), &json!({}));
    assert_eq!(status, 200);
    assert!(
        ["cancelling", "completed"].contains(&cancelling["status"].as_str().unwrap()),
        "{cancelling}"
    );
    let cancelled = wait(&server, &id, &["cancelled", "completed"]);
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let ran = cancelled["request_counts"]["completed"].as_u64().unwrap() as usize;
    assert!(ran < 200, "{cancelled}");
    let unasked = content(&server, &cancelled["error_file_id"]);
    assert_eq!(ran + unasked.len(), 200);
    assert!(unasked
        .iter()
        .all(|l| l["error"]["code"] == "batch_cancelled"));
    drop(server);

    // kill -9 ten times while a 500-line batch runs: after each restart it goes on, and in
    // the end every line is answered once, in input order.
    let server = start("2");
    let big = create(
        &server,
        &upload(&server, "big.jsonl", requests(500, 8).as_bytes()),
    );
    let id = big["id"].as_str().unwrap().to_string();
    // Each kill comes once the batch has answered 25 more lines since the last start.
    let answered = |s: &Server| {
        let b: Value = serde_json::from_str(&s.get(&format!("/v1/batches/{id}"))).unwrap();
        b["request_counts"]["completed"].as_u64().unwrap_or(0)
    };
    let mut server = Some(server);
    let mut cut = Vec::new();
    for _ in 0..10 {
        let s = server.take().unwrap();
        let from = answered(&s);
        let mut n = from;
        while n < from + 25 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            n = answered(&s);
        }
        drop(s);
        cut.push(n);
        server = Some(start("2"));
    }
    assert!(
        cut.iter().all(|&n| n < 500),
        "every kill lands mid-batch: answered lines at each kill {cut:?}"
    );
    let server = server.unwrap();
    let done = wait(
        &server,
        &id,
        &["completed", "failed", "expired", "cancelled"],
    );
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 500, "completed": 500, "failed": 0})
    );
    let out = content(&server, &done["output_file_id"]);
    let ids: Vec<String> = out
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..500).map(|i| format!("q{i}")).collect();
    assert_eq!(ids, expected, "every line once, in input order");
    assert!(done["error_file_id"].is_null(), "{done}");
    let (status, deleted) = (
        200,
        server.get(&format!("/v1/files/{}", file["id"].as_str().unwrap())),
    );
    assert_eq!(status, 200);
    assert!(deleted.contains("\"batch\""));
    let gone = ureq::delete(&format!(
        "{}/v1/files/{}",
        server.url,
        file["id"].as_str().unwrap()
    ))
    .call()
    .unwrap()
    .into_json::<Value>()
    .unwrap();
    assert_eq!(gone["deleted"], true);
}

/// The `openai` release the round trip runs.
const OPENAI: &str = "3.63.0";

/// The official `openai` client, installed from PyPI the first time into
/// `$FT_HOME/python/openai-VERSION` (with `pip install --target`, which needs no virtual
/// environment); `None` where there is no Python.
fn openai_python() -> Option<std::path::PathBuf> {
    use std::process::Command;
    let dir = ft_tests::ft_home().join(format!("python/openai-{OPENAI}"));
    if !dir.join("openai").exists() {
        Command::new("python3").arg("--version").output().ok()?;
        let part = dir.with_extension(format!("part-{}", std::process::id()));
        let installed = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&part)
            .arg(format!("openai=={OPENAI}"))
            // Debian marks its Python as managed by apt; a --target folder is ours.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .status()
            .expect("python3 -m pip");
        assert!(
            installed.success(),
            "pip install --target {} openai=={OPENAI}",
            part.display()
        );
        if std::fs::rename(&part, &dir).is_err() {
            // Another test process installed it first.
            let _ = std::fs::remove_dir_all(&part);
        }
    }
    Some(dir)
}

/// Uploads a file, creates a batch, waits for it, reads its output and lists batches with
/// the official client.
const ROUND_TRIP: &str = r#"
import json, sys, time
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
f = client.files.create(file=open(sys.argv[2], "rb"), purpose="batch")
b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                          completion_window="24h", metadata={"job": "test"})
while b.status not in ("completed", "failed", "expired", "cancelled"):
    time.sleep(0.05)
    b = client.batches.retrieve(b.id)
out = client.files.content(b.output_file_id).text
listed = client.batches.list(limit=5)
print(json.dumps({"file": f.model_dump(), "batch": b.model_dump(), "output": out,
                  "listed": [x.id for x in listed.data]}))
"#;

#[test]
fn the_official_openai_client_runs_a_batch() {
    let Some(openai) = openai_python() else {
        eprintln!("skipped: no python3 for the openai client");
        return;
    };
    let server = Server::start(&["--served-model-name", "smollm2"]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let ask = |q: &str| {
        json!({"model": "smollm2", "max_tokens": 8, "temperature": 0,
                               "messages": [{"role": "user", "content": q}]})
    };
    std::fs::write(
        &input,
        [
            line("one", "/v1/chat/completions", ask("What is 2+2?")),
            line("two", "/v1/chat/completions", ask("Name a colour.")),
        ]
        .concat(),
    )
    .unwrap();
    let run = std::process::Command::new("python3")
        .args(["-c", ROUND_TRIP, &server.url, input.to_str().unwrap()])
        .env("PYTHONPATH", &openai)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let got: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(got["file"]["purpose"], "batch");
    let batch = &got["batch"];
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["request_counts"]["completed"], 2);
    assert_eq!(batch["metadata"]["job"], "test");
    assert!(got["listed"].as_array().unwrap().contains(&batch["id"]));
    let lines: Vec<Value> = got["output"]
        .as_str()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["custom_id"], "one");
    let answer = &lines[0]["response"]["body"]["choices"][0]["message"]["content"];
    assert!(
        answer.as_str().is_some_and(|a| !a.is_empty()),
        "{}",
        lines[0]
    );
}

#[test]
fn ft_batch_submits_follows_and_fetches_a_batch_on_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let state = dir.path().join("state");
    let server = Server::start(&[
        "--model",
        gguf.to_str().unwrap(),
        "--served-model-name",
        "tiny",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, requests(6, 3)).unwrap();
    let url = server.url.as_str();
    let submitted = ft(&[
        "batch",
        "submit",
        "--url",
        url,
        "--input",
        input.to_str().unwrap(),
        "--metadata",
        "who=test",
    ]);
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    let id = submitted.stdout.trim().to_string();
    assert!(id.starts_with("batch_"), "{}", submitted.stdout);
    let status = ft(&["batch", "status", &id, "--url", url, "--wait"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert!(
        status
            .stdout
            .contains("completed: 6 of 6 requests completed, 0 failed"),
        "{}",
        status.stdout
    );
    let output = dir.path().join("out.jsonl");
    let results = ft(&[
        "batch",
        "results",
        &id,
        "--url",
        url,
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_eq!(results.code, 0, "{}", results.stderr);
    let ids: Vec<String> = jsonl(&output)
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["q0", "q1", "q2", "q3", "q4", "q5"]);

    // Mixed endpoints, a malformed file and an unknown batch are refused with their reason.
    let mixed = dir.path().join("mixed.jsonl");
    std::fs::write(
        &mixed,
        [
            line("a", "/v1/completions", json!({})),
            line("b", "/v1/chat/completions", json!({})),
        ]
        .concat(),
    )
    .unwrap();
    ft(&[
        "batch",
        "submit",
        "--url",
        url,
        "--input",
        mixed.to_str().unwrap(),
    ])
    .fails_with(
        2,
        &["mixed.jsonl", "line 1", "line 2", "one endpoint per batch"],
    );
    std::fs::write(&mixed, "{}\n").unwrap();
    ft(&[
        "batch",
        "submit",
        "--url",
        url,
        "--input",
        mixed.to_str().unwrap(),
    ])
    .fails_with(2, &["line 1: custom_id"]);
    let unknown = ft(&["batch", "status", "batch_nothing", "--url", url]);
    assert_ne!(unknown.code, 0);
    assert!(
        unknown.stderr.contains("404") && unknown.stderr.contains("batch_nothing"),
        "{}",
        unknown.stderr
    );
}

#[test]
fn ft_bench_batch_prices_interactive_and_batch_answers_of_a_task() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    // Short prompts: the tiny model holds 64 byte tokens.
    let task = dir.path().join("sums.toml");
    let lines: String = (0..12)
        .map(|i| format!("{{\"prompt\":\"{i}+1=\",\"completion\":\"{}\"}}\n", i + 1))
        .collect();
    std::fs::write(dir.path().join("test.jsonl"), lines).unwrap();
    std::fs::write(
        &task,
        "name = \"sums\"\nmetric = \"exact_match\"\ndata = \"test.jsonl\"\nmax_tokens = 4\n",
    )
    .unwrap();
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "batch",
            "--model",
            gguf.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ft(&args)
    };
    let run = bench(&[
        "--requests",
        "8",
        "--probes",
        "2",
        "--concurrency",
        "1,2",
        "--slo-tpot-ms",
        "10000",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = &run.stdout;
    // One stream, and the faster of 1 and 2 (both within so loose an SLO) as the reference.
    assert!(out.contains("| 1 | 8 | 0 |"), "{out}");
    assert!(out.contains("| interactive (within SLO) |"), "{out}");
    assert!(out.contains("| batch | 256 rows | 8 | 0 |"), "{out}");
    assert!(
        out.contains("| nothing | 2 | 0 |") && out.contains("| a batch | 2 | 0 |"),
        "{out}"
    );
    bench(&["--slo-tpot-ms", "0"]).fails_with(2, &["--slo-tpot-ms"]);
    bench(&["--concurrency", "0"]).fails_with(2, &["--concurrency"]);
    bench(&["--price-per-hour=-1"]).fails_with(2, &["--price-per-hour"]);
    let submit = |input: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["batch", "submit", "--url", "http://127.0.0.1:9", "--input"];
        args.push(input.to_str().unwrap());
        args.extend_from_slice(extra);
        ft(&args)
    };
    submit(&task, &[]).fails_with(2, &["sums.toml", "line 1"]);
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, requests(1, 1)).unwrap();
    submit(&input, &["--metadata", "x"]).fails_with(2, &["--metadata x", "KEY=VALUE"]);
}
