//! `ft cascade fit` and `ft cascade eval` as a user runs them: every stage answers the
//! development split, the fit writes scorers, thresholds and the chosen stages within the
//! budget, and the evaluation draws held-out accuracy against cost with each stage alone.

use std::path::Path;

use ft_tests::{ft, tiny, tiny_model};
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
