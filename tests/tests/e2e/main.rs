//! End-to-end tests: each runs the `ft` binary as a user does.

mod adapters;
mod bad_input;
mod batch;
mod bench_train;
mod cache;
mod cascade;
mod compress;
mod data_files;
mod distill;
mod eval;
mod export;
mod hub;
mod inference_weights;
mod lm_eval;
mod quant;
mod reference;
mod registry;
mod scaling;
mod serve;
mod tiny_models;
mod train;
