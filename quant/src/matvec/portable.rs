//! The kernels in plain Rust: the reference the SIMD versions must match.

use half::f16;

use super::q8::{round, Q8Row};
use super::{BLOCK, FOUR_BIT_BLOCK};
use crate::ggml::GgmlType;

// ----------------------------------------------------------------------------
// Ggml blocks against 8-bit activation blocks

/// One weight row against R quantized activation rows, in plain Rust.
pub fn dots<const R: usize>(ty: GgmlType, w: &[u8], rows: [Q8Row; R]) -> [f32; R] {
    rows.map(|x| dot(ty, w, x.qs, x.d, x.s))
}

pub fn dot(ty: GgmlType, w: &[u8], qs: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let bytes = ty.block_bytes();
    let mut acc = 0f32;
    for (b, wb) in w.chunks_exact(bytes).enumerate() {
        let x = &qs[b * BLOCK..(b + 1) * BLOCK];
        let dw = f16_at(wb, 0);
        acc += match ty {
            GgmlType::Q8_0 => {
                let sum: i32 = wb[2..34]
                    .iter()
                    .zip(x)
                    .map(|(&q, &v)| q as i8 as i32 * v as i32)
                    .sum();
                dw * d[b] * sum as f32
            }
            GgmlType::Q4_0 => dw * d[b] * nibble_dot(&wb[2..18], x, 8) as f32,
            GgmlType::Q4_1 => {
                dw * d[b] * nibble_dot(&wb[4..20], x, 0) as f32 + f16_at(wb, 2) * s[b]
            }
            _ => unreachable!("no kernel for {ty:?}"),
        };
    }
    acc
}

/// sum (q - offset) * x over a block's 16 bytes of nibbles: low nibbles are elements
/// 0..16, high nibbles 16..32.
fn nibble_dot(q: &[u8], x: &[i8], offset: i32) -> i32 {
    q.iter()
        .enumerate()
        .map(|(j, &b)| {
            ((b & 0x0f) as i32 - offset) * x[j] as i32
                + ((b >> 4) as i32 - offset) * x[j + 16] as i32
        })
        .sum()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

// ----------------------------------------------------------------------------
// Float weights (bf16 and f32), and the sums of a low-rank product

pub fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(&b, &v)| f32::from_bits((b as u32) << 16) * v)
        .sum()
}

pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a * b).sum()
}

pub fn axpy(u: &mut [f32], s: f32, b: &[f32]) {
    u.iter_mut().zip(b).for_each(|(u, b)| *u += s * b);
}

// ----------------------------------------------------------------------------
// bitsandbytes 4-bit codes against f32 activations

pub fn four_bit(code: &[f32; 16], codes: &[u8], absmax: &[f32], x: &[f32]) -> f32 {
    let half = FOUR_BIT_BLOCK / 2;
    absmax
        .iter()
        .enumerate()
        .map(|(b, &scale)| {
            let sum: f32 = codes[b * half..(b + 1) * half]
                .iter()
                .zip(x[b * FOUR_BIT_BLOCK..].chunks_exact(2))
                .map(|(&byte, xs)| {
                    code[(byte >> 4) as usize] * xs[0] + code[(byte & 0x0f) as usize] * xs[1]
                })
                .sum();
            scale * sum
        })
        .sum()
}

// ----------------------------------------------------------------------------
// Activations rounded to 8-bit blocks

/// One block of 32 as 8-bit codes of absmax / 127 steps, ties to even: (d, sum of codes).
pub fn quantize_block(x: &[f32], codes: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (c, v) in codes.iter_mut().zip(x) {
        *c = round(v * id) as i8;
        sum += *c as i32;
    }
    (d, sum)
}
