//! ft-quant: block quantization of frozen weights.
//!
//! Owns the byte layouts of quantized weights and the code that turns them back into f32:
//! today the GGUF/ggml block formats (F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K) that the GGUF
//! loader needs; later the bitsandbytes-compatible NF4/FP4/int8 formats of QLoRA and the SIMD
//! matvec kernels for decoding.
//!
//! Must not import any other ft crate: it knows nothing of LoRA, models or training.
#![warn(missing_docs)]

pub mod ggml;

pub use ggml::{dequantize, GgmlType};

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
}
