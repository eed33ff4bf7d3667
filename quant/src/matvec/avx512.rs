//! The block kernels with AVX-512 VNNI: `avx2.rs`'s kernels compiled with the byte products
//! summed by `vpdpbusd`.

use std::ops::Range;

use super::avx2::block_rows_of;
use super::q8::Q8Rows;
use crate::ggml::GgmlType;

/// [`super::avx2::block_rows`] with the byte products summed by AVX-512 VNNI's `vpdpbusd` on
/// 256-bit vectors, and AVX512VL's 32 vector registers holding the eight-row tiles. The
/// integer sums are exact either way, so the results are [`super::avx2::block_rows`]' bits.
///
/// # Safety
/// As [`super::avx2::block_rows`], and the CPU must have AVX-512 F, BW, VL and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn block_rows(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    xq: &Q8Rows,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    block_rows_of::<true>(ty, w, k, xq, m, rows, out)
}
