//! Dropout masks from a counter-based generator: whether element `i` of a mask survives is a
//! hash of the mask's key and `i / 4` (SplitMix64's finalizer over a counter, as counter-based
//! generators such as Philox work), one 16-bit lane of the hash per element. A mask is
//! therefore reproducible from its key alone and any stretch of it can be drawn on any
//! thread. Forward draws it once and keeps it as bits, one per element, for backward.

use rayon::prelude::*;

/// Elements per parallel task (a multiple of 64, so tasks start on a word boundary).
const CHUNK: usize = 1 << 14;

/// SplitMix64's output function: a bijective mix of all 64 bits.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of the mask of `module` (0..7 in `adapter::TARGETS` order) of `layer` in the
/// micro-batch seeded `seed`.
pub fn key(seed: u64, layer: usize, module: usize) -> u64 {
    mix(seed ^ mix(((layer * 7 + module) as u64 + 1) << 32))
}

/// Which elements of a tensor survive dropout with probability `p`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    /// Bit `i % 64` of word `i / 64`: element `i` is kept.
    bits: Vec<u64>,
    /// 1 / (1 - p).
    scale: f32,
}

impl Mask {
    /// The mask of `n` elements drawn under `key`.
    pub fn draw(p: f32, key: u64, n: usize) -> Self {
        let threshold = (p * 65536.0).round() as u64;
        let mut bits = vec![0u64; n.div_ceil(64)];
        bits.par_chunks_mut(CHUNK / 64)
            .enumerate()
            .for_each(|(c, words)| fill(key, (c * CHUNK / 64) as u64, words, threshold));
        Self {
            bits,
            scale: 1.0 / (1.0 - p),
        }
    }

    /// `out = x * keep / (1 - p)`.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(self.bits.par_chunks(CHUNK / 64))
            .for_each(|((out, x), words)| {
                for ((out, x), &word) in out.chunks_mut(64).zip(x.chunks(64)).zip(words) {
                    for (j, (o, v)) in out.iter_mut().zip(x).enumerate() {
                        let keep = (word >> j) & 1;
                        *o = v * self.scale * keep as f32;
                    }
                }
            });
    }
}

/// Fills `words` (word `first` onward of a mask): the hashes on AVX-512's 64-bit multiplies
/// where the CPU has them, the same code on the baseline instruction set elsewhere.
fn fill(key: u64, first: u64, words: &mut [u64], threshold: u64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { fill_avx512(key, first, words, threshold) };
    }
    fill_words(key, first, words, threshold);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn fill_avx512(key: u64, first: u64, words: &mut [u64], threshold: u64) {
    fill_words(key, first, words, threshold);
}

/// Word `first + w` holds the keep bits of elements `64 (first + w)` onward: 16 hashes of 4
/// 16-bit draws each.
#[inline(always)]
fn fill_words(key: u64, first: u64, words: &mut [u64], threshold: u64) {
    for (w, word) in words.iter_mut().enumerate() {
        let base = (first + w as u64) * 16;
        let mut draws = [0u64; 16];
        for (h, d) in draws.iter_mut().enumerate() {
            *d = mix(key.wrapping_add(base + h as u64));
        }
        let mut bits = 0u64;
        for (h, d) in draws.iter().enumerate() {
            for lane in 0..4 {
                let keep = (d >> (16 * lane)) & 0xffff >= threshold;
                bits |= (keep as u64) << (h * 4 + lane);
            }
        }
        *word = bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_reproducible_by_key_and_drop_about_p() {
        let n = 100_003;
        let x = vec![1.0f32; n];
        let a = Mask::draw(0.1, key(7, 3, 2), n);
        assert_eq!(a, Mask::draw(0.1, key(7, 3, 2), n), "same key, same mask");
        assert_ne!(
            a,
            Mask::draw(0.1, key(8, 3, 2), n),
            "another seed, another mask"
        );
        let mut out = vec![0.0; n];
        a.apply(&x, &mut out);
        let dropped = out.iter().filter(|v| **v == 0.0).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "{dropped}");
        assert!(out.iter().all(|&v| v == 0.0 || v == 1.0 / 0.9));
        // A mask's start does not depend on its length.
        let short = Mask::draw(0.1, key(7, 3, 2), 1000);
        let mut head = vec![0.0; 1000];
        short.apply(&x[..1000], &mut head);
        assert_eq!(head, out[..1000]);
    }
}
