//! ft-serve: inference over ft-model.
//!
//! Token sampling ([`sampling`]), single-sequence generation with a KV cache ([`generate`]),
//! batched greedy generation ([`batch`]) and the serving engine ([`engine`]): a paged KV cache
//! ([`blocks`], [`kv_pool`]) with prefix caching, continuous batching of requests that each
//! use their own adapter ([`adapter_cache`]), sampling, beam search ([`beam`]) and stop
//! strings ([`text_stream`]), behind the OpenAI-compatible HTTP [`server`], whose metrics
//! include the process's resident memory ([`rss`]) and which answers repeated deterministic
//! requests from a [`response_cache`] in memory or Redis, and serves FrugalGPT [`cascade`]s
//! as models; OpenAI Batch API files ([`batches`]) run against it.
//!
//! Uses ft-model and ft-adapters; must not import ft-quant (ft-model re-exports what serving
//! needs), ft-distill, ft-eval or ft-trainer.
#![warn(missing_docs)]

pub mod adapter_cache;
pub mod batch;
pub mod batches;
pub mod beam;
pub mod blocks;
pub mod cascade;
pub mod engine;
pub mod error;
pub mod generate;
pub mod kv_pool;
pub mod request;
pub mod response_cache;
pub mod rss;
pub mod runner;
pub mod sampling;
pub mod sequence;
pub mod server;
pub mod text_stream;

pub use batch::greedy_batch;
pub use engine::{Engine, EngineConfig, EngineStats};
pub use error::EngineError;
pub use generate::{generate, Generation};
pub use request::{
    Event, FinishReason, GenerationParams, Priority, Request, RequestId, TokenLogprob,
};
pub use sampling::{Sampler, SamplingParams};
