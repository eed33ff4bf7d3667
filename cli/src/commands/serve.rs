//! `ft serve`: the OpenAI-compatible server over one base model and its adapters, and
//! `ft bench serve`: the load generator that measures any such server.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ft_adapters::Registry;
use ft_eval::client::Client;
use ft_eval::load_bench::{self, percentile, LoadSpec};
use ft_eval::soak::SoakSpec;
use ft_model::QuantBackend;
use ft_serve::response_cache::{file_fingerprint, CacheConfig, CacheStore};
use ft_serve::server::{self, BatchConfig, Limits, ServerConfig};
use ft_serve::{Engine, EngineConfig};

use crate::args::{BaseModelArgs, BenchServeArgs, ServeArgs};
use crate::commands::cascade::{served, ServeContext};
use crate::commands::report::record;
use crate::device::{dispatch, Job};
use crate::error::UsageError;

/// Runs `ft serve`.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    dispatch(args.base.device, args)
}

/// `NAME=PATH` of `--adapter`.
pub(crate) fn parse_adapter(spec: &str) -> anyhow::Result<(String, PathBuf)> {
    let (name, path) = spec
        .split_once('=')
        .ok_or_else(|| UsageError(format!("--adapter {spec:?}: expected NAME=PATH")))?;
    ft_adapters::registry::validate_name(name)
        .map_err(|e| UsageError(format!("--adapter {spec:?}: {e}")))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

impl Job for ServeArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let adapters: Vec<(String, PathBuf)> = self
            .models
            .adapters
            .iter()
            .map(|a| parse_adapter(a))
            .collect::<anyhow::Result<_>>()?;
        let pretrained = self.base.load::<B>(&device)?;
        let per_token = ft_serve::runner::Runner::bytes_per_token(&pretrained.model);
        let tokens = match self.kv_cache_bytes {
            Some(bytes) => bytes as usize / per_token,
            None => self.kv_cache_tokens,
        };
        let block_size = self.block_size as usize;
        if let Some(total) = total_memory_bytes() {
            let need = tokens.saturating_mul(per_token);
            if need > total {
                return Err(UsageError(format!(
                    "--kv-cache-tokens/--kv-cache-bytes: {tokens} tokens need {:.1} GiB of KV \
                     cache, more than this machine's {:.1} GiB of memory",
                    need as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64
                ))
                .into());
            }
        }
        let kv_blocks = tokens / block_size;
        if kv_blocks == 0 {
            return Err(UsageError(format!(
                "--kv-cache-tokens/--kv-cache-bytes: {tokens} tokens do not fill one block of {block_size}"
            ))
            .into());
        }
        let config = EngineConfig {
            block_size,
            kv_blocks,
            max_batch_tokens: self.max_batch_tokens as usize,
            max_running: self.max_running as usize,
            max_waiting: self.max_queue,
            prefix_cache: !self.no_prefix_cache,
            max_adapters: self.max_adapters as usize,
            batch_step_tokens: self.batch_step_tokens as usize,
        };
        let cache = self.response_cache(&pretrained.path, &format!("{device:?}"))?;
        let tokenizer = pretrained.tokenizer.clone();
        let detokenizer = pretrained.tokenizer.clone();
        let mut engine = Engine::new(
            pretrained.model,
            Box::new(move |ids: &[u32]| detokenizer.decode(ids).unwrap_or_default()),
            config,
        );
        register_adapters(&mut engine, self.models.registry.as_deref(), adapters)?;
        let model_id = self
            .models
            .served_model_name
            .clone()
            .unwrap_or(self.base.model.clone());
        let mut cascades = Vec::new();
        for spec in &self.cascades {
            let ctx = ServeContext {
                base: &self.base,
                model_id: &model_id,
                registry: self.models.registry.as_deref(),
                price_per_hour: self.price_per_hour,
            };
            let (cascade, stage_adapters) = served(spec, &ctx)?;
            let taken = engine.adapters().names();
            if taken.contains(&cascade.name)
                || cascades
                    .iter()
                    .any(|c: &ft_serve::cascade::Cascade| c.name == cascade.name)
            {
                return Err(UsageError(format!(
                    "--cascade {spec}: {:?} already names an adapter or a cascade",
                    cascade.name
                ))
                .into());
            }
            for (name, dir) in stage_adapters {
                engine
                    .register_adapter(&name, dir.clone())
                    .with_context(|| {
                        format!("--cascade {spec}: adapter {name}={}", dir.display())
                    })?;
            }
            cascades.push(cascade);
        }
        let names = engine.adapters().names();
        let cascade_names: Vec<&str> = cascades.iter().map(|c| c.name.as_str()).collect();
        let listener = TcpListener::bind((self.host.as_str(), self.port))
            .with_context(|| format!("--host {} --port {}", self.host, self.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "ft serve: listening on http://{addr} (model {model_id:?}, adapters {names:?}, cascades {cascade_names:?}, KV cache {} tokens in blocks of {block_size})",
            kv_blocks * block_size
        );
        let config = ServerConfig {
            model_id,
            api_key: self.api_key.clone(),
            allowed_adapter_dirs: self.allowed_adapter_dirs.clone(),
            registry: self.models.registry.clone(),
            limits: Limits {
                max_connections: self.max_connections as usize,
                header_timeout: Duration::from_secs(self.header_timeout),
                body_timeout: Duration::from_secs(self.body_timeout),
                ..Limits::default()
            },
            cache,
            cascades,
            batches: self.batch_config(),
        };
        server::serve(
            engine,
            tokenizer,
            pretrained.chat_template,
            config,
            listener,
        )?;
        Ok(())
    }
}

/// Registers with `engine` every adapter of `registry` under its name (its newest version),
/// then `adapters` (`--adapter NAME=PATH`).
pub(crate) fn register_adapters<B: QuantBackend>(
    engine: &mut Engine<B>,
    registry: Option<&std::path::Path>,
    adapters: Vec<(String, PathBuf)>,
) -> anyhow::Result<()> {
    if let Some(root) = registry {
        let reg = Registry::open(root).with_context(|| format!("--registry {}", root.display()))?;
        // Each name at its latest version.
        let mut latest: std::collections::BTreeMap<String, u32> = Default::default();
        for r in reg.list()? {
            let v = latest.entry(r.name).or_default();
            *v = (*v).max(r.version);
        }
        for (name, version) in latest {
            let reference = format!("{name}:{version}");
            let dir = server::registry_adapter(root, &reference)
                .map_err(|e| anyhow::anyhow!("--registry {}: {e}", root.display()))?;
            engine
                .register_adapter(&name, dir)
                .with_context(|| format!("--registry {}: adapter {reference}", root.display()))?;
        }
    }
    for (name, dir) in adapters {
        engine
            .register_adapter(&name, dir.clone())
            .with_context(|| format!("--adapter {name}={}", dir.display()))?;
    }
    Ok(())
}

impl ServeArgs {
    /// The Batch API's state folder and rows; without `--state-dir`, none when the default
    /// folder cannot be made (a read-only home), with a warning, and the server goes without
    /// one when another server holds it.
    fn batch_config(&self) -> Option<BatchConfig> {
        let max_rows = self.batch_max_rows.unwrap_or(self.max_running) as usize;
        let state_dir = match &self.state_dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = ft_model::source::ft_home().join("serve");
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    tracing::warn!(dir = %dir.display(), error = %e, "no Batch API: its state folder cannot be made (--state-dir names another)");
                    return None;
                }
                dir
            }
        };
        Some(BatchConfig {
            state_dir,
            max_rows,
            // The default folder may be another server's: then this one has no Batch API.
            required: self.state_dir.is_some(),
        })
    }

    /// The response cache the flags ask for, keyed by the sha256 of the model at `path` and
    /// how it is served (storage and `device`).
    fn response_cache(
        &self,
        path: &std::path::Path,
        device: &str,
    ) -> anyhow::Result<Option<CacheConfig>> {
        if self.no_cache {
            return Ok(None);
        }
        let store = match &self.cache {
            Some(url) if url.starts_with("redis://") || url.starts_with("redis+unix://") => {
                CacheStore::Redis { url: url.clone() }
            }
            Some(url) => {
                return Err(UsageError(format!(
                    "--cache {}: expected redis://HOST:PORT[/DB]",
                    crate::error::hide_credentials(url)
                ))
                .into())
            }
            None => CacheStore::Memory {
                bytes: self.cache_bytes,
            },
        };
        let model = model_fingerprint(&self.base, path, device)?;
        Ok(Some(CacheConfig {
            store,
            ttl: (self.cache_ttl > 0).then(|| Duration::from_secs(self.cache_ttl)),
            model,
        }))
    }
}

/// The response cache's key for the model at `path` served as `base` asks on `device`: the
/// sha256 of its files and of its storage flags.
pub(crate) fn model_fingerprint(
    base: &BaseModelArgs,
    path: &std::path::Path,
    device: &str,
) -> anyhow::Result<[u8; 32]> {
    let serving = format!(
        "weights {:?} quant {:?} double-quant {} device {device}",
        base.weights, base.quant, base.double_quant
    );
    file_fingerprint(path, &serving)
        .with_context(|| format!("--model {}: reading it for the cache key", path.display()))
}

/// Runs `ft bench serve`: one row per concurrency.
pub fn bench(args: BenchServeArgs) -> anyhow::Result<()> {
    let url = args.url.trim_end_matches('/').to_string();
    if args.concurrency.contains(&0) {
        return Err(UsageError("--concurrency: every value must be at least 1".into()).into());
    }
    if args.shared_prefix > args.prompt_len {
        return Err(UsageError(format!(
            "--shared-prefix {} is longer than --prompt-len {}",
            args.shared_prefix, args.prompt_len
        ))
        .into());
    }
    let models = if args.adapters.is_empty() {
        let client = Client::new(&url, args.api_key.clone(), Duration::from_secs(30));
        let models = client
            .models()
            .map_err(|e| anyhow::anyhow!("--url {url}: {e}"))?;
        models.into_iter().take(1).collect()
    } else {
        args.adapters.clone()
    };
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| crate::error::hide_credentials(&url));
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    if let Some(seconds) = args.soak {
        return soak(&args, url, models, seed, seconds);
    }
    let mut table = String::from(
        "| server | streams | requests | errors | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | latency p50 s | latency p99 s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (row, &concurrency) in args.concurrency.iter().enumerate() {
        let spec = LoadSpec {
            url: url.clone(),
            models: models.clone(),
            concurrency,
            requests: args.requests as usize,
            prompt_len: args.prompt_len,
            shared_prefix: args.shared_prefix,
            seed: seed.wrapping_add(row as u64),
            max_tokens: args.max_tokens as usize,
            api_key: args.api_key.clone(),
            timeout: Duration::from_secs(args.timeout),
            repeat: 0.0,
        };
        let r = load_bench::run(&spec);
        let ms = |v: &[f64], p| percentile(v, p) * 1e3;
        table.push_str(&format!(
            "| {label} | {concurrency} | {} | {} | {:.2} | {:.1} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} | {:.2} |\n",
            r.completed,
            r.errors.len(),
            r.requests_per_s(),
            r.tokens_per_s(),
            ms(&r.ttft, 50.0),
            ms(&r.ttft, 99.0),
            ms(&r.tpot, 50.0),
            ms(&r.tpot, 99.0),
            percentile(&r.latency, 50.0),
            percentile(&r.latency, 99.0),
        ));
        for e in r.errors.iter().take(3) {
            eprintln!("ft bench serve: {concurrency} streams: {e}");
        }
    }
    print!("{table}");
    println!(
        "\nmodels {models:?}, prompts of {} words ({} shared, seed {seed}), {} tokens each",
        args.prompt_len, args.shared_prefix, args.max_tokens
    );
    if let Some(file) = &args.record {
        record(file, "`ft bench serve`", &table)
            .with_context(|| format!("--record {}", file.display()))?;
    }
    Ok(())
}

/// Runs `ft bench serve --soak`: one table of what was sent and how the server ended, and the
/// server's memory over time.
fn soak(
    args: &BenchServeArgs,
    url: String,
    models: Vec<String>,
    seed: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    for (flag, rate) in [
        ("--cancel-rate", args.cancel_rate),
        ("--slow-rate", args.slow_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            return Err(UsageError(format!("{flag} {rate}: must be from 0 to 1")).into());
        }
    }
    if args.cancel_rate + args.slow_rate > 1.0 {
        return Err(UsageError(format!(
            "--cancel-rate {} and --slow-rate {} add up to more than 1",
            args.cancel_rate, args.slow_rate
        ))
        .into());
    }
    let concurrency = args.concurrency.first().copied().unwrap_or(16);
    let spec = SoakSpec {
        url,
        models: models.clone(),
        concurrency,
        duration: Duration::from_secs(seconds),
        cancel_rate: args.cancel_rate,
        slow_rate: args.slow_rate,
        slow_delay: Duration::from_millis(args.slow_delay_ms),
        prompt_len: args.prompt_len,
        max_tokens: args.max_tokens as usize,
        seed,
        api_key: args.api_key.clone(),
        timeout: Duration::from_secs(args.timeout),
        sample_every: Duration::from_secs((seconds / 20).clamp(1, 30)),
    };
    let r = ft_eval::soak::run(&spec, Duration::from_secs(30));
    let mib = |b: f64| b / f64::from(1 << 20);
    // Memory after the first tenth (allocators and caches warmed up) against the end.
    let warm = r
        .samples
        .iter()
        .find(|s| s.at_s >= seconds as f64 / 10.0)
        .or(r.samples.first())
        .map_or(f64::NAN, |s| s.rss_bytes);
    let peak = r
        .samples
        .iter()
        .map(|s| s.rss_bytes)
        .fold(f64::NAN, f64::max);
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| crate::error::hide_credentials(&spec.url));
    let table = format!(
        "| server | seconds | streams | sent | completed | cancelled | slow | errors | KV blocks held at the end | RSS warm MiB | RSS end MiB | RSS peak MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n\
         | {label} | {:.0} | {concurrency} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |\n",
        r.wall_s,
        r.sent,
        r.completed,
        r.cancelled,
        r.slow,
        r.errors.len(),
        if r.idle { "0".to_string() } else { format!("{} ({} requests still held)", r.end.blocks_used, r.end.requests) },
        mib(warm),
        mib(r.end.rss_bytes),
        mib(peak),
    );
    print!("{table}");
    let series: Vec<String> = r
        .samples
        .iter()
        .map(|s| format!("{:.0}s {:.0}", s.at_s, mib(s.rss_bytes)))
        .collect();
    println!(
        "\nRSS MiB over time: {}\nmodels {models:?}, prompts of {} words (seed {seed}), {} tokens each; {:.0}% cancelled part way, {:.0}% read with {} ms between events",
        series.join(", "),
        args.prompt_len,
        args.max_tokens,
        args.cancel_rate * 100.0,
        args.slow_rate * 100.0,
        args.slow_delay_ms
    );
    for e in r.errors.iter().take(5) {
        eprintln!("ft bench serve --soak: {e}");
    }
    if let Some(file) = &args.record {
        record(file, "`ft bench serve --soak`", &table)
            .with_context(|| format!("--record {}", file.display()))?;
    }
    if !r.idle {
        anyhow::bail!(
            "the server still held {} KV blocks and {} requests 30 s after the last request",
            r.end.blocks_used,
            r.end.requests
        );
    }
    if !r.errors.is_empty() {
        anyhow::bail!(
            "{} requests failed other than by a planned hang-up",
            r.errors.len()
        );
    }
    Ok(())
}

/// The machine's memory (`MemTotal` of `/proc/meminfo`), where the system says.
fn total_memory_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}
