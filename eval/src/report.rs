//! The eval report: `report.md` (one table per task, the best adapter per task, each adapter
//! against the base), `report.json` (every row and answer) and, per task, a plot of quality
//! against latency and one of throughput against concurrency, as SVG and PNG.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{write_atomic, EvalError};
use crate::measure::Row;
use crate::plot::{Chart, Key, Lines, Scatter};
use crate::task::{EvalTask, Metric};

/// The name rows of the base model carry.
pub const BASE: &str = "base";

/// Everything one `ft eval` measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    /// The base model.
    pub base_model: String,
    /// Where answers came from: `in process` or the server's URL.
    pub served_by: String,
    /// When (UTC, RFC 3339).
    pub date: String,
    /// The hourly price costs are computed at.
    pub usd_per_hour: Option<f64>,
    /// The tasks, in order: name, metric, what it asks.
    pub tasks: Vec<TaskInfo>,
    /// Every measurement.
    pub rows: Vec<Row>,
}

/// A task as the report names it.
#[derive(Debug, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Its name.
    pub name: String,
    /// One line on what it asks.
    pub about: String,
    /// How it is scored.
    pub metric: Metric,
}

impl TaskInfo {
    /// The report's entry for `task`.
    pub fn of(task: &EvalTask) -> Self {
        Self {
            name: task.name.clone(),
            about: task.about.clone(),
            metric: task.metric,
        }
    }
}

/// The largest loss of score (2 points of accuracy) a compressed prompt may cost and still
/// count as keeping the whole prompt's quality.
pub const COMPRESSION_TOLERANCE: f64 = 0.02;

/// How a row's prompts were built.
fn prompt(r: &Row) -> String {
    r.prompting
        .map_or_else(|| "as written".into(), |p| p.to_string())
}

/// A row's prompt and output tokens per answered question (absent where the server did not
/// count prompt tokens).
fn per_question(r: &Row) -> Option<(f64, f64)> {
    let t = r.timing?;
    let questions = r.score.scored.max(1) as f64;
    Some((t.prompt_tokens?, t.output_tokens as f64 / questions))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

impl Report {
    /// The rows of `task`.
    fn rows_of<'a, 'b>(&'a self, task: &'b str) -> impl Iterator<Item = &'a Row> + use<'a, 'b> {
        self.rows.iter().filter(move |r| r.task == task)
    }

    /// The best adapter's row for `task`: best score (ties to lower latency) among rows that
    /// answered every example, adapters before the base.
    pub fn best(&self, task: &TaskInfo) -> Option<&Row> {
        let scored = || {
            self.rows_of(&task.name)
                .filter(|r| r.score.value.is_some() && r.errors + r.timeouts == 0)
        };
        let adapters: Vec<&Row> = scored().filter(|r| r.model != BASE).collect();
        let pool = if adapters.is_empty() {
            scored().collect()
        } else {
            adapters
        };
        let sign = if task.metric.higher_is_better() {
            1.0
        } else {
            -1.0
        };
        let latency = |r: &Row| r.timing.map_or(0.0, |t| t.latency_p50_s);
        pool.into_iter().max_by(|a, b| {
            let (sa, sb) = (
                sign * a.score.value.unwrap_or(0.0),
                sign * b.score.value.unwrap_or(0.0),
            );
            sa.total_cmp(&sb).then(latency(b).total_cmp(&latency(a)))
        })
    }

    /// The report as Markdown; plots are linked as `dir`-relative SVG files.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# ft eval report\n\nBase model `{}`, answers served {}, {}.{}\n",
            self.base_model,
            self.served_by,
            &self.date[..10.min(self.date.len())],
            self.usd_per_hour.map_or_else(
                || " No price given: no costs.".into(),
                |p| format!(" Costs at {p} USD per hour, from the measured throughput.")
            )
        );
        for task in &self.tasks {
            let _ = write!(
                md,
                "\n## {} ({}{})\n\n",
                task.name,
                task.metric.name(),
                if task.about.is_empty() {
                    String::new()
                } else {
                    format!(": {}", task.about)
                }
            );
            md += &self.task_table(task);
            if let Some(best) = self.best(task) {
                let _ = writeln!(
                    md,
                    "\nBest: **{}** ({}, {}): {} {}{}.",
                    best.model,
                    best.quant,
                    best.decoding,
                    task.metric.name(),
                    opt(best.score.value, 3),
                    best.timing.map_or_else(String::new, |t| format!(
                        " at {:.2} s median latency",
                        t.latency_p50_s
                    ))
                );
            }
            md += &self.deltas(task);
            md += &self.compression(task);
            md += &self.batch_prompting(task);
            if self.rows_of(&task.name).any(|r| r.timing.is_some()) {
                let _ = write!(
                    md,
                    "\n![{0}: quality against latency]({0}-quality-latency.svg)\n![{0}: throughput against concurrency]({0}-throughput.svg)\n",
                    task.name
                );
            }
        }
        md
    }

    fn task_table(&self, task: &TaskInfo) -> String {
        let mut t = format!(
            "| model | quant | decoding | streams | {} | scored | errors | timeouts | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | latency p50 s | latency p99 s | req/s | output tok/s | USD / 1M tok | USD / 1k req | prompt | prompt tok/req |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
            task.metric.name()
        );
        for r in self.rows_of(&task.name) {
            let tm = r.timing;
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.model,
                r.quant,
                r.decoding,
                r.concurrency.map_or_else(|| "-".into(), |c| c.to_string()),
                opt(r.score.value, if r.metric.higher_is_better() { 3 } else { 4 }),
                r.score.scored,
                r.errors,
                r.timeouts,
                opt(tm.map(|t| t.ttft_p50_ms), 0),
                opt(tm.map(|t| t.ttft_p99_ms), 0),
                opt(tm.and_then(|t| t.tpot_p50_ms), 1),
                opt(tm.map(|t| t.latency_p50_s), 2),
                opt(tm.map(|t| t.latency_p99_s), 2),
                opt(tm.map(|t| t.requests_per_s), 2),
                opt(tm.map(|t| t.tokens_per_s), 1),
                opt(r.cost.map(|c| c.usd_per_m_tokens), 3),
                opt(r.cost.map(|c| c.usd_per_k_requests), 4),
                prompt(r),
                opt(tm.and_then(|t| t.prompt_tokens), 1),
            );
        }
        if let Some(e) = self
            .rows_of(&task.name)
            .find_map(|r| r.first_error.as_ref().map(|e| (r, e)))
        {
            let _ = writeln!(
                t,
                "\nNot answered ({} {} {}): {}",
                e.0.model, e.0.quant, e.0.decoding, e.1
            );
        }
        t
    }

    /// Each adapter row against the base row with the same quantization, decoding and
    /// concurrency.
    fn deltas(&self, task: &TaskInfo) -> String {
        let mut t = String::new();
        for r in self.rows_of(&task.name).filter(|r| r.model != BASE) {
            let Some(base) = self.rows_of(&task.name).find(|b| {
                b.model == BASE
                    && b.quant == r.quant
                    && b.decoding == r.decoding
                    && b.concurrency == r.concurrency
                    && b.prompting == r.prompting
            }) else {
                continue;
            };
            if t.is_empty() {
                t = format!(
                    "\nAgainst the base (same quant, decoding, streams and prompt):\n\n| model | quant | decoding | streams | {} change | latency p50 ratio | tok/s ratio | prompt |\n|---|---|---|---|---|---|---|---|\n",
                    task.metric.name()
                );
            }
            let ratio = |f: fn(&crate::measure::Timing) -> f64| match (r.timing, base.timing) {
                (Some(a), Some(b)) if f(&b) > 0.0 => format!("{:.2}x", f(&a) / f(&b)),
                _ => "-".into(),
            };
            // Scores over different answered examples do not compare.
            let complete = r.errors + r.timeouts + base.errors + base.timeouts == 0;
            let change = match (r.score.value, base.score.value) {
                (Some(a), Some(b)) if complete => format!("{:+.3}", a - b),
                _ => "-".into(),
            };
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.model,
                r.quant,
                r.decoding,
                r.concurrency.map_or_else(|| "-".into(), |c| c.to_string()),
                change,
                ratio(|t| t.latency_p50_s),
                ratio(|t| t.tokens_per_s),
                prompt(r),
            );
        }
        t
    }

    /// Each compressed-prompt row against the same setting with the whole prompt: the score
    /// given up for the prompt tokens saved, and per setting the lowest rate that loses at
    /// most [`COMPRESSION_TOLERANCE`].
    fn compression(&self, task: &TaskInfo) -> String {
        let mut t = String::new();
        let mut lowest: Vec<(&Row, &Row)> = Vec::new();
        for r in self.rows_of(&task.name) {
            let Some(rate) = r.prompting.and_then(|p| p.rate) else {
                continue;
            };
            let Some(whole) = self.rows_of(&task.name).find(|w| {
                w.model == r.model
                    && w.quant == r.quant
                    && w.decoding == r.decoding
                    && w.concurrency == r.concurrency
                    && w.prompting
                        .is_some_and(|p| p.rate.is_none() && p.per_prompt == 1)
                    && w.prompting.map(|p| p.shots) == r.prompting.map(|p| p.shots)
            }) else {
                continue;
            };
            if t.is_empty() {
                t = format!(
                    "\nCompressed prompts against the whole prompt (same model, quant, decoding and streams):\n\n| model | quant | decoding | streams | prompt | prompt tok/req | of the whole | {} | change |\n|---|---|---|---|---|---|---|---|---|\n",
                    task.metric.name()
                );
            }
            let tokens = |row: &Row| row.timing.and_then(|t| t.prompt_tokens);
            let kept = match (tokens(r), tokens(whole)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            };
            let change = r.score.value.zip(whole.score.value).map(|(a, b)| a - b);
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.model,
                r.quant,
                r.decoding,
                r.concurrency.map_or_else(|| "-".into(), |c| c.to_string()),
                prompt(r),
                opt(tokens(r), 1),
                kept,
                opt(r.score.value, 3),
                change.map_or_else(|| "-".into(), |c| format!("{c:+.3}")),
            );
            let complete = r.errors + r.timeouts + whole.errors + whole.timeouts == 0;
            let close = complete
                && change.is_some_and(|c| {
                    if task.metric.higher_is_better() {
                        c >= -COMPRESSION_TOLERANCE
                    } else {
                        c <= COMPRESSION_TOLERANCE
                    }
                });
            if close {
                match lowest.iter_mut().find(|(w, _)| std::ptr::eq(*w, whole)) {
                    Some(entry) if entry.1.prompting.and_then(|p| p.rate) > Some(rate) => {
                        entry.1 = r
                    }
                    Some(_) => {}
                    None => lowest.push((whole, r)),
                }
            }
        }
        for (whole, r) in lowest {
            let _ = writeln!(
                t,
                "\n{} {} {} x{}: within {COMPRESSION_TOLERANCE} of the whole prompt's {} {} down to {} ({} prompt tokens per request against {}).",
                r.model,
                r.quant,
                r.decoding,
                r.concurrency.map_or_else(|| "-".into(), |c| c.to_string()),
                task.metric.name(),
                opt(whole.score.value, 3),
                prompt(r),
                opt(r.timing.and_then(|t| t.prompt_tokens), 1),
                opt(whole.timing.and_then(|t| t.prompt_tokens), 1),
            );
        }
        t
    }

    /// Each batch-prompted row against the same setting with one question a prompt (and
    /// the same demonstrations): the score the grouping costs for the tokens it saves, per
    /// question.
    fn batch_prompting(&self, task: &TaskInfo) -> String {
        let shots = |r: &Row| r.prompting.map_or(0, |p| p.shots);
        let per_prompt = |r: &Row| r.prompting.map_or(1, |p| p.per_prompt);
        let mut t = String::new();
        for r in self.rows_of(&task.name).filter(|r| per_prompt(r) > 1) {
            let Some(one) = self.rows_of(&task.name).find(|w| {
                w.model == r.model
                    && w.quant == r.quant
                    && w.decoding == r.decoding
                    && w.concurrency == r.concurrency
                    && shots(w) == shots(r)
                    && per_prompt(w) == 1
                    && w.prompting.is_none_or(|p| p.rate.is_none())
            }) else {
                continue;
            };
            if t.is_empty() {
                t = format!(
                    "\nBatch prompting against one question a prompt (same model, quant, decoding, streams and demonstrations; tokens per question):\n\n| model | quant | decoding | streams | questions a prompt | {} | change | prompt tok | output tok | all tok | of one a prompt |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
                    task.metric.name()
                );
            }
            let change = r.score.value.zip(one.score.value).map(|(a, b)| a - b);
            let complete = r.errors + r.timeouts + one.errors + one.timeouts == 0;
            let (tokens, tokens_one) = (per_question(r), per_question(one));
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.model,
                r.quant,
                r.decoding,
                r.concurrency.map_or_else(|| "-".into(), |c| c.to_string()),
                per_prompt(r),
                opt(r.score.value, 3),
                change
                    .filter(|_| complete)
                    .map_or_else(|| "-".into(), |c| format!("{c:+.3}")),
                opt(tokens.map(|t| t.0), 1),
                opt(tokens.map(|t| t.1), 1),
                opt(tokens.map(|t| t.0 + t.1), 1),
                match (tokens, tokens_one) {
                    (Some(a), Some(b)) if b.0 + b.1 > 0.0 => {
                        format!("{:.2}x", (a.0 + a.1) / (b.0 + b.1))
                    }
                    _ => "-".into(),
                },
            );
        }
        t
    }

    /// The report `write` left in `dir` (its `report.json`), to draw again.
    pub fn read(dir: &Path) -> Result<Self, EvalError> {
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EvalError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| EvalError::Report {
            path: path.clone(),
            message: e.to_string(),
        })
    }

    /// Writes `report.md`, `report.json` and the plots into `dir`; returns the files written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
        let mut files = self.draw(dir)?;
        let json = dir.join("report.json");
        write_atomic(&json, serde_json::to_string_pretty(self)?.as_bytes())?;
        files.push(json);
        Ok(files)
    }

    /// Writes `report.md` and the plots into `dir` (not `report.json`, which a report read
    /// back leaves as it was); returns the files written.
    pub fn draw(&self, dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
        let mut files = Vec::new();
        for task in &self.tasks {
            files.extend(self.plots(task, dir)?);
        }
        let md = dir.join("report.md");
        write_atomic(&md, self.markdown().as_bytes())?;
        files.push(md);
        Ok(files)
    }

    /// Quality against median latency at the lowest concurrency (one point per model ×
    /// quant × decoding), and output tokens/s against concurrency (one line for each).
    fn plots(&self, task: &TaskInfo, dir: &Path) -> Result<Vec<PathBuf>, EvalError> {
        let timed: Vec<&Row> = self
            .rows_of(&task.name)
            .filter(|r| r.timing.is_some())
            .collect();
        let Some(lowest) = timed.iter().filter_map(|r| r.concurrency).min() else {
            return Ok(Vec::new());
        };
        let key = |r: &Row| Key {
            model: r.model.clone(),
            storage: r.quant.clone(),
            decoding: match r.prompting {
                Some(p) => format!("{}, {p}", r.decoding),
                None => r.decoding.clone(),
            },
        };
        let headings = ["model", "storage", "decoding"];
        let scatter = Scatter {
            title: format!("{}: {} against latency", task.name, task.metric.name()),
            x_desc: format!("median latency (s), {lowest} stream(s)"),
            y_desc: task.metric.name().into(),
            points: timed
                .iter()
                .filter(|r| r.concurrency == Some(lowest))
                .filter_map(|r| Some((r.timing?.latency_p50_s, r.score.value?, key(r))))
                .collect(),
            headings,
            x_from_zero: true,
        };
        // In the order of the rows, so the legend lists the base first.
        let mut keys: Vec<Key> = Vec::new();
        for r in &timed {
            if !keys.contains(&key(r)) {
                keys.push(key(r));
            }
        }
        let lines = Lines {
            title: format!("{}: throughput against concurrency", task.name),
            x_desc: "concurrent streams".into(),
            y_desc: "output tokens/s".into(),
            series: keys
                .into_iter()
                .map(|k| {
                    let points = timed
                        .iter()
                        .filter(|r| key(r) == k)
                        .filter_map(|r| Some((r.concurrency? as f64, r.timing?.tokens_per_s)))
                        .collect();
                    (k, points)
                })
                .collect(),
            headings,
        };
        let quality = dir.join(format!("{}-quality-latency", task.name));
        let throughput = dir.join(format!("{}-throughput", task.name));
        scatter.save(&quality)?;
        lines.save(&throughput)?;
        Ok(["svg", "png"]
            .into_iter()
            .flat_map(|x| [quality.with_extension(x), throughput.with_extension(x)])
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::Timing;
    use crate::metric::Score;
    use crate::task::Prompting;

    fn row(model: &str, metric: Metric, value: f64, latency: f64) -> Row {
        Row {
            task: "t".into(),
            model: model.into(),
            quant: "q8".into(),
            decoding: "greedy".into(),
            concurrency: Some(1),
            metric,
            score: Score {
                value: Some(value),
                scored: 10,
                right: 0,
            },
            examples: 10,
            errors: 0,
            timeouts: 0,
            first_error: None,
            timing: Some(Timing {
                ttft_p50_ms: 10.0,
                ttft_p99_ms: 20.0,
                tpot_p50_ms: Some(5.0),
                tpot_p99_ms: Some(6.0),
                latency_p50_s: latency,
                latency_p99_s: latency,
                requests_per_s: 1.0 / latency,
                tokens_per_s: 8.0 / latency,
                output_tokens: 80,
                prompt_tokens: Some(100.0),
            }),
            cost: None,
            prompting: None,
            answers: Vec::new(),
        }
    }

    fn report(metric: Metric, rows: Vec<Row>) -> (Report, TaskInfo) {
        let task = TaskInfo {
            name: "t".into(),
            about: String::new(),
            metric,
        };
        let r = Report {
            base_model: "m".into(),
            served_by: "in process".into(),
            date: "2026-11-26T00:00:00Z".into(),
            usd_per_hour: None,
            tasks: vec![TaskInfo {
                name: "t".into(),
                about: String::new(),
                metric,
            }],
            rows,
        };
        (r, task)
    }

    #[test]
    fn the_best_adapter_has_the_best_score_then_the_lowest_latency() {
        let (r, t) = report(
            Metric::ExactMatch,
            vec![
                row(BASE, Metric::ExactMatch, 0.99, 0.1),
                row("a", Metric::ExactMatch, 0.8, 0.5),
                row("b", Metric::ExactMatch, 0.8, 0.3),
                row("c", Metric::ExactMatch, 0.7, 0.1),
            ],
        );
        assert_eq!(
            r.best(&t).unwrap().model,
            "b",
            "adapters only, ties to latency"
        );
        let (r, t) = report(
            Metric::Perplexity,
            vec![
                row("a", Metric::Perplexity, 3.0, 1.0),
                row("b", Metric::Perplexity, 2.5, 1.0),
            ],
        );
        assert_eq!(r.best(&t).unwrap().model, "b", "lower perplexity is better");
        let (r, t) = report(
            Metric::ExactMatch,
            vec![row(BASE, Metric::ExactMatch, 0.5, 0.1)],
        );
        assert_eq!(
            r.best(&t).unwrap().model,
            BASE,
            "the base when no adapter ran"
        );
    }

    #[test]
    fn adapters_are_compared_with_the_base_in_the_same_setting() {
        let (r, _) = report(
            Metric::ExactMatch,
            vec![
                row(BASE, Metric::ExactMatch, 0.25, 0.2),
                row("a", Metric::ExactMatch, 0.75, 0.3),
            ],
        );
        let md = r.markdown();
        assert!(
            md.contains("| a | q8 | greedy | 1 | +0.500 | 1.50x | 0.67x | as written |"),
            "{md}"
        );
        assert!(
            md.contains("| base | q8 | greedy | 1 | 0.250 | 10 | 0 | 0 | 10 | 20 | 5.0 | 0.20 |"),
            "{md}"
        );
    }

    #[test]
    fn compressed_prompts_are_compared_with_the_whole_and_the_lowest_close_rate_named() {
        let with = |rate: Option<f64>, value: f64, tokens: f64| {
            let mut r = row(BASE, Metric::ExactMatch, value, 0.2);
            r.prompting = Some(Prompting {
                shots: 4,
                rate,
                per_prompt: 1,
            });
            if let Some(t) = r.timing.as_mut() {
                t.prompt_tokens = Some(tokens);
            }
            r
        };
        let (r, _) = report(
            Metric::ExactMatch,
            vec![
                with(None, 0.60, 120.0),
                with(Some(0.8), 0.61, 96.0),
                with(Some(0.5), 0.59, 60.0),
                with(Some(0.3), 0.40, 36.0),
            ],
        );
        let md = r.markdown();
        for needle in [
            "| base | q8 | greedy | 1 | 4-shot, compressed to 0.5 | 60.0 | 0.50 | 0.590 | -0.010 |",
            "| base | q8 | greedy | 1 | 4-shot, compressed to 0.3 | 36.0 | 0.30 | 0.400 | -0.200 |",
            "base q8 greedy x1: within 0.02 of the whole prompt's exact_match 0.600 down to 4-shot, compressed to 0.5 (60.0 prompt tokens per request against 120.0).",
        ] {
            assert!(md.contains(needle), "{needle:?} not in\n{md}");
        }
    }
}
