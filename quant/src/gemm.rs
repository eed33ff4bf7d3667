//! Matrix products of training shapes: hundreds of token rows against a layer's weight, as a
//! training step multiplies them forward (x W^T), backward to the input (dy W), and into the
//! gradients of small factors (dy^T x).
//!
//! The blocked kernels are the `gemm` crate's (AVX-512, AVX2 or NEON, chosen at run time),
//! split over rayon's threads when a product is large enough to pay for it. A frozen weight in
//! a packed format ([`Frozen::Packed`]) is dequantized a tile of rows at a time inside the
//! product, so no f32 copy of a whole weight ever lives: a QLoRA step keeps QLoRA's memory.

use std::ops::Range;

use ::gemm::Parallelism;
use rayon::prelude::*;

use crate::packed::{PackedData, PackedWeight};
use crate::{bnb4, ggml, int8};

/// Products below this many multiply-adds run on the calling thread alone.
const PARALLEL_WORK: usize = 1 << 18;

/// Rows of a packed weight dequantized at once.
const TILE_ROWS: usize = 256;

/// A read-only matrix operand: `rows x cols` values of `data` at the given strides, so a
/// transpose or a block of columns is a view, never a copy.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// `data` as a row-major `[rows, cols]` matrix.
    ///
    /// # Panics
    /// If `data` holds fewer than `rows * cols` values.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix larger than its data");
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// `rows x cols` values of `data`, rows `row_stride` apart (a block of columns of a wider
    /// row-major matrix, such as one attention head's).
    ///
    /// # Panics
    /// If the last row runs past `data`.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(rows == 0 || (rows - 1) * row_stride + cols <= data.len());
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The columns `range`, as a view.
    pub fn columns(self, range: Range<usize>) -> Self {
        assert!(range.end <= self.cols, "columns out of range");
        Self {
            data: &self.data[range.start * self.col_stride..],
            cols: range.len(),
            ..self
        }
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// A writable row-major matrix: `rows x cols` values of `data`, `row_stride` apart.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a> MatMut<'a> {
    /// `data` as a row-major `[rows, cols]` matrix.
    ///
    /// # Panics
    /// If `data` holds fewer than `rows * cols` values.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix larger than its data");
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }

    /// `rows x cols` values of `data`, rows `row_stride` apart.
    ///
    /// # Panics
    /// If the last row runs past `data`.
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(rows == 0 || (rows - 1) * row_stride + cols <= data.len());
        Self {
            data,
            rows,
            cols,
            row_stride,
        }
    }

    /// The columns `range`, as a writable view.
    pub fn columns(&mut self, range: Range<usize>) -> MatMut<'_> {
        assert!(range.end <= self.cols, "columns out of range");
        MatMut {
            data: &mut self.data[range.start..],
            rows: self.rows,
            cols: range.len(),
            row_stride: self.row_stride,
        }
    }
}

/// `out = a b`, or `out += a b` when `accumulate`.
///
/// # Panics
/// If the shapes do not agree.
pub fn matmul(out: &mut MatMut, a: Mat, b: Mat, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert_eq!((out.rows, out.cols), (m, n), "output shape differs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                out.data[r * out.row_stride..][..n].fill(0.0);
            }
        }
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, k, a.row_stride, a.col_stride) < a.data.len());
    assert!(last(k, n, b.row_stride, b.col_stride) < b.data.len());
    assert!(last(m, n, out.row_stride, 1) < out.data.len());
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= PARALLEL_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above keep every element the strides reach inside its slice, and
    // `out` is borrowed mutably, so it aliases neither operand.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            out.data.as_mut_ptr(),
            1,
            out.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A frozen `[out, in]` weight as the training products read it.
#[derive(Debug, Clone, Copy)]
pub enum Frozen<'a> {
    /// f32 values, row-major `[out, in]`, read in place.
    F32 {
        /// The values.
        values: &'a [f32],
        /// `[out, in]`.
        shape: [usize; 2],
    },
    /// A packed weight, dequantized a tile of rows at a time.
    Packed(&'a RowTiles),
}

impl Frozen<'_> {
    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Self::F32 { shape, .. } => *shape,
            Self::Packed(t) => t.weight.shape,
        }
    }

    /// `y = x W^T` (`+=` when `accumulate`): x `[n, in]` -> y `[n, out]`.
    pub fn forward(&self, x: &[f32], y: &mut [f32], accumulate: bool) {
        let [n_out, n_in] = self.shape();
        let n = x.len() / n_in.max(1);
        let mut out = MatMut::new(y, n, n_out);
        let x = Mat::new(x, n, n_in);
        match self {
            Self::F32 { values, .. } => {
                matmul(&mut out, x, Mat::new(values, n_out, n_in).t(), accumulate)
            }
            Self::Packed(t) => {
                let mut tile = vec![0.0; TILE_ROWS.min(n_out) * n_in];
                for rows in tiles(n_out) {
                    let w = t.dequantize(rows.clone(), &mut tile);
                    let w = Mat::new(w, rows.len(), n_in).t();
                    matmul(&mut out.columns(rows), x, w, accumulate);
                }
            }
        }
    }

    /// `dx = dy W` (`+=` when `accumulate`): dy `[n, out]` -> dx `[n, in]`.
    pub fn backward(&self, dy: &[f32], dx: &mut [f32], accumulate: bool) {
        let [n_out, n_in] = self.shape();
        let n = dy.len() / n_out.max(1);
        let mut out = MatMut::new(dx, n, n_in);
        let dy = Mat::new(dy, n, n_out);
        match self {
            Self::F32 { values, .. } => {
                matmul(&mut out, dy, Mat::new(values, n_out, n_in), accumulate)
            }
            Self::Packed(t) => {
                let mut tile = vec![0.0; TILE_ROWS.min(n_out) * n_in];
                for (i, rows) in tiles(n_out).enumerate() {
                    let w = t.dequantize(rows.clone(), &mut tile);
                    let w = Mat::new(w, rows.len(), n_in);
                    matmul(&mut out, dy.columns(rows), w, accumulate || i > 0);
                }
            }
        }
    }
}

/// The tiles of `n` rows.
fn tiles(n: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n)
        .step_by(TILE_ROWS)
        .map(move |s| s..(s + TILE_ROWS).min(n))
}

/// A packed weight ready to be dequantized a tile of rows at a time: the absmax values of a
/// 4-bit weight decoded once (double quantization undone), not once per tile.
#[derive(Debug, Clone)]
pub struct RowTiles {
    weight: std::sync::Arc<PackedWeight>,
    absmax: Vec<f32>,
}

impl RowTiles {
    /// Tiles of `weight`, or `None` where its rows do not start on block boundaries (then no
    /// tile can be decoded alone).
    pub fn new(weight: std::sync::Arc<PackedWeight>) -> Option<Self> {
        let cols = weight.shape[1];
        let absmax = match &weight.data {
            PackedData::FourBit { absmax, .. } => {
                if !cols.is_multiple_of(bnb4::BLOCK) {
                    return None;
                }
                absmax.values()
            }
            PackedData::Int8 { group, .. } if !cols.is_multiple_of(*group) => return None,
            PackedData::Blocks { ty, .. } if !cols.is_multiple_of(ty.block_elements()) => {
                return None
            }
            _ => Vec::new(),
        };
        Some(Self { weight, absmax })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        self.weight.shape
    }

    /// Dequantizes `rows` into the front of `tile` (on every thread) and returns that part.
    pub fn dequantize<'t>(&self, rows: Range<usize>, tile: &'t mut [f32]) -> &'t [f32] {
        const ROWS_PER_TASK: usize = 16;
        let cols = self.weight.shape[1];
        let out = &mut tile[..rows.len() * cols];
        out.par_chunks_mut(ROWS_PER_TASK * cols)
            .enumerate()
            .for_each(|(i, chunk)| {
                let first = rows.start + i * ROWS_PER_TASK;
                self.dequantize_rows(first..first + chunk.len() / cols, chunk);
            });
        out
    }

    /// Dequantizes `rows` into `out` on this thread.
    fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        let cols = self.weight.shape[1];
        let (start, end) = (rows.start * cols, rows.end * cols);
        match &self.weight.data {
            PackedData::Bf16(v) => out
                .iter_mut()
                .zip(&v[start..end])
                .for_each(|(o, b)| *o = half::bf16::from_bits(*b).to_f32()),
            PackedData::Int8 { q, absmax, group } => int8::dequantize_into(
                &q[start..end],
                &absmax[start / group..end.div_ceil(*group)],
                *group,
                out,
            ),
            PackedData::FourBit { kind, codes, .. } => bnb4::dequantize_into(
                *kind,
                &codes[start / 2..end.div_ceil(2)],
                &self.absmax[start / bnb4::BLOCK..end.div_ceil(bnb4::BLOCK)],
                out,
            ),
            PackedData::Blocks { ty, bytes, .. } => {
                let per_block = ty.block_elements();
                let (b0, b1) = (start / per_block, end / per_block);
                let bytes = &bytes[b0 * ty.block_bytes()..b1 * ty.block_bytes()];
                let values = ggml::dequantize(*ty, bytes, end - start)
                    .expect("whole blocks, checked when the tiles were made");
                out.copy_from_slice(&values);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::packed::QuantFormat;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// The textbook triple loop.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{i}: {x} vs {y}");
        }
    }

    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols)
            .flat_map(|c| (0..rows).map(move |r| (r, c)))
            .map(|(r, c)| a[r * cols + c])
            .collect()
    }

    #[test]
    fn products_of_views_match_the_triple_loop() {
        let (m, k, n) = (37, 70, 300);
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let want = reference(&a, &b, m, k, n);
        let mut out = vec![0.0; m * n];
        matmul(
            &mut MatMut::new(&mut out, m, n),
            Mat::new(&a, m, k),
            Mat::new(&b, k, n),
            false,
        );
        close(&out, &want);
        // Transposed operands, and accumulation doubles the result.
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        matmul(
            &mut MatMut::new(&mut out, m, n),
            Mat::new(&at, k, m).t(),
            Mat::new(&bt, n, k).t(),
            true,
        );
        close(&out, &want.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
        // A block of columns written in place leaves the others alone.
        let mut wide = vec![7.0; m * (n + 5)];
        matmul(
            &mut MatMut::new(&mut wide, m, n + 5).columns(2..n + 2),
            Mat::new(&a, m, k),
            Mat::new(&b, k, n),
            false,
        );
        for r in 0..m {
            assert_eq!(wide[r * (n + 5)..][..2], [7.0, 7.0]);
            close(&wide[r * (n + 5) + 2..][..n], &want[r * n..][..n]);
        }
    }

    #[test]
    fn packed_weights_multiply_as_their_dequantized_copy() {
        let (n_out, n_in, rows) = (600, 128, 9);
        let w = values(n_out * n_in, 3);
        let x = values(rows * n_in, 4);
        let dy = values(rows * n_out, 5);
        for format in [
            QuantFormat::Nf4,
            QuantFormat::Int8Block,
            QuantFormat::Bf16,
            QuantFormat::Q4_0,
        ] {
            let packed =
                PackedWeight::quantize(format, true, &w, [n_out, n_in]).expect("packable shape");
            let dense = packed.dequantize();
            let tiles = RowTiles::new(Arc::new(packed)).expect("whole blocks");
            let (mut y, mut want) = (vec![0.0; rows * n_out], vec![0.0; rows * n_out]);
            Frozen::Packed(&tiles).forward(&x, &mut y, false);
            let wt = transpose(&dense, n_out, n_in);
            want.copy_from_slice(&reference(&x, &wt, rows, n_in, n_out));
            close(&y, &want);
            let mut dx = vec![1.0; rows * n_in];
            Frozen::Packed(&tiles).backward(&dy, &mut dx, true);
            let want: Vec<f32> = reference(&dy, &dense, rows, n_out, n_in)
                .iter()
                .map(|v| v + 1.0)
                .collect();
            close(&dx, &want);
        }
    }
}
