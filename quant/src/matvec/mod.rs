//! y = x W^T for a few rows of x (decoding: one row per sequence) over W in its stored block
//! format, reading each weight once per call.
//!
//! burn's CPU matmul dequantizes nothing and multiplies f32 at about 1 GB/s of weights; a
//! decode step is a chain of matrix-vector products whose speed is the speed of reading W. As
//! llama.cpp does (`ggml_vec_dot_q8_0_q8_0`, `..._q4_0_q8_0`, `..._q4_1_q8_1`), the rows of x
//! are quantized to 8 bits in blocks of 32 once per call, and each weight block meets each
//! activation block in an integer dot product scaled by the two block scales. The work is
//! split over weight rows across rayon's threads. AVX-512 VNNI or AVX2 (with FMA and F16C) is
//! used where the CPU has it, chosen at run time; a portable version computes the same sums
//! elsewhere.
//!
//! The files here:
//! - `isa.rs`: the instruction sets the kernels are written for ([`Isa`]), which of them this
//!   CPU has, and the cap [`MAX_ISA_VAR`] puts on the choice.
//! - `q8.rs`: activations rounded to 8-bit blocks ([`Q8Rows`], [`SharedQ8Rows`]).
//! - `product.rs`: the products ([`product()`], [`weight_rows`] and the rest): the checks on
//!   their arguments, the kernel chosen per instruction set and weight format, and the split
//!   of the weight rows over the threads.
//! - `low_rank.rs`: [`LowRank`], a LoRA update added to the products' output in f32.
//! - `portable.rs`: the kernels in plain Rust, the reference the others must match.
//! - `avx2.rs`: the kernels on AVX2 with FMA and F16C.
//! - `avx512.rs`: the block kernels of `avx2.rs` compiled for AVX-512 VNNI.
//! - `amx.rs`: the block kernels on AMX tiles, for batches of [`AMX_ROWS`] rows or more.
//! - `tests.rs`: the products on every instruction set, against a reference and against
//!   each other.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod isa;
mod low_rank;
mod portable;
mod product;
mod q8;
#[cfg(test)]
mod tests;

pub use isa::{Isa, MAX_ISA_VAR};
pub use low_rank::LowRank;
pub use product::{matmul, matmul_bf16, on_kernel_thread, product, weight_rows};
pub use q8::{Q8Rows, SharedQ8Rows};

use crate::ggml::GgmlType;

/// Weights per block of every format here.
pub const BLOCK: usize = 32;

/// Most rows of x for which [`matmul_bf16`] beats dequantize-then-GEMM (decoding batches).
pub const MAX_ROWS: usize = 64;

/// Fewest activation rows for which the AMX tiles (16 rows each) beat the VNNI kernels.
pub const AMX_ROWS: usize = 8;

/// Weight rows a kernel call takes at once: together with one tile of activation rows they
/// stay in the L1 cache while the tile meets each of them.
pub const WEIGHT_ROWS: usize = 16;

/// Values per absmax block of [`Weights::FourBit`] (bitsandbytes' blocksize).
pub const FOUR_BIT_BLOCK: usize = 64;

/// Whether the kernels multiply weights of ggml type `ty`.
pub fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1)
}

/// A weight W [n, k] (row-major, HF [out, in]) in a form the kernels multiply directly.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// ggml blocks of 32 along each row ([`supports`]); activations meet them as 8-bit blocks.
    Blocks {
        /// Q8_0, Q4_0 or Q4_1.
        ty: GgmlType,
        /// n rows of k / 32 blocks.
        bytes: &'a [u8],
        /// Where the rows laid out for the AMX tiles are kept once built, if anywhere
        /// (without it every batched call lays out the rows it reads).
        tiles: Option<&'a TileLayout>,
    },
    /// bfloat16 bits; activations stay f32.
    Bf16(&'a [u16]),
    /// f32 values.
    F32(&'a [f32]),
    /// bitsandbytes' 4-bit codes (NF4 or FP4): blocks of [`FOUR_BIT_BLOCK`] along each row
    /// (k a multiple of it), two codes a byte, the first in the high nibble; activations
    /// stay f32.
    FourBit {
        /// The 16 values of the code book.
        code: &'a [f32; 16],
        /// n * k / 2 bytes.
        codes: &'a [u8],
        /// One scale per block.
        absmax: &'a [f32],
    },
}

/// A ggml weight's rows laid out again for the AMX tiles (sixteen rows side by side per
/// block), built the first time a batch of [`AMX_ROWS`] or more rows meets the weight and
/// kept with it: gathering the rows on every call cost a fifth of a 16-row product. On CPUs
/// without AMX it stays empty.
#[derive(Debug, Default)]
pub struct TileLayout(std::sync::OnceLock<Vec<u8>>);

impl Clone for TileLayout {
    /// A copy starts empty: the layout is derived from the blocks and rebuilt on demand.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for TileLayout {
    /// Always equal: the layout only repeats the blocks it sits beside.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Weights<'_> {
    /// Whether the activations must be quantized to 8-bit blocks ([`Q8Rows`]) first.
    pub fn needs_q8(&self) -> bool {
        matches!(self, Self::Blocks { .. })
    }

    /// Checks that the weight holds n rows of k and that the kernels take it.
    fn check(&self, n: usize, k: usize) {
        let stored = match self {
            Self::Blocks { ty, bytes, .. } => {
                assert!(
                    supports(*ty) && k.is_multiple_of(BLOCK),
                    "matvec: {ty:?} with k = {k}"
                );
                bytes.len() / ty.block_bytes() * BLOCK
            }
            Self::Bf16(w) => w.len(),
            Self::F32(w) => w.len(),
            Self::FourBit { codes, absmax, .. } => {
                assert!(
                    k.is_multiple_of(FOUR_BIT_BLOCK) && absmax.len() * FOUR_BIT_BLOCK == n * k,
                    "matvec: 4-bit weight of {n} x {k} with {} blocks",
                    absmax.len()
                );
                codes.len() * 2
            }
        };
        assert_eq!(stored, n * k, "matvec: weight of {n} x {k}");
    }
}
