//! Activations rounded to 8 bits in blocks of 32, as llama.cpp's Q8_1 rounds them: the form
//! in which x meets the ggml weight blocks, quantized once per call or, by a team of threads,
//! block by block.

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::{portable, Isa, BLOCK};
use crate::team::SharedMut;

/// Rows of activations quantized like llama.cpp's Q8_1: per block of 32, signed 8-bit codes,
/// the scale d = absmax / 127 and s = d * (sum of the codes). Buffers are kept between
/// [`Q8Rows::quantize`] calls.
#[derive(Debug, Default)]
pub struct Q8Rows {
    pub(super) qs: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
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
    pub(super) fn row(&self, i: usize, k: usize) -> Q8Row<'_> {
        let blocks = k / BLOCK;
        Q8Row {
            qs: &self.qs[i * k..(i + 1) * k],
            d: &self.d[i * blocks..(i + 1) * blocks],
            s: &self.s[i * blocks..(i + 1) * blocks],
        }
    }
}

/// One quantized activation row: codes, block scales, scaled code sums.
#[derive(Clone, Copy)]
pub(super) struct Q8Row<'a> {
    pub(super) qs: &'a [i8],
    pub(super) d: &'a [f32],
    pub(super) s: &'a [f32],
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
pub(super) fn round(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matvec::tests::values;

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
}
