//! ft-trainer: training from a recipe.
//!
//! A recipe ([`recipe`]) names the base, the data ([`data`]: JSONL layouts, chat templates,
//! mixtures, packing), the adapter or student and the schedule ([`schedule`]); [`plan`] turns it
//! into the run's order of micro-batches. One step loop ([`run`]) fine-tunes LoRA adapters on
//! the labels or distills a teacher into a student, with AdamW or paged AdamW ([`optim`]),
//! write atomic checkpoints that resume bit for bit ([`checkpoint`]) and metrics to JSONL and
//! TensorBoard ([`metrics`]); [`memory`] accounts for the bytes a run holds.
//!
//! Uses ft-eval (exact match before and after, the bundled tasks), ft-distill, ft-serve
//! (on-policy sampling), ft-model and ft-adapters; must not import ft-quant (ft-model
//! re-exports what training needs) or clap.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod plan;
pub mod recipe;
pub mod run;
pub mod schedule;
