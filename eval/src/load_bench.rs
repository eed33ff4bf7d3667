//! A load generator for any OpenAI-compatible server (ours, llama.cpp's, vLLM): N streams
//! send streamed completions back to back and time each token's arrival, for throughput,
//! time to first token (TTFT) and time per output token (TPOT) percentiles. A share of the
//! requests can repeat earlier ones, to measure a response cache.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::client::{Client, ClientError};

/// One measurement: how many streams, how many requests, what they ask for.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The server's base URL.
    pub url: String,
    /// Model names sent round-robin.
    pub models: Vec<String>,
    /// Concurrent streams.
    pub concurrency: usize,
    /// Requests in all.
    pub requests: usize,
    /// Prompt words (about one token each).
    pub prompt_len: usize,
    /// Leading words shared by every prompt.
    pub shared_prefix: usize,
    /// Seeds the words particular to each prompt: measurements with different seeds share
    /// no prompt, so a server's prefix cache cannot carry one over to the next.
    pub seed: u64,
    /// Tokens per request (end of sequence ignored).
    pub max_tokens: usize,
    /// Bearer key.
    pub api_key: Option<String>,
    /// Per request.
    pub timeout: Duration,
    /// The share of requests (0 to 1) that repeat an earlier request of the same measurement.
    pub repeat: f64,
}

/// What one measurement saw.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Concurrent streams.
    pub concurrency: usize,
    /// Requests that completed.
    pub completed: usize,
    /// The message of each request that failed.
    pub errors: Vec<String>,
    /// Wall time of the whole measurement.
    pub wall_s: f64,
    /// Output tokens of the completed requests.
    pub output_tokens: usize,
    /// Seconds to the first token, per completed request.
    pub ttft: Vec<f64>,
    /// Seconds per output token after the first, per request with two or more.
    pub tpot: Vec<f64>,
    /// Seconds end to end, per completed request.
    pub latency: Vec<f64>,
    /// Seconds end to end of the requests the server's response cache answered at once.
    pub hit_latency: Vec<f64>,
    /// Requests the response cache answered after waiting for the same request in flight.
    pub coalesced: usize,
}

impl LoadResult {
    /// Completed requests per second.
    pub fn requests_per_s(&self) -> f64 {
        self.completed as f64 / self.wall_s.max(1e-9)
    }

    /// Output tokens per second over all streams.
    pub fn tokens_per_s(&self) -> f64 {
        self.output_tokens as f64 / self.wall_s.max(1e-9)
    }
}

/// The `p`-th percentile (0..=100) by nearest rank; 0 for no values.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

const WORDS: [&str; 64] = [
    "the", "river", "house", "green", "light", "story", "water", "music", "table", "garden",
    "winter", "summer", "mountain", "city", "people", "school", "morning", "evening", "paper",
    "window", "friend", "family", "market", "village", "forest", "ocean", "bridge", "road",
    "letter", "picture", "animal", "country", "history", "language", "number", "question",
    "answer", "reason", "problem", "idea", "power", "money", "world", "night", "day", "year",
    "time", "life", "hand", "part", "child", "eye", "woman", "man", "place", "week", "case",
    "point", "work", "home", "room", "fact", "book", "word",
];

/// Prompt `i` of `seed`: `shared` words common to all prompts, then words particular to
/// `(seed, i)`, `len` words in all.
pub fn prompt(seed: u64, i: usize, len: usize, shared: usize) -> String {
    let mut state = 0x9E37_79B9_7F4A_7C15u64
        ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ seed.wrapping_mul(0xA24B_AED4_963E_E407);
    let mut out = Vec::with_capacity(len);
    for w in 0..len {
        let index = if w < shared {
            (w * 7 + 3) % WORDS.len()
        } else {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % WORDS.len() as u64) as usize
        };
        out.push(WORDS[index]);
    }
    out.join(" ")
}

/// The request that request `i` sends: itself, or, for a `repeat` share of the requests
/// spread evenly (exactly the first `n * repeat` of any `n`, rounded down), an earlier
/// request's drawn from `seed` (followed back to one that is not a repeat).
pub fn original(seed: u64, i: usize, repeat: f64) -> usize {
    let repeats = |n: usize| (n as f64 * repeat).floor() as usize;
    let mut i = i;
    while i > 0 && repeats(i + 1) > repeats(i) {
        let mut h = (i as u64 ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^= h >> 31;
        h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 29;
        i = (h % i as u64) as usize;
    }
    i
}

/// One streamed request's timings.
struct Timed {
    ttft: f64,
    tpot: Option<f64>,
    latency: f64,
    tokens: usize,
    cache: Option<String>,
}

fn one(client: &Client, body: &Value) -> Result<Timed, ClientError> {
    let s = client.stream_completion(body)?;
    if s.tokens == 0 {
        return Err(ClientError::Failed("the stream carried no token".into()));
    }
    Ok(Timed {
        ttft: s.ttft,
        tpot: s.tpot,
        latency: s.latency,
        tokens: s.tokens,
        cache: s.cache,
    })
}

/// Runs `spec`: `concurrency` streams take requests until `requests` are done.
pub fn run(spec: &LoadSpec) -> LoadResult {
    let bodies: Vec<Value> = (0..spec.requests)
        .map(|i| {
            let i = original(spec.seed, i, spec.repeat);
            json!({
                "model": spec.models[i % spec.models.len()],
                "prompt": prompt(spec.seed, i, spec.prompt_len, spec.shared_prefix),
                "max_tokens": spec.max_tokens,
                "temperature": 0.0,
                "ignore_eos": true,
            })
        })
        .collect();
    let client = Client::new(&spec.url, spec.api_key.clone(), spec.timeout);
    run_bodies(&client, &bodies, spec.concurrency)
}

/// Streams `bodies` (completion requests) to `client`'s server, `concurrency` at a time.
pub fn run_bodies(client: &Client, bodies: &[Value], concurrency: usize) -> LoadResult {
    let next = AtomicUsize::new(0);
    let result = Mutex::new(LoadResult {
        concurrency,
        ..Default::default()
    });
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| {
                let client = client.clone();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else {
                        break;
                    };
                    let outcome = one(&client, body);
                    let Ok(mut r) = result.lock() else { break };
                    match outcome {
                        Ok(t) => {
                            r.completed += 1;
                            r.output_tokens += t.tokens;
                            r.ttft.push(t.ttft);
                            r.tpot.extend(t.tpot);
                            r.latency.push(t.latency);
                            match t.cache.as_deref() {
                                Some("hit") => r.hit_latency.push(t.latency),
                                Some("coalesced") => r.coalesced += 1,
                                _ => {}
                            }
                        }
                        Err(e) => r.errors.push(e.to_string()),
                    }
                }
            });
        }
    });
    let mut r = result.into_inner().unwrap_or_default();
    r.wall_s = start.elapsed().as_secs_f64();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_asked_share_of_requests_repeat_an_earlier_one() {
        let n = 4000;
        let repeats = (0..n).filter(|&i| original(7, i, 0.5) != i).count();
        assert_eq!(repeats, n / 2);
        let a_third = (0..n).filter(|&i| original(7, i, 0.3) != i).count();
        assert_eq!(a_third, 1200);
        for i in 0..n {
            let o = original(7, i, 0.5);
            assert!(o <= i);
            assert_eq!(original(7, o, 0.5), o, "an original is not itself a repeat");
        }
        assert!((0..n).all(|i| original(7, i, 0.0) == i));
    }

    #[test]
    fn prompts_share_exactly_their_prefix() {
        let (a, b) = (prompt(0, 1, 40, 30), prompt(0, 2, 40, 30));
        let (wa, wb): (Vec<_>, Vec<_>) = (a.split(' ').collect(), b.split(' ').collect());
        assert_eq!(wa.len(), 40);
        assert_eq!(wa[..30], wb[..30]);
        assert_ne!(wa[30..], wb[30..]);
        assert_eq!(prompt(0, 1, 40, 30), a, "deterministic");
        let other: Vec<_> = prompt(1, 1, 40, 30).split(' ').map(String::from).collect();
        assert_eq!(
            other[..30],
            wa[..30],
            "another seed keeps the shared prefix"
        );
        assert_ne!(other[30..], wa[30..], "and changes the rest");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
