//! PEFT LoRA adapters: `adapter_config.json` and `adapter_model.safetensors`, checked for
//! other servers, read, checked against the model both as training attaches them and as the
//! server serves them, and converted to llama.cpp's GGUF LoRA file.

use std::path::Path;

use ft_adapters::compat::{self, Server};
use ft_adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use ft_adapters::PeftAdapter;
use ft_model::formats::gguf_export::GgufExportType;
use ft_model::formats::gguf_lora::gguf_lora_bytes;
use ft_model::forward::ragged::ServedAdapter;
use ft_model::tiny::{tiny_adapter, tiny_config, tiny_model};
use ft_model::LlamaForCausalLM;
use ft_tests::fuzz::{budget, fuzz, mutate_bytes, mutate_json_document, Outcome, Rng, Target};
use serde_json::Value;

use crate::{B, LONG, QUICK};

/// Two valid adapters' files: (config, weights).
fn seeds(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    [1, 30]
        .into_iter()
        .map(|seed| {
            let folder = dir.join(format!("seed-{seed}"));
            tiny_adapter(seed).write(&folder).expect("write the seed");
            (
                std::fs::read(folder.join(CONFIG_FILE)).expect("the seed's config"),
                std::fs::read(folder.join(WEIGHTS_FILE)).expect("the seed's weights"),
            )
        })
        .collect()
}

/// Checks the files in `dir` for the other servers, then reads the adapter, applies it to
/// `model` both ways and converts it to a GGUF LoRA file.
fn run(model: &LlamaForCausalLM<B>, dir: &Path) -> Outcome {
    if let Ok((config, weights)) = ft_adapters::peft::read_files(dir) {
        for server in Server::ALL {
            let _ = compat::check(&config, &weights, server);
        }
    }
    let adapter = match PeftAdapter::read(dir) {
        Ok(a) => a,
        Err(e) => return Outcome::Rejected(e.to_string()),
    };
    if let Err(e) = ServedAdapter::new(model, &adapter, dir) {
        return Outcome::Rejected(e.to_string());
    }
    let mut trained = model.clone();
    if let Err(e) = trained.attach_adapter(&adapter, dir) {
        return Outcome::Rejected(e.to_string());
    }
    match gguf_lora_bytes(&adapter, &tiny_config(), GgufExportType::F16, dir) {
        Ok(_) => Outcome::Accepted,
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

/// A safetensors file's mutation: its JSON header (offsets, shapes, dtypes) rewritten, with
/// the length prefix kept right most of the time, or its bytes mutated around the header.
fn mutate_safetensors(rng: &mut Rng, file: &[u8]) -> Vec<u8> {
    let header_len = file
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0)
        .min(file.len().saturating_sub(8) as u64) as usize;
    let header = file.get(8..8 + header_len);
    match header {
        Some(header) if rng.chance(0.8) => {
            let mut new = match serde_json::from_slice::<Value>(header) {
                Ok(mut v) if rng.chance(0.5) => {
                    valid_change(rng, &mut v);
                    serde_json::to_vec(&v).expect("a JSON value serializes")
                }
                _ => mutate_json_document(rng, header, 0.9),
            };
            let declared = if rng.chance(0.9) {
                new.len() as u64
            } else {
                new.len() as u64 ^ (1 << rng.below(64))
            };
            let mut out = declared.to_le_bytes().to_vec();
            out.append(&mut new);
            out.extend_from_slice(&file[8 + header_len..]);
            out
        }
        _ => {
            let mut v = file.to_vec();
            mutate_bytes(rng, &mut v, 0..8 + header_len);
            v
        }
    }
}

/// A change to a safetensors header that keeps the file valid, so that what ft itself checks
/// is reached: a tensor renamed, given another shape of the same size, or dropped.
fn valid_change(rng: &mut Rng, header: &mut Value) {
    let Some(tensors) = header.as_object_mut() else {
        return;
    };
    let names: Vec<String> = tensors
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    if names.is_empty() {
        return;
    }
    let name = rng.pick(&names).clone();
    match rng.below(3) {
        0 => {
            let entry = tensors.remove(&name).expect("a listed tensor");
            let other = rng.pick(&names).clone();
            let mut bytes = other.into_bytes();
            mutate_bytes(rng, &mut bytes, 0..usize::MAX);
            tensors.insert(String::from_utf8_lossy(&bytes).into_owned(), entry);
        }
        1 => {
            // An earlier mutation may have made the entry something other than an object.
            let Some(entry) = tensors.get_mut(&name).and_then(Value::as_object_mut) else {
                return;
            };
            let size: u64 = entry
                .get("shape")
                .and_then(Value::as_array)
                .and_then(|d| {
                    d.iter()
                        .try_fold(1u64, |n, v| n.checked_mul(v.as_u64().unwrap_or(0)))
                })
                .unwrap_or(0);
            let first = *rng.pick(&[1u64, 2, 4, 8, size]);
            let shape = match rng.below(3) {
                0 if first > 0 && size.is_multiple_of(first) => vec![first, size / first],
                1 => vec![size],
                _ => vec![1, 1, size],
            };
            entry.insert("shape".into(), serde_json::json!(shape));
        }
        _ => {
            tensors.remove(&name);
        }
    }
}

/// Fuzzes one of the adapter's two files, the other kept valid.
fn fuzz_adapter(name: &str, config_side: bool, default: u64) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let seeds = seeds(dir.path());
    let model = tiny_model::<B>(&tiny_config(), 3);
    let input_dir = dir.path().join("input");
    std::fs::create_dir_all(&input_dir).expect("the input folder");
    let (config, weights) = seeds[0].clone();
    let (inputs, seed) = budget(default);
    let write = |input: &[u8]| {
        let (c, w) = if config_side {
            (input, &weights[..])
        } else {
            (&config[..], input)
        };
        std::fs::write(input_dir.join(CONFIG_FILE), c).expect("write the config");
        std::fs::write(input_dir.join(WEIGHTS_FILE), w).expect("write the weights");
    };
    let report = fuzz(
        &Target {
            name,
            seeds: seeds
                .into_iter()
                .map(|(c, w)| if config_side { c } else { w })
                .collect(),
            mutate: &|rng: &mut Rng, seed: &[u8]| {
                if config_side {
                    mutate_json_document(rng, seed, 0.9)
                } else {
                    mutate_safetensors(rng, seed)
                }
            },
            run: &|input| {
                write(input);
                run(&model, &input_dir)
            },
            // The file read whole, its f32 values, and the model's copy of them.
            heap_bound: &|n| 16 * n.max(weights.len()) + (16 << 20),
        },
        inputs,
        seed,
    );
    report.assert_clean();
}

#[test]
fn adapter_configs_never_panic() {
    fuzz_adapter("adapter_config", true, QUICK);
}

#[test]
fn adapter_weights_never_panic() {
    fuzz_adapter("safetensors", false, QUICK);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn adapter_configs_never_panic_long() {
    fuzz_adapter("adapter_config", true, LONG);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn adapter_weights_never_panic_long() {
    fuzz_adapter("safetensors", false, LONG);
}
