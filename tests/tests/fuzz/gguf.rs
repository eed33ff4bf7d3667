//! GGUF model files: the header, metadata, tokenizer, chat template and tensor index, then the
//! model built from them and a two-token generation.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use ft_model::formats::gguf::GgufFile;
use ft_model::formats::gguf_export::GgufExportType;
use ft_model::tiny::{tiny_config, tiny_model, write_gguf_as};
use ft_model::Pretrained;
use ft_serve::{generate, Sampler, SamplingParams};
use ft_tests::fuzz::{budget, fuzz, mutate_bytes, Outcome, Rng, Target};

use crate::{B, LONG, QUICK};

/// The tiny model as f32 and as Q8_0 GGUF files, and where each one's tensor data starts.
fn seeds(dir: &Path) -> Vec<(Vec<u8>, usize)> {
    let config = tiny_config();
    let model = tiny_model::<B>(&config, 5);
    [GgufExportType::F32, GgufExportType::Q8_0]
        .into_iter()
        .map(|ty| {
            let path = dir.join(format!("{ty:?}.gguf"));
            write_gguf_as(&model, &config, ty, &path).expect("write the seed");
            let data = GgufFile::open(&path)
                .expect("the seed opens")
                .tensors
                .values()
                .map(|t| t.start)
                .min()
                .unwrap_or(0);
            (std::fs::read(&path).expect("read the seed"), data)
        })
        .collect()
}

/// Where a GGUF file keeps its numbers (offset, width): counts, lengths, types, dimensions,
/// tensor offsets and scalar values, the fields whose corruption parsers get wrong. Array
/// items past the first few are left out, so that the tokenizer's thousands of string lengths
/// do not crowd out the rest.
fn number_fields(file: &[u8]) -> Vec<(usize, usize)> {
    fn width(ty: u32) -> Option<usize> {
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => return None,
        })
    }
    struct Walk<'a> {
        file: &'a [u8],
        pos: usize,
        fields: Vec<(usize, usize)>,
    }
    impl Walk<'_> {
        fn num(&mut self, width: usize, keep: bool) -> u64 {
            let mut b = [0u8; 8];
            b[..width].copy_from_slice(&self.file[self.pos..self.pos + width]);
            if keep {
                self.fields.push((self.pos, width));
            }
            self.pos += width;
            u64::from_le_bytes(b)
        }
        fn string(&mut self, keep: bool) {
            let n = self.num(8, keep) as usize;
            self.pos += n;
        }
        fn value(&mut self, ty: u32, keep: bool) {
            match ty {
                8 => self.string(keep),
                9 => {
                    let item = self.num(4, keep) as u32;
                    let n = self.num(8, keep);
                    for i in 0..n {
                        self.value(item, keep && i < 4);
                    }
                }
                ty => {
                    let w = width(ty).expect("a seed's value type");
                    self.num(w, keep);
                }
            }
        }
    }
    let mut w = Walk {
        file,
        pos: 4,
        fields: Vec::new(),
    };
    w.num(4, true);
    let n_tensors = w.num(8, true);
    let n_kv = w.num(8, true);
    for _ in 0..n_kv {
        w.string(true);
        let ty = w.num(4, true) as u32;
        w.value(ty, true);
    }
    for _ in 0..n_tensors {
        w.string(true);
        let dims = w.num(4, true);
        for _ in 0..dims {
            w.num(8, true);
        }
        w.num(4, true);
        w.num(8, true);
    }
    w.fields
}

/// A GGUF mutation: one of its number fields set to an edge value most of the time, else
/// bytes of its header.
fn mutate(rng: &mut Rng, seed: &[u8], fields: &[(usize, usize)], header_end: usize) -> Vec<u8> {
    let mut v = seed.to_vec();
    if rng.chance(0.6) && !fields.is_empty() {
        let (at, width) = *rng.pick(fields);
        if at + width <= v.len() {
            let value = match rng.below(4) {
                0 => rng.next_u64(),
                1 => {
                    let mut b = [0u8; 8];
                    b[..width].copy_from_slice(&v[at..at + width]);
                    u64::from_le_bytes(b)
                        .wrapping_add(rng.below(5) as u64)
                        .wrapping_sub(2)
                }
                _ => *rng.pick(&EDGES),
            };
            v[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
        }
    } else {
        mutate_bytes(rng, &mut v, 0..header_end);
    }
    v
}

/// Edge values for a number field.
const EDGES: [u64; 12] = [
    0,
    1,
    3,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Loads the file as `ft generate` does and generates two tokens from a chat prompt.
fn run(path: &Path, input: &[u8]) -> Outcome {
    std::fs::write(path, input).expect("write the input");
    load_and_generate(path)
}

/// Loads the model at `path` (a GGUF file or an HF folder) as `ft generate` does and
/// generates two tokens from a chat prompt.
pub(crate) fn load_and_generate(path: &Path) -> Outcome {
    let device = Default::default();
    let loaded = match Pretrained::<B>::load(path, None, &device) {
        Ok(p) => p,
        Err(e) => return Outcome::Rejected(e.to_string()),
    };
    let prompt = match loaded.chat_prompt("What is 2 + 2?") {
        Ok(p) => p,
        Err(e) => return Outcome::Rejected(e.to_string()),
    };
    let ids = match loaded.tokenizer.encode(&prompt) {
        Ok(ids) if !ids.is_empty() => ids,
        Ok(_) => return Outcome::Rejected("an empty prompt".into()),
        Err(e) => return Outcome::Rejected(e.to_string()),
    };
    if let Err(e) = loaded.check_context("the prompt", ids.len() + 2) {
        return Outcome::Rejected(e.to_string());
    }
    let mut sampler = Sampler::new(SamplingParams::default());
    let out = generate(&loaded.model, &ids, 2, &[], &mut sampler, |_| {});
    match loaded.tokenizer.decode(&out.ids) {
        Ok(_) => Outcome::Accepted,
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

fn fuzz_gguf(default: u64) {
    B::seed(&Default::default(), 1);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let seeds = seeds(dir.path());
    let header_end = seeds.iter().map(|s| s.1).max().unwrap_or(0);
    // The seeds have the same layout up to their tensor data: one field list serves both.
    let fields = number_fields(&seeds[0].0);
    let path: PathBuf = dir.path().join("input.gguf");
    let (inputs, seed) = budget(default);
    let report = fuzz(
        &Target {
            name: "gguf",
            seeds: seeds.into_iter().map(|s| s.0).collect(),
            mutate: &|rng: &mut Rng, seed: &[u8]| mutate(rng, seed, &fields, header_end),
            run: &|input| run(&path, input),
            // The file's f32 tensors, the model's copy of them and the tokenizer's tables.
            heap_bound: &|n| 8 * n + (64 << 20),
        },
        inputs,
        seed,
    );
    report.assert_clean();
}

#[test]
fn gguf_files_never_panic() {
    fuzz_gguf(QUICK);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn gguf_files_never_panic_long() {
    fuzz_gguf(LONG);
}
