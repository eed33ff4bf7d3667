//! `ft recipe export`: a recipe as the config of a trainer that runs on many GPUs (axolotl,
//! torchtune), so the job a user tried on one machine moves without being re-typed.
//!
//! The data goes with it as ft trains it: every example written as the pieces of text ft
//! tokenizes, each marked trained or not (the EOS included), and the validation examples ft
//! holds out and scores written to their own files, so both trainers see the same tokens,
//! the same masks and the same split. Whatever has no counterpart is listed, at the top of
//! the config and to the caller, never dropped silently.

mod axolotl;
mod torchtune;
mod yaml;

use std::path::{Path, PathBuf};

use ft_model::pretrained::TextSide;
use serde_json::{json, Value};

use crate::data::{Encoder, Record};
use crate::error::{At, Result, TrainError};
use crate::recipe::LoadedRecipe;
use crate::run::setup::{hold_out, read_sources, take_turns};

/// The trainers a recipe can be exported to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// axolotl (`axolotl train axolotl.yaml`).
    Axolotl,
    /// torchtune (`tune run lora_finetune_distributed --config torchtune.yaml`).
    Torchtune,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "axolotl" => Ok(Self::Axolotl),
            "torchtune" => Ok(Self::Torchtune),
            other => Err(format!("expected axolotl or torchtune, got {other:?}")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Axolotl => "axolotl",
            Self::Torchtune => "torchtune",
        })
    }
}

/// An exported recipe: its files and what did not translate.
#[derive(Debug)]
pub struct Exported {
    /// Paths relative to the output folder, and their contents; the config first.
    pub files: Vec<(PathBuf, String)>,
    /// One line for each recipe key (or group of keys) with no counterpart, and why.
    pub untranslated: Vec<String>,
}

impl Exported {
    /// Writes every file under `dir`, each atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        for (rel, text) in &self.files {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| TrainError::io(parent, e))?;
            }
            ft_adapters::atomic::write_atomic(&path, text.as_bytes())
                .map_err(|e| TrainError::io(&path, e))?;
        }
        Ok(())
    }
}

/// One example as ft trains it: its pieces of text, each with whether it is trained.
type Pieces = Vec<(String, bool)>;

/// One source of training data as ft trains it.
struct Source {
    /// The recipe key it comes from (`data.task`, `data.train`, `data.mix[1]`).
    key: String,
    /// The file stem its examples are written under.
    stem: String,
    /// The trained examples, as pieces of text with whether each is trained.
    train: Vec<Pieces>,
    /// The validation examples ft scores (after `data.val_limit`).
    val: Vec<Pieces>,
}

/// What a target's config is built from.
struct Job<'a> {
    loaded: &'a LoadedRecipe,
    /// The model's Hub id or local path, as the target loads it.
    model: String,
    /// The model's configuration, for targets that build the network themselves.
    text: TextSide,
    /// The longest example ft trains: `data.max_seq_len` within the model's context.
    seq_len: usize,
    /// Whether the run computes in bf16 (`quant.compute_dtype`, or a bf16 base); else f32.
    bf16: bool,
    sources: Vec<Source>,
    untranslated: Vec<String>,
}

/// `loaded` as `target`'s config and data files.
pub fn export(loaded: &LoadedRecipe, target: Target) -> Result<Exported> {
    let r = &loaded.recipe;
    if r.distill.is_some() {
        return Err(TrainError::Usage {
            key: "[distill]".into(),
            expected: format!("a fine-tuning recipe ({target} trains one model at a time)"),
            got: "a distillation recipe (train its student with `ft train`)".into(),
        });
    }
    if r.model.init == crate::recipe::ModelInit::Random {
        return Err(TrainError::Usage {
            key: "model.init".into(),
            expected: format!("a fine-tuning recipe ({target} fine-tunes a pretrained model)"),
            got: "\"random\" (train a model from scratch with `ft train`)".into(),
        });
    }
    let path = ft_model::source::resolve(&r.model.source).at("model.source")?;
    let text = TextSide::load(&path).at("model.source")?;
    let mut untranslated = Vec::new();
    let model = model_id(&r.model.source, &path, &mut untranslated);
    let seq_len = r.data.max_seq_len.min(text.config.max_position_embeddings);
    let sources = sources(loaded, &text)?;
    untranslated.push(
        "train.engine, train.length_buckets, train.page_min_elements: how ft runs a step on \
         its hardware; no counterpart, and no effect on the result"
            .into(),
    );
    let per_step = r.train.micro_batch_size * r.train.grad_accum;
    untranslated.push(format!(
        "train.micro_batch_size = {}: ft's whole micro-batch, while {target} takes that many \
         on each GPU; on N GPUs divide the gradient accumulation by N to keep ft's {per_step} \
         examples a step",
        r.train.micro_batch_size
    ));
    untranslated.push(format!(
        "train.seed = {}: the same seed, but {target} shuffles the examples with its own \
         generator, so batches come in another order",
        r.train.seed
    ));
    if r.eval.exact_match {
        untranslated.push(
            "[eval]: the exact-match score of the task before and after training; run \
             `ft eval --adapter OUTPUT_DIR` on the trained adapter"
                .into(),
        );
    }
    if r.output.registry.is_some() {
        untranslated.push(
            "output.registry, output.adapter_name: add the trained adapter with \
             `ft adapters add NAME OUTPUT_DIR`"
                .into(),
        );
    }
    let job = Job {
        loaded,
        model,
        text,
        seq_len,
        bf16: r.quant.compute_dtype == "bf16" || r.quant.base == "bf16",
        sources,
        untranslated,
    };
    match target {
        Target::Axolotl => axolotl::export(job),
        Target::Torchtune => torchtune::export(job),
    }
}

/// How another trainer names the model: the alias's and `hf:` sources' Hub id, a local HF
/// folder's path; a GGUF file has no counterpart (both load Hugging Face weights).
fn model_id(source: &str, path: &Path, untranslated: &mut Vec<String>) -> String {
    let id = ft_model::source::hub_id(source);
    if source == ft_model::source::DEFAULT_MODEL {
        untranslated.push(format!(
            "model.source = {source:?}: ft trains on the weights of its Q4_1 GGUF file; the \
             export names the original model, {id}, whose bf16 weights differ slightly"
        ));
        return id;
    }
    if source.starts_with("hf:") {
        return id;
    }
    if path.is_dir() {
        return std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
    }
    untranslated.push(format!(
        "model.source = {source:?}: a GGUF file, which axolotl and torchtune do not train \
         from; the export names it as given: replace it with the model's Hub id or HF folder"
    ));
    id
}

/// Every data source of the recipe as ft trains it: its records turned into pieces through
/// the model's tokenizer settings and chat template, split as ft splits them.
fn sources(loaded: &LoadedRecipe, text: &TextSide) -> Result<Vec<Source>> {
    let d = &loaded.recipe.data;
    let encoder = Encoder {
        tokenizer: &text.tokenizer,
        template: text.chat_template.as_ref(),
        eos: text.tokenizer.eos_ids.first().copied(),
        train_on_prompt: d.train_on_prompt,
        max_seq_len: d.max_seq_len,
    };
    let eos_text = match encoder.eos {
        Some(id) => Some(text.tokenizer.id_to_token(id).ok_or_else(|| {
            TrainError::Invalid(format!(
                "model.source: the EOS id {id} is not in the tokenizer"
            ))
        })?),
        None => None,
    };
    let pieces = |records: &[Record], key: &str| -> Result<Vec<Pieces>> {
        records
            .iter()
            .map(|rec| {
                let mut p = encoder.pieces(rec).at(key)?;
                if let (Some(_), Some(eos)) = (encoder.eos_after(rec), &eos_text) {
                    p.push((eos.clone(), true));
                }
                Ok(p)
            })
            .collect()
    };
    let (read, _) = read_sources(loaded)?;
    let mut trains = Vec::new();
    let mut vals = Vec::new();
    for (records, val_records, key) in read {
        let all = pieces(&records, &key)?;
        let (train, val) = match val_records {
            Some(v) => (all, pieces(&v, &key)?),
            None => hold_out(all, d.val_fraction, loaded.recipe.train.seed),
        };
        trains.push((key, train));
        vals.push(val);
    }
    // The validation examples ft scores: the sources taking turns up to `data.val_limit`.
    let tagged: Vec<Vec<(usize, Pieces)>> = vals
        .into_iter()
        .enumerate()
        .map(|(i, v)| v.into_iter().map(|e| (i, e)).collect())
        .collect();
    let mut scored: Vec<Vec<Pieces>> = vec![Vec::new(); trains.len()];
    for (i, e) in take_turns(tagged, d.val_limit) {
        scored[i].push(e);
    }
    Ok(trains
        .into_iter()
        .zip(scored)
        .map(|((key, train), val)| Source {
            stem: stem(&key),
            key,
            train,
            val,
        })
        .collect())
}

/// A file stem for a data key: `data.task` -> `task`, `data.mix[1]` -> `mix-1`.
fn stem(key: &str) -> String {
    key.trim_start_matches("data.")
        .replace('[', "-")
        .replace(']', "")
}

/// Examples as JSON lines of `{"segments": [{"label", "text"}]}`: axolotl's template-free
/// `input_output` format, the text of each piece as-is.
fn segments_jsonl(examples: &[Pieces]) -> String {
    examples
        .iter()
        .map(|pieces| {
            let segments: Vec<Value> = pieces
                .iter()
                .filter(|(text, _)| !text.is_empty())
                .map(|(text, label)| json!({"label": label, "text": text}))
                .collect();
            json!({ "segments": segments }).to_string() + "\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_keys_become_file_stems() {
        assert_eq!(stem("data.task"), "task");
        assert_eq!(stem("data.train"), "train");
        assert_eq!(stem("data.mix[12]"), "mix-12");
    }

    #[test]
    fn segments_keep_text_and_labels_and_drop_empty_pieces() {
        let lines = segments_jsonl(&[vec![
            ("Q: 1+1?\n".into(), false),
            (String::new(), false),
            ("2".into(), true),
            ("<|im_end|>".into(), true),
        ]]);
        let v: Value = serde_json::from_str(lines.trim()).unwrap();
        assert_eq!(
            v,
            json!({"segments": [
                {"label": false, "text": "Q: 1+1?\n"},
                {"label": true, "text": "2"},
                {"label": true, "text": "<|im_end|>"},
            ]})
        );
    }
}
