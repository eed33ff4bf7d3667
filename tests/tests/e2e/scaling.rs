//! `ft scaling fit` on Epoch AI's points from the Chinchilla paper, and `ft scaling plan` with
//! the published laws and with the fitted one.

use std::path::Path;

use ft_tests::ft;

/// The runs of the fixture as `ft scaling fit` reads them (`params`, `tokens`, `loss`), the
/// five of highest loss left out as Epoch did.
fn chinchilla_runs(path: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/reference/chinchilla_svg_extracted_data.csv");
    let text = std::fs::read_to_string(fixture).unwrap();
    let mut rows: Vec<(f64, f64, f64)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let n: f64 = cells[3].parse().unwrap();
            let c: f64 = cells[4].parse().unwrap();
            (n, c / (6.0 * n), cells[6].parse().unwrap())
        })
        .collect();
    rows.sort_by(|a, b| a.2.total_cmp(&b.2));
    rows.truncate(rows.len() - 5);
    let mut csv = String::from("params,tokens,loss\n");
    for (n, d, l) in rows {
        csv += &format!("{n},{d},{l}\n");
    }
    std::fs::write(path, csv).unwrap();
}

#[test]
fn the_chinchilla_points_fit_to_epochs_law_and_plan_twenty_tokens_a_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs.csv");
    chinchilla_runs(&runs);
    let fit = ft(&[
        "scaling",
        "fit",
        runs.to_str().unwrap(),
        "--json",
        "--bootstrap",
        "20",
    ]);
    assert_eq!(fit.code, 0, "{}", fit.stderr);
    let json = fit.json();
    let law = &json["law"];
    assert!((law["E"].as_f64().unwrap() - 1.817).abs() < 0.01, "{json}");
    assert!(
        (law["alpha"].as_f64().unwrap() - 0.348).abs() < 0.003,
        "{json}"
    );
    assert!(
        (law["beta"].as_f64().unwrap() - 0.366).abs() < 0.003,
        "{json}"
    );
    assert_eq!(json["intervals"].as_array().unwrap().len(), 5);
    // Approach 1 on the same points: Hoffmann et al.'s a = b = 0.50.
    let a1 = json["frontier"]["params"]["exponent"].as_f64().unwrap();
    let b1 = json["frontier"]["tokens"]["exponent"].as_f64().unwrap();
    assert!(
        (a1 - 0.5).abs() < 0.03 && (a1 + b1 - 1.0).abs() < 1e-9,
        "{json}"
    );
    let kaplan = json["kaplan"]["params"]["exponent"].as_f64().unwrap();
    assert!((0.03..0.15).contains(&kaplan), "{json}");
    let figures = dir.path().join("figures");
    let table = ft(&[
        "scaling",
        "fit",
        runs.to_str().unwrap(),
        "--bootstrap",
        "0",
        "--plot",
        figures.to_str().unwrap(),
    ]);
    for name in ["loss-against-compute", "fitted-against-observed"] {
        for ext in ["svg", "png"] {
            let file = figures.join(format!("{name}.{ext}"));
            assert!(std::fs::metadata(&file).unwrap().len() > 2000, "{file:?}");
        }
    }
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(table.stdout.contains("| alpha | 0.347"), "{}", table.stdout);

    // Chinchilla's own budget: about 20 tokens a parameter under Epoch's law, and under the
    // law just fitted, read back from its JSON.
    let fitted = dir.path().join("law.json");
    std::fs::write(&fitted, &fit.stdout).unwrap();
    for law in ["epoch", fitted.to_str().unwrap()] {
        let plan = ft(&["scaling", "plan", "--compute", "5.76e23", "--law", law]);
        assert_eq!(plan.code, 0, "{}", plan.stderr);
        let row = plan.stdout.lines().nth(2).unwrap();
        let ratio: f64 = row.split('|').nth(4).unwrap().trim().parse().unwrap();
        assert!((17.0..24.0).contains(&ratio), "{law}: {row}");
    }
    let plan = ft(&["scaling", "plan", "--params", "7e10", "--law", "chinchilla"]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    // Serving 20 trillion tokens: a smaller model of the same loss, trained on more tokens,
    // costs less in all.
    let plan = ft(&[
        "scaling",
        "plan",
        "--compute",
        "5.76e23",
        "--inference-tokens",
        "2e13",
    ]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let cell = |row: usize, col: usize| -> f64 {
        let line = plan.stdout.lines().nth(row).unwrap();
        line.split('|').nth(col).unwrap().trim().parse().unwrap()
    };
    assert!(
        cell(3, 2) < cell(2, 2) && cell(3, 3) > cell(2, 3),
        "{}",
        plan.stdout
    );
    assert!(
        cell(3, 7) < cell(2, 7),
        "fewer GPU-hours in all: {}",
        plan.stdout
    );
    assert!(
        (cell(3, 9) - cell(2, 9)).abs() < 1e-4,
        "the same loss: {}",
        plan.stdout
    );

    // Bad input: usage errors that say what is wrong.
    std::fs::write(dir.path().join("bad.csv"), "params,loss\n1e6,3\n").unwrap();
    ft(&[
        "scaling",
        "fit",
        dir.path().join("bad.csv").to_str().unwrap(),
    ])
    .fails_with(2, &["no column \"tokens\""]);
    ft(&["scaling", "plan", "--compute=-1"])
        .fails_with(2, &["--compute: expected a positive number"]);
    ft(&["scaling", "plan", "--tokens", "1e9", "--law", "nope.json"]).fails_with(2, &["--law"]);
    ft(&[
        "scaling",
        "plan",
        "--compute",
        "1e20",
        "--inference-tokens=-5",
    ])
    .fails_with(2, &["--inference-tokens"]);
    ft(&["scaling", "plan", "--compute", "1e20", "--gpu-flops", "0"])
        .fails_with(2, &["--gpu-flops: expected a positive number"]);
}
