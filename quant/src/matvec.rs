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

use half::f16;
use rayon::prelude::*;

use crate::ggml::GgmlType;

/// Weights per block of every format here.
pub const BLOCK: usize = 32;

/// Most rows of x for which [`matmul_bf16`] beats dequantize-then-GEMM (decoding batches).
pub const MAX_ROWS: usize = 64;

/// An instruction set a kernel is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// AVX2 plus AVX-512 VNNI (`vpdpbusd` on 256-bit vectors, AVX512VL).
    Avx512Vnni,
}

impl Isa {
    /// Every variant this CPU can run, portable first.
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        if avx2_detected() {
            out.push(Isa::Avx2);
        }
        if avx512_vnni_detected() {
            out.push(Isa::Avx512Vnni);
        }
        out
    }

    /// The variant the kernels use: the best this CPU has.
    pub fn active() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Portable)
    }

    /// The variant's name, for tables.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }
}

fn avx512_vnni_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_detected()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn avx2_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f` on one of the kernel threads: the products inside it then share their work with
/// the other threads without parking and waking the calling thread at every call.
pub fn on_kernel_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Whether [`matmul`] has a kernel for weights of type `ty`.
pub fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1)
}

/// Rows of activations quantized like llama.cpp's Q8_1: per block of 32, signed 8-bit codes,
/// the scale d = absmax / 127 and s = d * (sum of the codes).
struct Q8Rows {
    qs: Vec<i8>,
    /// The codes plus 128, as unsigned bytes (VNNI multiplies unsigned by signed).
    qu: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
    /// Each block's d repeated 8 times: two blocks' scales are one 512-bit load.
    d8: Vec<f32>,
}

impl Q8Rows {
    fn new(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut out = Self {
            qs: Vec::with_capacity(x.len()),
            qu: Vec::with_capacity(x.len()),
            d: Vec::with_capacity(blocks),
            s: Vec::with_capacity(blocks),
            d8: Vec::with_capacity(blocks * 8),
        };
        for block in x.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let start = out.qs.len();
            out.qs.extend(block.iter().map(|v| round(v * id) as i8));
            out.qu
                .extend(out.qs[start..].iter().map(|&q| (q as u8) ^ 0x80));
            let sum: i32 = out.qs[start..].iter().map(|&q| q as i32).sum();
            out.d.push(d);
            out.d8.extend([d; 8]);
            out.s.push(d * sum as f32);
        }
        out
    }
}

/// `x` rounded to the nearest integer, ties to even, for |x| < 2^22: adding and taking off
/// 1.5 * 2^23 leaves no fraction bits (a libm call per value would cost more than the
/// products it feeds).
#[inline(always)]
fn round(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// y [m, n] = x [m, k] W^T for W [n, k] stored as `ty` blocks along k (`w`: n rows of
/// k / 32 blocks, as in a GGUF file). `k` must be a multiple of 32 and `ty` one that
/// [`supports`] accepts.
pub fn matmul(ty: GgmlType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    matmul_on(Isa::active(), ty, w, n, k, x, m)
}

/// [`matmul`] with the kernels of `isa`, which must be one of [`Isa::available`].
fn matmul_on(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    assert!(
        supports(ty) && k.is_multiple_of(BLOCK),
        "matmul: {ty:?} with k = {k}"
    );
    let row_bytes = k / BLOCK * ty.block_bytes();
    assert_eq!(w.len(), n * row_bytes, "matmul: weight bytes");
    assert_eq!(x.len(), m * k, "matmul: activation length");
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let xq = Q8Rows::new(x);
    let blocks = k / BLOCK;
    by_weight_rows(n, m, |r0, out| {
        let row = |i: usize| Q8Row {
            qs: &xq.qs[i * k..(i + 1) * k],
            qu: &xq.qu[i * k..(i + 1) * k],
            d: &xq.d[i * blocks..(i + 1) * blocks],
            s: &xq.s[i * blocks..(i + 1) * blocks],
            d8: &xq.d8[i * blocks * 8..(i + 1) * blocks * 8],
        };
        let weight = |j: usize| &w[(r0 + j) * row_bytes..(r0 + j + 1) * row_bytes];
        // Eight (then four) activation rows at a time share each decoded weight block; every
        // row's sums are the same whichever rows it shares a tile with.
        let mut i = 0;
        while i + TILE <= m {
            let rows: [Q8Row; TILE] = std::array::from_fn(|t| row(i + t));
            for (j, out_row) in out.chunks_mut(m).enumerate() {
                out_row[i..i + TILE].copy_from_slice(&dots(isa, ty, weight(j), rows));
            }
            i += TILE;
        }
        if i + TILE / 2 <= m {
            let rows: [Q8Row; TILE / 2] = std::array::from_fn(|t| row(i + t));
            for (j, out_row) in out.chunks_mut(m).enumerate() {
                out_row[i..i + TILE / 2].copy_from_slice(&dots(isa, ty, weight(j), rows));
            }
            i += TILE / 2;
        }
        for i in i..m {
            for (j, out_row) in out.chunks_mut(m).enumerate() {
                out_row[i] = dots(isa, ty, weight(j), [row(i)])[0];
            }
        }
    })
}

/// Activation rows one decoded weight block meets at once (at most).
const TILE: usize = 8;

/// One quantized activation row: codes, block scales, scaled code sums.
#[derive(Clone, Copy)]
struct Q8Row<'a> {
    qs: &'a [i8],
    qu: &'a [u8],
    d: &'a [f32],
    s: &'a [f32],
    d8: &'a [f32],
}

/// y [m, n] = x [m, k] W^T for W [n, k] stored as bf16 bits, activations in f32 (bf16 has
/// the range of f32, so nothing is rounded but the weights themselves).
pub fn matmul_bf16(w: &[u16], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    matmul_bf16_on(Isa::active(), w, n, k, x, m)
}

/// [`matmul_bf16`] with the kernels of `isa`, which must be one of [`Isa::available`].
fn matmul_bf16_on(isa: Isa, w: &[u16], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "matmul_bf16: weight length");
    assert_eq!(x.len(), m * k, "matmul_bf16: activation length");
    if m == 0 || n == 0 {
        return Vec::new();
    }
    by_weight_rows(n, m, |r0, out| {
        for (j, out_row) in out.chunks_mut(m).enumerate() {
            let wrow = &w[(r0 + j) * k..(r0 + j + 1) * k];
            for (i, o) in out_row.iter_mut().enumerate() {
                let xrow = &x[i * k..(i + 1) * k];
                *o = match isa {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 and FMA were detected for both variants; the rows have the
                    // same length.
                    Isa::Avx2 | Isa::Avx512Vnni => unsafe { avx2::dot_bf16(wrow, xrow) },
                    _ => portable::dot_bf16(wrow, xrow),
                };
            }
        }
    })
}

/// y [m, n] where `rows(r0, out)` fills out[j * m + i] = y[i, r0 + j] for a run of weight rows
/// from r0 (up to [`WEIGHT_ROWS`]), the weight rows split evenly over rayon's threads (each
/// task owns a run of rows of the transposed output).
fn by_weight_rows(n: usize, m: usize, rows: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut yt = vec![0f32; n * m];
    let rows_per_task = n.div_ceil(rayon::current_num_threads()).max(1);
    yt.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(t, out)| {
            for (c, chunk) in out.chunks_mut(WEIGHT_ROWS * m).enumerate() {
                rows(t * rows_per_task + c * WEIGHT_ROWS, chunk);
            }
        });
    transpose(&yt, n, m)
}

/// Weight rows a task hands to its kernel at once: together with one tile of activation
/// rows they stay in the L1 cache while the tile meets each of them.
const WEIGHT_ROWS: usize = 16;

/// [n, m] to [m, n].
fn transpose(yt: &[f32], n: usize, m: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for (r, row) in yt.chunks(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            y[i * n + r] = *v;
        }
    }
    y
}

/// One weight row against R quantized activation rows.
fn dots<const R: usize>(isa: Isa, ty: GgmlType, w: &[u8], rows: [Q8Row; R]) -> [f32; R] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is active only where AVX2, FMA and F16C were detected, and the
        // slices hold whole blocks (checked by `matmul`).
        Isa::Avx2 => unsafe { avx2::dots(ty, w, rows) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX-512 F, VNNI, VL and BW detected too.
        Isa::Avx512Vnni => unsafe { avx512::dots(ty, w, rows) },
        _ => rows.map(|x| portable::dot(ty, w, x.qs, x.d, x.s)),
    }
}

/// The kernels in plain Rust: the reference the SIMD versions must match.
mod portable {
    use super::*;

    pub fn dot(ty: GgmlType, w: &[u8], qs: &[i8], d: &[f32], s: &[f32]) -> f32 {
        let bytes = ty.block_bytes();
        let mut acc = 0f32;
        for (b, wb) in w.chunks_exact(bytes).enumerate() {
            let x = &qs[b * BLOCK..(b + 1) * BLOCK];
            let dw = f16_at(wb, 0);
            acc += match ty {
                GgmlType::Q8_0 => {
                    let sum: i32 = wb[2..34]
                        .iter()
                        .zip(x)
                        .map(|(&q, &v)| q as i8 as i32 * v as i32)
                        .sum();
                    dw * d[b] * sum as f32
                }
                GgmlType::Q4_0 => dw * d[b] * nibble_dot(&wb[2..18], x, 8) as f32,
                GgmlType::Q4_1 => {
                    dw * d[b] * nibble_dot(&wb[4..20], x, 0) as f32 + f16_at(wb, 2) * s[b]
                }
                _ => unreachable!("no kernel for {ty:?}"),
            };
        }
        acc
    }

    pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
        w.iter()
            .zip(x)
            .map(|(&b, &v)| f32::from_bits((b as u32) << 16) * v)
            .sum()
    }

    /// sum (q - offset) * x over a block's 16 bytes of nibbles: low nibbles are elements
    /// 0..16, high nibbles 16..32.
    fn nibble_dot(q: &[u8], x: &[i8], offset: i32) -> i32 {
        q.iter()
            .enumerate()
            .map(|(j, &b)| {
                ((b & 0x0f) as i32 - offset) * x[j] as i32
                    + ((b >> 4) as i32 - offset) * x[j + 16] as i32
            })
            .sum()
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The kernels with AVX2 integer dot products (`maddubs`), as in llama.cpp's x86 path, or
/// AVX-512 VNNI's `vpdpbusd` where the CPU has it.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `w` holds whole blocks of `ty` and each row
    /// 32 codes per block of `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots<const R: usize>(ty: GgmlType, w: &[u8], rows: [Q8Row; R]) -> [f32; R] {
        dots_with::<false, R>(ty, w, rows)
    }

    /// [`dots`] with the byte products summed by AVX-512 VNNI's `vpdpbusd`.
    ///
    /// # Safety
    /// As [`dots`], and the CPU must have AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dots_vnni<const R: usize>(ty: GgmlType, w: &[u8], rows: [Q8Row; R]) -> [f32; R] {
        dots_with::<true, R>(ty, w, rows)
    }

    /// The loop of both: per weight block, decoded once, and per row, the byte products of
    /// weights and activations scaled by both block scales, plus the Q4_1 minimum times the
    /// activations' scaled sum.
    #[inline(always)]
    unsafe fn dots_with<const VNNI: bool, const R: usize>(
        ty: GgmlType,
        w: &[u8],
        rows: [Q8Row; R],
    ) -> [f32; R] {
        let bytes = ty.block_bytes();
        let blocks = w.len() / bytes;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [0f32; R];
        let low = _mm256_set1_epi8(0x0f);
        for b in 0..blocks {
            let wb = w.as_ptr().add(b * bytes);
            let dw = half_to_f32(wb);
            // Signed codes get the unsigned-by-signed product by moving their sign onto x.
            let (q, signed, min) = match ty {
                GgmlType::Q8_0 => (_mm256_loadu_si256(wb.add(2) as *const __m256i), true, 0.0),
                GgmlType::Q4_0 => (
                    _mm256_sub_epi8(nibbles(wb.add(2), low), _mm256_set1_epi8(8)),
                    true,
                    0.0,
                ),
                _ => (nibbles(wb.add(4), low), false, half_to_f32(wb.add(2))),
            };
            let unsigned_q = if signed { _mm256_sign_epi8(q, q) } else { q };
            // With VNNI, signed codes meet x + 128 (unsigned) and the block's 128 * sum(q)
            // is taken off first: the same integer sum, one instruction per row.
            let offset = if VNNI && signed {
                let ones = _mm256_set1_epi8(-128i8);
                _mm256_sub_epi32(
                    _mm256_setzero_si256(),
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, q),
                )
            } else {
                _mm256_setzero_si256()
            };
            for (j, x) in rows.iter().enumerate() {
                let sums = if VNNI && signed {
                    let xu = _mm256_loadu_si256(x.qu.as_ptr().add(b * BLOCK) as *const __m256i);
                    _mm256_dpbusd_epi32(offset, xu, q)
                } else {
                    let xv = _mm256_loadu_si256(x.qs.as_ptr().add(b * BLOCK) as *const __m256i);
                    if !signed {
                        acc_min[j] += min * x.s[b];
                    }
                    if VNNI {
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned_q, xv)
                    } else {
                        let signed_x = if signed { _mm256_sign_epi8(xv, q) } else { xv };
                        let pairs = _mm256_maddubs_epi16(unsigned_q, signed_x);
                        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
                    }
                };
                acc[j] = _mm256_fmadd_ps(
                    _mm256_set1_ps(dw * x.d[b]),
                    _mm256_cvtepi32_ps(sums),
                    acc[j],
                );
            }
        }
        std::array::from_fn(|j| horizontal_sum(acc[j]) + acc_min[j])
    }

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

    /// The 32 nibbles of 16 bytes as bytes: low nibbles first, then high nibbles.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn nibbles(p: *const u8, low: __m256i) -> __m256i {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        _mm256_and_si256(both, low)
    }

    #[target_feature(enable = "f16c")]
    pub(super) unsafe fn half_to_f32(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        let sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
        _mm_cvtss_f32(sum)
    }
}

/// Two blocks per instruction on 512-bit vectors with AVX-512 VNNI: the codes of blocks b and
/// b + 1 fill one register, the activations' codes and scales of both are one load each.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::avx2::{half_to_f32, nibbles};
    use super::*;

    /// One weight row against R quantized activation rows.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI; `w` holds whole
    /// blocks of `ty` and each row 32 codes (and 8 repeated scales) per block of `w`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dots<const R: usize>(ty: GgmlType, w: &[u8], rows: [Q8Row; R]) -> [f32; R] {
        let bytes = ty.block_bytes();
        let blocks = w.len() / bytes;
        let zero = _mm512_setzero_si512();
        let low = _mm256_set1_epi8(0x0f);
        // Signed codes meet x + 128 with 128 * sum(q) taken off; Q4_1's unsigned codes meet
        // x itself and add their minimum times the activations' scaled sums.
        let signed = !matches!(ty, GgmlType::Q4_1);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_min = [0f32; R];
        for pair in 0..blocks / 2 {
            let b = 2 * pair;
            let (w0, w1) = (w.as_ptr().add(b * bytes), w.as_ptr().add((b + 1) * bytes));
            let q = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(codes(ty, w0, low)),
                codes(ty, w1, low),
            );
            let dw = _mm512_mask_mov_ps(
                _mm512_set1_ps(half_to_f32(w0)),
                0xFF00,
                _mm512_set1_ps(half_to_f32(w1)),
            );
            let offset = if signed {
                _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(-128), q))
            } else {
                zero
            };
            let mins = if signed {
                (0.0, 0.0)
            } else {
                (half_to_f32(w0.add(2)), half_to_f32(w1.add(2)))
            };
            for (j, x) in rows.iter().enumerate() {
                let sums = if signed {
                    let xu = _mm512_loadu_si512(x.qu.as_ptr().add(b * BLOCK) as *const _);
                    _mm512_dpbusd_epi32(offset, xu, q)
                } else {
                    acc_min[j] += mins.0 * x.s[b];
                    acc_min[j] += mins.1 * x.s[b + 1];
                    let xs = _mm512_loadu_si512(x.qs.as_ptr().add(b * BLOCK) as *const _);
                    _mm512_dpbusd_epi32(zero, q, xs)
                };
                let scale = _mm512_mul_ps(dw, _mm512_loadu_ps(x.d8.as_ptr().add(b * 8)));
                acc[j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sums), acc[j]);
            }
        }
        let mut out: [f32; R] = std::array::from_fn(|j| _mm512_reduce_add_ps(acc[j]) + acc_min[j]);
        if blocks % 2 == 1 {
            let b = blocks - 1;
            let tail = rows.map(|x| Q8Row {
                qs: &x.qs[b * BLOCK..],
                qu: &x.qu[b * BLOCK..],
                d: &x.d[b..],
                s: &x.s[b..],
                d8: &x.d8[b * 8..],
            });
            let last = super::avx2::dots_vnni(ty, &w[b * bytes..], tail);
            for (o, l) in out.iter_mut().zip(last) {
                *o += l;
            }
        }
        out
    }

    /// A block's 32 codes: signed for Q8_0 and Q4_0 (nibbles less 8), unsigned for Q4_1.
    #[inline(always)]
    unsafe fn codes(ty: GgmlType, wb: *const u8, low: __m256i) -> __m256i {
        match ty {
            GgmlType::Q8_0 => _mm256_loadu_si256(wb.add(2) as *const __m256i),
            GgmlType::Q4_0 => _mm256_sub_epi8(nibbles(wb.add(2), low), _mm256_set1_epi8(8)),
            _ => nibbles(wb.add(4), low),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{dequantize, quantize_q4_0, quantize_q4_1, quantize_q8_0};

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn encode(ty: GgmlType, w: &[f32]) -> Vec<u8> {
        match ty {
            GgmlType::Q8_0 => quantize_q8_0(w),
            GgmlType::Q4_0 => quantize_q4_0(w),
            _ => quantize_q4_1(w),
        }
        .unwrap()
    }

    /// x W^T with W dequantized and x rounded through its 8-bit blocks, in f64: what the
    /// integer kernels compute exactly, up to f32 summation.
    fn reference(ty: GgmlType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f64> {
        let wf = dequantize(ty, w, n * k).unwrap();
        let xq = Q8Rows::new(x);
        let xf: Vec<f64> = xq
            .qs
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f64 * xq.d[i / BLOCK] as f64)
            .collect();
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for r in 0..n {
                y[i * n + r] = (0..k).map(|c| xf[i * k + c] * wf[r * k + c] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn every_kernel_matches_the_reference_on_every_isa() {
        // Odd shapes: one block, row counts that leave partial tasks, batches of 1 to 64.
        for &(n, k, m) in &[
            (1, 32, 1),
            (7, 64, 3),
            (33, 96, 1),
            (300, 576, 2),
            (65, 160, 64),
        ] {
            let w = values(n * k, 1 + n as u64);
            let x = values(m * k, 2 + k as u64);
            for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
                let bytes = encode(ty, &w);
                let want = reference(ty, &bytes, n, k, &x, m);
                for isa in Isa::available() {
                    let got = matmul_on(isa, ty, &bytes, n, k, &x, m);
                    for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                        let tolerance = 1e-5 * (1.0 + e.abs()) * (k as f64).sqrt();
                        assert!(
                            (*g as f64 - e).abs() <= tolerance,
                            "{ty:?} {isa:?} n={n} k={k} m={m} at {j}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_in_a_tile_and_alone() {
        // 13 rows: a tile of eight, one of four, then one alone; each must equal its own
        // m = 1 call.
        let (n, k, m) = (9, 96, 13);
        let w = values(n * k, 5);
        let x = values(m * k, 6);
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let bytes = encode(ty, &w);
            for isa in Isa::available() {
                let batch = matmul_on(isa, ty, &bytes, n, k, &x, m);
                for i in 0..m {
                    let alone = matmul_on(isa, ty, &bytes, n, k, &x[i * k..(i + 1) * k], 1);
                    assert_eq!(
                        batch[i * n..(i + 1) * n],
                        alone[..],
                        "{ty:?} {isa:?} row {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_bf16_kernel_matches_the_reference_on_every_isa() {
        for &(n, k, m) in &[(1, 1, 1), (5, 17, 2), (40, 200, 3), (9, 576, 64)] {
            let w: Vec<u16> = values(n * k, 5 + k as u64)
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect();
            let x = values(m * k, 6);
            for isa in Isa::available() {
                let got = matmul_bf16_on(isa, &w, n, k, &x, m);
                for i in 0..m {
                    for r in 0..n {
                        let want: f64 = (0..k)
                            .map(|c| {
                                half::bf16::from_bits(w[r * k + c]).to_f32() as f64
                                    * x[i * k + c] as f64
                            })
                            .sum();
                        let g = got[i * n + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "{isa:?} n={n} k={k} m={m} ({i}, {r}): {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn no_rows_give_no_output() {
        let w = quantize_q8_0(&values(64, 7)).unwrap();
        assert!(matmul(GgmlType::Q8_0, &w, 2, 32, &[], 0).is_empty());
        assert!(matmul_bf16(&[0; 64], 2, 32, &[], 0).is_empty());
    }

    #[test]
    fn quantized_activations_stay_close_to_the_f32_product() {
        let (n, k) = (16, 576);
        let w = values(n * k, 3);
        let x = values(k, 4);
        let bytes = encode(GgmlType::Q8_0, &w);
        let wf = dequantize(GgmlType::Q8_0, &bytes, n * k).unwrap();
        let got = matmul(GgmlType::Q8_0, &bytes, n, k, &x, 1);
        // Rounding x to steps of absmax / 127 (absmax <= 1) adds to each term an error
        // uniform in half a step times |w| (rms 1 / sqrt(3)): four standard deviations of k.
        let sigma = (k as f32).sqrt() * (1.0 / 127.0) / 12f32.sqrt() / 3f32.sqrt();
        for r in 0..n {
            let exact: f32 = (0..k).map(|c| x[c] * wf[r * k + c]).sum();
            assert!(
                (got[r] - exact).abs() < 4.0 * sigma,
                "{r}: {} vs {exact}",
                got[r]
            );
        }
    }
}
