//! Why the engine refused a request or an adapter.

/// An engine error; the server maps each to an HTTP status.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// The request is malformed or out of range (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// No adapter (or base) of that name (HTTP 404).
    #[error("the model {0:?} does not exist")]
    UnknownModel(String),
    /// The queue of waiting requests is full (HTTP 429).
    #[error("the queue is full ({0} requests waiting); retry later")]
    QueueFull(usize),
    /// An adapter folder could not be read or does not fit the base (HTTP 400).
    #[error("{0}")]
    Adapter(String),
}
