//! Learning-rate schedules as transformers' `get_*_schedule_with_warmup` define them: the
//! multiplier of step `t` (optimizer steps taken so far) rises linearly from 0 over `warmup`
//! steps, then stays (constant), falls linearly to 0 (linear) or follows a half cosine to 0
//! (cosine) at `total` steps.

use crate::recipe::Scheduler;

/// The learning rate of optimizer step `t` (0-based) of `total`.
pub fn lr_at(kind: Scheduler, peak: f64, warmup: usize, total: usize, t: usize) -> f64 {
    if t < warmup {
        return peak * t as f64 / warmup.max(1) as f64;
    }
    let progress = (t - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let factor = match kind {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => (1.0 - progress).max(0.0),
        Scheduler::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    };
    peak * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_as_transformers_does() {
        let lr = |k, t| lr_at(k, 1.0, 10, 110, t);
        assert_eq!(lr(Scheduler::Cosine, 0), 0.0);
        assert_eq!(lr(Scheduler::Cosine, 5), 0.5);
        assert_eq!(lr(Scheduler::Cosine, 10), 1.0);
        assert!((lr(Scheduler::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(lr(Scheduler::Cosine, 110).abs() < 1e-12);
        assert!((lr(Scheduler::Linear, 60) - 0.5).abs() < 1e-12);
        assert_eq!(lr(Scheduler::Constant, 100), 1.0);
    }
}
