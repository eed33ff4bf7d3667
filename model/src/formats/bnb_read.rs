//! Reads quantized checkpoints in the layout transformers gives bitsandbytes models, so a
//! model saved by `ft quant save` (or by transformers) loads packed, without a quantization
//! step. The layout, per weight:
//!
//! - 4-bit (`Linear4bit`): `weight` (u8 [(n+1)/2, 1], packed codes), `weight.absmax`
//!   (f32 per block, or u8 codes when double-quantized), `weight.quant_map` (f32 [16]),
//!   `weight.nested_absmax` and `weight.nested_quant_map` (double quantization), and
//!   `weight.quant_state.bitsandbytes__nf4` (u8 bytes of a JSON object: quant_type,
//!   blocksize, dtype, shape, nested_blocksize, nested_offset, nested_dtype);
//! - int8 (`Linear8bitLt`): `weight` (i8 [out, in]), `SCB` (f32 row absmax), `weight_format`;
//! - bf16: the weight in BF16.

use std::path::Path;

use ft_quant::bnb4::{FourBit, BLOCK};
use ft_quant::packed::{dynamic_map, Absmax, PackedData};
use ft_quant::PackedWeight;
use safetensors::{Dtype, SafeTensors};

use crate::error::ModelError;

/// Suffixes of the tensors that accompany a packed weight (after `...q_proj.`).
const PARTS: [&str; 7] = [
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
    "SCB",
];

/// Whether `name` is a companion tensor of a packed weight rather than a weight itself.
pub fn is_part(name: &str) -> bool {
    PARTS.iter().any(|p| name.ends_with(&format!(".{p}"))) || name.ends_with(".weight_format")
}

/// Reads the packed weight `name` from a safetensors file, if it is stored packed.
pub fn read_packed(
    st: &SafeTensors,
    name: &str,
    path: &Path,
) -> Result<Option<PackedWeight>, ModelError> {
    let fault = |what: String| ModelError::format(path, format!("{name}: {what}"));
    let get = |key: &str| st.tensor(key).ok();
    let f32s = |key: &str| -> Result<Vec<f32>, ModelError> {
        let t = get(key).ok_or_else(|| fault(format!("{key} is missing")))?;
        if t.dtype() != Dtype::F32 {
            return Err(fault(format!("{key} should be F32, found {:?}", t.dtype())));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let prefix = name.strip_suffix(".weight").unwrap_or(name);
    if let Some(scb) = get(&format!("{prefix}.SCB")) {
        let w = get(name).ok_or_else(|| fault("weight is missing".into()))?;
        let shape = w.shape();
        if w.dtype() != Dtype::I8 || shape.len() != 2 || scb.shape() != [shape[0]] {
            return Err(fault(format!(
                "int8 weight {:?} {:?} with SCB {:?} does not fit",
                w.dtype(),
                shape,
                scb.shape()
            )));
        }
        let absmax = f32s(&format!("{prefix}.SCB"))?;
        return Ok(Some(PackedWeight {
            shape: [shape[0], shape[1]],
            data: PackedData::Int8 {
                q: w.data().iter().map(|b| *b as i8).collect(),
                absmax,
                group: shape[1],
            },
        }));
    }
    let state = ["nf4", "fp4"]
        .iter()
        .find_map(|t| get(&format!("{name}.quant_state.bitsandbytes__{t}")));
    let Some(state) = state else {
        return Ok(None);
    };
    let state: serde_json::Value =
        serde_json::from_slice(state.data()).map_err(|e| fault(format!("quant_state: {e}")))?;
    let kind = match state["quant_type"].as_str() {
        Some("nf4") => FourBit::Nf4,
        Some("fp4") => FourBit::Fp4,
        other => return Err(fault(format!("quant_type {other:?}"))),
    };
    if state["blocksize"].as_u64() != Some(BLOCK as u64) {
        return Err(fault(format!(
            "blocksize {} (ft reads 64)",
            state["blocksize"]
        )));
    }
    let shape: Vec<usize> = state["shape"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_u64().map(|d| d as usize))
                .collect()
        })
        .unwrap_or_default();
    let [rows, cols] = shape[..] else {
        return Err(fault(format!("shape {shape:?} is not 2-D")));
    };
    let map = f32s(&format!("{name}.quant_map"))?;
    if map
        .iter()
        .zip(kind.code())
        .any(|(a, b)| (a - b).abs() > 1e-6)
        || map.len() != 16
    {
        return Err(fault(
            "quant_map differs from the standard code book".into(),
        ));
    }
    let codes = get(name).ok_or_else(|| fault("weight is missing".into()))?;
    let n = rows * cols;
    if codes.data().len() != n.div_ceil(2) {
        return Err(fault(format!(
            "{} code bytes for {n} weights",
            codes.data().len()
        )));
    }
    let absmax_key = format!("{name}.absmax");
    let absmax_t = get(&absmax_key).ok_or_else(|| fault("absmax is missing".into()))?;
    let absmax = if absmax_t.dtype() == Dtype::U8 {
        let nested = f32s(&format!("{name}.nested_quant_map"))?;
        if nested
            .iter()
            .zip(dynamic_map())
            .any(|(a, b)| (a - b).abs() > 1e-6)
        {
            return Err(fault(
                "nested_quant_map differs from the signed dynamic map".into(),
            ));
        }
        Absmax::Double {
            codes: absmax_t.data().to_vec(),
            scales: f32s(&format!("{name}.nested_absmax"))?,
            offset: state["nested_offset"]
                .as_f64()
                .ok_or_else(|| fault("nested_offset is missing".into()))?
                as f32,
        }
    } else {
        Absmax::Plain(f32s(&absmax_key)?)
    };
    Ok(Some(PackedWeight {
        shape: [rows, cols],
        data: PackedData::FourBit {
            kind,
            codes: codes.data().to_vec(),
            absmax,
        },
    }))
}
