//! One evaluation as plain values ([`Evaluation`]) and its run: for each base storage, the
//! perplexity tasks scored in process for the base and every adapter, then a server (a running
//! OpenAI-compatible one, or our engine behind its HTTP server in process with every adapter
//! registered, so timings are what a client sees) that answers each generated task for each
//! model, decoding and concurrency. Every measurement is a row of one [`Report`]; the rows of
//! registry adapters go into their versions' metrics.
//!
//! Loading the base in a storage is the caller's: the run takes a loader of the caller's
//! storage description `S`, so that this crate knows no command-line flags.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use ft_adapters::Registry;
use ft_model::perplexity::perplexity;
use ft_model::{Pretrained, QuantBackend};
use ft_serve::server::{Background, ServerConfig};
use ft_serve::{Engine, EngineConfig};
use serde_json::json;

use crate::client::Client;
use crate::error::{BoxError, EvalError};
use crate::measure::{run_pass, summarize, Decoding, Row, Setting};
use crate::metric::pooled_perplexity;
use crate::report::{Report, TaskInfo, BASE};
use crate::task::{EvalTask, Expected, Metric};

/// Tokens of KV cache the in-process engine holds.
const KV_TOKENS: usize = 16384;

/// An adapter to compare with the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// The model name requests carry and rows show.
    pub name: String,
    /// Its PEFT folder, for the model in process (`None` when only a running server has it).
    pub dir: Option<PathBuf>,
    /// Its registry version, whose metrics get its rows.
    pub version: Option<u32>,
}

/// A base storage to evaluate in process.
#[derive(Debug, Clone)]
pub struct Storage<S> {
    /// Its name in the rows (`f32`, `q8`, `nf4+dq`, ...).
    pub label: String,
    /// What the caller's loader loads the base from.
    pub spec: S,
}

/// Where the answers come from.
#[derive(Debug, Clone)]
pub enum Serving<S> {
    /// Our engine and HTTP server in process, over each base storage in turn.
    InProcess(Vec<Storage<S>>),
    /// A running OpenAI-compatible server, which serves its own weights (rows show the
    /// storage `server`); perplexity tasks need the model in process and are refused.
    Server {
        /// `http://host:port`.
        url: String,
        /// Its bearer key.
        api_key: Option<String>,
    },
}

/// Everything one evaluation measures. Messages name the `ft eval` flag each field comes from.
#[derive(Debug, Clone)]
pub struct Evaluation<S> {
    /// The base model, as the report names it.
    pub base_model: String,
    /// The tasks, each with the examples and answer length to use; a task may come several
    /// times with other prompts ([`crate::prompting::variants`]).
    pub tasks: Vec<EvalTask>,
    /// The adapters compared with the base (the base is always measured), names unique and
    /// none [`BASE`].
    pub adapters: Vec<Adapter>,
    /// The server, or the base storages to serve in process.
    pub serving: Serving<S>,
    /// Decodings, each measured once.
    pub decodings: Vec<Decoding>,
    /// Requests in flight at once, each measured once, ascending (the throughput plot's
    /// lines run left to right).
    pub concurrencies: Vec<usize>,
    /// The time a request may take before it counts as timed out.
    pub timeout: Duration,
    /// The machine's price in USD per hour, for the cost of each generated row.
    pub usd_per_hour: Option<f64>,
    /// The adapter registry whose versions' metrics get the rows of [`Adapter::version`].
    pub registry: Option<PathBuf>,
}

/// Wraps a loader's error.
fn load_error<E: Into<BoxError>>(e: E) -> EvalError {
    EvalError::Load(e.into())
}

impl<S> Evaluation<S> {
    /// Measures every setting on backend `B`, loading the base for each storage with `load`
    /// on `device`, and returns the report (not yet written). Perplexity comes first for each
    /// storage: it needs no server, and a text it cannot score stops the run before the long
    /// generation passes. `on_row` sees each row as soon as it is measured (the CLI prints
    /// progress from it).
    pub fn run<B: QuantBackend, E: Into<BoxError>>(
        &self,
        device: &B::Device,
        mut load: impl FnMut(&S) -> Result<Pretrained<B>, E>,
        mut on_row: impl FnMut(&Row),
    ) -> Result<Report, EvalError> {
        let (scored, generated): (Vec<&EvalTask>, Vec<&EvalTask>) = self
            .tasks
            .iter()
            .partition(|t| t.metric == Metric::Perplexity);
        let mut rows = Vec::new();
        match &self.serving {
            Serving::Server { url, api_key } => {
                if let Some(t) = scored.first() {
                    return Err(EvalError::PerplexityNeedsModel {
                        task: t.name.clone(),
                    });
                }
                let client = Client::new(url, api_key.clone(), self.timeout);
                let listed = client.models().map_err(|error| EvalError::Server {
                    url: url.clone(),
                    error,
                })?;
                if let Some(a) = self.adapters.iter().find(|a| !listed.contains(&a.name)) {
                    return Err(EvalError::NotListed {
                        adapter: a.name.clone(),
                        url: url.clone(),
                        listed,
                    });
                }
                // The server's first model is its base; `models` lists one at least.
                self.measure(
                    &client,
                    &listed[0],
                    "server",
                    &generated,
                    &mut on_row,
                    &mut rows,
                );
            }
            Serving::InProcess(storages) => {
                for storage in storages {
                    if !scored.is_empty() {
                        self.perplexity_rows(
                            &scored,
                            storage,
                            device,
                            &mut load,
                            &mut on_row,
                            &mut rows,
                        )?;
                    }
                    if generated.is_empty() {
                        continue;
                    }
                    let server = self.start_server(load(&storage.spec).map_err(load_error)?)?;
                    let client = Client::new(server.url(), None, self.timeout);
                    self.measure(
                        &client,
                        BASE,
                        &storage.label,
                        &generated,
                        &mut on_row,
                        &mut rows,
                    );
                    server.stop().map_err(|source| EvalError::InProcess {
                        doing: "stopping the in-process server",
                        source,
                    })?;
                }
            }
        }
        Ok(Report {
            base_model: self.base_model.clone(),
            served_by: match &self.serving {
                Serving::Server { url, .. } => format!("by {url}"),
                Serving::InProcess(_) => {
                    "in process by ft's engine and HTTP server (prefix cache off)".into()
                }
            },
            date: ft_adapters::registry::now_rfc3339(),
            usd_per_hour: self.usd_per_hour,
            // A task measured with several prompt variants is one section of the report.
            tasks: self
                .tasks
                .iter()
                .enumerate()
                .filter(|(i, t)| !self.tasks[..*i].iter().any(|o| o.name == t.name))
                .map(|(_, t)| TaskInfo::of(t))
                .collect(),
            rows,
        })
    }

    /// The base (no folder), then each adapter: the name rows show and the PEFT folder.
    fn models(&self) -> impl Iterator<Item = (&str, Option<&PathBuf>)> {
        std::iter::once((BASE, None)).chain(
            self.adapters
                .iter()
                .map(|a| (a.name.as_str(), a.dir.as_ref())),
        )
    }

    /// Every generated task through `client` for each model, decoding and concurrency, rows
    /// labelled with the storage `label`; the base is requested as `base_name`.
    fn measure(
        &self,
        client: &Client,
        base_name: &str,
        label: &str,
        tasks: &[&EvalTask],
        on_row: &mut impl FnMut(&Row),
        rows: &mut Vec<Row>,
    ) {
        for task in tasks {
            for (model, _) in self.models() {
                let sent = if model == BASE { base_name } else { model };
                // One unmeasured request first: loading the adapter and first-touch costs
                // belong to no example.
                if let Some(first) = task.items.first() {
                    let _ = client.stream_completion(&json!({
                        "model": sent, "prompt": first.prompt, "max_tokens": 1,
                    }));
                }
                for &decoding in &self.decodings {
                    for &concurrency in &self.concurrencies {
                        let setting = Setting {
                            model: model.to_string(),
                            quant: label.to_string(),
                            decoding,
                            concurrency,
                        };
                        let pass = run_pass(client, sent, task, decoding, concurrency);
                        let row = summarize(task, &setting, &pass, self.usd_per_hour);
                        on_row(&row);
                        rows.push(row);
                    }
                }
            }
        }
    }

    /// Our engine over the base `p` with every adapter registered, serving on a free local
    /// port.
    fn start_server<B: QuantBackend>(&self, p: Pretrained<B>) -> Result<Background, EvalError> {
        serve_in_process(p, &self.adapters)
    }

    /// Perplexity of the base and each adapter over the texts of `tasks` (each text scored in
    /// windows of the model's context), one row per task and model.
    fn perplexity_rows<B: QuantBackend, E: Into<BoxError>>(
        &self,
        tasks: &[&EvalTask],
        storage: &Storage<S>,
        device: &B::Device,
        load: &mut impl FnMut(&S) -> Result<Pretrained<B>, E>,
        on_row: &mut impl FnMut(&Row),
        rows: &mut Vec<Row>,
    ) -> Result<(), EvalError> {
        for (model, dir) in self.models() {
            let mut p = load(&storage.spec).map_err(load_error)?;
            if let Some(dir) = dir {
                p.attach_adapter(dir)
                    .map_err(|e| EvalError::adapter(model, dir, e))?;
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
                        return Err(EvalError::TooShort {
                            task: task.name.clone(),
                            example: i + 1,
                            tokens: ids.len(),
                        });
                    }
                    let r = perplexity(&p.model, &ids, context, device);
                    parts.push((r.perplexity, r.scored));
                }
                let row = Row {
                    task: task.name.clone(),
                    model: model.to_string(),
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
                    prompting: None,
                    answers: Vec::new(),
                };
                on_row(&row);
                rows.push(row);
            }
        }
        Ok(())
    }

    /// Adds each registry adapter's rows of `report` to its version's metrics, under
    /// `eval/<task>`.
    pub fn record_metrics(&self, report: &Report) -> Result<(), EvalError> {
        let Some(root) = &self.registry else {
            return Ok(());
        };
        let mut registry = Registry::open(root).map_err(|source| EvalError::Registry {
            root: root.clone(),
            source,
        })?;
        for a in &self.adapters {
            let Some(version) = a.version else { continue };
            let mut metrics = serde_json::Map::new();
            for task in &report.tasks {
                let rows: Vec<_> = report
                    .rows
                    .iter()
                    .filter(|r| r.task == task.name && r.model == a.name)
                    .map(|r| {
                        json!({
                            "metric": r.metric.name(),
                            "value": r.score.value,
                            "scored": r.score.scored,
                            "errors": r.errors + r.timeouts,
                            "quant": r.quant,
                            "decoding": r.decoding,
                            "concurrency": r.concurrency,
                            "prompting": r.prompting,
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
                .add_metrics(&a.name, version, &serde_json::Value::Object(metrics))
                .map_err(|source| EvalError::Metrics {
                    name: a.name.clone(),
                    version,
                    source,
                })?;
        }
        Ok(())
    }
}

/// Our engine over the base `p` with `adapters` registered, behind its HTTP server on a free
/// local port, prefix cache off (a run sends the same prompts again in each setting, and a
/// prefix cache would time the later ones on cached prompts).
pub(crate) fn serve_in_process<B: QuantBackend>(
    p: Pretrained<B>,
    adapters: &[Adapter],
) -> Result<Background, EvalError> {
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
        max_adapters: adapters.len().max(1),
        ..EngineConfig::default()
    };
    let detokenizer = p.tokenizer.clone();
    let mut engine = Engine::new(
        p.model,
        Box::new(move |ids: &[u32]| detokenizer.decode(ids).unwrap_or_default()),
        config,
    );
    for a in adapters {
        if let Some(dir) = &a.dir {
            engine
                .register_adapter(&a.name, dir.clone())
                .map_err(|e| EvalError::adapter(&a.name, dir, e))?;
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|source| EvalError::InProcess {
        doing: "binding a local port",
        source,
    })?;
    let config = ServerConfig {
        model_id: BASE.into(),
        ..Default::default()
    };
    Background::start(engine, p.tokenizer, p.chat_template, config, listener).map_err(|source| {
        EvalError::InProcess {
            doing: "starting the in-process server",
            source,
        }
    })
}
