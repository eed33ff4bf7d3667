//! bitsandbytes' signed 8-bit dynamic map and its blockwise quantization, used for double
//! quantization of the NF4/FP4 block absmax values (Dettmers et al. 2022, "8-bit Optimizers
//! via Block-wise Quantization", arXiv:2110.02861; bitsandbytes `create_dynamic_map`,
//! `quantize_blockwise`, `dQuantize`).

/// Values per block of the 8-bit quantization (bitsandbytes' nested block size).
pub const BLOCK: usize = 256;

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: for each decimal
/// exponent e in -6..=0, the midpoints of `linspace(0.1, 1, 2^(e+6) + 1)` scaled by 10^e, with
/// both signs, plus 0 and 1; sorted. Computed in f32 as torch does.
pub fn dynamic_map() -> [f32; 256] {
    let mut data = Vec::with_capacity(256);
    for i in 0..7i32 {
        let steps = (1usize << i) + 1;
        let bounds = linspace_f32(0.1, 1.0, steps);
        let scale = 10f64.powi(i - 6) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// torch's CPU `linspace` in f32: the first half counts up from `start`, the second half down
/// from `end`, so both ends are exact.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// bitsandbytes' `dQuantize<0>`: a 7-step binary search from index 127, then the nearer of
/// the two neighbours by midpoint. `code` is sorted ascending.
pub fn encode(code: &[f32; 256], x: f32) -> u8 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    let chosen = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    chosen as u8
}

/// Quantizes `data` in blocks of [`BLOCK`] with the dynamic map: one byte per value and one
/// f32 absmax per block.
pub fn quantize(code: &[f32; 256], data: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::with_capacity(data.len());
    let mut absmax = Vec::with_capacity(data.len().div_ceil(BLOCK));
    for block in data.chunks(BLOCK) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        let inv = 1.0 / max;
        bytes.extend(block.iter().map(|v| encode(code, v * inv)));
    }
    (bytes, absmax)
}

/// Inverse of [`quantize`]: code value times the block's absmax.
pub fn dequantize(code: &[f32; 256], bytes: &[u8], absmax: &[f32]) -> Vec<f32> {
    bytes
        .chunks(BLOCK)
        .zip(absmax)
        .flat_map(|(block, &scale)| block.iter().map(move |&b| code[b as usize] * scale))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_has_the_shape_bitsandbytes_builds() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert!(
            (m[0] + 0.992_968_75).abs() < 1e-6 && m[255] == 1.0,
            "{} {}",
            m[0],
            m[255]
        );
        assert_eq!(m.iter().filter(|v| **v == 0.0).count(), 1);
        // Smallest magnitude: 1e-6 * (0.1 + 1) / 2; 127 values of each sign.
        assert!(m.iter().any(|v| (*v - 0.55e-6).abs() < 1e-12));
        assert_eq!(m.iter().filter(|v| **v < 0.0).count(), 127);
        // Largest values: 10^0 * midpoints of linspace(0.1, 1, 65): 0.99296875 below 1.
        assert!((m[254] - 0.992_968_75).abs() < 1e-6);
    }

    #[test]
    fn encode_picks_the_nearest_value() {
        let m = dynamic_map();
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(m[encode(&m, v) as usize], v, "value {i}");
        }
        for x in [-1.0f32, -0.3, -1e-5, 0.0, 2e-7, 0.013, 0.5, 0.999, 1.0] {
            let got = m[encode(&m, x) as usize];
            let best = m
                .iter()
                .map(|v| (v - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(((got - x).abs() - best).abs() < 1e-7, "{x}: got {got}");
        }
    }

    #[test]
    fn blockwise_round_trip() {
        let data: Vec<f32> = (0..600)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let m = dynamic_map();
        let (bytes, absmax) = quantize(&m, &data);
        assert_eq!((bytes.len(), absmax.len()), (600, 3));
        let back = dequantize(&m, &bytes, &absmax);
        for (a, b) in data.iter().zip(&back) {
            assert!((a - b).abs() < 0.01, "{a} vs {b}");
        }
    }
}
