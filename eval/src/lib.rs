//! ft-eval: what a model or adapter buys, and what it costs.
//!
//! Tasks ([`task`]: the bundled generated tasks of [`tasks`] and `*.toml` task files) are
//! held-out splits with a metric ([`metric`]). `ft eval` sends them through a server, ours in
//! process or any OpenAI-compatible one, over the HTTP [`client`], for the base and every
//! adapter, storage, decoding and concurrency ([`measure`]), as one [`evaluation`] describes,
//! and writes a report ([`report`]) with plots ([`plot`]). [`greedy`] is the in-process exact
//! match that training runs before and after; [`load_bench`] is the load generator of `ft
//! bench serve`, [`soak`] its long run with cancelling and slow clients, [`decode_bench`] the
//! measurement of `ft bench generate`, [`prompting`] builds few-shot prompts,
//! [`compress`] shortens them and [`batch_prompting`] asks several questions in one,
//! [`cascade`] fits and measures FrugalGPT cascades, [`batch_bench`] measures what the Batch API saves, and [`peers`] drive the other engines measured beside
//! ft (llama.cpp, PEFT); [`rss`] (the server's own, re-exported) reads the process's resident
//! memory for every benchmark table.
//!
//! Uses ft-serve, ft-model and ft-adapters; must not import ft-quant (ft-model re-exports what
//! is needed), ft-distill or ft-trainer.
#![warn(missing_docs)]

pub mod batch_bench;
pub mod batch_prompting;
pub mod cascade;
pub mod client;
pub mod compress;
pub mod decode_bench;
pub mod error;
pub mod evaluation;
pub mod greedy;
pub mod load_bench;
pub mod measure;
pub mod metric;
pub mod peers;
pub mod plot;
pub mod prompting;
pub mod report;
pub mod soak;
pub mod task;
pub mod tasks;

pub use ft_serve::rss;

pub use error::EvalError;
pub use evaluation::Evaluation;
pub use greedy::{exact_match, ExactMatch};
