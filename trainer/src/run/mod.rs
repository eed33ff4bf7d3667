//! Runs: one step loop ([`step_loop`]) with two objectives, the cross-entropy of the labels
//! ([`fine_tune`], `ft train` with a `[lora]` recipe; [`from_scratch`], a recipe with
//! `model.init = "random"`) and distillation from a teacher ([`distillation`], a recipe with
//! `[distill]`), over LoRA adapters or every dense weight ([`trainables`]). [`loss`] is the batch loss through the padded burn forward both
//! objectives build on, and [`host_step`] a LoRA run's steps on ft's own CPU kernels instead;
//! [`setup`] what every run does before its first step and after its last; [`layout`] the
//! shapes of a run's micro-batches, without running it, and [`check`] what a run would read
//! first, without running it. [`peft_twin`] is a fine-tuning job
//! written out for PEFT to replay (`ft bench train --vs-peft`).

pub mod check;
pub mod distillation;
pub mod fine_tune;
pub mod from_scratch;
pub(crate) mod host_step;
pub mod layout;
pub mod loss;
pub mod peft_twin;
pub(crate) mod setup;
pub(crate) mod step_loop;
pub mod trainables;

pub use check::check;
pub use distillation::{distill, DistillSummary, TextScore};
pub use fine_tune::{train, Summary, Trained};
pub use from_scratch::{pretrain, PretrainSummary};
pub use layout::layout;
pub use peft_twin::{peft_job, Twin};
