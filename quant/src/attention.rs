//! Attention of decoding rows (one new token per sequence) straight from a paged KV cache on
//! the host, as vLLM's paged attention kernel does on a GPU: each row walks its own block
//! table, so nothing is gathered or padded, and the work is split over (row, key/value head)
//! pairs across rayon's threads.
//!
//! For row i and query head j (key/value head j / g for g query heads per key/value head):
//! out = softmax(q k^T / sqrt(d)) v over the row's first `len` positions. Keys and values
//! may be f32 or f16 ([`KvElement`]): at 16 sequences reading them from memory is most of
//! the attention's time, and f16 halves it (llama.cpp's cache holds f16 too).

use half::f16;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Key and value element types: f32 and f16, widened a row at a time

/// Most values in one head (the widened rows live on the stack).
pub const MAX_HEAD_DIM: usize = 256;

/// A type of the keys and values in a cache, widened to f32 a row at a time.
pub trait KvElement: Copy + Default + Send + Sync + 'static {
    /// `src` as f32 into `dst` (as long).
    fn widen(src: &[Self], dst: &mut [f32]);

    /// [`KvElement::widen`] for callers compiled with AVX2 and F16C.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen_f16c(src: &[Self], dst: &mut [f32]) {
        Self::widen(src, dst)
    }

    /// `src` rounded into `dst` (as long).
    fn narrow(src: &[f32], dst: &mut [Self]);

    /// Sixteen values at `src` as f32, for callers compiled with AVX-512 F.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `src` holds sixteen values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(src: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElement for f32 {
    #[inline(always)]
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(src: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(src)
    }
}

impl KvElement for f16 {
    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
        use std::arch::x86_64::*;
        assert_eq!(src.len(), dst.len(), "widen: lengths");
        let whole = src.len() / 8;
        for c in 0..whole {
            let h = _mm_loadu_si128(src.as_ptr().add(8 * c) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(8 * c), _mm256_cvtph_ps(h));
        }
        Self::widen(&src[8 * whole..], &mut dst[8 * whole..]);
    }

    fn narrow(src: &[f32], dst: &mut [f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(src: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(src as *const __m256i))
    }
}

// ----------------------------------------------------------------------------
// Paged decode attention over rayon's threads

/// Shapes of the query and of the paged keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Attention output `[rows, heads * head_dim]` for queries `q` `[rows, heads, head_dim]`;
/// `keys` and `values` are `[blocks, kv_heads, block_size, head_dim]`, and `rows[i]` holds row
/// i's block table and its length in positions (at least 1).
pub fn paged_decode_attention<T: KvElement>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    layout: PagedLayout,
    rows: &[(&[usize], usize)],
) -> Vec<f32> {
    let PagedLayout {
        heads: h,
        kv_heads: kv,
        head_dim: d,
        ..
    } = layout;
    let g = h / kv;
    let mut out = vec![0f32; rows.len() * h * d];
    // Chunk c holds the g query heads of key/value head c % kv of row c / kv.
    out.par_chunks_mut(g * d).enumerate().for_each(|(c, out)| {
        let (i, kvh) = (c / kv, c % kv);
        let (table, len) = rows[i];
        let q = &q[(i * h + kvh * g) * d..][..g * d];
        attend_group(
            q,
            keys,
            values,
            layout,
            kvh,
            table,
            len,
            &mut Vec::new(),
            out,
        );
    });
    out
}

// ----------------------------------------------------------------------------
// One key/value head's group of query heads: dispatch, then the portable and AVX2 loops

/// The attention of the g query heads that share key/value head `kv_head` over the first
/// `len` positions of a block table: `out` (g * d values, overwritten) = softmax(q k^T /
/// sqrt(d)) v per head, each key and value read once for the group. `scores` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attend_group<T: KvElement>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    layout: PagedLayout,
    kv_head: usize,
    table: &[usize],
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::matvec::Isa;
        let isa = Isa::active();
        let g = q.len() / layout.head_dim.max(1);
        if isa >= Isa::Avx512Vnni && layout.head_dim == 64 && (1..=4).contains(&g) {
            let args = (q, keys, values, layout, kv_head, table, len, scores, out);
            // SAFETY: AVX-512 F was detected for these variants; heads are of 64 and there
            // are G of them.
            return unsafe {
                match g {
                    1 => avx512::attend_group::<T, 1>(args),
                    2 => avx512::attend_group::<T, 2>(args),
                    3 => avx512::attend_group::<T, 3>(args),
                    _ => avx512::attend_group::<T, 4>(args),
                }
            };
        }
        if isa != Isa::Portable {
            // SAFETY: AVX2, FMA and F16C were detected for every non-portable variant.
            return unsafe {
                attend_group_avx2(q, keys, values, layout, kv_head, table, len, scores, out)
            };
        }
    }
    attend_group_in::<T, false>(q, keys, values, layout, kv_head, table, len, scores, out)
}

/// [`attend_group`] compiled for AVX2, FMA and F16C, so that its loops vectorize eight wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group_avx2<T: KvElement>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    layout: PagedLayout,
    kv_head: usize,
    table: &[usize],
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_group_in::<T, true>(q, keys, values, layout, kv_head, table, len, scores, out)
}

/// [`attend_group`]'s loops; `FMA` fuses their multiply-adds (without the instruction a
/// fused multiply-add is a library call) and widens f16 with F16C. Each position's key and
/// value rows are widened into a buffer on the stack before they meet the heads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_group_in<T: KvElement, const FMA: bool>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    layout: PagedLayout,
    kv_head: usize,
    table: &[usize],
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let PagedLayout {
        kv_heads: kv,
        block_size: bs,
        head_dim: d,
        ..
    } = layout;
    let g = q.len() / d;
    assert!(d <= MAX_HEAD_DIM, "attention: heads of {d} values");
    let mut row = [0f32; MAX_HEAD_DIM];
    let row = &mut row[..d];
    let scale = 1.0 / (d as f32).sqrt();
    scores.clear();
    scores.resize(g * len, 0.0);
    let walk = Walk::new(table, kv, kv_head, bs, d, len);
    for b in 0..walk.blocks {
        let here = walk.start(b);
        for t in 0..walk.positions(b) {
            walk.fetch(keys, values, b, t);
            widen::<T, FMA>(&keys[here + t * d..here + (t + 1) * d], row);
            for (j, qh) in q.chunks_exact(d).enumerate() {
                scores[j * len + b * bs + t] = dot::<FMA>(qh, row) * scale;
            }
        }
    }
    softmax_each(scores, len);
    out.fill(0.0);
    for b in 0..walk.blocks {
        let here = walk.start(b);
        for t in 0..walk.positions(b) {
            widen::<T, FMA>(&values[here + t * d..here + (t + 1) * d], row);
            for (j, o) in out.chunks_exact_mut(d).enumerate() {
                let w = scores[j * len + b * bs + t];
                for (o, v) in o.iter_mut().zip(&*row) {
                    *o = madd::<FMA>(w, *v, *o);
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------
// AVX-512 kernel for heads of 64

/// [`attend_group`] for G heads of 64 in AVX-512 registers: a position's key or value row
/// is four vectors, each head's query and output sums four more, so that a position costs
/// its loads and 12 multiply-adds per phase for three heads, and nothing goes back to memory
/// but the scores.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{softmax_each, KvElement, PagedLayout, Walk};

    /// Vectors of 16 in a head.
    const V: usize = 4;

    /// The lanes of `v` added as [`super::lane_sum`] adds them (so that the AVX2 kernel
    /// gives the same bits): halves of eight, four, two, one.
    #[inline(always)]
    unsafe fn lane_sum(v: __m512) -> f32 {
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let a = _mm256_add_ps(_mm512_castps512_ps256(v), high);
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c)))
    }

    /// [`super::attend_group`]'s arguments.
    pub(super) type Args<'a, T> = (
        &'a [f32],
        &'a [T],
        &'a [T],
        PagedLayout,
        usize,
        &'a [usize],
        usize,
        &'a mut Vec<f32>,
        &'a mut [f32],
    );

    /// # Safety
    /// The CPU must have AVX-512 F; heads are of 64, and `q` holds G of them.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn attend_group<T: KvElement, const G: usize>(
        (q, keys, values, layout, kv_head, table, len, scores, out): Args<T>,
    ) {
        let PagedLayout {
            kv_heads: kv,
            block_size: bs,
            head_dim: d,
            ..
        } = layout;
        assert!(d == 16 * V && q.len() == G * d && out.len() == G * d && len > 0);
        let mut qh = [[_mm512_setzero_ps(); V]; G];
        for (j, head) in qh.iter_mut().enumerate() {
            for (c, v) in head.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(q.as_ptr().add(j * d + 16 * c));
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        scores.clear();
        scores.resize(G * len, 0.0);
        let walk = Walk::new(table, kv, kv_head, bs, d, len);
        for b in 0..walk.blocks {
            let here = walk.start(b);
            for t in 0..walk.positions(b) {
                walk.fetch(keys, values, b, t);
                let k = keys[here + t * d..here + (t + 1) * d].as_ptr();
                let mut kr = [_mm512_setzero_ps(); V];
                for (c, v) in kr.iter_mut().enumerate() {
                    *v = T::load16(k.add(16 * c));
                }
                for (j, head) in qh.iter().enumerate() {
                    let mut acc = _mm512_mul_ps(head[0], kr[0]);
                    for c in 1..V {
                        acc = _mm512_fmadd_ps(head[c], kr[c], acc);
                    }
                    scores[j * len + b * bs + t] = lane_sum(acc) * scale;
                }
            }
        }
        softmax_each(scores, len);
        let mut acc = [[_mm512_setzero_ps(); V]; G];
        for b in 0..walk.blocks {
            let here = walk.start(b);
            for t in 0..walk.positions(b) {
                let p = b * bs + t;
                let v = values[here + t * d..here + (t + 1) * d].as_ptr();
                let mut vr = [_mm512_setzero_ps(); V];
                for (c, x) in vr.iter_mut().enumerate() {
                    *x = T::load16(v.add(16 * c));
                }
                for (j, head) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(scores[j * len + p]);
                    for (a, x) in head.iter_mut().zip(&vr) {
                        *a = _mm512_fmadd_ps(w, *x, *a);
                    }
                }
            }
        }
        for (j, head) in acc.iter().enumerate() {
            for (c, a) in head.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(j * d + 16 * c), *a);
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Walking a block table

/// The blocks of one sequence's table as one key/value head's rows lie in the pool, walked
/// block by block (a division per position would cost more than its products). Blocks lie
/// anywhere in the pool, beyond the reach of the hardware prefetcher, so each position asks
/// for rows ahead ([`Walk::fetch`]).
#[derive(Clone, Copy)]
struct Walk<'a> {
    table: &'a [usize],
    kv: usize,
    kv_head: usize,
    bs: usize,
    d: usize,
    len: usize,
    /// Blocks holding the first `len` positions.
    blocks: usize,
}

impl<'a> Walk<'a> {
    #[inline(always)]
    fn new(table: &'a [usize], kv: usize, kv_head: usize, bs: usize, d: usize, len: usize) -> Self {
        let blocks = len.div_ceil(bs);
        Self {
            table,
            kv,
            kv_head,
            bs,
            d,
            len,
            blocks,
        }
    }

    /// Where block `b`'s first row starts.
    #[inline(always)]
    fn start(&self, b: usize) -> usize {
        (self.table[b] * self.kv + self.kv_head) * self.bs * self.d
    }

    /// Asks the cache for the keys at position `t` of the next block and for the values at
    /// position `t` of block `b`, which the second pass reads.
    #[inline(always)]
    fn fetch<T>(&self, keys: &[T], values: &[T], b: usize, t: usize) {
        let d = self.d;
        if b + 1 < self.blocks {
            let next = self.start(b + 1) + t * d;
            prefetch(&keys[next..next + d]);
        }
        let here = self.start(b) + t * d;
        prefetch(&values[here..here + d]);
    }

    /// Positions of the first `len` in block `b`.
    #[inline(always)]
    fn positions(&self, b: usize) -> usize {
        self.bs.min(self.len - b * self.bs)
    }
}

// ----------------------------------------------------------------------------
// Small helpers: softmax, widening, prefetch, multiply-add and lane sums

/// Each run of `len` scores replaced by its softmax.
#[inline(always)]
fn softmax_each(scores: &mut [f32], len: usize) {
    for s in scores.chunks_exact_mut(len.max(1)) {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv = 1.0 / crate::exp::exp_shifted(s, max);
        s.iter_mut().for_each(|v| *v *= inv);
    }
}

/// `src` widened into `dst`, with F16C where `FMA` (the caller compiled for AVX2, FMA and
/// F16C). A function, not a closure: a closure is not compiled with its caller's features.
#[inline(always)]
fn widen<T: KvElement, const FMA: bool>(src: &[T], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: only the caller compiled for AVX2, FMA and F16C sets FMA, and it runs
        // where they were detected.
        return unsafe { T::widen_f16c(src, dst) };
    }
    T::widen(src, dst)
}

/// Asks the cache for the lines of `row` (a head's keys or values at one position).
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(64 / std::mem::size_of::<T>().max(1)) {
        // SAFETY: SSE is part of x86-64; a prefetch reads nothing.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// a * b + c, fused when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// sum a * b in sixteen lanes, so that the compiler vectorizes it: lane l takes elements l,
/// l + 16, ... (the first product rounded alone, then multiply-adds), and the lanes are
/// added by [`lane_sum`]. The AVX-512 kernel sums its vectors in just this way, so that
/// both give the same bits.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (c, (x, y)) in a16.zip(b16).enumerate() {
        for l in 0..16 {
            lanes[l] = if c == 0 {
                x[l] * y[l]
            } else {
                madd::<FMA>(x[l], y[l], lanes[l])
            };
        }
    }
    lane_sum(lanes) + tail
}

/// The sixteen lanes added as a tree: lane i + lane i + 8, then halves of four, two, one.
#[inline(always)]
fn lane_sum(l: [f32; 16]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|i| l[i] + l[i + 8]);
    let b: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    (b[0] + b[2]) + (b[1] + b[3])
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) / 250.0)
            .collect()
    }

    #[test]
    fn paged_attention_matches_a_contiguous_reference() {
        // 2 rows over shuffled blocks of 4: lengths 7 (a partial block) and 1.
        let tables: [&[usize]; 2] = [&[3, 0], &[4]];
        matches_the_reference::<f32>(6, 2, 4, 5, 5, &[(tables[0], 7), (tables[1], 1)]);
    }

    #[test]
    fn tables_of_many_blocks_match_the_reference() {
        // Heads of 64 over tables of five, two and one blocks of 8, the last ones partial.
        let tables: [&[usize]; 3] = [&[5, 0, 7, 2, 9], &[1, 3], &[8]];
        let rows = [(tables[0], 37), (tables[1], 16), (tables[2], 1)];
        matches_the_reference::<f32>(9, 3, 8, 64, 10, &rows);
    }

    #[test]
    fn an_f16_cache_matches_the_reference_over_its_values() {
        // Heads of 64 (eight F16C conversions a row) and of 5 (the tail converted alone).
        let tables: [&[usize]; 2] = [&[5, 0, 7, 2, 9], &[8]];
        matches_the_reference::<f16>(9, 3, 8, 64, 10, &[(tables[0], 37), (tables[1], 3)]);
        matches_the_reference::<f16>(6, 2, 4, 5, 10, &[(tables[0], 19), (tables[1], 2)]);
    }

    #[test]
    fn the_avx2_and_avx512_kernels_give_the_same_bits() {
        use crate::matvec::Isa;
        if !Isa::available().contains(&Isa::Avx512Vnni) {
            return;
        }
        let layout = PagedLayout {
            heads: 9,
            kv_heads: 3,
            block_size: 8,
            head_dim: 64,
        };
        let table = [5, 0, 7, 2, 9];
        let cache = values(10 * 3 * 8 * 64, 4);
        let mut halves = vec![f16::ZERO; cache.len()];
        f16::narrow(&cache, &mut halves);
        let q = values(3 * 64, 5);
        for len in [1, 17, 37] {
            for kv_head in 0..3 {
                let run = |wide: bool| {
                    let (mut scores, mut out) = (Vec::new(), vec![0f32; 3 * 64]);
                    let (k, v) = (&halves[..], &halves[..]);
                    // SAFETY: AVX-512 F (and so AVX2, FMA and F16C) was detected.
                    unsafe {
                        if wide {
                            let t = &table[..];
                            let args = (
                                &q[..],
                                k,
                                v,
                                layout,
                                kv_head,
                                t,
                                len,
                                &mut scores,
                                &mut out[..],
                            );
                            avx512::attend_group::<f16, 3>(args);
                        } else {
                            let t = &table[..];
                            attend_group_avx2(
                                &q,
                                k,
                                v,
                                layout,
                                kv_head,
                                t,
                                len,
                                &mut scores,
                                &mut out,
                            );
                        }
                    }
                    out
                };
                assert_eq!(run(false), run(true), "len {len} head {kv_head}");
            }
        }
    }

    /// `paged_decode_attention` against attention in f64 over the rows' positions.
    fn matches_the_reference<T: KvElement>(
        h: usize,
        kv: usize,
        bs: usize,
        d: usize,
        blocks: usize,
        rows: &[(&[usize], usize)],
    ) {
        let layout = PagedLayout {
            heads: h,
            kv_heads: kv,
            block_size: bs,
            head_dim: d,
        };
        // The cache holds T; the reference reads what it holds.
        let stored = |seed| {
            let exact = values(blocks * kv * bs * d, seed);
            let mut held = vec![T::default(); exact.len()];
            T::narrow(&exact, &mut held);
            let mut read = vec![0f32; exact.len()];
            T::widen(&held, &mut read);
            (held, read)
        };
        let ((key_cache, keys), (value_cache, vals)) = (stored(1), stored(2));
        let q = values(rows.len() * h * d, 3);
        let got = paged_decode_attention(&q, &key_cache, &value_cache, layout, rows);
        for (i, &(table, len)) in rows.iter().enumerate() {
            for head in 0..h {
                let kvh = head / (h / kv);
                let at = |p: usize| ((table[p / bs] * kv + kvh) * bs + p % bs) * d;
                let qh = &q[(i * h + head) * d..][..d];
                let scores: Vec<f64> = (0..len)
                    .map(|p| {
                        let s: f64 = (0..d).map(|x| qh[x] as f64 * keys[at(p) + x] as f64).sum();
                        s / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for x in 0..d {
                    let want: f64 = (0..len)
                        .map(|p| (scores[p] - max).exp() / total * vals[at(p) + x] as f64)
                        .sum();
                    let g = got[(i * h + head) * d + x] as f64;
                    assert!(
                        (g - want).abs() < 1e-5,
                        "row {i} head {head} [{x}]: {g} vs {want}"
                    );
                }
            }
        }
    }
}
