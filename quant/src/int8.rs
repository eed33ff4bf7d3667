//! Symmetric int8 absmax quantization (Dettmers et al. 2022, "LLM.int8()", vector-wise
//! scaling without the outlier decomposition): q = round(127 * x / absmax), per row or per
//! block of the flattened weight.

/// Quantizes `data` in groups of `group` values (a row length, or a block size): one i8 per
/// value, one f32 absmax per group.
pub fn quantize(data: &[f32], group: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(data.len());
    let mut absmax = Vec::with_capacity(data.len().div_ceil(group));
    for chunk in data.chunks(group) {
        let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        let scale = if max > 0.0 { 127.0 / max } else { 0.0 };
        q.extend(
            chunk
                .iter()
                .map(|v| (v * scale).round().clamp(-127.0, 127.0) as i8),
        );
    }
    (q, absmax)
}

/// Inverse of [`quantize`] into `out`.
pub fn dequantize_into(q: &[i8], absmax: &[f32], group: usize, out: &mut [f32]) {
    for ((chunk, src), &max) in out.chunks_mut(group).zip(q.chunks(group)).zip(absmax) {
        let scale = max / 127.0;
        for (o, &v) in chunk.iter_mut().zip(src) {
            *o = v as f32 * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_by_hand() {
        let (q, absmax) = quantize(&[1.0, -0.5, 0.25, 0.0, 4.0, -4.0], 3);
        assert_eq!(absmax, vec![1.0, 4.0]);
        assert_eq!(q, vec![127, -64, 32, 0, 127, -127]);
    }

    #[test]
    fn round_trip_within_half_a_step() {
        let data: Vec<f32> = (0..1001)
            .map(|i| ((i * 7919) % 2003) as f32 / 1000.0 - 1.0)
            .collect();
        for group in [64, 1001, 100] {
            let (q, absmax) = quantize(&data, group);
            let mut back = vec![0f32; data.len()];
            dequantize_into(&q, &absmax, group, &mut back);
            for (i, (a, b)) in data.iter().zip(&back).enumerate() {
                assert!((a - b).abs() <= absmax[i / group] / 127.0 / 2.0 + 1e-6);
            }
        }
    }
}
