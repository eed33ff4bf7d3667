//! The seeded fuzzers: every parser of a file or request a user can hand ft, run on mutations
//! of valid inputs, must answer each with a result or an error: no panic, no abort, heap and
//! time bounded. `cargo test` runs 2,000 inputs per parser; the long runs (100,000 each) are
//! `cargo test -p ft-tests --test fuzz -- --ignored --nocapture`. `FT_FUZZ_INPUTS`
//! and `FT_FUZZ_SEED` change a run's size and seed.

mod adapter;
mod batch;
mod data;
mod gguf;
mod hf;
mod http;
mod recipe;
mod sweep;

use ft_tests::fuzz::Counting;

#[global_allocator]
static HEAP: Counting = Counting;

/// Inputs per parser in `cargo test`.
const QUICK: u64 = 2_000;
/// Inputs per parser in the long run.
const LONG: u64 = 100_000;

/// The tiny model's backend.
type B = burn::backend::NdArray<f32>;
