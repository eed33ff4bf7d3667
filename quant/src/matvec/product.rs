//! The products y = x W^T: the checks on their arguments, the kernel chosen per instruction
//! set and weight format, and the split of the weight rows over rayon's threads.

use std::ops::Range;

use rayon::prelude::*;

use super::q8::{Q8Row, Q8Rows};
#[cfg(target_arch = "x86_64")]
use super::{amx, avx2, avx512};
use super::{portable, Isa, Weights, AMX_ROWS, BLOCK, FOUR_BIT_BLOCK, WEIGHT_ROWS};
use crate::ggml::GgmlType;

/// y [m, n] = x [m, k] W^T for W [n, k] stored as `ty` blocks along k (`w`: n rows of
/// k / 32 blocks, as in a GGUF file). `k` must be a multiple of 32 and `ty` one that
/// [`supports`](super::supports) accepts.
pub fn matmul(ty: GgmlType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let w = Weights::Blocks {
        ty,
        bytes: w,
        tiles: None,
    };
    product(w, n, k, x, m)
}

/// y [m, n] = x [m, k] W^T for W [n, k] stored as bf16 bits, activations in f32 (bf16 has
/// the range of f32, so nothing is rounded but the weights themselves).
pub fn matmul_bf16(w: &[u16], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    product(Weights::Bf16(w), n, k, x, m)
}

/// y [m, n] = x [m, k] W^T, the weight rows split over rayon's threads.
pub fn product(w: Weights, n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    product_on(Isa::active(), w, n, k, x, m)
}

/// [`product`] with the kernels of `isa`, which must be one of [`Isa::available`].
pub(super) fn product_on(
    isa: Isa,
    w: Weights,
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    w.check(n, k);
    assert_eq!(x.len(), m * k, "matvec: activation length");
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let xq = w.needs_q8().then(|| Q8Rows::new(x));
    by_weight_rows(n, m, |r0, out| {
        let rows = r0..r0 + out.len() / m;
        weight_rows_on(isa, w, k, x, xq.as_ref(), m, rows, out);
    })
}

/// Weight rows `rows` of W [n, k] against the `m` rows of x [m, k]: y[i, r] at
/// `out[i * rows.len() + r - rows.start]`, each activation row's results side by side.
/// Ggml weights read `xq`, x quantized by [`Q8Rows::quantize`]. A row's result is the same
/// bits whichever rows and weight rows share the call, so the callers may split the work as
/// they like.
#[allow(clippy::too_many_arguments)]
pub fn weight_rows(
    w: Weights,
    k: usize,
    x: &[f32],
    xq: Option<&Q8Rows>,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    weight_rows_on(Isa::active(), w, k, x, xq, m, rows, out)
}

#[allow(clippy::too_many_arguments)]
fn weight_rows_on(
    isa: Isa,
    w: Weights,
    k: usize,
    x: &[f32],
    xq: Option<&Q8Rows>,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    assert_eq!(out.len(), rows.len() * m, "matvec: output length");
    match w {
        Weights::Blocks { ty, bytes, tiles } => {
            let xq = xq.expect("ggml weights meet quantized activations");
            assert_eq!(xq.qs.len(), m * k, "matvec: quantized activation length");
            let row_bytes = k / BLOCK * ty.block_bytes();
            assert!(
                bytes.len() >= rows.end * row_bytes,
                "matvec: weight rows {rows:?} of {row_bytes} bytes"
            );
            let weight = |j: usize| &bytes[(rows.start + j) * row_bytes..][..row_bytes];
            let n = rows.len();
            #[cfg(target_arch = "x86_64")]
            match isa {
                // SAFETY: AVX2, FMA and F16C (and for VNNI AVX-512 F, BW, VL and VNNI) were
                // detected; the weight and activation lengths were checked above and by the
                // caller.
                Isa::Avx2 => return unsafe { avx2::block_rows(ty, bytes, k, xq, m, rows, out) },
                // SAFETY: as above, and the tiles were granted.
                Isa::Amx if m >= AMX_ROWS => {
                    let laid =
                        tiles.map(|t| t.0.get_or_init(|| unsafe { amx::lay_out(ty, bytes, k) }));
                    return unsafe {
                        amx::block_rows(ty, bytes, laid.map(Vec::as_slice), k, xq, m, rows, out)
                    };
                }
                Isa::Avx512Vnni | Isa::Amx => {
                    return unsafe { avx512::block_rows(ty, bytes, k, xq, m, rows, out) };
                }
                Isa::Portable => {}
            }
            // Eight (then four) activation rows share each decoded weight block; every
            // row's sums are the same whichever rows it shares a tile with.
            let mut i = 0;
            while i + TILE <= m {
                let tile: [Q8Row; TILE] = std::array::from_fn(|t| xq.row(i + t, k));
                for j in 0..n {
                    for (t, v) in portable::dots(ty, weight(j), tile).into_iter().enumerate() {
                        out[(i + t) * n + j] = v;
                    }
                }
                i += TILE;
            }
            if i + TILE / 2 <= m {
                let tile: [Q8Row; TILE / 2] = std::array::from_fn(|t| xq.row(i + t, k));
                for j in 0..n {
                    for (t, v) in portable::dots(ty, weight(j), tile).into_iter().enumerate() {
                        out[(i + t) * n + j] = v;
                    }
                }
                i += TILE / 2;
            }
            for i in i..m {
                let x = xq.row(i, k);
                for (j, o) in out[i * n..(i + 1) * n].iter_mut().enumerate() {
                    *o = portable::dots(ty, weight(j), [x])[0];
                }
            }
        }
        Weights::Bf16(bits) => float_rows(out, m, k, x, |j, xrow| {
            let wrow = &bits[(rows.start + j) * k..][..k];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 and FMA were detected for every such variant; the rows have the
                // same length.
                isa if isa.has_avx2() => unsafe { avx2::dot_bf16(wrow, xrow) },
                _ => portable::dot_bf16(wrow, xrow),
            }
        }),
        Weights::F32(values) => float_rows(out, m, k, x, |j, xrow| {
            let wrow = &values[(rows.start + j) * k..][..k];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                isa if isa.has_avx2() => unsafe { avx2::dot_f32(wrow, xrow) },
                _ => portable::dot_f32(wrow, xrow),
            }
        }),
        Weights::FourBit {
            code,
            codes,
            absmax,
        } => {
            let blocks = k / FOUR_BIT_BLOCK;
            let weight = |j: usize| {
                let r = rows.start + j;
                (
                    &codes[r * k / 2..][..k / 2],
                    &absmax[r * blocks..][..blocks],
                )
            };
            let xrow = |i: usize| &x[i * k..(i + 1) * k];
            let n = rows.len();
            let mut i = 0;
            while i + FOUR_BIT_TILE <= m {
                let tile: [&[f32]; FOUR_BIT_TILE] = std::array::from_fn(|t| xrow(i + t));
                for j in 0..n {
                    let (c, a) = weight(j);
                    for (t, v) in four_bit(isa, code, c, a, tile).into_iter().enumerate() {
                        out[(i + t) * n + j] = v;
                    }
                }
                i += FOUR_BIT_TILE;
            }
            for i in i..m {
                for (j, o) in out[i * n..(i + 1) * n].iter_mut().enumerate() {
                    let (c, a) = weight(j);
                    *o = four_bit(isa, code, c, a, [xrow(i)])[0];
                }
            }
        }
    }
}

/// Activation rows one decoded weight block meets at once (at most).
const TILE: usize = 8;

/// Activation rows that meet each decoded 4-bit block at once (at most).
const FOUR_BIT_TILE: usize = 4;

/// One row of 4-bit codes against R activation rows; each row's sum is the same bits in any
/// tile.
fn four_bit<const R: usize>(
    isa: Isa,
    code: &[f32; 16],
    codes: &[u8],
    absmax: &[f32],
    x: [&[f32]; R],
) -> [f32; R] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected for every such variant; the row holds whole blocks
        // and each activation row its k values (checked by the caller).
        isa if isa.has_avx2() => unsafe { avx2::four_bit(code, codes, absmax, x) },
        _ => x.map(|x| portable::four_bit(code, codes, absmax, x)),
    }
}

/// Fills `out` (m rows of its weight rows' values) with `dot(j, x row i)` for the f32
/// formats.
fn float_rows(out: &mut [f32], m: usize, k: usize, x: &[f32], dot: impl Fn(usize, &[f32]) -> f32) {
    if m == 0 {
        return;
    }
    for (out_row, xi) in out.chunks_mut(out.len() / m).zip(x.chunks_exact(k)) {
        for (j, o) in out_row.iter_mut().enumerate() {
            *o = dot(j, xi);
        }
    }
}

/// y [m, n] where `rows(r0, out)` fills out[i * len + j] = y[i, r0 + j] for a run of len
/// weight rows from r0 (up to [`WEIGHT_ROWS`]), the weight rows split evenly over rayon's
/// threads (each task gathers its runs, then its columns are copied into y).
fn by_weight_rows(n: usize, m: usize, rows: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let rows_per_task = n.div_ceil(rayon::current_num_threads()).max(1);
    let parts: Vec<Vec<f32>> = (0..n.div_ceil(rows_per_task))
        .into_par_iter()
        .map(|t| {
            let (r0, len) = (t * rows_per_task, rows_per_task.min(n - t * rows_per_task));
            let mut part = vec![0f32; m * len];
            let mut run = vec![0f32; m * WEIGHT_ROWS];
            for c0 in (0..len).step_by(WEIGHT_ROWS) {
                let run = &mut run[..m * WEIGHT_ROWS.min(len - c0)];
                rows(r0 + c0, run);
                let width = run.len() / m;
                for (dst, src) in part.chunks_mut(len).zip(run.chunks(width)) {
                    dst[c0..c0 + width].copy_from_slice(src);
                }
            }
            part
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (t, part) in parts.iter().enumerate() {
        let (r0, len) = (t * rows_per_task, part.len() / m);
        for (dst, src) in y.chunks_mut(n).zip(part.chunks(len)) {
            dst[r0..r0 + len].copy_from_slice(src);
        }
    }
    y
}

/// Runs `f` on one of the kernel threads: the products inside it then share their work with
/// the other threads without parking and waking the calling thread at every call.
pub fn on_kernel_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
