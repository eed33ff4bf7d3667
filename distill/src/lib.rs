//! ft-distill: teacher-student distillation.
//!
//! Will hold the distillation losses (forward and reverse KL, generalized JSD, temperature with
//! T^2 scaling, the cross-entropy mix), student initialization from teacher layers, and the
//! teacher's top-k logit cache. Empty until the distillation work lands.
//!
//! Builds on ft-model; must not import ft-serve or ft-trainer.
#![warn(missing_docs)]
