//! The grids post-training quantization rounds onto: one per storage format, each fitted to
//! a group of consecutive weights of a row (the format's block) and then rounding each
//! weight to its nearest point. Fitted as the format's own round-to-nearest quantizer fits
//! them, and with the scale rounded as the file stores it, so that a weight's decoded value
//! here is the value the file gives back.

use half::f16;

use crate::bnb4::{self, FourBit};

/// A group's fitted grid: `scale` and `offset` as the format reads them (see [`Grid`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GroupFit {
    /// The step between grid points (Q4_0, Q4_1, Q8_0, int), or the absmax (NF4).
    pub scale: f32,
    /// The value of code 0 (Q4_1, int); unused by the symmetric formats.
    pub offset: f32,
}

/// A quantized storage format, as far as rounding is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grid {
    /// ggml Q4_0: groups of 32, `(q - 8) * d`, `d` = the value of largest magnitude / -8.
    Q4_0,
    /// ggml Q4_1: groups of 32, `q * d + m`, `m` the minimum, `d` = (max - min) / 15.
    Q4_1,
    /// ggml Q8_0: groups of 32, `q * d` with `q` in -127..=127, `d` = absmax / 127.
    Q8_0,
    /// bitsandbytes NF4: blocks of 64, `NF4[q] * absmax`.
    Nf4,
    /// `bits`-bit codes in groups of `group`: `q * scale + min`, `scale` = (max - min) / (2^bits - 1).
    Int {
        /// Bits per code, 2 to 8.
        bits: u8,
        /// Weights per group.
        group: usize,
    },
}

impl Grid {
    /// Weights a group holds.
    pub fn group(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Nf4 => bnb4::BLOCK,
            Self::Int { group, .. } => group,
        }
    }

    /// The grid for the weights of one group.
    pub fn fit(self, w: &[f32]) -> GroupFit {
        let min = w.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = w.iter().fold(f32::MIN, |m, &v| m.max(v));
        let absmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let half = |v: f32| f16::from_f32(v).to_f32();
        match self {
            Self::Q4_0 => {
                let signed = w
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                GroupFit {
                    scale: half(signed / -8.0),
                    offset: 0.0,
                }
            }
            Self::Q4_1 => GroupFit {
                scale: half((max - min) / 15.0),
                offset: half(min),
            },
            Self::Q8_0 => GroupFit {
                scale: half(absmax / 127.0),
                offset: 0.0,
            },
            Self::Nf4 => GroupFit {
                scale: absmax,
                offset: 0.0,
            },
            Self::Int { bits, .. } => GroupFit {
                scale: (max - min) / ((1u32 << bits) - 1) as f32,
                offset: min,
            },
        }
    }

    /// The code of the grid point nearest `x`.
    pub fn encode(self, fit: GroupFit, x: f32) -> u8 {
        let steps = |x: f32| if fit.scale != 0.0 { x / fit.scale } else { 0.0 };
        match self {
            Self::Q4_0 => (steps(x) + 8.0).round().clamp(0.0, 15.0) as u8,
            Self::Q4_1 => steps(x - fit.offset).round().clamp(0.0, 15.0) as u8,
            Self::Q8_0 => steps(x).round().clamp(-127.0, 127.0) as i8 as u8,
            Self::Nf4 => FourBit::Nf4.encode(steps(x)),
            Self::Int { bits, .. } => {
                let top = ((1u32 << bits) - 1) as f32;
                steps(x - fit.offset).round().clamp(0.0, top) as u8
            }
        }
    }

    /// The value of `code`.
    pub fn decode(self, fit: GroupFit, code: u8) -> f32 {
        match self {
            Self::Q4_0 => (code as f32 - 8.0) * fit.scale,
            Self::Q8_0 => code as i8 as f32 * fit.scale,
            Self::Nf4 => FourBit::Nf4.code()[code as usize & 0x0f] * fit.scale,
            Self::Q4_1 | Self::Int { .. } => code as f32 * fit.scale + fit.offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{dequantize, quantize_q4_1, quantize_q8_0, GgmlType};

    /// `x` rounded to the grid.
    fn round(grid: Grid, fit: GroupFit, x: f32) -> f32 {
        grid.decode(fit, grid.encode(fit, x))
    }

    fn weights(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    #[test]
    fn every_grid_rounds_each_weight_to_its_nearest_point() {
        let w = weights(64, 3);
        for grid in [
            Grid::Q4_0,
            Grid::Q4_1,
            Grid::Q8_0,
            Grid::Nf4,
            Grid::Int { bits: 3, group: 64 },
            Grid::Int { bits: 2, group: 16 },
        ] {
            for group in w.chunks(grid.group()) {
                let fit = grid.fit(group);
                let points: Vec<f32> = match grid {
                    Grid::Q8_0 => (-127i8..=127).map(|c| grid.decode(fit, c as u8)).collect(),
                    Grid::Q4_0 | Grid::Q4_1 | Grid::Nf4 => {
                        (0..16).map(|c| grid.decode(fit, c)).collect()
                    }
                    Grid::Int { bits, .. } => {
                        (0..1u8 << bits).map(|c| grid.decode(fit, c)).collect()
                    }
                };
                for &x in group {
                    let best = points
                        .iter()
                        .map(|p| (p - x).abs())
                        .fold(f32::MAX, f32::min);
                    let got = (round(grid, fit, x) - x).abs();
                    assert!(
                        got <= best + 1e-6,
                        "{grid:?}: {x} off by {got}, best {best}"
                    );
                }
            }
        }
    }

    #[test]
    fn ggml_grids_decode_as_the_file_formats_do() {
        // The grid is the file's: llama.cpp's quantizer picks codes with the scale before
        // its f16 rounding, so a weight near the midpoint of two points may land on the
        // other, one step away; every other weight decodes the same.
        let w = weights(256, 9);
        for (grid, ty, bytes) in [
            (Grid::Q8_0, GgmlType::Q8_0, quantize_q8_0(&w).unwrap()),
            (Grid::Q4_1, GgmlType::Q4_1, quantize_q4_1(&w).unwrap()),
        ] {
            let file = dequantize(ty, &bytes, w.len()).unwrap();
            let mut differ = 0;
            for (b, g) in w.chunks(32).enumerate() {
                let fit = grid.fit(g);
                for (j, &x) in g.iter().enumerate() {
                    let gap = (round(grid, fit, x) - file[b * 32 + j]).abs();
                    assert!(gap <= fit.scale * 1.001, "{grid:?}: {gap} apart");
                    differ += (gap > 1e-6) as usize;
                }
            }
            assert!(differ <= 8, "{grid:?}: {differ} of 256 differ");
        }
    }
}
