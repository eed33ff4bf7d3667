//! Errors that the binary reports with exit code 2: the command line itself is wrong.

/// A usage error: a flag value that parsed but is out of range or inconsistent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Returns a usage error naming the flag, what it accepts and what it got.
pub fn usage(flag: &str, expected: &str, got: impl std::fmt::Display) -> anyhow::Error {
    UsageError(format!("{flag}: expected {expected}, got {got}")).into()
}
