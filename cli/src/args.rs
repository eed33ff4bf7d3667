//! Command-line flags as plain values; no I/O happens here (loading what they name is
//! [`crate::load`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ft_model::formats::gguf_export::GgufExportType;
use ft_model::source::DEFAULT_MODEL;
use ft_model::{QuantFormat, QuantSpec};

use crate::device::DeviceSpec;
use ft_eval::measure::Decoding;

/// ft: fine-tune open LLMs cheaply and measure what the fine-tune bought.
#[derive(Debug, Parser)]
#[command(name = "ft", version)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand of `ft`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the token ids of TEXT as a JSON array (special tokens parsed, no BOS).
    Tokenize(TokenizeArgs),
    /// Generate text after a prompt.
    Generate(GenerateArgs),
    /// Perplexity of a text file (non-overlapping windows, each from an empty cache).
    Perplexity(PerplexityArgs),
    /// Shorten a prompt: drop the context words a small model finds least informative,
    /// keeping the instruction and the question.
    Compress(CompressArgs),
    /// Benchmarks that print a table.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Fold a LoRA adapter into the base and write an HF folder.
    Merge(MergeArgs),
    /// Quantized bases: compare formats, save a quantized model.
    #[command(subcommand)]
    Quant(QuantCommand),
    /// Train a LoRA/QLoRA adapter as a TOML recipe says.
    Train(TrainArgs),
    /// Check or print a recipe.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// Scaling laws: fit Chinchilla's law to runs, plan a compute-optimal run.
    #[command(subcommand)]
    Scaling(ScalingCommand),
    /// Score a model (with an adapter) on bundled tasks by exact match.
    Eval(EvalArgs),
    /// FrugalGPT cascades: fit the stages and thresholds to a budget, measure the curve.
    #[command(subcommand)]
    Cascade(CascadeCommand),
    /// OpenAI Batch API files: run one with no server, or submit one to a server and follow it.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Bundled data.
    #[command(subcommand)]
    Data(DataCommand),
    /// The adapter registry: add, list, show, remove, export.
    #[command(subcommand)]
    Adapters(AdaptersCommand),
    /// Upload a registry adapter and its model card to the Hugging Face Hub.
    Publish(PublishArgs),
    /// Bring an adapter from the Hugging Face Hub into the registry.
    Pull(PullArgs),
    /// Serve the base model and its adapters over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
}

/// The models a server answers with: the base by its name, and adapters.
#[derive(Debug, Args)]
pub struct ServedModelArgs {
    /// The base model's name in requests and /v1/models (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// An adapter to serve, NAME=PEFT_FOLDER (repeatable).
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    pub adapters: Vec<String>,
    /// Serve every adapter of this registry by name (its latest version); `ft serve` also
    /// lets /v1/load_lora_adapter load `registry:NAME[:VERSION]`.
    #[arg(long)]
    pub registry: Option<PathBuf>,
}

/// `ft serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The base model.
    #[command(flatten)]
    pub base: BaseModelArgs,
    /// What requests may name.
    #[command(flatten)]
    pub models: ServedModelArgs,
    /// A folder /v1/load_lora_adapter may load adapters from (repeatable).
    #[arg(long = "allowed-adapter-dir", value_name = "DIR")]
    pub allowed_adapter_dirs: Vec<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests to /v1 must send `Authorization: Bearer KEY`.
    #[arg(long, env = "FT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// KV cache capacity in tokens.
    #[arg(long, default_value_t = 16384, conflicts_with = "kv_cache_bytes")]
    pub kv_cache_tokens: usize,
    /// KV cache capacity in bytes (instead of tokens).
    #[arg(long)]
    pub kv_cache_bytes: Option<u64>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub block_size: u64,
    /// Tokens one engine step runs at most (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_tokens: u64,
    /// Requests generated at once at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_running: u64,
    /// Requests waiting at most; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Adapters held in memory at most (least recently used are unloaded).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_adapters: u64,
    /// Connections open at once; one more is answered 503 and closed.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// Seconds a connection may take to send a request's headers (or stay idle between
    /// requests) before it is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout: u64,
    /// Seconds a request's body may take to arrive after its headers; later gets 408.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout: u64,
    /// Turn the prefix cache off.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Keep the response cache in this Redis (redis://HOST:PORT[/DB]), which several servers
    /// can share, instead of in memory.
    #[arg(long, value_name = "URL", conflicts_with = "no_cache")]
    pub cache: Option<String>,
    /// Bytes of answers the in-memory response cache holds (least recently used out first).
    #[arg(long, default_value_t = 256 << 20, conflicts_with_all = ["no_cache", "cache"])]
    pub cache_bytes: usize,
    /// Seconds an answer stays in the response cache (0: until evicted; at most ten years).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(0..=315_360_000))]
    pub cache_ttl: u64,
    /// Answer every request with the model: no response cache. (The cache answers only
    /// requests whose answer their inputs fix: temperature 0, a seed, or beam search.)
    #[arg(long)]
    pub no_cache: bool,
    /// Where the Files and Batch API keep files and batches, across restarts (default:
    /// $FT_HOME/serve).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Requests of one batch in the engine at once (default: --max-running, every row).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_max_rows: Option<u64>,
    /// Tokens of batch requests one engine step runs at most: an interactive request waits
    /// for the step under way, so this bounds what a running batch adds to its TTFT.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_step_tokens: u64,
    /// Serve a fitted cascade (`ft cascade fit`'s file) as the model NAME (repeatable).
    #[arg(long = "cascade", value_name = "NAME=FILE")]
    pub cascades: Vec<String>,
    /// The machine's price in USD per hour: a cascade's stage without a `price` costs its
    /// time at it.
    #[arg(long)]
    pub price_per_hour: Option<f64>,
}

/// `ft publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// NAME or NAME:VERSION in the registry.
    pub adapter: String,
    /// The Hub repository, OWNER/NAME (created if missing).
    #[arg(long)]
    pub repo: String,
    /// Create the repository private.
    #[arg(long)]
    pub private: bool,
    /// The Hub's address.
    #[arg(long, default_value = ft_adapters::hub::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// The licence named in the model card.
    #[arg(long, default_value = "apache-2.0")]
    pub license: String,
    /// Registry location.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `ft pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// hf:OWNER/NAME
    pub source: String,
    /// The name in the registry (default: the repository's NAME).
    #[arg(long)]
    pub name: Option<String>,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// The Hub's address.
    #[arg(long, default_value = ft_adapters::hub::DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Registry location.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `ft adapters ...`.
#[derive(Debug, Subcommand)]
pub enum AdaptersCommand {
    /// Add a PEFT LoRA folder as the next version of NAME.
    Add(AdaptersAddArgs),
    /// List every version.
    List(AdaptersListArgs),
    /// Print one version (the newest without `:VERSION`) as JSON.
    Show(AdaptersRefArgs),
    /// Remove one version, or every version of a name.
    Rm(AdaptersRefArgs),
    /// Write a version's PEFT files into DIR, or (`--format gguf`) llama.cpp's GGUF LoRA file.
    Export(AdaptersExportArgs),
    /// Convert a PEFT folder to llama.cpp's GGUF LoRA file (for `llama-cli --lora` and Ollama).
    Convert(AdaptersConvertArgs),
    /// Whether vLLM, LoRAX and TGI load an adapter as PEFT means it, and why not (exit 1 if
    /// one refuses it or leaves part of it out).
    Check(AdaptersCheckArgs),
}

/// `ft adapters check`.
#[derive(Debug, Args)]
pub struct AdaptersCheckArgs {
    /// A PEFT folder, or NAME[:VERSION] in the registry.
    pub adapter: String,
    /// The servers: vllm, lorax, tgi (default all).
    #[arg(long = "for", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Registry location (for NAME).
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// The format an adapter is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AdapterFormat {
    /// A PEFT folder (adapter_config.json, adapter_model.safetensors).
    Peft,
    /// llama.cpp's GGUF LoRA file, with an Ollama Modelfile beside it.
    Gguf,
}

/// What a GGUF LoRA file is written for: the base model and the matrices' type.
#[derive(Debug, Args)]
pub struct GgufLoraArgs {
    /// The base model the adapter is applied to (a GGUF file, an HF folder or a source such
    /// as the default model): its shape and architecture decide the file's names and order.
    #[arg(long, default_value = ft_model::source::DEFAULT_MODEL)]
    pub base: String,
    /// The matrices' type: f32 or f16.
    #[arg(long = "type", default_value = "f32")]
    pub ty: String,
}

/// `ft adapters convert`.
#[derive(Debug, Args)]
pub struct AdaptersConvertArgs {
    /// The PEFT folder.
    pub dir: PathBuf,
    /// The GGUF file to write.
    pub out: PathBuf,
    #[command(flatten)]
    pub gguf: GgufLoraArgs,
}

/// Where the registry is.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// The registry folder (default: $FT_HOME/registry).
    #[arg(long)]
    pub registry: Option<PathBuf>,
}

/// `ft adapters add`.
#[derive(Debug, Args)]
pub struct AdaptersAddArgs {
    /// The PEFT folder (adapter_config.json, adapter_model.safetensors).
    pub dir: PathBuf,
    /// The adapter's name.
    #[arg(long)]
    pub name: String,
    /// The task it was trained for.
    #[arg(long)]
    pub task: Option<String>,
    /// The base model (default: the config's base_model_name_or_path).
    #[arg(long)]
    pub base: Option<String>,
    /// Registry location.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `ft adapters list`.
#[derive(Debug, Args)]
pub struct AdaptersListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Registry location.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `NAME[:VERSION]` in a registry.
#[derive(Debug, Args)]
pub struct AdaptersRefArgs {
    /// NAME or NAME:VERSION.
    pub adapter: String,
    /// Registry location.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `ft adapters export`.
#[derive(Debug, Args)]
pub struct AdaptersExportArgs {
    /// NAME or NAME:VERSION.
    pub adapter: String,
    /// Output folder (PEFT) or file (GGUF).
    pub dir: PathBuf,
    /// What to write.
    #[arg(long, value_enum, default_value = "peft")]
    pub format: AdapterFormat,
    /// With `--format gguf`.
    #[command(flatten)]
    pub gguf: GgufLoraArgs,
    /// Registry location.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `ft train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe (TOML).
    pub recipe: PathBuf,
    /// Override a recipe key: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue the run in DIR (its newest checkpoint) or from the checkpoint DIR.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Where to train: cpu, or cuda[:N] in a build with `--features cuda` (overrides
    /// `model.device`).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

/// `ft recipe ...`.
#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Validate a recipe; prints `ok` or the first error.
    Check(RecipeArgs),
    /// Print the effective recipe, defaults included.
    Show(RecipeArgs),
    /// Print the shapes of the run's micro-batches (tokenizes the data, loads no weights):
    /// on CUDA each distinct [rows, tokens per row] compiles its kernels once.
    Plan(PlanArgs),
    /// Write the recipe as an axolotl or torchtune config, with its data as ft trains it, for
    /// runs on many GPUs; lists what does not translate.
    Export(ExportArgs),
}

/// `ft scaling ...`.
#[derive(Debug, Subcommand)]
pub enum ScalingCommand {
    /// Fit L(N, D) = E + A / N^alpha + B / D^beta to runs (Chinchilla's approach 3, as Epoch
    /// AI refits it), with bootstrap intervals.
    Fit(ScalingFitArgs),
    /// The compute-optimal size and tokens, and the predicted loss, for a budget.
    Plan(ScalingPlanArgs),
    /// Train a grid of models from scratch (sizes x token budgets, or IsoFLOP profiles), each
    /// in its own process, into OUT/runs.csv; finished runs are never redone.
    Sweep(ScalingSweepArgs),
}

/// `ft scaling sweep`.
#[derive(Debug, Args)]
pub struct ScalingSweepArgs {
    /// The sweep file (`recipes/scaling.toml`).
    pub sweep: PathBuf,
    /// Where the runs go, instead of the file's `out`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Check the sweep and print its runs without training any.
    #[arg(long)]
    pub dry_run: bool,
}

/// `ft scaling fit`.
#[derive(Debug, Args)]
pub struct ScalingFitArgs {
    /// A CSV file with a header row and columns `params`, `tokens` and `loss`.
    pub runs: PathBuf,
    /// Print the fit as JSON.
    #[arg(long)]
    pub json: bool,
    /// Bootstrap resamples for the intervals (0: none).
    #[arg(long, default_value_t = 400)]
    pub bootstrap: usize,
    /// Seed of the resampling.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the figures (loss against compute with the law's curves, fitted against
    /// observed) into this folder, as SVG and PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// `ft scaling plan`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("budget").required(true).args(["compute", "params", "tokens"])))]
pub struct ScalingPlanArgs {
    /// Training compute in FLOPs (C = 6 N D).
    #[arg(long)]
    pub compute: Option<f64>,
    /// A model size: the tokens that make it compute-optimal.
    #[arg(long)]
    pub params: Option<f64>,
    /// A token budget: the size for which it is compute-optimal.
    #[arg(long)]
    pub tokens: Option<f64>,
    /// The law: chinchilla (Hoffmann et al.'s), epoch (Epoch AI's refit) or a JSON file that
    /// `ft scaling fit --json` wrote.
    #[arg(long, default_value = "epoch")]
    pub law: String,
    /// Tokens the model will serve (2N FLOPs each): adds the run of the same loss that
    /// minimises training plus inference compute.
    #[arg(long)]
    pub inference_tokens: Option<f64>,
    /// Sustained FLOP/s of one GPU, for GPU-hours (default: an H100 at 40% of its 989 TFLOP/s
    /// in bf16).
    #[arg(long, default_value_t = 4e14)]
    pub gpu_flops: f64,
    /// Price of one GPU-hour.
    #[arg(long, default_value_t = 2.0)]
    pub price_per_gpu_hour: f64,
}

/// `ft recipe export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The recipe and its overrides.
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// The trainer: axolotl or torchtune.
    #[arg(long)]
    pub to: ft_trainer::export::Target,
    /// The folder to write (default: RECIPE-STEM.TRAINER in the current folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `ft recipe plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe and its overrides.
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// The device the run would train on, which decides `train.length_buckets = "auto"`
    /// (overrides `model.device`; nothing runs on it).
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

/// A recipe and its overrides.
#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe (TOML).
    pub recipe: PathBuf,
    /// Override a recipe key: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
}

/// `ft eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The base model: a GGUF file, an HF folder, hf:, pypi: or an alias.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// cpu, or cuda[:N] in a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// The adapter registry: `--adapters` names resolve there (NAME or NAME:VERSION), and
    /// each version's metrics get the results.
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// Adapters to compare with the base, comma-separated: registry names (with
    /// `--registry`), NAME=DIR or PEFT folders; with `--server`, the server's model names.
    #[arg(long, value_delimiter = ',')]
    pub adapters: Vec<String>,
    /// Tasks, comma-separated: registered names (see `--list-tasks`) or task TOML files.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// A folder whose `*.toml` task files are registered by name (repeatable).
    #[arg(long = "task-dir")]
    pub task_dirs: Vec<PathBuf>,
    /// List the registered tasks, one a line (name, metric, what it asks), and exit.
    #[arg(long)]
    pub list_tasks: bool,
    /// Draw report.md and the plots of DIR/report.json again (after an upgrade of ft), without
    /// measuring anything, and exit.
    #[arg(long, value_name = "DIR")]
    pub redraw: Option<PathBuf>,
    /// Base weight storages, comma-separated: f32, bf16, q8, q4 (the inference kernels) or
    /// nf4, fp4, nf4+dq, fp4+dq, int8, int8-block, q8_0, q4_0, q4_1 (default: as `ft
    /// generate` loads the model, q4 for the default model; not with `--server`).
    #[arg(long, value_delimiter = ',')]
    pub quant: Option<Vec<String>>,
    /// Decodings, comma-separated: greedy, sample (temperature 0.7, top-p 0.95, seeded) or
    /// beamN (N beams, 2 to 16).
    #[arg(long, value_delimiter = ',', default_value = "greedy")]
    pub decoding: Vec<Decoding>,
    /// Requests in flight at once, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: Vec<u64>,
    /// Evaluate against this running OpenAI-compatible server (`http://host:port`) instead
    /// of serving in process.
    #[arg(long)]
    pub server: Option<String>,
    /// Bearer key for `--server`.
    #[arg(long, env = "FT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds a request may take before it counts as timed out.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// The machine's price in USD per hour, for the cost per 1M output tokens and per 1,000
    /// requests.
    #[arg(long)]
    pub price_per_hour: Option<f64>,
    /// Only the first N held-out examples of each task.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// Most tokens per answer (default: each task's own).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tokens: Option<u64>,
    /// Solved examples from each task's training split before every prompt (few-shot; the
    /// same seeded draw for every example).
    #[arg(long, default_value_t = 0)]
    pub shots: u64,
    /// Also ask K questions in one prompt, numbered, with the demonstrations grouped the
    /// same way (batch prompting), for each K, comma-separated, each in 2..=32; the report
    /// sets accuracy and tokens per question against one question a prompt.
    #[arg(long, value_delimiter = ',', value_name = "K")]
    pub batch_prompting: Vec<u64>,
    /// Also measure the few-shot prompts with their demonstrations compressed to these
    /// fractions of their tokens, comma-separated, each in (0, 1); each example's own prompt
    /// (instruction and question) is kept whole (needs --shots).
    #[arg(long, value_delimiter = ',')]
    pub compress: Vec<f64>,
    /// The model that scores words for --compress (default: --model).
    #[arg(long)]
    pub compress_model: Option<String>,
    /// The report folder: report.md, report.json and the plots.
    #[arg(long, default_value = "eval-report")]
    pub out: PathBuf,
}

/// `ft data ...`.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Regenerate the bundled task splits (deterministic) into DIR/<task>/{train,test}.jsonl.
    Tasks(DataTasksArgs),
}

/// `ft data tasks`.
#[derive(Debug, Args)]
pub struct DataTasksArgs {
    /// Output folder.
    #[arg(long, default_value = "data/tasks")]
    pub out: PathBuf,
}

/// `ft merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The PEFT LoRA adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output: an HF folder (config.json, tokenizer.json, tokenizer_config.json,
    /// model.safetensors), or with `--format gguf` a GGUF file.
    #[arg(long)]
    pub out: PathBuf,
    /// hf or gguf.
    #[arg(long, default_value = "hf", value_parser = ["hf", "gguf"])]
    pub format: String,
    /// Matrix storage of a GGUF: f32, f16 or q8_0.
    #[arg(long, default_value = "f16")]
    pub gguf_type: GgufExportType,
}

/// `ft quant ...`.
#[derive(Debug, Subcommand)]
pub enum QuantCommand {
    /// Load the model in each format and print one table of size, speed and quality.
    Compare(QuantCompareArgs),
    /// Store a quantized model (bitsandbytes layout) so later loads skip quantization.
    Save(QuantSaveArgs),
    /// Quantize the projections with GPTQ on calibration text (a GGUF file, or an HF folder
    /// for int3/int2).
    Gptq(QuantGptqArgs),
    /// Scale each projection's inputs by AWQ's activation-aware search (folded into the op
    /// before, clipping each group's range), then round to the nearest point or by GPTQ.
    Awq(QuantAwqArgs),
    /// Quantize the projections to the nearest grid point, as `gptq` writes them (the
    /// baseline GPTQ is measured against).
    Rtn(QuantPtqArgs),
    /// One format of `compare`, measured in its own process (prints JSON).
    #[command(hide = true)]
    Measure(QuantMeasureArgs),
}

/// `ft quant compare`.
#[derive(Debug, Args)]
pub struct QuantCompareArgs {
    /// Model to quantize.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Formats to compare; `+dq` double-quantizes a 4-bit format's absmax values. f32 is the
    /// baseline and is always measured.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,bf16,int8,nf4,nf4+dq,fp4"
    )]
    pub formats: Vec<QuantSpec>,
    /// Text to score (default: Genesis 1-3, King James Version, built in).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A second held-out text to score (default: the bundled chat validation conversations,
    /// one turn a line).
    #[arg(long)]
    pub second_file: Option<PathBuf>,
    /// Perplexity window in tokens.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(2..))]
    pub window: u64,
    /// Post-training quantization formats (q4_0, q4_1, q8_0, nf4, int3, int2): each is
    /// written by every method of `--methods` (`ft quant rtn|gptq|awq`, with their defaults)
    /// and scored as written.
    #[arg(long, value_delimiter = ',')]
    pub ptq: Vec<String>,
    /// Methods for `--ptq`: rtn, gptq, awq, awq+gptq.
    #[arg(long, value_delimiter = ',', default_value = "rtn,gptq,awq,awq+gptq",
          value_parser = ["rtn", "gptq", "awq", "awq+gptq"])]
    pub methods: Vec<String>,
    /// Calibration windows for the methods that take them (default: theirs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub calib_samples: Option<u64>,
    /// Tokens per calibration window (default: theirs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub calib_len: Option<u64>,
    /// Anchor the q4_0 rows to llama.cpp (llama-cpp-python): its own quantizer rounds an f16
    /// GGUF of the model to Q4_0, and llama.cpp scores that file, the f16 file and every
    /// q4_0 file of `--ptq` on the same token ids.
    #[arg(long)]
    pub vs_llama_cpp: bool,
    /// Folder for the Markdown table and the plot.
    #[arg(long, default_value = "quant-compare")]
    pub out: PathBuf,
    /// Append the table, with the command, machine and date, to this Markdown file.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

/// `ft quant measure` (internal).
#[derive(Debug, Args)]
pub struct QuantMeasureArgs {
    /// Model to quantize.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// The format (default: as the model is stored).
    #[arg(long)]
    pub spec: Option<QuantSpec>,
    /// Text to score (default: the built-in Genesis text).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// A second text to score.
    #[arg(long)]
    pub second_file: Option<PathBuf>,
    /// Perplexity window.
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// Where to write the top-1 predictions (JSON array).
    #[arg(long)]
    pub predictions: PathBuf,
}

/// The model, format and output of a post-training quantization (`ft quant rtn|gptq`).
#[derive(Debug, Args)]
pub struct QuantPtqArgs {
    /// The model to quantize (its weights are read as f32).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// q4_0, q4_1 or q8_0 (ggml, groups of 32, written as a GGUF file with the embedding in
    /// Q8_0); nf4 (bitsandbytes, blocks of 64, written as the HF folder `ft quant save`
    /// writes, a QLoRA base); or int3, int2 (a scale and minimum per group, written
    /// dequantized as an f32 HF folder).
    #[arg(long)]
    pub format: String,
    /// Weights per group of int3/int2 (default 64); the ggml formats hold 32, nf4 64.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub group: Option<u64>,
    /// Double-quantize nf4's absmax values (QLoRA's 4.127 bits per weight).
    #[arg(long)]
    pub double_quant: bool,
    /// The GGUF file or HF folder to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// `ft quant gptq`.
#[derive(Debug, Args)]
pub struct QuantGptqArgs {
    /// Model, format and output.
    #[command(flatten)]
    pub ptq: QuantPtqArgs,
    /// Calibration text.
    #[command(flatten)]
    pub calib: CalibArgs,
    /// GPTQ's settings.
    #[command(flatten)]
    pub gptq: GptqArgs,
}

/// `ft quant awq`.
#[derive(Debug, Args)]
pub struct QuantAwqArgs {
    /// Model, format and output.
    #[command(flatten)]
    pub ptq: QuantPtqArgs,
    /// Calibration text.
    #[command(flatten)]
    pub calib: CalibArgs,
    /// How the scaled weights are rounded: rtn (to the nearest grid point) or gptq.
    #[arg(long, default_value = "rtn", value_parser = ["rtn", "gptq"])]
    pub then: String,
    /// Values of alpha tried for each set of scales, evenly spaced on [0, 1).
    #[arg(long, default_value_t = ft_model::ptq::awq::GRID_POINTS as u64,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub grid: u64,
    /// Skip the search of each group's clipping range.
    #[arg(long)]
    pub no_clip: bool,
    /// GPTQ's settings, with `--then gptq`.
    #[command(flatten)]
    pub gptq: GptqArgs,
}

/// Where the calibration windows come from (`ft quant gptq|awq`).
#[derive(Debug, Args)]
pub struct CalibArgs {
    /// Calibration text: a text file, or JSONL with a "text" field (default: the bundled
    /// Genesis 4 - Exodus 40, never the evaluation text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration windows.
    #[arg(long, default_value_t = ft_model::ptq::calibration::SAMPLES as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub calib_samples: u64,
    /// Tokens per calibration window (at most the model's context).
    #[arg(long, default_value_t = ft_model::ptq::calibration::LEN as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub calib_len: u64,
    /// Seed of the windows' places in the text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// GPTQ's settings.
#[derive(Debug, Args)]
pub struct GptqArgs {
    /// The fraction of the Hessian's mean diagonal added to its diagonal.
    #[arg(long, default_value_t = 0.01)]
    pub damp: f64,
    /// Quantize the inputs in order of decreasing Hessian diagonal (groups stay static).
    #[arg(long)]
    pub act_order: bool,
}

/// `ft quant save`.
#[derive(Debug, Args)]
pub struct QuantSaveArgs {
    /// Model to quantize.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Format: bf16, int8, nf4 or fp4 (`+dq` for double quantization).
    #[arg(long)]
    pub format: QuantSpec,
    /// Double-quantize the absmax values of nf4/fp4.
    #[arg(long)]
    pub double_quant: bool,
    /// Output folder (config.json, tokenizer.json, model.safetensors).
    pub out: PathBuf,
}

/// Where the model comes from and where it runs.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The base model.
    #[command(flatten)]
    pub base: BaseModelArgs,
    /// A PEFT LoRA adapter folder to apply (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
}

/// The base model, its storage and its device (the flags every computing command shares).
#[derive(Debug, Args)]
pub struct BaseModelArgs {
    /// A GGUF file, an HF folder, hf:org/name[@rev], pypi:pkg==ver#path, or an alias.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// cpu, or cuda[:N] in a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Storage of the block linear weights: f32, bf16, int8, int8-block, nf4, fp4, q8_0, q4_0
    /// or q4_1 (default: as `--weights` says).
    #[arg(long)]
    pub quant: Option<QuantFormat>,
    /// Inference weights of the block linears and the output head, multiplied by the CPU
    /// kernels as stored: bf16, q8 and q4 without dequantizing (q4 keeps a GGUF's own
    /// Q4_0/Q4_1 blocks, else makes Q4_0), f32 read in place. Default: a GGUF's own
    /// blocks where a kernel reads them (the default model's Q4_1 is q4), q8 for other
    /// quantized GGUFs, f32 for f32 files and HF folders.
    #[arg(long, value_enum, conflicts_with = "quant")]
    pub weights: Option<InferenceWeights>,
    /// Double-quantize the absmax values of nf4/fp4 (QLoRA's 4.127 bits per weight).
    #[arg(long)]
    pub double_quant: bool,
}

impl BaseModelArgs {
    /// The requested storage of the block linear weights.
    pub fn quant(&self) -> Option<QuantSpec> {
        let format = match self.weights {
            Some(w) => w.format(),
            None => self.quant?,
        };
        Some(QuantSpec {
            format,
            double_quant: self.double_quant,
        })
    }
}

/// `--weights`: the storage of the inference weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InferenceWeights {
    /// f32 (GGUF blocks dequantized at load).
    F32,
    /// bfloat16.
    Bf16,
    /// ggml Q8_0 blocks.
    Q8,
    /// ggml 4-bit blocks (Q4_0, or the file's Q4_1).
    Q4,
}

impl InferenceWeights {
    /// The storage format it stands for.
    pub fn format(self) -> QuantFormat {
        match self {
            Self::F32 => QuantFormat::F32,
            Self::Bf16 => QuantFormat::Bf16,
            Self::Q8 => QuantFormat::Q8_0,
            Self::Q4 => QuantFormat::Q4_0,
        }
    }
}

/// `ft tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Model whose tokenizer to use (a GGUF file, an HF folder, hf:, pypi: or an alias).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// The text.
    pub text: String,
}

/// `ft generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model to run.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (special tokens parsed, no BOS added).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f32)]
    pub temperature: f32,
    /// Sample among the K most likely tokens only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probabilities sum to P, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = unit_interval_f32)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// `ft perplexity`.
#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// Model to score with.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score.
    #[arg(long)]
    pub file: PathBuf,
    /// Window length in tokens (at least 2).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(2..))]
    pub window: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `ft cascade ...`.
#[derive(Debug, Subcommand)]
pub enum CascadeCommand {
    /// Answer a task's development split with every stage, fit each stage's scorer and the
    /// stages and thresholds of highest accuracy within the budget; write the fitted cascade.
    Fit(CascadeFitArgs),
    /// Measure a fitted cascade on the task's held-out split at every budget, each stage
    /// alone beside it: a table and a plot of accuracy against cost.
    Eval(CascadeEvalArgs),
}

/// What every cascade command shares: where the stages' base and adapters come from.
#[derive(Debug, Args)]
pub struct CascadeModelArgs {
    /// The base model every stage answers with (default: the one the cascade was fitted
    /// with, else the default model).
    #[arg(long)]
    pub model: Option<String>,
    /// cpu, or cuda[:N] in a build with `--features cuda`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// The adapter registry the stages' `adapter` names resolve in.
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// A folder whose `*.toml` task files are registered by name (repeatable).
    #[arg(long = "task-dir")]
    pub task_dirs: Vec<PathBuf>,
    /// The machine's price in USD per hour: a stage without a `price` costs its machine
    /// time at it.
    #[arg(long)]
    pub price_per_hour: Option<f64>,
    /// Seconds a request may take before it counts as failed.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

/// `ft batch ...`.
#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Answer a batch file (OpenAI's JSONL of `{custom_id, method, url, body}` requests) with
    /// the model here and no server, as vLLM's `run-batch`: one output line per request, in
    /// input order. A run stopped part way resumes without asking again what it answered.
    Run(BatchRunArgs),
    /// Upload a batch file to a server with the Batch API and create its batch; prints the
    /// batch's id.
    Submit(BatchSubmitArgs),
    /// A batch's status and request counts; `--wait` until it ends.
    Status(BatchStatusArgs),
    /// Download a finished batch's output (and error) file.
    Results(BatchResultsArgs),
    /// Ask a batch to stop.
    Cancel(BatchStatusArgs),
}

/// The server every `ft batch` client command talks to.
#[derive(Debug, Args)]
pub struct BatchServerArgs {
    /// The server: http://host:port.
    #[arg(long)]
    pub url: String,
    /// Bearer key for the server.
    #[arg(long, env = "FT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// `ft batch submit`.
#[derive(Debug, Args)]
pub struct BatchSubmitArgs {
    /// The requests, one JSON object a line (checked here first).
    #[arg(long)]
    pub input: PathBuf,
    /// The batch's endpoint (default: the url of the file's lines).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Metadata of the batch, KEY=VALUE (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    #[command(flatten)]
    pub server: BatchServerArgs,
}

/// `ft batch status` and `ft batch cancel`.
#[derive(Debug, Args)]
pub struct BatchStatusArgs {
    /// The batch's id.
    pub batch: String,
    /// Poll until the batch ends (completed, failed, expired or cancelled).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub server: BatchServerArgs,
}

/// `ft batch results`.
#[derive(Debug, Args)]
pub struct BatchResultsArgs {
    /// The batch's id.
    pub batch: String,
    /// Where its output file goes.
    #[arg(long)]
    pub output: PathBuf,
    /// Where its error file goes, if it has one.
    #[arg(long)]
    pub errors: Option<PathBuf>,
    #[command(flatten)]
    pub server: BatchServerArgs,
}

/// `ft batch run`.
#[derive(Debug, Args)]
pub struct BatchRunArgs {
    /// The requests, one JSON object a line.
    #[arg(long)]
    pub input: PathBuf,
    /// The answers, one JSON object a line (written once all are answered; until then a
    /// journal, OUTPUT.partial, keeps them).
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub base: BaseModelArgs,
    /// What requests may name.
    #[command(flatten)]
    pub models: ServedModelArgs,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    /// Seconds one request may take.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

/// `ft cascade fit`.
#[derive(Debug, Args)]
pub struct CascadeFitArgs {
    /// The cascade file (`[[stage]]` tables, cheapest first).
    pub cascade: PathBuf,
    /// The task: a registered name or a task TOML file.
    #[arg(long)]
    pub task: String,
    /// Mean cost per request the cascade may spend: USD per 1,000 requests, or N% of what
    /// the most accurate stage costs on the development split.
    #[arg(long)]
    pub budget: String,
    /// Examples of the development split.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=5000))]
    pub dev_size: u64,
    /// The fitted cascade; its development answers go beside it (`.dev.json`).
    #[arg(long)]
    pub out: PathBuf,
    /// The model, registry and prices.
    #[command(flatten)]
    pub common: CascadeModelArgs,
}

/// `ft cascade eval`.
#[derive(Debug, Args)]
pub struct CascadeEvalArgs {
    /// The fitted cascade (`ft cascade fit --out`).
    pub cascade: PathBuf,
    /// Budgets, USD per 1,000 requests, comma-separated (default: 13 from the cheapest
    /// stage's cost to all stages' together, and each stage's own).
    #[arg(long, value_delimiter = ',')]
    pub budgets: Vec<f64>,
    /// Only the first N held-out examples.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub limit: Option<u64>,
    /// The report folder: curve.md, curve.json and the plot.
    #[arg(long, default_value = "cascade-report")]
    pub out: PathBuf,
    /// The model, registry and prices.
    #[command(flatten)]
    pub common: CascadeModelArgs,
}

/// `ft compress`.
#[derive(Debug, Args)]
pub struct CompressArgs {
    /// The model that scores the words (a small one is enough: the default model, a
    /// distilled student).
    #[command(flatten)]
    pub model: BaseModelArgs,
    /// The fraction of the prompt's tokens to keep, in (0, 1].
    #[arg(long)]
    pub rate: f64,
    /// Text before the context, kept whole.
    #[arg(long, default_value = "")]
    pub instruction: String,
    /// Text after the context, kept whole.
    #[arg(long, default_value = "")]
    pub question: String,
    /// The context to shorten: a text file, or `-` for standard input.
    #[arg(default_value = "-")]
    pub context: PathBuf,
    /// Print one JSON object (the prompt, its tokens before and after, words dropped).
    #[arg(long)]
    pub json: bool,
}

/// `ft bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s at batch 1, and peak RSS.
    Generate(BenchGenerateArgs),
    /// Train recipes one after another and tabulate memory, speed and exact match.
    Train(BenchTrainArgs),
    /// Run a distillation recipe and its cross-entropy-only twin; tabulate perplexity, decode
    /// speed and weight bytes of teacher and students.
    Distill(BenchDistillArgs),
    /// Load-test an OpenAI-compatible server: throughput, TTFT and time per output token.
    Serve(BenchServeArgs),
    /// Serve a workload with repeated prompts with no response cache, the in-memory one and
    /// Redis: requests/s against no cache, and the latency of hits.
    Cache(BenchCacheArgs),
    /// Answer a task's prompts interactively (1 stream, and the most streams within a TPOT
    /// SLO) and as one batch: throughput and cost per 1,000 requests, and the TTFT a running
    /// batch costs interactive requests.
    Batch(BenchBatchArgs),
}

/// `ft bench batch`.
#[derive(Debug, Args)]
pub struct BenchBatchArgs {
    /// The base model served.
    #[command(flatten)]
    pub base: BaseModelArgs,
    /// The task whose held-out prompts are asked.
    #[arg(long, default_value = "dates")]
    pub task: String,
    /// Requests per measurement.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=50_000))]
    pub requests: u64,
    /// The interactive SLO: p99 time per output token, in milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub slo_tpot_ms: f64,
    /// Streams tried for the interactive rows, rising.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256"
    )]
    pub concurrency: Vec<usize>,
    /// The machine's price, USD per hour.
    #[arg(long, default_value_t = 0.09)]
    pub price_per_hour: f64,
    /// Interactive requests timed for TTFT, on the idle server and beside a batch.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub probes: u64,
    /// Requests of the batch in the engine at once (the server's `--batch-max-rows`; the
    /// engine has 256 rows).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub batch_max_rows: u64,
    /// Tokens of batch requests one engine step runs at most (the server's
    /// `--batch-step-tokens`).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_step_tokens: u64,
    /// Append the tables, with the command, machine and date, to this Markdown file.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

/// `ft bench cache`.
#[derive(Debug, Args)]
pub struct BenchCacheArgs {
    /// The base model served.
    #[command(flatten)]
    pub base: BaseModelArgs,
    /// Also measure a Redis response cache at this URL (redis://HOST:PORT).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Concurrent streams, one row per store each.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub concurrency: Vec<usize>,
    /// Requests per run.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Runs per concurrency, each measuring every store in turn; a row gives the median
    /// requests/s and the median of the runs' ratios to no cache.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub runs: u64,
    /// The share of requests that repeat an earlier request of the run (0 to 1).
    #[arg(long, default_value_t = 0.5)]
    pub repeat: f64,
    /// Prompt length, in words (about one token each).
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Tokens to generate per request (greedy; the end-of-sequence token is ignored).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tokens: u64,
    /// Seed of the prompts (default: from the clock, so that a shared Redis holds none).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Append the table, with the command, machine and date, to this Markdown file.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

/// `ft bench serve`.
#[derive(Debug, Args)]
pub struct BenchServeArgs {
    /// The server's base URL (e.g. http://127.0.0.1:8000).
    #[arg(long)]
    pub url: String,
    /// Concurrent streams to measure, one row each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub concurrency: Vec<usize>,
    /// Requests per row.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: u64,
    /// Model names to send, round-robin (adapters or the base; default: the server's first).
    #[arg(long, value_delimiter = ',')]
    pub adapters: Vec<String>,
    /// Prompt length, in words (about one token each).
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens to generate per request (the end-of-sequence token is ignored).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_tokens: u64,
    /// Leading words every prompt shares (the rest differs per request).
    #[arg(long, default_value_t = 0)]
    pub shared_prefix: usize,
    /// Seed of the words particular to each prompt (default: from the clock); each row
    /// adds its index, so no row reuses another's prompts from the server's prefix cache.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Bearer API key, if the server wants one.
    #[arg(long, env = "FT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds before a request counts as an error.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Label of the rows (default: the URL).
    #[arg(long)]
    pub label: Option<String>,
    /// Append the table, with the command, machine and date, to this Markdown file.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// A soak instead of rows: requests for this many seconds at the first concurrency, some
    /// cancelled and some read slowly, then a check that the server went idle holding no KV
    /// block (exit 1 if not, or on any other error).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub soak: Option<u64>,
    /// In a soak, the share of requests whose client hangs up part way through the stream.
    #[arg(long, default_value_t = 0.2)]
    pub cancel_rate: f64,
    /// In a soak, the share of requests whose client reads the stream slowly.
    #[arg(long, default_value_t = 0.1)]
    pub slow_rate: f64,
    /// In a soak, a slow client's wait after each event, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub slow_delay_ms: u64,
}

/// `ft bench distill`.
#[derive(Debug, Args)]
pub struct BenchDistillArgs {
    /// A recipe with a `[distill]` section.
    pub recipe: PathBuf,
    /// Override applied to both runs (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Folder for the two runs (`distill/` and `ce-only/`).
    #[arg(long, default_value = "runs/bench-distill")]
    pub out: PathBuf,
    /// Tokens decoded (greedy, batch 1) to time teacher and student.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub new_tokens: u64,
    /// Append the table, with the command, machine and date, to this Markdown file.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

/// `ft bench train`.
#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Recipes to run, in order.
    #[arg(required = true)]
    pub recipes: Vec<PathBuf>,
    /// Override applied to every recipe (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Folder for the runs (one subfolder per recipe).
    #[arg(long, default_value = "runs/bench")]
    pub out: PathBuf,
    /// Also train each recipe's job with Hugging Face transformers + PEFT (torch on the CPU,
    /// in a virtual environment made on first use) and tabulate both side by side.
    #[arg(long)]
    pub vs_peft: bool,
    /// Timed PEFT steps per recipe (ft's first steps, after the warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub peft_steps: u64,
    /// Untimed PEFT steps before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub peft_warmup: u64,
    /// torch's threads for PEFT (default: as many as ft's kernels run on).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub threads: Option<u64>,
    /// The virtual environment for PEFT (default: $FT_HOME/venvs/peft).
    #[arg(long)]
    pub peft_venv: Option<PathBuf>,
    /// Append the table, with the command, machine and date, to this Markdown file.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

/// `ft bench generate`.
#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    /// Model to measure.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub prompt_tokens: u64,
    /// Tokens to decode after the prompt.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub new_tokens: u64,
    /// Timed runs; the table reports the median.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub runs: u64,
    /// Also measure llama.cpp (llama-cpp-python) on the same GGUF in this run.
    #[arg(long)]
    pub vs_llama_cpp: bool,
    /// Measure every inference weight format (f32, bf16, q8, q4) in this run, one row each.
    #[arg(long, conflicts_with_all = ["weights", "quant"])]
    pub all_weights: bool,
    /// CPU threads for llama.cpp.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Append the table, with the command, machine and date, to this Markdown file.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

fn non_negative_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .parse()
        .map_err(|_| format!("expected a number, got {s:?}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("expected a number >= 0, got {s}"))
    }
}

fn unit_interval_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .parse()
        .map_err(|_| format!("expected a number, got {s:?}"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("expected a number in (0, 1], got {s}"))
    }
}
