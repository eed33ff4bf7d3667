//! llama.cpp's GGUF LoRA adapter: the file `llama-cli --lora` and Ollama's `ADAPTER` load
//! beside their base model, as `convert_lora_to_gguf.py` writes it. Metadata: the base's
//! `general.architecture`, `general.type = adapter`, `adapter.type = lora` and
//! `adapter.lora.alpha` (llama.cpp scales by alpha / r). Tensors: for each adapted matrix
//! `blk.N.attn_q.weight`, its `.lora_a` [r, in] and `.lora_b` [out, r] (PEFT's own shapes),
//! B's rows in llama.cpp's interleaved q/k order for `llama` bases, as the base's rows are.

use std::path::Path;

use ft_adapters::PeftAdapter;
use ft_quant::ggml::quantize_f16;

use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::formats::gguf::{gguf_name, permute_rows, GgufValue};
use crate::formats::gguf_export::{architecture, GgufExportType};
use crate::formats::gguf_write::GgufWriter;
use crate::weights::HostTensor;

/// The adapter as llama.cpp's GGUF LoRA file for a base of `c`, its matrices in `ty` (F32 or
/// F16, the types llama.cpp applies adapters in). Every module is checked against the base's
/// shape first, as llama.cpp checks it on loading.
pub fn gguf_lora_bytes(
    adapter: &PeftAdapter,
    c: &LlamaConfig,
    ty: GgufExportType,
    path: &Path,
) -> Result<Vec<u8>, ModelError> {
    let fault = |what: String| ModelError::format(path, what);
    let type_id = match ty {
        GgufExportType::F32 => 0,
        GgufExportType::F16 => 1,
        GgufExportType::Q8_0 => {
            return Err(fault(
                "a GGUF LoRA adapter is written in f32 or f16".to_string(),
            ))
        }
    };
    let arch = architecture(c);
    let lora = adapter.config.lora_config();
    // llama.cpp multiplies by alpha / r: the alpha that gives PEFT's scale (rsLoRA included).
    let alpha = lora.scale() * lora.r as f64;
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String(arch.into()))
        .metadata("general.type", GgufValue::String("adapter".into()))
        .metadata("general.alignment", GgufValue::U32(32))
        .metadata("adapter.type", GgufValue::String("lora".into()))
        .metadata("adapter.lora.alpha", GgufValue::F32(alpha as f32));
    for (module, weights) in &adapter.modules {
        let (layer, projection) = module
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(l, p)| Some((l.parse::<usize>().ok()?, p)))
            .ok_or_else(|| fault(format!("{module} is not a projection of a decoder layer")))?;
        let [out, inp] = c
            .projection_shape(projection)
            .ok_or_else(|| fault(format!("{module}: llama.cpp adapts no such matrix")))?;
        if layer >= c.num_hidden_layers {
            return Err(fault(format!(
                "{module}: the base has {} layers",
                c.num_hidden_layers
            )));
        }
        let (a, b) = (&weights.a, &weights.b);
        let r = a.shape[0];
        if a.shape != [r, inp] || b.shape != [out, r] {
            return Err(fault(format!(
                "{module}: A is {:?} and B {:?}; the base's matrix is [{out}, {inp}]",
                a.shape, b.shape
            )));
        }
        let name = gguf_name(&format!("{module}.weight"))
            .ok_or_else(|| fault(format!("{module}: no GGUF name")))?;
        let b = HostTensor {
            shape: b.shape.to_vec(),
            data: b.data.clone(),
        };
        let b = match (arch, projection) {
            ("llama", "self_attn.q_proj") => permute_rows(b, c.num_attention_heads),
            ("llama", "self_attn.k_proj") => permute_rows(b, c.num_key_value_heads),
            _ => b,
        };
        for (suffix, shape, data) in [
            ("lora_a", a.shape.to_vec(), &a.data),
            ("lora_b", b.shape.clone(), &b.data),
        ] {
            let bytes = match type_id {
                0 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => quantize_f16(data),
            };
            w.tensor(&format!("{name}.{suffix}"), shape, type_id, bytes);
        }
    }
    Ok(w.to_bytes())
}

/// Writes [`gguf_lora_bytes`] to `path` atomically.
pub fn write_gguf_lora(
    adapter: &PeftAdapter,
    c: &LlamaConfig,
    ty: GgufExportType,
    path: &Path,
) -> Result<(), ModelError> {
    let bytes = gguf_lora_bytes(adapter, c, ty, path)?;
    crate::formats::gguf_write::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::{unpermute_rows, GgufFile};
    use crate::tiny::{tiny_adapter, tiny_config};

    #[test]
    fn the_file_holds_peft_s_matrices_under_llama_cpp_s_names_and_row_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gguf");
        let adapter = tiny_adapter(3);
        let c = tiny_config();
        write_gguf_lora(&adapter, &c, GgufExportType::F32, &path).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_str("general.type").unwrap(), "adapter");
        assert_eq!(f.get_str("adapter.type").unwrap(), "lora");
        assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get_f64("adapter.lora.alpha").unwrap(), 4.0);
        assert_eq!(f.tensors.len(), 2 * adapter.modules.len());
        for (module, w) in &adapter.modules {
            let name = gguf_name(&format!("{module}.weight")).unwrap();
            let a = f.tensor_f32(&format!("{name}.lora_a")).unwrap();
            assert_eq!((a.shape.as_slice(), &a.data), (&w.a.shape[..], &w.a.data));
            let b = f.tensor_f32(&format!("{name}.lora_b")).unwrap();
            let b = if module.ends_with("q_proj") {
                assert_ne!(b.data, w.b.data, "q rows are permuted");
                unpermute_rows(b, c.num_attention_heads)
            } else {
                b
            };
            assert_eq!((b.shape.as_slice(), &b.data), (&w.b.shape[..], &w.b.data));
        }
    }

    #[test]
    fn an_adapter_for_another_shape_is_refused_naming_the_module() {
        let adapter = tiny_adapter(3);
        let path = Path::new("x.gguf");
        let wider = LlamaConfig {
            intermediate_size: 64,
            ..tiny_config()
        };
        let e = gguf_lora_bytes(&adapter, &wider, GgufExportType::F16, path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.0.mlp.down_proj") && e.contains("[32, 64]"),
            "{e}"
        );
        let shallower = LlamaConfig {
            num_hidden_layers: 1,
            ..tiny_config()
        };
        let e = gguf_lora_bytes(&adapter, &shallower, GgufExportType::F32, path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.layers.1.") && e.contains("the base has 1 layers"),
            "{e}"
        );
    }
}
