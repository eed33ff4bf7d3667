//! `ft eval` as a user runs it: every task × model × storage × decoding × concurrency gets
//! its row in the report, with plots and registry metrics; a server that errors or stalls is
//! reported as such, never scored as a wrong answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use ft_tests::{ft, tiny, tiny_model, write_adapter};
use serde_json::Value;

/// The `report.json` in `out`.
fn report_json(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

/// Two task files in `dir`: `pick` (multiple choice) and `ppl` (perplexity).
fn write_tasks(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("pick.jsonl"),
        "{\"prompt\":\"red or blue? \",\"choices\":[\"red\",\"blue\"],\"answer\":0}\n\
         {\"prompt\":\"up or down? \",\"choices\":[\"up\",\"down\"],\"answer\":1}\n\
         {\"prompt\":\"yes or no? \",\"choices\":[\"yes\",\"no\"],\"answer\":0}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("pick.toml"),
        "name = \"pick\"\nabout = \"pick a word\"\nmetric = \"multiple_choice\"\ndata = \"pick.jsonl\"\nmax_tokens = 4\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("ppl.jsonl"),
        "{\"text\":\"the cat sat on the mat\"}\n{\"text\":\"a dog ran\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("ppl.toml"),
        "name = \"ppl\"\nmetric = \"perplexity\"\ndata = \"ppl.jsonl\"\n",
    )
    .unwrap();
}

#[test]
fn a_tiny_eval_reports_every_setting_with_plots_and_registry_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let tasks = dir.path().join("tasks");
    write_tasks(&tasks);
    let registry = dir.path().join("registry");
    for (name, seed) in [("one", 1), ("two", 2)] {
        let folder = dir.path().join(name);
        write_adapter(&folder, 2, 32, 16, seed);
        let add = ft(&[
            "adapters",
            "add",
            folder.to_str().unwrap(),
            "--name",
            name,
            "--registry",
            registry.to_str().unwrap(),
        ]);
        assert_eq!(add.code, 0, "{}", add.stderr);
    }
    let listed = ft(&[
        "eval",
        "--list-tasks",
        "--task-dir",
        tasks.to_str().unwrap(),
    ]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let names: Vec<&str> = listed
        .stdout
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(names, ["dates", "units", "sort", "pick", "ppl"]);

    let out = dir.path().join("report");
    let run = ft(&[
        "eval",
        "--model",
        gguf.to_str().unwrap(),
        "--registry",
        registry.to_str().unwrap(),
        "--adapters",
        "one,two:1",
        "--task-dir",
        tasks.to_str().unwrap(),
        "--tasks",
        "pick,ppl",
        "--quant",
        "f32,q8",
        "--decoding",
        "greedy,beam2",
        "--concurrency",
        "1,3",
        "--price-per-hour",
        "1.5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = report_json(&out);
    let rows = report["rows"].as_array().unwrap();
    // pick: 3 models x 2 storages x 2 decodings x 2 concurrencies; ppl: 3 models x 2 storages.
    assert_eq!(rows.len(), 24 + 6);
    for r in rows {
        assert_eq!(
            r["examples"],
            if r["task"] == "pick" { 3 } else { 2 },
            "{r}"
        );
        assert_eq!(
            (r["errors"].as_u64(), r["timeouts"].as_u64()),
            (Some(0), Some(0)),
            "{r}"
        );
        if r["task"] == "ppl" {
            assert!(r["score"]["value"].as_f64().unwrap() > 1.0, "{r}");
            assert!(r["concurrency"].is_null() && r["timing"].is_null(), "{r}");
        } else {
            let accuracy = r["score"]["value"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&accuracy), "{r}");
            assert!(r["timing"]["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["cost"]["usd_per_m_tokens"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    // Batching never changes a greedy or beam answer: each setting answers alike at 1 and 3
    // streams.
    let answers = |model: &str, quant: &str, decoding: &str, streams: u64| -> Vec<Value> {
        rows.iter()
            .find(|r| {
                r["task"] == "pick"
                    && r["model"] == model
                    && r["quant"] == quant
                    && r["decoding"] == decoding
                    && r["concurrency"] == streams
            })
            .unwrap_or_else(|| panic!("no row {model} {quant} {decoding} {streams}"))["answers"]
            .as_array()
            .unwrap()
            .clone()
    };
    for model in ["base", "one", "two"] {
        for quant in ["f32", "q8"] {
            for decoding in ["greedy", "beam2"] {
                assert_eq!(
                    answers(model, quant, decoding, 1),
                    answers(model, quant, decoding, 3),
                    "{model} {quant} {decoding}"
                );
            }
        }
    }
    let perplexity = |model: &str| {
        rows.iter()
            .find(|r| r["task"] == "ppl" && r["model"] == model && r["quant"] == "f32")
            .unwrap()["score"]["value"]
            .as_f64()
            .unwrap()
    };
    assert_ne!(
        perplexity("base"),
        perplexity("one"),
        "the adapter is applied"
    );

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "## pick (multiple_choice: pick a word)",
        "## ppl (perplexity)",
        "| two | q8 | beam2 | 3 |",
        "Best: **",
        "Against the base",
        "![pick: quality against latency](pick-quality-latency.svg)",
    ] {
        assert!(md.contains(needle), "{needle:?} not in\n{md}");
    }
    for plot in ["pick-quality-latency", "pick-throughput"] {
        let svg = std::fs::read_to_string(out.join(format!("{plot}.svg"))).unwrap();
        assert!(svg.contains("<svg"), "{plot}");
        let png = std::fs::read(out.join(format!("{plot}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{plot}");
    }
    assert!(
        !out.join("ppl-throughput.svg").exists(),
        "perplexity has no timings to plot"
    );
    // Points and lines are told apart by a legend beside the plot, not by labels on them.
    let svg = std::fs::read_to_string(out.join("pick-throughput.svg")).unwrap();
    for entry in ["model", "storage", "decoding", "one", "q8", "beam2"] {
        assert!(
            svg.contains(&format!(">\n{entry}\n</text>")),
            "{entry} not in the legend"
        );
    }
    assert!(!svg.contains("one q8 beam2"), "no label per line");

    // The report draws again from its report.json alone, which stays as it was.
    let json = std::fs::read(out.join("report.json")).unwrap();
    for f in [
        "report.md",
        "pick-quality-latency.svg",
        "pick-throughput.png",
    ] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    let redraw = ft(&["eval", "--redraw", out.to_str().unwrap()]);
    assert_eq!(redraw.code, 0, "{}", redraw.stderr);
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), md);
    assert!(out.join("pick-quality-latency.svg").exists());
    assert!(out.join("pick-throughput.png").exists());
    assert_eq!(std::fs::read(out.join("report.json")).unwrap(), json);
    std::fs::write(out.join("report.json"), "{\"rows\": 3}").unwrap();
    let bad = ft(&["eval", "--redraw", out.to_str().unwrap()]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("report.json"), "{}", bad.stderr);

    let shown = ft(&[
        "adapters",
        "show",
        "two",
        "--registry",
        registry.to_str().unwrap(),
    ]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    let metrics = &shown.json()["metrics"];
    assert_eq!(
        metrics["eval/pick"].as_array().unwrap().len(),
        8,
        "{metrics}"
    );
    assert_eq!(
        metrics["eval/ppl"].as_array().unwrap().len(),
        2,
        "{metrics}"
    );
}

/// Reads one HTTP request: the request line and its JSON body, if any.
fn read_request(stream: &mut TcpStream) -> (String, Value) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut length = 0;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header.trim().is_empty() {
            break;
        }
        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (line, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// A stand-in OpenAI server: it answers " yes" to most prompts, a 500 to prompts with "fail"
/// and nothing for 5 s to prompts with "stall".
fn flaky_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            std::thread::spawn(move || {
                let (line, body) = read_request(&mut stream);
                let prompt = body["prompt"].as_str().unwrap_or("");
                let reply = if line.starts_with("GET /v1/models") {
                    let json = "{\"data\":[{\"id\":\"flaky\"}]}";
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}", json.len())
                } else if prompt.contains("fail") {
                    let json = "{\"error\":{\"message\":\"the engine broke\"}}";
                    format!("HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}", json.len())
                } else {
                    if prompt.contains("stall") {
                        std::thread::sleep(Duration::from_secs(5));
                    }
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n\
                     data: {\"choices\":[{\"text\":\" yes\",\"finish_reason\":null}]}\n\n\
                     data: {\"choices\":[{\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n\
                     data: [DONE]\n\n"
                        .to_string()
                };
                let _ = stream.write_all(reply.as_bytes());
            });
        }
    });
    url
}

#[test]
fn a_server_that_fails_or_stalls_is_reported_not_scored() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("q.jsonl"),
        "{\"prompt\":\"ok?\",\"completion\":\" yes\"}\n\
         {\"prompt\":\"fail?\",\"completion\":\" yes\"}\n\
         {\"prompt\":\"stall?\",\"completion\":\" yes\"}\n\
         {\"prompt\":\"no?\",\"completion\":\" no\"}\n",
    )
    .unwrap();
    let task = dir.path().join("q.toml");
    std::fs::write(
        &task,
        "name = \"q\"\nmetric = \"exact_match\"\ndata = \"q.jsonl\"\n",
    )
    .unwrap();
    let url = flaky_server();
    let out = dir.path().join("report");
    let run = ft(&[
        "eval",
        "--server",
        &url,
        "--tasks",
        task.to_str().unwrap(),
        "--timeout",
        "1",
        "--concurrency",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let report = report_json(&out);
    let row = &report["rows"][0];
    assert_eq!(report["rows"].as_array().unwrap().len(), 1);
    assert_eq!(row["quant"], "server");
    assert_eq!(row["score"]["scored"], 2, "{row}");
    assert_eq!(
        row["score"]["value"], 0.5,
        "one of the two answers is right: {row}"
    );
    assert_eq!(
        (row["errors"].as_u64(), row["timeouts"].as_u64()),
        (Some(1), Some(1))
    );
    let answers = row["answers"].as_array().unwrap();
    assert!(
        answers[1]["error"].as_str().unwrap().contains("HTTP 500"),
        "{row}"
    );
    assert!(
        answers[2]["error"].as_str().unwrap().contains("timed out"),
        "{row}"
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| base | server | greedy | 2 | 0.500 | 2 | 1 | 1 |"),
        "{md}"
    );
    assert!(md.contains("Not answered"), "{md}");

    ft(&[
        "eval", "--server", &url, "--tasks", "dates", "--quant", "q8",
    ])
    .fails_with(2, &["--quant: applies to the in-process engine"]);
    let not_adapter = format!("x={}", dir.path().display());
    ft(&["eval", "--tasks", "dates", "--adapters", &not_adapter])
        .fails_with(2, &["--adapters", "not a PEFT adapter folder"]);
    ft(&["eval", "--tasks", "dates", "--decoding", "nucleus"]).fails_with(2, &["--decoding"]);
}
