//! `ft bench cache`: one workload in which a share of the requests repeat earlier ones, sent
//! to the same model served with no response cache, with the in-memory cache and with a
//! Redis one; requests/s against no cache in the same run, and how fast hits come back
//! (a repeat that arrives while its first is still answered waits for it: "coalesced").

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context;
use ft_eval::load_bench::{self, percentile, LoadSpec};
use ft_model::QuantBackend;
use ft_serve::response_cache::{CacheConfig, CacheStore};
use ft_serve::server::{Background, ServerConfig};
use ft_serve::{Engine, EngineConfig};

use crate::args::BenchCacheArgs;
use crate::commands::report::record;
use crate::commands::serve::model_fingerprint;
use crate::device::{dispatch, Job};
use crate::error::UsageError;

/// The name the model is served under.
const MODEL_ID: &str = "bench";

/// Runs `ft bench cache`.
pub fn run(args: BenchCacheArgs) -> anyhow::Result<()> {
    dispatch(args.base.device, args)
}

impl Job for BenchCacheArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.repeat) {
            return Err(
                UsageError(format!("--repeat {}: must be from 0 to 1", self.repeat)).into(),
            );
        }
        if self.concurrency.contains(&0) {
            return Err(UsageError("--concurrency: every value must be at least 1".into()).into());
        }
        if let Some(url) = self.redis.as_deref().filter(|u| !u.starts_with("redis://")) {
            return Err(UsageError(format!(
                "--redis {}: expected redis://HOST:PORT",
                crate::error::hide_credentials(url)
            ))
            .into());
        }
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        let mut stores = vec![
            ("none".to_string(), None),
            (
                "memory".to_string(),
                Some(CacheStore::Memory { bytes: 256 << 20 }),
            ),
        ];
        if let Some(url) = &self.redis {
            stores.push(("redis".into(), Some(CacheStore::Redis { url: url.clone() })));
        }
        let mut table = String::from(
            "| cache | streams | requests | hits | coalesced | req/s (median) | vs no cache (median) | latency p50 ms | hit p50 ms | hit p99 ms |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for (row, &concurrency) in self.concurrency.iter().enumerate() {
            // Each run measures every store in turn on prompts of its own, so that noise on
            // a shared machine falls on all of them and a Redis keeps nothing for the next.
            let mut results: Vec<Vec<load_bench::LoadResult>> = vec![Vec::new(); stores.len()];
            for run in 0..self.runs {
                for ((name, store), kept) in stores.iter().zip(&mut results) {
                    let spec = LoadSpec {
                        url: String::new(),
                        models: vec![MODEL_ID.into()],
                        concurrency,
                        requests: self.requests as usize,
                        prompt_len: self.prompt_len,
                        shared_prefix: 0,
                        seed: seed.wrapping_add((row as u64) << 16 | run),
                        max_tokens: self.max_tokens as usize,
                        api_key: None,
                        timeout: Duration::from_secs(600),
                        repeat: self.repeat,
                    };
                    let r = self.measure::<B>(&device, store.clone(), spec)?;
                    for e in r.errors.iter().take(3) {
                        eprintln!("ft bench cache: {name}, {concurrency} streams: {e}");
                    }
                    kept.push(r);
                }
            }
            let plain: Vec<f64> = results[0].iter().map(|r| r.requests_per_s()).collect();
            for ((name, _), runs) in stores.iter().zip(&results) {
                let rates: Vec<f64> = runs.iter().map(|r| r.requests_per_s()).collect();
                let ratios: Vec<f64> = rates
                    .iter()
                    .zip(&plain)
                    .map(|(r, p)| r / p.max(1e-9))
                    .collect();
                let all = |f: fn(&load_bench::LoadResult) -> &Vec<f64>| -> Vec<f64> {
                    runs.iter().flat_map(|r| f(r).iter().copied()).collect()
                };
                let (latency, hit) = (all(|r| &r.latency), all(|r| &r.hit_latency));
                let ms = |v: &[f64], p| percentile(v, p) * 1e3;
                let hits = |p| {
                    if hit.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{:.2}", ms(&hit, p))
                    }
                };
                table.push_str(&format!(
                    "| {name} | {concurrency} | {} | {} | {} | {:.2} | {:.2}x | {:.0} | {} | {} |\n",
                    runs.iter().map(|r| r.completed).sum::<usize>(),
                    hit.len(),
                    runs.iter().map(|r| r.coalesced).sum::<usize>(),
                    percentile(&rates, 50.0),
                    percentile(&ratios, 50.0),
                    ms(&latency, 50.0),
                    hits(50.0),
                    hits(99.0),
                ));
            }
        }
        print!("{table}");
        println!(
            "\nmodel {}, {} runs of {} requests a row, {:.0}% repeating an earlier one, prompts of {} words (seed {seed}), {} tokens each, greedy, streamed",
            self.base.model,
            self.runs,
            self.requests,
            self.repeat * 100.0,
            self.prompt_len,
            self.max_tokens
        );
        if let Some(file) = &self.record {
            record(file, "`ft bench cache`", &table)
                .with_context(|| format!("--record {}", file.display()))?;
        }
        Ok(())
    }
}

impl BenchCacheArgs {
    /// Serves the model with `store` (none: no cache) and runs `spec` against it.
    fn measure<B: QuantBackend>(
        &self,
        device: &B::Device,
        store: Option<CacheStore>,
        mut spec: LoadSpec,
    ) -> anyhow::Result<load_bench::LoadResult> {
        let pretrained = self.base.load::<B>(device)?;
        let cache = match store {
            Some(store) => Some(CacheConfig {
                store,
                ttl: None,
                model: model_fingerprint(&self.base, &pretrained.path, &format!("{device:?}"))?,
            }),
            None => None,
        };
        let tokenizer = pretrained.tokenizer.clone();
        let detokenizer = pretrained.tokenizer.clone();
        // As `ft serve` is configured by default.
        let engine = Engine::new(
            pretrained.model,
            Box::new(move |ids: &[u32]| detokenizer.decode(ids).unwrap_or_default()),
            EngineConfig {
                kv_blocks: 1024,
                max_batch_tokens: 512,
                max_running: 64,
                ..EngineConfig::default()
            },
        );
        let config = ServerConfig {
            model_id: MODEL_ID.into(),
            cache,
            ..ServerConfig::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = Background::start(
            engine,
            tokenizer,
            pretrained.chat_template,
            config,
            listener,
        )?;
        spec.url = server.url().to_string();
        let result = load_bench::run(&spec);
        server.stop().context("the server")?;
        Ok(result)
    }
}
