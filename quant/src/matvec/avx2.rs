//! The kernels on AVX2 with FMA and F16C. The block kernels take integer dot products of
//! bytes (`maddubs`), as in llama.cpp's x86 path; they are written once for either way of
//! taking them, so that `avx512.rs` compiles the same kernels with AVX-512 VNNI's `vpdpbusd`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::q8::{Q8Row, Q8Rows};
use super::{BLOCK, FOUR_BIT_BLOCK};
use crate::ggml::GgmlType;

/// The least distance in bytes ahead of the current block that the kernels ask the cache
/// for: the hardware prefetcher alone leaves the weight stream short of memory
/// bandwidth.
const PREFETCH: usize = 1024;

// ----------------------------------------------------------------------------
// Ggml blocks against 8-bit activation blocks

/// The block formats as type-level codes, so that every kernel is compiled for one.
const Q8: u8 = 0;
const Q40: u8 = 1;
const Q41: u8 = 2;

/// The bytes of one block of the format.
const fn block_bytes<const TY: u8>() -> usize {
    match TY {
        Q8 => 34,
        Q40 => 18,
        _ => 20,
    }
}

/// Weight rows `rows` of the ggml blocks `w` (rows of k / 32 blocks) against the `m`
/// rows of `xq`: `out[i * rows.len() + j - rows.start]`.
///
/// Every (weight row, activation row) pair is summed the same way whichever kernel and
/// tile computes it: per block the exact integer dot product of the codes, then
/// acc = fma(dw_b * dx_b, isum_b, acc) and min = fma(m_b, s_b, min) in block order, and
/// acc + min, where m_b is Q4_1's minimum or -8 dw_b for Q4_0 (whose codes count as
/// unsigned nibbles) and s_b = dx_b * sum(x_b). A row's result never depends on the rows
/// it shares a call with.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `w` holds at least `rows.end` rows of whole
/// blocks of `ty`, `xq` m rows of k codes, and `out` `rows.len() * m` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn block_rows(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    xq: &Q8Rows,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    block_rows_of::<false>(ty, w, k, xq, m, rows, out)
}

/// [`block_rows`] compiled for each block format.
#[inline(always)]
pub(super) unsafe fn block_rows_of<const VNNI: bool>(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    xq: &Q8Rows,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    match ty {
        GgmlType::Q8_0 => block_rows_for::<Q8, VNNI>(w, k, xq, m, rows, out),
        GgmlType::Q4_0 => block_rows_for::<Q40, VNNI>(w, k, xq, m, rows, out),
        _ => block_rows_for::<Q41, VNNI>(w, k, xq, m, rows, out),
    }
}

#[inline(always)]
unsafe fn block_rows_for<const TY: u8, const VNNI: bool>(
    w: &[u8],
    k: usize,
    xq: &Q8Rows,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let blocks = k / BLOCK;
    let row_bytes = blocks * block_bytes::<TY>();
    let n = rows.len();
    // Rows past the last of a group stand in as copies of the last row; their sums are
    // dropped.
    if n == 0 {
        return;
    }
    let weight = |j: usize| w.as_ptr().add((rows.start + j.min(n - 1)) * row_bytes);
    let mut i = 0;
    // Tiles of eight, then four activation rows meet eight weight rows at a time.
    // Taken out of the thread-local for the loop: a closure would not be compiled with
    // this function's target features, and the kernels inlined into it would not be.
    let mut repacked = REPACKED.take();
    while i + 4 <= m {
        let tile = if i + 8 <= m { 8 } else { 4 };
        repack(xq, k, i..i + tile, &mut repacked);
        for j in (0..n).step_by(8) {
            let ws: [*const u8; 8] = std::array::from_fn(|t| weight(j + t));
            let mut put = |t: usize, sums: [f32; 8]| {
                let row = &mut out[(i + t) * n + j..(i + t + 1) * n];
                for (o, v) in row.iter_mut().zip(sums) {
                    *o = v;
                }
            };
            if tile == 8 {
                let x = std::array::from_fn(|t| xq.row(i + t, k));
                for (t, sums) in eight_by::<TY, VNNI, 8>(ws, blocks, x, &repacked)
                    .into_iter()
                    .enumerate()
                {
                    put(t, sums);
                }
            } else {
                let x = std::array::from_fn(|t| xq.row(i + t, k));
                for (t, sums) in eight_by::<TY, VNNI, 4>(ws, blocks, x, &repacked)
                    .into_iter()
                    .enumerate()
                {
                    put(t, sums);
                }
            }
        }
        i += tile;
    }
    REPACKED.set(repacked);
    // The rest (decoding) one row at a time, against four weight rows at a time.
    for i in i..m {
        let x = xq.row(i, k);
        for j in (0..n).step_by(4) {
            let sums = four_by_one::<TY, VNNI>(std::array::from_fn(|t| weight(j + t)), blocks, x);
            for (o, v) in out[i * n + j..(i + 1) * n].iter_mut().zip(sums) {
                *o = v;
            }
        }
    }
}

thread_local! {
    /// Each thread's [`repack`] buffer, kept between calls.
    static REPACKED: std::cell::RefCell<Vec<__m256i>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The activation codes of rows `tile` as [`eight_by`] reads them: per row and block eight
/// vectors, vector j holding code group j (codes 4j..4j+4) in every 32-bit lane.
#[inline(always)]
unsafe fn repack(xq: &Q8Rows, k: usize, tile: Range<usize>, out: &mut Vec<__m256i>) {
    let blocks = k / BLOCK;
    out.clear();
    for i in tile {
        let qs = xq.qs.as_ptr().add(i * k);
        for b in 0..blocks {
            let g = qs.add(b * BLOCK) as *const i32;
            for j in 0..8 {
                out.push(_mm256_set1_epi32(g.add(j).read_unaligned()));
            }
        }
    }
}

/// One block's 32 codes as bytes: Q8_0's signed ones, or Q4_0's and Q4_1's nibbles.
#[inline(always)]
unsafe fn codes<const TY: u8>(wb: *const u8, low: __m256i) -> __m256i {
    match TY {
        Q8 => _mm256_loadu_si256(wb.add(2) as *const __m256i),
        Q40 => nibbles(wb.add(2), low),
        _ => nibbles(wb.add(4), low),
    }
}

/// The 32 nibbles of 16 bytes as bytes: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8, low: __m256i) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    _mm256_and_si256(both, low)
}

/// Block b's scales and minimums of N weight rows, lane r for row r (N of 4 or 8).
#[inline(always)]
unsafe fn scales<const TY: u8, const N: usize>(w: &[*const u8; N], b: usize) -> (__m256, __m256) {
    let bytes = block_bytes::<TY>();
    // Built in registers: narrow stores into a buffer read back as one vector would
    // stall the load on store forwarding, once per block.
    let half = |r: usize, at: usize| -> i16 {
        if r < N {
            (w[r].add(b * bytes + at) as *const i16).read_unaligned()
        } else {
            0
        }
    };
    let eight = |at: usize| {
        _mm_setr_epi16(
            half(0, at),
            half(1, at),
            half(2, at),
            half(3, at),
            half(4, at),
            half(5, at),
            half(6, at),
            half(7, at),
        )
    };
    let d = _mm256_cvtph_ps(eight(0));
    let m = match TY {
        Q41 => _mm256_cvtph_ps(eight(2)),
        Q40 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
        _ => _mm256_setzero_ps(),
    };
    (d, m)
}

/// Asks the cache for each row's bytes `ahead` bytes past `at`.
#[inline(always)]
unsafe fn prefetch<const N: usize>(w: &[*const u8; N], at: usize, ahead: usize) {
    for row in w {
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at + ahead) as *const i8);
    }
}

/// `acc` plus, in each 32-bit lane, the four products of unsigned bytes of `u` and signed
/// bytes of `s`: one `vpdpbusd` with VNNI, else `maddubs` (whose 16-bit pair sums stay in
/// range for the codes here) and `madd`.
#[inline(always)]
unsafe fn dot_bytes<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(acc, u, s)
    } else {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// Four weight rows against one activation row (decoding): the sums of [`block_rows`].
#[inline(always)]
unsafe fn four_by_one<const TY: u8, const VNNI: bool>(
    w: [*const u8; 4],
    blocks: usize,
    x: Q8Row,
) -> [f32; 4] {
    let bytes = block_bytes::<TY>();
    let low = _mm256_set1_epi8(0x0f);
    let mut acc = _mm_setzero_ps();
    // The four rows lie side by side, and the next call takes the next four: ask for the
    // same block of those. A fixed distance would fall inside this call's own rows when
    // they are short (k = 576 is 612 bytes of Q8_0 a row).
    let ahead = (4 * blocks * bytes).max(PREFETCH);
    for b in 0..blocks {
        prefetch(&w, b * bytes, ahead);
        let y = _mm256_loadu_si256(x.qs.as_ptr().add(b * BLOCK) as *const __m256i);
        let p: [__m256i; 4] = std::array::from_fn(|r| {
            let q = codes::<TY>(w[r].add(b * bytes), low);
            let zero = _mm256_setzero_si256();
            if TY == Q8 {
                // The products take unsigned by signed bytes: move q's sign onto y.
                dot_bytes::<VNNI>(zero, _mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
            } else {
                dot_bytes::<VNNI>(zero, q, y)
            }
        });
        // Lane r: the sum of row r's eight partial sums.
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
        let isum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        let (d, m) = scales::<TY, 4>(&w, b);
        if TY != Q8 {
            let s = _mm_set1_ps(*x.s.get_unchecked(b));
            acc = _mm_fmadd_ps(_mm256_castps256_ps128(m), s, acc);
        }
        let sc = _mm_mul_ps(
            _mm256_castps256_ps128(d),
            _mm_set1_ps(*x.d.get_unchecked(b)),
        );
        acc = _mm_fmadd_ps(sc, _mm_cvtepi32_ps(isum), acc);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Eight weight rows against R activation rows (R of 4 or 8, `xr` their [`repack`]):
/// `out[t][r]` for activation row t and weight row r, the sums of [`block_rows`].
///
/// Per block the eight rows' codes are transposed in 32-bit groups, so that one byte
/// product covers eight rows and the lanes of the result are rows: no horizontal sums.
/// Q4's packed nibbles are transposed before they are split (16 bytes a row). Without
/// VNNI, Q4's products stay within 16 bits over a block (8 * 2 * 15 * 127 < 2^15) and are
/// widened once; Q8_0's, and every product with VNNI, are summed in 32 bits per group.
#[inline(always)]
unsafe fn eight_by<const TY: u8, const VNNI: bool, const R: usize>(
    w: [*const u8; 8],
    blocks: usize,
    x: [Q8Row; R],
    xr: &[__m256i],
) -> [[f32; 8]; R] {
    let bytes = block_bytes::<TY>();
    let low = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    // As in `four_by_one`: the same block of the next eight rows.
    let ahead = (8 * blocks * bytes).max(PREFETCH);
    for b in 0..blocks {
        prefetch(&w, b * bytes, ahead);
        // c[g]: code group g (codes 4g..4g+4) of row r in lane r.
        let c: [__m256i; 8] = if TY == Q8 {
            let rows: [__m256i; 8] = std::array::from_fn(|r| {
                _mm256_loadu_si256(w[r].add(b * bytes + 2) as *const __m256i)
            });
            let u = transpose_halves(rows);
            std::array::from_fn(|g| {
                let j = g % 4;
                if g < 4 {
                    _mm256_permute2x128_si256::<0x20>(u[j], u[4 + j])
                } else {
                    _mm256_permute2x128_si256::<0x31>(u[j], u[4 + j])
                }
            })
        } else {
            let at = b * bytes + if TY == Q40 { 2 } else { 4 };
            let raw = |r: usize| _mm_loadu_si128(w[r].add(at) as *const __m128i);
            let pairs: [__m256i; 4] = std::array::from_fn(|r| _mm256_set_m128i(raw(r + 4), raw(r)));
            let t = transpose4(pairs);
            std::array::from_fn(|g| {
                if g < 4 {
                    _mm256_and_si256(t[g], low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(t[g - 4]), low)
                }
            })
        };
        let (d, m) = scales::<TY, 8>(&w, b);
        // The unsigned side of each group's products: Q4's nibbles, or Q8_0's magnitudes
        // (their signs then move onto the activations).
        let unsigned: [__m256i; 8] = if TY == Q8 {
            std::array::from_fn(|g| _mm256_sign_epi8(c[g], c[g]))
        } else {
            c
        };
        for t in 0..R {
            let xv = xr.as_ptr().add((t * blocks + b) * 8);
            let isum = if TY == Q8 || VNNI {
                let mut sum = _mm256_setzero_si256();
                for (g, cg) in c.iter().enumerate() {
                    let signed = if TY == Q8 {
                        _mm256_sign_epi8(*xv.add(g), *cg)
                    } else {
                        *xv.add(g)
                    };
                    sum = dot_bytes::<VNNI>(sum, unsigned[g], signed);
                }
                sum
            } else {
                let mut sum = _mm256_setzero_si256();
                for (g, cg) in c.iter().enumerate() {
                    sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(*cg, *xv.add(g)));
                }
                _mm256_madd_epi16(sum, ones)
            };
            if TY != Q8 {
                let s = _mm256_set1_ps(*x[t].s.get_unchecked(b));
                acc[t] = _mm256_fmadd_ps(m, s, acc[t]);
            }
            let sc = _mm256_mul_ps(d, _mm256_set1_ps(*x[t].d.get_unchecked(b)));
            acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(isum), acc[t]);
        }
    }
    std::array::from_fn(|t| {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[t]);
        out
    })
}

/// Four vectors of eight 32-bit groups, transposed within each 128-bit half: vector g
/// holds group g of vectors 0-3 in its low half and group 4 + g in its high half.
#[inline(always)]
unsafe fn transpose4(r: [__m256i; 4]) -> [__m256i; 4] {
    let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
    let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
    let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

/// Eight rows of eight 32-bit groups, transposed within each 128-bit half: vector j < 4
/// holds group j of rows 0-3 in its low half and group j + 4 in its high half; vector
/// 4 + j the same for rows 4-7.
#[inline(always)]
unsafe fn transpose_halves(c: [__m256i; 8]) -> [__m256i; 8] {
    let [u0, u1, u2, u3] = transpose4([c[0], c[1], c[2], c[3]]);
    let [u4, u5, u6, u7] = transpose4([c[4], c[5], c[6], c[7]]);
    [u0, u1, u2, u3, u4, u5, u6, u7]
}

// ----------------------------------------------------------------------------
// Float weights (bf16 and f32), and the sums of a low-rank product

/// sum w * x for bf16 `w` and f32 `x` of one length.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i + PREFETCH / 2) as *const i8);
        for (h, a) in acc.iter_mut().enumerate() {
            let bits = _mm_loadu_si128(w.as_ptr().add(i + 8 * h) as *const __m128i);
            let wf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
            *a = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x.as_ptr().add(i + 8 * h)), *a);
        }
        i += 16;
    }
    let mut tail = 0f32;
    while i < n {
        tail += f32::from_bits((w[i] as u32) << 16) * x[i];
        i += 1;
    }
    horizontal_sum(_mm256_add_ps(acc[0], acc[1])) + tail
}

/// sum w * x for f32 rows of one length.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        let ahead = w.as_ptr().wrapping_add(i + PREFETCH / 4);
        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16) as *const i8);
        for (h, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_loadu_ps(w.as_ptr().add(i + 8 * h));
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i + 8 * h)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        let wv = _mm256_loadu_ps(w.as_ptr().add(i));
        acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i)), acc[0]);
        i += 8;
    }
    let mut tail = 0f32;
    while i < n {
        tail += w[i] * x[i];
        i += 1;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    horizontal_sum(sum) + tail
}

/// u += s * b over their common length.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn axpy(u: &mut [f32], s: f32, b: &[f32]) {
    let n = u.len().min(b.len());
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= n {
        let p = u.as_mut_ptr().add(i);
        let bv = _mm256_loadu_ps(b.as_ptr().add(i));
        _mm256_storeu_ps(p, _mm256_fmadd_ps(sv, bv, _mm256_loadu_ps(p)));
        i += 8;
    }
    while i < n {
        u[i] = s.mul_add(b[i], u[i]);
        i += 1;
    }
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_sum(v: __m256) -> f32 {
    let sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    let sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    _mm_cvtss_f32(sum)
}

// ----------------------------------------------------------------------------
// bitsandbytes 4-bit codes against f32 activations

/// One row of bitsandbytes 4-bit codes against R f32 activation rows. Per block of 64 the
/// codes become f32 through the code book (two 8-value halves picked by bit 3), meet
/// each row in two chains of four multiply-adds, and the block's sum is scaled by its
/// absmax into the row's total.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `codes` holds 32 bytes and each row of `x` 64 values
/// per entry of `absmax`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn four_bit<const R: usize>(
    code: &[f32; 16],
    codes: &[u8],
    absmax: &[f32],
    x: [&[f32]; R],
) -> [f32; R] {
    let low_half = _mm256_loadu_ps(code.as_ptr());
    let high_half = _mm256_loadu_ps(code.as_ptr().add(8));
    // Element e of a 32-bit word of codes sits at these bits: high nibble first.
    let shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    let fifteen = _mm256_set1_epi32(15);
    let mut total = [_mm256_setzero_ps(); R];
    for (b, &scale) in absmax.iter().enumerate() {
        let bytes = codes.as_ptr().add(b * FOUR_BIT_BLOCK / 2);
        _mm_prefetch::<_MM_HINT_T0>(bytes.wrapping_add(PREFETCH) as *const i8);
        let values: [__m256; 8] = std::array::from_fn(|g| {
            let word = (bytes.add(4 * g) as *const i32).read_unaligned();
            let idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), fifteen);
            let picked_low = _mm256_permutevar8x32_ps(low_half, idx);
            let picked_high = _mm256_permutevar8x32_ps(high_half, idx);
            let upper = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
            _mm256_blendv_ps(picked_low, picked_high, upper)
        });
        let scale = _mm256_set1_ps(scale);
        for (t, row) in x.iter().enumerate() {
            let xp = row.as_ptr().add(b * FOUR_BIT_BLOCK);
            let mut even = _mm256_setzero_ps();
            let mut odd = _mm256_setzero_ps();
            for g in (0..8).step_by(2) {
                even = _mm256_fmadd_ps(values[g], _mm256_loadu_ps(xp.add(8 * g)), even);
                odd = _mm256_fmadd_ps(values[g + 1], _mm256_loadu_ps(xp.add(8 * g + 8)), odd);
            }
            total[t] = _mm256_fmadd_ps(scale, _mm256_add_ps(even, odd), total[t]);
        }
    }
    std::array::from_fn(|t| horizontal_sum(total[t]))
}

// ----------------------------------------------------------------------------
// Activations rounded to 8-bit blocks

/// [`super::portable::quantize_block`] on 256-bit vectors (the same codes: conversion
/// rounds to nearest even).
///
/// # Safety
/// The CPU must have AVX2; `x` and `codes` hold 32 values.
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_block(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let a = v.map(|v| _mm256_and_ps(v, abs_mask));
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let amax = _mm_cvtss_f32(m);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let sum = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0x4e>(sum));
    let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<0xb1>(sum));
    // The packs interleave 128-bit halves; the permute puts the codes back in order.
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, ordered);
    (d, _mm_cvtsi128_si32(sum))
}
