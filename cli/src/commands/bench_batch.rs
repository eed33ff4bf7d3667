//! `ft bench batch`: one server with the Batch API, the same prompts answered interactively
//! and as one batch, priced by the machine time each took.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Context;
use ft_eval::batch_bench::{self, Spec};
use ft_eval::task;
use ft_model::QuantBackend;
use ft_serve::server::{Background, BatchConfig, ServerConfig};
use ft_serve::{Engine, EngineConfig};

use crate::args::BenchBatchArgs;
use crate::commands::eval::task_error;
use crate::commands::report::record;
use crate::device::{dispatch, Job};
use crate::error::usage;

/// The base's name in the benchmark's requests.
const MODEL_ID: &str = "base";
/// Rows of the engine: a batch may fill them all, interactive streams as many as the SLO
/// allows.
const ROWS: usize = 256;

/// Runs `ft bench batch`.
pub fn run(args: BenchBatchArgs) -> anyhow::Result<()> {
    if !(args.slo_tpot_ms.is_finite() && args.slo_tpot_ms > 0.0) {
        return Err(usage(
            "--slo-tpot-ms",
            "milliseconds above 0",
            args.slo_tpot_ms,
        ));
    }
    if !(args.price_per_hour.is_finite() && args.price_per_hour >= 0.0) {
        return Err(usage(
            "--price-per-hour",
            "USD, 0 or more",
            args.price_per_hour,
        ));
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        return Err(usage("--concurrency", "stream counts of 1 or more", "0"));
    }
    dispatch(args.base.device, args)
}

impl Job for BenchBatchArgs {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let task = task::resolve(&self.task, &[]).map_err(|e| task_error("--task", e))?;
        let pretrained = self.base.load::<B>(&device)?;
        let detokenizer = pretrained.tokenizer.clone();
        let engine = Engine::new(
            pretrained.model,
            Box::new(move |ids: &[u32]| detokenizer.decode(ids).unwrap_or_default()),
            EngineConfig {
                // 32k tokens: every row holds a prompt and its answer.
                kv_blocks: 2048,
                max_batch_tokens: 512,
                max_running: ROWS,
                max_waiting: 100_000,
                // The same prompts are asked in every row: a prefix cache would answer the
                // later rows from the earlier ones.
                prefix_cache: false,
                batch_step_tokens: self.batch_step_tokens as usize,
                ..EngineConfig::default()
            },
        );
        let state = tempfile::tempdir().context("a folder for the batch state")?;
        let config = ServerConfig {
            model_id: MODEL_ID.into(),
            batches: Some(BatchConfig {
                state_dir: state.path().to_path_buf(),
                max_rows: self.batch_max_rows as usize,
                required: true,
            }),
            ..ServerConfig::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = Background::start(
            engine,
            pretrained.tokenizer,
            pretrained.chat_template,
            config,
            listener,
        )?;
        let mut ladder = self.concurrency.clone();
        ladder.sort_unstable();
        ladder.dedup();
        let spec = Spec {
            url: server.url().to_string(),
            model: MODEL_ID.into(),
            task,
            requests: self.requests as usize,
            slo_tpot_s: self.slo_tpot_ms / 1e3,
            ladder,
            price_per_hour: self.price_per_hour,
            probes: self.probes as usize,
            batch_rows: self.batch_max_rows as usize,
            timeout: Duration::from_secs(600),
        };
        let bench = batch_bench::run(&spec, |what| eprintln!("ft bench batch: {what}"))
            .context("the benchmark")?;
        server.stop().context("the server")?;
        let table = bench.markdown(self.price_per_hour);
        print!("{table}");
        println!(
            "\n{} requests of task {} ({} tokens at most each), SLO p99 TPOT {} ms, batch rows {}, batch step tokens {}, {} USD per hour",
            self.requests, self.task, spec.task.max_tokens, self.slo_tpot_ms, self.batch_max_rows, self.batch_step_tokens, self.price_per_hour
        );
        if let Some(file) = &self.record {
            record(file, "`ft bench batch`", &table)
                .with_context(|| format!("--record {}", file.display()))?;
        }
        Ok(())
    }
}
