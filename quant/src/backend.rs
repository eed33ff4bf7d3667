//! The backend trait through which a layer multiplies by a packed weight.
//!
//! QLoRA's memory saving (Dettmers et al. 2023, arXiv:2305.14314) holds only if no dequantized
//! weight outlives its own matmul. A plain `x.matmul(w.transpose())` under burn's autodiff keeps
//! `w` (f32, dequantized) alive until backward, since dL/dx = dL/dy W needs it; over a whole model
//! that brings the f32 weights back. Like bitsandbytes' `MatMul4Bit`, the autodiff
//! implementation here is a custom op whose saved state is the packed weight alone: backward
//! dequantizes W again to compute dL/dx, and W gets no gradient.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray,
};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use crate::linear::project;
use crate::packed::PackedWeight;

/// A backend that can compute x W^T for a packed (quantized, frozen) weight W.
pub trait QuantBackend: Backend {
    /// x W^T for x [m, in] and W [out, in] packed: dequantizes W for this call only.
    fn packed_project(x: FloatTensor<Self>, weight: &Arc<PackedWeight>) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let w = dequantized::<Self>(weight, &x.device());
        project(x, w).into_primitive().tensor()
    }
}

/// Nanoseconds this process has spent in [`dequantized`].
static DEQUANT_NANOS: AtomicU64 = AtomicU64::new(0);

/// Seconds this process has spent dequantizing packed weights for matmuls, forward and
/// backward (the trainer reports it as a share of the step time).
pub fn dequant_seconds() -> f64 {
    DEQUANT_NANOS.load(Ordering::Relaxed) as f64 * 1e-9
}

/// W [out, in] as an f32 tensor on `device`.
pub fn dequantized<B: Backend>(weight: &PackedWeight, device: &B::Device) -> Tensor<B, 2> {
    let start = Instant::now();
    let data = TensorData::new(weight.dequantize(), weight.shape).convert::<B::FloatElem>();
    let w = Tensor::from_data(data, device);
    DEQUANT_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    w
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> QuantBackend
    for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
}

#[cfg(feature = "cuda")]
impl QuantBackend for burn::backend::Cuda {}

/// Backward of x W^T for a packed W: the state is the packed weight, never its f32 form.
#[derive(Debug)]
struct PackedProject;

impl<B: QuantBackend> Backward<B, 1> for PackedProject {
    type State = Arc<PackedWeight>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let weight = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let grad = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad)); // [m, out]
            let w = dequantized::<B>(&weight, &grad.device()); // [out, in]
            grad.matmul(w).into_primitive().tensor() // dL/dx = dL/dy W: [m, in]
        });
    }
}

impl<B: QuantBackend, C: CheckpointStrategy> QuantBackend for Autodiff<B, C> {
    fn packed_project(x: FloatTensor<Self>, weight: &Arc<PackedWeight>) -> FloatTensor<Self> {
        let node = x.node.clone();
        let output = B::packed_project(x.primitive, weight);
        match PackedProject
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(weight.clone(), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }
}
