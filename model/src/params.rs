//! The dense weights of a model by their HF checkpoint names, for full-parameter training (a
//! distilled student): the optimizer addresses each weight by name, reads its value and
//! gradient, and writes the update back. Packed (quantized) weights are constants and are not
//! listed.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::forward::llama::LlamaForCausalLM;

/// A mutable dense weight: a matrix (embeddings, projections, head) or a vector (norms,
/// biases).
pub enum ParamMut<'a, B: Backend> {
    /// `[rows, cols]`
    Matrix(&'a mut Param<Tensor<B, 2>>),
    /// `[n]`
    Vector(&'a mut Param<Tensor<B, 1>>),
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Every dense weight with its HF name (`model.layers.0.mlp.up_proj.weight`), in
    /// checkpoint order; adapters are not included.
    pub fn params_mut(&mut self) -> Vec<(String, ParamMut<'_, B>)> {
        let mut out = Vec::new();
        out.push((
            "model.embed_tokens.weight".to_string(),
            ParamMut::Matrix(&mut self.model.embed_tokens),
        ));
        out.push((
            "model.norm.weight".to_string(),
            ParamMut::Vector(&mut self.model.norm.weight),
        ));
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head.weight".to_string(), ParamMut::Matrix(head)));
        }
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}.");
            let (linears, norms) = layer.parts_mut();
            for (name, norm) in norms {
                out.push((
                    format!("{prefix}{name}.weight"),
                    ParamMut::Vector(&mut norm.weight),
                ));
            }
            for (name, l) in linears {
                if let Some(w) = &mut l.base.weight {
                    out.push((format!("{prefix}{name}.weight"), ParamMut::Matrix(w)));
                }
                if let Some(b) = &mut l.base.bias {
                    out.push((format!("{prefix}{name}.bias"), ParamMut::Vector(b)));
                }
            }
        }
        out
    }
}

impl<B: Backend> LlamaForCausalLM<B> {
    /// Bytes of every weight as stored: packed linear weights at their packed size, the rest
    /// f32.
    pub fn weight_bytes(&self) -> usize {
        let m = &self.model;
        let mut floats =
            m.embed_tokens.shape().num_elements() + m.norm.weight.shape().num_elements();
        floats += self
            .lm_head
            .as_ref()
            .map_or(0, |h| h.shape().num_elements());
        for layer in &m.layers {
            floats += layer.input_layernorm.weight.shape().num_elements();
            floats += layer.post_attention_layernorm.weight.shape().num_elements();
        }
        let linears: usize = self
            .linears()
            .iter()
            .map(|(_, l)| {
                l.base.weight_bytes()
                    + l.base
                        .bias
                        .as_ref()
                        .map_or(0, |b| 4 * b.shape().num_elements())
            })
            .sum();
        4 * floats + linears
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;
    use crate::tiny::tiny_config;

    #[test]
    fn every_checkpoint_weight_is_listed_once() {
        let mut c = tiny_config();
        c.tie_word_embeddings = false;
        c.attention_bias = true;
        let mut m = LlamaForCausalLM::<NdArray<f32>>::init_random(&c, &Default::default());
        let mut expected: Vec<String> = m.named_tensors().into_iter().map(|(n, _)| n).collect();
        let mut listed: Vec<String> = m.params_mut().into_iter().map(|(n, _)| n).collect();
        expected.sort();
        listed.sort();
        assert_eq!(listed, expected);
        let floats: usize = m.named_tensors().iter().map(|(_, t)| t.data.len()).sum();
        assert_eq!(m.weight_bytes(), 4 * floats);
    }
}
