//! GGUF (ggml) tensor formats and their dequantization to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` and the reference dequantizers in
//! `ggml-quants.c` (`dequantize_row_q4_0`, `..._q4_1`, `..._q8_0`, `..._q4_K`, `..._q6_K`).
//! All multi-byte values are little-endian.

use half::{bf16, f16};

use crate::QuantError;

/// Weights per super-block of the k-quants.
const QK_K: usize = 256;

/// A tensor type as numbered in the GGUF file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// 32 weights: f16 scale, 16 bytes of 4-bit codes (offset 8).
    Q4_0,
    /// 32 weights: f16 scale, f16 min, 16 bytes of 4-bit codes.
    Q4_1,
    /// 32 weights: f16 scale, 32 signed bytes.
    Q8_0,
    /// 256 weights: f16 scale and min, 12 bytes of 6-bit sub-block scales/mins, 128 bytes of codes.
    Q4K,
    /// 256 weights: 128 bytes low nibbles, 64 bytes high bits, 16 int8 scales, f16 scale.
    Q6K,
}

impl GgmlType {
    /// Maps the GGUF type id to a type ft can read.
    pub fn from_id(id: u32) -> Result<Self, QuantError> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            other => return Err(QuantError::UnsupportedType(other)),
        })
    }

    /// The GGUF type id (the inverse of [`Self::from_id`]).
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q6K => 14,
            Self::Bf16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_elements(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::Bf16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
            Self::Q4K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::Q4_0 => 2 + 16,
            Self::Q4_1 => 2 + 2 + 16,
            Self::Q8_0 => 2 + 32,
            Self::Q4K => 2 + 2 + 12 + QK_K / 2,
            Self::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }

    /// Bytes needed to store `elements` values, or an error if they are not whole blocks.
    pub fn bytes_for(self, elements: usize) -> Result<usize, QuantError> {
        let block = self.block_elements();
        if !elements.is_multiple_of(block) {
            return Err(QuantError::PartialBlock {
                ty: self,
                block,
                elements,
            });
        }
        Ok(elements / block * self.block_bytes())
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes `elements` values of type `ty` from `bytes` into f32.
pub fn dequantize(ty: GgmlType, bytes: &[u8], elements: usize) -> Result<Vec<f32>, QuantError> {
    let expected = ty.bytes_for(elements)?;
    if bytes.len() != expected {
        return Err(QuantError::Size {
            ty,
            elements,
            expected,
            found: bytes.len(),
        });
    }
    let mut out = vec![0f32; elements];
    let blocks = bytes.chunks_exact(ty.block_bytes());
    let outs = out.chunks_exact_mut(ty.block_elements());
    match ty {
        GgmlType::F32 => blocks.zip(outs).for_each(|(b, y)| {
            y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }),
        GgmlType::F16 => blocks.zip(outs).for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::Bf16 => blocks
            .zip(outs)
            .for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::Q4_0 => blocks.zip(outs).for_each(|(b, y)| dequantize_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.zip(outs).for_each(|(b, y)| dequantize_q4_1(b, y)),
        GgmlType::Q8_0 => blocks.zip(outs).for_each(|(b, y)| dequantize_q8_0(b, y)),
        GgmlType::Q4K => blocks.zip(outs).for_each(|(b, y)| dequantize_q4_k(b, y)),
        GgmlType::Q6K => blocks.zip(outs).for_each(|(b, y)| dequantize_q6_k(b, y)),
    }
    Ok(out)
}

/// Encodes f32 values as GGUF F16 bytes.
pub fn quantize_f16(data: &[f32]) -> Vec<u8> {
    data.iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect()
}

/// Encodes f32 values (a multiple of 32) as Q8_0 blocks, as llama.cpp's
/// `quantize_row_q8_0_ref`: d = absmax / 127, q = round(x / d).
pub fn quantize_q8_0(data: &[f32]) -> Result<Vec<u8>, QuantError> {
    let mut out = Vec::with_capacity(GgmlType::Q8_0.bytes_for(data.len())?);
    for block in data.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    Ok(out)
}

/// Encodes f32 values (a multiple of 32) as Q4_0 blocks, as llama.cpp's
/// `quantize_row_q4_0_ref`: d = (the value of largest magnitude) / -8, q = x / d + 8.5
/// truncated, at most 15.
pub fn quantize_q4_0(data: &[f32]) -> Result<Vec<u8>, QuantError> {
    let mut out = Vec::with_capacity(GgmlType::Q4_0.bytes_for(data.len())?);
    for block in data.chunks_exact(32) {
        let max = block
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    Ok(out)
}

/// Encodes f32 values (a multiple of 32) as Q4_1 blocks, as llama.cpp's
/// `quantize_row_q4_1_ref`: d = (max - min) / 15, m = min, q = (x - min) / d + 0.5
/// truncated, at most 15.
pub fn quantize_q4_1(data: &[f32]) -> Result<Vec<u8>, QuantError> {
    let mut out = Vec::with_capacity(GgmlType::Q4_1.bytes_for(data.len())?);
    for block in data.chunks_exact(32) {
        let min = block.iter().fold(f32::MAX, |m, &v| m.min(v));
        let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(f16::from_f32(min).to_le_bytes());
        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
    }
    Ok(out)
}

/// Q4_0: x = (q - 8) * d; low nibbles hold elements 0..16, high nibbles 16..32.
fn dequantize_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: x = q * d + m, nibble order as Q4_0.
fn dequantize_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q8_0: x = q * d with signed bytes.
fn dequantize_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..34].iter().enumerate() {
        y[j] = (q as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: eight sub-blocks of 32, x = d * sc * q - dmin * m; each 32 bytes of codes serve two
/// consecutive sub-blocks (low nibbles, then high nibbles).
fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..16 + QK_K / 2];
    for (chunk, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q6_K: 6-bit codes (4 low bits in `ql`, 2 high bits in `qh`) minus 32, sixteen int8
/// sub-block scales, one f16 super-scale; processed in two halves of 128.
fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, rest) = b.split_at(QK_K / 2);
    let (qh, rest) = rest.split_at(QK_K / 4);
    let (sc, d) = rest.split_at(QK_K / 16);
    let d = f16_at(d, 0);
    for half in 0..2 {
        let ql = &ql[half * 64..];
        let qh = &qh[half * 32..];
        let sc = &sc[half * 8..];
        let y = &mut y[half * 128..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 0.5; byte j holds element j in the low nibble and element j+16 in the high one.
        let mut b = h(0.5).to_vec();
        b.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
        }
    }

    #[test]
    fn q4_1_block_by_hand() {
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| 3 << 4 | j));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], 3.0 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q8_0_block_by_hand() {
        let mut b = h(2.0).to_vec();
        b.extend((0..32i8).map(|j| (j - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 2.0);
        }
    }

    #[test]
    fn q4_k_block_by_hand() {
        // Sub-block s gets scale sc[s] and min mn[s] (6 bits each, packed as ggml packs them).
        // Values above 15 exercise the high bits that ggml packs into other bytes.
        let sc = [33u8, 2, 47, 5, 60, 17, 41, 63];
        let mn = [0u8, 50, 3, 19, 36, 63, 8, 22];
        let mut scales = [0u8; 12];
        scales[..4].copy_from_slice(&sc[..4]);
        scales[4..8].copy_from_slice(&mn[..4]);
        for j in 4..8 {
            scales[j + 4] = (sc[j] & 0x0f) | ((mn[j] & 0x0f) << 4);
            scales[j - 4] |= (sc[j] >> 4) << 6;
            scales[j] |= (mn[j] >> 4) << 6;
        }
        let mut b = h(0.5).to_vec();
        b.extend(h(0.25));
        b.extend(scales);
        // Codes: low nibble 1..=15 cycling, high nibble 2.
        b.extend((0..128usize).map(|i| (2u8 << 4) | (i % 15 + 1) as u8));
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        for chunk in 0..4 {
            let (s1, s2) = (2 * chunk, 2 * chunk + 1);
            for l in 0..32 {
                let lo = ((chunk * 32 + l) % 15 + 1) as f32;
                let i = chunk * 64 + l;
                assert_eq!(y[i], 0.5 * sc[s1] as f32 * lo - 0.25 * mn[s1] as f32);
                assert_eq!(y[i + 32], 0.5 * sc[s2] as f32 * 2.0 - 0.25 * mn[s2] as f32);
            }
        }
    }

    #[test]
    fn q6_k_block_by_hand() {
        // Every code is the same 6-bit value q = 0b10_0101 = 37, so x = d * scale * (37 - 32).
        let ql = [0x55u8; 128];
        let qh = [0b1010_1010u8; 64];
        let scales: Vec<u8> = (0..16i8).map(|s| (s - 8) as u8).collect();
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(&scales);
        b.extend(h(0.125));
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        for (i, v) in y.iter().enumerate() {
            // Element i sits in half i/128, quarter (i%128)/32, and sub-block (i%32)/16.
            let is = (i / 128) * 8 + ((i % 128) / 32) * 2 + (i % 32) / 16;
            let expected = 0.125 * (is as f32 - 8.0) * 5.0;
            assert_eq!(*v, expected, "element {i}");
        }
    }

    #[test]
    fn half_types_and_f32() {
        let y = dequantize(GgmlType::F16, &[h(1.5), h(-2.0)].concat(), 2).unwrap();
        assert_eq!(y, vec![1.5, -2.0]);
        let b: Vec<u8> = [bf16::from_f32(3.0), bf16::from_f32(-0.5)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::Bf16, &b, 2).unwrap(), vec![3.0, -0.5]);
        let b: Vec<u8> = [7.25f32].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &b, 1).unwrap(), vec![7.25]);
    }

    #[test]
    fn q4_encoders_round_trip_within_half_a_step() {
        let data: Vec<f32> = (0..64)
            .map(|i| ((i * 37) % 64) as f32 * 0.05 - 1.3)
            .collect();
        for (ty, bytes) in [
            (GgmlType::Q4_0, quantize_q4_0(&data).unwrap()),
            (GgmlType::Q4_1, quantize_q4_1(&data).unwrap()),
        ] {
            let back = dequantize(ty, &bytes, 64).unwrap();
            for (block, chunk) in data.chunks(32).zip(back.chunks(32)) {
                let min = block.iter().fold(f32::MAX, |m, &v| m.min(v));
                let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
                let step = match ty {
                    GgmlType::Q4_0 => max.abs().max(min.abs()) / 8.0,
                    _ => (max - min) / 15.0,
                };
                for (a, b) in block.iter().zip(chunk) {
                    // Q4_0 clamps the extreme opposite its scale a full step.
                    assert!((a - b).abs() <= step * 1.01 + 1e-3, "{ty:?}: {a} vs {b}");
                }
            }
        }
        assert!(quantize_q4_0(&data[..40]).is_err());
    }

    #[test]
    fn q8_0_and_f16_encoders_round_trip() {
        let data: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) * 0.37).collect();
        let back = dequantize(GgmlType::Q8_0, &quantize_q8_0(&data).unwrap(), 64).unwrap();
        for (block, chunk) in data.chunks(32).zip(back.chunks(32)) {
            let step = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in block.iter().zip(chunk) {
                assert!((a - b).abs() <= step * 0.51, "{a} vs {b}");
            }
        }
        assert!(quantize_q8_0(&data[..40]).is_err());
        let back = dequantize(GgmlType::F16, &quantize_f16(&data), 64).unwrap();
        assert!(data
            .iter()
            .zip(&back)
            .all(|(a, b)| (a - b).abs() <= a.abs() * 1e-3));
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(matches!(
            dequantize(GgmlType::Q4_0, &[0; 17], 32),
            Err(QuantError::Size { .. })
        ));
        assert!(matches!(
            GgmlType::Q4K.bytes_for(100),
            Err(QuantError::PartialBlock { .. })
        ));
        assert!(matches!(
            GgmlType::from_id(6),
            Err(QuantError::UnsupportedType(6))
        ));
    }
}
