//! 4-bit NormalFloat (NF4) and 4-bit float (FP4) block quantization, byte-for-byte as
//! bitsandbytes stores them (Dettmers et al. 2023, "QLoRA", arXiv:2305.14314; bitsandbytes
//! `csrc/kernels.cu`: `dQuantizeNF4`, `dQuantizeFP4`, `kQuantizeBlockwise`).
//!
//! The weight is flattened row-major and cut into blocks of 64; each block stores its absmax
//! (f32) and one 4-bit code per element: the index of the code-book value nearest to
//! x * (1 / absmax). Two codes share a byte, the first element in the high nibble.

use std::sync::OnceLock;

/// The 16 NF4 values: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero. Written
/// with the digits bitsandbytes publishes, so they can be compared by eye.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The 16 FP4 values of bitsandbytes (`dDequantizeFP4Tree`): bit 3 is the sign, the rest an
/// e2m1-like magnitude normalized to a maximum of 1.
pub const FP4_CODE: [f32; 16] = [
    0.0,
    0.005_208_333_3,
    0.666_666_7,
    1.0,
    0.333_333_33,
    0.5,
    0.166_666_67,
    0.25,
    -0.0,
    -0.005_208_333_3,
    -0.666_666_7,
    -1.0,
    -0.333_333_33,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// Which 4-bit code book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBit {
    /// NormalFloat4.
    Nf4,
    /// bitsandbytes' FP4.
    Fp4,
}

impl FourBit {
    /// The 16 values, indexed by code.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            Self::Nf4 => &NF4_CODE,
            Self::Fp4 => &FP4_CODE,
        }
    }

    /// The two code-book values of every byte (high nibble first).
    fn pairs(self) -> &'static [[f32; 2]; 256] {
        static NF4: OnceLock<[[f32; 2]; 256]> = OnceLock::new();
        static FP4: OnceLock<[[f32; 2]; 256]> = OnceLock::new();
        let table = match self {
            Self::Nf4 => &NF4,
            Self::Fp4 => &FP4,
        };
        table.get_or_init(|| {
            let code = self.code();
            std::array::from_fn(|byte| [code[byte >> 4], code[byte & 0x0f]])
        })
    }

    /// The code of a normalized value in [-1, 1]: nearest value, ties to the lower one, as
    /// bitsandbytes' decision trees (whose thresholds are the midpoints between neighbours).
    pub fn encode(self, x: f32) -> u8 {
        match self {
            Self::Nf4 => nearest(&NF4_MIDPOINTS, x),
            Self::Fp4 => {
                // Sign bit, then the magnitude's code among 0b000..0b111.
                let sign = if x < 0.0 { 0b1000 } else { 0 };
                let m = x.abs();
                let order = nearest(&FP4_MAGNITUDE_MIDPOINTS, m) as usize;
                sign | FP4_MAGNITUDE_CODES[order]
            }
        }
    }
}

/// Number of midpoints strictly below `x` (NaN counts none, as bitsandbytes' `>` tests).
fn nearest(midpoints: &[f32], x: f32) -> u8 {
    midpoints.iter().take_while(|&&m| x > m).count() as u8
}

/// Thresholds of `dQuantizeNF4`: midpoints between consecutive NF4 values.
const NF4_MIDPOINTS: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_43,
    -0.234_607_4,
    -0.137_911_73,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_77,
    0.389_312_54,
    0.501_663_4,
    0.642_786_9,
    0.861_478_4,
];

/// FP4 magnitudes in increasing order: 0, 0.0052, 1/6, 1/4, 1/3, 1/2, 2/3, 1, as codes.
const FP4_MAGNITUDE_CODES: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// Thresholds of `dQuantizeFP4` between those magnitudes.
const FP4_MAGNITUDE_MIDPOINTS: [f32; 7] = [
    0.002_604_17,
    0.085_937_5,
    0.208_333_33,
    0.291_666_67,
    0.416_666_7,
    0.583_333,
    0.833_333_3,
];

/// Elements per absmax block, as in QLoRA.
pub const BLOCK: usize = 64;

/// Quantizes `data` in blocks of [`BLOCK`]: returns the packed codes ((n + 1) / 2 bytes) and
/// one absmax per block (the last block may be partial; an odd tail leaves a zero low nibble).
pub fn quantize(kind: FourBit, data: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut codes = vec![0u8; data.len().div_ceil(2)];
    let mut absmax = Vec::with_capacity(data.len().div_ceil(BLOCK));
    for (b, block) in data.chunks(BLOCK).enumerate() {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        let inv = 1.0 / max;
        for (j, v) in block.iter().enumerate() {
            let i = b * BLOCK + j;
            let q = kind.encode(v * inv);
            codes[i / 2] |= if i.is_multiple_of(2) { q << 4 } else { q };
        }
    }
    (codes, absmax)
}

/// Dequantizes `n` elements from packed codes and per-block absmax values into `out`.
///
/// One lookup per byte: a table of the 256 byte values' two code-book values, so a byte
/// becomes two floats with one load (a training step dequantizes every weight twice).
pub fn dequantize_into(kind: FourBit, codes: &[u8], absmax: &[f32], out: &mut [f32]) {
    let pairs = kind.pairs();
    for (b, (block, &scale)) in out.chunks_mut(BLOCK).zip(absmax).enumerate() {
        let bytes = &codes[b * BLOCK / 2..];
        let last_byte = block.len() / 2;
        let mut whole = block.chunks_exact_mut(2);
        for (pair, &byte) in whole.by_ref().zip(bytes) {
            let [hi, lo] = pairs[byte as usize];
            pair[0] = hi * scale;
            pair[1] = lo * scale;
        }
        if let [last] = whole.into_remainder() {
            *last = pairs[bytes[last_byte] as usize][0] * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midpoints_are_bitsandbytes_thresholds() {
        // dQuantizeNF4 compares against these literals; they are the f32 midpoints.
        for i in 0..15 {
            let mid = ((NF4_CODE[i] as f64 + NF4_CODE[i + 1] as f64) / 2.0) as f32;
            assert!((mid - NF4_MIDPOINTS[i]).abs() <= 1e-7, "{i}: {mid}");
        }
        let mags: Vec<f32> = FP4_MAGNITUDE_CODES
            .iter()
            .map(|&c| FP4_CODE[c as usize])
            .collect();
        assert!(mags.windows(2).all(|w| w[0] < w[1]));
        for i in 0..7 {
            assert!(((mags[i] + mags[i + 1]) / 2.0 - FP4_MAGNITUDE_MIDPOINTS[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn codes_by_hand_with_the_first_element_in_the_high_nibble() {
        // absmax 2: normalized values 1, -1, 0, 0.5, 0.25, -0.5.
        let data = [2.0, -2.0, 0.0, 1.0, 0.5, -1.0];
        let (codes, absmax) = quantize(FourBit::Nf4, &data);
        assert_eq!(absmax, vec![2.0]);
        // NF4: 1 -> 15, -1 -> 0, 0 -> 7, 0.5 -> 12 (0.4407 is nearer than 0.5626),
        // 0.25 -> 10 (0.2461), -0.5 -> 2 (-0.5251).
        assert_eq!(codes, vec![0xF0, 0x7C, 0xA2]);
        let (codes, _) = quantize(FourBit::Fp4, &data);
        // FP4: 1 -> 0b0011, -1 -> 0b1011, 0 -> 0b0000, 0.5 -> 0b0101, 0.25 -> 0b0111, -0.5 -> 0b1101.
        assert_eq!(codes, vec![0x3B, 0x05, 0x7D]);
    }

    #[test]
    fn round_trip_error_is_bounded_by_half_the_largest_gap() {
        let mut seed = 1u64;
        let data: Vec<f32> = (0..1000)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 3.0
            })
            .collect();
        for kind in [FourBit::Nf4, FourBit::Fp4] {
            let (codes, absmax) = quantize(kind, &data);
            let mut back = vec![0f32; data.len()];
            dequantize_into(kind, &codes, &absmax, &mut back);
            let mut sorted: Vec<f32> = kind.code().to_vec();
            sorted.sort_by(f32::total_cmp);
            let gap = sorted.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
            for (i, (a, b)) in data.iter().zip(&back).enumerate() {
                let bound = gap / 2.0 * absmax[i / BLOCK] + 1e-6;
                assert!((a - b).abs() <= bound, "{kind:?} element {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn odd_lengths_and_partial_blocks_stay_in_bounds() {
        for n in [1usize, 63, 65, 127, 129] {
            let data: Vec<f32> = (0..n).map(|i| i as f32 - 40.0).collect();
            let (codes, absmax) = quantize(FourBit::Nf4, &data);
            assert_eq!(codes.len(), n.div_ceil(2));
            assert_eq!(absmax.len(), n.div_ceil(BLOCK));
            let mut back = vec![0f32; n];
            dequantize_into(FourBit::Nf4, &codes, &absmax, &mut back);
            for (i, (a, b)) in data.iter().zip(&back).enumerate() {
                assert!(
                    (a - b).abs() <= 0.17 * absmax[i / BLOCK],
                    "n {n}, element {i}: {a} vs {b}"
                );
            }
            if n % 2 == 1 {
                assert_eq!(codes[n / 2] & 0x0f, 0, "padding nibble");
            }
        }
    }

    #[test]
    fn every_element_decodes_its_own_nibble_odd_lengths_included() {
        let data: Vec<f32> = (0..131).map(|i| (i as f32 * 0.37).sin()).collect();
        for kind in [FourBit::Nf4, FourBit::Fp4] {
            let (codes, absmax) = quantize(kind, &data);
            let mut out = vec![0.0; data.len()];
            dequantize_into(kind, &codes, &absmax, &mut out);
            for (i, v) in out.iter().enumerate() {
                let byte = codes[i / 2];
                let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
                assert_eq!(*v, kind.code()[nibble as usize] * absmax[i / BLOCK], "{i}");
            }
        }
    }

    #[test]
    fn an_all_zero_block_dequantizes_to_zero() {
        let (codes, absmax) = quantize(FourBit::Nf4, &[0.0; 64]);
        let mut back = vec![1f32; 64];
        dequantize_into(FourBit::Nf4, &codes, &absmax, &mut back);
        assert!(back.iter().all(|v| *v == 0.0));
    }
}
