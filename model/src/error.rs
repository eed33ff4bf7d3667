//! The one error type of ft-model; every variant names the file, tensor or key at fault.

use std::path::{Path, PathBuf};

/// Errors from loading, tokenizing and running models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // --- files and sources ---
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file does not have the expected structure.
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        what: String,
    },
    /// A model source string or download could not be resolved.
    #[error("model source {source_str}: {what}")]
    Source {
        /// The source as given by the user.
        source_str: String,
        /// What went wrong and what to do about it.
        what: String,
    },

    /// A setting does not fit the model (an unknown LoRA target, a layer it lacks).
    #[error("{0}")]
    Config(String),

    // --- weights ---
    /// A GGUF tensor type ft cannot read.
    #[error("{path}: tensor {tensor} has unsupported type id {ty} (ft reads F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)")]
    UnsupportedTensorType {
        /// The file.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// The GGUF type id.
        ty: u32,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor {tensor} is missing")]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The HF name of the tensor.
        tensor: String,
    },
    /// A tensor has the wrong shape for the configuration.
    #[error("{path}: tensor {tensor} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The checkpoint.
        path: PathBuf,
        /// The HF name of the tensor.
        tensor: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// The checkpoint holds tensors the model does not use.
    #[error("{path}: unused tensors {names:?}")]
    UnusedTensors {
        /// The checkpoint.
        path: PathBuf,
        /// The HF names left over.
        names: Vec<String>,
    },
    /// The architecture or a configuration value is not supported.
    #[error("{path}: {what}")]
    Unsupported {
        /// The file holding the configuration.
        path: PathBuf,
        /// What is unsupported.
        what: String,
    },

    /// A LoRA adapter could not be read or does not fit the model.
    #[error(transparent)]
    Adapter(#[from] ft_adapters::AdapterError),

    // --- text ---
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A sequence does not fit the model's context.
    #[error("{what}: {tokens} tokens do not fit the context of {context} tokens")]
    ContextOverflow {
        /// Which input overflowed.
        what: String,
        /// Tokens needed.
        tokens: usize,
        /// The model's maximum context.
        context: usize,
    },

    // --- post-training quantization ---
    /// Calibration or quantization of the projections failed.
    #[error("{0}")]
    Calibration(String),
}

impl ModelError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A format error on `path`.
    pub fn format(path: &Path, what: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}
