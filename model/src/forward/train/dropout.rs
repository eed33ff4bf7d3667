//! Dropout masks from a counter-based generator: whether element `i` of a mask survives is a
//! hash of the mask's key and `i / 4` (SplitMix64's finalizer over a counter, as counter-based
//! generators such as Philox work), one 16-bit lane of the hash per element. A mask is
//! therefore reproducible from its key alone, any stretch of it can be drawn on any thread,
//! and backward draws it again instead of storing it.

use rayon::prelude::*;

/// Elements per parallel task (a multiple of 4, so tasks start on a hash boundary).
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

/// `out = x * keep / (1 - p)`, keep drawn with probability `1 - p` under `key` (`out = x`
/// when `p` is 0).
pub fn apply(p: f32, key: u64, x: &[f32], out: &mut [f32]) {
    if p <= 0.0 {
        out.copy_from_slice(x);
        return;
    }
    let threshold = (p * 65536.0).round() as u32;
    let scale = 1.0 / (1.0 - p);
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (out, x))| {
            let first = (c * CHUNK / 4) as u64;
            for (j, (out, x)) in out.chunks_mut(4).zip(x.chunks(4)).enumerate() {
                let bits = mix(key.wrapping_add(first + j as u64));
                for (lane, (o, v)) in out.iter_mut().zip(x).enumerate() {
                    let draw = ((bits >> (16 * lane)) & 0xffff) as u32;
                    *o = if draw >= threshold { v * scale } else { 0.0 };
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_reproducible_by_key_and_drop_about_p() {
        let x = vec![1.0f32; 100_003];
        let (mut a, mut b, mut c) = (vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]);
        apply(0.1, key(7, 3, 2), &x, &mut a);
        apply(0.1, key(7, 3, 2), &x, &mut b);
        apply(0.1, key(8, 3, 2), &x, &mut c);
        assert_eq!(a, b, "same key, same mask");
        assert_ne!(a, c, "another seed, another mask");
        let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / x.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "{dropped}");
        let kept = a.iter().find(|v| **v != 0.0).copied();
        assert_eq!(kept, Some(1.0 / 0.9));
        apply(0.0, key(7, 3, 2), &x, &mut a);
        assert_eq!(a, x);
    }
}
