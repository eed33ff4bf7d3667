//! Scoring texts through `ft serve` as lm-evaluation-harness does: `/v1/completions` with
//! `echo` and `logprobs` gives each prompt token's log-probability (token-id prompts, several
//! per request, `max_tokens` 0 or 1), vLLM's `/tokenize` counts as the server does, and the
//! sums are what `ft perplexity` finds for the same text, with the base and with an adapter.
//! The ignored test runs lm-eval itself (`local-completions`) from a virtual environment.

use std::path::{Path, PathBuf};
use std::process::Command;

use ft_tests::{ft, write_adapter, Server};
use serde_json::{json, Value};

/// Summed log-probability of every token of `file` after the first, from `ft perplexity`.
fn perplexity_sum(file: &Path, adapter: Option<&Path>) -> f64 {
    let mut args = vec!["perplexity", "--json", "--window", "512", "--file"];
    args.push(file.to_str().unwrap());
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let run = ft(&args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v = run.json();
    -v["perplexity"].as_f64().unwrap().ln() * v["scored"].as_f64().unwrap()
}

/// The `logprobs.token_logprobs` of choice `i`, the first (`null`) as `None`.
fn token_logprobs(answer: &Value, i: usize) -> Vec<Option<f64>> {
    answer["choices"][i]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_logprobs in {answer}"))
        .iter()
        .map(Value::as_f64)
        .collect()
}

/// The ids `/tokenize` gives `text`.
fn tokenize(server: &Server, text: &str) -> Vec<u64> {
    let (status, answer) = server.post(
        "/tokenize",
        &json!({"prompt": text, "add_special_tokens": false}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["count"], answer["tokens"].as_array().unwrap().len());
    ft_tests::ids(&answer["tokens"])
}

const TEXTS: [&str; 2] = [
    "The capital of France is Paris, and its river is the Seine.",
    "Water boils at one hundred degrees at sea level.",
];

#[test]
fn echoed_prompts_are_scored_as_ft_perplexity_scores_them() {
    let dir = tempfile::tempdir().unwrap();
    // SmolLM2-135M: 30 layers, hidden 576, 3 key/value heads of 64.
    let adapter = dir.path().join("alpha");
    write_adapter(&adapter, 30, 576, 192, 1);
    let server = Server::start(&["--adapter", &format!("alpha={}", adapter.display())]);
    let base = "smollm2-135m-instruct";

    let ids: Vec<Vec<u64>> = TEXTS.iter().map(|t| tokenize(&server, t)).collect();
    let (status, back) = server.post("/detokenize", &json!({"tokens": ids[0]}));
    assert_eq!((status, back["prompt"].as_str()), (200, Some(TEXTS[0])));
    let info: Value = serde_json::from_str(&server.get("/tokenizer_info")).unwrap();
    assert_eq!(info["eos_token"], "<|im_end|>", "{info}");

    let mut sums = Vec::new();
    for (model, folder) in [(base, None), ("alpha", Some(adapter.as_path()))] {
        // Both texts in one request as token ids, scored only (max_tokens 0).
        let (status, answer) = server.post(
            "/v1/completions",
            &json!({"model": model, "prompt": ids, "echo": true, "logprobs": 1,
                    "max_tokens": 0, "temperature": 0}),
        );
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["usage"]["completion_tokens"], 0);
        for (i, text) in TEXTS.iter().enumerate() {
            let choice = &answer["choices"][i];
            assert_eq!(choice["index"], i);
            assert_eq!(choice["text"], *text, "the echo is the prompt");
            let lps = token_logprobs(&answer, i);
            assert_eq!(lps.len(), ids[i].len());
            assert_eq!(lps[0], None, "nothing predicts the first token");
            let ours: f64 = lps[1..].iter().map(|l| l.unwrap()).sum();
            let file = dir.path().join(format!("text-{i}.txt"));
            std::fs::write(&file, text).unwrap();
            let theirs = perplexity_sum(&file, folder);
            sums.push(ours);
            let per_token = (ours - theirs).abs() / (lps.len() - 1) as f64;
            assert!(
                per_token < 1e-3,
                "{model}, text {i}: echo {ours}, ft perplexity {theirs}"
            );
        }

        // The text itself with one new token, as lm-eval asks: the prompt's scores again,
        // then the greedy token's, which is its own top alternative.
        let (status, answer) = server.post(
            "/v1/completions",
            &json!({"model": model, "prompt": TEXTS[1], "echo": true, "logprobs": 1,
                    "max_tokens": 1, "temperature": 0}),
        );
        assert_eq!(status, 200, "{answer}");
        let lps = token_logprobs(&answer, 0);
        assert_eq!(lps.len(), ids[1].len() + 1);
        let top = &answer["choices"][0]["logprobs"]["top_logprobs"];
        let last = top[ids[1].len()].as_object().unwrap();
        let best = last
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!((best - lps[ids[1].len()].unwrap()).abs() < 1e-6, "{answer}");
        let text = answer["choices"][0]["text"].as_str().unwrap();
        assert!(text.starts_with(TEXTS[1]) && text.len() > TEXTS[1].len());
        let offsets = &answer["choices"][0]["logprobs"]["text_offset"];
        assert_eq!(offsets[0], 0);
        assert_eq!(offsets.as_array().unwrap().len(), lps.len());
    }

    assert!(
        (sums[0] - sums[2]).abs() > 0.1,
        "the adapter changes the scores: {sums:?}"
    );

    // A new token that is the end of the sequence is no text, but it is listed with its
    // log-probability (lm-eval drops the last entry as the new token's).
    let ends = "A week has seven days and a year has twelve months.";
    let (status, answer) = server.post(
        "/v1/completions",
        &json!({"model": base, "prompt": ends, "echo": true, "logprobs": 1,
                "max_tokens": 1, "temperature": 0}),
    );
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!(
        (choice["text"].as_str(), choice["finish_reason"].as_str()),
        (Some(ends), Some("stop"))
    );
    let tokens = choice["logprobs"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), tokenize(&server, ends).len() + 1);
    assert_eq!(tokens.last().unwrap(), "<|im_end|>");

    // Echo alone sends the prompt back, unscored.
    let (status, answer) = server.post(
        "/v1/completions",
        &json!({"model": base, "prompt": TEXTS[0], "echo": true, "max_tokens": 0}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["text"], TEXTS[0]);
    assert!(answer["choices"][0]["logprobs"].is_null(), "{answer}");

    // Streamed: the echo comes first, with its scores.
    let resp = ureq::post(&format!("{}/v1/completions", server.url))
        .send_json(
            json!({"model": base, "prompt": TEXTS[0], "echo": true, "logprobs": 0,
                          "max_tokens": 2, "temperature": 0, "stream": true}),
        )
        .unwrap()
        .into_string()
        .unwrap();
    let first: Value =
        serde_json::from_str(resp.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
    assert_eq!(first["choices"][0]["text"], TEXTS[0], "{first}");
    assert_eq!(token_logprobs(&first, 0).len(), ids[0].len());

    for (body, field) in [
        (
            json!({"model": base, "prompt": "hi", "max_tokens": 0}),
            "max_tokens",
        ),
        (json!({"model": base, "prompt": [1, -2]}), "prompt"),
        (
            json!({"model": base, "prompt": [[1], [2]], "stream": true}),
            "prompt",
        ),
        (
            json!({"model": base, "prompt": [[49152]], "echo": true}),
            "prompt",
        ),
        (json!({"model": base, "prompt": [], "echo": true}), "prompt"),
    ] {
        let (status, answer) = server.post("/v1/completions", &body);
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(message.contains(field), "{body}: {message}");
    }
}

/// lm-evaluation-harness in `$FT_HOME/venvs/lm-eval`, installed from PyPI the first time.
fn lm_eval() -> PathBuf {
    let venv = ft_tests::ft_home().join("venvs/lm-eval");
    let bin = venv.join("bin/lm_eval");
    if !bin.exists() {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3");
        assert!(made.success(), "python3 -m venv {}", venv.display());
        let installed = Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .arg(format!("lm_eval[api]=={LM_EVAL}"))
            .status()
            .expect("pip");
        assert!(installed.success(), "pip install lm_eval[api]=={LM_EVAL}");
    }
    bin
}

/// The lm-evaluation-harness release the test runs.
const LM_EVAL: &str = "0.4.13";

/// Three local tasks over one JSONL: a log-likelihood task, a multiple-choice task and a
/// generation task, as users write their own. (lm-eval puts `target_delimiter` before each
/// choice but not before a log-likelihood task's target: the continuations hold their space.)
fn tasks(dir: &Path) -> PathBuf {
    let data = dir.join("docs.jsonl");
    let docs = [
        (
            "The capital of France is",
            " Paris, and its river is the Seine.",
            ["Paris", "Rome", "Berlin"],
            0,
        ),
        (
            "Water boils at one hundred",
            " degrees at sea level.",
            ["kelvin", "degrees", "meters"],
            1,
        ),
        (
            "A week has seven days and a year has",
            " twelve months.",
            ["ten", "nine", "twelve"],
            2,
        ),
    ];
    let lines: Vec<String> = docs
        .iter()
        .map(|(context, continuation, choices, label)| {
            json!({"context": context, "continuation": continuation, "choices": choices,
                   "label": label})
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let tasks = dir.join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    let head = |name: &str, kind: &str| {
        format!(
            "task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\n\
             test_split: test\noutput_type: {kind}\ntarget_delimiter: \" \"\n\
             metadata:\n  version: 1.0\n",
            data.display()
        )
    };
    let write = |name: &str, kind: &str, rest: &str| {
        std::fs::write(tasks.join(format!("{name}.yaml")), head(name, kind) + rest).unwrap();
    };
    write(
        "ft_ll",
        "loglikelihood",
        "doc_to_text: \"{{context}}\"\ndoc_to_target: \"{{continuation}}\"\nmetric_list:\n  \
         - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n",
    );
    write(
        "ft_mc",
        "multiple_choice",
        "doc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n\
         metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
    );
    write(
        "ft_gen",
        "generate_until",
        "doc_to_text: \"{{context}}\"\ndoc_to_target: \"{{continuation}}\"\n\
         generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 16\n  do_sample: false\n  \
         temperature: 0.0\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n    \
         higher_is_better: true\n",
    );
    tasks
}

/// The per-document records lm-eval logged for `task`.
fn samples(out: &Path, task: &str) -> Vec<Value> {
    let mut found = Vec::new();
    for model in std::fs::read_dir(out).unwrap() {
        for file in std::fs::read_dir(model.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with(&format!("samples_{task}_")) {
                let text = std::fs::read_to_string(&path).unwrap();
                found.extend(
                    text.lines()
                        .map(|l| serde_json::from_str::<Value>(l).unwrap()),
                );
            }
        }
    }
    assert!(
        !found.is_empty(),
        "no samples of {task} in {}",
        out.display()
    );
    found.sort_by_key(|s| s["doc_id"].as_u64());
    found
}

/// `log p(continuation | context)` by `ft perplexity`: the summed log-probability of the
/// text `context + continuation` less that of the context alone (the context's tokens
/// begin the whole's).
fn conditional(dir: &Path, context: &str, continuation: &str, adapter: Option<&Path>) -> f64 {
    let (whole, alone) = (dir.join("whole.txt"), dir.join("context.txt"));
    std::fs::write(&whole, format!("{context}{continuation}")).unwrap();
    std::fs::write(&alone, context).unwrap();
    perplexity_sum(&whole, adapter) - perplexity_sum(&alone, adapter)
}

#[test]
#[ignore = "installs lm-evaluation-harness from PyPI into $FT_HOME/venvs/lm-eval the first time"]
fn lm_eval_scores_and_generates_through_ft_serve_as_ft_does() {
    let lm_eval = lm_eval();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("alpha");
    write_adapter(&adapter, 30, 576, 192, 1);
    let server = Server::start(&["--adapter", &format!("alpha={}", adapter.display())]);
    let tasks = tasks(dir.path());
    for (model, folder) in [
        ("smollm2-135m-instruct", None),
        ("alpha", Some(adapter.as_path())),
    ] {
        let out = dir.path().join(format!("out-{model}"));
        let run = Command::new(&lm_eval)
            .args(["--model", "local-completions", "--model_args"])
            .arg(format!(
                "model={model},base_url={}/v1/completions,num_concurrent=1,max_retries=1",
                server.url
            ))
            .args([
                "--batch_size",
                "1",
                "--tasks",
                "ft_ll,ft_mc,ft_gen",
                "--log_samples",
            ])
            .arg("--include_path")
            .arg(&tasks)
            .arg("--output_path")
            .arg(&out)
            .output()
            .expect("lm_eval");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{stderr}");

        // Log-likelihoods: each (context, continuation) pair lm-eval scored, against
        // `ft perplexity` over the same texts.
        for task in ["ft_ll", "ft_mc"] {
            for sample in samples(&out, task) {
                let context = sample["arguments"]["gen_args_0"]["arg_0"].as_str().unwrap();
                let args = sample["arguments"].as_object().unwrap();
                for (i, pair) in args.values().enumerate() {
                    let continuation = pair["arg_1"].as_str().unwrap();
                    let theirs: f64 = sample["resps"][i][0][0].as_str().unwrap().parse().unwrap();
                    let ours = conditional(dir.path(), context, continuation, folder);
                    let tokens = tokenize(&server, continuation).len();
                    assert!(
                        (theirs - ours).abs() / tokens as f64 <= 1e-3,
                        "{model} {task}: lm-eval {theirs}, ft perplexity {ours} for {continuation:?}"
                    );
                }
            }
        }

        // Generations: what `ft generate` gives the same prompt, up to the first stop.
        for sample in samples(&out, "ft_gen") {
            let prompt = sample["arguments"]["gen_args_0"]["arg_0"].as_str().unwrap();
            let mut args = vec!["generate", "--json", "--temperature", "0"];
            args.extend(["--max-new-tokens", "16", "--prompt", prompt]);
            if let Some(a) = folder {
                args.extend(["--adapter", a.to_str().unwrap()]);
            }
            let run = ft(&args);
            assert_eq!(run.code, 0, "{}", run.stderr);
            let text = run.json()["text"].as_str().unwrap().to_string();
            let cut = text.split(['\n', '.']).next().unwrap_or_default();
            assert_eq!(
                sample["resps"][0][0].as_str().unwrap(),
                cut,
                "{model}: {prompt:?}"
            );
        }
    }
}
