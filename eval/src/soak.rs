//! The soak of `ft bench serve --soak`: streams send requests back to back for a fixed time,
//! some hanging up part way (cancellations) and some reading slowly, while the server's
//! resident memory and KV blocks are sampled; at the end, with the server idle, no block may
//! still be referenced.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{Client, ClientError, Pace};
use crate::load_bench::prompt;
use crate::tasks::SplitMix64;

/// What a soak sends, how its clients behave, and for how long.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    /// The server's base URL.
    pub url: String,
    /// Model names sent round-robin.
    pub models: Vec<String>,
    /// Concurrent streams.
    pub concurrency: usize,
    /// How long requests are sent.
    pub duration: Duration,
    /// Share of requests whose client hangs up part way through the stream.
    pub cancel_rate: f64,
    /// Share of requests whose client reads slowly.
    pub slow_rate: f64,
    /// A slow client's wait after each event.
    pub slow_delay: Duration,
    /// Prompt words (about one token each).
    pub prompt_len: usize,
    /// Tokens per request (end of sequence ignored).
    pub max_tokens: usize,
    /// Seeds the prompts and which requests cancel or go slowly.
    pub seed: u64,
    /// Bearer key.
    pub api_key: Option<String>,
    /// Per request.
    pub timeout: Duration,
    /// Between two samples of the server's memory and blocks.
    pub sample_every: Duration,
}

/// The server's state at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the soak began.
    pub at_s: f64,
    /// The server's resident memory.
    pub rss_bytes: f64,
    /// KV blocks referenced by requests.
    pub blocks_used: f64,
    /// Requests running and waiting.
    pub requests: f64,
}

/// What a soak saw.
#[derive(Debug, Clone, Default)]
pub struct SoakResult {
    /// Requests sent.
    pub sent: u64,
    /// Requests read to their end.
    pub completed: u64,
    /// Requests whose client hung up as planned.
    pub cancelled: u64,
    /// Of the completed, those read slowly.
    pub slow: u64,
    /// Output tokens of the completed requests.
    pub output_tokens: u64,
    /// Each failure that was not a planned hang-up.
    pub errors: Vec<String>,
    /// The server every `sample_every`, from the start.
    pub samples: Vec<Sample>,
    /// The server once every request has ended and it has gone idle (or the wait for that
    /// ran out).
    pub end: Sample,
    /// Whether the server went idle within the wait.
    pub idle: bool,
    /// Wall time.
    pub wall_s: f64,
}

/// The server's state now.
fn sample(client: &Client, start: Instant) -> Result<Sample, ClientError> {
    let m: BTreeMap<String, f64> = client.metrics()?;
    let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    Ok(Sample {
        at_s: start.elapsed().as_secs_f64(),
        rss_bytes: get("process_resident_memory_bytes"),
        blocks_used: get("ft_kv_blocks_used"),
        requests: get("ft_requests_running") + get("ft_requests_waiting"),
    })
}

/// A request's plan drawn from the soak's seed: hang up after some events, read slowly, or
/// read normally.
fn pace(spec: &SoakSpec, i: u64) -> Pace {
    let mut rng = SplitMix64(spec.seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut draw = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let (kind, at) = (draw(), draw());
    if kind < spec.cancel_rate {
        // Anywhere from before the first token to just before the last.
        Pace {
            hang_up_after: Some((at * spec.max_tokens as f64) as usize),
            ..Pace::default()
        }
    } else if kind < spec.cancel_rate + spec.slow_rate {
        Pace {
            delay: spec.slow_delay,
            ..Pace::default()
        }
    } else {
        Pace::default()
    }
}

/// Runs `spec`, then waits up to `idle_wait` for the server to go idle and samples it.
pub fn run(spec: &SoakSpec, idle_wait: Duration) -> SoakResult {
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let result = Mutex::new(SoakResult::default());
    let monitor = Client::new(&spec.url, spec.api_key.clone(), Duration::from_secs(30));
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match sample(&monitor, start) {
                    Ok(v) => {
                        if let Ok(mut r) = result.lock() {
                            r.samples.push(v);
                        }
                    }
                    Err(e) => {
                        if let Ok(mut r) = result.lock() {
                            r.errors.push(format!("/metrics: {e}"));
                        }
                    }
                }
                let until = Instant::now() + spec.sample_every;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        let workers: Vec<_> = (0..spec.concurrency.max(1))
            .map(|_| {
                s.spawn(|| {
                    let client = Client::new(&spec.url, spec.api_key.clone(), spec.timeout);
                    while start.elapsed() < spec.duration {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let pace = pace(spec, i);
                        let body = json!({
                            "model": spec.models[i as usize % spec.models.len()],
                            "prompt": prompt(spec.seed, i as usize, spec.prompt_len, 0),
                            "max_tokens": spec.max_tokens,
                            "ignore_eos": true,
                            "temperature": 0,
                        });
                        let outcome = client.stream_completion_paced(&body, pace);
                        let Ok(mut r) = result.lock() else { break };
                        r.sent += 1;
                        match outcome {
                            Ok(Some(streamed)) => {
                                r.completed += 1;
                                r.output_tokens += streamed.tokens as u64;
                                r.slow += u64::from(!pace.delay.is_zero());
                            }
                            Ok(None) => r.cancelled += 1,
                            Err(e) => r.errors.push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let mut r = result.into_inner().unwrap_or_default();
    // The server notices a hang-up at its next write: give it time to drop those requests.
    let deadline = Instant::now() + idle_wait;
    loop {
        match sample(&monitor, start) {
            Ok(v) => {
                r.end = v;
                if v.requests == 0.0 && v.blocks_used == 0.0 {
                    r.idle = true;
                    break;
                }
            }
            Err(e) => {
                r.errors.push(format!("/metrics at the end: {e}"));
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    r.wall_s = start.elapsed().as_secs_f64();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_follow_the_rates_and_the_seed() {
        let spec = SoakSpec {
            url: String::new(),
            models: vec!["m".into()],
            concurrency: 1,
            duration: Duration::ZERO,
            cancel_rate: 0.2,
            slow_rate: 0.1,
            slow_delay: Duration::from_millis(50),
            prompt_len: 8,
            max_tokens: 16,
            seed: 3,
            api_key: None,
            timeout: Duration::ZERO,
            sample_every: Duration::ZERO,
        };
        let paces: Vec<Pace> = (0..10_000).map(|i| pace(&spec, i)).collect();
        let cancelled = paces.iter().filter(|p| p.hang_up_after.is_some()).count();
        let slow = paces.iter().filter(|p| !p.delay.is_zero()).count();
        assert!((1800..2200).contains(&cancelled), "{cancelled}");
        assert!((800..1200).contains(&slow), "{slow}");
        assert!(paces
            .iter()
            .filter_map(|p| p.hang_up_after)
            .all(|n| n < spec.max_tokens));
        assert_eq!(pace(&spec, 17).hang_up_after, paces[17].hang_up_after);
    }
}
