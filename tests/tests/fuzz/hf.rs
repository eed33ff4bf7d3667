//! Hugging Face model folders: `config.json`, `tokenizer.json` and `tokenizer_config.json`
//! (the chat template, the special tokens), then the model built from them and a two-token
//! generation, as for GGUF files.

use std::path::Path;

use burn::tensor::backend::Backend;
use ft_model::tiny::{tiny_config, tiny_model, write_hf_folder};
use ft_tests::fuzz::{budget, fuzz, mutate_json_document, Rng, Target};

use crate::gguf::load_and_generate;
use crate::{B, LONG, QUICK};

/// The JSON files of the tiny model's folder, each as `NAME\nCONTENT`.
const FILES: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];

fn fuzz_hf(default: u64) {
    B::seed(&Default::default(), 1);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let (seed_dir, folder) = (dir.path().join("seed"), dir.path().join("model"));
    let config = tiny_config();
    write_hf_folder(&tiny_model::<B>(&config, 5), &config, &seed_dir).expect("the seed folder");
    write_hf_folder(&tiny_model::<B>(&config, 5), &config, &folder).expect("the folder");
    let seeds = FILES
        .iter()
        .map(|name| {
            let mut input = format!("{name}\n").into_bytes();
            input.extend(std::fs::read(seed_dir.join(name)).expect("a seed file"));
            input
        })
        .collect();
    let (inputs, seed) = budget(default);
    let report = fuzz(
        &Target {
            name: "hf-folder",
            seeds,
            mutate: &|rng: &mut Rng, input: &[u8]| {
                let (name, content) = split(input);
                let mut out = name.to_vec();
                out.push(b'\n');
                out.extend(mutate_json_document(rng, content, 0.85));
                out
            },
            run: &|input| {
                let (name, content) = split(input);
                let name = String::from_utf8_lossy(name);
                // The other files as they were; this one mutated.
                for other in FILES {
                    let from = seed_dir.join(other);
                    std::fs::copy(&from, folder.join(other)).expect("restore a file");
                }
                std::fs::write(folder.join(Path::new(name.as_ref())), content)
                    .expect("write the input");
                load_and_generate(&folder)
            },
            // The tokenizer's JSON as a tree and as its tables, the model's f32 tensors.
            heap_bound: &|n| 32 * n + (64 << 20),
        },
        inputs,
        seed,
    );
    report.assert_clean();
}

/// `NAME\nCONTENT` as (name, content).
fn split(input: &[u8]) -> (&[u8], &[u8]) {
    let at = input.iter().position(|&b| b == b'\n').unwrap_or(0);
    (&input[..at], input.get(at + 1..).unwrap_or_default())
}

#[test]
fn hf_folders_never_panic() {
    fuzz_hf(QUICK);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn hf_folders_never_panic_long() {
    fuzz_hf(LONG);
}
