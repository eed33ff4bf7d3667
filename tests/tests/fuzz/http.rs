//! HTTP request bodies of the OpenAI-compatible server (completions, chat, adapter loading),
//! sent over real HTTP to a server on the tiny model: every answer must be a success or an
//! OpenAI error object with a 4xx status (503 when busy), and the server must keep answering.

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use ft_model::tiny::{tiny_adapter, tiny_config, tiny_model};
use ft_model::Pretrained;
use ft_serve::cascade::features::NAMES;
use ft_serve::cascade::scorer::Logistic;
use ft_serve::cascade::{self, Cascade, Price, Stage};
use ft_serve::response_cache::{CacheConfig, CacheStore};
use ft_serve::server::{Background, BatchConfig, Limits, ServerConfig};
use ft_serve::{Engine, EngineConfig};
use ft_tests::fuzz::{budget, fuzz, mutate_json_document, Outcome, Rng, Target};
use serde_json::{json, Value};

use crate::{B, LONG, QUICK};

/// A server on the tiny model with adapter `a` and cascade `c`, adapters loadable from `dir`.
fn server(dir: &Path) -> Background {
    let model = dir.join("tiny.gguf");
    ft_model::tiny::write_gguf(&tiny_model::<B>(&tiny_config(), 9), &tiny_config(), &model)
        .expect("write the model");
    tiny_adapter(2)
        .write(&dir.join("a"))
        .expect("write the adapter");
    let pretrained = Pretrained::<B>::load(&model, None, &Default::default()).expect("load");
    let detokenizer = pretrained.tokenizer.clone();
    let config = EngineConfig {
        block_size: 4,
        kv_blocks: 64,
        max_batch_tokens: 32,
        ..Default::default()
    };
    let mut engine = Engine::new(
        pretrained.model,
        Box::new(move |ids: &[u32]| detokenizer.decode(ids).unwrap_or_default()),
        config,
    );
    engine
        .register_adapter("a", dir.join("a"))
        .expect("register the adapter");
    let config = ServerConfig {
        model_id: "tiny".into(),
        allowed_adapter_dirs: vec![dir.to_path_buf()],
        // Deterministic requests go through the response cache's lookup, store and replay.
        cache: Some(CacheConfig {
            store: CacheStore::Memory { bytes: 1 << 20 },
            ttl: None,
            model: [0; 32],
        }),
        cascades: vec![cascade()],
        batches: Some(BatchConfig {
            state_dir: dir.join("state"),
            max_rows: 2,
            required: true,
        }),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").expect("a port");
    Background::start(
        engine,
        pretrained.tokenizer,
        pretrained.chat_template,
        config,
        listener,
    )
    .expect("start the server")
}

/// The cascade `c`: greedy on the base, whose answer is never kept, then a two-sample vote
/// of adapter `a`.
fn cascade() -> Cascade {
    let features: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
    let d = features.len();
    let never = Logistic {
        features,
        mean: vec![0.0; d],
        scale: vec![1.0; d],
        weights: vec![0.0; d],
        bias: 0.0,
    };
    let price = Price::PerToken {
        input: 1.0,
        output: 2.0,
    };
    let stage = |name: &str, model: &str, fields: Value, samples, accept| Stage {
        name: name.into(),
        target: cascade::Target::Local {
            model: model.into(),
        },
        context: "2+2=4\n\n".into(),
        fields: fields.as_object().cloned().unwrap_or_default(),
        samples,
        logprobs: Some(5),
        accept,
        price,
    };
    Cascade {
        name: "c".into(),
        stages: vec![
            stage(
                "base",
                "tiny",
                json!({"temperature": 0.0}),
                1,
                Some((never, 0.6)),
            ),
            stage("vote", "a", json!({"temperature": 0.7, "seed": 0}), 2, None),
        ],
    }
}

/// Requests as `PATH\nBODY`.
fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let adapter = dir.join("a").display().to_string();
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    ]);
    [
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0.7,
                   "top_p": 0.9, "top_k": 5, "logprobs": 2, "stop": ["\n"], "seed": 3, "n": 1}),
        ),
        (
            "/v1/completions",
            json!({"model": "a", "prompt": ["a b"], "max_tokens": 3, "stream": true,
                   "stream_options": {"include_usage": true}, "ignore_eos": true}),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 3, "use_beam_search": true,
                   "best_of": 2, "temperature": 0}),
        ),
        (
            "/v1/completions",
            json!({"model": "a", "prompt": [[5, 6, 7], "y"], "max_tokens": 0, "echo": true,
                   "logprobs": 1}),
        ),
        (
            "/v1/completions",
            json!({"model": "c", "prompt": "1+1=", "max_tokens": 3, "stop": ["\n"]}),
        ),
        (
            "/v1/completions",
            json!({"model": "c", "prompt": "3+3=", "max_completion_tokens": 2, "stream": true,
                   "stream_options": {"include_usage": true}, "logprobs": 1}),
        ),
        (
            "/v1/batches",
            json!({"input_file_id": "file-0", "endpoint": "/v1/completions",
                   "completion_window": "24h", "metadata": {"k": "v"}}),
        ),
        ("/v1/batches/batch_0/cancel", json!({})),
        ("/v1/files", json!({"purpose": "batch"})),
        (
            "/tokenize",
            json!({"prompt": "Hello", "add_special_tokens": false, "return_token_strs": true}),
        ),
        ("/detokenize", json!({"tokens": [5, 6, 7]})),
        (
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": messages, "max_completion_tokens": 4,
                   "temperature": 0, "logprobs": true, "top_logprobs": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "a", "messages": messages, "max_tokens": 2, "stream": true,
                   "stop": "x"}),
        ),
        (
            "/v1/load_lora_adapter",
            json!({"lora_name": "b", "lora_path": adapter}),
        ),
        ("/v1/unload_lora_adapter", json!({"lora_name": "b"})),
    ]
    .into_iter()
    .map(|(path, body)| format!("{path}\n{body}").into_bytes())
    .collect()
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let split = input
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(input.len());
    let (path, body) = (&input[..split], input.get(split + 1..).unwrap_or_default());
    let mut body = mutate_json_document(rng, body, 0.85);
    let mut out = path.to_vec();
    out.push(b'\n');
    out.append(&mut body);
    out
}

/// Whether `body` is an OpenAI error object with a message.
fn is_error_object(body: &str) -> bool {
    serde_json::from_str::<Value>(body)
        .is_ok_and(|v| v["error"]["message"].is_string() && v["error"]["type"].is_string())
}

fn run(agent: &ureq::Agent, url: &str, input: &[u8]) -> Outcome {
    let split = input
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(input.len());
    let path = String::from_utf8_lossy(&input[..split]);
    let body = input.get(split + 1..).unwrap_or_default();
    let request = agent
        .post(&format!("{url}{path}"))
        .set("Content-Type", "application/json");
    match request.send_bytes(body) {
        Ok(response) => {
            let text = response
                .into_string()
                .unwrap_or_else(|e| panic!("the response body broke off: {e}"));
            assert!(
                !text.is_empty(),
                "200 with an empty body for {}",
                String::from_utf8_lossy(input)
            );
            Outcome::Accepted
        }
        Err(ureq::Error::Status(status, response)) => {
            let text = response.into_string().unwrap_or_default();
            assert!(
                (400..500).contains(&status) || status == 503,
                "status {status} ({text})"
            );
            assert!(is_error_object(&text), "status {status} with {text}");
            Outcome::Rejected(text)
        }
        // A body over the server's limit is refused (413) as soon as its length is known,
        // and the connection closed: a client still sending it sees the close.
        Err(ureq::Error::Transport(t)) if body.len() > Limits::default().max_body_bytes => {
            Outcome::Rejected(t.to_string())
        }
        Err(e) => panic!("the request failed: {e}"),
    }
}

fn fuzz_http(default: u64) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let server = server(dir.path());
    let url = server.url().to_string();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let (inputs, seed) = budget(default);
    let report = fuzz(
        &Target {
            name: "http",
            seeds: seeds(dir.path()),
            mutate: &mutate,
            run: &|input| run(&agent, &url, input),
            heap_bound: &|n| 4 * n + (16 << 20),
        },
        inputs,
        seed,
    );
    let health = agent.get(&format!("{url}/health")).call();
    assert!(health.is_ok(), "the server stopped answering: {health:?}");
    server.stop().expect("the server stops");
    report.assert_clean();
}

#[test]
fn request_bodies_never_panic() {
    fuzz_http(QUICK);
}

#[test]
#[ignore = "the long run: 100,000 inputs"]
fn request_bodies_never_panic_long() {
    fuzz_http(LONG);
}
