//! Evaluation. [`greedy`] is the batched held-out exact match that training runs before and
//! after. `ft eval` measures what each adapter buys and what it costs: tasks ([`task`]) are
//! held-out splits with a metric ([`metric`]), sent through a server, ours in process or any
//! OpenAI-compatible one, for the base and every adapter, storage, decoding and concurrency
//! ([`measure`]), and written up as a report with plots ([`report`]).

pub mod greedy;
pub mod measure;
pub mod metric;
pub mod report;
pub mod task;

pub use greedy::{exact_match, ExactMatch};
