//! The errors of ft-eval: each names the file, task or example at fault.

use std::path::{Path, PathBuf};

use crate::task::TaskError;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
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
    /// A report could not be serialized.
    #[error("serializing the report: {0}")]
    Json(#[from] serde_json::Error),
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
}

/// Writes `bytes` to `path` atomically, the error naming the file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    ft_adapters::atomic::write_atomic(path, bytes).map_err(|e| EvalError::io(path, e))
}
