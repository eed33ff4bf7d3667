//! What every run does before its first step and after its last: the base's storage, the
//! data read and tokenized, the adapter's PEFT config, the progress bar, the registry.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use ft_adapters::peft::PeftConfig;
use ft_adapters::registry::AddInfo;
use ft_adapters::{LoraConfig, Registry};
use ft_eval::tasks;
use ft_model::chat::ChatTemplate;
use ft_model::{
    LlamaConfig, LlamaForCausalLM, Pretrained, QuantBackend, QuantFormat, QuantSpec, TextTokenizer,
};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint;
use crate::data::{self, Encoder, Record, Tokenized};
use crate::error::{At, Result, TrainError};
use crate::plan::shuffle;
use crate::recipe::{LoadedRecipe, Recipe};

/// The data of a run, tokenized.
pub(crate) struct Dataset {
    /// Training examples.
    pub train: Vec<Tokenized>,
    /// Validation examples.
    pub val: Vec<Tokenized>,
    /// Examples cut at `data.max_seq_len`.
    pub truncated: usize,
    /// The bundled task, if the data is one.
    pub task: Option<&'static tasks::Task>,
}

/// Reads and tokenizes the recipe's data: a bundled task, one file, or a mixture of files
/// (each with its own layout and validation split).
pub(crate) fn load_data<B: Backend>(
    loaded: &LoadedRecipe,
    pretrained: &Pretrained<B>,
) -> Result<Dataset> {
    tokenize_data(
        loaded,
        &pretrained.tokenizer,
        pretrained.chat_template.as_ref(),
        pretrained.config.max_position_embeddings,
    )
}

/// [`load_data`] with what it reads of the model: the tokenizer, the chat template and the
/// context (examples are cut to it when `data.max_seq_len` is longer).
pub(crate) fn tokenize_data(
    loaded: &LoadedRecipe,
    tokenizer: &TextTokenizer,
    template: Option<&ChatTemplate>,
    context: usize,
) -> Result<Dataset> {
    let d = &loaded.recipe.data;
    let (sources, task) = read_sources(loaded)?;
    let encoder = Encoder {
        tokenizer,
        template,
        eos: tokenizer.eos_ids.first().copied(),
        train_on_prompt: d.train_on_prompt,
        max_seq_len: d.max_seq_len.min(context),
    };
    let mut truncated = 0;
    let mut encode = |rs: &[Record]| -> Result<Vec<Tokenized>> {
        rs.iter()
            .map(|rec| {
                let (t, cut) = encoder.encode(rec)?;
                truncated += cut as usize;
                Ok(t)
            })
            .collect()
    };
    let mut train = Vec::new();
    let mut vals: Vec<Vec<Tokenized>> = Vec::new();
    for (records, val_records, key) in sources {
        let all = encode(&records).at(&key)?;
        if all.is_empty() {
            return Err(TrainError::Invalid(format!("{key}: no training examples")));
        }
        let mut val = Vec::new();
        match val_records {
            Some(v) => {
                train.extend(all);
                val.extend(encode(&v).at(&key)?);
            }
            None => {
                let (kept, held) = hold_out(all, d.val_fraction, loaded.recipe.train.seed);
                train.extend(kept);
                val.extend(held);
            }
        }
        vals.push(val);
    }
    let val = take_turns(vals, usize::MAX);
    if truncated > 0 {
        tracing::info!(
            "{truncated} examples were truncated to data.max_seq_len = {}",
            d.max_seq_len
        );
    }
    Ok(Dataset {
        train,
        val,
        truncated,
        task,
    })
}

/// Splits a source's examples into (trained, held out for validation): a seeded `fraction`
/// of them (at least one stays to train), in their order.
pub(crate) fn hold_out<T>(all: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n_val = ((all.len() as f64 * fraction).round() as usize).min(all.len().saturating_sub(1));
    let mut order: Vec<usize> = (0..all.len()).collect();
    shuffle(&mut order, seed ^ 0x7A1);
    let held: std::collections::HashSet<usize> = order[..n_val].iter().copied().collect();
    let (mut kept, mut out) = (Vec::new(), Vec::new());
    for (i, t) in all.into_iter().enumerate() {
        if held.contains(&i) {
            out.push(t);
        } else {
            kept.push(t);
        }
    }
    (kept, out)
}

/// The sources' validation examples taking turns, one from each in order, up to `limit`:
/// the order `data.val_limit` cuts, so that it samples every source.
pub(crate) fn take_turns<T>(vals: Vec<Vec<T>>, limit: usize) -> Vec<T> {
    let longest = vals.iter().map(Vec::len).max().unwrap_or(0);
    let mut iters: Vec<_> = vals.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    for _ in 0..longest {
        for it in iters.iter_mut() {
            if out.len() == limit {
                return out;
            }
            out.extend(it.next());
        }
    }
    out
}

/// The quantization a recipe asks for (`None`: f32 as loaded).
pub(crate) fn quant_spec(r: &Recipe) -> Result<Option<QuantSpec>> {
    if matches!(r.quant.base.as_str(), "none" | "f32") {
        return Ok(None);
    }
    let format: QuantFormat = r
        .quant
        .base
        .parse()
        .map_err(|e| TrainError::Invalid(format!("quant.base: {e}")))?;
    Ok(Some(QuantSpec {
        format,
        double_quant: r.quant.double_quant,
    }))
}

/// What every run does first: makes the output folder, finds the checkpoint to resume from
/// (returned), and sets the dtype of the packed-weight matmuls.
pub(crate) fn prepare<B: QuantBackend>(r: &Recipe) -> Result<Option<PathBuf>> {
    let out = &r.output.dir;
    std::fs::create_dir_all(out)
        .map_err(|e| TrainError::io(out, e))
        .at("output.dir")?;
    let resume = r
        .train
        .resume
        .as_deref()
        .map(checkpoint::find)
        .transpose()?;
    apply_compute_dtype::<B>(r)?;
    Ok(resume)
}

/// Sets the dtype of the packed-weight matmuls from `quant.compute_dtype`; bf16 on a backend
/// without it is a usage error.
fn apply_compute_dtype<B: QuantBackend>(r: &Recipe) -> Result<()> {
    let bf16 = r.quant.compute_dtype == "bf16";
    if bf16 && !B::bf16_compute_supported() {
        return Err(TrainError::usage(
            "quant.compute_dtype",
            "f32 on the CPU backend (bf16 needs --device cuda)",
            "\"bf16\"",
        ));
    }
    ft_model::kernels::set_bf16_compute(bf16);
    Ok(())
}

/// Checks `lora.layers` and `lora.r` against a model of `c` before any adapter is made: a
/// layer the model lacks is a usage error, and so is a rank above an adapted module's smaller
/// side, which buys nothing and, large enough, exhausts memory.
pub(crate) fn check_lora_shape(r: &Recipe, c: &LlamaConfig) -> Result<()> {
    let n = c.num_hidden_layers;
    if let Some(bad) = r.lora.layers.iter().flatten().find(|&&i| i >= n) {
        return Err(TrainError::usage(
            "lora.layers",
            &format!(
                "layers from 0 to {} (the model has {n})",
                n.saturating_sub(1)
            ),
            bad,
        ));
    }
    let smallest = r
        .lora
        .targets
        .iter()
        .filter_map(|t| Some((c.projection_shape(t)?.into_iter().min()?, t)))
        .min();
    match smallest {
        Some((side, module)) if r.lora.r > side => Err(TrainError::usage(
            "lora.r",
            &format!("a rank of at most {side} (the smaller side of {module})"),
            r.lora.r,
        )),
        _ => Ok(()),
    }
}

/// The PEFT config of the adapters the recipe attached, read from the layers
/// ([`LlamaForCausalLM::peft_config`]).
pub(crate) fn peft_config<B: Backend>(r: &Recipe, model: &LlamaForCausalLM<B>) -> PeftConfig {
    let base = ft_model::source::hub_id(&r.model.source);
    model.peft_config(&LoraConfig::from(&r.lora), Some(base))
}

/// Adds the adapter in `out` to the registry `dir` as `name` (the recipe's `output.registry`).
pub(crate) fn register(dir: &Path, out: &Path, name: &str, info: AddInfo) -> Result<()> {
    let record = Registry::open(dir)
        .and_then(|mut reg| reg.add(out, name, info))
        .at_with(|| format!("output.registry {}", dir.display()))?;
    tracing::info!("registered {} in {}", record.id(), dir.display());
    Ok(())
}

/// sha256 of the base model when it is one file (a GGUF); `None` for folders.
pub(crate) fn base_sha256(path: &Path) -> Option<String> {
    path.is_file()
        .then(|| ft_model::source::sha256_file(path).ok())
        .flatten()
}

/// The step progress bar.
pub(crate) fn progress(total: usize, at: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("step {pos}/{len} {msg} [{elapsed_precise}, ETA {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(at as u64);
    bar
}

/// The records of the recipe's data, read and parsed but not tokenized: one source each for
/// the task or `data.train` and every `data.mix` entry, as (training records, validation
/// records if a file gives them, the key named in errors); and the bundled task, if any.
pub(crate) fn read_sources(
    loaded: &LoadedRecipe,
) -> Result<(Sources, Option<&'static tasks::Task>)> {
    let d = &loaded.recipe.data;
    let mut task = None;
    let mut sources: Sources = Vec::new();
    if let Some(name) = &d.task {
        let t = tasks::find(name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "data.task: unknown task {name:?}; bundled tasks: {}",
                tasks::names()
            ))
        })?;
        let records =
            data::parse_jsonl(t.train, data::Format::Completion, &Default::default(), name)?;
        sources.push((records, None, "data.task".into()));
        task = Some(t);
    } else if let Some(train) = &d.train {
        let read = |p: &PathBuf, key: &str| {
            data::read(&source_path(loaded, p), d.format, &d.columns).at(key)
        };
        let records = read(train, "data.train")?;
        let val = match &d.val {
            Some(v) => Some(read(v, "data.val")?),
            None => None,
        };
        sources.push((records, val, "data.train".into()));
    }
    for (i, m) in d.mix.iter().enumerate() {
        let key = format!("data.mix[{i}]");
        let read = |p: &PathBuf, part: &str| {
            data::read(&source_path(loaded, p), m.format, &m.columns)
                .at_with(|| format!("{key}.{part}"))
        };
        let records = read(&m.train, "train")?;
        let val = match &m.val {
            Some(v) => Some(read(v, "val")?),
            None => None,
        };
        sources.push((records, val, key));
    }
    Ok((sources, task))
}

/// A data path as written in the recipe, resolved against its folder unless it names a
/// dataset on the Hub.
pub(crate) fn source_path(loaded: &LoadedRecipe, p: &Path) -> PathBuf {
    if p.to_str().is_some_and(|s| s.starts_with(data::hub::PREFIX)) {
        p.to_path_buf()
    } else {
        loaded.resolve(p)
    }
}

/// What [`read_sources`] reads: (training records, validation records, the key in errors).
pub(crate) type Sources = Vec<(Vec<Record>, Option<Vec<Record>>, String)>;
