//! Training recipes: TOML text and `--set` overrides, parsed and validated; a recipe that is
//! accepted must print (`ft recipe show`) as TOML that is accepted again.

use ft_tests::fuzz::{budget, fuzz, mutate_bytes, mutate_json, Outcome, Rng, Target};
use ft_trainer::recipe::parse;
use serde_json::Value;

use crate::{LONG, QUICK};

/// Lines of an input that carry a `--set` override rather than recipe text.
const SET: &str = "#--set ";

fn seeds() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("the recipes folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| std::fs::read(p).expect("a recipe"))
        // A sweep file is its own parser's seed (`sweep.rs`).
        .filter(|text| !String::from_utf8_lossy(text).contains("[[size]]"))
        .collect();
    seeds.sort();
    seeds
}

/// A dotted key of `v` and one of its values, for a `--set`.
fn some_key(rng: &mut Rng, v: &Value) -> Option<(String, String)> {
    let section = v.as_object()?;
    let (name, table) = section.iter().nth(rng.below(section.len()))?;
    let table = table.as_object()?;
    let (key, value) = table.iter().nth(rng.below(table.len().max(1)))?;
    Some((format!("{name}.{key}"), value.to_string()))
}

fn mutate(rng: &mut Rng, text: &[u8]) -> Vec<u8> {
    let as_json = std::str::from_utf8(text)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(t).ok())
        .and_then(|t| serde_json::to_value(t).ok());
    match (rng.below(4), as_json) {
        (0 | 1, Some(mut v)) => {
            mutate_json(rng, &mut v);
            let sets: String = text
                .split(|&b| b == b'\n')
                .filter(|l| l.starts_with(SET.as_bytes()))
                .map(|l| format!("{}\n", String::from_utf8_lossy(l)))
                .collect();
            match toml::Value::try_from(&v)
                .ok()
                .and_then(|t| toml::to_string(&t).ok())
            {
                Some(toml) => format!("{sets}{toml}").into_bytes(),
                None => text.to_vec(),
            }
        }
        (2, Some(v)) => {
            let Some((key, value)) = some_key(rng, &v) else {
                return text.to_vec();
            };
            let value = match rng.below(3) {
                0 => value,
                1 => rng
                    .pick(&[
                        "-1",
                        "0",
                        "1e308",
                        "nan",
                        "\"\"",
                        "[]",
                        "18446744073709551616",
                        "x",
                    ])
                    .to_string(),
                _ => {
                    let mut b = value.into_bytes();
                    mutate_bytes(rng, &mut b, 0..usize::MAX);
                    String::from_utf8_lossy(&b).into_owned()
                }
            };
            let mut out = format!("{SET}{key}={value}\n").into_bytes();
            out.extend_from_slice(text);
            out
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
    let text = String::from_utf8_lossy(input);
    let sets: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix(SET))
        .map(str::to_string)
        .collect();
    match parse(&text, &sets, "fuzz.toml") {
        Ok(recipe) => {
            let shown = recipe.to_toml();
            if let Err(e) = parse(&shown, &[], "shown.toml") {
                panic!("an accepted recipe prints as one that is refused: {}", e.0);
            }
            Outcome::Accepted
        }
        Err(e) => Outcome::Rejected(e.0),
    }
}

fn fuzz_recipes(default: u64) {
    let (inputs, seed) = budget(default);
    let report = fuzz(
        &Target {
            name: "recipe",
            seeds: seeds(),
            mutate: &mutate,
            run: &run,
            // The TOML parser keeps every value as a node of about 300 bytes with its span:
            // a recipe of nested one-character arrays costs that per byte. Recipe files are
            // read up to 1 MiB, so this stays within a few hundred MiB at worst.
            heap_bound: &|n| 256 * n + (4 << 20),
        },
        inputs,
        seed,
    );
    report.assert_clean();
}

#[test]
fn recipes_never_panic() {
    fuzz_recipes(QUICK);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn recipes_never_panic_long() {
    fuzz_recipes(LONG);
}
