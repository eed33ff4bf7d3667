//! ft-quant: block quantization of frozen weights.
//!
//! Owns the byte layouts of quantized weights and the code that turns them back into f32:
//! the GGUF/ggml block formats the GGUF loader reads ([`ggml`]), and the formats of a
//! quantized base for QLoRA ([`packed`]): bitsandbytes-compatible NF4 and FP4 ([`bnb4`]) with
//! double quantization through the 8-bit dynamic map ([`dynamic8`]), int8 absmax ([`int8`])
//! and bf16; and the base model's [`Linear`] layer that holds a weight dense or packed.
//! [`gptq`] rounds a weight onto a format's grid with GPTQ's error feedback from calibration
//! inputs; [`awq`] finds the per-input scales (and clipping ranges) that make a weight round
//! with less output error. [`device_packed`] keeps packed codes on a GPU and decodes them there; [`matvec`] multiplies
//! a few rows by GGUF-blocked, bf16 or f32 weights on the CPU without dequantizing them,
//! [`gemm`] multiplies the hundreds of rows of a training step (a packed weight dequantized a
//! tile of rows at a time), [`attention`] attends from a paged KV cache on the host, [`exp`]
//! takes exp and SiLU over slices, and [`team`] runs a step's operations on every kernel
//! thread at once.
//!
//! Must not import any other ft crate: it knows nothing of LoRA, models or training.
#![warn(missing_docs)]

pub mod attention;
pub mod awq;
pub mod backend;
pub mod bnb4;
pub mod device_packed;
pub mod dynamic8;
pub mod exp;
pub mod gemm;
pub mod ggml;
pub mod gptq;
pub mod int8;
pub mod linear;
pub mod matvec;
pub mod packed;
#[cfg(test)]
mod seeded;
pub mod team;

pub use backend::QuantBackend;
pub use ggml::{dequantize, GgmlType};
pub use linear::Linear;
pub use packed::{PackedWeight, QuantFormat, QuantSpec};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A GGUF tensor type id that ft does not read.
    #[error("unsupported ggml tensor type {0}")]
    UnsupportedType(u32),
    /// The byte buffer does not match the element count for the format.
    #[error("{ty:?} data for {elements} elements needs {expected} bytes, found {found}")]
    Size {
        /// The block format.
        ty: GgmlType,
        /// Number of elements asked for.
        elements: usize,
        /// Bytes the format needs for them.
        expected: usize,
        /// Bytes available.
        found: usize,
    },
    /// The element count is not a whole number of blocks.
    #[error("{ty:?} stores blocks of {block} elements; {elements} is not a multiple")]
    PartialBlock {
        /// The block format.
        ty: GgmlType,
        /// Elements per block.
        block: usize,
        /// Number of elements asked for.
        elements: usize,
    },
    /// A layer's inputs are not a whole number of the format's groups.
    #[error("groups of {group} do not divide a layer's {inputs} inputs")]
    Group {
        /// Weights per group.
        group: usize,
        /// The layer's inputs.
        inputs: usize,
    },
    /// Calibration data that cannot drive post-training quantization.
    #[error("calibration: {0}")]
    Calibration(String),
}
