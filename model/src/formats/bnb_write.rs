//! Writes quantized checkpoints in the layout transformers gives bitsandbytes models (the
//! layout [`super::bnb_read`] describes and reads), so a model saved by `ft quant save` loads
//! without a quantization step, here and in transformers.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use ft_quant::bnb4::{FourBit, BLOCK};
use ft_quant::packed::{dynamic_map, Absmax, PackedData};
use ft_quant::{PackedWeight, QuantFormat, QuantSpec};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use crate::error::ModelError;
use crate::formats::gguf_write::write_atomic;
use crate::formats::hf_export::hf_config_json;
use crate::pretrained::Pretrained;

/// One tensor to write: name, dtype, shape, bytes.
type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensors that store one packed weight named `name` (`...q_proj.weight`).
fn packed_entries(name: &str, w: &PackedWeight) -> Result<Vec<Entry>, String> {
    let n = w.len();
    Ok(match &w.data {
        PackedData::Bf16(bits) => {
            vec![(
                name.into(),
                Dtype::BF16,
                w.shape.to_vec(),
                bits.iter().flat_map(|b| b.to_le_bytes()).collect(),
            )]
        }
        PackedData::Int8 { q, absmax, group } if *group == w.shape[1] => {
            let prefix = name.strip_suffix(".weight").unwrap_or(name);
            vec![
                (
                    name.into(),
                    Dtype::I8,
                    w.shape.to_vec(),
                    q.iter().map(|v| *v as u8).collect(),
                ),
                (
                    format!("{prefix}.SCB"),
                    Dtype::F32,
                    vec![absmax.len()],
                    f32_bytes(absmax),
                ),
                (
                    format!("{prefix}.weight_format"),
                    Dtype::U8,
                    vec![],
                    vec![0],
                ),
            ]
        }
        PackedData::Int8 { .. } => {
            return Err("int8-block has no bitsandbytes layout; save int8 (per row)".into())
        }
        PackedData::Blocks { ty, .. } => {
            return Err(format!(
                "{ty:?} is a GGUF block format for CPU inference with no bitsandbytes layout"
            ))
        }
        PackedData::FourBit {
            kind,
            codes,
            absmax,
        } => {
            let quant_type = match kind {
                FourBit::Nf4 => "nf4",
                FourBit::Fp4 => "fp4",
            };
            let mut state = json!({"quant_type": quant_type, "blocksize": BLOCK, "dtype": "float32", "shape": w.shape});
            let mut out = vec![
                (
                    name.into(),
                    Dtype::U8,
                    vec![n.div_ceil(2), 1],
                    codes.clone(),
                ),
                (
                    format!("{name}.quant_map"),
                    Dtype::F32,
                    vec![16],
                    f32_bytes(kind.code()),
                ),
            ];
            match absmax {
                Absmax::Plain(v) => out.push((
                    format!("{name}.absmax"),
                    Dtype::F32,
                    vec![v.len()],
                    f32_bytes(v),
                )),
                Absmax::Double {
                    codes,
                    scales,
                    offset,
                } => {
                    out.push((
                        format!("{name}.absmax"),
                        Dtype::U8,
                        vec![codes.len()],
                        codes.clone(),
                    ));
                    out.push((
                        format!("{name}.nested_absmax"),
                        Dtype::F32,
                        vec![scales.len()],
                        f32_bytes(scales),
                    ));
                    out.push((
                        format!("{name}.nested_quant_map"),
                        Dtype::F32,
                        vec![256],
                        f32_bytes(dynamic_map()),
                    ));
                    state["nested_blocksize"] = json!(ft_quant::dynamic8::BLOCK);
                    state["nested_offset"] = json!(offset);
                    state["nested_dtype"] = json!("float32");
                }
            }
            let state = state.to_string().into_bytes();
            out.push((
                format!("{name}.quant_state.bitsandbytes__{quant_type}"),
                Dtype::U8,
                vec![state.len()],
                state,
            ));
            out
        }
    })
}

/// Writes `p` to `dir` as an HF folder: dense weights in f32, packed ones in bitsandbytes'
/// layout; `spec`, the storage `p` was loaded with, goes into `config.json`.
pub fn save_pretrained<B: Backend>(
    p: &Pretrained<B>,
    spec: QuantSpec,
    dir: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let weights = dir.join("model.safetensors");
    let packed: HashMap<String, PackedWeight> = p
        .model
        .linears()
        .into_iter()
        .filter_map(|(name, l)| {
            l.base
                .packed
                .as_ref()
                .map(|w| (format!("{name}.weight"), (*w.weight).clone()))
        })
        .collect();
    let mut entries: Vec<Entry> = Vec::new();
    for (name, t) in p.model.named_tensors() {
        match packed.get(&name) {
            Some(w) => entries
                .extend(packed_entries(&name, w).map_err(|e| ModelError::format(&weights, e))?),
            None => entries.push((name, Dtype::F32, t.shape, f32_bytes(&t.data))),
        }
    }
    let views = entries
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::format(&weights, format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(
        views,
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )
    .map_err(|e| ModelError::format(&weights, e.to_string()))?;
    write_atomic(&weights, &bytes)?;

    let mut config = hf_config_json(&p.config, p.tokenizer.eos_ids.first().copied());
    let four_bit = |t: &str| {
        json!({"quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false,
               "bnb_4bit_quant_type": t, "bnb_4bit_use_double_quant": spec.double_quant,
               "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8"})
    };
    match spec.format {
        QuantFormat::Nf4 => config["quantization_config"] = four_bit("nf4"),
        QuantFormat::Fp4 => config["quantization_config"] = four_bit("fp4"),
        QuantFormat::Int8 => {
            config["quantization_config"] =
                json!({"quant_method": "bitsandbytes", "load_in_8bit": true, "load_in_4bit": false})
        }
        QuantFormat::Bf16 => config["torch_dtype"] = json!("bfloat16"),
        QuantFormat::F32
        | QuantFormat::Int8Block
        | QuantFormat::Q8_0
        | QuantFormat::Q4_0
        | QuantFormat::Q4_1 => {}
    }
    let tokenizer_config = json!({
        "chat_template": p.chat_template.as_ref().map(|t| t.source()),
        "bos_token": p.tokenizer.bos_token,
        "eos_token": p.tokenizer.eos_token,
    });
    for (name, text) in [
        ("config.json", config.to_string()),
        ("tokenizer.json", p.tokenizer.to_json()?),
        ("tokenizer_config.json", tokenizer_config.to_string()),
    ] {
        write_atomic(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;
    use crate::formats::bnb_read::is_part;
    use crate::tiny::{tiny_config, write_hf_folder};
    use crate::LlamaForCausalLM;

    type B = NdArray<f32>;

    fn logits(p: &Pretrained<B>) -> Vec<f32> {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![3i64, 100, 257, 42], [1, 4]),
            &Default::default(),
        );
        p.model.forward(ids, None).into_data().to_vec().unwrap()
    }

    #[test]
    fn saved_quantized_models_reload_packed_and_identical() {
        let dir = tempfile::tempdir().unwrap();
        let c = tiny_config();
        let m = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        let folder = dir.path().join("f32");
        write_hf_folder(&m, &c, &folder).unwrap();
        for spec in ["bf16", "int8", "nf4", "nf4+dq", "fp4+dq"] {
            let spec: QuantSpec = spec.parse().unwrap();
            let quantized =
                Pretrained::<B>::load(&folder, Some(spec), &Default::default()).unwrap();
            let out = dir.path().join(spec.to_string());
            save_pretrained(&quantized, spec, &out).unwrap();
            // Loaded as stored: packed, no quantization step, same bytes.
            let reloaded = Pretrained::<B>::load(&out, None, &Default::default()).unwrap();
            let (before, after) = (quantized.model.linears(), reloaded.model.linears());
            for ((name, a), (_, b)) in before.iter().zip(&after) {
                if spec.format == QuantFormat::Bf16 {
                    // BF16 is an ordinary dtype: it reloads dense, with the same values.
                    assert_eq!(
                        a.base.weight(&Default::default()).into_data(),
                        b.base.weight(&Default::default()).into_data()
                    );
                } else {
                    assert_eq!(
                        a.base.packed.as_ref().unwrap().weight,
                        b.base.packed.as_ref().unwrap().weight,
                        "{spec} {name}"
                    );
                }
            }
            let (a, b) = (logits(&quantized), logits(&reloaded));
            if spec.format == QuantFormat::Bf16 {
                // Same values, but packed bf16 goes through the decoding kernel and dense f32
                // through burn's matmul: the sums differ in order only.
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                        "{spec}: {x} vs {y}"
                    );
                }
            } else {
                assert_eq!(a, b, "{spec}");
            }
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            if matches!(spec.format, QuantFormat::Nf4 | QuantFormat::Fp4) {
                assert_eq!(
                    config["quantization_config"]["bnb_4bit_use_double_quant"],
                    spec.double_quant
                );
            }
        }
    }

    #[test]
    fn the_4bit_layout_is_bitsandbytes_own() {
        let w: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 128.0).collect();
        let packed = PackedWeight::quantize(QuantFormat::Nf4, true, &w, [2, 128]).unwrap();
        let entries = packed_entries("m.q_proj.weight", &packed).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "m.q_proj.weight",
                "m.q_proj.weight.quant_map",
                "m.q_proj.weight.absmax",
                "m.q_proj.weight.nested_absmax",
                "m.q_proj.weight.nested_quant_map",
                "m.q_proj.weight.quant_state.bitsandbytes__nf4"
            ]
        );
        assert_eq!(
            (entries[0].1, entries[0].2.clone()),
            (Dtype::U8, vec![128, 1])
        );
        assert_eq!((entries[2].1, entries[2].2.clone()), (Dtype::U8, vec![4]));
        let state: serde_json::Value = serde_json::from_slice(&entries[5].3).unwrap();
        assert_eq!(state["quant_type"], "nf4");
        assert_eq!(state["blocksize"], 64);
        assert_eq!(state["shape"], json!([2, 128]));
        assert_eq!(state["nested_blocksize"], 256);
        assert!(is_part("m.q_proj.weight.absmax") && !is_part("m.q_proj.weight"));
    }
}
