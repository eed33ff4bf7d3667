//! ft-serve: inference over ft-model.
//!
//! Today: token sampling ([`sampling`]) and single-sequence generation with a KV cache
//! ([`generate`]). Later: the paged KV cache, continuous batching with mixed adapters, the
//! OpenAI-compatible server and the load benchmark. Uses ft-model and below; must not import
//! ft-distill or ft-trainer.
#![warn(missing_docs)]

pub mod batch;
pub mod generate;
pub mod sampling;

pub use batch::greedy_batch;
pub use generate::{generate, Generation};
pub use sampling::{Sampler, SamplingParams};
