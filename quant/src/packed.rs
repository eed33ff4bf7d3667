//! A frozen weight in one of the storage formats of a quantized base, with nothing but its
//! bytes and constants: bf16, int8 absmax (per row or per block), NF4 or FP4 (optionally
//! with double-quantized absmax values).

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use half::bf16;

use crate::bnb4::{self, FourBit};
use crate::ggml::{self, GgmlType};
use crate::{dynamic8, int8, matvec};

/// The storage format of the frozen linear weights of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// Full precision (no packing).
    F32,
    /// bfloat16.
    Bf16,
    /// int8 with one absmax per output row (LLM.int8's vector-wise scaling).
    Int8,
    /// int8 with one absmax per block of 64.
    Int8Block,
    /// 4-bit NormalFloat, blocks of 64.
    Nf4,
    /// bitsandbytes' 4-bit float, blocks of 64.
    Fp4,
    /// ggml's Q8_0: blocks of 32 signed bytes with an f16 scale (inference kernels).
    Q8_0,
    /// ggml's Q4_0: blocks of 32 nibbles with an f16 scale.
    Q4_0,
    /// ggml's Q4_1: blocks of 32 nibbles with an f16 scale and minimum.
    Q4_1,
}

impl QuantFormat {
    /// Every format, in order of decreasing size.
    pub const ALL: [QuantFormat; 9] = [
        Self::F32,
        Self::Bf16,
        Self::Q8_0,
        Self::Int8,
        Self::Int8Block,
        Self::Q4_1,
        Self::Nf4,
        Self::Fp4,
        Self::Q4_0,
    ];

    /// The ggml block type of the inference formats.
    pub fn ggml(self) -> Option<GgmlType> {
        match self {
            Self::Q8_0 => Some(GgmlType::Q8_0),
            Self::Q4_0 => Some(GgmlType::Q4_0),
            Self::Q4_1 => Some(GgmlType::Q4_1),
            _ => None,
        }
    }

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
            Self::Int8Block => "int8-block",
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                format!(
                    "expected one of f32, bf16, int8, int8-block, nf4, fp4, q8_0, q4_0, q4_1, \
                     got {s:?}"
                )
            })
    }
}

/// How to store the frozen linear weights of a model: a format, and for the 4-bit formats
/// whether the absmax values are double-quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    /// The storage format.
    pub format: QuantFormat,
    /// Double quantization of the 4-bit absmax values.
    pub double_quant: bool,
}

impl QuantSpec {
    /// Full precision.
    pub const F32: QuantSpec = QuantSpec {
        format: QuantFormat::F32,
        double_quant: false,
    };

    /// Packs a row-major [rows, cols] weight; `None` for f32.
    pub fn pack(&self, data: &[f32], shape: [usize; 2]) -> Option<PackedWeight> {
        PackedWeight::quantize(self.format, self.double_quant, data, shape)
    }
}

impl FromStr for QuantSpec {
    type Err = String;

    /// `nf4`, or `nf4+dq` for double quantization.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, double_quant) = match s.strip_suffix("+dq") {
            Some(name) => (name, true),
            None => (s, false),
        };
        Ok(Self {
            format: name.parse()?,
            double_quant,
        })
    }
}

impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let four_bit = matches!(self.format, QuantFormat::Nf4 | QuantFormat::Fp4);
        if self.double_quant && four_bit {
            write!(f, "{}+dq", self.format)
        } else {
            write!(f, "{}", self.format)
        }
    }
}

/// Elements per absmax block of `Int8Block`.
pub const INT8_BLOCK: usize = 64;

/// The absmax values of a 4-bit weight: plain f32, or double-quantized (QLoRA section 3):
/// 8-bit dynamic codes of (absmax - mean) in blocks of 256, one f32 scale per block, the mean.
#[derive(Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block of 64.
    Plain(Vec<f32>),
    /// Double quantization.
    Double {
        /// One byte per block of 64.
        codes: Vec<u8>,
        /// One f32 per 256 codes.
        scales: Vec<f32>,
        /// Mean subtracted before quantizing.
        offset: f32,
    },
}

/// The signed dynamic map, computed once.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(dynamic8::dynamic_map)
}

impl Absmax {
    /// `values` as stored: plain, or double-quantized (8-bit dynamic codes in blocks of 256
    /// about their mean).
    pub fn quantize(values: Vec<f32>, double: bool) -> Self {
        if !double {
            return Self::Plain(values);
        }
        let offset =
            values.iter().map(|v| *v as f64).sum::<f64>() as f32 / values.len().max(1) as f32;
        let centered: Vec<f32> = values.iter().map(|v| v - offset).collect();
        let (codes, scales) = dynamic8::quantize(dynamic_map(), &centered);
        Self::Double {
            codes,
            scales,
            offset,
        }
    }

    /// The f32 absmax values.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Self::Plain(v) => v.clone(),
            Self::Double {
                codes,
                scales,
                offset,
            } => dynamic8::dequantize(dynamic_map(), codes, scales)
                .into_iter()
                .map(|v| v + offset)
                .collect(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Plain(v) => 4 * v.len(),
            Self::Double { codes, scales, .. } => codes.len() + 4 * scales.len() + 4,
        }
    }
}

/// The packed bytes of one weight.
#[derive(Clone, PartialEq)]
pub enum PackedData {
    /// bfloat16 bits.
    Bf16(Vec<u16>),
    /// int8 codes with one absmax per `group` consecutive values.
    Int8 {
        /// One per value.
        q: Vec<i8>,
        /// One per group.
        absmax: Vec<f32>,
        /// Values per group: the row length, or [`INT8_BLOCK`].
        group: usize,
    },
    /// 4-bit codes, two a byte, first element in the high nibble; blocks of 64.
    FourBit {
        /// NF4 or FP4.
        kind: FourBit,
        /// (n + 1) / 2 bytes.
        codes: Vec<u8>,
        /// One per block.
        absmax: Absmax,
    },
    /// ggml blocks of 32 along each row, as a GGUF file stores them ([`crate::matvec`]).
    Blocks {
        /// Q8_0, Q4_0 or Q4_1.
        ty: GgmlType,
        /// rows * cols / 32 blocks.
        bytes: Vec<u8>,
        /// The rows laid out for the AMX tiles, once a batch has needed them.
        tiles: matvec::TileLayout,
    },
}

/// A frozen [rows, cols] weight in a packed format.
#[derive(Clone, PartialEq)]
pub struct PackedWeight {
    /// [out, in] of the linear layer.
    pub shape: [usize; 2],
    /// The bytes and constants.
    pub data: PackedData,
}

impl fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PackedWeight({}, {:?}, {} bytes)",
            self.format(),
            self.shape,
            self.storage_bytes()
        )
    }
}

impl PackedWeight {
    /// Packs a row-major [rows, cols] f32 weight; `None` for [`QuantFormat::F32`], and for
    /// the ggml formats when rows are not whole blocks of 32 (the weight stays f32).
    /// `double_quant` applies to the 4-bit formats.
    pub fn quantize(
        format: QuantFormat,
        double_quant: bool,
        data: &[f32],
        shape: [usize; 2],
    ) -> Option<Self> {
        debug_assert_eq!(data.len(), shape[0] * shape[1]);
        let four_bit = |kind| {
            let (codes, absmax) = bnb4::quantize(kind, data);
            PackedData::FourBit {
                kind,
                codes,
                absmax: Absmax::quantize(absmax, double_quant),
            }
        };
        let int8 = |group: usize| {
            let (q, absmax) = int8::quantize(data, group);
            PackedData::Int8 { q, absmax, group }
        };
        let data = match format {
            QuantFormat::F32 => return None,
            QuantFormat::Bf16 => {
                PackedData::Bf16(data.iter().map(|v| bf16::from_f32(*v).to_bits()).collect())
            }
            QuantFormat::Int8 => int8(shape[1].max(1)),
            QuantFormat::Int8Block => int8(INT8_BLOCK),
            QuantFormat::Nf4 => four_bit(FourBit::Nf4),
            QuantFormat::Fp4 => four_bit(FourBit::Fp4),
            QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                if !shape[1].is_multiple_of(matvec::BLOCK) {
                    return None;
                }
                let ty = format.ggml()?;
                let bytes = match ty {
                    GgmlType::Q8_0 => ggml::quantize_q8_0(data),
                    GgmlType::Q4_0 => ggml::quantize_q4_0(data),
                    _ => ggml::quantize_q4_1(data),
                };
                PackedData::Blocks {
                    ty,
                    bytes: bytes.ok()?,
                    tiles: matvec::TileLayout::default(),
                }
            }
        };
        Some(Self { shape, data })
    }

    /// The format this weight is stored in.
    pub fn format(&self) -> QuantFormat {
        match &self.data {
            PackedData::Bf16(_) => QuantFormat::Bf16,
            PackedData::Int8 { group, .. }
                if *group == INT8_BLOCK && self.shape[1] != INT8_BLOCK =>
            {
                QuantFormat::Int8Block
            }
            PackedData::Int8 { .. } => QuantFormat::Int8,
            PackedData::FourBit {
                kind: FourBit::Nf4, ..
            } => QuantFormat::Nf4,
            PackedData::FourBit {
                kind: FourBit::Fp4, ..
            } => QuantFormat::Fp4,
            PackedData::Blocks { ty, .. } => match ty {
                GgmlType::Q8_0 => QuantFormat::Q8_0,
                GgmlType::Q4_0 => QuantFormat::Q4_0,
                _ => QuantFormat::Q4_1,
            },
        }
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Whether the weight has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of storage: codes plus every constant.
    pub fn storage_bytes(&self) -> usize {
        match &self.data {
            PackedData::Bf16(v) => 2 * v.len(),
            PackedData::Int8 { q, absmax, .. } => q.len() + 4 * absmax.len(),
            PackedData::FourBit { codes, absmax, .. } => codes.len() + absmax.bytes(),
            PackedData::Blocks { bytes, .. } => bytes.len(),
        }
    }

    /// Storage bits per weight (NF4: 4.5; with double quantization about 4.127).
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.storage_bytes() as f64 / self.len().max(1) as f64
    }

    /// Dequantizes into `out` (row-major, `len()` values).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        match &self.data {
            PackedData::Bf16(v) => out
                .iter_mut()
                .zip(v)
                .for_each(|(o, b)| *o = bf16::from_bits(*b).to_f32()),
            PackedData::Int8 { q, absmax, group } => int8::dequantize_into(q, absmax, *group, out),
            PackedData::FourBit {
                kind,
                codes,
                absmax,
            } => bnb4::dequantize_into(*kind, codes, &absmax.values(), out),
            PackedData::Blocks { ty, bytes, .. } => {
                let values = ggml::dequantize(*ty, bytes, out.len())
                    .expect("ggml blocks hold rows * cols values by construction");
                out.copy_from_slice(&values);
            }
        }
    }

    /// The weight as the CPU kernels read it ([`matvec::Weights`]), for the formats they
    /// multiply without dequantizing.
    pub fn kernel_weights(&self) -> Option<matvec::Weights<'_>> {
        match &self.data {
            PackedData::Bf16(bits) => Some(matvec::Weights::Bf16(bits)),
            PackedData::Blocks { ty, bytes, tiles } if matvec::supports(*ty) => {
                Some(matvec::Weights::Blocks {
                    ty: *ty,
                    bytes,
                    tiles: Some(tiles),
                })
            }
            _ => None,
        }
    }

    /// Dequantizes to a new row-major vector.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.dequantize_into(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weight(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i * 2654435761) % 1000) as f32 / 500.0 - 1.0) * 0.05)
            .collect()
    }

    #[test]
    fn packed_sizes_follow_the_formulas() {
        let (rows, cols) = (576, 1536);
        let n = rows * cols;
        let w = weight(rows, cols);
        let size = |f, dq| {
            PackedWeight::quantize(f, dq, &w, [rows, cols])
                .unwrap()
                .storage_bytes()
        };
        assert_eq!(size(QuantFormat::Bf16, false), 2 * n);
        assert_eq!(size(QuantFormat::Int8, false), n + 4 * rows);
        assert_eq!(size(QuantFormat::Int8Block, false), n + 4 * n / 64);
        assert_eq!(size(QuantFormat::Nf4, false), n / 2 + 4 * n / 64);
        assert_eq!(size(QuantFormat::Fp4, false), n / 2 + 4 * n / 64);
        assert_eq!(
            size(QuantFormat::Nf4, true),
            n / 2 + n / 64 + 4 * (n / 64).div_ceil(256) + 4
        );
        let nf4 = PackedWeight::quantize(QuantFormat::Nf4, false, &w, [rows, cols]).unwrap();
        assert_eq!(nf4.bits_per_param(), 4.5);
        let dq = PackedWeight::quantize(QuantFormat::Nf4, true, &w, [rows, cols]).unwrap();
        assert!(
            (dq.bits_per_param() - 4.127).abs() < 0.001,
            "{}",
            dq.bits_per_param()
        );
        assert!(PackedWeight::quantize(QuantFormat::F32, false, &w, [rows, cols]).is_none());
    }

    #[test]
    fn every_format_round_trips_within_its_step() {
        let (rows, cols) = (8, 96);
        let w = weight(rows, cols);
        for (format, dq, tolerance) in [
            (QuantFormat::Bf16, false, 0.004),
            (QuantFormat::Int8, false, 0.01),
            (QuantFormat::Int8Block, false, 0.01),
            (QuantFormat::Nf4, false, 0.16),
            (QuantFormat::Nf4, true, 0.17),
            (QuantFormat::Fp4, true, 0.17),
        ] {
            let p = PackedWeight::quantize(format, dq, &w, [rows, cols]).unwrap();
            assert_eq!(p.format(), format);
            let back = p.dequantize();
            let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in w.iter().zip(&back) {
                assert!((a - b).abs() <= tolerance * max, "{format}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn double_quant_constants_are_mean_and_block_scales() {
        // 300 blocks of 64: absmax values 1..=300 (times 0.01); mean 1.505.
        let w: Vec<f32> = (0..300 * 64)
            .map(|i| {
                if i % 64 == 0 {
                    ((i / 64) + 1) as f32 * 0.01
                } else {
                    0.0
                }
            })
            .collect();
        let p = PackedWeight::quantize(QuantFormat::Nf4, true, &w, [300, 64]).unwrap();
        let PackedData::FourBit {
            absmax:
                Absmax::Double {
                    codes,
                    scales,
                    offset,
                },
            ..
        } = &p.data
        else {
            panic!("not double-quantized");
        };
        assert!((offset - 1.505).abs() < 1e-5, "{offset}");
        assert_eq!((codes.len(), scales.len()), (300, 2));
        // Block 0 of the centered values spans -1.495..1.055: its scale is 1.495.
        assert!((scales[0] - 1.495).abs() < 1e-5, "{}", scales[0]);
        // Block 1 (values 257..300): max |v - mean| = 3.00 - 1.505.
        assert!((scales[1] - 1.495).abs() < 1e-5, "{}", scales[1]);
        let values = Absmax::Double {
            codes: codes.clone(),
            scales: scales.clone(),
            offset: *offset,
        }
        .values();
        for (i, v) in values.iter().enumerate() {
            assert!((v - (i + 1) as f32 * 0.01).abs() < 0.011, "block {i}: {v}");
        }
    }

    #[test]
    fn formats_parse_by_name() {
        for f in QuantFormat::ALL {
            assert_eq!(f.name().parse::<QuantFormat>(), Ok(f));
        }
        assert!("q4".parse::<QuantFormat>().is_err());
        let spec: QuantSpec = "nf4+dq".parse().unwrap();
        assert_eq!((spec.format, spec.double_quant), (QuantFormat::Nf4, true));
        assert_eq!(spec.to_string(), "nf4+dq");
    }
}
