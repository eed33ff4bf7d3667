//! `ft serve` over HTTP, as a client sees it: mixed-adapter batches give each request what it
//! gets alone, streams equal whole answers, bad requests get their status, adapters load and
//! unload at run time, and a client that goes away frees its KV blocks.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use ft_tests::{ft, tiny, tiny_model, write_adapter, Server};
use serde_json::{json, Value};

fn completion(model: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

fn text(answer: &Value) -> String {
    answer["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {answer}"))
        .to_string()
}

/// The streamed events of a request, parsed, up to `[DONE]`.
fn stream(server: &Server, path: &str, mut body: Value) -> Vec<Value> {
    body["stream"] = json!(true);
    let resp = ureq::post(&format!("{}{path}", server.url))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .expect("stream");
    let mut events = Vec::new();
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            if data == "[DONE]" {
                return events;
            }
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    panic!("the stream ended without [DONE]: {events:?}");
}

/// Polls `/metrics` until `name` reads `value`.
fn wait_for(server: &Server, name: &str, value: f64) {
    let start = Instant::now();
    while server.metric(name) != value {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name} stayed at {}",
            server.metric(name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_default_model_serves_mixed_adapter_batches_as_each_request_alone() {
    let dir = tempfile::tempdir().unwrap();
    // SmolLM2-135M: 30 layers, hidden 576, 3 key/value heads of 64.
    for (name, seed) in [("alpha", 1), ("beta", 9)] {
        write_adapter(&dir.path().join(name), 30, 576, 192, seed);
    }
    let alpha = format!("alpha={}", dir.path().join("alpha").display());
    let beta = format!("beta={}", dir.path().join("beta").display());
    let server = Server::start(&[
        "--weights",
        "q8",
        "--adapter",
        &alpha,
        "--adapter",
        &beta,
        "--served-model-name",
        "base",
        // Every answer from the engine: the batches are what is tested.
        "--no-cache",
    ]);
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a small village,",
        "def fibonacci(n):",
        "The three primary colors are",
    ];
    let requests: Vec<Value> = prompts
        .iter()
        .flat_map(|p| ["base", "alpha", "beta"].map(|m| completion(m, p, 12)))
        .collect();
    let alone: Vec<String> = requests
        .iter()
        .map(|r| {
            let (status, answer) = server.post("/v1/completions", r);
            assert_eq!(status, 200, "{answer}");
            text(&answer)
        })
        .collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| s.spawn(|| text(&server.post("/v1/completions", r).1)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    for chunk in alone.chunks(3) {
        assert!(
            chunk[0] != chunk[1] || chunk[0] != chunk[2],
            "adapters change outputs: {chunk:?}"
        );
    }
    assert!(alone[0].contains("Paris"), "{}", alone[0]);

    // A stream carries the same text as the whole answer, then usage.
    let mut body = completion("alpha", prompts[1], 12);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream(&server, "/v1/completions", body);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, alone[4]);
    let (finish, last) = (&events[events.len() - 2], events.last().unwrap());
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"], json!([]), "usage comes last, alone");
    assert_eq!(last["usage"]["completion_tokens"], 12);

    // Chat through the model's template, whole and streamed.
    let chat = json!({"model": "beta", "messages": [{"role": "user", "content": "Name a fruit."}],
        "max_tokens": 10, "temperature": 0});
    let (status, answer) = server.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{answer}");
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!content.is_empty());
    let events = stream(&server, "/v1/chat/completions", chat);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);

    // Models: the base, then each adapter.
    let models: Value = serde_json::from_str(&server.get("/v1/models")).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "alpha", "beta"]);

    // A client that goes away mid-stream: its request stops and its blocks come back.
    let resp = ureq::post(&format!("{}/v1/completions", server.url))
        .set("Content-Type", "application/json")
        .send_string(
            &json!({"model": "alpha", "prompt": "Tell me a long story.", "max_tokens": 1500,
            "stream": true, "ignore_eos": true})
            .to_string(),
        )
        .unwrap();
    let mut reader = BufReader::new(resp.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let generated = server.metric("ft_generation_tokens_total");
    drop(reader);
    wait_for(&server, "ft_requests_running", 0.0);
    wait_for(&server, "ft_kv_blocks_used", 0.0);
    let after = server.metric("ft_generation_tokens_total");
    assert!(
        after - generated < 1000.0,
        "generation stopped early: {generated} -> {after}"
    );
}

#[test]
fn bad_requests_get_their_status_and_an_openai_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let server = Server::start(&["--model", gguf.to_str().unwrap(), "--api-key", "sesame"]);
    let post = |body: &Value| server.post_with("/v1/completions", body, Some("sesame"));
    let model = gguf.to_str().unwrap();
    let cases = [
        (
            json!({"model": model, "prompt": "hi", "temperature": 9}),
            400,
            "temperature",
        ),
        (
            json!({"model": model, "prompt": "hi", "top_p": 0}),
            400,
            "top_p",
        ),
        (
            json!({"model": model, "prompt": "hi", "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": model, "prompt": "hi", "max_tokens": 500}),
            400,
            "context of 64",
        ),
        (
            json!({"model": model, "prompt": "hi", "max_tokens": u64::MAX}),
            400,
            "context of 64",
        ),
        (
            json!({"model": model, "prompt": "hi", "use_beam_search": true, "best_of": 2, "logprobs": 1}),
            400,
            "logprobs",
        ),
        (
            json!({"model": model, "prompt": "hi", "logprobs": 50}),
            400,
            "logprobs",
        ),
        (
            json!({"model": model, "prompt": ["a", "b"], "stream": true}),
            400,
            "prompt",
        ),
        (json!({"model": model, "prompt": [1.5]}), 400, "prompt"),
        (json!({"model": model}), 400, "prompt"),
        (json!({"model": "nope", "prompt": "hi"}), 404, "nope"),
    ];
    for (body, status, needle) in cases {
        let (got, answer) = post(&body);
        assert_eq!(got, status, "{body} -> {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body} -> {message}");
    }
    let (status, answer) = server.post_with(
        "/v1/chat/completions",
        &json!({"model": model, "messages": []}),
        Some("sesame"),
    );
    assert_eq!(status, 400, "{answer}");
    // Not JSON at all.
    let (status, answer) = server.post_with("/v1/completions", &json!("{oops"), Some("sesame"));
    assert_eq!(
        (status, answer["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    // The key is required on /v1 but not on /health.
    let (status, answer) = server.post("/v1/completions", &completion(model, "hi", 2));
    assert_eq!(status, 401, "{answer}");
    assert_eq!(server.get("/health"), r#"{"status":"ok"}"#);
    let (status, _) = post(&completion(model, "hi", 2));
    assert_eq!(status, 200);
    let metrics = server.get("/metrics");
    assert!(
        metrics.contains("ft_http_requests_total{status=\"400\"} 12"),
        "{metrics}"
    );

    // A full queue: 429.
    let full = Server::start(&["--model", model, "--max-queue", "0"]);
    let (status, answer) = full.post("/v1/completions", &completion(model, "hi", 2));
    assert_eq!(status, 429, "{answer}");
    assert_eq!(answer["error"]["type"], "rate_limit_error");
}

#[test]
fn adapters_load_and_unload_at_run_time_from_allowed_folders_and_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let model = gguf.to_str().unwrap();
    let allowed = dir.path().join("allowed");
    write_adapter(&allowed.join("one"), 2, 32, 16, 1);
    write_adapter(&dir.path().join("outside"), 2, 32, 16, 2);
    let registry = dir.path().join("registry");
    let add = ft(&[
        "adapters",
        "add",
        dir.path().join("outside").to_str().unwrap(),
        "--name",
        "two",
        "--registry",
        registry.to_str().unwrap(),
    ]);
    assert_eq!(add.code, 0, "{}", add.stderr);

    let server = Server::start(&[
        "--model",
        model,
        "--allowed-adapter-dir",
        allowed.to_str().unwrap(),
        "--registry",
        registry.to_str().unwrap(),
        "--max-adapters",
        "1",
        // Every answer from the engine: adapter reloads are what is tested.
        "--no-cache",
    ]);
    let load = |name: &str, path: &Path| {
        server.post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": path}),
        )
    };
    let (status, answer) = load("one", &allowed.join("one"));
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = load("three", &dir.path().join("outside"));
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lora_path"),
        "{answer}"
    );
    // An existing folder outside the allowed ones and a missing path answer alike: the
    // server is no oracle for what exists on its disk.
    std::fs::create_dir_all(dir.path().join("exists")).unwrap();
    let message = |path: &Path| {
        let (status, answer) = load("three", path);
        assert_eq!(status, 400);
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .replace(path.to_str().unwrap(), "PATH")
    };
    assert_eq!(
        message(&dir.path().join("exists")),
        message(&dir.path().join("missing"))
    );
    // A folder inside an allowed one whose weights link to a file outside is refused alike.
    let linked = allowed.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::fs::copy(
        allowed.join("one/adapter_config.json"),
        linked.join("adapter_config.json"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("outside/adapter_model.safetensors"),
        linked.join("adapter_model.safetensors"),
    )
    .unwrap();
    assert_eq!(message(&linked), message(&dir.path().join("missing")));
    // A wrong method gets an OpenAI error object too.
    let wrong = ureq::get(&format!("{}/v1/completions", server.url)).call();
    match wrong {
        Err(ureq::Error::Status(405, r)) => {
            let body: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        }
        other => panic!("GET /v1/completions: {other:?}"),
    }
    let (status, answer) = server.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "four", "lora_path": "registry:two:1"}),
    );
    assert_eq!(status, 200, "{answer}");
    let models = server.get("/v1/models");
    for name in ["\"one\"", "\"two\"", "\"four\""] {
        assert!(models.contains(name), "{name} in {models}");
    }
    // Each adapter answers (one in memory at a time: the others are reloaded on use).
    let mut answers = Vec::new();
    for name in ["one", "two", "four", "one"] {
        let (status, answer) = server.post("/v1/completions", &completion(name, "abc", 6));
        assert_eq!(status, 200, "{answer}");
        answers.push(text(&answer));
    }
    assert_eq!(answers[0], answers[3]);
    assert_eq!(
        answers[1], answers[2],
        "the same registry adapter under two names"
    );
    let (status, _) = server.post("/v1/unload_lora_adapter", &json!({"lora_name": "one"}));
    assert_eq!(status, 200);
    let (status, _) = server.post("/v1/completions", &completion("one", "abc", 6));
    assert_eq!(status, 404);
    let (status, _) = server.post("/v1/unload_lora_adapter", &json!({"lora_name": "one"}));
    assert_eq!(status, 404);
    // "one" was the adapter in memory; unloading it leaves none.
    wait_for(&server, "ft_adapters_loaded", 0.0);
}

/// What the server sends on `stream` until it closes it (or `limit` passes), and how long
/// that took.
fn until_closed(mut stream: std::net::TcpStream, limit: Duration) -> (String, Duration) {
    use std::io::Read;
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).expect("read timeout");
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

#[test]
fn slow_and_silent_clients_are_cut_off_and_the_server_stays_up() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let server = Server::start(&[
        "--model",
        gguf.to_str().unwrap(),
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
    ]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let connect = || TcpStream::connect(&addr).expect("connect");
    // A client held open would be cut only by this read timeout; one closed by the server
    // is closed within a second or two of its deadline, however loaded this machine is.
    let patience = Duration::from_secs(30);
    let promptly = Duration::from_secs(15);

    // Nothing sent, and partial headers: closed once the header deadline passes.
    let (_, waited) = until_closed(connect(), patience);
    assert!(waited < promptly, "silent client held {waited:?}");
    let mut partial = connect();
    partial
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (_, waited) = until_closed(partial, patience);
    assert!(waited < promptly, "partial headers held {waited:?}");

    // A connection kept alive after its answer, then idle: closed at the header deadline.
    let mut idle = connect();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (answer, waited) = until_closed(idle, patience);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        waited < promptly,
        "an idle kept-alive connection held {waited:?}"
    );

    // A declared body that never comes: 408.
    let mut bodiless = connect();
    bodiless
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .unwrap();
    let (answer, waited) = until_closed(bodiless, patience);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("\"error\""),
        "an OpenAI error object: {answer}"
    );
    assert!(waited < promptly, "{waited:?}");

    // A body over the 2 MiB limit: 413, as an OpenAI error object, whatever it holds.
    let mut large = connect();
    let body = vec![b' '; 3 << 20];
    write!(
        large,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    let mut writer = large.try_clone().unwrap();
    // The server answers before it has read it all: the rest may be refused.
    std::thread::spawn(move || writer.write_all(&body));
    let (answer, _) = until_closed(large, patience);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"type\":\"invalid_request_error\""),
        "an OpenAI error object: {answer}"
    );

    let (status, answer) = server.post(
        "/v1/completions",
        &completion(gguf.to_str().unwrap(), "hi", 2),
    );
    assert_eq!(status, 200, "the server still answers: {answer}");
}

#[test]
fn connections_past_the_limit_get_503_at_once_and_are_served_once_others_close() {
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    // A header deadline far longer than the test, so the held connections keep their slots
    // however slowly this machine runs.
    let server = Server::start(&[
        "--model",
        gguf.to_str().unwrap(),
        "--header-timeout",
        "600",
        "--max-connections",
        "3",
    ]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let connect = || TcpStream::connect(&addr).expect("connect");
    let patience = Duration::from_secs(30);

    // The listener accepts in the order the connections were made, so the fourth meets
    // three slots taken.
    let held: Vec<TcpStream> = (0..3).map(|_| connect()).collect();
    let (answer, waited) = until_closed(connect(), patience);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("--max-connections"), "{answer}");
    assert!(waited < patience, "refused at once, not held: {waited:?}");

    drop(held);
    let start = Instant::now();
    let health = loop {
        match ureq::get(&format!("{}/health", server.url)).call() {
            Ok(r) => break r.into_string().expect("body"),
            Err(ureq::Error::Status(503, _)) if start.elapsed() < patience => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("GET /health once the held connections closed: {e}"),
        }
    };
    assert!(health.contains("ok"), "{health}");
}

/// The cells of the table row `ft bench serve` prints after its header, by column name.
fn table_row(stdout: &str) -> std::collections::BTreeMap<String, String> {
    let mut lines = stdout.lines().filter(|l| l.starts_with('|'));
    let cells = |l: &str| -> Vec<String> {
        l.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let header = cells(lines.next().expect("a header"));
    let row = cells(lines.nth(1).expect("a row after the rule"));
    header.into_iter().zip(row).collect()
}

#[test]
fn bench_serve_measures_rows_and_a_soak_ends_with_no_block_held() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let server = Server::start(&["--model", gguf.to_str().unwrap()]);
    // A password in the URL is used, never printed (the table names the server by its URL).
    let with_password = server.url.replacen("://", "://me:s3cret@", 1);
    let rows = ft(&[
        "bench",
        "serve",
        "--url",
        &with_password,
        "--concurrency",
        "2",
        "--requests",
        "6",
        // Words of about eight byte tokens each: the tiny model's context is 64.
        "--prompt-len",
        "3",
        "--max-tokens",
        "4",
        "--seed",
        "1",
    ]);
    assert_eq!(rows.code, 0, "{}", rows.stderr);
    let row = table_row(&rows.stdout);
    assert_eq!(
        (row["requests"].as_str(), row["errors"].as_str()),
        ("6", "0"),
        "{}",
        rows.stdout
    );
    assert!(
        !rows.stdout.contains("s3cret") && rows.stdout.contains("://***@"),
        "{}",
        rows.stdout
    );

    let soak = ft(&[
        "bench",
        "serve",
        "--url",
        &server.url,
        "--soak",
        "3",
        "--concurrency",
        "3",
        "--prompt-len",
        "3",
        "--max-tokens",
        "8",
        "--cancel-rate",
        "0.4",
        "--slow-rate",
        "0.2",
        "--slow-delay-ms",
        "5",
        "--seed",
        "2",
    ]);
    assert_eq!(soak.code, 0, "{}\n{}", soak.stdout, soak.stderr);
    let row = table_row(&soak.stdout);
    assert_eq!(row["errors"], "0", "{}", soak.stdout);
    assert_eq!(row["KV blocks held at the end"], "0", "{}", soak.stdout);
    let sent: u64 = row["sent"].parse().unwrap();
    let (completed, cancelled): (u64, u64) = (
        row["completed"].parse().unwrap(),
        row["cancelled"].parse().unwrap(),
    );
    assert!(cancelled > 0 && completed > 0, "{}", soak.stdout);
    assert_eq!(sent, completed + cancelled);
    assert!(
        row["RSS end MiB"].parse::<f64>().unwrap() > 0.0,
        "{}",
        soak.stdout
    );
    // The server took every hang-up in its stride.
    assert_eq!(server.metric("ft_kv_blocks_used"), 0.0);
    assert_eq!(server.metric("ft_requests_running"), 0.0);

    ft(&[
        "bench",
        "serve",
        "--url",
        &server.url,
        "--soak",
        "1",
        "--cancel-rate",
        "1.5",
    ])
    .fails_with(2, &["--cancel-rate 1.5: must be from 0 to 1"]);
}
