//! Batch input files (OpenAI's Batch API JSONL): every line checked, every fault reported with
//! its line, and a file that is accepted yields one request per non-blank line, each with a
//! unique `custom_id`.

use std::collections::HashSet;

use ft_serve::batches::input::parse;
use ft_tests::fuzz::{budget, fuzz, mutate_bytes, mutate_json_document, Outcome, Rng, Target};
use serde_json::json;

use crate::{LONG, QUICK};

fn seeds() -> Vec<Vec<u8>> {
    let line = |id: &str, url: &str, body: serde_json::Value| {
        json!({"custom_id": id, "method": "POST", "url": url, "body": body}).to_string()
    };
    let chat =
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8});
    let completion = json!({"model": "a", "prompt": ["x", [1, 2]], "temperature": 0, "stop": "\n"});
    vec![
        format!(
            "{}\n{}\n",
            line("r1", "/v1/chat/completions", chat.clone()),
            line("r2", "/v1/completions", completion.clone())
        )
        .into_bytes(),
        format!(
            "{}\n\n{}",
            line("only", "/v1/completions", completion),
            line("é", "/v1/chat/completions", chat)
        )
        .into_bytes(),
    ]
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let lines: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    let pick = rng.below(lines.len());
    match rng.below(4) {
        // One line's JSON mutated structurally.
        0 | 1 => lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == pick {
                    mutate_json_document(rng, l, 0.9)
                } else {
                    l.to_vec()
                }
            })
            .collect::<Vec<_>>()
            .join(&b'\n'),
        // A line repeated (duplicate ids) or dropped.
        2 => {
            let mut out: Vec<&[u8]> = lines.clone();
            if rng.chance(0.5) {
                out.insert(pick, lines[pick]);
            } else {
                out.remove(pick);
            }
            out.join(&b'\n')
        }
        _ => {
            let mut v = input.to_vec();
            let n = v.len();
            mutate_bytes(rng, &mut v, 0..n);
            v
        }
    }
}

fn run(input: &[u8]) -> Outcome {
    match parse(input, None) {
        Ok(lines) => {
            let blank = input
                .split(|&b| b == b'\n')
                .filter(|l| l.iter().all(u8::is_ascii_whitespace))
                .count();
            let total = input.split(|&b| b == b'\n').count();
            assert_eq!(lines.len(), total - blank, "one request per non-blank line");
            let ids: HashSet<&str> = lines.iter().map(|l| l.custom_id.as_str()).collect();
            assert_eq!(ids.len(), lines.len(), "custom_ids are unique");
            Outcome::Accepted
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refusal says why");
            let first = &errors[0];
            Outcome::Rejected(first.code.to_string())
        }
    }
}

fn fuzz_batches(default: u64) {
    let (inputs, seed) = budget(default);
    let report = fuzz(
        &Target {
            name: "batch",
            seeds: seeds(),
            mutate: &mutate,
            run: &run,
            // serde_json's values: a few dozen bytes per input byte at worst.
            heap_bound: &|n| 64 * n + (1 << 20),
        },
        inputs,
        seed,
    );
    report.assert_clean();
}

#[test]
fn batch_files_never_panic() {
    fuzz_batches(QUICK);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn batch_files_never_panic_long() {
    fuzz_batches(LONG);
}
