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
    for name in [
        "loss-against-compute",
        "fitted-against-observed",
        "iso-loss",
    ] {
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

/// A sweep of byte-level models on the bundled text: six runs in the grid and one held out,
/// the last long enough to be killed, with the whole sweep, after its first checkpoint.
fn tiny_sweep(dir: &Path) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = dir.join("sweep.toml");
    let size = |name: &str, d: usize, layers: usize| {
        format!(
            "name = \"{name}\"\nhidden_size = {d}\nnum_hidden_layers = {layers}\n\
             num_attention_heads = 2\nintermediate_size = {}\n",
            2 * d
        )
    };
    let text = format!(
        "out = {:?}\ntokens = [2000, 4000]\nlr_base_width = 8\n\n[recipe]\nmodel.source = {:?}\n\
         data.train = {:?}\ndata.format = \"text\"\ndata.max_seq_len = 256\ndata.packing = true\n\
         data.val_fraction = 0.05\ndata.val_limit = 8\ntrain.micro_batch_size = 2\n\
         train.lr = 0.01\ntrain.save_every = 20\n\n[[size]]\n{}\n[[size]]\n{}\n[[size]]\n{}\n\
         [[held_out]]\n{}tokens = 60000\n",
        dir.join("runs"),
        root.join("data/tokenizers/bytes"),
        root.join("data/text/kjv-train.jsonl"),
        size("d8", 8, 1),
        size("d16", 16, 1),
        size("d24", 24, 2),
        size("d256", 256, 2),
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_sweep_killed_mid_run_resumes_without_redoing_finished_runs() {
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant, SystemTime};

    let dir = tempfile::tempdir().unwrap();
    let sweep = tiny_sweep(dir.path());
    let out = dir.path().join("runs");
    let grid = [
        "d8-2000", "d8-4000", "d16-2000", "d16-4000", "d24-2000", "d24-4000",
    ];
    let held = "d256-60000";

    // The whole sweep (its own process group: the sweep and its `ft train`) is killed once
    // the held-out run has written a checkpoint.
    let mut child = std::process::Command::new(ft_tests::ft_bin())
        .args(["scaling", "sweep", sweep.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let checkpoints = out.join(held).join("checkpoints");
    while !std::fs::read_dir(&checkpoints)
        .map(|d| {
            // A finished checkpoint: a step folder (a temporary one is being written).
            d.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("step-")
                    && e.path().join("trainer_state.json").is_file()
            })
        })
        .unwrap_or(false)
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before the held-out run saved a checkpoint"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A second sweep on the same folder meanwhile is refused.
    ft(&["scaling", "sweep", sweep.to_str().unwrap()])
        .fails_with(1, &["another sweep", "is running in this folder"]);
    let group = format!("-{}", child.id());
    let killed = std::process::Command::new("kill")
        .args(["-9", "--", &group])
        .status()
        .unwrap();
    assert!(killed.success());
    child.wait().unwrap();
    assert!(!out.join(held).join("summary.json").exists());

    let stamp = |run: &str| -> (SystemTime, String) {
        let path = out.join(run).join("summary.json");
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        (modified, std::fs::read_to_string(path).unwrap())
    };
    let before: Vec<_> = grid.iter().map(|r| stamp(r)).collect();
    let csv = std::fs::read_to_string(out.join("runs.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + grid.len(), "{csv}");

    let again = ft(&["scaling", "sweep", sweep.to_str().unwrap()]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    for (run, was) in grid.iter().zip(&before) {
        assert_eq!(&stamp(run), was, "{run} was trained again");
        let log = std::fs::read_to_string(out.join(format!("{run}.log"))).unwrap();
        assert_eq!(log.matches("from scratch").count(), 1, "{run}: {log}");
    }
    let log = std::fs::read_to_string(out.join(format!("{held}.log"))).unwrap();
    assert!(log.contains("resuming from"), "{log}");
    let csv = std::fs::read_to_string(out.join("runs.csv")).unwrap();
    let names: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(names, [&grid[..], &[held]].concat());
    assert!(csv.lines().last().unwrap().ends_with(",true"), "{csv}");
    assert!(again.stdout.contains("no (held out)"), "{}", again.stdout);

    // train.lr is the rate at width 8, each run's scaled by 8 / hidden_size.
    for (run, lr) in [("d8-2000", "lr = 0.01\n"), ("d16-4000", "lr = 0.005\n")] {
        let recipe = std::fs::read_to_string(out.join(run).join("recipe.toml")).unwrap();
        assert!(recipe.contains(lr), "{run}: {recipe}");
    }

    // A third start trains nothing; the fit leaves the held-out run out and predicts it.
    let third = ft(&["scaling", "sweep", sweep.to_str().unwrap()]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert_eq!(stamp(grid[0]), before[0]);
    let fit = ft(&[
        "scaling",
        "fit",
        out.join("runs.csv").to_str().unwrap(),
        "--bootstrap",
        "0",
    ]);
    assert_eq!(fit.code, 0, "{}", fit.stderr);
    assert!(fit.stdout.contains("fitted to 6 runs"), "{}", fit.stdout);
    assert!(
        fit.stdout.contains("held-out runs (not fitted)"),
        "{}",
        fit.stdout
    );

    // A changed sweep does not pass off the old runs as its own.
    let text = std::fs::read_to_string(&sweep).unwrap();
    std::fs::write(&sweep, text.replace("train.lr = 0.01", "train.lr = 0.02")).unwrap();
    ft(&["scaling", "sweep", sweep.to_str().unwrap()])
        .fails_with(2, &["run d8-2000", "another recipe", "--out"]);

    // A run's recipe is a recipe: `ft train` runs it, and it has no PEFT job to export.
    let recipe = out.join(format!("{}.toml", grid[0]));
    ft(&[
        "recipe",
        "export",
        recipe.to_str().unwrap(),
        "--to",
        "axolotl",
    ])
    .fails_with(2, &["model.init", "from scratch"]);
}

#[test]
fn bad_sweep_files_are_usage_errors_that_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = tiny_sweep(dir.path());
    let text = std::fs::read_to_string(&sweep).unwrap();
    for (edit, needle) in [
        (text.replace("tokens = [2000, 4000]", ""), "tokens or flops"),
        (
            text.replace("tokens = [2000, 4000]", "tokens = [2000]\nflops = [1e9]"),
            "give one, not both",
        ),
        (
            text.replace("tokens = [2000, 4000]", "tokens = [0]"),
            "tokens: expected positive budgets",
        ),
        (
            text.replace("lr_base_width = 8", "lr_base_width = 0"),
            "lr_base_width: expected a width",
        ),
        (
            text.replace("name = \"d16\"", "name = \"d8\""),
            "two runs are named \"d8-2000\"",
        ),
        (
            text.replace("name = \"d16\"", "name = \"a/b\""),
            "it names a folder",
        ),
        (
            text.replace("num_attention_heads = 2", "num_attention_heads = 3"),
            "expected a divisor of hidden_size",
        ),
        (
            text.replace("train.lr = 0.01", "train.lr = 0.01\ntrain.max_steps = 5"),
            "give train.max_steps or train.max_tokens",
        ),
        (
            text.replace("tokens = [2000, 4000]", "tokens = [2000, 4000]\nsizes = 3"),
            "unknown field `sizes`",
        ),
        (
            text.replace(
                "tokens = [2000, 4000]",
                &format!("tokens = {:?}", (1..=400).collect::<Vec<usize>>()),
            ),
            "1201 runs: a sweep trains at most 1000",
        ),
    ] {
        std::fs::write(&sweep, edit).unwrap();
        ft(&["scaling", "sweep", sweep.to_str().unwrap()]).fails_with(2, &[needle]);
    }

    // Data that only the run reads: the run fails with a usage error, and so does the sweep,
    // naming the run and its log.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\nnot json\n").unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = format!("{:?}", root.join("data/text/kjv-train.jsonl"));
    std::fs::write(&sweep, text.replace(&data, &format!("{bad:?}"))).unwrap();
    let run = ft(&["scaling", "sweep", sweep.to_str().unwrap()]);
    run.fails_with(2, &["run d8-2000 failed", "d8-2000.log"]);
    let log = std::fs::read_to_string(dir.path().join("runs/d8-2000.log")).unwrap();
    assert!(log.contains("bad.jsonl"), "{log}");
}
