//! `ft eval`: each task's held-out split through the base and every adapter, for each base
//! storage, decoding and concurrency, served in process by our engine behind its HTTP server
//! (so timings are what a client sees) or by any OpenAI-compatible server; then the report,
//! and the results in the registry's metrics of each adapter version.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ft_adapters::registry::{parse_ref, validate_name};
use ft_adapters::Registry;
use ft_eval::client::Client;
use ft_model::perplexity::perplexity;
use ft_model::{QuantBackend, QuantFormat};
use ft_serve::server::{registry_adapter, Background, ServerConfig};
use ft_serve::{Engine, EngineConfig};
use serde_json::json;

use crate::args::{BaseModelArgs, EvalArgs, InferenceWeights};
use crate::device::{dispatch, Job};
use crate::error::{usage, UsageError};
use ft_eval::measure::{run_pass, summarize, Row, Setting};
use ft_eval::metric::pooled_perplexity;
use ft_eval::report::{Report, TaskInfo, BASE};
use ft_eval::task::{self, EvalTask, Expected, Metric, TaskError};

/// Tokens of KV cache the in-process engine holds.
const KV_TOKENS: usize = 16384;

/// An adapter to evaluate.
#[derive(Debug, Clone)]
struct Target {
    /// The model name requests carry.
    name: String,
    /// Its PEFT folder (in process).
    dir: Option<PathBuf>,
    /// Its registry version, whose metrics get the results.
    version: Option<u32>,
}

/// A base storage to evaluate: its label and how to load it.
#[derive(Debug, Clone)]
struct Storage {
    label: String,
    weights: Option<InferenceWeights>,
    quant: Option<QuantFormat>,
    /// Double quantization of a 4-bit format (`nf4+dq`).
    double_quant: bool,
}

/// A validated `ft eval`.
struct Plan {
    args: EvalArgs,
    tasks: Vec<EvalTask>,
    targets: Vec<Target>,
    storages: Vec<Storage>,
}

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
    let task_error = |e: TaskError| match e {
        TaskError::Unknown { .. } => UsageError(format!("--tasks: {e}")).into(),
        TaskError::Invalid(m) => anyhow::Error::from(UsageError(m)),
    };
    if args.list_tasks {
        for t in task::registered(&args.task_dirs).map_err(task_error)? {
            println!("{}\t{}\t{}", t.name, t.metric.name(), t.about);
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
            return Err(UsageError(format!(
                "--tasks {}: perplexity is scored with the model in process; drop --server",
                t.name
            ))
            .into());
        }
        tasks.push(t);
    }
    if let Some(p) = args
        .price_per_hour
        .filter(|p| !(p.is_finite() && *p >= 0.0))
    {
        return Err(usage("--price-per-hour", "a price of 0 or more", p));
    }
    let storages = match (&args.quant, &args.server) {
        (Some(_), Some(_)) => {
            return Err(UsageError(
                "--quant: applies to the in-process engine; a --server serves its own weights"
                    .into(),
            )
            .into())
        }
        (None, Some(_)) => vec![Storage {
            label: "server".into(),
            weights: None,
            quant: None,
            double_quant: false,
        }],
        (None, None) => vec![default_storage(&args.model)?],
        (Some(q), None) => q
            .iter()
            .map(|s| storage(s))
            .collect::<anyhow::Result<_>>()?,
    };
    let targets = targets(&args)?;
    let plan = Plan {
        tasks,
        targets,
        storages,
        args,
    };
    dispatch(plan.args.device, plan)
}

/// The storage `ft generate` would use for `model`: its own blocks where a kernel reads
/// them, named as `--quant` names them.
fn default_storage(model: &str) -> anyhow::Result<Storage> {
    let path = ft_model::source::resolve(model)?;
    let label = match ft_model::pretrained::default_inference_format(&path)? {
        None => "f32",
        Some(QuantFormat::Bf16) => "bf16",
        Some(QuantFormat::Q4_0 | QuantFormat::Q4_1) => "q4",
        Some(_) => "q8",
    };
    Ok(Storage {
        label: label.into(),
        weights: None,
        quant: None,
        double_quant: false,
    })
}

/// A `--quant` entry: an inference-kernel storage (f32, bf16, q8, q4) or any storage format,
/// a 4-bit one optionally double-quantized (`nf4+dq`).
fn storage(s: &str) -> anyhow::Result<Storage> {
    use clap::ValueEnum;
    if let Ok(w) = InferenceWeights::from_str(s, false) {
        return Ok(Storage {
            label: s.into(),
            weights: Some(w),
            quant: None,
            double_quant: false,
        });
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
                "--quant",
                "f32, bf16, q8, q4 or a storage format (nf4, fp4, nf4+dq, fp4+dq, int8, \
                 int8-block, q8_0, q4_0, q4_1)",
                s,
            )
        })?;
    Ok(Storage {
        label: s.into(),
        weights: None,
        quant: Some(format),
        double_quant,
    })
}

/// The adapters of `--adapters`, resolved.
fn targets(args: &EvalArgs) -> anyhow::Result<Vec<Target>> {
    let registry = match &args.registry {
        Some(root) => {
            Some(Registry::open(root).with_context(|| format!("--registry {}", root.display()))?)
        }
        None => None,
    };
    let mut out: Vec<Target> = Vec::new();
    for spec in &args.adapters {
        let bad = |why: String| UsageError(format!("--adapters {spec}: {why}"));
        let target = if let (Some(reg), Some(root)) = (&registry, &args.registry) {
            let (name, version) = parse_ref(spec).map_err(|e| bad(e.to_string()))?;
            let record = reg.get(&name, version).map_err(|e| bad(e.to_string()))?;
            let dir = match args.server {
                Some(_) => None,
                None => Some(
                    registry_adapter(root, &format!("{}:{}", record.name, record.version))
                        .map_err(|e| bad(e.to_string()))?,
                ),
            };
            Target {
                name: record.name,
                dir,
                version: Some(record.version),
            }
        } else if args.server.is_some() {
            Target {
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
            Target {
                name,
                dir: Some(dir),
                version: None,
            }
        };
        if target.name == BASE || out.iter().any(|t| t.name == target.name) {
            return Err(bad(format!(
                "the name {:?} is taken (by the base or another adapter)",
                target.name
            ))
            .into());
        }
        out.push(target);
    }
    Ok(out)
}

impl Job for Plan {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let a = &self.args;
        let timeout = Duration::from_secs(a.timeout);
        let mut rows = Vec::new();
        for storage in &self.storages {
            let base = BaseModelArgs {
                model: a.model.clone(),
                device: a.device,
                quant: storage.quant,
                weights: storage.weights,
                double_quant: storage.double_quant,
            };
            // Perplexity first: it needs no server, and a text it cannot score stops the eval
            // before the long generation passes.
            let (scored, generated): (Vec<&EvalTask>, Vec<&EvalTask>) = self
                .tasks
                .iter()
                .partition(|t| t.metric == Metric::Perplexity);
            if !scored.is_empty() {
                rows.extend(self.perplexity_rows::<B>(&scored, &base, storage, &device)?);
            }
            if generated.is_empty() {
                continue;
            }
            // The server: a running one, or ours in process over this storage.
            let (server, client, base_name) = match &a.server {
                Some(url) => {
                    let client = Client::new(url, a.api_key.clone(), timeout);
                    let listed = client
                        .models()
                        .map_err(|e| anyhow::anyhow!("--server {url}: {e}"))?;
                    if let Some(t) = self.targets.iter().find(|t| !listed.contains(&t.name)) {
                        return Err(UsageError(format!(
                            "--adapters {}: the server at {url} does not list it (it lists {})",
                            t.name,
                            listed.join(", ")
                        ))
                        .into());
                    }
                    (None, client, listed[0].clone())
                }
                None => {
                    let server = self.start_server::<B>(&base, &device)?;
                    let client = Client::new(server.url(), None, timeout);
                    (Some(server), client, BASE.to_string())
                }
            };
            for task in generated {
                for model in self.models() {
                    let sent = if model.name == BASE {
                        &base_name
                    } else {
                        &model.name
                    };
                    // One unmeasured request first: loading the adapter and first-touch costs
                    // belong to no example.
                    if let Some(first) = task.items.first() {
                        let _ = client.stream_completion(&json!({
                            "model": sent, "prompt": first.prompt, "max_tokens": 1,
                        }));
                    }
                    for &decoding in &a.decoding {
                        for &concurrency in &a.concurrency {
                            let setting = Setting {
                                model: model.name.clone(),
                                quant: storage.label.clone(),
                                decoding,
                                concurrency: concurrency as usize,
                            };
                            let pass =
                                run_pass(&client, sent, task, decoding, concurrency as usize);
                            let row = summarize(task, &setting, &pass, a.price_per_hour);
                            progress(&row);
                            rows.push(row);
                        }
                    }
                }
            }
            if let Some(server) = server {
                server.stop().context("stopping the in-process server")?;
            }
        }
        let report = Report {
            base_model: a.model.clone(),
            served_by: match &a.server {
                Some(url) => format!("by {url}"),
                None => "in process by ft's engine and HTTP server (prefix cache off)".into(),
            },
            date: ft_adapters::registry::now_rfc3339(),
            usd_per_hour: a.price_per_hour,
            tasks: self.tasks.iter().map(TaskInfo::of).collect(),
            rows,
        };
        let files = report.write(&a.out)?;
        print!("{}", report.markdown());
        eprintln!(
            "ft eval: wrote {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.record_metrics(&report)
    }
}

impl Plan {
    /// The base, then each adapter.
    fn models(&self) -> Vec<Target> {
        let base = Target {
            name: BASE.into(),
            dir: None,
            version: None,
        };
        std::iter::once(base)
            .chain(self.targets.iter().cloned())
            .collect()
    }

    /// Our engine over `base` with every adapter registered, serving on a free local port.
    fn start_server<B: QuantBackend>(
        &self,
        base: &BaseModelArgs,
        device: &B::Device,
    ) -> anyhow::Result<Background> {
        let p = base.load::<B>(device)?;
        let block_size = 16;
        let config = EngineConfig {
            block_size,
            kv_blocks: KV_TOKENS / block_size,
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting: 100_000,
            // Every setting sends the same prompts again: a prefix cache would time the later
            // ones on cached prompts.
            prefix_cache: false,
            max_adapters: self.targets.len().max(1),
        };
        let detokenizer = p.tokenizer.clone();
        let mut engine = Engine::new(
            p.model,
            Box::new(move |ids: &[u32]| detokenizer.decode(ids).unwrap_or_default()),
            config,
        );
        for t in &self.targets {
            if let Some(dir) = &t.dir {
                engine
                    .register_adapter(&t.name, dir.clone())
                    .with_context(|| format!("--adapters {}: {}", t.name, dir.display()))?;
            }
        }
        let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding a local port")?;
        let config = ServerConfig {
            model_id: BASE.into(),
            ..Default::default()
        };
        Background::start(engine, p.tokenizer, p.chat_template, config, listener)
            .context("starting the in-process server")
    }

    /// Perplexity of the base and each adapter over the texts of `tasks` (each text scored in
    /// windows of the model's context), one row per task and model.
    fn perplexity_rows<B: QuantBackend>(
        &self,
        tasks: &[&EvalTask],
        base: &BaseModelArgs,
        storage: &Storage,
        device: &B::Device,
    ) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for model in self.models() {
            let mut p = base.load::<B>(device)?;
            if let Some(dir) = &model.dir {
                p.attach_adapter(dir)
                    .with_context(|| format!("--adapters {}: {}", model.name, dir.display()))?;
            }
            let context = p.config.max_position_embeddings;
            for task in tasks {
                let mut parts = Vec::with_capacity(task.items.len());
                for (i, item) in task.items.iter().enumerate() {
                    let Expected::Text(text) = &item.expected else {
                        continue;
                    };
                    let ids = p.tokenizer.encode(text)?;
                    if ids.len() < 2 {
                        return Err(UsageError(format!(
                            "--tasks {}: example {} has {} token(s); perplexity needs 2 or more",
                            task.name,
                            i + 1,
                            ids.len()
                        ))
                        .into());
                    }
                    let r = perplexity(&p.model, &ids, context, device);
                    parts.push((r.perplexity, r.scored));
                }
                let row = Row {
                    task: task.name.clone(),
                    model: model.name.clone(),
                    quant: storage.label.clone(),
                    decoding: "-".into(),
                    concurrency: None,
                    metric: Metric::Perplexity,
                    score: pooled_perplexity(&parts),
                    examples: task.items.len(),
                    errors: 0,
                    timeouts: 0,
                    first_error: None,
                    timing: None,
                    cost: None,
                    answers: Vec::new(),
                };
                progress(&row);
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// Adds each registry adapter's rows to its version's metrics, under `eval/<task>`.
    fn record_metrics(&self, report: &Report) -> anyhow::Result<()> {
        let Some(root) = &self.args.registry else {
            return Ok(());
        };
        let mut registry =
            Registry::open(root).with_context(|| format!("--registry {}", root.display()))?;
        for t in &self.targets {
            let Some(version) = t.version else { continue };
            let mut metrics = serde_json::Map::new();
            for task in &report.tasks {
                let rows: Vec<_> = report
                    .rows
                    .iter()
                    .filter(|r| r.task == task.name && r.model == t.name)
                    .map(|r| {
                        json!({
                            "metric": r.metric.name(),
                            "value": r.score.value,
                            "scored": r.score.scored,
                            "errors": r.errors + r.timeouts,
                            "quant": r.quant,
                            "decoding": r.decoding,
                            "concurrency": r.concurrency,
                            "latency_p50_s": r.timing.map(|t| t.latency_p50_s),
                            "tokens_per_s": r.timing.map(|t| t.tokens_per_s),
                            "usd_per_m_tokens": r.cost.map(|c| c.usd_per_m_tokens),
                            "base_model": report.base_model,
                            "date": report.date,
                        })
                    })
                    .collect();
                metrics.insert(format!("eval/{}", task.name), json!(rows));
            }
            registry
                .add_metrics(&t.name, version, &serde_json::Value::Object(metrics))
                .with_context(|| format!("--registry: metrics of {}:{version}", t.name))?;
        }
        Ok(())
    }
}

/// One line per row on stderr while the eval runs.
fn progress(row: &Row) {
    eprintln!(
        "ft eval: {} {} {} {} x{}: {} {} of {} answered{}{}",
        row.task,
        row.model,
        row.quant,
        row.decoding,
        row.concurrency
            .map_or_else(|| "-".into(), |c| c.to_string()),
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
