//! GPTQ (Frantar, Ashkboos, Hoefler and Alistarh 2022, "GPTQ: Accurate Post-Training
//! Quantization for Generative Pre-trained Transformers"), as AutoGPTQ runs it.
//!
//! A linear layer's weight `W` (`[out, in]`: a row per output, a column per input) is
//! quantized one input column at a time, and each column's rounding error is spread onto
//! the columns not yet quantized so that the layer's output on calibration inputs `X`
//! changes least: the Hessian of that squared error is `H = 2 X X^T / n`. With the upper
//! Cholesky factor `U` of `H^-1` (after dampening `H` by a fraction of its mean diagonal),
//! quantizing column `i` to `q` moves every later column `j` of the row by
//! `-(w_i - q) / U_ii * U_ij` (the paper's step 3). The moves are applied to the columns of
//! the current block of 128 as each column is done and to the rest once per block (step 2,
//! lazy batch updates); rows never interact, so they run in parallel.
//!
//! A group's grid is fitted when its first column comes up, on the weights as the earlier
//! columns' errors left them. With activation order (`act_order`), columns go in order of
//! decreasing `H` diagonal (the inputs that matter most first) and every group's grid is
//! fitted beforehand on the weights as they were (static groups), so that groups stay runs of
//! consecutive inputs, as the file formats store them.

mod grid;
mod linalg;

pub use grid::{Grid, GroupFit};

use rayon::prelude::*;

use half::f16;

use crate::bnb4::FourBit;
use crate::gemm::{matmul, Mat, MatMut};
use crate::ggml::GgmlType;
use crate::packed::{Absmax, PackedData, PackedWeight};
use crate::QuantError;

/// The Hessian of a linear layer's squared output error, summed from its calibration inputs.
#[derive(Debug, Clone)]
pub struct Hessian {
    cols: usize,
    /// `X^T X` over the inputs added so far.
    sum: Vec<f64>,
    samples: usize,
}

impl Hessian {
    /// No inputs yet, for a layer of `cols` inputs.
    pub fn new(cols: usize) -> Self {
        Self {
            cols,
            sum: vec![0.0; cols * cols],
            samples: 0,
        }
    }

    /// Adds `rows` input vectors (`x` row-major, `rows x cols`).
    ///
    /// # Panics
    /// If `x` holds fewer than `rows * cols` values.
    pub fn add(&mut self, x: &[f32], rows: usize) {
        let n = self.cols;
        let x = Mat::new(x, rows, n);
        let mut xtx = vec![0.0f32; n * n];
        matmul(&mut MatMut::new(&mut xtx, n, n), x.t(), x, false);
        for (s, v) in self.sum.iter_mut().zip(&xtx) {
            *s += *v as f64;
        }
        self.samples += rows;
    }

    /// Inputs per sample.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Input vectors added so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// The Hessian of the same inputs divided channel by channel by `s` (input `j` becomes
    /// `x_j / s_j`): what the inputs give once scales are folded into the op before them.
    ///
    /// # Panics
    /// If `s` does not hold one scale per input.
    pub fn scaled(&self, s: &[f32]) -> Self {
        let n = self.cols;
        assert_eq!(s.len(), n, "one scale per input");
        let mut sum = self.sum.clone();
        for (i, row) in sum.chunks_mut(n).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v /= s[i] as f64 * s[j] as f64;
            }
        }
        Self {
            cols: n,
            sum,
            samples: self.samples,
        }
    }

    /// `2 X^T X / n`, row-major.
    pub(crate) fn matrix(&self) -> Vec<f64> {
        let scale = 2.0 / self.samples.max(1) as f64;
        self.sum.iter().map(|v| v * scale).collect()
    }
}

/// A weight on a grid: each row's groups' fits and every weight's code.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// The format's grid.
    pub grid: Grid,
    /// Rows (outputs).
    pub rows: usize,
    /// Columns (inputs), a whole number of groups.
    pub cols: usize,
    /// Each row's group fits, row-major (`rows x cols / group`).
    pub fits: Vec<GroupFit>,
    /// Each weight's code, row-major.
    pub codes: Vec<u8>,
}

impl Quantized {
    /// `w` (`rows x cols`) rounded to the nearest point of each group's grid (RTN).
    pub fn rtn(grid: Grid, w: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        let g = group_of(grid, cols)?;
        let mut fits = Vec::with_capacity(rows * cols / g);
        let mut codes = Vec::with_capacity(rows * cols);
        for group in w[..rows * cols].chunks(g) {
            let fit = grid.fit(group);
            fits.push(fit);
            codes.extend(group.iter().map(|&x| grid.encode(fit, x)));
        }
        Ok(Self {
            grid,
            rows,
            cols,
            fits,
            codes,
        })
    }

    /// The weights the codes stand for, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.grid.group();
        self.codes
            .chunks(g)
            .zip(&self.fits)
            .flat_map(|(codes, &fit)| codes.iter().map(move |&c| self.grid.decode(fit, c)))
            .collect()
    }
}

impl Quantized {
    /// The weight as ggml blocks, rows in order, for the grids that are ggml formats (Q4_0,
    /// Q4_1, Q8_0): the block type and its bytes.
    pub fn ggml_blocks(&self) -> Option<(GgmlType, Vec<u8>)> {
        let ty = match self.grid {
            Grid::Q4_0 => GgmlType::Q4_0,
            Grid::Q4_1 => GgmlType::Q4_1,
            Grid::Q8_0 => GgmlType::Q8_0,
            Grid::Nf4 | Grid::Int { .. } => return None,
        };
        let mut out = Vec::with_capacity(self.fits.len() * ty.block_bytes());
        for (fit, codes) in self.fits.iter().zip(self.codes.chunks(32)) {
            out.extend(f16::from_f32(fit.scale).to_le_bytes());
            if ty == GgmlType::Q4_1 {
                out.extend(f16::from_f32(fit.offset).to_le_bytes());
            }
            if ty == GgmlType::Q8_0 {
                out.extend_from_slice(codes);
            } else {
                // Low nibbles hold the block's first 16 weights, high nibbles the last 16.
                out.extend((0..16).map(|j| codes[j] | (codes[j + 16] << 4)));
            }
        }
        Some((ty, out))
    }
}

impl Quantized {
    /// The weight as bitsandbytes NF4 (for the NF4 grid): codes two a byte, the first in the
    /// high nibble, one absmax per block of 64, double-quantized when `double_quant` (the
    /// codes stay those chosen against the exact absmax).
    pub fn nf4(&self, double_quant: bool) -> Option<PackedWeight> {
        if self.grid != Grid::Nf4 {
            return None;
        }
        let codes = self
            .codes
            .chunks(2)
            .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(0))
            .collect();
        let absmax = self.fits.iter().map(|f| f.scale).collect();
        Some(PackedWeight {
            shape: [self.rows, self.cols],
            data: PackedData::FourBit {
                kind: FourBit::Nf4,
                codes,
                absmax: Absmax::quantize(absmax, double_quant),
            },
        })
    }
}

/// The grid's group size, checked against the layer's inputs.
pub(crate) fn group_of(grid: Grid, cols: usize) -> Result<usize, QuantError> {
    let g = grid.group();
    if g == 0 || !cols.is_multiple_of(g) {
        return Err(QuantError::Group {
            group: g,
            inputs: cols,
        });
    }
    Ok(g)
}

/// GPTQ's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gptq {
    /// The fraction of `H`'s mean diagonal added to its diagonal (AutoGPTQ's `damp_percent`,
    /// 0.01).
    pub damp: f64,
    /// Columns whose updates to the later columns are applied together (128).
    pub block: usize,
    /// Columns in order of decreasing `H` diagonal, groups fitted beforehand (`desc_act` with
    /// `static_groups`).
    pub act_order: bool,
}

impl Default for Gptq {
    fn default() -> Self {
        Self {
            damp: 0.01,
            block: 128,
            act_order: false,
        }
    }
}

impl Gptq {
    /// `w` (`rows x cols`) quantized onto `grid` against the calibration Hessian `h`.
    pub fn quantize(
        &self,
        w: &[f32],
        rows: usize,
        cols: usize,
        h: &Hessian,
        grid: Grid,
    ) -> Result<Quantized, QuantError> {
        let g = group_of(grid, cols)?;
        if h.cols != cols || h.samples == 0 {
            return Err(QuantError::Calibration(format!(
                "a Hessian of {} inputs from {} samples for a layer of {cols} inputs",
                h.cols, h.samples
            )));
        }
        let n = cols;
        let mut hm = h.matrix();
        let mut w: Vec<f32> = w[..rows * cols].to_vec();
        // An input never active in calibration says nothing: its weights go to zero.
        for i in 0..n {
            if hm[i * n + i] == 0.0 {
                hm[i * n + i] = 1.0;
                for r in 0..rows {
                    w[r * n + i] = 0.0;
                }
            }
        }
        let groups = n / g;
        let mut perm: Vec<usize> = (0..n).collect();
        let mut fits = vec![GroupFit::default(); rows * groups];
        if self.act_order {
            perm.sort_by(|&a, &b| hm[b * n + b].total_cmp(&hm[a * n + a]));
            for (fit, group) in fits.iter_mut().zip(w.chunks(g)) {
                *fit = grid.fit(group);
            }
        }
        // H in the columns' order, dampened.
        let mut hp: Vec<f64> = (0..n * n)
            .map(|k| hm[perm[k / n] * n + perm[k % n]])
            .collect();
        let mean = (0..n).map(|i| hp[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            hp[i * n + i] += self.damp * mean;
        }
        let not_pd = |c: usize| {
            QuantError::Calibration(format!(
            "the Hessian is not positive definite at input {}: raise the dampening or give more calibration text",
            perm[c]
        ))
        };
        let l = linalg::cholesky(&hp, n).map_err(not_pd)?;
        let inv = linalg::cholesky_inverse(&l, n);
        // U = the transpose of H^-1's lower factor: row i holds U_ii.. U_in.
        let lower = linalg::cholesky(&inv, n).map_err(not_pd)?;
        let u: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                if j >= i {
                    lower[j * n + i]
                } else {
                    0.0
                }
            })
            .collect();
        // Blocks hold whole groups, or groups whole blocks, so a group's grid is fitted on
        // weights every earlier column has updated.
        let block = if self.block.is_multiple_of(g) || g.is_multiple_of(self.block) {
            self.block.max(1)
        } else {
            g
        };
        let mut codes = vec![0u8; rows * n];
        w.par_chunks(n)
            .zip(codes.par_chunks_mut(n))
            .zip(fits.par_chunks_mut(groups))
            .for_each(|((row, codes), fits)| {
                let mut row: Vec<f64> = perm.iter().map(|&c| row[c] as f64).collect();
                let mut err = vec![0.0f64; block];
                for i1 in (0..n).step_by(block) {
                    let i2 = (i1 + block).min(n);
                    for i in i1..i2 {
                        let col = perm[i];
                        if !self.act_order && i.is_multiple_of(g) {
                            let group: Vec<f32> = row[i..i + g].iter().map(|&v| v as f32).collect();
                            fits[i / g] = grid.fit(&group);
                        }
                        let fit = fits[col / g];
                        let code = grid.encode(fit, row[i] as f32);
                        codes[col] = code;
                        let e = (row[i] - grid.decode(fit, code) as f64) / u[i * n + i];
                        err[i - i1] = e;
                        let ui = &u[i * n..(i + 1) * n];
                        for j in i + 1..i2 {
                            row[j] -= e * ui[j];
                        }
                    }
                    // The block's errors onto every later column at once.
                    for i in i1..i2 {
                        let e = err[i - i1];
                        let ui = &u[i * n + i2..(i + 1) * n];
                        for (x, &uij) in row[i2..].iter_mut().zip(ui) {
                            *x -= e * uij;
                        }
                    }
                }
            });
        Ok(Quantized {
            grid,
            rows,
            cols,
            fits,
            codes,
        })
    }
}

#[cfg(test)]
mod tests;
