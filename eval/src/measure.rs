//! One measurement: a task's examples sent to a server for one model (the base or an adapter)
//! with one decoding at one concurrency, each answer scored and timed, summed up as a report
//! row with the cost that the measured throughput implies at a given hourly price.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::client::{Client, ClientError, Streamed};
use crate::load_bench::percentile;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::batch_prompting::judge;
use crate::metric::{self, Score};
use crate::task::{EvalTask, Expected, Item, Metric, Prompting};

/// How answers are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoding {
    /// The most likely token each step.
    Greedy,
    /// Temperature 0.7 with top-p 0.95, seeded by the example's index (repeatable).
    Sample,
    /// Beam search with N beams (vLLM's `use_beam_search`, `best_of`).
    Beam(usize),
}

impl Decoding {
    /// The request fields that select it, `seed` for sampling.
    pub fn fields(self, seed: u64) -> Value {
        match self {
            Self::Greedy => json!({"temperature": 0.0}),
            Self::Sample => json!({"temperature": 0.7, "top_p": 0.95, "seed": seed}),
            Self::Beam(n) => json!({"temperature": 0.0, "use_beam_search": true, "best_of": n}),
        }
    }
}

impl FromStr for Decoding {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "greedy" => Ok(Self::Greedy),
            "sample" => Ok(Self::Sample),
            _ => s
                .strip_prefix("beam")
                .and_then(|n| n.parse().ok())
                .filter(|n| (2..=16).contains(n))
                .map(Self::Beam)
                .ok_or_else(|| {
                    format!("expected greedy, sample or beamN (N in 2..=16), got {s:?}")
                }),
        }
    }
}

impl std::fmt::Display for Decoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Greedy => f.write_str("greedy"),
            Self::Sample => f.write_str("sample"),
            Self::Beam(n) => write!(f, "beam{n}"),
        }
    }
}

/// Every example's outcome, in order, and the wall time of the whole pass.
#[derive(Debug)]
pub struct Pass {
    /// The answer or why none came, per example.
    pub outcomes: Vec<Result<Streamed, ClientError>>,
    /// Seconds from the first request to the last answer.
    pub wall_s: f64,
}

/// Sends every example of `task` to `model` on the server, `concurrency` at a time.
pub fn run_pass(
    client: &Client,
    model: &str,
    task: &EvalTask,
    decoding: Decoding,
    concurrency: usize,
) -> Pass {
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(vec![None; task.items.len()]);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency.clamp(1, task.items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = task.items.get(i) else { break };
                let mut body = json!({
                    "model": model,
                    "prompt": item.prompt,
                    "max_tokens": task.max_tokens,
                    "stop": task.stop,
                });
                if let (Some(b), Some(f)) =
                    (body.as_object_mut(), decoding.fields(i as u64).as_object())
                {
                    b.extend(f.clone());
                }
                let outcome = client.stream_completion(&body);
                if let Ok(mut all) = outcomes.lock() {
                    all[i] = Some(outcome);
                }
            });
        }
    });
    let wall_s = start.elapsed().as_secs_f64();
    let outcomes = outcomes
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(ClientError::Failed("not sent".into()))))
        .collect();
    Pass { outcomes, wall_s }
}

/// One example's answer in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// What came back, and whether it was right.
    Answered {
        /// The generated text.
        answer: String,
        /// Scored right.
        right: bool,
    },
    /// Why nothing came back.
    Failed {
        /// The error or timeout.
        error: String,
    },
}

/// A report row: one model × quantization × decoding × concurrency on one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The task.
    pub task: String,
    /// `base` or the adapter's name.
    pub model: String,
    /// The base weights' storage (or `server`).
    pub quant: String,
    /// The decoding (`-` for perplexity).
    pub decoding: String,
    /// Requests in flight at once, at most one per example (`None` for perplexity, scored in
    /// process).
    pub concurrency: Option<usize>,
    /// How it was scored.
    pub metric: Metric,
    /// The score over the answers that came.
    pub score: Score,
    /// Examples (questions) sent.
    pub examples: usize,
    /// Questions whose request the server answered with an error.
    pub errors: usize,
    /// Questions whose request the server did not answer in time.
    pub timeouts: usize,
    /// The first error's message, if any.
    pub first_error: Option<String>,
    /// Timings over answered examples (absent for perplexity).
    pub timing: Option<Timing>,
    /// Cost at the given price (absent without a price).
    pub cost: Option<Cost>,
    /// How the prompts were built, when not as the task wrote them (few-shot, compressed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompting: Option<Prompting>,
    /// Every example's answer.
    pub answers: Vec<Answer>,
}

/// Latency and throughput of one pass.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Timing {
    /// Time to first token, median and 99th percentile, ms.
    pub ttft_p50_ms: f64,
    /// TTFT p99, ms.
    pub ttft_p99_ms: f64,
    /// Time per output token after the first, median, ms (none when every answer came in
    /// one piece, as beam search's do).
    pub tpot_p50_ms: Option<f64>,
    /// TPOT p99, ms.
    pub tpot_p99_ms: Option<f64>,
    /// End-to-end latency, median, s.
    pub latency_p50_s: f64,
    /// Latency p99, s.
    pub latency_p99_s: f64,
    /// Answered requests per second (questions, where a prompt asks several).
    pub requests_per_s: f64,
    /// Output tokens per second over all streams.
    pub tokens_per_s: f64,
    /// Output tokens of the answered requests.
    pub output_tokens: usize,
    /// Mean prompt tokens per answered request (per question, where a prompt asks several),
    /// as the server counted them (absent where it did not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<f64>,
}

/// What serving costs at a price per hour, from measured throughput.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Cost {
    /// The price given, USD per hour.
    pub usd_per_hour: f64,
    /// USD per million output tokens.
    pub usd_per_m_tokens: f64,
    /// USD per thousand requests.
    pub usd_per_k_requests: f64,
}

impl Cost {
    /// The cost of `timing` at `usd_per_hour`; `None` for no throughput.
    pub fn of(timing: &Timing, usd_per_hour: f64) -> Option<Self> {
        let per_s = usd_per_hour / 3600.0;
        (timing.tokens_per_s > 0.0 && timing.requests_per_s > 0.0).then(|| Self {
            usd_per_hour,
            usd_per_m_tokens: per_s / timing.tokens_per_s * 1e6,
            usd_per_k_requests: per_s / timing.requests_per_s * 1e3,
        })
    }
}

/// Which model, storage and decoding a row measures.
#[derive(Debug, Clone)]
pub struct Setting {
    /// `base` or the adapter's name.
    pub model: String,
    /// The base weights' storage.
    pub quant: String,
    /// The decoding.
    pub decoding: Decoding,
    /// Requests in flight.
    pub concurrency: usize,
}

/// The questions `item`'s prompt asks: several with batch prompting, else one.
fn questions(item: &Item) -> usize {
    match &item.expected {
        Expected::Batch { answers, .. } => answers.len(),
        _ => 1,
    }
}

/// Scores and times `pass` of `task` into a row. Counts, rates and token means are per
/// question: a batch-prompted request answers several, and each is scored on its own.
pub fn summarize(
    task: &EvalTask,
    setting: &Setting,
    pass: &Pass,
    usd_per_hour: Option<f64>,
) -> Row {
    let (mut errors, mut timeouts, mut right, mut scored) = (0, 0, 0, 0);
    let mut first_error = None;
    let (mut ttft, mut tpot, mut latency) = (Vec::new(), Vec::new(), Vec::new());
    let mut output_tokens = 0;
    let mut prompt_tokens = Some(0);
    let mut answers = Vec::with_capacity(pass.outcomes.len());
    for (item, outcome) in task.items.iter().zip(&pass.outcomes) {
        let questions = questions(item);
        match outcome {
            Ok(s) => {
                for (answer, ok) in judge(&s.text, &item.expected) {
                    scored += 1;
                    right += ok as usize;
                    answers.push(Answer::Answered { answer, right: ok });
                }
                ttft.push(s.ttft);
                tpot.extend(s.tpot);
                latency.push(s.latency);
                output_tokens += s.tokens;
                prompt_tokens = prompt_tokens.zip(s.prompt_tokens).map(|(a, b)| a + b);
            }
            Err(e) => {
                match e {
                    ClientError::Timeout(_) => timeouts += questions,
                    _ => errors += questions,
                }
                first_error.get_or_insert_with(|| e.to_string());
                for _ in 0..questions {
                    answers.push(Answer::Failed {
                        error: e.to_string(),
                    });
                }
            }
        }
    }
    let wall = pass.wall_s.max(1e-9);
    let timing = (scored > 0).then(|| Timing {
        ttft_p50_ms: percentile(&ttft, 50.0) * 1e3,
        ttft_p99_ms: percentile(&ttft, 99.0) * 1e3,
        tpot_p50_ms: (!tpot.is_empty()).then(|| percentile(&tpot, 50.0) * 1e3),
        tpot_p99_ms: (!tpot.is_empty()).then(|| percentile(&tpot, 99.0) * 1e3),
        latency_p50_s: percentile(&latency, 50.0),
        latency_p99_s: percentile(&latency, 99.0),
        requests_per_s: scored as f64 / wall,
        tokens_per_s: output_tokens as f64 / wall,
        output_tokens,
        prompt_tokens: prompt_tokens.map(|n| n as f64 / scored as f64),
    });
    Row {
        task: task.name.clone(),
        model: setting.model.clone(),
        quant: setting.quant.clone(),
        decoding: setting.decoding.to_string(),
        concurrency: Some(setting.concurrency.clamp(1, task.items.len().max(1))),
        metric: task.metric,
        score: metric::accuracy(right, scored),
        examples: task.items.iter().map(questions).sum(),
        errors,
        timeouts,
        first_error,
        // A pass with failures has no throughput worth pricing.
        cost: timing
            .as_ref()
            .zip(usd_per_hour)
            .filter(|_| errors + timeouts == 0)
            .and_then(|(t, p)| Cost::of(t, p)),
        timing,
        prompting: task.prompting,
        answers,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn decodings_parse_and_print_back() {
        for s in ["greedy", "sample", "beam4"] {
            assert_eq!(s.parse::<Decoding>().unwrap().to_string(), s);
        }
        assert!("beam1".parse::<Decoding>().is_err());
        assert!("nucleus".parse::<Decoding>().is_err());
    }

    #[test]
    fn failures_are_counted_apart_from_wrong_answers() {
        let task = EvalTask {
            name: "t".into(),
            about: String::new(),
            metric: Metric::ExactMatch,
            items: ["1", "2", "3", "4"]
                .map(|a| Item {
                    prompt: "q".into(),
                    expected: Expected::Answer(a.into()),
                })
                .to_vec(),
            max_tokens: 4,
            stop: vec![],
            train: vec![],
            prompting: None,
        };
        let answer = |text: &str| {
            Ok(Streamed {
                text: text.into(),
                finish_reason: Some("stop".into()),
                tokens: 2,
                ttft: 0.1,
                tpot: Some(0.05),
                latency: 0.15,
                cache: None,
                prompt_tokens: Some(7),
                logprobs: Vec::new(),
            })
        };
        let pass = Pass {
            outcomes: vec![
                answer(" 1"),
                answer(" 5"),
                Err(ClientError::Timeout(Duration::from_secs(1))),
                Err(ClientError::Status {
                    status: 500,
                    message: "boom".into(),
                }),
            ],
            wall_s: 2.0,
        };
        let setting = Setting {
            model: "base".into(),
            quant: "q8".into(),
            decoding: Decoding::Greedy,
            concurrency: 1,
        };
        let row = summarize(&task, &setting, &pass, Some(3.6));
        assert_eq!(row.score.value, Some(0.5), "one right of the two answered");
        assert_eq!((row.errors, row.timeouts), (1, 1));
        assert!(row.first_error.unwrap().contains("timed out"));
        let t = row.timing.unwrap();
        assert_eq!(
            (t.output_tokens, t.tokens_per_s, t.requests_per_s),
            (4, 2.0, 1.0)
        );
        assert_eq!(t.prompt_tokens, Some(7.0), "per answered request");
        assert!(row.cost.is_none(), "a pass with failures is not priced");
        let c = Cost::of(&t, 3.6).unwrap();
        // 3.6 USD/h is 0.001 USD/s: 2 tokens/s cost 500 USD per million, 1 request/s 1 USD per 1000.
        assert!((c.usd_per_m_tokens - 500.0).abs() < 1e-9);
        assert!((c.usd_per_k_requests - 1.0).abs() < 1e-9);
    }
}
