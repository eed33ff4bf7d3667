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

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use crate::ggml::GgmlType;
use crate::team::SharedMut;

#[cfg(target_arch = "x86_64")]
mod amx;

/// Weights per block of every format here.
pub const BLOCK: usize = 32;

/// Most rows of x for which [`matmul_bf16`] beats dequantize-then-GEMM (decoding batches).
pub const MAX_ROWS: usize = 64;

/// Fewest activation rows for which the AMX tiles (16 rows each) beat the VNNI kernels.
pub const AMX_ROWS: usize = 8;

/// The environment variable that caps the kernels' instruction set ([`Isa::name`]).
pub const MAX_ISA_VAR: &str = "FT_MAX_ISA";

/// An instruction set a kernel is written for, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// AVX2 plus AVX-512 VNNI (`vpdpbusd` on 256-bit vectors, AVX512VL).
    Avx512Vnni,
    /// AVX-512 VNNI plus AMX-INT8 tiles for batches of at least [`AMX_ROWS`] rows.
    Amx,
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
            #[cfg(target_arch = "x86_64")]
            if amx::detected() {
                out.push(Isa::Amx);
            }
        }
        out
    }

    /// The variant the kernels use (detected once): the best this CPU has, or the best at
    /// or below the one [`MAX_ISA_VAR`] names, so that the variants can be compared on one
    /// machine.
    pub fn active() -> Isa {
        static ACTIVE: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let most = std::env::var(MAX_ISA_VAR)
                .ok()
                .and_then(|name| Isa::from_name(&name));
            Isa::available()
                .into_iter()
                .rfind(|isa| most.is_none_or(|most| *isa <= most))
                .unwrap_or(Isa::Portable)
        })
    }

    /// The variant of [`Isa::name`] `name`.
    pub fn from_name(name: &str) -> Option<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx]
            .into_iter()
            .find(|isa| isa.name() == name)
    }

    /// Whether the variant includes AVX2, FMA and F16C (every one but the portable one), so
    /// that the kernels written for AVX2 serve it.
    pub fn has_avx2(self) -> bool {
        self >= Isa::Avx2
    }

    /// The variant's name, for tables.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Amx => "amx",
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

/// Values per absmax block of [`Weights::FourBit`] (bitsandbytes' blocksize).
pub const FOUR_BIT_BLOCK: usize = 64;

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

/// Rows of activations quantized like llama.cpp's Q8_1: per block of 32, signed 8-bit codes,
/// the scale d = absmax / 127 and s = d * (sum of the codes). Buffers are kept between
/// [`Q8Rows::quantize`] calls.
#[derive(Debug, Default)]
pub struct Q8Rows {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8Rows {
    /// `x` (whole blocks of 32) quantized.
    pub fn new(x: &[f32]) -> Self {
        let mut out = Self::default();
        out.quantize(x);
        out
    }

    /// Replaces the contents with `x` (whole blocks of 32) quantized.
    pub fn quantize(&mut self, x: &[f32]) {
        self.resize(x.len());
        quantize_blocks(x, &mut self.qs, &mut self.d, &mut self.s);
    }

    /// Room for the whole blocks of `len` values.
    fn resize(&mut self, len: usize) {
        let blocks = len / BLOCK;
        self.qs.resize(blocks * BLOCK, 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
    }

    /// Room for `len` values (whole blocks of 32), shared for the threads of a team to
    /// quantize disjoint blocks into, so that each row is quantized once, not once per
    /// thread.
    pub fn share(&mut self, len: usize) -> SharedQ8Rows<'_> {
        self.resize(len);
        SharedQ8Rows {
            rows: self as *const Self,
            qs: SharedMut::new(&mut self.qs),
            d: SharedMut::new(&mut self.d),
            s: SharedMut::new(&mut self.s),
        }
    }

    /// Row `i` of rows of `k` values.
    fn row(&self, i: usize, k: usize) -> Q8Row<'_> {
        let blocks = k / BLOCK;
        Q8Row {
            qs: &self.qs[i * k..(i + 1) * k],
            d: &self.d[i * blocks..(i + 1) * blocks],
            s: &self.s[i * blocks..(i + 1) * blocks],
        }
    }
}

/// A [`Q8Rows`] that the threads of a team fill block by block between two barriers
/// ([`SharedQ8Rows::quantize_at`]) and all read after the barrier ([`SharedQ8Rows::get`]).
pub struct SharedQ8Rows<'a> {
    rows: *const Q8Rows,
    qs: SharedMut<'a, i8>,
    d: SharedMut<'a, f32>,
    s: SharedMut<'a, f32>,
}

// SAFETY: the rows are only reached through the unsafe methods below, whose callers promise
// that no two threads touch the same block between two barriers unless both only read.
unsafe impl Sync for SharedQ8Rows<'_> {}

impl SharedQ8Rows<'_> {
    /// Quantizes `x` (whole blocks of 32) into the values from `at` (a multiple of 32) on.
    ///
    /// # Safety
    /// No other thread may read or write those blocks until the next barrier.
    pub unsafe fn quantize_at(&self, at: usize, x: &[f32]) {
        assert!(
            at.is_multiple_of(BLOCK),
            "matvec: shared rows quantized from a block"
        );
        let (b, blocks) = (at / BLOCK, x.len() / BLOCK);
        quantize_blocks(
            x,
            self.qs.slice_mut(at..at + blocks * BLOCK),
            self.d.slice_mut(b..b + blocks),
            self.s.slice_mut(b..b + blocks),
        );
    }

    /// The rows, to read.
    ///
    /// # Safety
    /// No thread may write them until the next barrier.
    pub unsafe fn get(&self) -> &Q8Rows {
        &*self.rows
    }
}

/// The whole blocks of `x` quantized into `qs`, with their scales `d` and sums `s`.
fn quantize_blocks(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let isa = Isa::active();
    for (((block, codes), d), s) in x
        .chunks_exact(BLOCK)
        .zip(qs.chunks_exact_mut(BLOCK))
        .zip(d)
        .zip(s)
    {
        let (scale, sum) = match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 was detected for every such variant; the block and its codes hold
            // 32 values each.
            isa if isa.has_avx2() => unsafe { avx2::quantize_block(block, codes) },
            _ => portable::quantize_block(block, codes),
        };
        *d = scale;
        *s = scale * sum as f32;
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
fn product_on(isa: Isa, w: Weights, n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
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
                    return unsafe { avx2::block_rows_vnni(ty, bytes, k, xq, m, rows, out) };
                }
                Isa::Portable => {}
            }
            // Eight (then four) activation rows share each decoded weight block; every
            // row's sums are the same whichever rows it shares a tile with.
            let mut i = 0;
            while i + TILE <= m {
                let tile: [Q8Row; TILE] = std::array::from_fn(|t| xq.row(i + t, k));
                for j in 0..n {
                    for (t, v) in dots(ty, weight(j), tile).into_iter().enumerate() {
                        out[(i + t) * n + j] = v;
                    }
                }
                i += TILE;
            }
            if i + TILE / 2 <= m {
                let tile: [Q8Row; TILE / 2] = std::array::from_fn(|t| xq.row(i + t, k));
                for j in 0..n {
                    for (t, v) in dots(ty, weight(j), tile).into_iter().enumerate() {
                        out[(i + t) * n + j] = v;
                    }
                }
                i += TILE / 2;
            }
            for i in i..m {
                let x = xq.row(i, k);
                for (j, o) in out[i * n..(i + 1) * n].iter_mut().enumerate() {
                    *o = dots(ty, weight(j), [x])[0];
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

/// A low-rank product x A^T B^T: A [r, k] and B^T [r, n] row-major (a LoRA update, with its
/// scale in B^T). A's rows meet x as dot products, B^T's rows are added across columns.
#[derive(Debug, Clone, Copy)]
pub struct LowRank<'a> {
    /// A, `[r, k]`.
    pub a: &'a [f32],
    /// B^T, `[r, n]`.
    pub b_t: &'a [f32],
    /// The rank.
    pub r: usize,
}

impl LowRank<'_> {
    /// Adds (x A^T) B^T for the rows `tokens` of x `[m, k]` and the output columns `cols`
    /// to `out` (`[m, cols.len()]`, as [`weight_rows`] writes); `scratch`
    /// is reused space. A row's sums do not depend on the other rows.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &self,
        x: &[f32],
        k: usize,
        tokens: Range<usize>,
        cols: Range<usize>,
        m: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        self.add_on(Isa::active(), x, k, tokens, cols, m, out, scratch)
    }

    #[allow(clippy::too_many_arguments)]
    fn add_on(
        &self,
        isa: Isa,
        x: &[f32],
        k: usize,
        tokens: Range<usize>,
        cols: Range<usize>,
        m: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        assert!(
            self.a.len() >= self.r * k && out.len() >= cols.len() * m,
            "low rank: A holds r rows of k and out its columns"
        );
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Portable {
            let kernels = (
                // SAFETY: AVX2 and FMA were detected for every non-portable variant.
                |w: &[f32], x: &[f32]| unsafe { avx2::dot_f32(w, x) },
                |u: &mut [f32], s: f32, b: &[f32]| unsafe { avx2::axpy(u, s, b) },
            );
            return self.add_with(x, k, tokens, cols, out, scratch, kernels);
        }
        let kernels = (portable::dot_f32, portable::axpy);
        self.add_with(x, k, tokens, cols, out, scratch, kernels)
    }

    /// t = x_i A^T by dot products, u = t B^T by scaled row sums, added to out's row i.
    #[allow(clippy::too_many_arguments)]
    fn add_with(
        &self,
        x: &[f32],
        k: usize,
        tokens: Range<usize>,
        cols: Range<usize>,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
        (dot, axpy): (
            impl Fn(&[f32], &[f32]) -> f32,
            impl Fn(&mut [f32], f32, &[f32]),
        ),
    ) {
        let r = self.r;
        let n = self.b_t.len() / r.max(1);
        scratch.clear();
        scratch.resize(r + cols.len(), 0.0);
        let (t, u) = scratch.split_at_mut(r);
        for i in tokens {
            let xi = &x[i * k..(i + 1) * k];
            for (j, tj) in t.iter_mut().enumerate() {
                *tj = dot(&self.a[j * k..(j + 1) * k], xi);
            }
            u.fill(0.0);
            for (j, &tj) in t.iter().enumerate() {
                axpy(u, tj, &self.b_t[j * n + cols.start..j * n + cols.end]);
            }
            for (o, uc) in out[i * u.len()..(i + 1) * u.len()].iter_mut().zip(&*u) {
                *o += uc;
            }
        }
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

/// Activation rows one decoded weight block meets at once (at most).
const TILE: usize = 8;

/// One quantized activation row: codes, block scales, scaled code sums.
#[derive(Clone, Copy)]
struct Q8Row<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
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

/// Weight rows a kernel call takes at once: together with one tile of activation rows they
/// stay in the L1 cache while the tile meets each of them.
pub const WEIGHT_ROWS: usize = 16;

/// One weight row against R quantized activation rows, in plain Rust.
fn dots<const R: usize>(ty: GgmlType, w: &[u8], rows: [Q8Row; R]) -> [f32; R] {
    rows.map(|x| portable::dot(ty, w, x.qs, x.d, x.s))
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

    /// One block of 32 as 8-bit codes of absmax / 127 steps, ties to even: (d, sum of codes).
    pub fn quantize_block(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0;
        for (c, v) in codes.iter_mut().zip(x) {
            *c = round(v * id) as i8;
            sum += *c as i32;
        }
        (d, sum)
    }

    pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| a * b).sum()
    }

    pub fn axpy(u: &mut [f32], s: f32, b: &[f32]) {
        u.iter_mut().zip(b).for_each(|(u, b)| *u += s * b);
    }

    pub fn four_bit(code: &[f32; 16], codes: &[u8], absmax: &[f32], x: &[f32]) -> f32 {
        let half = FOUR_BIT_BLOCK / 2;
        absmax
            .iter()
            .enumerate()
            .map(|(b, &scale)| {
                let sum: f32 = codes[b * half..(b + 1) * half]
                    .iter()
                    .zip(x[b * FOUR_BIT_BLOCK..].chunks_exact(2))
                    .map(|(&byte, xs)| {
                        code[(byte >> 4) as usize] * xs[0] + code[(byte & 0x0f) as usize] * xs[1]
                    })
                    .sum();
                scale * sum
            })
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

    /// The least distance in bytes ahead of the current block that the kernels ask the cache
    /// for: the hardware prefetcher alone leaves the weight stream short of memory
    /// bandwidth.
    const PREFETCH: usize = 1024;

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

    /// [`block_rows`] with the byte products summed by AVX-512 VNNI's `vpdpbusd` on 256-bit
    /// vectors, and AVX512VL's 32 vector registers holding the eight-row tiles. The integer
    /// sums are exact either way, so the results are [`block_rows`]' bits.
    ///
    /// # Safety
    /// As [`block_rows`], and the CPU must have AVX-512 F, BW, VL and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn block_rows_vnni(
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

    /// [`block_rows`] compiled for each block format.
    #[inline(always)]
    unsafe fn block_rows_of<const VNNI: bool>(
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
                let sums =
                    four_by_one::<TY, VNNI>(std::array::from_fn(|t| weight(j + t)), blocks, x);
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

    /// Block b's scales and minimums of N weight rows, lane r for row r (N of 4 or 8).
    #[inline(always)]
    unsafe fn scales<const TY: u8, const N: usize>(
        w: &[*const u8; N],
        b: usize,
    ) -> (__m256, __m256) {
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
                let pairs: [__m256i; 4] =
                    std::array::from_fn(|r| _mm256_set_m128i(raw(r + 4), raw(r)));
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
                let idx =
                    _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), fifteen);
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
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(codes.as_mut_ptr() as *mut __m256i, ordered);
        (d, _mm_cvtsi128_si32(sum))
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

    /// The 32 nibbles of 16 bytes as bytes: low nibbles first, then high nibbles.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(p: *const u8, low: __m256i) -> __m256i {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
        _mm256_and_si256(both, low)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
        let sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
        _mm_cvtss_f32(sum)
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
            (6, 4160, 2),
            (5, 4160, 9),
        ] {
            let w = values(n * k, 1 + n as u64);
            let x = values(m * k, 2 + k as u64);
            for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
                let bytes = encode(ty, &w);
                let want = reference(ty, &bytes, n, k, &x, m);
                for isa in Isa::available() {
                    let w = Weights::Blocks {
                        ty,
                        bytes: &bytes,
                        tiles: None,
                    };
                    let got = product_on(isa, w, n, k, &x, m);
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
            let kept = TileLayout::default();
            for (isa, tiles) in Isa::available()
                .into_iter()
                .flat_map(|isa| [(isa, None), (isa, Some(&kept))])
            {
                let w = Weights::Blocks {
                    ty,
                    bytes: &bytes,
                    tiles,
                };
                let batch = product_on(isa, w, n, k, &x, m);
                for i in 0..m {
                    let alone = product_on(isa, w, n, k, &x[i * k..(i + 1) * k], 1);
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
    fn rows_quantized_by_a_team_block_by_block_equal_rows_quantized_at_once() {
        // Rows of 96 values (3 blocks), shared out by block: a thread's blocks may end inside
        // a row.
        let (rows, k) = (7, 96);
        let x = values(rows * k, 21);
        let want = Q8Rows::new(&x);
        let mut got = Q8Rows::default();
        {
            let shared = got.share(x.len());
            crate::team::run(|team| {
                for b in team.share(x.len() / BLOCK, 1) {
                    let at = b * BLOCK;
                    // SAFETY: each thread quantizes its own blocks, then the team meets.
                    unsafe { shared.quantize_at(at, &x[at..at + BLOCK]) };
                }
                team.sync();
                // SAFETY: nobody writes after the barrier.
                let all = unsafe { shared.get() };
                assert_eq!((&all.qs, &all.d, &all.s), (&want.qs, &want.d, &want.s));
            });
        }
        assert_eq!((got.qs, got.d, got.s), (want.qs, want.d, want.s));
    }

    #[test]
    fn the_vnni_and_amx_kernels_give_the_avx2_bits() {
        // Exact integer sums in the same order: every variant must agree to the bit, at
        // decode (m = 1), in tiles of four, eight and sixteen, and on tails of weight rows
        // and activation rows.
        let available = Isa::available();
        if !available.contains(&Isa::Avx2) {
            return;
        }
        for &(n, k, m) in &[
            (9, 96, 1),
            (13, 576, 13),
            (70, 1536, 8),
            (3, 4160, 5),
            (37, 576, 16),
            (20, 64, 33),
            (48, 160, 64),
        ] {
            let w = values(n * k, 11 + n as u64);
            let x = values(m * k, 12 + m as u64);
            for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
                let bytes = encode(ty, &w);
                let kept = TileLayout::default();
                let w = |tiles| Weights::Blocks {
                    ty,
                    bytes: &bytes,
                    tiles,
                };
                let want = product_on(Isa::Avx2, w(None), n, k, &x, m);
                for &isa in available.iter().filter(|&&isa| isa > Isa::Avx2) {
                    // Rows laid out per call, then from the layout the weight keeps (whose
                    // groups start at row 0, not where a thread's rows do).
                    for tiles in [None, Some(&kept), Some(&kept)] {
                        assert_eq!(
                            want,
                            product_on(isa, w(tiles), n, k, &x, m),
                            "{ty:?} {isa:?} n={n} k={k} m={m} kept {}",
                            tiles.is_some()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_float_kernels_match_the_reference_on_every_isa() {
        for &(n, k, m) in &[
            (1, 1, 1),
            (5, 17, 2),
            (40, 200, 3),
            (9, 576, 64),
            (3, 45, 5),
        ] {
            let w: Vec<u16> = values(n * k, 5 + k as u64)
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect();
            let wf: Vec<f32> = w
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .collect();
            let x = values(m * k, 6);
            for isa in Isa::available() {
                for (got, format) in [
                    (product_on(isa, Weights::Bf16(&w), n, k, &x, m), "bf16"),
                    (product_on(isa, Weights::F32(&wf), n, k, &x, m), "f32"),
                ] {
                    for i in 0..m {
                        for r in 0..n {
                            let want: f64 = (0..k)
                                .map(|c| wf[r * k + c] as f64 * x[i * k + c] as f64)
                                .sum();
                            let g = got[i * n + r] as f64;
                            assert!(
                                (g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                                "{format} {isa:?} n={n} k={k} m={m} ({i}, {r}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_four_bit_kernels_match_the_reference_on_every_isa() {
        use crate::bnb4::{self, FourBit};
        for &(n, k, m) in &[(1, 64, 1), (7, 128, 3), (5, 576, 9), (3, 1536, 4)] {
            let w = values(n * k, 11 + n as u64);
            let x = values(m * k, 12 + k as u64);
            for kind in [FourBit::Nf4, FourBit::Fp4] {
                let (codes, absmax) = bnb4::quantize(kind, &w);
                let mut wf = vec![0f32; n * k];
                bnb4::dequantize_into(kind, &codes, &absmax, &mut wf);
                let weights = Weights::FourBit {
                    code: kind.code(),
                    codes: &codes,
                    absmax: &absmax,
                };
                for isa in Isa::available() {
                    let got = product_on(isa, weights, n, k, &x, m);
                    for i in 0..m {
                        for r in 0..n {
                            let want: f64 = (0..k)
                                .map(|c| wf[r * k + c] as f64 * x[i * k + c] as f64)
                                .sum();
                            let g = got[i * n + r] as f64;
                            assert!(
                                (g - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                                "{kind:?} {isa:?} n={n} k={k} m={m} ({i}, {r}): {g} vs {want}"
                            );
                        }
                        let alone = product_on(isa, weights, n, k, &x[i * k..(i + 1) * k], 1);
                        assert_eq!(
                            alone[..],
                            got[i * n..(i + 1) * n],
                            "{kind:?} {isa:?} row {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn activations_get_the_same_codes_on_every_isa() {
        let mut x = values(32 * 40, 9);
        // An all-zero block, and exact ties (127 / 2 steps of 1) in another.
        x[..32].fill(0.0);
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { (i as f32) + 0.5 };
        }
        for block in x.chunks_exact(32) {
            let mut want = [0i8; 32];
            let expected = portable::quantize_block(block, &mut want);
            #[cfg(target_arch = "x86_64")]
            if Isa::available().contains(&Isa::Avx2) {
                let mut got = [0i8; 32];
                // SAFETY: AVX2 was detected; both hold 32 values.
                let found = unsafe { avx2::quantize_block(block, &mut got) };
                assert_eq!((got, found), (want, expected));
            }
        }
    }

    #[test]
    fn a_low_rank_update_matches_the_two_products() {
        let (m, k, r, n) = (5, 40, 3, 37);
        let (a, b_t, x) = (values(r * k, 1), values(r * n, 2), values(m * k, 3));
        let lr = LowRank {
            a: &a,
            b_t: &b_t,
            r,
        };
        let cols = 4..30;
        for isa in Isa::available() {
            let mut out = vec![1f32; cols.len() * m];
            lr.add_on(isa, &x, k, 1..4, cols.clone(), m, &mut out, &mut Vec::new());
            for (c, col) in cols.clone().enumerate() {
                for i in 0..m {
                    let want = if (1..4).contains(&i) {
                        1.0 + (0..r)
                            .map(|j| {
                                let t: f64 = (0..k)
                                    .map(|q| x[i * k + q] as f64 * a[j * k + q] as f64)
                                    .sum();
                                t * b_t[j * n + col] as f64
                            })
                            .sum::<f64>()
                    } else {
                        1.0
                    };
                    let got = out[i * cols.len() + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{isa:?} row {i} column {col}: {got} vs {want}"
                    );
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
