//! Where a run's bytes live: on the compute device (the model's weights as stored, the
//! trainable parameters, their gradients, unpaged optimizer moments) or in host memory (paged
//! moments). Activations are not counted: burn reports no per-tensor device memory, so
//! `scripts/gpu-check.sh` reads the process's peak device memory from nvidia-smi beside this.

use serde::{Deserialize, Serialize};

use crate::optim::StateBytes;

/// Bytes by home, for `summary.json`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryReport {
    /// Every weight of the model (and of a distillation teacher) as stored: packed linears at
    /// their packed size, the rest f32.
    pub device_weights: usize,
    /// The trainable parameters (f32).
    pub device_trainable: usize,
    /// One f32 gradient per trainable parameter, alive during a step.
    pub device_gradients: usize,
    /// Optimizer moments kept on the device.
    pub device_optimizer_states: usize,
    /// The sum of the device entries.
    pub device_total: usize,
    /// Optimizer moments in host pages (paged AdamW); on a GPU only one or two layer groups'
    /// moments visit the device at a time.
    pub host_paged_optimizer_states: usize,
}

impl MemoryReport {
    /// The report of a model of `weights` bytes training `trainable` f32 parameters.
    pub fn new(weights: usize, trainable: usize, optimizer: StateBytes) -> Self {
        let device_trainable = 4 * trainable;
        let device_gradients = 4 * trainable;
        Self {
            device_weights: weights,
            device_trainable,
            device_gradients,
            device_optimizer_states: optimizer.device,
            device_total: weights + device_trainable + device_gradients + optimizer.device,
            host_paged_optimizer_states: optimizer.host_paged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_moments_count_on_the_host_only() {
        let states = StateBytes {
            device: 800,
            host_paged: 8000,
            params: 3,
        };
        let m = MemoryReport::new(1000, 100, states);
        assert_eq!(m.device_total, 1000 + 400 + 400 + 800);
        assert_eq!(m.host_paged_optimizer_states, 8000);
    }
}
