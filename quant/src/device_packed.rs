//! A packed weight kept on the compute device in its packed form and dequantized there.
//!
//! On a GPU, dequantizing on the host and uploading f32 for every matmul moves 8x the bytes of
//! an NF4 weight over PCIe and leaves the GPU waiting. Here the codes travel once: 4-bit codes
//! eight to an i32 word, int8 codes and bf16 bits four and two to a word, with their absmax
//! constants (for double quantization: the 8-bit codes, block scales and mean). Each matmul
//! unpacks them with shifts and masks and looks values up in the code book, all as tensor ops
//! on the device, the way bitsandbytes' `dequantize_4bit` kernel turns codes into a transient
//! bf16/f32 weight. The values are the host's bit for bit (same table lookups and products).

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::bnb4;
use crate::dynamic8;
use crate::packed::{dynamic_map, Absmax, PackedData, PackedWeight};

/// A packed weight resident on one device.
#[derive(Clone, Debug)]
pub struct DevicePacked<B: Backend> {
    /// [out, in] of the linear layer.
    shape: [usize; 2],
    /// The device the tensors live on.
    device: B::Device,
    /// Codes and constants.
    codes: Codes<B>,
}

/// The device tensors of each storage format.
#[derive(Clone, Debug)]
enum Codes<B: Backend> {
    /// ggml blocks (CPU inference formats), uploaded decoded.
    Dense(Tensor<B, 2>),
    /// bf16 bits, two to a word; decoded through a table of the 256 exponents.
    Bf16 {
        words: Tensor<B, 1, Int>,
        powers: Tensor<B, 1>,
    },
    /// int8 codes, four to a word, with one scale (absmax / 127) per group.
    Int8 {
        words: Tensor<B, 1, Int>,
        values: Tensor<B, 1>,
        scales: Tensor<B, 1>,
        group: usize,
    },
    /// 4-bit codes, eight to a word, padded to whole blocks of 64.
    FourBit {
        words: Tensor<B, 1, Int>,
        values: Tensor<B, 1>,
        absmax: DeviceAbsmax<B>,
    },
}

/// The absmax values of a 4-bit weight on the device.
#[derive(Clone, Debug)]
enum DeviceAbsmax<B: Backend> {
    /// One f32 per block.
    Plain(Tensor<B, 1>),
    /// 8-bit codes four to a word (padded to blocks of 256), the dynamic map, one scale per
    /// 256 codes, the mean.
    Double {
        words: Tensor<B, 1, Int>,
        map: Tensor<B, 1>,
        scales: Tensor<B, 1>,
        offset: f32,
        blocks: usize,
    },
}

impl<B: Backend> DevicePacked<B> {
    /// Copies the codes and constants of `weight` to `device`.
    pub fn upload(weight: &PackedWeight, device: &B::Device) -> Self {
        let floats = |v: &[f32]| {
            Tensor::<B, 1>::from_data(
                TensorData::new(v.to_vec(), [v.len()]).convert::<B::FloatElem>(),
                device,
            )
        };
        let codes = match &weight.data {
            PackedData::Blocks { .. } => Codes::Dense(Tensor::from_data(
                TensorData::new(weight.dequantize(), weight.shape).convert::<B::FloatElem>(),
                device,
            )),
            PackedData::Bf16(bits) => {
                let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_be_bytes()).collect();
                Codes::Bf16 {
                    words: words::<B>(&bytes, bytes.len(), device),
                    powers: floats(&bf16_powers()),
                }
            }
            PackedData::Int8 { q, absmax, group } => {
                let bytes: Vec<u8> = q.iter().map(|v| *v as u8).collect();
                let padded = absmax.len() * group;
                let values: Vec<f32> = (0..=255u8).map(|b| b as i8 as f32).collect();
                let scales: Vec<f32> = absmax.iter().map(|m| m / 127.0).collect();
                Codes::Int8 {
                    words: words::<B>(&bytes, padded, device),
                    values: floats(&values),
                    scales: floats(&scales),
                    group: *group,
                }
            }
            PackedData::FourBit {
                kind,
                codes,
                absmax,
            } => {
                let blocks = weight.len().div_ceil(bnb4::BLOCK);
                let absmax = match absmax {
                    Absmax::Plain(v) => DeviceAbsmax::Plain(floats(v)),
                    Absmax::Double {
                        codes,
                        scales,
                        offset,
                    } => DeviceAbsmax::Double {
                        words: words::<B>(codes, scales.len() * dynamic8::BLOCK, device),
                        map: floats(dynamic_map()),
                        scales: floats(scales),
                        offset: *offset,
                        blocks,
                    },
                };
                Codes::FourBit {
                    words: words::<B>(codes, blocks * bnb4::BLOCK / 2, device),
                    values: floats(kind.code()),
                    absmax,
                }
            }
        };
        Self {
            shape: weight.shape,
            device: device.clone(),
            codes,
        }
    }

    /// The device the codes live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// W [out, in] as a fresh f32 tensor on the device.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let [rows, cols] = self.shape;
        let n = rows * cols;
        let flat = match &self.codes {
            Codes::Dense(w) => return w.clone(),
            Codes::Bf16 { words, powers } => bf16_values(unpack(words.clone(), 16), powers, n),
            Codes::Int8 {
                words,
                values,
                scales,
                group,
            } => {
                let groups = scales.dims()[0];
                let codes = unpack(words.clone(), 8).narrow(0, 0, groups * group);
                let q = values.clone().select(0, codes).reshape([groups, *group]);
                (q * scales.clone().unsqueeze_dim(1)).reshape([groups * group])
            }
            Codes::FourBit {
                words,
                values,
                absmax,
            } => {
                let absmax = absmax.values();
                let blocks = absmax.dims()[0];
                let codes = unpack(words.clone(), 4);
                let q = values
                    .clone()
                    .select(0, codes)
                    .reshape([blocks, bnb4::BLOCK]);
                (q * absmax.unsqueeze_dim(1)).reshape([blocks * bnb4::BLOCK])
            }
        };
        flat.narrow(0, 0, n).reshape([rows, cols])
    }
}

impl<B: Backend> DeviceAbsmax<B> {
    /// One f32 absmax per block of 64.
    fn values(&self) -> Tensor<B, 1> {
        match self {
            Self::Plain(v) => v.clone(),
            Self::Double {
                words,
                map,
                scales,
                offset,
                blocks,
            } => {
                let groups = scales.dims()[0];
                let codes = unpack(words.clone(), 8).narrow(0, 0, groups * dynamic8::BLOCK);
                let v = map
                    .clone()
                    .select(0, codes)
                    .reshape([groups, dynamic8::BLOCK]);
                let v = (v * scales.clone().unsqueeze_dim(1)).reshape([groups * dynamic8::BLOCK]);
                v.narrow(0, 0, *blocks).add_scalar(*offset)
            }
        }
    }
}

/// `bytes` zero-padded to `len` (and to whole words), four to an i32 word, first byte in the
/// highest bits.
fn words<B: Backend>(bytes: &[u8], len: usize, device: &B::Device) -> Tensor<B, 1, Int> {
    let mut padded = bytes.to_vec();
    padded.resize(len.max(bytes.len()).next_multiple_of(4), 0);
    let words: Vec<i32> = padded
        .chunks_exact(4)
        .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let n = words.len();
    Tensor::from_data(TensorData::new(words, [n]).convert::<B::IntElem>(), device)
}

/// The `bits`-wide fields of each word, highest first: [words * 32 / bits].
///
/// Masking after the shift makes the result the same for sign-extended words (an i64 backend)
/// and for arithmetic or logical shifts.
fn unpack<B: Backend>(words: Tensor<B, 1, Int>, bits: usize) -> Tensor<B, 1, Int> {
    let per_word = 32 / bits;
    let n = words.dims()[0];
    let mask = ((1i64 << bits) - 1).elem::<B::IntElem>();
    let fields = (0..per_word)
        .map(|k| {
            let shift = ((32 - bits * (k + 1)) as i64).elem::<B::IntElem>();
            words
                .clone()
                .bitwise_right_shift_scalar(shift)
                .bitwise_and_scalar(mask)
                .unsqueeze_dim::<2>(1)
        })
        .collect();
    Tensor::cat(fields, 1).reshape([n * per_word])
}

/// 2^(e - 127) for each bf16 exponent e, with 2^-126 for e = 0 (subnormals).
fn bf16_powers() -> Vec<f32> {
    (0..256).map(|e: i32| 2f32.powi(e.max(1) - 127)).collect()
}

/// bf16 bit patterns [n..] to f32: sign * 2^(e-127) * (1 + m/128), or 2^-126 * m/128 for
/// subnormals; exact in f32. Exponent 255 gives infinities (m = 0) and NaN.
fn bf16_values<B: Backend>(
    bits: Tensor<B, 1, Int>,
    powers: &Tensor<B, 1>,
    n: usize,
) -> Tensor<B, 1> {
    let bits = bits.narrow(0, 0, n);
    let sign = bits.clone().bitwise_right_shift_scalar(15.elem()).float();
    let exponent = bits
        .clone()
        .bitwise_right_shift_scalar(7.elem())
        .bitwise_and_scalar(0xff.elem());
    let mantissa = bits
        .bitwise_and_scalar(0x7f.elem())
        .float()
        .div_scalar(128.0);
    let implicit = exponent.clone().greater_elem(0).float();
    let nan = exponent
        .clone()
        .equal_elem(255)
        .bool_and(mantissa.clone().greater_elem(0.0));
    let magnitude = powers.clone().select(0, exponent) * (implicit + mantissa);
    (magnitude * (sign.mul_scalar(-2.0).add_scalar(1.0))).mask_fill(nan, f32::NAN)
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use half::bf16;

    use super::*;
    use crate::packed::{QuantFormat, INT8_BLOCK};

    type B = NdArray<f32>;

    fn weight(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 2654435761) % 1000) as f32 / 500.0 - 1.0) * 0.05)
            .collect()
    }

    #[test]
    fn every_format_dequantizes_on_the_device_as_on_the_host() {
        let device = Default::default();
        // Odd shapes: partial blocks of 64, odd nibble tails, word padding, more than 256
        // absmax blocks (two double-quant groups).
        for shape in [[3, 5], [7, 33], [130, 129], [2, INT8_BLOCK]] {
            let w = weight(shape[0] * shape[1]);
            for format in QuantFormat::ALL {
                for dq in [false, true] {
                    let Some(packed) = PackedWeight::quantize(format, dq, &w, shape) else {
                        continue;
                    };
                    let host = packed.dequantize();
                    let device: Vec<f32> = DevicePacked::<B>::upload(&packed, &device)
                        .dequantize()
                        .into_data()
                        .to_vec()
                        .unwrap();
                    assert_eq!(device, host, "{format} dq={dq} {shape:?}");
                }
            }
        }
    }

    #[test]
    fn bf16_specials_decode_exactly() {
        let device = Default::default();
        let values = [
            0.0,
            -0.0,
            1.0,
            -2.5,
            1e-40,
            -3e38,
            6.1e-5,
            0.1,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let bits: Vec<u16> = values
            .iter()
            .map(|v| bf16::from_f32(*v).to_bits())
            .collect();
        let packed = PackedWeight {
            shape: [1, values.len()],
            data: PackedData::Bf16(bits.clone()),
        };
        let got: Vec<f32> = DevicePacked::<B>::upload(&packed, &device)
            .dequantize()
            .into_data()
            .to_vec()
            .unwrap();
        let want: Vec<f32> = bits.iter().map(|b| bf16::from_bits(*b).to_f32()).collect();
        for (g, w) in got.iter().zip(&want) {
            assert!(g == w || (g.is_nan() && w.is_nan()), "{g} vs {w}");
        }
    }
}
