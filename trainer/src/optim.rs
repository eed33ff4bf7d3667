//! AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) as PyTorch's `torch.optim.AdamW`
//! computes it, over named parameters grouped by decoder layer, with two homes for the
//! moments:
//!
//! - `adamw`: the first and second moments stay on the device as tensors.
//! - `paged_adamw`: as bitsandbytes' paged optimizers (Dettmers et al. 2023), the moments of
//!   every group with at least `page_min_elements` elements live in host memory, in fixed-size
//!   pages; a group's moments are brought to the device for its update and written back, the
//!   next group's upload overlapping the previous group's write-back, so the device holds two
//!   groups' states at most. On the CPU backend host
//!   and device are the same memory; the report still says where each byte lives.
//!
//! Only the parameters handed to [`AdamW::step`] get state: frozen weights have none.

use std::collections::BTreeMap;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use ft_model::QuantBackend;
use rayon::prelude::*;

/// Elements per host page (256 KiB of f32).
pub const PAGE_ELEMENTS: usize = 1 << 16;

/// Hyperparameters of one update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Learning rate of this step.
    pub lr: f64,
    /// beta1, beta2.
    pub betas: [f64; 2],
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// A parameter handed to the optimizer: its name, value and gradient.
pub struct ParamGrad<B: Backend> {
    /// Unique name (the PEFT module path and `lora_A`/`lora_B`).
    pub name: String,
    /// Current value.
    pub value: Tensor<B, 2>,
    /// Gradient of the loss.
    pub grad: Tensor<B, 2>,
    /// Whether weight decay applies (HF's Trainer exempts norms and biases).
    pub decay: bool,
}

/// Host memory in fixed-size pages, addressed as one flat f32 array.
#[derive(Debug, Default, Clone)]
struct HostPages {
    pages: Vec<Box<[f32]>>,
    used: usize,
}

impl HostPages {
    /// Reserves `n` zeroed elements; returns their offset.
    fn alloc(&mut self, n: usize) -> usize {
        let offset = self.used;
        self.used += n;
        while self.pages.len() * PAGE_ELEMENTS < self.used {
            self.pages
                .push(vec![0f32; PAGE_ELEMENTS].into_boxed_slice());
        }
        offset
    }

    fn read(&self, offset: usize, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        let mut at = offset;
        while out.len() < n {
            let (page, within) = (at / PAGE_ELEMENTS, at % PAGE_ELEMENTS);
            let take = (PAGE_ELEMENTS - within).min(n - out.len());
            out.extend_from_slice(&self.pages[page][within..within + take]);
            at += take;
        }
        out
    }

    fn write(&mut self, offset: usize, values: &[f32]) {
        let mut at = offset;
        let mut rest = values;
        while !rest.is_empty() {
            let (page, within) = (at / PAGE_ELEMENTS, at % PAGE_ELEMENTS);
            let take = (PAGE_ELEMENTS - within).min(rest.len());
            self.pages[page][within..within + take].copy_from_slice(&rest[..take]);
            at += take;
            rest = &rest[take..];
        }
    }

    fn bytes(&self) -> usize {
        self.pages.len() * PAGE_ELEMENTS * 4
    }
}

/// One parameter's moments as host data: name, shape, first moment, second moment.
pub type SavedMoments = (String, [usize; 2], Vec<f32>, Vec<f32>);

/// Where one parameter's moments live.
#[derive(Debug, Clone)]
enum Moments<B: Backend> {
    Device(Tensor<B, 2>, Tensor<B, 2>),
    /// Offsets of m and v in the host pages, and the shape.
    Paged(usize, usize, [usize; 2]),
}

/// AdamW with device or paged moments.
#[derive(Debug, Clone)]
pub struct AdamW<B: Backend> {
    paged: bool,
    page_min_elements: usize,
    /// Optimizer steps taken (Adam's t).
    pub t: u64,
    moments: BTreeMap<String, Moments<B>>,
    host: HostPages,
}

/// Where the optimizer's state lives, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct StateBytes {
    /// Moments resident on the device.
    pub device: usize,
    /// Moments in host pages (paged_adamw).
    pub host_paged: usize,
    /// Parameters with state.
    pub params: usize,
}

impl<B: Backend> AdamW<B> {
    /// An optimizer with no state yet; `paged` pages groups of at least `page_min_elements`.
    pub fn new(paged: bool, page_min_elements: usize) -> Self {
        Self {
            paged,
            page_min_elements,
            t: 0,
            moments: BTreeMap::new(),
            host: HostPages::default(),
        }
    }

    /// The moments of `name` on the device (zeros on first use).
    fn take(
        &mut self,
        name: &str,
        like: &Tensor<B, 2>,
        page: bool,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        // The moments take the parameter's float type.
        let device = (&like.device(), like.dtype());
        let shape = like.dims();
        match self.moments.get(name) {
            Some(Moments::Device(m, v)) => (m.clone(), v.clone()),
            Some(Moments::Paged(om, ov, shape)) => {
                let n = shape[0] * shape[1];
                let load = |o: usize| {
                    Tensor::from_data(
                        TensorData::new(self.host.read(o, n), *shape).convert::<B::FloatElem>(),
                        device,
                    )
                };
                (load(*om), load(*ov))
            }
            None => {
                if page {
                    let n = shape[0] * shape[1];
                    let (om, ov) = (self.host.alloc(n), self.host.alloc(n));
                    self.moments
                        .insert(name.to_string(), Moments::Paged(om, ov, shape));
                }
                (Tensor::zeros(shape, device), Tensor::zeros(shape, device))
            }
        }
    }

    fn put(&mut self, name: &str, m: Tensor<B, 2>, v: Tensor<B, 2>) {
        match self.moments.get(name) {
            Some(Moments::Paged(om, ov, _)) => {
                let (om, ov) = (*om, *ov);
                self.host.write(om, &host(m));
                self.host.write(ov, &host(v));
            }
            _ => {
                self.moments.insert(name.to_string(), Moments::Device(m, v));
            }
        }
    }

    /// Where the state lives.
    pub fn state_bytes(&self) -> StateBytes {
        let device = self
            .moments
            .values()
            .map(|m| match m {
                Moments::Device(m, _) => 2 * 4 * m.shape().num_elements(),
                Moments::Paged(..) => 0,
            })
            .sum();
        StateBytes {
            device,
            host_paged: self.host.bytes(),
            params: self.moments.len(),
        }
    }

    /// Every moment as host data, for a checkpoint: `(name, shape, m, v)`.
    pub fn export(&self) -> Vec<SavedMoments> {
        self.moments
            .iter()
            .map(|(name, mo)| match mo {
                Moments::Device(m, v) => (name.clone(), m.dims(), host(m.clone()), host(v.clone())),
                Moments::Paged(om, ov, shape) => {
                    let n = shape[0] * shape[1];
                    (
                        name.clone(),
                        *shape,
                        self.host.read(*om, n),
                        self.host.read(*ov, n),
                    )
                }
            })
            .collect()
    }

    /// Restores moments saved by [`Self::export`]; `paged_names` are the ones kept in pages.
    pub fn import(
        &mut self,
        t: u64,
        state: Vec<SavedMoments>,
        paged_names: &[String],
        device: &B::Device,
    ) {
        self.t = t;
        for (name, shape, m, v) in state {
            let entry = if paged_names.contains(&name) {
                let (om, ov) = (self.host.alloc(m.len()), self.host.alloc(v.len()));
                self.host.write(om, &m);
                self.host.write(ov, &v);
                Moments::Paged(om, ov, shape)
            } else {
                Moments::Device(
                    Tensor::from_data(TensorData::new(m, shape).convert::<B::FloatElem>(), device),
                    Tensor::from_data(TensorData::new(v, shape).convert::<B::FloatElem>(), device),
                )
            };
            self.moments.insert(name, entry);
        }
    }

    /// Names whose moments are paged.
    pub fn paged_names(&self) -> Vec<String> {
        self.moments
            .iter()
            .filter(|(_, m)| matches!(m, Moments::Paged(..)))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

impl<B: QuantBackend> AdamW<B> {
    /// One update of every group (parameters sharing a decoder layer form a group); returns
    /// the new values in the order given.
    ///
    /// Paged moments move as a pipeline: a group's moments are uploaded before the previous
    /// group's are read back, so on a GPU the host-side page reads and upload of group i + 1
    /// proceed while the device still computes group i's update (the read-back waits for it).
    pub fn step(
        &mut self,
        groups: Vec<Vec<ParamGrad<B>>>,
        hp: &AdamWParams,
    ) -> Vec<(String, Tensor<B, 2>)> {
        self.t += 1;
        let mut out = Vec::new();
        let mut written_back: Vec<(String, Tensor<B, 2>, Tensor<B, 2>)> = Vec::new();
        for group in groups {
            let elements: usize = group.iter().map(|p| p.value.shape().num_elements()).sum();
            let page = self.paged && elements >= self.page_min_elements;
            let moments: Vec<_> = group
                .iter()
                .map(|p| self.take(&p.name, &p.value, page))
                .collect();
            for (name, m, v) in written_back.drain(..) {
                self.put(&name, m, v);
            }
            for (p, (m, v)) in group.into_iter().zip(moments) {
                let hp = AdamWParams {
                    weight_decay: if p.decay { hp.weight_decay } else { 0.0 },
                    ..*hp
                };
                let (value, m, v) = host_update(&p.value, &p.grad, &m, &v, self.t, &hp)
                    .unwrap_or_else(|| tensor_update(p.value, p.grad, m, v, self.t, &hp));
                written_back.push((p.name.clone(), m, v));
                out.push((p.name, value));
            }
        }
        for (name, m, v) in written_back {
            self.put(&name, m, v);
        }
        out
    }
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap_or_default()
}

/// PyTorch's AdamW update as tensor ops: decay, moments, bias correction, step (where
/// [`host_update`] cannot read the tensors in host memory).
fn tensor_update<B: Backend>(
    value: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    m: Tensor<B, 2>,
    v: Tensor<B, 2>,
    t: u64,
    hp: &AdamWParams,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
    let [b1, b2] = hp.betas;
    let value = value * (1.0 - hp.lr * hp.weight_decay);
    let m = m * b1 + grad.clone() * (1.0 - b1);
    let v = v * b2 + grad.powi_scalar(2) * (1.0 - b2);
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    let denom = v.clone().sqrt() / bc2.sqrt() + hp.eps;
    let value = value - m.clone() / denom * (hp.lr / bc1);
    (value, m, v)
}

/// [`tensor_update`] as one fused pass over f32 host slices: a full-parameter step reads each value,
/// gradient and moment once and writes each result once, where the tensor ops make a new
/// tensor per operation. `None` where a tensor is not an f32 array in host memory.
#[allow(clippy::type_complexity)]
fn host_update<B: QuantBackend>(
    value: &Tensor<B, 2>,
    grad: &Tensor<B, 2>,
    m: &Tensor<B, 2>,
    v: &Tensor<B, 2>,
    t: u64,
    hp: &AdamWParams,
) -> Option<(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>)> {
    let prims = [value, grad, m, v].map(|t| t.clone().into_primitive().tensor());
    let [x, g, m, v] = [0, 1, 2, 3].map(|i| B::host_f32(&prims[i]));
    let (x, g, m, v) = (x?, g?, m?, v?);
    let [b1, b2] = hp.betas;
    let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
    let step = (hp.lr / (1.0 - b1.powi(t as i32))) as f32;
    let root_bc2 = (1.0 - b2.powi(t as i32)).sqrt() as f32;
    let (b1, b2, eps) = (b1 as f32, b2 as f32, hp.eps as f32);
    let n = x.len();
    let (mut nx, mut nm, mut nv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    const CHUNK: usize = 1 << 14;
    nx.par_chunks_mut(CHUNK)
        .zip(nm.par_chunks_mut(CHUNK))
        .zip(nv.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((nx, nm), nv))| {
            let at = c * CHUNK;
            let len = nx.len();
            for i in 0..len {
                let (gi, j) = (g[at + i], at + i);
                let mi = m[j] * b1 + gi * (1.0 - b1);
                let vi = v[j] * b2 + gi * gi * (1.0 - b2);
                nx[i] = x[j] * decay - mi / (vi.sqrt() / root_bc2 + eps) * step;
                nm[i] = mi;
                nv[i] = vi;
            }
        });
    let shape = value.dims();
    let device = value.device();
    let tensor = |values: Vec<f32>| {
        Tensor::<B, 2>::from_data(TensorData::new(values, shape), (&device, DType::F32))
    };
    Some((tensor(nx), tensor(nm), tensor(nv)))
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;

    type B = NdArray<f32>;

    fn pg(name: &str, value: &[f32], grad: &[f32]) -> ParamGrad<B> {
        let d = Default::default();
        ParamGrad {
            name: name.into(),
            value: Tensor::from_data(
                TensorData::new(value.to_vec(), [1, value.len()]),
                (&d, DType::F32),
            ),
            grad: Tensor::from_data(
                TensorData::new(grad.to_vec(), [1, grad.len()]),
                (&d, DType::F32),
            ),
            decay: true,
        }
    }

    fn hp() -> AdamWParams {
        AdamWParams {
            lr: 0.1,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    #[test]
    fn the_fused_host_pass_equals_the_tensor_ops() {
        let _turn = crate::f64_tensors();
        let device = Default::default();
        // Explicitly f32, so the host pass runs whatever the device's default type.
        let tensor = |seed: usize, scale: f32| {
            let values: Vec<f32> = (0..3 * 40_000)
                .map(|i| ((i * 7919 + seed) % 1013) as f32 / 1013.0 * scale - scale / 2.0)
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(values, [3, 40_000]), (&device, DType::F32))
        };
        let (value, grad, m) = (tensor(1, 2.0), tensor(2, 0.5), tensor(3, 0.1));
        let v = tensor(4, 0.02).abs();
        for t in [1, 7] {
            let host = host_update(&value, &grad, &m, &v, t, &hp()).expect("f32 host tensors");
            let ops = tensor_update(value.clone(), grad.clone(), m.clone(), v.clone(), t, &hp());
            for (a, b) in [(host.0, ops.0), (host.1, ops.1), (host.2, ops.2)] {
                let a: Vec<f32> = a.into_data().convert::<f32>().to_vec().expect("f32");
                let b: Vec<f32> = b.into_data().convert::<f32>().to_vec().expect("f32");
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn matches_pytorch_adamw_by_hand() {
        let _turn = crate::f64_tensors();
        // Two steps of torch.optim.AdamW(lr=0.1, weight_decay=0.01) on p = 1.0 with grads
        // 0.5 then -0.25, worked by hand:
        // t=1: p = 1 * (1 - 0.001) = 0.999; m = 0.05, v = 0.00025; m^ = 0.5, v^ = 0.25;
        //      p -= 0.1 * 0.5 / 0.5 -> 0.899.
        let mut opt = AdamW::<B>::new(false, 0);
        let out = opt.step(vec![vec![pg("w", &[1.0], &[0.5])]], &hp());
        let p1 = host(out[0].1.clone())[0];
        assert!((p1 - 0.899).abs() < 1e-6, "{p1}");
        // t=2: p = 0.899 * 0.999; m = 0.045 - 0.025 = 0.02; v = 0.00024975 + 0.0000625;
        //      m^ = 0.02 / 0.19; v^ = v / (1 - 0.999^2).
        let out = opt.step(vec![vec![pg("w", &[p1], &[-0.25])]], &hp());
        let (m, v) = (0.02f64, 0.000_249_75f64 + 0.000_062_5);
        let expected =
            0.899 * 0.999 - 0.1 * (m / 0.19) / ((v / (1.0 - 0.999f64.powi(2))).sqrt() + 1e-8);
        let p2 = host(out[0].1.clone())[0] as f64;
        assert!((p2 - expected).abs() < 1e-6, "{p2} vs {expected}");
    }

    #[test]
    fn paged_and_device_moments_give_identical_updates() {
        let _turn = crate::f64_tensors();
        let values: Vec<f32> = (0..100_000).map(|i| (i % 13) as f32 * 0.1).collect();
        let grads: Vec<f32> = (0..100_000).map(|i| (i % 7) as f32 * 0.01 - 0.03).collect();
        let mut device = AdamW::<B>::new(false, 0);
        let mut paged = AdamW::<B>::new(true, 50_000);
        let (mut a, mut b) = (values.clone(), values.clone());
        for _ in 0..3 {
            a = host(
                device.step(vec![vec![pg("w", &a, &grads)]], &hp())[0]
                    .1
                    .clone(),
            );
            b = host(
                paged.step(vec![vec![pg("w", &b, &grads)]], &hp())[0]
                    .1
                    .clone(),
            );
        }
        assert_eq!(a, b);
        assert_eq!(paged.state_bytes().device, 0);
        assert_eq!(
            paged.state_bytes().host_paged,
            4 * PAGE_ELEMENTS * 4,
            "2 x 100k floats in 4 pages"
        );
        assert_eq!(device.state_bytes().device, 2 * 4 * 100_000);
        // Round trip through a checkpoint.
        let mut restored = AdamW::<B>::new(true, 50_000);
        restored.import(
            paged.t,
            paged.export(),
            &paged.paged_names(),
            &Default::default(),
        );
        let c = host(
            restored.step(vec![vec![pg("w", &b, &grads)]], &hp())[0]
                .1
                .clone(),
        );
        let d = host(
            paged.step(vec![vec![pg("w", &b, &grads)]], &hp())[0]
                .1
                .clone(),
        );
        assert_eq!(c, d);
    }
}
