//! Intel AMX tiles for the block kernels: per block of 32, one `tdpbsud` (signed activation
//! codes by Q4's unsigned nibbles) or `tdpbssd` (by Q8_0's signed codes) multiplies sixteen
//! activation rows by sixteen weight rows, 8,192 byte products in one instruction, and
//! AVX-512 scales the 16 x 16 integer sums into the f32 totals.
//!
//! The activation rows are the tile's left side as they lie in memory (16 rows of a block's
//! 32 codes, `k` bytes apart); each block of sixteen weight rows is gathered into the right
//! side's layout (row g holds codes 4g..4g+4 of every weight row) once per call, its scales
//! with it, so that a lane of every vector is one weight row.
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

/// Each thread's buffers, kept between calls.
#[derive(Default)]
struct Buffers {
    /// Per block, [`TILE_BYTES`] of the group's weight codes: group g (codes 4g..4g+4) of
    /// weight row r at byte 64 g + 4 r.
    w: Vec<u8>,
    /// Per block, the 16 weight rows' scales and minimums (Q4_0's -8 d, none for Q8_0).
    wd: Vec<f32>,
    wm: Vec<f32>,
    /// The last activation tile's codes, scales and sums when it holds fewer than 16 rows,
    /// padded with zeros.
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

/// 64-byte aligned room for one tile of sums or totals.
#[repr(C, align(64))]
struct Sums([i32; ROWS * ROWS]);

/// Weight rows `rows` of the ggml blocks `w` against the `m` rows of `xq`, as
/// [`super::avx2::block_rows`] computes them.
///
/// # Safety
/// [`detected`] must hold, and the CPU must have AVX-512 F, BW and VL, FMA and F16C; `w`
/// holds at least `rows.end` rows of whole blocks of `ty`, `xq` m rows of k codes, and `out`
/// `rows.len() * m` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn block_rows(
    ty: GgmlType,
    w: &[u8],
    k: usize,
    xq: &Q8Rows,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    match ty {
        GgmlType::Q8_0 => block_rows_for::<34, 2>(w, k, xq, m, rows, out),
        GgmlType::Q4_0 => block_rows_for::<18, 2>(w, k, xq, m, rows, out),
        _ => block_rows_for::<20, 4>(w, k, xq, m, rows, out),
    }
}

/// [`block_rows`] for blocks of `BYTES` bytes whose codes start at byte `CODES` (Q8_0's 32
/// signed bytes, else 16 bytes of nibbles; Q4_1's minimum sits between).
#[inline(always)]
unsafe fn block_rows_for<const BYTES: usize, const CODES: usize>(
    w: &[u8],
    k: usize,
    xq: &Q8Rows,
    m: usize,
    rows: Range<usize>,
    out: &mut [f32],
) {
    let blocks = k / BLOCK;
    let mut buf = BUFFERS.take();
    let partial = m % ROWS;
    if partial != 0 {
        // The last tile, padded to 16 rows.
        let first = m - partial;
        buf.qs.clear();
        buf.qs.extend_from_slice(&xq.qs[first * k..m * k]);
        buf.qs.resize(ROWS * k, 0);
        for (padded, full) in [(&mut buf.d, &xq.d), (&mut buf.s, &xq.s)] {
            padded.clear();
            padded.extend_from_slice(&full[first * blocks..m * blocks]);
            padded.resize(ROWS * blocks, 0.0);
        }
    }
    let config = TileConfig::new();
    asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    let mut sums = [Sums([0; ROWS * ROWS]), Sums([0; ROWS * ROWS])];
    let mut totals = Sums([0; ROWS * ROWS]);
    // Lane r of a gathered column reads row r of the totals.
    let column = _mm512_mullo_epi32(lane_index(), _mm512_set1_epi32(ROWS as i32));
    let n = rows.len();
    for j in (0..n).step_by(ROWS) {
        let group = (rows.start + j)..(rows.start + n.min(j + ROWS));
        weight_tiles::<BYTES, CODES>(w, blocks, group.clone(), &mut buf);
        // While this group meets the first activation tile, the next group's rows (side by
        // side in memory) come into the cache, a block's share of their bytes per block.
        let next = w.as_ptr().wrapping_add(group.end * blocks * BYTES);
        let share = ROWS * BYTES;
        for i in (0..m).step_by(ROWS) {
            let (qs, d, s) = if i + ROWS <= m {
                (
                    xq.qs.as_ptr().add(i * k),
                    xq.d.as_ptr().add(i * blocks),
                    xq.s.as_ptr().add(i * blocks),
                )
            } else {
                (buf.qs.as_ptr(), buf.d.as_ptr(), buf.s.as_ptr())
            };
            // Lane r of acc[t]: activation row i + t against weight row r. Block b's products
            // go into tile register b % 2 while block b - 1's sums are scaled, so that neither
            // waits for the other.
            let mut acc = [_mm512_setzero_ps(); ROWS];
            product::<BYTES>(qs, k, &buf, 0, &mut sums[0]);
            for b in 0..blocks {
                if i == 0 {
                    for line in (0..share).step_by(64) {
                        let at = next.wrapping_add(b * share + line);
                        _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                    }
                }
                if b + 1 < blocks {
                    product::<BYTES>(qs, k, &buf, b + 1, &mut sums[(b + 1) % 2]);
                }
                let wd = _mm512_loadu_ps(buf.wd.as_ptr().add(b * ROWS));
                let wm = _mm512_loadu_ps(buf.wm.as_ptr().add(b * ROWS));
                let sums = &sums[b % 2];
                for (t, acc) in acc.iter_mut().enumerate() {
                    let isum = _mm512_loadu_si512(sums.0.as_ptr().add(t * ROWS) as *const _);
                    if BYTES != 34 {
                        *acc = _mm512_fmadd_ps(wm, _mm512_set1_ps(*s.add(t * blocks + b)), *acc);
                    }
                    let sc = _mm512_mul_ps(wd, _mm512_set1_ps(*d.add(t * blocks + b)));
                    *acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(isum), *acc);
                }
            }
            // Out is weight row major: each weight row takes its column of the totals.
            for (t, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(totals.0.as_mut_ptr().add(t * ROWS) as *mut f32, *acc);
            }
            let mask = ((1u32 << (m - i).min(ROWS)) - 1) as __mmask16;
            for r in 0..group.len() {
                let base = (totals.0.as_ptr() as *const f32).add(r);
                let v = _mm512_i32gather_ps::<4>(column, base);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add((j + r) * m + i), mask, v);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    BUFFERS.set(buf);
}

/// Block `b`'s integer sums of the 16 activation rows at `qs` (rows `k` bytes apart)
/// against the group in `buf`, into `sums` (row t: activation row t against each weight
/// row).
#[inline(always)]
unsafe fn product<const BYTES: usize>(
    qs: *const i8,
    k: usize,
    buf: &Buffers,
    b: usize,
    sums: &mut Sums,
) {
    let (a, x, c) = (
        qs.add(b * BLOCK),
        buf.w.as_ptr().add(b * TILE_BYTES),
        sums.0.as_mut_ptr(),
    );
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

/// Weight rows `group` (at most 16) of `w` in [`Buffers`]' layout, gathered a block at a
/// time: four-byte words of the sixteen rows side by side, Q4's nibbles split into the
/// codes of the block's first and second half. Lanes past the group repeat its last row.
#[inline(always)]
unsafe fn weight_tiles<const BYTES: usize, const CODES: usize>(
    w: &[u8],
    blocks: usize,
    group: Range<usize>,
    buf: &mut Buffers,
) {
    let row_bytes = (blocks * BYTES) as i32;
    buf.w.resize(blocks * TILE_BYTES, 0);
    buf.wd.resize(blocks * ROWS, 0.0);
    buf.wm.resize(blocks * ROWS, 0.0);
    let last = group.len() as i32 - 1;
    let offsets = _mm512_mullo_epi32(
        _mm512_min_epi32(lane_index(), _mm512_set1_epi32(last)),
        _mm512_set1_epi32(row_bytes),
    );
    let low = _mm512_set1_epi8(0x0f);
    let base = w.as_ptr().add(group.start * blocks * BYTES);
    for b in 0..blocks {
        let block = base.add(b * BYTES);
        let halves = words(offsets, block);
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(halves));
        let m = match BYTES {
            20 => _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(halves))),
            18 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
            _ => _mm512_setzero_ps(),
        };
        _mm512_storeu_ps(buf.wd.as_mut_ptr().add(b * ROWS), d);
        _mm512_storeu_ps(buf.wm.as_mut_ptr().add(b * ROWS), m);
        let tile = buf.w.as_mut_ptr().add(b * TILE_BYTES) as *mut __m512i;
        if BYTES == 34 {
            for g in 0..BLOCK / 4 {
                _mm512_storeu_si512(tile.add(g), words(offsets, block.add(CODES + 4 * g)));
            }
        } else {
            for g in 0..BLOCK / 8 {
                let q = words(offsets, block.add(CODES + 4 * g));
                _mm512_storeu_si512(tile.add(g), _mm512_and_si512(q, low));
                let high = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low);
                _mm512_storeu_si512(tile.add(g + 4), high);
            }
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
