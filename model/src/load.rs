//! Builds a [`LlamaForCausalLM`] from a checkpoint by walking its HF tensor names, checking
//! every shape, and reporting missing and unused tensors; the block linear weights are packed
//! into a quantized format on the way in when asked. Also random initialization for tests and
//! the reverse walk that names every tensor for export.

use std::collections::BTreeSet;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use ft_quant::packed::PackedData;
use ft_quant::{GgmlType, PackedWeight, QuantFormat, QuantSpec};

use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::forward::llama::{
    Attention, DecoderLayer, Linear, LlamaForCausalLM, LlamaModel, LoraLinear, Mlp, RmsNorm,
    RotaryEmbedding,
};
use crate::weights::{HostTensor, TensorSource};

/// Where the weights of a model under construction come from.
trait Weights<B: Backend> {
    /// A tensor of the given shape.
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, ModelError>;
    /// Whether the checkpoint holds `name`.
    fn has(&self, name: &str) -> bool;
    /// The weight of a block linear layer: stored as the checkpoint has it when `quant` is
    /// `None`, else in that format.
    fn linear_weight(
        &mut self,
        name: &str,
        shape: [usize; 2],
        quant: Option<QuantSpec>,
    ) -> Result<Linear<B>, ModelError>;
    /// The output head `head` (named `name` in the checkpoint) in ggml blocks for the
    /// decoding kernels.
    fn head_blocks(
        &mut self,
        name: &str,
        head: Tensor<B, 2>,
    ) -> Result<Option<PackedWeight>, ModelError> {
        let _ = name;
        Ok(q8_head(head))
    }
}

/// The head as Q8_0 blocks made from its f32 values, which keeps the logits within the
/// activations' own 8-bit rounding.
fn q8_head<B: Backend>(head: Tensor<B, 2>) -> Option<PackedWeight> {
    packed_head(head, QuantFormat::Q8_0)
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Packs the output head in `format` for the decoding kernels (`--weights bf16`), unless
    /// it is packed already.
    pub fn pack_head(&mut self, format: QuantFormat) {
        if self.head_blocks.is_none() {
            let head = self
                .lm_head
                .as_ref()
                .unwrap_or(&self.model.embed_tokens)
                .val();
            self.head_blocks = packed_head(head, format).map(ft_quant::linear::Packed::new);
        }
    }
}

/// The head packed in `format` for the decoding kernels.
fn packed_head<B: Backend>(head: Tensor<B, 2>, format: QuantFormat) -> Option<PackedWeight> {
    let shape = head.dims();
    let data = head.into_data().convert::<f32>().into_vec::<f32>().ok()?;
    PackedWeight::quantize(format, false, &data, shape)
}

/// A linear layer from a dense host weight, packed if `quant` asks for a packed format.
fn linear_from_host<B: Backend>(
    data: Vec<f32>,
    shape: [usize; 2],
    quant: Option<QuantSpec>,
    device: &B::Device,
) -> Linear<B> {
    match quant.and_then(|q| q.pack(&data, shape)) {
        Some(packed) => Linear::packed(packed, None),
        None => Linear::dense(
            Tensor::from_data(
                TensorData::new(data, shape).convert::<B::FloatElem>(),
                device,
            ),
            None,
        ),
    }
}

/// Reads tensors from a checkpoint, tracking which ones were used.
struct CheckpointWeights<'a, B: Backend> {
    source: &'a dyn TensorSource,
    names: BTreeSet<String>,
    used: BTreeSet<String>,
    device: B::Device,
}

impl<B: Backend> CheckpointWeights<'_, B> {
    fn host(&mut self, name: &str, shape: &[usize]) -> Result<HostTensor, ModelError> {
        let t = self.source.load(name)?;
        if t.shape != shape {
            return Err(self.shape_error(name, shape, t.shape));
        }
        self.used.insert(name.to_string());
        Ok(t)
    }

    /// The file's own ggml blocks of `name` when `quant` asks for a ggml format they can
    /// serve: the same format, or either 4-bit format for a 4-bit request (a GGUF's Q4_1
    /// is kept rather than requantized to Q4_0).
    fn kept_blocks(
        &self,
        name: &str,
        quant: Option<QuantSpec>,
    ) -> Result<Option<PackedWeight>, ModelError> {
        let Some(want) = quant.and_then(|q| q.format.ggml()) else {
            return Ok(None);
        };
        let four_bit = |t: GgmlType| matches!(t, GgmlType::Q4_0 | GgmlType::Q4_1);
        Ok(self.source.blocks(name)?.filter(|stored| {
            let PackedData::Blocks { ty, .. } = stored.data else {
                return false;
            };
            ty == want || (four_bit(ty) && four_bit(want))
        }))
    }

    fn shape_error(&self, name: &str, expected: &[usize], found: Vec<usize>) -> ModelError {
        ModelError::Shape {
            path: self.source.location().to_path_buf(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            found,
        }
    }
}

impl<B: Backend> Weights<B> for CheckpointWeights<'_, B> {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, ModelError> {
        let t = self.host(name, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(t.data, shape).convert::<B::FloatElem>(),
            &self.device,
        ))
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn linear_weight(
        &mut self,
        name: &str,
        shape: [usize; 2],
        quant: Option<QuantSpec>,
    ) -> Result<Linear<B>, ModelError> {
        if let Some(stored) = self.kept_blocks(name, quant)? {
            if stored.shape != shape {
                return Err(self.shape_error(name, &shape, stored.shape.to_vec()));
            }
            self.used.insert(name.to_string());
            return Ok(Linear::packed(stored, None));
        }
        let Some(packed) = self.source.packed(name)? else {
            let t = self.host(name, &shape)?;
            return Ok(linear_from_host(t.data, shape, quant, &self.device));
        };
        if packed.shape != shape {
            return Err(self.shape_error(name, &shape, packed.shape.to_vec()));
        }
        self.used.insert(name.to_string());
        Ok(match quant {
            // Stored packed, used as stored: no quantization step at all.
            None => Linear::packed(packed, None),
            Some(spec) => linear_from_host(packed.dequantize(), shape, Some(spec), &self.device),
        })
    }

    fn head_blocks(
        &mut self,
        name: &str,
        head: Tensor<B, 2>,
    ) -> Result<Option<PackedWeight>, ModelError> {
        let shape = head.dims();
        match self.source.blocks(name)? {
            Some(stored) if stored.shape == shape => Ok(Some(stored)),
            _ => Ok(q8_head(head)),
        }
    }
}

/// Draws every weight from N(0, 0.02) (norms start at one), as HF's `_init_weights` does.
struct RandomWeights<B: Backend> {
    device: B::Device,
    bias: bool,
}

impl<B: Backend> Weights<B> for RandomWeights<B> {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, ModelError> {
        Ok(if name.ends_with("norm.weight") {
            Tensor::ones(shape, &self.device)
        } else {
            Tensor::random(shape, Distribution::Normal(0.0, 0.02), &self.device)
        })
    }

    fn has(&self, name: &str) -> bool {
        self.bias && name.ends_with(".bias")
    }

    fn linear_weight(
        &mut self,
        name: &str,
        shape: [usize; 2],
        quant: Option<QuantSpec>,
    ) -> Result<Linear<B>, ModelError> {
        let dense = self.tensor(name, shape)?;
        let data = dense
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap_or_default();
        Ok(linear_from_host(data, shape, quant, &self.device))
    }
}

fn param<B: Backend, const D: usize>(
    w: &mut impl Weights<B>,
    name: &str,
    shape: [usize; D],
) -> Result<Param<Tensor<B, D>>, ModelError> {
    Ok(Param::from_tensor(w.tensor(name, shape)?))
}

fn linear<B: Backend>(
    w: &mut impl Weights<B>,
    prefix: &str,
    [n_out, n_in]: [usize; 2],
    bias: bool,
    quant: Option<QuantSpec>,
) -> Result<LoraLinear<B>, ModelError> {
    let bias_name = format!("{prefix}.bias");
    let bias = if bias && w.has(&bias_name) {
        Some(param(w, &bias_name, [n_out])?)
    } else {
        None
    };
    let mut layer = w.linear_weight(&format!("{prefix}.weight"), [n_out, n_in], quant)?;
    layer.bias = bias;
    Ok(LoraLinear::new(layer))
}

fn rms_norm<B: Backend>(
    w: &mut impl Weights<B>,
    name: &str,
    c: &LlamaConfig,
) -> Result<RmsNorm<B>, ModelError> {
    Ok(RmsNorm {
        weight: param(w, &format!("{name}.weight"), [c.hidden_size])?,
        eps: c.rms_norm_eps,
    })
}

/// Builds the model. Embeddings, norms and the output head stay in f32, as bitsandbytes keeps
/// them; `quant` applies to the seven linear layers of each block.
fn build<B: Backend>(
    c: &LlamaConfig,
    w: &mut impl Weights<B>,
    quant: Option<QuantSpec>,
    device: &B::Device,
) -> Result<LlamaForCausalLM<B>, ModelError> {
    let (e, f, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (h, kv) = (c.num_attention_heads, c.num_key_value_heads);
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let bias = c.attention_bias;
        let mut lin =
            |name: &str, shape, bias| linear(w, &format!("{p}.{name}"), shape, bias, quant);
        let self_attn = Attention {
            q_proj: lin("self_attn.q_proj", [h * d, e], bias)?,
            k_proj: lin("self_attn.k_proj", [kv * d, e], bias)?,
            v_proj: lin("self_attn.v_proj", [kv * d, e], bias)?,
            o_proj: lin("self_attn.o_proj", [e, h * d], false)?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
        };
        let mlp = Mlp {
            gate_proj: lin("mlp.gate_proj", [f, e], false)?,
            up_proj: lin("mlp.up_proj", [f, e], false)?,
            down_proj: lin("mlp.down_proj", [e, f], false)?,
        };
        layers.push(DecoderLayer {
            self_attn,
            mlp,
            input_layernorm: rms_norm(w, &format!("{p}.input_layernorm"), c)?,
            post_attention_layernorm: rms_norm(w, &format!("{p}.post_attention_layernorm"), c)?,
        });
    }
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(param(w, "lm_head.weight", [c.vocab_size, e])?)
    };
    let embed_tokens = param(w, "model.embed_tokens.weight", [c.vocab_size, e])?;
    let head_name = if c.tie_word_embeddings {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    // The ggml formats are for inference only: their head is packed with them.
    let head_blocks = match quant.and_then(|q| q.format.ggml()) {
        Some(_) => {
            let head = lm_head.as_ref().unwrap_or(&embed_tokens).val();
            w.head_blocks(head_name, head)?
        }
        None => None,
    }
    .map(ft_quant::linear::Packed::new);
    Ok(LlamaForCausalLM {
        model: LlamaModel {
            embed_tokens,
            layers,
            norm: rms_norm(w, "model.norm", c)?,
            rotary_emb: RotaryEmbedding::new(c, device),
        },
        lm_head,
        head_blocks,
        max_position_embeddings: c.max_position_embeddings,
    })
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Loads every weight from `source`; a missing, misshapen or unused tensor is an error.
    /// `quant`: the storage of the block linear weights (`None`: as the checkpoint stores them).
    pub fn load(
        config: &LlamaConfig,
        source: &dyn TensorSource,
        quant: Option<QuantSpec>,
        device: &B::Device,
    ) -> Result<Self, ModelError> {
        let mut w = CheckpointWeights::<B> {
            source,
            names: source.names().into_iter().collect(),
            used: BTreeSet::new(),
            device: device.clone(),
        };
        let model = build(config, &mut w, quant, device)?;
        let unused: Vec<String> = w
            .names
            .difference(&w.used)
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            // Tied checkpoints sometimes store the head too; HF ignores it, and so do we.
            .filter(|n| !(config.tie_word_embeddings && *n == "lm_head.weight"))
            .cloned()
            .collect();
        if !unused.is_empty() {
            return Err(ModelError::UnusedTensors {
                path: source.location().to_path_buf(),
                names: unused,
            });
        }
        Ok(model)
    }

    /// A random model drawn from `seed`, the same one for the same seed. burn's generator is
    /// global: draws from a seed take turns here, so that none draws from another's seed
    /// (tests run on parallel threads).
    pub fn init_seeded(config: &LlamaConfig, seed: u64, device: &B::Device) -> Self {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        B::seed(device, seed);
        Self::init_random(config, device)
    }

    /// A randomly initialized model from burn's generator as it stands (for tests and
    /// students trained from scratch).
    pub fn init_random(config: &LlamaConfig, device: &B::Device) -> Self {
        let mut w = RandomWeights::<B> {
            device: device.clone(),
            bias: config.attention_bias,
        };
        build(config, &mut w, None, device).expect("random initialization cannot fail")
    }

    /// The block linear layers with their HF names (`model.layers.0.self_attn.q_proj`).
    pub fn linears(&self) -> Vec<(String, &LoraLinear<B>)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for (n, l) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.{n}"), l));
            }
        }
        out
    }

    /// Every weight with its HF checkpoint name, copied to host memory in f32 (packed
    /// weights dequantized).
    pub fn named_tensors(&self) -> Vec<(String, HostTensor)> {
        fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
            let shape = t.dims().to_vec();
            let data = t
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap_or_default();
            HostTensor::new(shape, data)
        }
        let device = self.device();
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            host(self.model.embed_tokens.val()),
        )];
        let linears = self.linears();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let prefix = format!("model.layers.{i}.");
            for (name, l) in linears.iter().filter(|(n, _)| n.starts_with(&prefix)) {
                out.push((format!("{name}.weight"), host(l.base.weight(&device))));
                if let Some(b) = &l.base.bias {
                    out.push((format!("{name}.bias"), host(b.val())));
                }
            }
            for (name, norm) in [
                ("input_layernorm", &layer.input_layernorm),
                ("post_attention_layernorm", &layer.post_attention_layernorm),
            ] {
                out.push((format!("{prefix}{name}.weight"), host(norm.weight.val())));
            }
        }
        out.push((
            "model.norm.weight".to_string(),
            host(self.model.norm.weight.val()),
        ));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), host(head.val())));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor, TensorData, Tolerance};

    use crate::pretrained::Pretrained;
    use crate::tiny::{tiny_config, write_gguf, write_hf_folder};

    use super::*;

    type B = NdArray<f32>;

    fn logits(m: &LlamaForCausalLM<B>) -> TensorData {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![3i64, 100, 257, 42, 7], [1, 5]),
            &Default::default(),
        );
        m.forward(ids, None).into_data()
    }

    #[test]
    fn hf_folder_and_gguf_round_trips_give_the_same_logits() {
        let dir = tempfile::tempdir().unwrap();
        for (tied, bias) in [(true, false), (false, true)] {
            let mut c = tiny_config();
            c.tie_word_embeddings = tied;
            c.attention_bias = bias;
            let m = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
            let folder = dir.path().join(format!("hf-{tied}-{bias}"));
            write_hf_folder(&m, &c, &folder).unwrap();
            let from_hf = Pretrained::<B>::load(&folder, None, &Default::default()).unwrap();
            assert_eq!(from_hf.config, c);
            logits(&from_hf.model).assert_approx_eq::<f32>(&logits(&m), Tolerance::absolute(1e-6));
            if !bias {
                // GGUF stores q/k permuted as llama.cpp does; loading must undo it exactly.
                let file = dir.path().join("tiny.gguf");
                write_gguf(&m, &c, &file).unwrap();
                let from_gguf = Pretrained::<B>::load(&file, None, &Default::default()).unwrap();
                assert_eq!(from_gguf.config, c);
                logits(&from_gguf.model)
                    .assert_approx_eq::<f32>(&logits(&m), Tolerance::absolute(1e-6));
                assert_eq!(
                    from_gguf.tokenizer.encode("hi<|im_end|>").unwrap(),
                    vec![104, 105, 258]
                );
            }
        }
    }

    #[test]
    fn missing_unused_and_misshapen_tensors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = tiny_config();
        let m = LlamaForCausalLM::<B>::init_random(&c, &Default::default());
        let path = dir.path().join("model.safetensors");
        let mut tensors = m.named_tensors();
        let source = |tensors: &[(String, HostTensor)]| {
            crate::formats::hf_export::write_safetensors(&path, tensors).unwrap();
            crate::formats::safetensors_dir::SafetensorsDir::open(dir.path()).unwrap()
        };
        let removed = tensors.remove(3);
        let err = LlamaForCausalLM::<B>::load(&c, &source(&tensors), None, &Default::default())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("tensor {} is missing", removed.0)),
            "{err}"
        );

        tensors.insert(3, removed);
        tensors.push((
            "model.extra.weight".into(),
            HostTensor::new(vec![1], vec![0.0]),
        ));
        let err = LlamaForCausalLM::<B>::load(&c, &source(&tensors), None, &Default::default())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("unused tensors [\"model.extra.weight\"]"),
            "{err}"
        );

        tensors.pop();
        tensors[0].1 = HostTensor::new(vec![2, 2], vec![0.0; 4]);
        let err = LlamaForCausalLM::<B>::load(&c, &source(&tensors), None, &Default::default())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("model.embed_tokens.weight has shape [2, 2], expected [259, 32]"),
            "{err}"
        );
    }
}
