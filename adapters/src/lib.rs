//! ft-adapters: everything about LoRA adapters.
//!
//! Holds the LoRA layer ([`lora`]: A [r, in], B [out, r], PEFT's init and scaling) wrapping
//! ft-quant's base [`ft_quant::Linear`], the PEFT format ([`peft`]) and the SQLite adapter
//! registry ([`registry`]) and Hub publishing ([`hub`]), and whether other servers (vLLM,
//! LoRAX, TGI) load an adapter as PEFT means it ([`compat`]).
//!
//! Depends only on ft-quant among ft crates; must not import ft-model or anything above it.
#![warn(missing_docs)]

pub mod atomic;
pub mod compat;
pub mod hub;
pub mod lora;
pub mod peft;
pub mod registry;

pub use lora::{Lora, LoraConfig, LoraLinear};
pub use peft::PeftAdapter;
pub use registry::Registry;

use std::path::{Path, PathBuf};

/// Errors of this crate; each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
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
        /// What is wrong.
        what: String,
    },
    /// An adapter does not fit the model it is applied to.
    #[error("adapter {path}: {what}")]
    Mismatch {
        /// The adapter folder.
        path: PathBuf,
        /// Which tensor and why.
        what: String,
    },
    /// The registry database failed.
    #[error("registry {path}: {what}")]
    Registry {
        /// The database or blob.
        path: PathBuf,
        /// What went wrong.
        what: String,
    },
    /// No such adapter (version) in the registry.
    #[error("no adapter {0} in the registry")]
    NotFound(String),
    /// A name, version or path that is not allowed.
    #[error("{0}")]
    BadName(String),
}

impl AdapterError {
    /// Wraps an I/O error with its path.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
