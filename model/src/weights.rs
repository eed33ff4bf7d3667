//! Host-side f32 tensors and the trait through which loaders hand them to the model.

use std::path::Path;

use ft_quant::PackedWeight;

use crate::error::ModelError;

/// A row-major f32 tensor in host memory, as read from a checkpoint.
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first (an HF linear weight is [out, in]).
    pub shape: Vec<usize>,
    /// Values in row-major order.
    pub data: Vec<f32>,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTensor{:?}", self.shape)
    }
}

impl HostTensor {
    /// A tensor from its shape and values.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
}

/// A checkpoint that yields tensors by their HF name (`model.layers.0.self_attn.q_proj.weight`).
pub trait TensorSource {
    /// Every tensor name the checkpoint holds.
    fn names(&self) -> Vec<String>;
    /// The file or folder, for error messages.
    fn location(&self) -> &Path;
    /// Reads one tensor, converted to f32.
    fn load(&self, name: &str) -> Result<HostTensor, ModelError>;
    /// Reads a weight the checkpoint stores packed (a saved quantized model), or `None` when
    /// it is stored dense.
    fn packed(&self, name: &str) -> Result<Option<PackedWeight>, ModelError> {
        let _ = name;
        Ok(None)
    }
    /// Reads a weight in the ggml block format the file stores it in (Q8_0, Q4_0, Q4_1), for
    /// the CPU inference kernels; `None` when it is stored otherwise.
    fn blocks(&self, name: &str) -> Result<Option<PackedWeight>, ModelError> {
        let _ = name;
        Ok(None)
    }
}
