//! `ft eval`: the flags checked and turned into an [`Evaluation`] (tasks, adapters, base
//! storages, decodings, concurrencies), run on the backend `--device` chose; then the report
//! written and printed, and the results in the registry's metrics of each adapter version.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ft_adapters::registry::{parse_ref, validate_name};
use ft_adapters::Registry;
use ft_eval::compress::Compressor;
use ft_eval::evaluation::{Adapter, Evaluation, Serving, Storage};
use ft_eval::measure::Row;
use ft_eval::prompting::variants;
use ft_eval::report::BASE;
use ft_eval::task::{self, EvalTask, Metric, TaskError};
use ft_eval::EvalError;
use ft_model::{QuantBackend, QuantFormat};
use ft_serve::server::registry_adapter;

use crate::args::{BaseModelArgs, EvalArgs, InferenceWeights};
use crate::device::DeviceSpec;
use crate::device::{dispatch, Job};
use crate::error::{usage, UsageError};

/// Keeps the first of each repeated value, so a setting is measured once.
fn dedup<T: PartialEq>(values: &mut Vec<T>) {
    let mut seen = 0;
    while seen < values.len() {
        if values[..seen].contains(&values[seen]) {
            values.remove(seen);
        } else {
            seen += 1;
        }
    }
}

/// Runs `ft eval`.
pub fn run(mut args: EvalArgs) -> anyhow::Result<()> {
    dedup(&mut args.decoding);
    // Ascending, so that the throughput plot's lines run left to right.
    args.concurrency.sort_unstable();
    dedup(&mut args.concurrency);
    if let Some(q) = args.quant.as_mut() {
        dedup(q);
    }
    let task_error = |e| task_error("--tasks", e);
    if args.list_tasks {
        for t in task::registered(&args.task_dirs).map_err(task_error)? {
            println!("{}\t{}\t{}", t.name, t.metric.name(), t.about);
        }
        return Ok(());
    }
    if let Some(dir) = &args.redraw {
        let report = ft_eval::report::Report::read(dir).map_err(|e| UsageError(e.to_string()))?;
        for file in report.draw(dir)? {
            println!("wrote {}", file.display());
        }
        return Ok(());
    }
    if args.tasks.is_empty() {
        return Err(usage(
            "--tasks",
            "one or more task names (see --list-tasks)",
            "nothing",
        ));
    }
    let mut tasks = Vec::new();
    for spec in &args.tasks {
        let mut t = task::resolve(spec, &args.task_dirs).map_err(task_error)?;
        if let Some(limit) = args.limit {
            t.items.truncate(limit as usize);
        }
        if let Some(n) = args.max_tokens {
            t.max_tokens = n as usize;
        }
        if tasks.iter().any(|o: &EvalTask| o.name == t.name) {
            return Err(usage("--tasks", "each task once", &t.name));
        }
        if args.server.is_some() && t.metric == Metric::Perplexity {
            return Err(cli_error(EvalError::PerplexityNeedsModel { task: t.name }));
        }
        tasks.push(t);
    }
    if let Some(r) = args.compress.iter().find(|r| !(**r > 0.0 && **r < 1.0)) {
        return Err(usage(
            "--compress",
            "fractions of the prompt's tokens to keep, each in (0, 1)",
            r,
        ));
    }
    if !args.compress.is_empty() && args.shots == 0 {
        return Err(UsageError(
            "--compress: needs --shots N: the demonstrations are what is compressed, the \
             instruction and question are kept"
                .into(),
        )
        .into());
    }
    dedup(&mut args.compress);
    let max = ft_eval::batch_prompting::MAX_PER_PROMPT as u64;
    if let Some(k) = args
        .batch_prompting
        .iter()
        .find(|k| !(2..=max).contains(*k))
    {
        return Err(usage(
            "--batch-prompting",
            &format!("questions a prompt, each in 2..={max} (one a prompt is always measured)"),
            k,
        ));
    }
    args.batch_prompting.sort_unstable();
    args.batch_prompting.dedup();
    let prompts = Prompts {
        shots: args.shots as usize,
        per_prompt: args.batch_prompting.iter().map(|&k| k as usize).collect(),
        rates: args.compress.clone(),
        compressor: (!args.compress.is_empty()).then(|| BaseModelArgs {
            model: args
                .compress_model
                .clone()
                .unwrap_or_else(|| args.model.clone()),
            ..base_model(&args, None, None, false)
        }),
    };
    if let Some(p) = args
        .price_per_hour
        .filter(|p| !(p.is_finite() && *p >= 0.0))
    {
        return Err(usage("--price-per-hour", "a price of 0 or more", p));
    }
    let serving = match (&args.quant, &args.server) {
        (Some(_), Some(_)) => {
            return Err(UsageError(
                "--quant: applies to the in-process engine; a --server serves its own weights"
                    .into(),
            )
            .into())
        }
        (None, Some(url)) => Serving::Server {
            url: url.clone(),
            api_key: args.api_key.clone(),
        },
        (None, None) => Serving::InProcess(vec![default_storage(&args)?]),
        (Some(q), None) => Serving::InProcess(
            q.iter()
                .map(|s| storage(&args, s))
                .collect::<anyhow::Result<_>>()?,
        ),
    };
    let evaluation = Evaluation {
        adapters: adapters(&args)?,
        base_model: args.model,
        tasks,
        serving,
        decodings: args.decoding,
        concurrencies: args.concurrency.iter().map(|&c| c as usize).collect(),
        timeout: Duration::from_secs(args.timeout),
        usd_per_hour: args.price_per_hour,
        registry: args.registry,
    };
    dispatch(
        args.device,
        EvalJob {
            evaluation,
            prompts,
            out: args.out,
        },
    )
}

/// `--model` on `--device`, its block linears stored as `weights` or `quant` say (neither:
/// as `ft generate` loads it).
fn base_model(
    args: &EvalArgs,
    weights: Option<InferenceWeights>,
    quant: Option<QuantFormat>,
    double_quant: bool,
) -> BaseModelArgs {
    BaseModelArgs {
        model: args.model.clone(),
        device: args.device,
        quant,
        weights,
        double_quant,
    }
}

/// The storage `ft generate` would use for `--model`: its own blocks where a kernel reads
/// them, named as `--quant` names them.
fn default_storage(args: &EvalArgs) -> anyhow::Result<Storage<BaseModelArgs>> {
    let path = ft_model::source::resolve(&args.model)?;
    let label = match ft_model::pretrained::default_inference_format(&path)? {
        None => "f32",
        Some(QuantFormat::Bf16) => "bf16",
        Some(QuantFormat::Q4_0 | QuantFormat::Q4_1) => "q4",
        Some(_) => "q8",
    };
    Ok(Storage {
        label: label.into(),
        spec: base_model(args, None, None, false),
    })
}

/// A `--quant` entry: an inference-kernel storage (f32, bf16, q8, q4) or any storage format,
/// a 4-bit one optionally double-quantized (`nf4+dq`).
fn storage(args: &EvalArgs, s: &str) -> anyhow::Result<Storage<BaseModelArgs>> {
    Ok(Storage {
        label: s.into(),
        spec: stored_as(&args.model, args.device, s, "--quant")?,
    })
}

/// `model` on `device` with its block linears stored as `s` says (as `ft eval --quant`
/// names storages); an unknown name is a usage error of `flag`.
pub(crate) fn stored_as(
    model: &str,
    device: DeviceSpec,
    s: &str,
    flag: &str,
) -> anyhow::Result<BaseModelArgs> {
    use clap::ValueEnum;
    let base = |weights, quant, double_quant| BaseModelArgs {
        model: model.to_string(),
        device,
        quant,
        weights,
        double_quant,
    };
    if let Ok(w) = InferenceWeights::from_str(s, false) {
        return Ok(base(Some(w), None, false));
    }
    let (name, double_quant) = match s.strip_suffix("+dq") {
        Some(name) => (name, true),
        None => (s, false),
    };
    let format: QuantFormat = name
        .parse()
        .ok()
        .filter(|f| !double_quant || matches!(f, QuantFormat::Nf4 | QuantFormat::Fp4))
        .ok_or_else(|| {
            usage(
                flag,
                "f32, bf16, q8, q4 or a storage format (nf4, fp4, nf4+dq, fp4+dq, int8, \
                 int8-block, q8_0, q4_0, q4_1)",
                s,
            )
        })?;
    Ok(base(None, Some(format), double_quant))
}

/// The adapters of `--adapters`, resolved.
fn adapters(args: &EvalArgs) -> anyhow::Result<Vec<Adapter>> {
    let registry = match &args.registry {
        Some(root) => {
            Some(Registry::open(root).with_context(|| format!("--registry {}", root.display()))?)
        }
        None => None,
    };
    let mut out: Vec<Adapter> = Vec::new();
    for spec in &args.adapters {
        let bad = |why: String| UsageError(format!("--adapters {spec}: {why}"));
        let adapter = if let (Some(reg), Some(root)) = (&registry, &args.registry) {
            let (name, version) = parse_ref(spec).map_err(|e| bad(e.to_string()))?;
            let record = reg.get(&name, version).map_err(|e| bad(e.to_string()))?;
            let dir = match args.server {
                Some(_) => None,
                None => Some(
                    registry_adapter(root, &format!("{}:{}", record.name, record.version))
                        .map_err(|e| bad(e.to_string()))?,
                ),
            };
            Adapter {
                name: record.name,
                dir,
                version: Some(record.version),
            }
        } else if args.server.is_some() {
            Adapter {
                name: spec.clone(),
                dir: None,
                version: None,
            }
        } else {
            let (name, dir) = match spec.split_once('=') {
                Some((n, d)) => (n.to_string(), PathBuf::from(d)),
                None => {
                    let dir = PathBuf::from(spec);
                    let name = dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .ok_or_else(|| bad("a PEFT folder has no name; write NAME=DIR".into()))?;
                    (name, dir)
                }
            };
            validate_name(&name).map_err(|e| bad(format!("{e}; write NAME=DIR")))?;
            if !dir.join("adapter_config.json").is_file() {
                return Err(bad(format!(
                    "{} is not a PEFT adapter folder (no adapter_config.json)",
                    dir.display()
                ))
                .into());
            }
            Adapter {
                name,
                dir: Some(dir),
                version: None,
            }
        };
        if adapter.name == BASE || out.iter().any(|a| a.name == adapter.name) {
            return Err(bad(format!(
                "the name {:?} is taken (by the base or another adapter)",
                adapter.name
            ))
            .into());
        }
        out.push(adapter);
    }
    Ok(out)
}

/// How prompts are built: `shots` demonstrations; each of `per_prompt` questions in one
/// prompt; the demonstrations compressed to each of `rates` by the `compressor` model.
struct Prompts {
    shots: usize,
    per_prompt: Vec<usize>,
    rates: Vec<f64>,
    compressor: Option<BaseModelArgs>,
}

/// A checked `ft eval` and its report folder.
struct EvalJob {
    evaluation: Evaluation<BaseModelArgs>,
    prompts: Prompts,
    out: PathBuf,
}

impl Job for EvalJob {
    type Output = ();

    fn run<B: QuantBackend>(mut self, device: B::Device) -> anyhow::Result<()> {
        if self.prompts.shots > 0 || !self.prompts.per_prompt.is_empty() {
            let model = match &self.prompts.compressor {
                Some(m) => Some(m.load::<B>(&device).context("--compress-model")?),
                None => None,
            };
            let compressor = model.as_ref().map(|m| Compressor::of(m, &device));
            let mut tasks = Vec::new();
            for t in &self.evaluation.tasks {
                tasks.extend(
                    variants(
                        t,
                        self.prompts.shots,
                        &self.prompts.per_prompt,
                        &self.prompts.rates,
                        compressor.as_ref(),
                    )
                    .map_err(cli_error)?,
                );
            }
            self.evaluation.tasks = tasks;
        }
        let report = self
            .evaluation
            .run(
                &device,
                |base: &BaseModelArgs| base.load::<B>(&device),
                progress,
            )
            .map_err(cli_error)?;
        let files = report.write(&self.out)?;
        print!("{}", report.markdown());
        eprintln!(
            "ft eval: wrote {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.evaluation.record_metrics(&report).map_err(cli_error)
    }
}

/// A task that could not be found (`flag` named it) or read, as a usage error.
pub(crate) fn task_error(flag: &str, e: TaskError) -> anyhow::Error {
    match e {
        TaskError::Unknown { .. } => UsageError(format!("{flag}: {e}")).into(),
        TaskError::Invalid(m) => UsageError(m).into(),
    }
}

/// An evaluation's error, a usage error (exit code 2) where a flag's value was unusable.
pub(crate) fn cli_error(e: EvalError) -> anyhow::Error {
    if e.is_usage() {
        UsageError(e.to_string()).into()
    } else {
        e.into()
    }
}

/// One line per row on stderr while the evaluation runs.
fn progress(row: &Row) {
    eprintln!(
        "ft eval: {} {} {} {} x{}{}: {} {} of {} answered{}{}",
        row.task,
        row.model,
        row.quant,
        row.decoding,
        row.concurrency
            .map_or_else(|| "-".into(), |c| c.to_string()),
        row.prompting
            .map_or_else(String::new, |p| format!(" ({p})")),
        row.metric.name(),
        row.score
            .value
            .map_or_else(|| "-".into(), |v| format!("{v:.3}")),
        row.examples - row.errors - row.timeouts,
        row.timing.map_or_else(String::new, |t| format!(
            ", {:.2} s median latency, {:.1} tok/s",
            t.latency_p50_s, t.tokens_per_s
        )),
        row.first_error
            .as_ref()
            .map_or_else(String::new, |e| format!(", first error: {e}")),
    );
}
