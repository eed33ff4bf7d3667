//! ft-trainer: training from a recipe.
//!
//! A recipe ([`recipe`]) names the base, the data ([`data`]: JSONL, CSV, Parquet or a Hub
//! dataset in four layouts, chat templates, mixtures, packing), the adapter or student and
//! the schedule ([`schedule`]); [`plan`] turns it into the run's order of micro-batches. One
//! step loop ([`run`]) fine-tunes LoRA adapters on the labels, trains a model from scratch or
//! distills a teacher into a student, with AdamW or paged AdamW ([`optim`]),
//! write atomic checkpoints that resume bit for bit ([`checkpoint`]) and metrics to JSONL and
//! TensorBoard ([`metrics`]); [`memory`] accounts for the bytes a run holds; [`export`]
//! writes a recipe as an axolotl or torchtune config with its data; [`scaling`] sweeps models
//! trained from scratch over sizes and budgets, fits Chinchilla's law to the runs and plans
//! compute-optimal ones.
//!
//! Uses ft-eval (exact match before and after, the bundled tasks), ft-distill, ft-serve
//! (on-policy sampling), ft-model and ft-adapters; must not import ft-quant (ft-model
//! re-exports what training needs) or clap.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod export;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod plan;
pub mod recipe;
pub mod run;
pub mod scaling;
pub mod schedule;

/// Makes f64 the default float type of the NdArray device, and runs the calling test alone
/// among the tensor tests while the returned guard lives. burn fixes a device's default types
/// at its first tensor, once per process, and the tests run on many threads: every test that
/// makes tensors calls this first, so the finite-difference checks get f64 whichever test
/// runs first (the f32 tests hold in either type). One at a time, because tests beside each
/// other on the shared CPU device moved a finite-difference check out of its bound now and
/// then (seen 1 run in 3), and these tests take a second or two in all.
#[cfg(test)]
#[must_use = "the test runs alone only while the guard lives"]
pub(crate) fn f64_tensors() -> std::sync::MutexGuard<'static, ()> {
    use burn::tensor::DType;
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Already set by an earlier test: the same types.
    let _ = burn::tensor::set_default_dtypes::<burn::backend::NdArray<f64>>(
        &Default::default(),
        DType::F64,
        DType::I64,
    );
    turn
}
