//! Every stage's answer to every example of a split, scored right or wrong, with its
//! features and its cost: the table a cascade is fitted on (the development split) and
//! measured on (the held-out split). Stages run through our engine behind its HTTP server in
//! process, one server per base storage with the stages' adapters registered, or on the
//! server at their `url`; one request at a time, so a stage's machine time per answer is its
//! latency.

use std::path::PathBuf;
use std::time::Duration;

use ft_model::{Pretrained, QuantBackend};
use ft_serve::cascade::features::{vote, Features, NAMES};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cascade::config::{Cascade, Stage, StageDecoding};
use crate::client::{Client, Streamed};
use crate::error::{BoxError, EvalError};
use crate::evaluation::{serve_in_process, Adapter};
use crate::measure::Decoding;
use crate::metric;
use crate::prompting::few_shot;
use crate::report::BASE;
use crate::task::EvalTask;

/// Top alternatives asked per generated token, for the entropy feature.
pub const TOP_LOGPROBS: usize = 5;

/// One stage's outcome on one example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The answer (empty when the request failed).
    pub answer: String,
    /// Scored right.
    pub right: bool,
    /// [`Features::vector`] of the answer, `None` where unknown (no log-probabilities).
    pub features: Vec<Option<f64>>,
    /// What it cost, USD.
    pub cost: f64,
    /// Why no answer came, if none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One stage's outcomes on every example of a split, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageOutcomes {
    /// The stage's name.
    pub stage: String,
    /// Per example.
    pub outcomes: Vec<Outcome>,
}

impl StageOutcomes {
    /// Share answered right.
    pub fn accuracy(&self) -> f64 {
        let n = self.outcomes.len().max(1) as f64;
        self.outcomes.iter().filter(|o| o.right).count() as f64 / n
    }

    /// Mean cost per example, USD.
    pub fn mean_cost(&self) -> f64 {
        let n = self.outcomes.len().max(1) as f64;
        self.outcomes.iter().map(|o| o.cost).sum::<f64>() / n
    }
}

/// Runs every stage of `cascade` over `task`'s examples. `adapters[i]` is stage i's adapter
/// folder; `load` loads the base in a stage's storage (`None`: the default one); a stage
/// without a price costs its latency at `usd_per_hour`. `on_stage` sees each stage's
/// outcomes as they are measured.
pub fn collect<B: QuantBackend, E: Into<BoxError>>(
    cascade: &Cascade,
    adapters: &[Option<PathBuf>],
    task: &EvalTask,
    usd_per_hour: Option<f64>,
    timeout: Duration,
    mut load: impl FnMut(Option<&str>) -> Result<Pretrained<B>, E>,
    mut on_stage: impl FnMut(&StageOutcomes),
) -> Result<Vec<StageOutcomes>, EvalError> {
    let mut out: Vec<Option<StageOutcomes>> = vec![None; cascade.stages.len()];
    let mut on_answers = |i: usize, stage: &Stage, client: &Client, model: &str| {
        let table = answers(client, stage, model, task, usd_per_hour)?;
        on_stage(&table);
        out[i] = Some(table);
        Ok::<_, EvalError>(())
    };
    for (i, stage) in cascade.stages.iter().enumerate() {
        let (Some(url), Some(model)) = (&stage.url, &stage.model) else {
            continue;
        };
        let key = stage.api_key().map_err(|m| EvalError::Cascade {
            path: PathBuf::from(url),
            message: m,
        })?;
        on_answers(i, stage, &Client::new(url, key, timeout), model)?;
    }
    let mut storages: Vec<Option<&str>> = Vec::new();
    for s in cascade.stages.iter().filter(|s| s.url.is_none()) {
        if !storages.contains(&s.quant.as_deref()) {
            storages.push(s.quant.as_deref());
        }
    }
    for storage in storages {
        let here: Vec<usize> = (0..cascade.stages.len())
            .filter(|&i| {
                let s = &cascade.stages[i];
                s.url.is_none() && s.quant.as_deref() == storage
            })
            .collect();
        let registered: Vec<Adapter> = here
            .iter()
            .filter_map(|&i| {
                Some(Adapter {
                    name: adapter_name(i),
                    dir: Some(adapters.get(i)?.clone()?),
                    version: None,
                })
            })
            .collect();
        let base = load(storage).map_err(|e| EvalError::Load(e.into()))?;
        let server = serve_in_process(base, &registered)?;
        let client = Client::new(server.url(), None, timeout);
        for &i in &here {
            let stage = &cascade.stages[i];
            let model = if registered.iter().any(|a| a.name == adapter_name(i)) {
                adapter_name(i)
            } else {
                BASE.to_string()
            };
            on_answers(i, stage, &client, &model)?;
        }
        server.stop().map_err(|source| EvalError::InProcess {
            doing: "stopping the in-process server",
            source,
        })?;
    }
    Ok(out.into_iter().flatten().collect())
}

/// `stage`'s answers to `task`'s examples, asking `client` for `model`.
fn answers(
    client: &Client,
    stage: &Stage,
    model: &str,
    task: &EvalTask,
    usd_per_hour: Option<f64>,
) -> Result<StageOutcomes, EvalError> {
    let prompts = few_shot(task, stage.shots)?;
    // One unmeasured request: loading the adapter belongs to no example.
    if let Some(first) = prompts.items.first() {
        let _ = client.stream_completion(&json!({
            "model": model, "prompt": first.prompt, "max_tokens": 1,
        }));
    }
    let outcomes = prompts
        .items
        .iter()
        .enumerate()
        .map(|(k, item)| {
            let body = json!({
                "model": model,
                "prompt": item.prompt,
                "max_tokens": task.max_tokens,
                "stop": task.stop,
            });
            let mut o = answer(client, stage, body, k as u64, usd_per_hour);
            o.right = o.error.is_none() && metric::is_right(&o.answer, &item.expected);
            o
        })
        .collect();
    Ok(StageOutcomes {
        stage: stage.name.clone(),
        outcomes,
    })
}

/// The name stage `i`'s adapter is registered under.
fn adapter_name(i: usize) -> String {
    format!("stage{i}")
}

/// Stage `stage`'s answer to `body` (example `k`, which seeds its samples): one request, or
/// its self-consistency vote over several.
fn answer(
    client: &Client,
    stage: &Stage,
    mut body: Value,
    k: u64,
    usd_per_hour: Option<f64>,
) -> Outcome {
    let (decoding, samples) = match stage.decoding {
        StageDecoding::One(d) => (d, 1),
        StageDecoding::SelfConsistency(n) => (Decoding::Sample, n),
    };
    // Beam search returns no log-probabilities.
    if !matches!(decoding, Decoding::Beam(_)) {
        body["logprobs"] = json!(TOP_LOGPROBS);
    }
    let mut answers: Vec<Streamed> = Vec::with_capacity(samples);
    let mut cost = 0.0;
    for j in 0..samples as u64 {
        let mut b = body.clone();
        if let (Some(b), Some(f)) = (
            b.as_object_mut(),
            decoding.fields(k * samples as u64 + j).as_object(),
        ) {
            b.extend(f.clone());
        }
        let start = std::time::Instant::now();
        match client.stream_completion(&b) {
            Ok(s) => {
                cost += match (stage.price, usd_per_hour) {
                    (Some(p), _) => p.cost(s.prompt_tokens.unwrap_or(0), s.tokens),
                    (None, Some(h)) => s.latency * h / 3600.0,
                    (None, None) => 0.0,
                };
                answers.push(s);
            }
            Err(e) => {
                // A failure costs the time it took, where time is the price.
                if stage.price.is_none() {
                    cost += start.elapsed().as_secs_f64() * usd_per_hour.unwrap_or(0.0) / 3600.0;
                }
                return Outcome {
                    answer: String::new(),
                    right: false,
                    features: vec![None; NAMES.len()],
                    cost,
                    error: Some(e.to_string()),
                };
            }
        }
    }
    let texts: Vec<String> = answers.iter().map(|s| s.text.clone()).collect();
    let (chosen, agreement) = if samples > 1 { vote(&texts) } else { (0, 1.0) };
    let s = &answers[chosen];
    let features = Features::of(
        &s.logprobs,
        s.tokens,
        s.prompt_tokens.unwrap_or(0),
        s.finish_reason.as_deref() == Some("stop"),
        agreement,
    );
    Outcome {
        answer: s.text.clone(),
        right: false,
        features: features
            .vector()
            .into_iter()
            .map(|v| v.is_finite().then_some(v))
            .collect(),
        cost,
        error: None,
    }
}
