//! The response cache of `ft serve`, in memory and in a real Redis: a repeated deterministic
//! request gets the same bytes back (a stream too), whatever changes the answer misses, and
//! a Redis that goes away costs misses, never errors.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ft_tests::{tiny, tiny_model, write_adapter, Server};
use serde_json::{json, Value};

/// What a client sees of one answer.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    /// The `x-ft-cache` header: `hit`, `miss`, `coalesced`, or absent when the cache was not
    /// asked.
    cache: Option<String>,
    body: String,
}

fn post(server: &Server, path: &str, body: &Value) -> Answer {
    let resp = match ureq::post(&format!("{}{path}", server.url))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {path}: {e}"),
    };
    Answer {
        status: resp.status(),
        cache: resp.header("x-ft-cache").map(String::from),
        body: resp.into_string().expect("body"),
    }
}

fn completion(model: &str, prompt: &str) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0})
}

/// A first answer that missed and an immediate repeat that hit with the same bytes.
fn miss_then_hit(server: &Server, body: &Value) -> String {
    let first = post(server, "/v1/completions", body);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.cache.as_deref(), Some("miss"), "{body}");
    let again = post(server, "/v1/completions", body);
    assert_eq!(again.cache.as_deref(), Some("hit"), "{body}");
    assert_eq!(again.body, first.body, "a hit is the same bytes");
    first.body
}

#[test]
fn repeated_deterministic_requests_are_answered_byte_for_byte_and_what_changes_the_answer_misses() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let allowed = dir.path().join("allowed");
    write_adapter(&allowed.join("v1"), 2, 32, 16, 1);
    write_adapter(&allowed.join("v2"), 2, 32, 16, 5);
    let server = Server::start(&[
        "--model",
        gguf.to_str().unwrap(),
        "--served-model-name",
        "base",
        "--allowed-adapter-dir",
        allowed.to_str().unwrap(),
        "--adapter",
        &format!("alpha={}", allowed.join("v1").display()),
    ]);

    let base = completion("base", "the river and the house");
    miss_then_hit(&server, &base);
    // Every field that changes the answer is in the key.
    let mut longer = base.clone();
    longer["max_tokens"] = json!(7);
    miss_then_hit(&server, &longer);
    let mut seeded = base.clone();
    seeded["temperature"] = json!(0.8);
    seeded["seed"] = json!(11);
    miss_then_hit(&server, &seeded);

    // A stream replays as the same events.
    let mut streamed = base.clone();
    streamed["stream"] = json!(true);
    let first = post(&server, "/v1/completions", &streamed);
    assert_eq!(first.cache.as_deref(), Some("miss"));
    assert!(first.body.contains("data: [DONE]"), "{}", first.body);
    let again = post(&server, "/v1/completions", &streamed);
    assert_eq!(again.cache.as_deref(), Some("hit"));
    assert_eq!(again.body, first.body);

    // A draw the request does not fix is never cached.
    let drawn =
        json!({"model": "base", "prompt": "the river", "max_tokens": 6, "temperature": 1.0});
    for _ in 0..2 {
        assert_eq!(post(&server, "/v1/completions", &drawn).cache, None);
    }

    // The adapter's files are in the key: another version under the same name misses, and
    // the first version's files back again hit what they answered before.
    let with_adapter = completion("alpha", "the river and the house");
    let v1 = miss_then_hit(&server, &with_adapter);
    let swap = |version: &str| {
        let (status, answer) =
            server.post("/v1/unload_lora_adapter", &json!({"lora_name": "alpha"}));
        assert_eq!(status, 200, "{answer}");
        let path = allowed.join(version);
        let (status, answer) = server.post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": "alpha", "lora_path": path}),
        );
        assert_eq!(status, 200, "{answer}");
    };
    swap("v2");
    let v2 = post(&server, "/v1/completions", &with_adapter);
    assert_eq!(v2.cache.as_deref(), Some("miss"), "a new adapter version");
    swap("v1");
    let back = post(&server, "/v1/completions", &with_adapter);
    assert_eq!(back.cache.as_deref(), Some("hit"));
    assert_eq!(back.body, v1);

    assert!(server.metric("ft_response_cache_hits_total") >= 6.0);
    assert!(server.metric("ft_response_cache_misses_total") >= 6.0);
    assert_eq!(server.metric("ft_response_cache_errors_total"), 0.0);
    assert!(server.metric("ft_response_cache_bytes") > 0.0);
    assert!(server.metric("ft_response_cache_hit_seconds_count") >= 6.0);

    // --no-cache: every answer from the model.
    drop(server);
    let plain = Server::start(&[
        "--model",
        gguf.to_str().unwrap(),
        "--served-model-name",
        "base",
        "--no-cache",
    ]);
    for _ in 0..2 {
        let a = post(&plain, "/v1/completions", &base);
        assert_eq!((a.status, a.cache), (200, None));
    }
}

#[test]
fn identical_requests_in_flight_are_answered_once() {
    // The default model, so that the first answer takes long enough for the others to arrive.
    let server = Server::start(&["--served-model-name", "base"]);
    let body = json!({"model": "base", "prompt": "Once upon a time", "max_tokens": 24,
                      "temperature": 0, "ignore_eos": true});
    let start = std::sync::Barrier::new(6);
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    post(&server, "/v1/completions", &body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let misses = answers
        .iter()
        .filter(|a| a.cache.as_deref() == Some("miss"))
        .count();
    assert_eq!(misses, 1, "{answers:?}");
    assert!(answers
        .iter()
        .all(|a| a.status == 200 && a.body == answers[0].body));
    assert!(server.metric("ft_response_cache_coalesced_total") >= 1.0);
    assert_eq!(server.metric("ft_response_cache_misses_total"), 1.0);
    // The engine counts a request's last token as it retires it, which can be just after the
    // answer went out: wait for the count to reach one generation, then check it stays there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.metric("ft_generation_tokens_total") < 24.0 && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        server.metric("ft_generation_tokens_total"),
        24.0,
        "one generation"
    );
}

/// A `redis-server` on a free port, shut down when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: Option<u16>, dir: &Path) -> Self {
        let port = port.unwrap_or_else(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "redis-server: {e}; these tests need a real Redis: install Debian's \
                     redis-server package (.ci/run does)"
                )
            });
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis-server did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_redis_cache_is_shared_by_servers_and_its_loss_degrades_to_misses() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let redis = Redis::start(None, dir.path());
    let url = redis.url();
    let args = [
        "--model",
        gguf.to_str().unwrap(),
        "--served-model-name",
        "base",
        "--cache",
        &url,
    ];
    let server = Server::start(&args);
    let body = completion("base", "the green light of the morning");
    let first = miss_then_hit(&server, &body);

    // A second server over the same weights finds the first one's answer.
    let other = Server::start(&args);
    let shared = post(&other, "/v1/completions", &body);
    assert_eq!(shared.cache.as_deref(), Some("hit"));
    assert_eq!(shared.body, first);
    drop(other);

    // Redis goes away: answers still come, from the model.
    let port = redis.port;
    drop(redis);
    for prompt in ["the green light of the morning", "a new question"] {
        let a = post(&server, "/v1/completions", &completion("base", prompt));
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.cache.as_deref(), Some("miss"));
    }
    assert!(server.metric("ft_response_cache_errors_total") >= 2.0);

    // And back: the server reconnects and caches again.
    let _redis = Redis::start(Some(port), dir.path());
    let again = completion("base", "once more, with Redis back");
    let start = Instant::now();
    loop {
        let a = post(&server, "/v1/completions", &again);
        assert_eq!(a.status, 200, "{}", a.body);
        if a.cache.as_deref() == Some("hit") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no hit after Redis came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A Redis that is not there at the start is an error that names it.
    drop(server);
    let refused = ft_tests::ft(&[
        "serve",
        "--port",
        "0",
        "--model",
        gguf.to_str().unwrap(),
        "--cache",
        "redis://127.0.0.1:1",
    ]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("redis://127.0.0.1:1"),
        "{}",
        refused.stderr
    );
    let usage = ft_tests::ft(&[
        "serve",
        "--model",
        gguf.to_str().unwrap(),
        "--cache",
        "memcached://x",
    ]);
    usage.fails_with(2, &["--cache", "redis://"]);
}

#[test]
fn bench_cache_tabulates_each_store_against_no_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_model(dir.path(), &tiny());
    let redis = Redis::start(None, dir.path());
    let model = gguf.to_str().unwrap();
    let run = ft_tests::ft(&[
        "bench",
        "cache",
        "--model",
        model,
        "--redis",
        &redis.url(),
        "--requests",
        "8",
        "--concurrency",
        "1",
        "--max-tokens",
        "4",
        "--prompt-len",
        "8",
        "--seed",
        "3",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .filter(|l| {
            l.starts_with("| none") || l.starts_with("| memory") || l.starts_with("| redis")
        })
        .map(|l| l.split('|').map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 3, "{}", run.stdout);
    // | cache | streams | requests | hits | ...: half of 8 requests repeat an earlier one, and
    // one stream finds each in the cache.
    for (row, hits) in rows.iter().zip(["0", "4", "4"]) {
        assert_eq!((row[3], row[4]), ("8", hits), "{row:?}");
    }
    ft_tests::ft(&["bench", "cache", "--model", model, "--repeat", "2"])
        .fails_with(2, &["--repeat"]);
}
