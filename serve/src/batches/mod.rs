//! OpenAI's Batch API: a file of requests in, a file of answers out, in the same order
//! ([`input`] checks the requests, [`output`] shapes the answers); [`offline`], which runs
//! such a file against a server (ours in process, as vLLM's `run-batch` does), each finished
//! answer kept in a journal so that a run stopped part way resumes without asking again; the
//! server's state ([`store`]); and a [`client`] of any server with the API.

pub mod client;
pub mod input;
pub mod offline;
pub mod output;
pub mod store;

use std::path::PathBuf;

pub use input::{Line, LineError};

/// Why a batch did not run.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The input file is malformed; every fault found, with its line.
    #[error("{}", input::describe(.0))]
    Invalid(Vec<LineError>),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A server's Batch API refused or failed a call.
    #[error("{url}: {message}")]
    Http {
        /// What was called.
        url: String,
        /// What it answered.
        message: String,
    },
    /// Another process holds the state folder.
    #[error("{}: another ft serve holds this state folder (--state-dir names another)", path.display())]
    Busy {
        /// The folder.
        path: PathBuf,
    },
    /// The journal of a stopped run does not belong to this input.
    #[error("{}: {message}", path.display())]
    Journal {
        /// The journal.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl BatchError {
    fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
