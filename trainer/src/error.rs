//! The errors of ft-trainer. Each names the recipe key, file or checkpoint at fault, as the
//! recipe spells it (`model.source`, `data.mix[1].train`, `train.resume`), so a user knows
//! which line to change.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use ft_adapters::AdapterError;
use ft_distill::cache::CacheError;
use ft_distill::student::StudentError;
use ft_eval::EvalError;
use ft_model::ModelError;

use crate::data::DataError;
use crate::recipe::RecipeError;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A recipe value that parsed but cannot run here (a usage error: exit code 2).
    #[error("{key}: expected {expected}, got {got}")]
    Usage {
        /// The recipe key.
        key: String,
        /// What it accepts.
        expected: String,
        /// What it was.
        got: String,
    },
    /// The recipe asks for something this run cannot do; the message names the key.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// An error under a recipe key, file or checkpoint: `at: error`.
    #[error("{at}: {cause}")]
    At {
        /// Where: the key, file or checkpoint.
        at: String,
        /// What went wrong there.
        cause: Box<TrainError>,
    },
    /// A sweep's run that failed in its own process (its log says why).
    #[error("run {name} failed ({status}); its output is in {}", log.display())]
    Run {
        /// The run's name.
        name: String,
        /// How its process ended.
        status: String,
        /// Its log.
        log: PathBuf,
        /// The process ended with a usage error (exit code 2): the run's input is at fault.
        usage: bool,
    },
    /// The recipe itself.
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    /// The training data.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Loading, converting or writing a model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// LoRA layers, the PEFT format or the registry.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The exact-match evaluation.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// Building a student from the teacher.
    #[error(transparent)]
    Student(#[from] StudentError),
    /// The teacher's logit cache.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A checkpoint's or summary's JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A checkpoint's tensors.
    #[error(transparent)]
    Tensors(#[from] safetensors::SafeTensorError),
}

impl TrainError {
    /// An I/O error at `path`.
    pub fn io(path: &Path, cause: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            cause,
        }
    }

    /// A usage error: `key` expected `expected` and got `got`.
    pub fn usage(key: &str, expected: &str, got: impl Display) -> Self {
        Self::Usage {
            key: key.into(),
            expected: expected.into(),
            got: got.to_string(),
        }
    }

    /// Whether the recipe or flags are at fault (exit code 2) rather than the run.
    pub fn is_usage(&self) -> bool {
        match self {
            // The data files the recipe names are the user's input as much as the recipe.
            Self::Usage { .. } | Self::Data(_) => true,
            Self::Run { usage, .. } => *usage,
            Self::At { cause, .. } => cause.is_usage(),
            _ => false,
        }
    }
}

/// `Result<T, TrainError>`.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Names where an error happened (the recipe key or file), keeping the error typed.
pub trait At<T> {
    /// Prefixes the error with `at` (a recipe key, a file).
    fn at(self, at: impl Display) -> Result<T>;
    /// Prefixes the error with what `at` returns, computed only on error.
    fn at_with<D: Display>(self, at: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<TrainError>> At<T> for std::result::Result<T, E> {
    fn at(self, at: impl Display) -> Result<T> {
        self.at_with(|| at)
    }

    fn at_with<D: Display>(self, at: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| TrainError::At {
            at: at().to_string(),
            cause: Box::new(e.into()),
        })
    }
}

/// Writes `bytes` to `path` atomically, the error naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    ft_adapters::atomic::write_atomic(path, bytes).map_err(|e| TrainError::io(path, e))
}
