//! Scaling sweep files (`ft scaling sweep`): the TOML, its sizes and budgets and the recipe
//! every run shares, planned into the runs' recipes; an accepted sweep's runs are recipes
//! that are accepted again.

use ft_tests::fuzz::{budget, fuzz, mutate_bytes, mutate_json, Outcome, Rng, Target};
use ft_trainer::recipe::parse;
use ft_trainer::scaling::sweep::plan;

use crate::{LONG, QUICK};

fn seeds() -> Vec<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/scaling.toml");
    let sweep = std::fs::read(path).expect("the bundled sweep");
    let isoflop = String::from_utf8_lossy(&sweep)
        .replace("tokens = [128000", "flops = [1e12")
        .into_bytes();
    vec![sweep, isoflop]
}

fn mutate(rng: &mut Rng, text: &[u8]) -> Vec<u8> {
    let as_json = std::str::from_utf8(text)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(t).ok())
        .and_then(|t| serde_json::to_value(t).ok());
    match (rng.below(3), as_json) {
        (0 | 1, Some(mut v)) => {
            mutate_json(rng, &mut v);
            toml::Value::try_from(&v)
                .ok()
                .and_then(|t| toml::to_string(&t).ok())
                .map_or_else(|| text.to_vec(), String::into_bytes)
        }
        _ => {
            let mut v = text.to_vec();
            let n = v.len();
            mutate_bytes(rng, &mut v, 0..n);
            v
        }
    }
}

fn run(input: &[u8]) -> Outcome {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("sweep.toml");
    std::fs::write(&path, input).expect("the input written");
    match plan(&path, Some(&dir.path().join("runs"))) {
        Ok(sweep) => {
            for run in &sweep.runs {
                if let Err(e) = parse(&run.recipe.to_toml(), &[], "run.toml") {
                    panic!("a planned run's recipe is refused: {}", e.0);
                }
            }
            Outcome::Accepted
        }
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

fn fuzz_sweeps(default: u64) {
    let (inputs, seed) = budget(default);
    let report = fuzz(
        &Target {
            name: "sweep",
            seeds: seeds(),
            mutate: &mutate,
            run: &run,
            // As a recipe's TOML (a few hundred bytes a value), plus a recipe per planned run
            // (at most 1,000), plus the tokenizer an IsoFLOP profile counts parameters with:
            // the default model's (49,152 tokens and their merges, about 40 MiB) when a
            // mutation drops `model.source`.
            heap_bound: &|n| 256 * n + (64 << 20),
        },
        inputs,
        seed,
    );
    report.assert_clean();
}

#[test]
fn sweeps_never_panic() {
    fuzz_sweeps(QUICK);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn sweeps_never_panic_long() {
    fuzz_sweeps(LONG);
}
