//! The language-model loss of a batch through the padded burn forward: next-token logits only
//! at the positions that carry a label (the LM head never sees the others), their NLL, and the
//! validation loss. Both objectives of the step loop are built from these.

use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use ft_model::forward::llama::Attend;
use ft_model::{LlamaForCausalLM, QuantBackend};

use crate::data::Batch;

/// Next-token logits `[n, vocab]` at the batch's n trained positions, in target order: only
/// those positions reach the LM head.
pub fn target_logits<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 2> {
    let ids: Vec<i64> = batch.ids.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch.b, batch.s]), device);
    let attend = Attend::segmented(
        &model.model.rotary_emb,
        &batch.segments,
        &batch.positions,
        device,
    );
    let hidden = model.forward_attend(ids, &attend); // [b, s, e]
    let e = hidden.dims()[2];
    let n = batch.targets.len();
    let rows: Vec<i64> = batch.targets.iter().map(|&(i, _)| i as i64).collect();
    let hidden = hidden
        .reshape([batch.b * batch.s, e])
        .select(0, Tensor::from_data(TensorData::new(rows, [n]), device)); // [n, e]
    let logits = model.logits(hidden.unsqueeze::<3>()); // [1, n, vocab]
    let vocab = logits.dims()[2];
    logits.reshape([n, vocab])
}

/// The batch's target ids `[n]`, in target order.
pub fn target_ids<B: Backend>(batch: &Batch, device: &B::Device) -> Tensor<B, 1, Int> {
    let targets: Vec<i64> = batch.targets.iter().map(|&(_, t)| t as i64).collect();
    Tensor::from_data(TensorData::new(targets, [batch.targets.len()]), device)
}

/// Columns of the logits summed together before their partial sums are added: a running f32
/// sum over a whole vocabulary (49152 on SmolLM2) drops the many terms smaller than half its
/// last place and comes out about 1e-5 low; sums of a block at a time stay exact to f32.
const SUM_BLOCK: usize = 1024;

/// Summed NLL of `labels` `[n]` under `logits` `[n, vocab]` (a scalar tensor): per row,
/// log-sum-exp of the logits less the label's logit.
pub fn nll<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let [n, vocab] = logits.dims();
    let max = logits.clone().detach().max_dim(1); // [n, 1]
    let chosen = logits.clone().gather(1, labels.reshape([n, 1]));
    let exp = (logits - max.clone()).exp();
    let blocks = vocab.div_ceil(SUM_BLOCK);
    let exp = match blocks * SUM_BLOCK - vocab {
        0 => exp,
        pad => Tensor::cat(vec![exp, Tensor::zeros([n, pad], &max.device())], 1),
    };
    let sum = exp
        .reshape([n, blocks, SUM_BLOCK])
        .sum_dim(2)
        .sum_dim(1)
        .reshape([n, 1]);
    (sum.log() + max - chosen).sum()
}

/// Summed next-token NLL over the batch's trained tokens (a scalar tensor).
pub fn batch_nll<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1> {
    nll(
        target_logits(model, batch, device),
        target_ids(batch, device),
    )
}

/// Mean NLL per trained token over `batches` (0 when there are none).
pub fn val_loss<B: QuantBackend>(
    model: &LlamaForCausalLM<B>,
    batches: &[Batch],
    device: &B::Device,
) -> f64 {
    let (mut nll, mut tokens) = (0.0, 0);
    for b in batches.iter().filter(|b| b.loss_tokens() > 0) {
        nll += batch_nll(model, b, device).into_scalar().elem::<f64>();
        tokens += b.loss_tokens();
    }
    if tokens == 0 {
        0.0
    } else {
        nll / tokens as f64
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::module::{Module, Param};
    use burn::tensor::backend::AutodiffBackend;
    use ft_adapters::LoraConfig;
    use ft_model::tiny::{tiny_config, write_hf_folder};
    use ft_model::{Linear, Pretrained, QuantFormat, QuantSpec};

    use super::*;
    use crate::data::Tokenized;

    fn tokens(ids: &[u32]) -> Tokenized {
        Tokenized::all_trained(ids.to_vec())
    }

    /// A tiny model with rank-4 adapters on every target, B nonzero so that every LoRA
    /// parameter has a gradient. The same model every time: the base is drawn under
    /// `tiny_model`'s turn on burn's global seed, the adapters are a fixed function of their
    /// position (a draw here could interleave with another test's seed on a parallel thread).
    fn adapted<B: AutodiffBackend + QuantBackend>(device: &B::Device) -> LlamaForCausalLM<B> {
        let model = ft_model::tiny::tiny_model::<B>(&tiny_config(), 5).no_grad();
        with_adapters(model, device)
    }

    /// `model` with rank-4 adapters on every target, A and B fixed pseudo-random values
    /// (A about PEFT's kaiming range, B about 0.1).
    fn with_adapters<B: AutodiffBackend + QuantBackend>(
        mut model: LlamaForCausalLM<B>,
        device: &B::Device,
    ) -> LlamaForCausalLM<B> {
        let targets = ft_model::adapter::TARGETS.map(String::from);
        model
            .add_lora(&LoraConfig::new(4, 8.0), &targets, None)
            .unwrap();
        let fixed = |dims: [usize; 2], salt: usize, scale: f64| {
            let v: Vec<f64> = (0..dims[0] * dims[1])
                .map(|i| ((i * 7919 + salt * 104_729) % 201) as f64 / 100.0 - 1.0)
                .map(|x| x * scale)
                .collect();
            Param::from_tensor(Tensor::from_data(TensorData::new(v, dims), device))
        };
        for (k, (_, lora)) in model.loras_mut().into_iter().enumerate() {
            lora.lora_a = fixed(lora.lora_a.dims(), 2 * k, 0.17);
            lora.lora_b = fixed(lora.lora_b.dims(), 2 * k + 1, 0.17);
        }
        model
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        let _turn = crate::f64_tensors();
        type A = Autodiff<NdArray<f64>>;
        let device = Default::default();
        let model = adapted::<A>(&device);
        let batch = Batch::new(
            &[
                vec![&tokens(&[5, 70, 200, 9, 33, 100])],
                vec![&tokens(&[8, 1, 2])],
            ],
            0,
        );
        let loss = batch_nll(&model, &batch, &device);
        let grads = loss.backward();
        // L(p + t u) for one LoRA matrix p moved along direction u.
        let loss_along = |name: &str, half: usize, u: &[f64], t: f64| {
            let mut m = model.clone();
            for (n, lora) in m.loras_mut() {
                if n == name {
                    let p = if half == 0 {
                        &mut lora.lora_a
                    } else {
                        &mut lora.lora_b
                    };
                    let v: Vec<f64> = p.val().into_data().convert::<f64>().to_vec().unwrap();
                    let v: Vec<f64> = v.iter().zip(u).map(|(x, d)| x + t * d).collect();
                    *p = Param::from_tensor(Tensor::from_data(
                        TensorData::new(v, p.dims()),
                        &device,
                    ));
                }
            }
            batch_nll(&m, &batch, &device).into_scalar().elem::<f64>()
        };
        // Directional derivatives, along the gradient and along a fixed pseudo-random unit
        // direction, by central differences: burn's CPU kernels compute some activations (exp)
        // in f32 even on an f64 backend, so single-element differences drown in that rounding;
        // a whole-matrix direction keeps the signal far above it.
        let mut checked = 0;
        for (name, l) in model.linears() {
            let lora = l.lora.as_ref().unwrap();
            for (half, p) in [&lora.lora_a, &lora.lora_b].into_iter().enumerate() {
                let g: Vec<f64> = p
                    .val()
                    .grad(&grads)
                    .unwrap()
                    .into_data()
                    .convert::<f64>()
                    .to_vec()
                    .unwrap();
                let unit = |v: Vec<f64>| {
                    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                    v.into_iter().map(|x| x / n).collect::<Vec<f64>>()
                };
                let random: Vec<f64> = (0..g.len())
                    .map(|i| ((i * 7919 + 13) % 101) as f64 - 50.0)
                    .collect();
                for u in [unit(g.clone()), unit(random)] {
                    let central = |h: f64| {
                        (loss_along(&name, half, &u, h) - loss_along(&name, half, &u, -h))
                            / (2.0 * h)
                    };
                    // Richardson extrapolation cancels the O(h^2) error of the quotient.
                    let fd = (4.0 * central(0.025) - central(0.05)) / 3.0;
                    let an: f64 = g.iter().zip(&u).map(|(a, b)| a * b).sum();
                    assert!(
                        (fd - an).abs() <= 3e-4 + 1e-2 * an.abs(),
                        "{name} {half}: fd {fd} vs {an}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 7 * 2 * 2);
    }

    #[test]
    fn a_packed_base_gives_the_lora_gradients_of_its_dense_copy() {
        let _turn = crate::f64_tensors();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let dir = tempfile::tempdir().unwrap();
        let base = LlamaForCausalLM::<NdArray<f32>>::init_random(&tiny_config(), &device);
        write_hf_folder(&base, &tiny_config(), dir.path()).unwrap();
        let spec = QuantSpec {
            format: QuantFormat::Nf4,
            double_quant: true,
        };
        let packed = Pretrained::<A>::load(dir.path(), Some(spec), &device)
            .unwrap()
            .model
            .no_grad();
        // The same adapters on both: the backend RNG is shared with tests running alongside,
        // so the copy is made after the draw rather than by drawing again.
        let packed = with_adapters(packed, &device);
        let mut dense = packed.clone();
        for layer in dense.model.layers.iter_mut() {
            for (_, l) in layer.parts_mut().0 {
                assert_eq!(l.base.format(), QuantFormat::Nf4);
                l.base = Linear::dense(l.base.weight(&device), None).no_grad();
            }
        }
        let batch = Batch::new(&[vec![&tokens(&[5, 70, 200, 9, 33, 100, 4])]], 0);
        let grads_of = |model: LlamaForCausalLM<A>| {
            let g = batch_nll(&model, &batch, &device).backward();
            model
                .linears()
                .iter()
                .flat_map(|(_, l)| {
                    let lora = l.lora.as_ref().unwrap();
                    [
                        lora.lora_a.val().grad(&g).unwrap(),
                        lora.lora_b.val().grad(&g).unwrap(),
                    ]
                })
                .map(|t| t.into_data().convert::<f32>().to_vec::<f32>().unwrap())
                .collect::<Vec<_>>()
        };
        let (from_packed, from_dense) = (grads_of(packed), grads_of(dense));
        for (p, d) in from_packed.iter().zip(&from_dense) {
            for (x, y) in p.iter().zip(d) {
                assert!((x - y).abs() <= 1e-5 + 1e-4 * y.abs(), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn padding_to_a_bucket_changes_neither_the_loss_nor_the_gradients() {
        let _turn = crate::f64_tensors();
        type A = Autodiff<NdArray<f32>>;
        let device = Default::default();
        let model = adapted::<A>(&device);
        let (a, b) = (tokens(&[5, 70, 200, 9, 33, 100]), tokens(&[8, 1, 2]));
        let rows = [vec![&a], vec![&b]];
        // 96 is past the tiny model's context (64): padding positions must stay inside it.
        let tight = Batch::new(&rows, 0);
        let wide = Batch::with_buckets(&rows, 0, &[4, 96]);
        assert_eq!((tight.s, wide.s), (6, 96));
        let run = |batch: &Batch| {
            let loss = batch_nll(&model, batch, &device);
            let g = loss.backward();
            let grads: Vec<f64> = model
                .linears()
                .iter()
                .flat_map(|(_, l)| {
                    let lora = l.lora.as_ref().unwrap();
                    [
                        lora.lora_a.val().grad(&g).unwrap(),
                        lora.lora_b.val().grad(&g).unwrap(),
                    ]
                })
                .flat_map(|t| t.into_data().convert::<f64>().to_vec::<f64>().unwrap())
                .collect();
            (loss.into_scalar().elem::<f64>(), grads)
        };
        let ((l0, g0), (l1, g1)) = (run(&tight), run(&wide));
        assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "{l0} vs {l1}");
        // The longer rows change only the order the kernels sum in: f32 rounding of 1.4e-5 of
        // the gradient's norm here, 1e-12 on an f64 backend; a gradient that saw the padding
        // would differ by its own size.
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff: Vec<f64> = g0.iter().zip(&g1).map(|(x, y)| x - y).collect();
        assert_eq!(g0.len(), g1.len());
        assert!(
            norm(&diff) <= 1e-4 * norm(&g0),
            "{} vs {}",
            norm(&diff),
            norm(&g0)
        );
    }
}
