//! The host step against burn's autodiff of the padded forward, against finite differences
//! (with dropout), and on a packed base against its dequantized copy.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use ft_adapters::LoraConfig;
use ft_quant::{PackedWeight, QuantFormat};

use super::*;
use crate::config::LlamaConfig;
use crate::forward::llama::Attend;
use crate::tiny::tiny_config;

type A = Autodiff<NdArray<f32>>;

/// Two rows as the trainer pads them: row 0 packs a document of 5 tokens and one of 3, row 1
/// holds one of 6 and 2 padding tokens (their own segment).
struct Padded {
    b: usize,
    s: usize,
    ids: Vec<u32>,
    segments: Vec<Vec<u32>>,
    positions: Vec<Vec<u32>>,
    /// (flat index into the padded rows, target id)
    targets: Vec<(usize, u32)>,
}

fn padded() -> Padded {
    let ids = vec![5, 70, 200, 9, 33, 100, 8, 1, 2, 40, 41, 42, 43, 44, 0, 0];
    Padded {
        b: 2,
        s: 8,
        ids,
        segments: vec![vec![0, 0, 0, 0, 0, 1, 1, 1], vec![0, 0, 0, 0, 0, 0, 1, 1]],
        positions: vec![vec![0, 1, 2, 3, 4, 0, 1, 2], vec![0, 1, 2, 3, 4, 5, 0, 1]],
        // Prompt masking: only some tokens of each document are trained.
        targets: vec![
            (1, 200),
            (2, 9),
            (3, 33),
            (6, 2),
            (10, 42),
            (11, 43),
            (12, 44),
        ],
    }
}

/// The same batch as real tokens only: 14 rows, three documents.
struct Real {
    ids: Vec<u32>,
    positions: Vec<u32>,
    documents: Vec<Range<usize>>,
    targets: Vec<(usize, u32)>,
}

impl Real {
    fn tokens(&self) -> Tokens<'_> {
        Tokens {
            ids: &self.ids,
            positions: &self.positions,
            documents: &self.documents,
            targets: &self.targets,
        }
    }
}

fn real() -> Real {
    // Row 0 has no padding, so the first 14 flat indices are the real tokens in order.
    let p = padded();
    Real {
        ids: p.ids[..14].to_vec(),
        positions: [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5].to_vec(),
        documents: vec![0..5, 5..8, 8..14],
        targets: p.targets.clone(),
    }
}

/// `model` with rank-4 adapters on every projection, B drawn at random so every factor has a
/// gradient.
fn adapted<B: Backend>(mut model: LlamaForCausalLM<B>, dropout: f64) -> LlamaForCausalLM<B> {
    let targets = crate::adapter::TARGETS.map(String::from);
    let mut config = LoraConfig::new(4, 8.0);
    config.dropout = dropout;
    model.add_lora(&config, &targets, None).expect("tiny model");
    for (_, lora) in model.loras_mut() {
        let shape = lora.lora_b.dims();
        lora.lora_b = Param::from_tensor(Tensor::random(
            shape,
            Distribution::Normal(0.0, 0.1),
            &Default::default(),
        ));
    }
    model
}

fn tiny(config: &LlamaConfig) -> LlamaForCausalLM<A> {
    // Drawn under the shared seed lock: tests on other threads reseed burn's global generator.
    let mut model = LlamaForCausalLM::<A>::init_seeded(config, 5, &Default::default()).no_grad();
    // Larger embeddings than the initialization's, so the loss is not flat.
    model.model.embed_tokens =
        Param::from_tensor(model.model.embed_tokens.val() * 20.0).set_require_grad(false);
    adapted(model, 0.0)
}

/// The summed NLL of the padded batch's targets through burn's forward (a tracked scalar).
fn burn_nll(model: &LlamaForCausalLM<A>) -> Tensor<A, 1> {
    let device = Default::default();
    let p = padded();
    let ids: Vec<i64> = p.ids.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<A, 2, Int>::from_data(TensorData::new(ids, [p.b, p.s]), &device);
    let attend = Attend::segmented(&model.model.rotary_emb, &p.segments, &p.positions, &device);
    let hidden = model.forward_attend(ids, &attend);
    let e = hidden.dims()[2];
    let n = p.targets.len();
    let rows: Vec<i64> = p.targets.iter().map(|&(i, _)| i as i64).collect();
    let hidden = hidden
        .reshape([p.b * p.s, e])
        .select(0, Tensor::from_data(TensorData::new(rows, [n]), &device));
    let logits = model.logits(hidden.unsqueeze::<3>());
    let vocab = logits.dims()[2];
    let labels: Vec<i64> = p.targets.iter().map(|&(_, t)| t as i64).collect();
    let labels = Tensor::<A, 2, Int>::from_data(TensorData::new(labels, [n, 1]), &device);
    log_softmax(logits.reshape([n, vocab]), 1)
        .gather(1, labels)
        .sum()
        .neg()
}

/// The scaled loss and every adapter's gradients through burn's autodiff of the padded batch.
fn burn_step(model: &LlamaForCausalLM<A>, scale: f32) -> (f64, Vec<(String, AdapterGrads)>) {
    let nll = burn_nll(model);
    let loss: f64 = nll.clone().into_scalar() as f64;
    let grads = (nll * scale).backward();
    let out = model
        .linears()
        .into_iter()
        .filter_map(|(name, l)| {
            let lora = l.lora.as_ref()?;
            let a = host_vec(lora.lora_a.val().grad(&grads)?);
            let b = host_vec(lora.lora_b.val().grad(&grads)?);
            Some((name, AdapterGrads { a, b }))
        })
        .collect();
    (loss, out)
}

fn host_step(model: &LlamaForCausalLM<A>, scale: f32, seed: u64) -> StepGrads {
    let trainer = HostTrainer::new(&model.valid()).expect("host tensors");
    let r = real();
    let tokens = r.tokens();
    trainer
        .step(
            &Adapters::of(&model.valid()),
            &tokens,
            &CrossEntropy,
            Trained::Adapters,
            scale,
            seed,
        )
        .expect("a valid batch")
}

/// max |a - b| / max |b|.
fn relative(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let size = b.iter().map(|y| y.abs()).fold(0.0, f32::max);
    diff as f64 / size.max(1e-30) as f64
}

/// The largest relative difference (over the largest magnitude) allowed between the host
/// step's gradients and burn's: both f32, summed in other orders, and the host's softmax
/// through the vector exp. Below 1e-4 on AVX-512 machines; on an AVX2-only one the key
/// projections' gradients (through the softmax's backward) differ by up to 2.4e-4. A wrong
/// gradient is off by far more.
const GRAD_TOL: f64 = 5e-4;

fn assert_same(host: &StepGrads, (loss, grads): &(f64, Vec<(String, AdapterGrads)>), tol: f64) {
    assert!(
        (host.loss - loss).abs() <= tol * loss.abs(),
        "{} vs {loss}",
        host.loss
    );
    assert_eq!(host.grads.len(), grads.len());
    let mut host: Vec<_> = host.grads.iter().collect();
    host.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want: Vec<_> = grads.iter().collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    for ((n1, g1), (n2, g2)) in host.iter().zip(&want) {
        assert_eq!(n1, n2);
        let (ra, rb) = (relative(&g1.a, &g2.a), relative(&g1.b, &g2.b));
        assert!(ra <= tol && rb <= tol, "{n1}: A {ra:e}, B {rb:e}");
    }
}

#[test]
fn loss_and_adapter_gradients_equal_burns_autodiff() {
    let model = tiny(&tiny_config());
    let host = host_step(&model, 0.25, 1);
    assert_eq!(host.grads.len(), 2 * 7, "every adapter has gradients");
    assert_same(&host, &burn_step(&model, 0.25), GRAD_TOL);
    // The forward alone (validation) gives the same loss.
    let trainer = HostTrainer::new(&model.valid()).expect("host tensors");
    let r = real();
    let tokens = r.tokens();
    let loss = trainer
        .loss(&Adapters::of(&model.valid()), &tokens)
        .expect("a valid batch");
    assert!(
        (loss - host.loss).abs() <= 1e-6 * host.loss,
        "{loss} vs {}",
        host.loss
    );
}

/// A width whose rows are whole 4-bit blocks.
fn blocked_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        head_dim: 16,
        ..tiny_config()
    }
}

#[test]
fn a_packed_base_gives_the_gradients_of_its_dequantized_copy() {
    let device = Default::default();
    let mut packed = tiny(&blocked_config());
    let mut dense = packed.clone();
    for (layer, copy) in packed.model.layers.iter_mut().zip(&mut dense.model.layers) {
        let (linears, _) = layer.parts_mut();
        let (copies, _) = copy.parts_mut();
        for ((_, linear), (_, copy)) in linears.into_iter().zip(copies) {
            let shape = linear.base.shape();
            let values = host_vec(linear.base.weight(&device));
            let p = PackedWeight::quantize(QuantFormat::Nf4, true, &values, shape)
                .expect("whole blocks");
            let dequantized = Tensor::from_data(TensorData::new(p.dequantize(), shape), &device);
            copy.base = ft_quant::Linear::dense(dequantized, None);
            linear.base = ft_quant::Linear::packed(p, None);
        }
    }
    let host_packed = host_step(&packed, 1.0, 3);
    let host_dense = host_step(&dense, 1.0, 3);
    let want = (host_dense.loss, host_dense.grads);
    assert_same(&host_packed, &want, 1e-5);
    // And both equal burn's autodiff of the dequantized copy.
    assert_same(
        &host_step(&dense, 1.0, 3),
        &burn_step(&dense, 1.0),
        GRAD_TOL,
    );
}

#[test]
fn dropout_gradients_match_finite_differences_and_repeat_by_seed() {
    let mut model = tiny(&tiny_config());
    for (_, lora) in model.loras_mut() {
        lora.dropout.prob = 0.2;
    }
    let trainer = HostTrainer::new(&model.valid()).expect("host tensors");
    let r = real();
    let tokens = r.tokens();
    let adapters = Adapters::of(&model.valid());
    let step = |adapters: &Adapters, seed| {
        trainer
            .step(
                adapters,
                &tokens,
                &CrossEntropy,
                Trained::Adapters,
                1.0,
                seed,
            )
            .expect("valid")
    };
    let first = step(&adapters, 9);
    let again = step(&adapters, 9);
    assert_eq!(first.loss, again.loss);
    assert_eq!(first.grads[0].1, again.grads[0].1, "same seed, same masks");
    assert_ne!(
        first.loss,
        step(&adapters, 10).loss,
        "another seed, other masks"
    );
    // Central differences on the largest entries of one module's factors (layer 1's v_proj:
    // module 7 + 2 in the copy, last-but-11 in the backward's order).
    let slot = 7 + 2;
    let (_, grads) = first
        .grads
        .iter()
        .find(|(name, _)| name == "model.layers.1.self_attn.v_proj")
        .expect("v_proj adapted");
    for factor in ["a", "b"] {
        let g = if factor == "a" { &grads.a } else { &grads.b };
        let i = (0..g.len())
            .max_by(|&x, &y| g[x].abs().total_cmp(&g[y].abs()))
            .expect("non-empty");
        let h = 1e-2;
        let loss_at = |delta: f32| {
            let mut moved = adapters.clone();
            let ad = moved.0[slot].as_mut().expect("adapted");
            let v = if factor == "a" { &mut ad.a } else { &mut ad.b };
            v[i] += delta;
            step(&moved, 9).loss
        };
        let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
        assert!(
            (fd - g[i] as f64).abs() <= 2e-2 * g[i].abs() as f64,
            "{factor}[{i}]: {fd} vs {}",
            g[i]
        );
    }
}

#[test]
// A batch of one document is a list of one range.
#[allow(clippy::single_range_in_vec_init)]
fn bad_batches_are_errors_not_panics() {
    let model = tiny(&tiny_config());
    let trainer = HostTrainer::new(&model.valid()).expect("host tensors");
    let adapters = Adapters::of(&model.valid());
    let (ids, ok, whole) = ([1u32, 2, 3], [0u32, 1, 2], [0..3]);
    let cases: [Tokens; 4] = [
        Tokens {
            ids: &[1, 2, 9999],
            positions: &ok,
            documents: &whole,
            targets: &[],
        },
        Tokens {
            ids: &ids,
            positions: &[0, 1, 999],
            documents: &whole,
            targets: &[],
        },
        Tokens {
            ids: &ids,
            positions: &ok,
            documents: &[0..2],
            targets: &[],
        },
        Tokens {
            ids: &ids,
            positions: &ok,
            documents: &whole,
            targets: &[(3, 1)],
        },
    ];
    for tokens in &cases {
        assert!(trainer
            .step(&adapters, tokens, &CrossEntropy, Trained::Adapters, 1.0, 0)
            .is_err());
    }
}

/// Every dense weight's gradient through burn's autodiff of the padded batch, by HF name.
fn burn_dense_grads(model: &mut LlamaForCausalLM<A>, scale: f32) -> (f64, Vec<(String, Vec<f32>)>) {
    let nll = burn_nll(model);
    let loss: f64 = nll.clone().into_scalar() as f64;
    let grads = (nll * scale).backward();
    let out = model
        .params_mut()
        .into_iter()
        .filter_map(|(name, p)| {
            let g = match p {
                crate::params::ParamMut::Matrix(p) => host_vec(p.val().grad(&grads)?),
                crate::params::ParamMut::Vector(p) => host_vec(p.val().grad(&grads)?),
            };
            Some((name, g))
        })
        .collect();
    (loss, out)
}

#[test]
fn full_parameter_gradients_equal_burns_autodiff_for_every_dense_weight() {
    for tied in [true, false] {
        let config = LlamaConfig {
            tie_word_embeddings: tied,
            ..tiny_config()
        };
        let mut model = LlamaForCausalLM::<A>::init_seeded(&config, 7, &Default::default());
        model.model.embed_tokens = Param::from_tensor(Tensor::from_inner(
            model.model.embed_tokens.val().inner() * 20.0,
        ));
        let trainer = HostTrainer::new(&model.valid()).expect("host tensors");
        let r = real();
        let host = trainer
            .step(
                &Adapters::none(trainer.names.len()),
                &r.tokens(),
                &CrossEntropy,
                Trained::Everything,
                0.5,
                0,
            )
            .expect("a valid batch");
        let (loss, want) = burn_dense_grads(&mut model, 0.5);
        assert!(
            (host.loss - loss).abs() <= 1e-5 * loss,
            "{} vs {loss}",
            host.loss
        );
        assert!(host.grads.is_empty(), "no adapters");
        assert_eq!(
            host.dense.len(),
            want.len(),
            "tied {tied}: one gradient per weight"
        );
        for (name, g) in &want {
            let mine = host
                .dense
                .iter()
                .find(|d| &d.name == name)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert_eq!(mine.shape[0] * mine.shape[1], g.len(), "{name}");
            let rel = relative(&mine.values, g);
            assert!(rel <= GRAD_TOL, "tied {tied}, {name}: {rel:e}");
        }
    }
}
