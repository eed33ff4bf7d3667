//! Attention of decoding rows (one new token per sequence) straight from a paged KV cache on
//! the host, as vLLM's paged attention kernel does on a GPU: each row walks its own block
//! table, so nothing is gathered or padded, and the work is split over (row, key/value head)
//! pairs across rayon's threads.
//!
//! For row i and query head j (key/value head j / g for g query heads per key/value head):
//! out = softmax(q k^T / sqrt(d)) v over the row's first `len` positions.

use rayon::prelude::*;

/// Shapes of the query and of the paged keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Attention output `[rows, heads * head_dim]` for queries `q` `[rows, heads, head_dim]`;
/// `keys` and `values` are `[blocks, kv_heads, block_size, head_dim]`, and `rows[i]` holds row
/// i's block table and its length in positions (at least 1).
pub fn paged_decode_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    layout: PagedLayout,
    rows: &[(&[usize], usize)],
) -> Vec<f32> {
    let PagedLayout {
        heads: h,
        kv_heads: kv,
        head_dim: d,
        ..
    } = layout;
    let g = h / kv;
    let mut out = vec![0f32; rows.len() * h * d];
    // Chunk c holds the g query heads of key/value head c % kv of row c / kv.
    out.par_chunks_mut(g * d).enumerate().for_each(|(c, out)| {
        let (i, kvh) = (c / kv, c % kv);
        let (table, len) = rows[i];
        let q = &q[(i * h + kvh * g) * d..][..g * d];
        attend_group(
            q,
            keys,
            values,
            layout,
            kvh,
            table,
            len,
            &mut Vec::new(),
            out,
        );
    });
    out
}

/// The attention of the g query heads that share key/value head `kv_head` over the first
/// `len` positions of a block table: `out` (g * d values, overwritten) = softmax(q k^T /
/// sqrt(d)) v per head, each key and value read once for the group. `scores` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    layout: PagedLayout,
    kv_head: usize,
    table: &[usize],
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::matvec::Isa::active() != crate::matvec::Isa::Portable {
        // SAFETY: AVX2 and FMA were detected for every non-portable variant.
        return unsafe {
            attend_group_avx2(q, keys, values, layout, kv_head, table, len, scores, out)
        };
    }
    attend_group_in::<false>(q, keys, values, layout, kv_head, table, len, scores, out)
}

/// [`attend_group`] compiled for AVX2 and FMA, so that its loops vectorize eight wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_group_avx2(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    layout: PagedLayout,
    kv_head: usize,
    table: &[usize],
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_group_in::<true>(q, keys, values, layout, kv_head, table, len, scores, out)
}

/// [`attend_group`]'s loops; `FMA` fuses their multiply-adds (without the instruction a
/// fused multiply-add is a library call).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_group_in<const FMA: bool>(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    layout: PagedLayout,
    kv_head: usize,
    table: &[usize],
    len: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let PagedLayout {
        kv_heads: kv,
        block_size: bs,
        head_dim: d,
        ..
    } = layout;
    let g = q.len() / d;
    let scale = 1.0 / (d as f32).sqrt();
    scores.clear();
    scores.resize(g * len, 0.0);
    // The table is walked block by block (a division per position would cost more than its
    // products). Blocks lie anywhere in the pool, beyond the reach of the hardware
    // prefetcher: each position asks the cache for the keys at its place in the next block,
    // and for its own values, which the second pass reads.
    let start = |b: usize| (table[b] * kv + kv_head) * bs * d;
    let blocks = len.div_ceil(bs);
    for b in 0..blocks {
        let (here, next) = (start(b), (b + 1 < blocks).then(|| start(b + 1)));
        for t in 0..bs.min(len - b * bs) {
            if let Some(next) = next {
                prefetch(&keys[next + t * d..next + (t + 1) * d]);
            }
            prefetch(&values[here + t * d..here + (t + 1) * d]);
            let k = &keys[here + t * d..here + (t + 1) * d];
            for (j, qh) in q.chunks_exact(d).enumerate() {
                scores[j * len + b * bs + t] = dot::<FMA>(qh, k) * scale;
            }
        }
    }
    for s in scores.chunks_exact_mut(len.max(1)) {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv = 1.0 / crate::exp::exp_shifted(s, max);
        s.iter_mut().for_each(|v| *v *= inv);
    }
    out.fill(0.0);
    for b in 0..blocks {
        let here = start(b);
        for t in 0..bs.min(len - b * bs) {
            let v = &values[here + t * d..here + (t + 1) * d];
            for (j, o) in out.chunks_exact_mut(d).enumerate() {
                let w = scores[j * len + b * bs + t];
                for (o, v) in o.iter_mut().zip(v) {
                    *o = madd::<FMA>(w, *v, *o);
                }
            }
        }
    }
}

/// Asks the cache for the lines of `row` (a head's keys or values at one position).
#[inline(always)]
fn prefetch(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16) {
        // SAFETY: SSE is part of x86-64; a prefetch reads nothing.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// a * b + c, fused when `FMA`.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// sum a * b in eight lanes, so that the compiler vectorizes it.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] = madd::<FMA>(x[l], y[l], lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 - 500.0) / 250.0)
            .collect()
    }

    #[test]
    fn paged_attention_matches_a_contiguous_reference() {
        // 2 rows over shuffled blocks of 4: lengths 7 (a partial block) and 1.
        let tables: [&[usize]; 2] = [&[3, 0], &[4]];
        matches_the_reference(6, 2, 4, 5, 5, &[(tables[0], 7), (tables[1], 1)]);
    }

    #[test]
    fn tables_of_many_blocks_match_the_reference() {
        // Heads of 64 over tables of five, two and one blocks of 8, the last ones partial.
        let tables: [&[usize]; 3] = [&[5, 0, 7, 2, 9], &[1, 3], &[8]];
        let rows = [(tables[0], 37), (tables[1], 16), (tables[2], 1)];
        matches_the_reference(9, 3, 8, 64, 10, &rows);
    }

    /// `paged_decode_attention` against attention in f64 over the rows' positions.
    fn matches_the_reference(
        h: usize,
        kv: usize,
        bs: usize,
        d: usize,
        blocks: usize,
        rows: &[(&[usize], usize)],
    ) {
        let layout = PagedLayout {
            heads: h,
            kv_heads: kv,
            block_size: bs,
            head_dim: d,
        };
        let keys = values(blocks * kv * bs * d, 1);
        let vals = values(blocks * kv * bs * d, 2);
        let q = values(rows.len() * h * d, 3);
        let got = paged_decode_attention(&q, &keys, &vals, layout, rows);
        for (i, &(table, len)) in rows.iter().enumerate() {
            for head in 0..h {
                let kvh = head / (h / kv);
                let at = |p: usize| ((table[p / bs] * kv + kvh) * bs + p % bs) * d;
                let qh = &q[(i * h + head) * d..][..d];
                let scores: Vec<f64> = (0..len)
                    .map(|p| {
                        let s: f64 = (0..d).map(|x| qh[x] as f64 * keys[at(p) + x] as f64).sum();
                        s / (d as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for x in 0..d {
                    let want: f64 = (0..len)
                        .map(|p| (scores[p] - max).exp() / total * vals[at(p) + x] as f64)
                        .sum();
                    let g = got[(i * h + head) * d + x] as f64;
                    assert!(
                        (g - want).abs() < 1e-5,
                        "row {i} head {head} [{x}]: {g} vs {want}"
                    );
                }
            }
        }
    }
}
