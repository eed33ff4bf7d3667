//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
//! arXiv:2106.09685) as PEFT implements it (`peft/tuners/lora/layer.py`):
//!
//! y = base(x) + scale * dropout(x) A^T B^T, with A [r, in] drawn kaiming-uniform (a = sqrt(5),
//! i.e. U(-1/sqrt(in), 1/sqrt(in))), B [out, r] zeros, so training starts from the base model;
//! scale = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732).
//! Tensors keep PEFT's layout, so export is a copy.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use ft_quant::{Linear, QuantBackend};

/// The projections of a Llama block that LoRA adapts, as PEFT's `target_modules` spells them,
/// in the order every per-layer table of adapters follows.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Hyperparameters of one adapter.
#[derive(Config, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scaling numerator.
    pub alpha: f64,
    /// Dropout on the adapter's input.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Scale by alpha / sqrt(r) instead of alpha / r.
    #[config(default = false)]
    pub rslora: bool,
}

impl LoraConfig {
    /// The factor applied to the adapter's output.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// A fresh adapter for a layer of shape [out, in], initialized as PEFT does.
    pub fn init<B: Backend>(&self, [n_out, n_in]: [usize; 2], device: &B::Device) -> Lora<B> {
        let bound = 1.0 / (n_in as f64).sqrt();
        let a = Tensor::random([self.r, n_in], Distribution::Uniform(-bound, bound), device);
        self.with_weights(a, Tensor::zeros([n_out, self.r], device))
    }

    /// An adapter with given A [r, in] and B [out, r] (loaded from a file).
    pub fn with_weights<B: Backend>(&self, a: Tensor<B, 2>, b: Tensor<B, 2>) -> Lora<B> {
        Lora {
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            dropout: DropoutConfig::new(self.dropout).init(),
            scale: self.scale(),
        }
    }
}

/// The trainable low-rank update of one linear layer.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// A [r, in] (PEFT `lora_A.weight`).
    pub lora_a: Param<Tensor<B, 2>>,
    /// B [out, r] (PEFT `lora_B.weight`).
    pub lora_b: Param<Tensor<B, 2>>,
    /// Dropout on the adapter's input (active only when training).
    pub dropout: Dropout,
    /// alpha / r, or alpha / sqrt(r).
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// The update scale * dropout(x) A^T B^T.
    ///
    /// # Shapes
    /// - x: `[b, s, in]` -> `[b, s, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, n_in] = x.dims();
        let x = self.dropout.forward(x).reshape([b * s, n_in]);
        let h = x.matmul(self.lora_a.val().transpose()); // [b*s, r]
        let y = h.matmul(self.lora_b.val().transpose()); // [b*s, out]
        let n_out = y.dims()[1];
        (y * self.scale).reshape([b, s, n_out])
    }

    /// The dense update scale * B A [out, in], for merging into the base weight.
    pub fn delta(&self) -> Tensor<B, 2> {
        self.lora_b.val().matmul(self.lora_a.val()) * self.scale
    }
}

/// A base linear layer with an optional adapter: the layer type of every block projection.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// The base weight (dense or packed), frozen when an adapter trains.
    pub base: Linear<B>,
    /// The adapter, if one is attached.
    pub lora: Option<Lora<B>>,
}

impl<B: Backend> LoraLinear<B> {
    /// A layer without adapter.
    pub fn new(base: Linear<B>) -> Self {
        Self { base, lora: None }
    }

    /// Attaches `lora` and freezes the base: it gets no gradient and no optimizer state.
    pub fn attach(mut self, lora: Lora<B>) -> Self {
        self.attach_in_place(lora);
        self
    }

    /// [`Self::attach`] on a layer inside a model.
    pub fn attach_in_place(&mut self, lora: Lora<B>) {
        self.base = self.base.clone().no_grad();
        self.lora = Some(lora);
    }

    /// Folds the adapter into the base weight (W + scale * B A, dequantizing a packed base) and
    /// drops it; the layer then computes the same function without an adapter.
    pub fn merge(&mut self) {
        if let Some(lora) = self.lora.take() {
            let device = lora.lora_a.val().device();
            let merged = self.base.weight(&device) + lora.delta();
            let bias = self.base.bias.take().map(|b| b.val());
            self.base = Linear::dense(merged, bias);
        }
    }
}

impl<B: QuantBackend> LoraLinear<B> {
    /// # Shapes
    /// - x: `[b, s, in]` -> `[b, s, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lora {
            Some(lora) => self.base.forward(x.clone()) + lora.forward(x),
            None => self.base.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{TensorData, Tolerance};

    use super::*;

    type B = NdArray<f64>;
    type A = Autodiff<B>;

    #[test]
    fn peft_init_starts_at_the_base_model() {
        let device = Default::default();
        let lora = LoraConfig::new(8, 16.0).init::<B>([24, 100], &device);
        let a: Vec<f64> = lora.lora_a.val().into_data().to_vec().unwrap();
        assert!(a.iter().all(|v| v.abs() <= 0.1), "A within 1/sqrt(100)");
        let var = a.iter().map(|v| v * v).sum::<f64>() / a.len() as f64;
        assert!(
            (var - 0.01 / 3.0).abs() < 0.001,
            "uniform variance bound^2/3, got {var}"
        );
        assert!(lora
            .lora_b
            .val()
            .into_data()
            .to_vec::<f64>()
            .unwrap()
            .iter()
            .all(|v| *v == 0.0));
        let base = Linear::dense(
            Tensor::random([24, 100], Distribution::Default, &device),
            None,
        );
        let layer = LoraLinear::new(base).attach(lora);
        let x = Tensor::<B, 3>::random([2, 3, 100], Distribution::Default, &device);
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f64>(
                &layer.base.forward(x).into_data(),
                Tolerance::absolute(1e-12),
            );
    }

    #[test]
    fn scale_is_alpha_over_r_or_over_sqrt_r() {
        assert_eq!(LoraConfig::new(16, 32.0).scale(), 2.0);
        assert_eq!(LoraConfig::new(16, 32.0).with_rslora(true).scale(), 8.0);
    }

    #[test]
    fn forward_equals_the_merged_weight() {
        let device = Default::default();
        let w = Tensor::<B, 2>::random([6, 5], Distribution::Default, &device);
        let config = LoraConfig::new(2, 3.0);
        let a = Tensor::<B, 2>::random([2, 5], Distribution::Default, &device);
        let b = Tensor::<B, 2>::random([6, 2], Distribution::Default, &device);
        let lora = config.with_weights(a, b);
        let merged = Linear::dense(w.clone() + lora.delta(), None);
        let layer = LoraLinear::new(Linear::dense(w, None)).attach(lora);
        let x = Tensor::<B, 3>::random([1, 4, 5], Distribution::Default, &device);
        let expected = merged.forward(x.clone()).into_data();
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f64>(&expected, Tolerance::absolute(1e-10));
        let mut folded = layer;
        folded.merge();
        assert!(folded.lora.is_none());
        folded
            .forward(x)
            .into_data()
            .assert_approx_eq::<f64>(&expected, Tolerance::absolute(1e-10));
    }

    /// Loss = sum(y * c) for a fixed random c, as a function of the adapter weights.
    fn loss(layer: &LoraLinear<A>, x: &Tensor<A, 3>, c: &Tensor<A, 3>) -> Tensor<A, 1> {
        (layer.forward(x.clone()) * c.clone()).sum()
    }

    #[test]
    fn adapter_gradients_match_finite_differences_and_the_base_gets_none() {
        let device = Default::default();
        let (n_out, n_in, r) = (4, 6, 3);
        let config = LoraConfig::new(r, 6.0);
        let w = Tensor::<A, 2>::random([n_out, n_in], Distribution::Default, &device);
        let a0 = Tensor::<B, 2>::random([r, n_in], Distribution::Default, &device);
        // Non-zero B so that dL/dA is not trivially zero.
        let b0 = Tensor::<B, 2>::random([n_out, r], Distribution::Default, &device);
        let x = Tensor::<A, 3>::random([2, 3, n_in], Distribution::Default, &device);
        let c = Tensor::<A, 3>::random([2, 3, n_out], Distribution::Default, &device);
        let build = |a: Tensor<B, 2>, b: Tensor<B, 2>| {
            let lora = config.with_weights(Tensor::from_inner(a), Tensor::from_inner(b));
            LoraLinear::new(Linear::dense(w.clone(), None)).attach(lora)
        };
        let layer = build(a0.clone(), b0.clone());
        let grads = loss(&layer, &x, &c).backward();
        let lora = layer.lora.as_ref().unwrap();
        let ga: Vec<f64> = lora
            .lora_a
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        let gb: Vec<f64> = lora
            .lora_b
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        assert!(
            layer.base.weight.as_ref().unwrap().grad(&grads).is_none(),
            "frozen base has no gradient"
        );

        let eps = 1e-6;
        let value =
            |a: Tensor<B, 2>, b: Tensor<B, 2>| -> f64 { loss(&build(a, b), &x, &c).into_scalar() };
        for (which, analytic, shape) in [("A", &ga, [r, n_in]), ("B", &gb, [n_out, r])] {
            for i in 0..shape[0] * shape[1] {
                let mut bump = vec![0.0; shape[0] * shape[1]];
                bump[i] = eps;
                let d = Tensor::<B, 2>::from_data(TensorData::new(bump, shape), &device);
                let (plus, minus) = if which == "A" {
                    (
                        value(a0.clone() + d.clone(), b0.clone()),
                        value(a0.clone() - d, b0.clone()),
                    )
                } else {
                    (
                        value(a0.clone(), b0.clone() + d.clone()),
                        value(a0.clone(), b0.clone() - d),
                    )
                };
                let numeric = (plus - minus) / (2.0 * eps);
                assert!(
                    (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "d{which}[{i}]: {numeric} vs {}",
                    analytic[i]
                );
            }
        }
    }
}
