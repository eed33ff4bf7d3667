//! The engine against single-sequence generation on a tiny random model: batching, mixed
//! adapters, chunked prefill, the prefix cache, preemption and beam search must not change
//! what a request gets, and every block must come back.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use ft_adapters::peft::{LoraWeights, Matrix, PeftAdapter, PeftConfig};
use ft_model::tiny::{tiny_config, tiny_model};
use ft_model::LlamaForCausalLM;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::{generate, GenerationParams, Priority, SamplingParams};

type B = NdArray<f32>;

const EOS: u32 = 258;

fn model() -> LlamaForCausalLM<B> {
    tiny_model(&tiny_config(), 5)
}

/// A rank-2 adapter on q, v, up and down of every layer, large enough to change tokens.
fn peft(seed: usize) -> PeftAdapter {
    let matrix = |shape: [usize; 2], s: usize| Matrix {
        shape,
        data: (0..shape[0] * shape[1])
            .map(|i| (((i * 31 + s * 17) * 7919 % 101) as f32 - 50.0) * 0.02)
            .collect(),
    };
    let mut modules = BTreeMap::new();
    for i in 0..tiny_config().num_hidden_layers {
        for (name, out, inp) in [
            ("self_attn.q_proj", 32, 32),
            ("self_attn.v_proj", 16, 32),
            ("mlp.up_proj", 48, 32),
            ("mlp.down_proj", 32, 48),
        ] {
            modules.insert(
                format!("model.layers.{i}.{name}"),
                LoraWeights {
                    a: matrix([2, inp], seed + i),
                    b: matrix([out, 2], seed + i + 7),
                },
            );
        }
    }
    let config: PeftConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"], "bias": "none"
    }))
    .unwrap();
    PeftAdapter { config, modules }
}

fn detokenize() -> Detokenize {
    Box::new(|ids: &[u32]| ids.iter().map(|i| format!("<{i}>")).collect())
}

/// An engine with adapters "a" and "b" written to `dir`.
fn engine(config: EngineConfig, dir: &Path) -> Engine<B> {
    engine_on(config, dir, Runner::new)
}

/// Makes a forward for a model with room for some blocks of some size.
type MakeRunner = fn(&LlamaForCausalLM<B>, usize, usize) -> Runner<B>;

/// [`engine`] over the forward `runner` makes.
fn engine_on(config: EngineConfig, dir: &Path, runner: MakeRunner) -> Engine<B> {
    let forward = runner(&model(), config.kv_blocks, config.block_size);
    let mut e = Engine::with_runner(model(), detokenize(), config, forward);
    for (name, seed) in [("a", 1), ("b", 40)] {
        let path = dir.join(name);
        peft(seed).write(&path).unwrap();
        e.register_adapter(name, path).unwrap();
    }
    e
}

/// What `generate` gives `prompt` alone, with the adapter merged into the model.
fn alone(prompt: &[u32], adapter: Option<&str>, max_tokens: usize) -> Vec<u32> {
    let mut m = model();
    if let Some(name) = adapter {
        let seed = if name == "a" { 1 } else { 40 };
        m.attach_adapter(&peft(seed), Path::new(name)).unwrap();
    }
    let mut sampler = Sampler::new(SamplingParams::default());
    generate(&m, prompt, max_tokens, &[EOS], &mut sampler, |_| {}).ids
}

fn greedy(prompt: Vec<u32>, adapter: Option<&str>, max_tokens: usize) -> Request {
    Request {
        prompt,
        adapter: adapter.map(String::from),
        params: GenerationParams {
            max_tokens,
            stop_ids: vec![EOS],
            ..Default::default()
        },
        priority: Priority::Interactive,
    }
}

/// Runs the engine until idle; the tokens and finish of each request.
fn drain(e: &mut Engine<B>) -> HashMap<RequestId, (Vec<u32>, FinishReason)> {
    let mut tokens: HashMap<RequestId, Vec<u32>> = HashMap::new();
    let mut out = HashMap::new();
    while e.has_work() {
        for ev in e.step() {
            match ev {
                Event::Token { id, token, .. } => tokens.entry(id).or_default().push(token),
                Event::Finished { id, reason, .. } => {
                    out.insert(id, (tokens.remove(&id).unwrap_or_default(), reason));
                }
                Event::Failed { error, .. } => panic!("{error}"),
                Event::Prompt { .. } => {}
            }
        }
    }
    out
}

fn prompts() -> Vec<(Vec<u32>, Option<&'static str>)> {
    vec![
        ((1..12).collect(), None),
        (vec![100, 3, 9], Some("a")),
        ((20..41).collect(), Some("b")),
        (vec![7], Some("a")),
        ((50..59).collect(), None),
        ((60..66).collect(), Some("b")),
    ]
}

#[test]
fn batched_mixed_adapter_requests_equal_each_request_alone() {
    let dir = tempfile::tempdir().unwrap();
    // Small blocks and a small token budget: prompts span blocks and prefill in chunks.
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 64,
        max_batch_tokens: 10,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    let ids: Vec<_> = prompts()
        .into_iter()
        .map(|(p, a)| (e.submit(greedy(p.clone(), a, 9)).unwrap(), p, a))
        .collect();
    let out = drain(&mut e);
    for (id, p, a) in ids {
        assert_eq!(out[&id].0, alone(&p, a, 9), "prompt {p:?} adapter {a:?}");
    }
    assert_ne!(
        alone(&[7], Some("a"), 9),
        alone(&[7], None, 9),
        "the adapter matters"
    );
    assert_eq!(e.stats().blocks_used, 0, "every block came back");
}

#[test]
fn prefix_cache_hits_decode_as_a_full_recompute() {
    let dir = tempfile::tempdir().unwrap();
    let shared: Vec<u32> = (1..30).collect();
    let run = |prefix_cache: bool| {
        let config = EngineConfig {
            block_size: 4,
            prefix_cache,
            ..Default::default()
        };
        let mut e = engine(config, dir.path());
        let mut got = Vec::new();
        // One after another, so that later requests find the earlier ones' blocks.
        for tail in [vec![200u32], vec![201, 202], vec![200]] {
            for adapter in [None, Some("a")] {
                let p: Vec<u32> = shared.iter().chain(&tail).copied().collect();
                let id = e.submit(greedy(p, adapter, 6)).unwrap();
                got.push(drain(&mut e)[&id].0.clone());
            }
        }
        let stats = e.stats();
        assert_eq!(stats.blocks_used, 0);
        (got, stats.prefix_hits)
    };
    let (with, hits) = run(true);
    let (without, no_hits) = run(false);
    assert_eq!(with, without);
    assert_eq!(no_hits, 0);
    // 7 full blocks of the shared prefix reused by the 4 later requests.
    assert_eq!(hits, 4 * 7);
    let p: Vec<u32> = shared.iter().chain(&[201, 202]).copied().collect();
    assert_eq!(with[3], alone(&p, Some("a"), 6));
}

#[test]
fn preempted_requests_are_recomputed_to_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    // 14 blocks of 4 tokens: six requests of up to 21 + 12 tokens cannot all fit.
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 14,
        max_batch_tokens: 64,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    let ids: Vec<_> = prompts()
        .into_iter()
        .map(|(p, a)| (e.submit(greedy(p.clone(), a, 12)).unwrap(), p, a))
        .collect();
    let out = drain(&mut e);
    assert!(e.stats().preemptions > 0, "the cache was too small for all");
    for (id, p, a) in ids {
        assert_eq!(out[&id].0, alone(&p, a, 12), "prompt {p:?}");
    }
    assert_eq!(e.stats().blocks_used, 0);
}

#[test]
fn an_interactive_request_takes_a_batch_requests_row_within_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 64,
        max_batch_tokens: 64,
        max_running: 2,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    let batch = |p: Vec<u32>| Request {
        priority: Priority::Batch,
        ..greedy(p, None, 20)
    };
    let queued: Vec<_> = prompts()
        .into_iter()
        .take(3)
        .map(|(p, _)| (e.submit(batch(p.clone())).unwrap(), p))
        .collect();
    // Both rows hold batch requests, and one more batch request waits.
    let mut early = e.step();
    early.extend(e.step());
    assert_eq!((e.stats().running, e.stats().waiting), (2, 1));
    let prompt: Vec<u32> = (3..8).collect();
    let interactive = e.submit(greedy(prompt.clone(), None, 6)).unwrap();
    let first = e.step();
    assert!(
        first
            .iter()
            .any(|ev| matches!(ev, Event::Token { id, .. } if *id == interactive)),
        "the interactive request ran in the next step: {first:?}"
    );
    assert_eq!(
        e.stats().preemptions,
        1,
        "one batch request gave up its row"
    );
    // The batch requests come back and end as they would have alone.
    early.extend(first);
    let mut before: HashMap<RequestId, Vec<u32>> = HashMap::new();
    for ev in early {
        if let Event::Token { id, token, .. } = ev {
            before.entry(id).or_default().push(token);
        }
    }
    let mut out = drain(&mut e);
    for (id, mut tokens) in before {
        let (rest, _) = out.get_mut(&id).expect("finished later");
        tokens.append(rest);
        *rest = tokens;
    }
    for (id, p) in queued {
        assert_eq!(out[&id].0, alone(&p, None, 20), "prompt {p:?}");
    }
    assert_eq!(e.stats().blocks_used, 0);

    // Batch requests filling the queue never keep an interactive one out of it.
    let config = EngineConfig {
        max_running: 1,
        max_waiting: 2,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    for _ in 0..2 {
        e.submit(batch(vec![3, 4])).unwrap();
    }
    assert!(matches!(
        e.submit(batch(vec![3, 4])),
        Err(EngineError::QueueFull(2))
    ));
    e.submit(greedy(vec![3, 4], None, 2)).unwrap();
}

#[test]
fn a_step_runs_at_most_batch_step_tokens_of_batch_work() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 64,
        max_batch_tokens: 64,
        batch_step_tokens: 5,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    let ids: Vec<_> = prompts()
        .into_iter()
        .map(|(p, a)| {
            let request = Request {
                priority: Priority::Batch,
                ..greedy(p.clone(), a, 8)
            };
            (e.submit(request).unwrap(), p, a)
        })
        .collect();
    // `step`, with the scheduled work looked at before it runs.
    let mut events = Vec::new();
    while e.has_work() {
        e.admit(&mut events);
        let work = e.schedule();
        let tokens: usize = work.iter().map(|w| w.len).sum();
        assert!(tokens <= 5, "{tokens} tokens of batch work in one step");
        let logits = e.forward(&work);
        e.score_prompts(&work, &logits, &mut events);
        e.sample(&work, &logits, &mut events);
    }
    let mut out: HashMap<RequestId, Vec<u32>> = HashMap::new();
    for ev in events {
        if let Event::Token { id, token, .. } = ev {
            out.entry(id).or_default().push(token);
        }
    }
    for (id, p, a) in ids {
        assert_eq!(out[&id], alone(&p, a, 8), "prompt {p:?}");
    }
    assert_eq!(e.stats().blocks_used, 0);
}

/// Beam search by recomputing every beam from scratch: no cache, no forks.
fn reference_beams(prompt: &[u32], n: usize, max_tokens: usize) -> Vec<u32> {
    let m = model();
    let logprobs = |seq: &[u32]| {
        let v: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
        let ids =
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, seq.len()]), &Default::default());
        let logits = m.forward(ids, None);
        let [_, s, vocab] = logits.dims();
        let last: Vec<f32> = logits
            .narrow(1, s - 1, 1)
            .reshape([vocab])
            .into_data()
            .to_vec()
            .unwrap();
        beam::log_softmax(&last)
    };
    let mut beams: Vec<(Vec<u32>, f64)> = vec![(prompt.to_vec(), 0.0)];
    let mut finished = Vec::new();
    for gen in 1..=max_tokens {
        let rows: Vec<Vec<f32>> = beams.iter().map(|(s, _)| logprobs(s)).collect();
        let sums: Vec<f64> = beams.iter().map(|b| b.1).collect();
        let step = beam::step(&rows, &sums, n, &[EOS]);
        for &(b, sum) in &step.finished {
            finished.push(Hypothesis {
                tokens: beams[b].0[prompt.len()..].to_vec(),
                score: sum / gen as f64,
                stopped: true,
            });
        }
        beams = step
            .beams
            .iter()
            .map(|&(b, t, sum)| {
                let mut s = beams[b].0.clone();
                s.push(t);
                (s, sum)
            })
            .collect();
        let best_live = beams.iter().map(|b| b.1).fold(f64::NEG_INFINITY, f64::max);
        if gen == max_tokens {
            for (s, sum) in &beams {
                finished.push(Hypothesis {
                    tokens: s[prompt.len()..].to_vec(),
                    score: sum / gen as f64,
                    stopped: false,
                });
            }
            break;
        }
        if beam::is_done(&finished, best_live, gen, n) {
            break;
        }
    }
    beam::best(&finished).unwrap().tokens.clone()
}

#[test]
fn beam_search_with_shared_blocks_equals_recomputing_each_beam() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        block_size: 4,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    let prompt: Vec<u32> = (3..9).collect();
    let beam_request = |n| Request {
        params: GenerationParams {
            beams: n,
            ..greedy(prompt.clone(), None, 10).params
        },
        ..greedy(prompt.clone(), None, 10)
    };
    let four = e.submit(beam_request(4)).unwrap();
    let one = e.submit(beam_request(1)).unwrap();
    let out = drain(&mut e);
    assert_eq!(out[&four].0, reference_beams(&prompt, 4, 10));
    assert_eq!(out[&one].0, alone(&prompt, None, 10), "one beam is greedy");
    assert_eq!(e.stats().blocks_used, 0);
}

#[test]
fn stop_strings_logprobs_and_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine(EngineConfig::default(), dir.path());
    let prompt = vec![10u32, 11, 12];
    let free = alone(&prompt, None, 8);
    // Stop at the text of the third token.
    let stop = format!("<{}>", free[2]);
    let mut r = greedy(prompt.clone(), None, 8);
    r.params.stop_strings = vec![stop];
    r.params.logprobs = Some(3);
    let id = e.submit(r).unwrap();
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut finish = None;
    while e.has_work() {
        for ev in e.step() {
            match ev {
                Event::Token {
                    text: t,
                    logprob,
                    token,
                    ..
                } => {
                    text.push_str(&t);
                    logprobs.push((token, logprob.unwrap()));
                }
                Event::Finished {
                    text: t,
                    reason,
                    completion_tokens,
                    ..
                } => {
                    text.push_str(&t);
                    finish = Some((reason, completion_tokens));
                }
                Event::Failed { error, .. } => panic!("{error}"),
                Event::Prompt { .. } => panic!("no prompt scores were asked for"),
            }
            let _ = id;
        }
    }
    let first = free.iter().position(|&t| t == free[2]).unwrap();
    let expected: String = free[..first].iter().map(|i| format!("<{i}>")).collect();
    assert_eq!(text, expected);
    // The token that completed the stop string counts as generated, as in vLLM.
    assert_eq!(finish, Some((FinishReason::Stop, first + 1)));
    for (token, lp) in logprobs {
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].0, token, "greedy picks the most likely");
        assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6 && lp.logprob <= 0.0);
    }
}

/// log p(prompt[i + 1] | prompt[..=i]) for every i, from one forward of the whole prompt
/// through the model with the adapter merged.
fn whole_forward_scores(prompt: &[u32], adapter: Option<&str>) -> Vec<f32> {
    let mut m = model();
    if let Some(name) = adapter {
        let seed = if name == "a" { 1 } else { 40 };
        m.attach_adapter(&peft(seed), Path::new(name)).unwrap();
    }
    let n = prompt.len();
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
    let logits = m.forward(ids, None).into_data().into_vec::<f32>().unwrap();
    let vocab = logits.len() / n;
    (0..n - 1)
        .map(|i| beam::log_softmax(&logits[i * vocab..(i + 1) * vocab])[prompt[i + 1] as usize])
        .collect()
}

#[test]
fn prompt_scores_equal_one_whole_forward_however_the_prompt_is_run() {
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (1..30).chain([200]).collect();
    let runners: [MakeRunner; 2] = [Runner::new, Runner::burn];
    for adapter in [None, Some("b")] {
        let want = whole_forward_scores(&prompt, adapter);
        let tokens = alone(&prompt, adapter, 3);
        // Whole in one step; then 8 tokens a step beside another request, after an earlier
        // request left the same prompt's blocks in the prefix cache. The host forward keeps
        // keys and values in f16 (1e-5 here without the adapter; up to 6.4e-3 at one position
        // with its large random weights, 1e-5 at the rest); burn's computes as the whole
        // forward does.
        // Last, a cache of 12 blocks that cannot hold the three requests at once: the latest
        // is preempted and recomputed, its scores neither lost nor sent twice.
        for (runner, max_batch_tokens, warm, tolerance, kv_blocks) in [
            (runners[0], 256, false, 1e-2, 512),
            (runners[0], 8, true, 1e-2, 512),
            (runners[1], 8, true, 1e-4, 512),
            (runners[0], 8, false, 1e-2, 12),
        ] {
            let config = EngineConfig {
                block_size: 4,
                max_batch_tokens,
                kv_blocks,
                ..Default::default()
            };
            let mut e = engine_on(config, dir.path(), runner);
            if warm {
                e.submit(greedy(prompt.clone(), adapter, 2)).unwrap();
                drain(&mut e);
            }
            let mut scored = greedy(prompt.clone(), adapter, 3);
            scored.params.prompt_logprobs = Some(2);
            let id = e.submit(scored).unwrap();
            e.submit(greedy((40..60).collect(), Some("a"), 4)).unwrap();
            let mut only = greedy(prompt.clone(), adapter, 0);
            only.params.prompt_logprobs = Some(0);
            let only = e.submit(only).unwrap();
            let mut scores: HashMap<RequestId, Vec<TokenLogprob>> = HashMap::new();
            let mut got: HashMap<RequestId, Vec<u32>> = HashMap::new();
            let mut ends = HashMap::new();
            while e.has_work() {
                for ev in e.step() {
                    match ev {
                        Event::Prompt { id, logprobs } => {
                            assert!(!got.contains_key(&id), "scores come before tokens");
                            assert!(scores.insert(id, logprobs).is_none(), "scores sent once");
                        }
                        Event::Token { id, token, .. } => got.entry(id).or_default().push(token),
                        Event::Finished {
                            id,
                            reason,
                            completion_tokens,
                            ..
                        } => {
                            ends.insert(id, (reason, completion_tokens));
                        }
                        Event::Failed { error, .. } => panic!("{error}"),
                    }
                }
            }
            assert_eq!(scores.len(), 2, "only the requests that asked are scored");
            let s = &scores[&id];
            assert_eq!(s.len(), prompt.len() - 1);
            for (i, (lp, w)) in s.iter().zip(&want).enumerate() {
                let off = (lp.logprob - w).abs();
                assert!(off < tolerance, "position {i}: {} {w}", lp.logprob);
                assert_eq!(lp.top.len(), 2);
                assert!(lp.top[0].1 >= lp.top[1].1 && lp.top[0].1 >= lp.logprob);
            }
            for (a, b) in s.iter().zip(&scores[&only]) {
                assert!((a.logprob - b.logprob).abs() < 1e-5 && b.top.is_empty());
            }
            assert_eq!(got[&id], tokens);
            assert!(!got.contains_key(&only));
            assert_eq!(ends[&only], (FinishReason::Length, 0));
            assert_eq!(e.stats().blocks_used, 0, "every block came back");
            assert_eq!(e.stats().preemptions > 0, kv_blocks == 12);
        }
    }
}

#[test]
fn bad_requests_are_refused_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        max_waiting: 2,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    let err = |e: &mut Engine<B>, r| e.submit(r).unwrap_err().to_string();
    assert!(err(&mut e, greedy(vec![], None, 4)).contains("no tokens"));
    assert!(err(&mut e, greedy(vec![9999], None, 4)).contains("outside the vocabulary"));
    assert!(err(&mut e, greedy(vec![1], None, 64)).contains("more than the model's context of 64"));
    assert!(err(&mut e, greedy(vec![1], None, usize::MAX)).contains("model's context of 64"));
    let mut wide = greedy(vec![1], None, 4);
    wide.params.beams = 300;
    assert!(err(&mut e, wide).contains("beams: 300 is not in 1..=256"));
    assert_eq!(
        e.submit(greedy(vec![1], Some("c"), 4)),
        Err(EngineError::UnknownModel("c".into()))
    );
    e.submit(greedy(vec![1], None, 4)).unwrap();
    e.submit(greedy(vec![1], None, 4)).unwrap();
    assert_eq!(
        e.submit(greedy(vec![1], None, 4)),
        Err(EngineError::QueueFull(2))
    );
    drain(&mut e);
}

#[test]
fn a_thousand_requests_with_random_cancellations_leak_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 20,
        max_batch_tokens: 32,
        max_running: 8,
        max_waiting: 1000,
        max_adapters: 1,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    let mut rng = StdRng::seed_from_u64(9);
    let mut live: Vec<RequestId> = Vec::new();
    let mut submitted = 0;
    let mut finished = 0;
    let mut cancelled = 0;
    while submitted < 1000 || e.has_work() {
        for _ in 0..rng.random_range(0..4) {
            if submitted < 1000 {
                // One of three 8-token prefixes, then a random tail.
                let prefix = rng.random_range(0..3u32);
                let len = rng.random_range(1..12);
                let prompt: Vec<u32> = (0..8)
                    .map(|i| prefix * 10 + i)
                    .chain((0..len).map(|_| rng.random_range(0..250)))
                    .collect();
                let adapter = [None, Some("a"), Some("b")][rng.random_range(0..3)];
                let mut r = greedy(prompt, adapter, rng.random_range(1..10));
                r.params.beams = if rng.random_bool(0.1) { 2 } else { 1 };
                r.params.sampling.temperature = if rng.random_bool(0.5) { 0.8 } else { 0.0 };
                live.push(e.submit(r).unwrap());
                submitted += 1;
            }
        }
        if !live.is_empty() && rng.random_bool(0.2) {
            let id = live.swap_remove(rng.random_range(0..live.len()));
            if e.cancel(id) {
                cancelled += 1;
            }
        }
        for ev in e.step() {
            match ev {
                Event::Finished { id, .. } => {
                    live.retain(|&l| l != id);
                    finished += 1;
                }
                Event::Failed { error, .. } => panic!("{error}"),
                Event::Token { .. } | Event::Prompt { .. } => {}
            }
        }
    }
    assert_eq!(finished + cancelled, 1000);
    assert!(cancelled > 50, "{cancelled}");
    let stats = e.stats();
    assert_eq!((stats.blocks_used, stats.waiting, stats.running), (0, 0, 0));
    assert!(stats.preemptions > 0 && stats.prefix_hits > 0, "{stats:?}");
}

#[test]
fn an_adapter_registered_again_never_reuses_the_old_ones_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        block_size: 4,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    let prompt: Vec<u32> = (1..20).collect();
    let first = e.submit(greedy(prompt.clone(), Some("a"), 6)).unwrap();
    assert_eq!(drain(&mut e)[&first].0, alone(&prompt, Some("a"), 6));
    // "a" now names the weights of "b": the cached blocks of the old "a" must not serve it.
    e.unregister_adapter("a").unwrap();
    e.register_adapter("a", dir.path().join("b")).unwrap();
    let second = e.submit(greedy(prompt.clone(), Some("a"), 6)).unwrap();
    assert_eq!(drain(&mut e)[&second].0, alone(&prompt, Some("b"), 6));
    assert_eq!(e.stats().blocks_used, 0);
}

#[test]
fn an_evicted_adapter_whose_files_changed_is_not_loaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        block_size: 4,
        max_adapters: 1,
        ..Default::default()
    };
    let mut e = engine(config, dir.path());
    // "b" in use evicts "a"; then a's weights change on disk.
    e.submit(greedy(vec![1, 2, 3], Some("b"), 2)).unwrap();
    drain(&mut e);
    peft(77).write(&dir.path().join("a")).unwrap();
    e.submit(greedy(vec![1, 2, 3], Some("a"), 2)).unwrap();
    let mut failed = None;
    while e.has_work() {
        for ev in e.step() {
            if let Event::Failed { error, .. } = ev {
                failed = Some(error.to_string());
            }
        }
    }
    let failed = failed.expect("the changed adapter is refused");
    assert!(failed.contains("changed since it was loaded"), "{failed}");
    // Unchanged, "b" loads again after "a"'s attempt.
    e.submit(greedy(vec![1, 2, 3], Some("b"), 2)).unwrap();
    assert_eq!(drain(&mut e).len(), 1);
}
