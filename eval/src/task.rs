//! Evaluation tasks: a held-out JSONL split and the metric that scores it. The bundled tasks
//! come registered; a user adds one with a small TOML file:
//!
//! ```toml
//! name = "capitals"
//! about = "name a country's capital"   # optional
//! metric = "exact_match"               # or "multiple_choice", "perplexity"
//! data = "capitals.jsonl"              # relative to this file
//! max_tokens = 16                      # optional: answer length (default 24)
//! stop = ["\n"]                        # optional: stop strings (default one newline)
//! train = "capitals-train.jsonl"       # optional: solved examples for `ft eval --shots`
//! ```
//!
//! Lines of `data` are `{"prompt", "completion"}` for exact match, `{"prompt", "choices",
//! "answer"}` (the index of the right choice) for multiple choice, and `{"text"}` for
//! perplexity.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tasks;

/// Answer tokens when a task does not say.
pub const DEFAULT_MAX_TOKENS: usize = 24;

/// How a task's answers are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// The generated answer equals the expected one after whitespace normalization.
    ExactMatch,
    /// The generated answer names the right one of the listed choices.
    MultipleChoice,
    /// exp(mean negative log-likelihood) of the reference text; needs the model in process.
    Perplexity,
}

impl Metric {
    /// Its name in reports and task files.
    pub fn name(self) -> &'static str {
        match self {
            Self::ExactMatch => "exact_match",
            Self::MultipleChoice => "multiple_choice",
            Self::Perplexity => "perplexity",
        }
    }

    /// Whether a larger value is better (accuracy) or worse (perplexity).
    pub fn higher_is_better(self) -> bool {
        self != Self::Perplexity
    }
}

/// What a held-out example expects.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Expected {
    /// The exact answer.
    Answer(String),
    /// The choices and the index of the right one.
    Choice {
        /// Every choice, as the model should write it.
        choices: Vec<String>,
        /// The right one.
        answer: usize,
    },
    /// A text whose likelihood is scored.
    Text(String),
    /// Several questions asked in one prompt ([`crate::batch_prompting`]): what each of
    /// them expects, in order, and the strings that end each answer.
    Batch {
        /// Each question's expected answer.
        answers: Vec<Expected>,
        /// The task's stop strings, which cut each answer.
        stop: Vec<String>,
    },
}

/// One held-out example.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    /// What the model is given (empty for perplexity).
    pub prompt: String,
    /// What it should produce.
    pub expected: Expected,
}

/// How a task's prompts were built from its examples as written: solved examples before each
/// one (few-shot), the fraction of the prompt's tokens kept by compression, and the questions
/// asked in one prompt (batch prompting).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prompting {
    /// Solved examples before each prompt.
    pub shots: usize,
    /// The fraction of the prompt's tokens compression was asked to keep (`None`: whole).
    pub rate: Option<f64>,
    /// Questions asked in one prompt.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub per_prompt: usize,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl std::fmt::Display for Prompting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-shot", self.shots)?;
        if let Some(r) = self.rate {
            write!(f, ", compressed to {r}")?;
        }
        if self.per_prompt > 1 {
            write!(f, ", {} questions a prompt", self.per_prompt)?;
        }
        Ok(())
    }
}

/// A task ready to run.
#[derive(Debug, Clone)]
pub struct EvalTask {
    /// Its name in reports.
    pub name: String,
    /// One line on what it asks.
    pub about: String,
    /// How answers are scored.
    pub metric: Metric,
    /// The held-out examples.
    pub items: Vec<Item>,
    /// Most tokens per answer.
    pub max_tokens: usize,
    /// Strings that end an answer.
    pub stop: Vec<String>,
    /// Solved examples few-shot prompts draw from (never the held-out ones).
    pub train: Vec<Item>,
    /// How the prompts were built, when not as written.
    pub prompting: Option<Prompting>,
}

impl Item {
    /// The prompt followed by its right answer: a solved example for a few-shot prompt
    /// (`None` for perplexity texts).
    pub fn solved(&self) -> Option<String> {
        let answer = match &self.expected {
            Expected::Answer(a) => a.clone(),
            Expected::Choice { choices, answer } => {
                let choice = choices.get(*answer)?;
                let gap = !self.prompt.ends_with(char::is_whitespace)
                    && !choice.starts_with(char::is_whitespace);
                format!("{}{choice}", if gap { " " } else { "" })
            }
            Expected::Text(_) | Expected::Batch { .. } => return None,
        };
        Some(format!("{}{answer}", self.prompt))
    }
}

/// A task file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    name: String,
    #[serde(default)]
    about: String,
    metric: Metric,
    data: PathBuf,
    max_tokens: Option<usize>,
    stop: Option<Vec<String>>,
    train: Option<PathBuf>,
}

/// A JSONL line, before its metric says which fields it needs (others, such as an id, are
/// ignored).
#[derive(Debug, Deserialize)]
struct Line {
    #[serde(default)]
    prompt: String,
    completion: Option<String>,
    choices: Option<Vec<String>>,
    answer: Option<usize>,
    text: Option<String>,
}

/// Why a task could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Neither a bundled task, one in a task folder, nor a TOML file.
    #[error("expected names among {known} or a task TOML file, got {got}")]
    Unknown {
        /// The names that exist.
        known: String,
        /// What was asked for.
        got: String,
    },
    /// A task file or its data is wrong; the message names the file (and line).
    #[error("{0}")]
    Invalid(String),
}

/// The bundled tasks, then the `*.toml` tasks of `dirs` (sorted by file name).
pub fn registered(dirs: &[PathBuf]) -> Result<Vec<EvalTask>, TaskError> {
    let mut out: Vec<EvalTask> = tasks::TASKS.iter().map(bundled).collect();
    for dir in dirs {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| TaskError::Invalid(format!("--task-dir {}: {e}", dir.display())))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for file in files {
            let task = load(&file)?;
            if out.iter().any(|t| t.name == task.name) {
                return Err(TaskError::Invalid(format!(
                    "{}: name: {:?} is already a task's name",
                    file.display(),
                    task.name
                )));
            }
            out.push(task);
        }
    }
    Ok(out)
}

/// The task `spec` names: a registered name, or the path of a task TOML file.
pub fn resolve(spec: &str, dirs: &[PathBuf]) -> Result<EvalTask, TaskError> {
    let known = registered(dirs)?;
    if let Some(t) = known.iter().find(|t| t.name == spec) {
        return Ok(t.clone());
    }
    let path = Path::new(spec);
    if path.extension().is_some_and(|x| x == "toml") {
        return load(path);
    }
    Err(TaskError::Unknown {
        known: known
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        got: spec.to_string(),
    })
}

/// A bundled task: exact match over its committed held-out split, one line per answer.
pub fn bundled(t: &tasks::Task) -> EvalTask {
    let items = |examples: Vec<tasks::Example>| {
        examples
            .into_iter()
            .map(|e| Item {
                prompt: e.prompt,
                expected: Expected::Answer(e.completion),
            })
            .collect()
    };
    EvalTask {
        name: t.name.to_string(),
        about: t.about.to_string(),
        metric: Metric::ExactMatch,
        items: items(t.test_examples()),
        max_tokens: DEFAULT_MAX_TOKENS,
        stop: vec!["\n".into()],
        train: items(t.train_examples()),
        prompting: None,
    }
}

/// Reads a task TOML file and its data.
pub fn load(file: &Path) -> Result<EvalTask, TaskError> {
    let at = |e: &dyn std::fmt::Display| TaskError::Invalid(format!("{}: {e}", file.display()));
    let text = std::fs::read_to_string(file).map_err(|e| at(&e))?;
    let spec: TaskFile = toml::from_str(&text).map_err(|e| at(&e))?;
    // The name becomes file names and Markdown links in the report.
    if spec.name.is_empty()
        || !spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(at(&format!(
            "name: {:?} must be letters, digits, '_' and '-'",
            spec.name
        )));
    }
    if spec.max_tokens == Some(0) {
        return Err(at(&"max_tokens: must be at least 1"));
    }
    let relative = |p: &Path| file.parent().map_or_else(|| p.to_path_buf(), |d| d.join(p));
    let items = examples(&relative(&spec.data), spec.metric, "data").map_err(|e| at(&e))?;
    let train = match &spec.train {
        Some(p) if spec.metric == Metric::Perplexity => {
            return Err(at(&format!(
                "train: {}: a perplexity task has no answers to show",
                p.display()
            )))
        }
        Some(p) => examples(&relative(p), spec.metric, "train").map_err(|e| at(&e))?,
        None => Vec::new(),
    };
    Ok(EvalTask {
        name: spec.name,
        about: spec.about,
        metric: spec.metric,
        items,
        max_tokens: spec.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        stop: spec.stop.unwrap_or_else(|| vec!["\n".into()]),
        train,
        prompting: None,
    })
}

/// The examples of the JSONL file `path` (the task file's field `field`) under `metric`; an
/// error names the field, the file and the line.
fn examples(path: &Path, metric: Metric, field: &str) -> Result<Vec<Item>, String> {
    let jsonl =
        std::fs::read_to_string(path).map_err(|e| format!("{field} {}: {e}", path.display()))?;
    let mut items = Vec::new();
    for (i, raw) in jsonl.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line_at = |e: &dyn std::fmt::Display| format!("{} line {}: {e}", path.display(), i + 1);
        let line: Line = serde_json::from_str(raw).map_err(|e| line_at(&e))?;
        items.push(item(metric, line).map_err(|e| line_at(&e))?);
    }
    if items.is_empty() {
        return Err(format!("{field} {}: no examples", path.display()));
    }
    Ok(items)
}

/// The example a line holds under `metric`, or which field it lacks.
fn item(metric: Metric, line: Line) -> Result<Item, TaskError> {
    let missing = |what: &str| TaskError::Invalid(what.into());
    let expected = match metric {
        Metric::ExactMatch => Expected::Answer(
            line.completion
                .ok_or_else(|| missing("exact_match needs \"prompt\" and \"completion\""))?,
        ),
        Metric::MultipleChoice => {
            let (Some(choices), Some(answer)) = (line.choices, line.answer) else {
                return Err(missing(
                    "multiple_choice needs \"prompt\", \"choices\" and \"answer\" (an index)",
                ));
            };
            if answer >= choices.len() {
                return Err(TaskError::Invalid(format!(
                    "answer: {answer} is not an index of the {} choices",
                    choices.len()
                )));
            }
            Expected::Choice { choices, answer }
        }
        Metric::Perplexity => Expected::Text(
            line.text
                .ok_or_else(|| missing("perplexity needs \"text\""))?,
        ),
    };
    if metric != Metric::Perplexity && line.prompt.is_empty() {
        return Err(TaskError::Invalid(format!(
            "{} needs a non-empty \"prompt\"",
            metric.name()
        )));
    }
    Ok(Item {
        prompt: line.prompt,
        expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn bundled_tasks_come_registered_and_files_add_more() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "mc.jsonl",
            "{\"prompt\":\"2+2=\",\"choices\":[\"3\",\"4\"],\"answer\":1}\n",
        );
        write(
            dir.path(),
            "mc.toml",
            "name = \"arith\"\nmetric = \"multiple_choice\"\ndata = \"mc.jsonl\"\nmax_tokens = 4\n",
        );
        let names: Vec<String> = registered(&[dir.path().into()])
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["dates", "units", "sort", "arith"]);
        let t = resolve("arith", &[dir.path().into()]).unwrap();
        assert_eq!(t.max_tokens, 4);
        assert_eq!(
            t.items[0].expected,
            Expected::Choice {
                choices: vec!["3".into(), "4".into()],
                answer: 1
            }
        );
        let by_path = dir.path().join("mc.toml");
        assert_eq!(
            resolve(by_path.to_str().unwrap(), &[]).unwrap().name,
            "arith"
        );
        assert_eq!(resolve("dates", &[]).unwrap().items.len(), tasks::TEST);
        let err = resolve("poetry", &[]).unwrap_err().to_string();
        assert!(err.contains("names among dates, units, sort"), "{err}");
    }

    #[test]
    fn a_bad_line_is_named_with_its_file_and_number() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "d.jsonl",
            "{\"prompt\":\"a\",\"choices\":[\"x\"],\"answer\":0}\n{\"prompt\":\"b\",\"choices\":[\"x\"],\"answer\":3}\n",
        );
        let toml = write(
            dir.path(),
            "t.toml",
            "name = \"t\"\nmetric = \"multiple_choice\"\ndata = \"d.jsonl\"\n",
        );
        let err = load(&toml).unwrap_err().to_string();
        assert!(err.contains("d.jsonl line 2: answer: 3"), "{err}");
        let toml = write(
            dir.path(),
            "u.toml",
            "name = \"u\"\nmetric = \"bleu\"\ndata = \"d.jsonl\"\n",
        );
        let err = load(&toml).unwrap_err().to_string();
        assert!(err.contains("u.toml") && err.contains("bleu"), "{err}");
    }
}
