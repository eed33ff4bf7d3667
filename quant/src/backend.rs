//! The backend trait through which a layer multiplies by a packed weight.
//!
//! QLoRA's memory saving (Dettmers et al. 2023, arXiv:2305.14314) holds only if no dequantized
//! weight outlives its own matmul. A plain `x.matmul(w.transpose())` under burn's autodiff keeps
//! `w` (f32, dequantized) alive until backward, since dL/dx = dL/dy W needs it; over a whole model
//! that brings the f32 weights back. Like bitsandbytes' `MatMul4Bit`, the autodiff
//! implementation here is a custom op whose saved state is the packed weight alone: backward
//! dequantizes W again to compute dL/dx, and W gets no gradient.
//!
//! Where W is dequantized is the backend's choice: the CPU backend decodes the host bytes with
//! plain Rust loops (fastest there); the CUDA backend keeps the packed codes on the GPU
//! ([`DevicePacked`]) and decodes them there, so no f32 weight crosses PCIe.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArrayTensor, QuantElement, SharedArray,
};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use crate::attention;
use crate::device_packed::DevicePacked;
use crate::linear::{project, Packed};
use crate::matvec;
use crate::packed::PackedWeight;

/// A backend that can compute x W^T for a packed (quantized, frozen) weight W.
pub trait QuantBackend: Backend {
    /// W [out, in] as a transient f32 tensor on `device`. The default decodes on the host
    /// and uploads the result.
    fn packed_weight(weight: &Packed, device: &Self::Device) -> FloatTensor<Self> {
        dequantized::<Self>(&weight.weight, device)
            .into_primitive()
            .tensor()
    }

    /// x W^T for x [m, in] and W [out, in] packed: dequantizes W for this call only.
    fn packed_project(x: FloatTensor<Self>, weight: &Packed) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let w = Self::packed_weight(weight, &x.device());
        let w = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(w));
        project(x, w).into_primitive().tensor()
    }

    /// dL/dx = dL/dy W for dL/dy [m, out]: the backward of [`QuantBackend::packed_project`].
    fn packed_grad_input(grad: FloatTensor<Self>, weight: &Packed) -> FloatTensor<Self> {
        let grad = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(grad));
        let w = Self::packed_weight(weight, &grad.device());
        let w = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(w));
        grad.matmul(w).into_primitive().tensor()
    }

    /// Whether this backend can multiply by packed weights in bf16 ([`set_bf16_compute`]).
    fn bf16_compute_supported() -> bool {
        false
    }

    /// The values of `t` in row-major order, read in place where the backend keeps f32
    /// tensors in host memory (the CPU decoding path reads weights and activations so);
    /// `None` elsewhere.
    fn host_f32(_t: &FloatTensor<Self>) -> Option<&[f32]> {
        None
    }

    /// Attention of decoding rows straight from a paged KV cache ([`crate::attention`]):
    /// q `[m, h, d]`, keys and values `[blocks, kv, block_size, d]`, `rows[i]` = row i's
    /// block table and length; `[m, 1, h*d]`. `None` where the backend has no such kernel:
    /// the caller then gathers the blocks and attends with tensor ops.
    fn paged_decode_attention(
        _q: FloatTensor<Self>,
        _keys: &FloatTensor<Self>,
        _values: &FloatTensor<Self>,
        _rows: &[(&[usize], usize)],
    ) -> Option<FloatTensor<Self>> {
        None
    }
}

/// Whether packed-weight matmuls run in bf16 on backends that support it.
static BF16_COMPUTE: AtomicBool = AtomicBool::new(false);

/// Makes the matmuls with packed (frozen) weights run in bf16, inputs cast down and results
/// cast back to f32, as bitsandbytes' `bnb_4bit_compute_dtype = bfloat16` does; LoRA weights,
/// gradients and optimizer stay f32. Only backends whose
/// [`QuantBackend::bf16_compute_supported`] is true read it (the CPU backend has no bf16).
pub fn set_bf16_compute(on: bool) {
    BF16_COMPUTE.store(on, Ordering::Relaxed);
}

/// Whether [`set_bf16_compute`] is on.
pub fn bf16_compute() -> bool {
    BF16_COMPUTE.load(Ordering::Relaxed)
}

/// W [out, in] decoded on `device` from its device-resident codes, uploaded on first use.
pub fn device_dequantized<B: Backend>(weight: &Packed, device: &B::Device) -> Tensor<B, 2> {
    let start = Instant::now();
    let resident = weight.resident(
        |r: &DevicePacked<B>| r.device() == device,
        |w| DevicePacked::upload(w, device),
    );
    let w = resident.dequantize();
    DEQUANT_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    w
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
    /// f32 rows against ggml blocks, or a few against bf16, go through [`crate::matvec`]; the
    /// rest dequantize.
    fn packed_project(x: FloatTensor<Self>, weight: &Packed) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let [m, k] = x.dims();
        // ggml blocks (inference only) always take the kernels, so a row's result never
        // depends on how many rows share the call; bf16 (also a training base) only for the
        // few rows of decoding, where the kernel beats burn's GEMM.
        let kernel = weight.weight.kernel_weights().filter(|w| match w {
            matvec::Weights::Bf16(_) => m <= matvec::MAX_ROWS,
            _ => true,
        });
        if let Some(w) = kernel.filter(|_| m > 0 && E::dtype() == DType::F32) {
            let device = x.device();
            let n = weight.weight.shape[0];
            let product = |rows: &[f32]| matvec::product(w, n, k, rows, m);
            // Read the rows in place: x is often shared (the same activations feed several
            // projections), and copying a shared array out goes element by element.
            let x = x.into_primitive().tensor();
            let y = match Self::host_f32(&x) {
                Some(rows) => product(rows),
                None => {
                    let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
                    product(&x.into_data().into_vec::<f32>().expect("an f32 tensor"))
                }
            };
            return Tensor::<Self, 2>::from_data(TensorData::new(y, [m, n]), &device)
                .into_primitive()
                .tensor();
        }
        let w = Self::packed_weight(weight, &x.device());
        let w = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(w));
        project(x, w).into_primitive().tensor()
    }

    fn host_f32(t: &FloatTensor<Self>) -> Option<&[f32]> {
        match t {
            NdArrayTensor::F32(storage) if storage.view().is_standard_layout() => {
                storage.view().to_slice()
            }
            _ => None,
        }
    }

    /// The host kernel, reading the pool's f32 storage in place.
    fn paged_decode_attention(
        q: FloatTensor<Self>,
        keys: &FloatTensor<Self>,
        values: &FloatTensor<Self>,
        rows: &[(&[usize], usize)],
    ) -> Option<FloatTensor<Self>> {
        let (NdArrayTensor::F32(k), NdArrayTensor::F32(v)) = (keys, values) else {
            return None;
        };
        let (k, v) = (k.view(), v.view());
        let (&[_, kv_heads, block_size, head_dim], Some(ks), Some(vs)) =
            (k.shape(), k.as_slice(), v.as_slice())
        else {
            return None;
        };
        let q = Tensor::<Self, 3>::from_primitive(TensorPrimitive::Float(q));
        let [m, heads, _] = q.dims();
        let device = q.device();
        let q = q.into_data().into_vec::<f32>().ok()?;
        let layout = attention::PagedLayout {
            heads,
            kv_heads,
            block_size,
            head_dim,
        };
        let out = attention::paged_decode_attention(&q, ks, vs, layout, rows);
        let out = TensorData::new(out, [m, 1, heads * head_dim]).convert::<E>();
        Some(
            Tensor::<Self, 3>::from_data(out, &device)
                .into_primitive()
                .tensor(),
        )
    }
}

#[cfg(feature = "cuda")]
impl QuantBackend for burn::backend::Cuda {
    fn packed_weight(weight: &Packed, device: &Self::Device) -> FloatTensor<Self> {
        device_dequantized::<Self>(weight, device)
            .into_primitive()
            .tensor()
    }

    fn packed_project(x: FloatTensor<Self>, weight: &Packed) -> FloatTensor<Self> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        let w = device_dequantized::<Self>(weight, &x.device());
        compute_dtype_matmul(x, w.transpose())
    }

    fn packed_grad_input(grad: FloatTensor<Self>, weight: &Packed) -> FloatTensor<Self> {
        let grad = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(grad));
        let w = device_dequantized::<Self>(weight, &grad.device());
        compute_dtype_matmul(grad, w)
    }

    fn bf16_compute_supported() -> bool {
        true
    }
}

/// a b in f32, or in bf16 with an f32 result when [`bf16_compute`] is on.
#[cfg(feature = "cuda")]
fn compute_dtype_matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> FloatTensor<B> {
    use burn::tensor::FloatDType;
    let y = if bf16_compute() {
        a.cast(FloatDType::BF16)
            .matmul(b.cast(FloatDType::BF16))
            .cast(FloatDType::F32)
    } else {
        a.matmul(b)
    };
    y.into_primitive().tensor()
}

/// Backward of x W^T for a packed W: the state is the packed weight, never its f32 form.
#[derive(Debug)]
struct PackedProject;

impl<B: QuantBackend> Backward<B, 1> for PackedProject {
    type State = Packed;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let weight = ops.state;
        // dL/dx = dL/dy W: [m, out] -> [m, in]
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::packed_grad_input(grad, &weight)
        });
    }
}

impl<B: QuantBackend, C: CheckpointStrategy> QuantBackend for Autodiff<B, C> {
    fn packed_weight(weight: &Packed, device: &Self::Device) -> FloatTensor<Self> {
        let w = B::packed_weight(weight, device);
        <Self as AutodiffBackend>::from_inner(w)
    }

    fn bf16_compute_supported() -> bool {
        B::bf16_compute_supported()
    }

    fn packed_project(x: FloatTensor<Self>, weight: &Packed) -> FloatTensor<Self> {
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
