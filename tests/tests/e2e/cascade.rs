//! `ft cascade fit` and `ft cascade eval` as a user runs them: every stage answers the
//! development split, the fit writes scorers, thresholds and the chosen stages within the
//! budget, and the evaluation draws held-out accuracy against cost with each stage alone.

use std::path::Path;

use ft_tests::{ft, tiny, tiny_model, Server};
use serde_json::Value;

/// A task whose every prompt is the same short sum (the tiny model's context is 64 byte
/// tokens), so that a greedy stage gives one answer to all of them: the examples whose
/// expected answer is `answer` are right, the rest wrong.
fn write_task(dir: &Path, answer: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let line = |i: usize| {
        let expected = if i.is_multiple_of(2) { answer } else { "zzz" };
        format!(
            "{{\"prompt\":\"2+2=\",\"completion\":{}}}\n",
            serde_json::json!(expected)
        )
    };
    std::fs::write(
        dir.join("train.jsonl"),
        (0..12).map(line).collect::<String>(),
    )
    .unwrap();
    std::fs::write(dir.join("test.jsonl"), (0..6).map(line).collect::<String>()).unwrap();
    std::fs::write(
        dir.join("sums.toml"),
        "name = \"sums\"\nmetric = \"exact_match\"\ndata = \"test.jsonl\"\ntrain = \"train.jsonl\"\nmax_tokens = 2\n",
    )
    .unwrap();
}

const CASCADE: &str = "\
[[stage]]
name = \"greedy\"
price = { input = 1.0, output = 2.0 }

[[stage]]
name = \"sampled\"
decoding = \"sample\"
price = { input = 2.0, output = 4.0 }

[[stage]]
name = \"vote\"
decoding = \"sc2\"
price = { input = 4.0, output = 8.0 }
";

#[test]
fn a_cascade_is_fitted_to_a_budget_and_drawn_against_cost() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let tasks = dir.path().join("tasks");
    let cascade = dir.path().join("cascade.toml");
    std::fs::write(&cascade, CASCADE).unwrap();
    let fitted = dir.path().join("fitted.toml");
    // The task by its file: `eval` finds it again without --task-dir.
    let task_file = tasks.join("sums.toml");
    let fit = |budget: &str| {
        ft(&[
            "cascade",
            "fit",
            cascade.to_str().unwrap(),
            "--model",
            gguf.to_str().unwrap(),
            "--task",
            task_file.to_str().unwrap(),
            "--dev-size",
            "10",
            "--budget",
            budget,
            "--out",
            fitted.to_str().unwrap(),
        ])
    };
    // First learn what the greedy stage answers, then make half the examples expect it.
    write_task(&tasks, "x");
    let first = fit("1000");
    assert_eq!(first.code, 0, "{}", first.stderr);
    let dev: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("fitted.dev.json")).unwrap())
            .unwrap();
    let greedy = dev[0]["outcomes"][0]["answer"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        dev[0]["outcomes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["answer"] == greedy.as_str()),
        "one answer to one prompt: {dev}"
    );
    write_task(&tasks, greedy.trim());

    let run = fit("1000");
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("fitted"), "{}", run.stdout);
    let text = std::fs::read_to_string(&fitted).unwrap();
    let file: toml::Value = toml::from_str(&text).unwrap();
    let fit_table = &file["fit"];
    assert!(
        fit_table["task"].as_str().unwrap().ends_with("sums.toml"),
        "{text}"
    );
    assert_eq!(fit_table["dev_examples"].as_integer(), Some(10));
    let dev_accuracy = fit_table["dev_accuracy"].as_float().unwrap();
    assert!(dev_accuracy >= 0.5, "greedy alone is right on half: {text}");
    let stages = file["stage"].as_array().unwrap();
    assert_eq!(stages.len(), 3);
    assert!(stages.iter().all(|s| s.get("scorer").is_some()), "{text}");

    let out = dir.path().join("report");
    let eval = ft(&[
        "cascade",
        "eval",
        fitted.to_str().unwrap(),
        "--model",
        gguf.to_str().unwrap(),
        "--budgets",
        "0.001,0.01,1000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(eval.code, 0, "{}", eval.stderr);
    let curve: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("curve.json")).unwrap()).unwrap();
    assert_eq!(curve["examples"], 6);
    let singles = curve["singles"].as_array().unwrap();
    assert_eq!(singles.len(), 3);
    let greedy_alone = &singles[0];
    assert_eq!(greedy_alone["accuracy"], 0.5, "{curve}");
    // Greedy costs 1 USD per 1M prompt tokens and 2 per 1M output tokens: 4 and at most 2
    // tokens per request.
    let cost = greedy_alone["cost_per_k"].as_f64().unwrap();
    assert!(cost > 0.0 && cost <= (4.0 + 2.0 * 2.0) / 1e3, "{cost}");
    // 0.001 USD per 1,000 requests is below every stage; the other two budgets are drawn.
    let points = curve["points"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{curve}");
    for p in points {
        let (spent, budget) = (p["dev_cost_per_k"].as_f64(), p["budget_per_k"].as_f64());
        assert!(spent.unwrap() <= budget.unwrap() + 1e-9, "{p}");
    }
    assert!(
        eval.stdout.contains("| stage alone | accuracy |"),
        "{}",
        eval.stdout
    );
    for f in ["curve.md", "curve.svg", "curve.png"] {
        assert!(out.join(f).exists(), "{f}");
    }

    fit("0.000001").fails_with(2, &["--budget", "below the cheapest stage"]);
    fit("half").fails_with(2, &["--budget"]);
    ft(&["cascade", "eval", cascade.to_str().unwrap()]).fails_with(2, &["not fitted"]);
    let missing = dir.path().join("missing.toml");
    ft(&["cascade", "eval", missing.to_str().unwrap()]).fails_with(2, &["missing.toml"]);
    let bad = dir.path().join("bad.toml");
    for (text, needles) in [
        (
            "[[stage]]\nname = \"a\"\n",
            &["stage a has no price", "--price-per-hour"][..],
        ),
        (
            "[[stage]]\nname = \"a\"\ndecoding = \"sc1\"\n",
            &["bad.toml", "scN"][..],
        ),
        (
            "[[stage]]\nname = \"a\"\nquant = \"q5\"\nprice = { input = 1.0, output = 1.0 }\n",
            &["bad.toml: stage a: quant", "q5"][..],
        ),
        (
            "[[stage]]\nname = \"a\"\nshots = 5000\nprice = { input = 1.0, output = 1.0 }\n",
            &["bad.toml: stage a: shots", "solved example"][..],
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = fitted.to_str().unwrap();
        ft(&[
            "cascade",
            "fit",
            bad.to_str().unwrap(),
            "--task",
            "dates",
            "--budget",
            "1",
            "--out",
            out,
        ])
        .fails_with(2, needles);
    }
}

/// POSTs `body` to the server's `/v1/completions`: the status, the `x-ft-stage` header and
/// the JSON answer.
fn complete(server: &Server, body: &Value) -> (u16, Option<String>, Value) {
    let answer = ureq::post(&format!("{}/v1/completions", server.url))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string());
    let r = match answer {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST /v1/completions: {e}"),
    };
    let (status, stage) = (r.status(), r.header("x-ft-stage").map(str::to_string));
    let text = r.into_string().unwrap();
    (
        status,
        stage,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The value of `name{cascade="sums",stage="stage"}` in the server's metrics.
fn stage_metric(server: &Server, name: &str, stage: &str) -> f64 {
    let text = server.get("/metrics");
    let key = format!("{name}{{cascade=\"sums\",stage=\"{stage}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

/// Sets, in the fitted cascade file `path`, the chain to `chain` and the first stage's
/// threshold to `threshold`.
fn edit(path: &Path, chain: &[&str], threshold: f64) {
    let mut file: toml::Value = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file["fit"]["chain"] = toml::Value::Array(chain.iter().map(|s| (*s).into()).collect());
    let stages = file["stage"].as_array_mut().unwrap();
    let first = stages[0].as_table_mut().unwrap();
    first.insert("threshold".into(), threshold.into());
    std::fs::write(path, toml::to_string(&file).unwrap()).unwrap();
}

#[test]
fn a_fitted_cascade_is_served_as_a_model_that_names_its_stage() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let gguf = gguf.to_str().unwrap();
    let tasks = dir.path().join("tasks");
    write_task(&tasks, "x");
    let task_file = tasks.join("sums.toml");
    // A second server, for a stage on another machine; fitting asks it through its url.
    let other = Server::start(&["--model", gguf, "--served-model-name", "remote-tiny"]);
    let cascade = dir.path().join("cascade.toml");
    std::fs::write(
        &cascade,
        format!(
            "[[stage]]\nname = \"greedy\"\nprice = {{ input = 1.0, output = 2.0 }}\n\n\
             [[stage]]\nname = \"sampled\"\ndecoding = \"sample\"\nshots = 2\nprice = {{ input = 2.0, output = 4.0 }}\n\n\
             [[stage]]\nname = \"remote\"\nurl = \"{}\"\nmodel = \"remote-tiny\"\nprice = {{ input = 4.0, output = 8.0 }}\n",
            other.url
        ),
    )
    .unwrap();
    let fitted = dir.path().join("fitted.toml");
    let fit = ft(&[
        "cascade",
        "fit",
        cascade.to_str().unwrap(),
        "--model",
        gguf,
        "--task",
        task_file.to_str().unwrap(),
        "--dev-size",
        "10",
        "--budget",
        "1000",
        "--out",
        fitted.to_str().unwrap(),
    ]);
    assert_eq!(fit.code, 0, "{}", fit.stderr);
    let dev: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("fitted.dev.json")).unwrap())
            .unwrap();
    let remote = &dev[2]["outcomes"][0];
    assert!(
        remote["error"].is_null(),
        "the remote stage answered: {remote}"
    );
    assert_eq!(
        remote["answer"], dev[0]["outcomes"][0]["answer"],
        "greedy, both"
    );
    let greedy = dev[0]["outcomes"][0]["answer"]
        .as_str()
        .unwrap()
        .to_string();
    let spec = format!("sums={}", fitted.display());

    // The first stage never keeps its answer: the second answers, and both are paid for.
    edit(&fitted, &["greedy", "sampled"], 2.0);
    let server = Server::start(&["--model", gguf, "--cascade", &spec]);
    let models = server.get("/v1/models");
    assert!(models.contains("\"sums\""), "{models}");
    let ask = serde_json::json!({"model": "sums", "prompt": "2+2=", "max_tokens": 2});
    let (status, header, body) = complete(&server, &ask);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (header.as_deref(), &body["ft_stage"]),
        (Some("sampled"), &Value::from("sampled"))
    );
    assert_eq!(body["model"], "sums");
    assert!(body["choices"][0]["logprobs"].is_null(), "not asked for");
    let usage = &body["usage"];
    assert!(
        usage["prompt_tokens"].as_u64().unwrap() > 8,
        "both stages' prompts, the second with its demonstrations: {usage}"
    );
    assert_eq!(
        stage_metric(&server, "ft_cascade_requests_total", "greedy"),
        1.0
    );
    assert_eq!(
        stage_metric(&server, "ft_cascade_answers_total", "greedy"),
        0.0
    );
    assert_eq!(
        stage_metric(&server, "ft_cascade_answers_total", "sampled"),
        1.0
    );
    assert!(stage_metric(&server, "ft_cascade_cost_usd_total", "sampled") > 0.0);

    // Streamed, the same answer comes as events naming the stage.
    let streamed = ureq::post(&format!("{}/v1/completions", server.url))
        .send_json(serde_json::json!({"model": "sums", "prompt": "2+2=", "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}}))
        .unwrap();
    assert_eq!(streamed.header("x-ft-stage"), Some("sampled"));
    let events = streamed.into_string().unwrap();
    assert!(
        events.contains("\"ft_stage\":\"sampled\"") && events.contains("\"usage\""),
        "{events}"
    );
    assert!(events.trim_end().ends_with("data: [DONE]"), "{events}");

    for (body, needle) in [
        (
            serde_json::json!({"model": "sums", "prompt": ["a", "b"]}),
            "one text prompt",
        ),
        (
            serde_json::json!({"model": "sums", "prompt": "a", "n": 2}),
            "one choice",
        ),
    ] {
        let (status, _, answer) = complete(&server, &body);
        assert_eq!(status, 400, "{answer}");
        assert!(answer.to_string().contains(needle), "{answer}");
    }
    let (status, chat) = server.post(
        "/v1/chat/completions",
        &serde_json::json!({"model": "sums", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 400);
    assert!(chat.to_string().contains("use /v1/completions"), "{chat}");
    drop(server);

    // Kept at once: the first stage answers, as greedy decoding does.
    edit(&fitted, &["greedy", "sampled"], 0.0);
    let server = Server::start(&["--model", gguf, "--cascade", &spec]);
    let (status, header, body) = complete(&server, &ask);
    assert_eq!((status, header.as_deref()), (200, Some("greedy")), "{body}");
    assert_eq!(body["choices"][0]["text"], greedy.as_str());
    assert_eq!(
        stage_metric(&server, "ft_cascade_requests_total", "sampled"),
        0.0
    );
    drop(server);

    // A stage on the other server answers through its url; once that server is gone, the
    // cascade says which stage failed and where.
    edit(&fitted, &["greedy", "remote"], 2.0);
    let server = Server::start(&["--model", gguf, "--cascade", &spec]);
    let (status, header, body) = complete(&server, &ask);
    assert_eq!((status, header.as_deref()), (200, Some("remote")), "{body}");
    assert_eq!(body["choices"][0]["text"], greedy.as_str());
    let other_url = other.url.clone();
    drop(other);
    let (status, _, body) = complete(&server, &ask);
    assert_eq!(status, 502, "{body}");
    assert!(
        body.to_string().contains("stage remote") && body.to_string().contains(&other_url),
        "{body}"
    );
    drop(server);

    // Usage errors name the flag, the file and the stage.
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--model", gguf, "--port", "0"];
        args.extend_from_slice(extra);
        ft(&args)
    };
    serve(&["--cascade", "sums"]).fails_with(2, &["--cascade sums", "NAME=FILE"]);
    serve(&["--cascade", &format!("sums={}", cascade.display())])
        .fails_with(2, &["cascade.toml", "not fitted"]);
    let mut file: toml::Value = toml::from_str(&std::fs::read_to_string(&fitted).unwrap()).unwrap();
    let first = file["stage"][0].as_table_mut().unwrap();
    first.insert("quant".into(), "q8".into());
    std::fs::write(&fitted, toml::to_string(&file).unwrap()).unwrap();
    serve(&["--cascade", &spec]).fails_with(2, &["fitted.toml", "stage greedy", "quant"]);
}
