//! The errors of ft-eval: each names the file, task or example at fault; those of an
//! [`Evaluation`](crate::evaluation::Evaluation) name the `ft eval` flag whose value is.

use std::path::{Path, PathBuf};

use ft_adapters::AdapterError;

use crate::client::ClientError;
use crate::task::TaskError;

/// An error of the caller's model loader or of a library below, kept with its causes.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading or writing a file failed.
    #[error("{}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A chart could not be drawn or encoded.
    #[error("drawing {path}: {message}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A task file or a task name is wrong.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// An example does not fit the model.
    #[error("{0}")]
    Example(String),
    /// The model or its tokenizer failed.
    #[error(transparent)]
    Model(#[from] ft_model::ModelError),
    /// A report's JSON could not be read back.
    #[error("{}: not a report written by `ft eval`: {message}", path.display())]
    Report {
        /// The `report.json`.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A report could not be serialized.
    #[error("serializing the report: {0}")]
    Json(#[from] serde_json::Error),
    /// Loading the base model failed (the caller's loader said why).
    #[error(transparent)]
    Load(BoxError),
    /// An adapter could not be attached to the model or registered with the engine.
    #[error("--adapters {name}: {}", dir.display())]
    Adapter {
        /// The adapter.
        name: String,
        /// Its PEFT folder.
        dir: PathBuf,
        /// Why.
        source: BoxError,
    },
    /// The running server did not list its models.
    #[error("--server {url}: {error}")]
    Server {
        /// The server.
        url: String,
        /// What the request got.
        error: ClientError,
    },
    /// The running server does not serve an adapter to evaluate.
    #[error(
        "--adapters {adapter}: the server at {url} does not list it (it lists {})",
        listed.join(", ")
    )]
    NotListed {
        /// The adapter.
        adapter: String,
        /// The server.
        url: String,
        /// The models it lists.
        listed: Vec<String>,
    },
    /// A perplexity task sent to a running server: perplexity needs the model in process.
    #[error("--tasks {task}: perplexity is scored with the model in process; drop --server")]
    PerplexityNeedsModel {
        /// The task.
        task: String,
    },
    /// A perplexity text has fewer than the 2 tokens perplexity needs.
    #[error("--tasks {task}: example {example} has {tokens} token(s); perplexity needs 2 or more")]
    TooShort {
        /// The task.
        task: String,
        /// The example, from 1.
        example: usize,
        /// Its tokens.
        tokens: usize,
    },
    /// No cascade fits the budget.
    #[error(
        "--budget: {budget_per_k} USD per 1,000 requests is below the cheapest stage's \
         {cheapest_per_k:.6} on the development split"
    )]
    Budget {
        /// The budget, USD per 1,000 requests.
        budget_per_k: f64,
        /// The cheapest stage's mean cost, USD per 1,000 requests.
        cheapest_per_k: f64,
    },
    /// A server's Batch API failed a call.
    #[error("the Batch API: {0}")]
    Batch(String),
    /// A cascade file is wrong; the message names the field.
    #[error("{}: {message}", path.display())]
    Cascade {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Few-shot prompts asked of a task without enough solved examples.
    #[error(
        "--shots {shots}: task {task} has {have} solved example(s) to draw from{}",
        if *have == 0 { " (a task file names them with `train = \"FILE.jsonl\"`)" } else { "" }
    )]
    Shots {
        /// The task.
        task: String,
        /// Examples asked for.
        shots: usize,
        /// Examples the task has.
        have: usize,
    },
    /// The in-process server could not start or stop.
    #[error("{doing}")]
    InProcess {
        /// What failed: binding a port, starting or stopping.
        doing: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The adapter registry could not be opened.
    #[error("--registry {}", root.display())]
    Registry {
        /// Its folder.
        root: PathBuf,
        /// Why.
        source: AdapterError,
    },
    /// An adapter version's metrics could not be recorded.
    #[error("--registry: metrics of {name}:{version}")]
    Metrics {
        /// The adapter.
        name: String,
        /// Its version.
        version: u32,
        /// Why.
        source: AdapterError,
    },
    /// A peer engine's program could not be started.
    #[error("could not run {program}")]
    PeerSpawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A peer engine's run failed.
    #[error("{peer} run failed: {stderr}")]
    PeerFailed {
        /// The engine.
        peer: String,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A peer engine's result could not be read.
    #[error("unreadable result")]
    PeerOutput {
        /// The parse error.
        source: serde_json::Error,
    },
}

impl EvalError {
    /// An I/O error at `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Adapter `name` from `dir` failed.
    pub fn adapter(name: &str, dir: &Path, source: impl Into<BoxError>) -> Self {
        Self::Adapter {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            source: source.into(),
        }
    }

    /// Whether the command line was wrong (a value the run found unusable), not the run.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::NotListed { .. }
                | Self::PerplexityNeedsModel { .. }
                | Self::TooShort { .. }
                | Self::Shots { .. }
                | Self::Cascade { .. }
                | Self::Budget { .. }
        )
    }
}

/// Writes `bytes` to `path` atomically, the error naming the file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    ft_adapters::atomic::write_atomic(path, bytes).map_err(|e| EvalError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_evaluation_error_names_its_flag_and_says_whether_it_is_usage() {
        let listed = EvalError::NotListed {
            adapter: "one".into(),
            url: "http://127.0.0.1:1".into(),
            listed: vec!["base".into(), "two".into()],
        };
        assert_eq!(
            listed.to_string(),
            "--adapters one: the server at http://127.0.0.1:1 does not list it (it lists base, two)"
        );
        assert!(listed.is_usage());
        let short = EvalError::TooShort {
            task: "ppl".into(),
            example: 2,
            tokens: 1,
        };
        assert_eq!(
            short.to_string(),
            "--tasks ppl: example 2 has 1 token(s); perplexity needs 2 or more"
        );
        assert!(short.is_usage());
        let port = EvalError::InProcess {
            doing: "binding a local port",
            source: std::io::Error::other("in use"),
        };
        assert!(!port.is_usage());
    }
}
