//! ft-distill: teacher-student distillation.
//!
//! Holds the distillation losses ([`losses`]: forward and reverse KL, generalized JSD,
//! temperature with T^2 scaling, the cross-entropy mix, top-k renormalization). Later: student
//! initialization from teacher layers and the teacher's top-k logit cache.
//!
//! Builds on ft-model; must not import ft-serve or ft-trainer.
#![warn(missing_docs)]

pub mod losses;

pub use losses::{DistillLoss, Divergence, TeacherLogits};
