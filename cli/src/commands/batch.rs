//! `ft batch run`: a file of OpenAI Batch API requests answered with no server to run, as
//! vLLM's `run-batch` does: the base and adapters loaded here, served in process, every line
//! asked, the answers written in input order. A run stopped part way resumes where it was.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ft_model::QuantBackend;
use ft_serve::batches::{input, offline, BatchError};
use ft_serve::server::{Background, ServerConfig};
use ft_serve::{Engine, EngineConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::BatchRunArgs;
use crate::commands::serve::{parse_adapter, register_adapters};
use crate::device::{dispatch, Job};
use crate::error::UsageError;

/// Runs `ft batch run`.
pub fn run(args: BatchRunArgs) -> anyhow::Result<()> {
    if args.input == args.output {
        return Err(UsageError(format!(
            "--output {}: the same file as --input",
            args.output.display()
        ))
        .into());
    }
    let bytes = std::fs::read(&args.input)
        .map_err(|e| UsageError(format!("--input {}: {e}", args.input.display())))?;
    // The whole file is checked before the model loads.
    let lines = input::parse(&bytes, None).map_err(|errors| {
        UsageError(format!(
            "--input {}: not a batch file:\n{}",
            args.input.display(),
            input::describe(&errors)
        ))
    })?;
    let adapters = args
        .models
        .adapters
        .iter()
        .map(|a| parse_adapter(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    dispatch(
        args.base.device,
        Run {
            args,
            bytes,
            lines,
            adapters,
        },
    )
}

/// The batch, on a backend.
struct Run {
    args: BatchRunArgs,
    bytes: Vec<u8>,
    lines: Vec<input::Line>,
    adapters: Vec<(String, PathBuf)>,
}

impl Job for Run {
    type Output = ();

    fn run<B: QuantBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let Run {
            args,
            bytes,
            lines,
            adapters,
        } = self;
        let pretrained = args.base.load::<B>(&device)?;
        let detokenizer = pretrained.tokenizer.clone();
        let concurrency = args.concurrency as usize;
        let mut engine = Engine::new(
            pretrained.model,
            Box::new(move |ids: &[u32]| detokenizer.decode(ids).unwrap_or_default()),
            EngineConfig {
                kv_blocks: 16384 / 16,
                max_batch_tokens: 512,
                max_running: 64,
                max_waiting: concurrency.max(256),
                ..EngineConfig::default()
            },
        );
        register_adapters(&mut engine, args.models.registry.as_deref(), adapters)?;
        let model_id = args
            .models
            .served_model_name
            .clone()
            .unwrap_or(args.base.model.clone());
        let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding a local port")?;
        let config = ServerConfig {
            model_id,
            ..ServerConfig::default()
        };
        let server = Background::start(
            engine,
            pretrained.tokenizer,
            pretrained.chat_template,
            config,
            listener,
        )
        .context("starting the in-process server")?;
        let bar = ProgressBar::new(lines.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} requests, {elapsed} ({eta} left)")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let target = offline::Server {
            url: server.url().to_string(),
            api_key: None,
            concurrency,
            timeout: Duration::from_secs(args.timeout),
        };
        let summary = offline::run(&bytes, &lines, &args.output, &target, |done, _| {
            bar.set_position(done as u64)
        })
        .map_err(|e| match e {
            BatchError::Journal { .. } => anyhow::Error::from(UsageError(e.to_string())),
            e => e.into(),
        })?;
        bar.finish_and_clear();
        server.stop().context("stopping the in-process server")?;
        report(&args.output, &summary);
        Ok(())
    }
}

fn report(output: &Path, s: &offline::Summary) {
    println!(
        "{} requests: {} succeeded, {} failed{}; answers in {}",
        s.total,
        s.succeeded,
        s.failed,
        if s.resumed > 0 {
            format!(" ({} answered by an earlier run)", s.resumed)
        } else {
            String::new()
        },
        output.display()
    );
}
