//! ft-distill: teacher-student distillation.
//!
//! Holds the distillation losses ([`losses`]: forward and reverse KL, generalized JSD,
//! temperature with T^2 scaling, the cross-entropy mix, top-k renormalization) and students
//! built from teacher layers ([`student`]), the offline teacher's top-k logit cache
//! ([`cache`]), and the same losses on host rows with their gradients written out, for the
//! host training step ([`rows`]). The distillation loop that uses them is the trainer's (`ft train` with a
//! `[distill]` recipe section), which owns data, optimizer and schedule.
//!
//! Builds on ft-model and ft-adapters (its atomic file write); must not import ft-quant,
//! ft-serve, ft-eval or ft-trainer.
#![warn(missing_docs)]

pub mod cache;
pub mod losses;
pub mod rows;
pub mod student;

pub use cache::TopKCache;
pub use losses::{DistillLoss, Divergence, TeacherLogits};
pub use rows::OnlineTeacher;
pub use student::{check_same_tokenizer, student_from_teacher, StudentInit};
