//! Intel AMX tiles for the block kernels: per block of 32, one `tdpbsud` (signed activation
//! codes by Q4's unsigned nibbles) or `tdpbssd` (by Q8_0's signed codes) multiplies sixteen
//! activation rows by sixteen weight rows, 8,192 byte products in one instruction, and
//! AVX-512 scales the 16 x 16 integer sums into the f32 totals.
//!
//! The activation rows are the tile's left side as they lie in memory (16 rows of a block's
//! 32 codes, `k` bytes apart); each group of sixteen weight rows is laid out in the right
//! side's layout (row g holds codes 4g..4g+4 of every weight row), its scales beside, so
//! that a lane of every vector is one weight row. A weight keeps that layout once built
//! ([`super::TileLayout`]), so that a batch reads its rows as one stream.
//!
//! The sums are the other kernels' to the bit ([`super::avx2::block_rows`]): per block the
//! exact integer dot product of the codes, then acc = fma(m_w, s_x, acc) for Q4 and
//! acc = fma(d_w * d_x, isum, acc), in block order. Stable Rust has no AMX intrinsics, so
//! the tile instructions are inline assembly; Linux lends the tile registers only to a
//! process that asks for them, once.

use std::arch::asm;
use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::OnceLock;

use super::{Q8Rows, BLOCK};
use crate::ggml::GgmlType;

/// Weight rows, and activation rows, of one tile.
const ROWS: usize = 16;

/// Bytes of one block's tile of either side: 16 rows of 32 codes.
const TILE_BYTES: usize = ROWS * BLOCK;

/// Whether this CPU has AMX-INT8 and the OS lets this process use the tile registers.
pub(super) fn detected() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        // CPUID leaf 7, EDX: bit 24 is AMX-TILE, bit 25 AMX-INT8.
        let leaf = __cpuid_count(7, 0);
        (leaf.edx >> 24) & 3 == 3 && permitted()
    })
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
/// it refuses where the kernel or the hypervisor does not support it.
#[cfg(target_os = "linux")]
fn permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the request only changes this process's permissions.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn permitted() -> bool {
    false
}

/// The tile shapes (`ldtilecfg`'s palette 1), twice (tmm0-2 for even blocks, tmm3-5 for odd
/// ones): 16 x 16 i32 sums, a block of 16 activation rows (32 bytes each), a block of 16
/// weight rows in the four-byte groups the products read (8 rows of 64 bytes).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, rows, bytes) in [
            (0, ROWS, 64u16),
            (1, ROWS, 32),
            (2, BLOCK / 4, 64),
            (3, ROWS, 64),
            (4, ROWS, 32),
            (5, BLOCK / 4, 64),
        ] {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&bytes.to_le_bytes());
            c[48 + t] = rows as u8;
        }
        Self(c)
    }
}

/// Bytes of one block of a group of sixteen weight rows, laid out: the codes (Q8_0's 512
/// bytes as the tile reads them; Q4's 256 bytes of nibbles, the low ones the tile rows of
/// the block's first half, the high ones those of its second), then the 16 rows' f16
/// scales (Q4_1: scale and minimum, side by side per row). As many bytes as the blocks: a
/// batch is as fast as it can stream them.
const fn laid_block_bytes(bytes: usize) -> usize {
    ROWS * bytes
}

/// The sixteen rows' scales and minimums (Q4_0's -8 d; none for Q8_0) at `at`, the end of
/// a laid-out block's codes.
#[inline(always)]
unsafe fn scales<const BYTES: usize>(at: *const u8) -> (__m512, __m512) {
    match BYTES {
        20 => {
            let pairs = _mm512_loadu_si512(at as *const _);
            let m = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(pairs));
            (
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(pairs)),
                _mm512_cvtph_ps(m),
            )
        }
        _ => {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(at as *const _));
            (d, _mm512_mul_ps(d, _mm512_set1_ps(-8.0)))
        }
    }
}

/// Each thread's buffers, kept between calls.
#[derive(Default)]
struct Buffers {
    /// One group of weight rows laid out, when the weight keeps no layout of its own.
    group: Vec<u8>,
    /// Per block, [`TILE_BYTES`] of Q4 codes unpacked from the group's nibbles: group g
    /// (codes 4g..4g+4) of weight row r at byte 64 g + 4 r.
    w: Vec<u8>,
    /// The last activation tile's codes when it holds fewer than 16 rows, padded with zeros.
    qs: Vec<i8>,
    /// Every activation tile's scales and sums block by block (tile i, block b, row t at
    /// `(i / 16 * blocks + b) * 16 + t`; rows past m zero), so that a block's sixteen lie
    /// side by side.
    d: Vec<f32>,
    s: Vec<f32>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

/// 64-byte aligned room for one tile of sums.
#[repr(C, align(64))]
struct Sums([i32; ROWS * ROWS]);

/// Every row of the ggml blocks `w` (rows of `k` values) in groups of sixteen, laid out as
/// [`block_rows`] reads them (the last group repeats its last row), for the weight to keep.
///
/// # Safety
/// As for [`block_rows`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn lay_out(ty: GgmlType, w: &[u8], k: usize) -> Vec<u8> {
    match ty {
        GgmlType::Q8_0 => lay_out_for::<34, 2>(w, k),
        GgmlType::Q4_0 => lay_out_for::<18, 2>(w, k),
        _ => lay_out_for::<20, 4>(w, k),
    }
}

#[inline(always)]
unsafe fn lay_out_for<const BYTES: usize, const CODES: usize>(w: &[u8], k: usize) -> Vec<u8> {
    let blocks = k / BLOCK;
    let n = w.len() / (blocks * BYTES);
    let group = blocks * laid_block_bytes(BYTES);
    let mut out = vec![0u8; n.div_ceil(ROWS) * group];
    for (g, dst) in out.chunks_exact_mut(group).enumerate() {
        let rows = g * ROWS..n.min((g + 1) * ROWS);
        weight_tiles::<BYTES, CODES>(w, blocks, rows, dst);
    }
    out
}

/// Weight rows `rows` of the ggml blocks `w` against the `m` rows of `xq`, as
/// [`super::avx2::block_rows`] computes them. `laid` is the weight's [`lay_out`], if it
/// keeps one; else each group of rows is laid out here.
///
/// # Safety
/// [`detected`] must hold, and the CPU must have AVX-512 F, BW and VL, FMA and F16C; `w`
/// holds at least `rows.end` rows of whole blocks of `ty`, `laid` (if any) is its layout,
/// `xq` m rows of k codes, and `out` `m * rows.len()` values (activation row major).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn block_rows(
    ty: GgmlType,
    w: &[u8],
    laid: Option<&[u8]>,
    k: usize,
    xq: &Q8Rows,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    match ty {
        GgmlType::Q8_0 => block_rows_for::<34, 2>(w, laid, k, xq, m, rows, out),
        GgmlType::Q4_0 => block_rows_for::<18, 2>(w, laid, k, xq, m, rows, out),
        _ => block_rows_for::<20, 4>(w, laid, k, xq, m, rows, out),
    }
}

/// [`block_rows`] for blocks of `BYTES` bytes whose codes start at byte `CODES` (Q8_0's 32
/// signed bytes, else 16 bytes of nibbles; Q4_1's minimum sits between).
#[inline(always)]
unsafe fn block_rows_for<const BYTES: usize, const CODES: usize>(
    w: &[u8],
    laid: Option<&[u8]>,
    k: usize,
    xq: &Q8Rows,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let blocks = k / BLOCK;
    let block_bytes = laid_block_bytes(BYTES);
    let group_bytes = blocks * block_bytes;
    let codes_bytes = if BYTES == 34 {
        TILE_BYTES
    } else {
        TILE_BYTES / 2
    };
    let mut buf = BUFFERS.take();
    let partial = m % ROWS;
    if partial != 0 {
        // The last tile, padded to 16 rows.
        let first = m - partial;
        buf.qs.clear();
        buf.qs.extend_from_slice(&xq.qs[first * k..m * k]);
        buf.qs.resize(ROWS * k, 0);
    }
    let tiles = m.div_ceil(ROWS);
    for (by_block, by_row) in [(&mut buf.d, &xq.d), (&mut buf.s, &xq.s)] {
        by_block.clear();
        by_block.resize(tiles * blocks * ROWS, 0.0);
        for (row, values) in by_row[..m * blocks].chunks_exact(blocks).enumerate() {
            let (tile, t) = (row / ROWS, row % ROWS);
            for (b, &v) in values.iter().enumerate() {
                by_block[(tile * blocks + b) * ROWS + t] = v;
            }
        }
    }
    if BYTES != 34 {
        buf.w.resize(blocks * TILE_BYTES, 0);
    }
    let config = TileConfig::new();
    asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    let mut sums = [Sums([0; ROWS * ROWS]), Sums([0; ROWS * ROWS])];
    let n = rows.len();
    let low = _mm512_set1_epi8(0x0f);
    // A kept layout groups rows from row 0; else the groups start where the rows do.
    let mut start = match laid {
        Some(_) => rows.start / ROWS * ROWS,
        None => rows.start,
    };
    while start < rows.end {
        let end = start + ROWS;
        let (first, last) = (rows.start.max(start) - start, rows.end.min(end) - start);
        let lanes = ((1u32 << last) - (1u32 << first)) as __mmask16;
        // The group's bytes, and where the next group's lie (to prefetch a block's share of
        // them per block while this group meets the first activation tile).
        let (group, next, share) = match laid {
            Some(laid) => {
                let group = laid.as_ptr().add(start / ROWS * group_bytes);
                (group, group.wrapping_add(group_bytes), block_bytes)
            }
            None => {
                let last = end.min(rows.end);
                buf.group.resize(group_bytes, 0);
                weight_tiles::<BYTES, CODES>(w, blocks, start..last, &mut buf.group);
                let next = w.as_ptr().wrapping_add(last * blocks * BYTES);
                (buf.group.as_ptr(), next, ROWS * BYTES)
            }
        };
        if BYTES != 34 {
            for b in 0..blocks {
                let nibbles = group.add(b * block_bytes) as *const __m512i;
                let tile = buf.w.as_mut_ptr().add(b * TILE_BYTES) as *mut __m512i;
                for g in 0..BLOCK / 8 {
                    let q = _mm512_loadu_si512(nibbles.add(g));
                    _mm512_storeu_si512(tile.add(g), _mm512_and_si512(q, low));
                    let high = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low);
                    _mm512_storeu_si512(tile.add(g + 4), high);
                }
            }
        }
        let codes = |b: usize| match BYTES {
            34 => group.add(b * block_bytes),
            _ => buf.w.as_ptr().add(b * TILE_BYTES),
        };
        for i in (0..m).step_by(ROWS) {
            let qs = if i + ROWS <= m {
                xq.qs.as_ptr().add(i * k)
            } else {
                buf.qs.as_ptr()
            };
            let (d, s) = (
                buf.d.as_ptr().add(i * blocks),
                buf.s.as_ptr().add(i * blocks),
            );
            // Lane r of acc[t]: activation row i + t against weight row r. Block b's products
            // go into tile register b % 2 while block b - 1's sums are scaled, so that neither
            // waits for the other.
            let mut acc = [_mm512_setzero_ps(); ROWS];
            product::<BYTES>(qs, k, codes(0), 0, &mut sums[0]);
            for b in 0..blocks {
                if i == 0 {
                    for line in (0..share).step_by(64) {
                        let at = next.wrapping_add(b * share + line);
                        _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                    }
                }
                if b + 1 < blocks {
                    product::<BYTES>(qs, k, codes(b + 1), b + 1, &mut sums[(b + 1) % 2]);
                }
                let (wd, wm) = scales::<BYTES>(group.add(b * block_bytes + codes_bytes));
                let sums = &sums[b % 2];
                for (t, acc) in acc.iter_mut().enumerate() {
                    let isum = _mm512_loadu_si512(sums.0.as_ptr().add(t * ROWS) as *const _);
                    if BYTES != 34 {
                        *acc = _mm512_fmadd_ps(wm, _mm512_set1_ps(*s.add(b * ROWS + t)), *acc);
                    }
                    let sc = _mm512_mul_ps(wd, _mm512_set1_ps(*d.add(b * ROWS + t)));
                    *acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(isum), *acc);
                }
            }
            // Each activation row takes the lanes of the group that are among `rows`; the
            // masked-off lanes are neither read nor written. (All 16 visited, so that the
            // loop unrolls and the sums stay in registers across the tile instructions.)
            for (t, acc) in acc.iter().enumerate() {
                if i + t >= m {
                    break;
                }
                let at = out
                    .as_mut_ptr()
                    .wrapping_add((i + t) * n + start)
                    .wrapping_sub(rows.start);
                _mm512_mask_storeu_ps(at, lanes, *acc);
            }
        }
        start = end;
    }
    asm!("tilerelease", options(nostack, nomem));
    BUFFERS.set(buf);
}

/// Block `b`'s integer sums of the 16 activation rows at `qs` (rows `k` bytes apart)
/// against the 16 weight rows' codes at `x` (in the tile's layout), into `sums` (row t:
/// activation row t against each weight row).
#[inline(always)]
unsafe fn product<const BYTES: usize>(
    qs: *const i8,
    k: usize,
    x: *const u8,
    b: usize,
    sums: &mut Sums,
) {
    let (a, c) = (qs.add(b * BLOCK), sums.0.as_mut_ptr());
    macro_rules! tiles {
        ($sum:literal, $a:literal, $b:literal, $op:literal) => {
            asm!(
                concat!("tilezero ", $sum),
                concat!("tileloadd ", $a, ", [{a} + {sa}*1]"),
                concat!("tileloadd ", $b, ", [{x} + {sx}*1]"),
                concat!($op, " ", $sum, ", ", $a, ", ", $b),
                concat!("tilestored [{c} + {sc}*1], ", $sum),
                a = in(reg) a, sa = in(reg) k, x = in(reg) x, sx = in(reg) 64usize,
                c = in(reg) c, sc = in(reg) 64usize, options(nostack),
            )
        };
    }
    // The tile registers are not renamed: odd blocks use their own three, so that the next
    // block's loads need not wait for this block's product.
    match (BYTES == 34, b.is_multiple_of(2)) {
        (true, true) => tiles!("tmm0", "tmm1", "tmm2", "tdpbssd"),
        (true, false) => tiles!("tmm3", "tmm4", "tmm5", "tdpbssd"),
        (false, true) => tiles!("tmm0", "tmm1", "tmm2", "tdpbsud"),
        (false, false) => tiles!("tmm3", "tmm4", "tmm5", "tdpbsud"),
    }
}

/// Weight rows `group` (at most 16) of `w` laid out into `dst` ([`laid_block_bytes`] per
/// block), gathered a block at a time: four-byte words of the sixteen rows side by side.
/// Lanes past the group repeat its last row.
#[inline(always)]
unsafe fn weight_tiles<const BYTES: usize, const CODES: usize>(
    w: &[u8],
    blocks: usize,
    group: Range<usize>,
    dst: &mut [u8],
) {
    let block_bytes = laid_block_bytes(BYTES);
    assert!(dst.len() >= blocks * block_bytes, "amx: room for a group");
    let row_bytes = (blocks * BYTES) as i32;
    let last = group.len() as i32 - 1;
    let offsets = _mm512_mullo_epi32(
        _mm512_min_epi32(lane_index(), _mm512_set1_epi32(last)),
        _mm512_set1_epi32(row_bytes),
    );
    let base = w.as_ptr().add(group.start * blocks * BYTES);
    for b in 0..blocks {
        let block = base.add(b * BYTES);
        let halves = words(offsets, block);
        let at = dst.as_mut_ptr().add(b * block_bytes);
        let words_in_codes = if BYTES == 34 { BLOCK / 4 } else { BLOCK / 8 };
        for g in 0..words_in_codes {
            let q = words(offsets, block.add(CODES + 4 * g));
            _mm512_storeu_si512((at as *mut __m512i).add(g), q);
        }
        let scales = at.add(64 * words_in_codes);
        match BYTES {
            20 => _mm512_storeu_si512(scales as *mut _, halves),
            _ => _mm256_storeu_si256(scales as *mut _, _mm512_cvtepi32_epi16(halves)),
        }
    }
}

/// The four-byte words at `at` plus each lane's offset.
#[inline(always)]
unsafe fn words(offsets: __m512i, at: *const u8) -> __m512i {
    _mm512_i32gather_epi32::<1>(offsets, at as *const i32)
}

/// 0, 1, ..., 15: each lane its own index.
#[inline(always)]
unsafe fn lane_index() -> __m512i {
    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
}
