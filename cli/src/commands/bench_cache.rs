//! `ft bench cache`: one workload in which a share of the requests repeat earlier ones, sent
//! to the same model served with no response cache, with the in-memory cache and with a
//! Redis one; requests/s against no cache in the same run, and how fast hits come back.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context;
use ft_eval::load_bench::{self, percentile, LoadSpec};
use ft_model::QuantBackend;
use ft_serve::response_cache::{file_fingerprint, CacheConfig, CacheStore};
use ft_serve::server::{Background, ServerConfig};
use ft_serve::{Engine, EngineConfig};

use crate::args::BenchCacheArgs;
use crate::commands::report::record;
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
            "| cache | streams | requests | hits | req/s | vs no cache | latency p50 ms | hit p50 ms | hit p99 ms |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for (row, &concurrency) in self.concurrency.iter().enumerate() {
            let mut plain = None;
            for (name, store) in &stores {
                let spec = LoadSpec {
                    url: String::new(),
                    models: vec![MODEL_ID.into()],
                    concurrency,
                    requests: self.requests as usize,
                    prompt_len: self.prompt_len,
                    shared_prefix: 0,
                    seed: seed.wrapping_add(row as u64),
                    max_tokens: self.max_tokens as usize,
                    api_key: None,
                    timeout: Duration::from_secs(600),
                    repeat: self.repeat,
                };
                let r = self.measure::<B>(&device, store.clone(), spec)?;
                for e in r.errors.iter().take(3) {
                    eprintln!("ft bench cache: {name}, {concurrency} streams: {e}");
                }
                let rate = r.requests_per_s();
                let against = *plain.get_or_insert(rate);
                let ms = |v: &[f64], p| percentile(v, p) * 1e3;
                let hits = |v: &[f64], p| {
                    if v.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{:.2}", ms(v, p))
                    }
                };
                table.push_str(&format!(
                    "| {name} | {concurrency} | {} | {} | {rate:.2} | {:.2}x | {:.0} | {} | {} |\n",
                    r.completed,
                    r.hit_latency.len(),
                    rate / against.max(1e-9),
                    ms(&r.latency, 50.0),
                    hits(&r.hit_latency, 50.0),
                    hits(&r.hit_latency, 99.0),
                ));
            }
        }
        print!("{table}");
        println!(
            "\nmodel {}, {} requests a row, {:.0}% repeating an earlier one, prompts of {} words (seed {seed}), {} tokens each, greedy, streamed",
            self.base.model,
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
                model: file_fingerprint(&pretrained.path, &format!("{:?}", self.base.quant()))
                    .with_context(|| format!("--model {}", pretrained.path.display()))?,
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
