//! The linear layer of a base model, whose weight is either dense (trainable or frozen f32)
//! or packed in a quantized format and dequantized one layer at a time in `forward`, so the
//! extra memory is one layer's weight, never the whole model. A packed weight is a constant:
//! gradients flow to the layer's input, never to it. The LoRA layer wraps this type.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use crate::backend::{dequantized, QuantBackend};

use crate::packed::{PackedWeight, QuantFormat};

/// A shared packed weight: bytes and constants, and its copy on the compute device once a
/// backend that dequantizes there ([`QuantBackend::packed_weight`]) has used it. Cloning the
/// layer copies neither.
#[derive(Clone)]
pub struct Packed {
    /// The bytes and constants, in host memory.
    pub weight: Arc<PackedWeight>,
    /// The backend's device-resident form (a `DevicePacked<B>`), made on first use.
    resident: Arc<OnceLock<Box<dyn Any + Send + Sync>>>,
}

impl Packed {
    /// Wraps a packed weight; nothing is on a device yet.
    pub fn new(weight: PackedWeight) -> Self {
        Self {
            weight: Arc::new(weight),
            resident: Arc::default(),
        }
    }

    /// The device-resident form `T`, made by `make` on first use and kept while the layer
    /// lives. `make` runs again (uncached) when the cached form is of another type or `keep`
    /// rejects it (another device).
    pub fn resident<T: Any + Send + Sync + Clone>(
        &self,
        keep: impl Fn(&T) -> bool,
        make: impl FnOnce(&PackedWeight) -> T,
    ) -> T {
        if let Some(r) = self.resident.get().and_then(|r| r.downcast_ref::<T>()) {
            if keep(r) {
                return r.clone();
            }
            return make(&self.weight);
        }
        let made = make(&self.weight);
        let _ = self.resident.set(Box::new(made.clone()));
        made
    }
}

impl fmt::Debug for Packed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}{}",
            self.weight,
            if self.resident.get().is_some() {
                " (on device)"
            } else {
                ""
            }
        )
    }
}

/// y = x W^T + b with W [out, in] in HF layout.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// Dense [out, in] weight; `None` when the weight is packed.
    pub weight: Option<Param<Tensor<B, 2>>>,
    /// Packed [out, in] weight; `None` when the weight is dense.
    pub packed: Option<Packed>,
    /// [out]
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// A layer with a dense weight [out, in].
    pub fn dense(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Some(Param::from_tensor(weight)),
            packed: None,
            bias: bias.map(Param::from_tensor),
        }
    }

    /// A layer with a packed, frozen weight.
    pub fn packed(weight: PackedWeight, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: None,
            packed: Some(Packed::new(weight)),
            bias: bias.map(Param::from_tensor),
        }
    }

    /// [out, in]
    pub fn shape(&self) -> [usize; 2] {
        match (&self.weight, &self.packed) {
            (Some(w), _) => w.dims(),
            (None, Some(p)) => p.weight.shape,
            (None, None) => [0, 0],
        }
    }

    /// The storage format of the weight.
    pub fn format(&self) -> QuantFormat {
        self.packed
            .as_ref()
            .map_or(QuantFormat::F32, |p| p.weight.format())
    }

    /// Bytes the weight occupies (f32 for dense weights).
    pub fn weight_bytes(&self) -> usize {
        match &self.packed {
            Some(p) => p.weight.storage_bytes(),
            None => 4 * self.shape()[0] * self.shape()[1],
        }
    }

    /// The weight as an f32 tensor on `device`: the parameter itself, or a fresh dequantized
    /// copy that lives only as long as the caller keeps it.
    pub fn weight(&self, device: &B::Device) -> Tensor<B, 2> {
        match (&self.weight, &self.packed) {
            (Some(w), _) => w.val(),
            (None, Some(p)) => dequantized(&p.weight, device),
            (None, None) => Tensor::zeros([0, 0], device),
        }
    }
}

impl<B: QuantBackend> Linear<B> {
    /// Applies the layer to the last dimension. A packed weight goes through
    /// [`QuantBackend::packed_project`], so under autodiff its f32 form is not kept for backward.
    ///
    /// # Shapes
    /// - x: `[b, s, in]` -> `[b, s, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, n_in] = x.dims();
        let n_out = self.shape()[0];
        let x = x.reshape([b * s, n_in]);
        let y = match (&self.weight, &self.packed) {
            (None, Some(p)) => Tensor::from_primitive(TensorPrimitive::Float(B::packed_project(
                x.into_primitive().tensor(),
                p,
            ))),
            _ => {
                let w = self.weight(&x.device());
                project(x, w)
            }
        }; // [b*s, out]
        let y = match &self.bias {
            Some(bias) => y + bias.val().unsqueeze_dim(0),
            None => y,
        };
        y.reshape([b, s, n_out])
    }
}

/// Rows below which [`project`] multiplies from the weight's side.
const FEW_ROWS: usize = 16;

/// x W^T for x [m, in] and W [out, in], as one GEMM over all rows.
///
/// burn's ndarray matmul (matrixmultiply) is fastest with the weight as the left operand when
/// m is small (decoding: W x^T is 2-5x faster than x W^T for one row, measured on SmolLM2's
/// shapes), and with the weight on the right when m is large (prefill, training).
pub fn project<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    if x.dims()[0] < FEW_ROWS {
        weight.matmul(x.transpose()).transpose() // [out, m] -> [m, out]
    } else {
        x.matmul(weight.transpose())
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    use super::*;

    type B = NdArray<f32>;

    #[test]
    fn packed_forward_equals_dense_forward_on_the_dequantized_weight() {
        let device = Default::default();
        let w = Tensor::<B, 2>::random([48, 64], Distribution::Normal(0.0, 0.1), &device);
        let data: Vec<f32> = w.to_data().to_vec().unwrap();
        let packed = PackedWeight::quantize(QuantFormat::Nf4, true, &data, [48, 64]).unwrap();
        let dense = Linear::<B>::dense(
            Tensor::from_data(TensorData::new(packed.dequantize(), [48, 64]), &device),
            None,
        );
        let quant = Linear::<B>::packed(packed, None);
        for rows in [1, 40] {
            let x = Tensor::<B, 3>::random([1, rows, 64], Distribution::Normal(0.0, 1.0), &device);
            quant
                .forward(x.clone())
                .into_data()
                .assert_approx_eq::<f32>(&dense.forward(x).into_data(), Tolerance::absolute(1e-5));
        }
        assert_eq!(quant.format(), QuantFormat::Nf4);
        assert!(quant.weight_bytes() < 48 * 64);
    }

    #[test]
    fn gradients_reach_the_input_and_never_the_packed_weight() {
        type A = Autodiff<B>;
        let device = Default::default();
        let data: Vec<f32> = (0..32 * 16).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let packed = PackedWeight::quantize(QuantFormat::Int8, false, &data, [16, 32]).unwrap();
        let w = Tensor::<B, 2>::from_data(TensorData::new(packed.dequantize(), [16, 32]), &device);
        let layer = Linear::<A>::packed(packed, None);
        let x = Tensor::<A, 3>::random([1, 3, 32], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let grads = layer.forward(x.clone()).sum().backward();
        // d(sum(x W^T))/dx = ones [3, 16] W = column sums of W for every row.
        let expected = Tensor::<B, 2>::ones([3, 16], &device)
            .matmul(w)
            .unsqueeze::<3>();
        x.grad(&grads)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
        assert!(layer.weight.is_none() && layer.num_params() == 0);
    }
}
