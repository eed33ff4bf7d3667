//! `ft batch run`: a file of OpenAI Batch API requests answered with no server to run, as
//! vLLM's `run-batch` does: the base and adapters loaded here, served in process, every line
//! asked, the answers written in input order. A run stopped part way resumes where it was.
//! `ft batch submit|status|results|cancel`: the same file handed to any server with the Batch
//! API, and followed there.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ft_model::QuantBackend;
use ft_serve::batches::client::Client;
use ft_serve::batches::{input, offline, BatchError};
use ft_serve::server::{Background, ServerConfig};
use ft_serve::{Engine, EngineConfig};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{
    BatchResultsArgs, BatchRunArgs, BatchServerArgs, BatchStatusArgs, BatchSubmitArgs,
};
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

/// How long one call to a Batch API may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

fn client(server: &BatchServerArgs) -> Client {
    Client::new(&server.url, server.api_key.clone(), CALL_TIMEOUT)
}

/// Runs `ft batch submit`.
pub fn submit(args: BatchSubmitArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.input)
        .map_err(|e| UsageError(format!("--input {}: {e}", args.input.display())))?;
    let lines = input::parse(&bytes, args.endpoint.as_deref()).map_err(|errors| {
        UsageError(format!(
            "--input {}: not a batch file:\n{}",
            args.input.display(),
            input::describe(&errors)
        ))
    })?;
    let endpoint = match &args.endpoint {
        Some(e) => e.clone(),
        None => {
            let first = lines[0].url.clone();
            if let Some(other) = lines.iter().find(|l| l.url != first) {
                return Err(UsageError(format!(
                    "--input {}: line {} asks {} and line {} {}: one endpoint per batch",
                    args.input.display(),
                    lines[0].line,
                    first,
                    other.line,
                    other.url
                ))
                .into());
            }
            first
        }
    };
    let mut metadata = serde_json::Map::new();
    for kv in &args.metadata {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--metadata {kv}: expected KEY=VALUE")))?;
        metadata.insert(k.to_string(), v.into());
    }
    let c = client(&args.server);
    let name = args
        .input
        .file_name()
        .map_or("batch.jsonl".into(), |n| n.to_string_lossy().into_owned());
    let file = c.upload(&name, &bytes)?;
    let file_id = file["id"].as_str().unwrap_or_default();
    let batch = c.create(
        file_id,
        &endpoint,
        (!metadata.is_empty()).then_some(serde_json::Value::Object(metadata)),
    )?;
    eprintln!(
        "ft batch: {} requests in {file_id}, batch {} {}",
        lines.len(),
        batch["id"].as_str().unwrap_or_default(),
        batch["status"].as_str().unwrap_or_default()
    );
    println!("{}", batch["id"].as_str().unwrap_or_default());
    Ok(())
}

/// One line of a batch's state.
fn describe(b: &serde_json::Value) -> String {
    let c = &b["request_counts"];
    let mut line = format!(
        "{} {}: {} of {} requests completed, {} failed",
        b["id"].as_str().unwrap_or_default(),
        b["status"].as_str().unwrap_or_default(),
        c["completed"],
        c["total"],
        c["failed"]
    );
    for (key, what) in [("output_file_id", "output"), ("error_file_id", "errors")] {
        if let Some(id) = b[key].as_str() {
            line.push_str(&format!("; {what} {id}"));
        }
    }
    if let Some(errors) = b["errors"]["data"].as_array() {
        for e in errors {
            line.push_str(&format!(
                "\n  line {}: {}",
                e["line"],
                e["message"].as_str().unwrap_or_default()
            ));
        }
    }
    line
}

/// Runs `ft batch status`.
pub fn status(args: BatchStatusArgs) -> anyhow::Result<()> {
    let c = client(&args.server);
    let mut b = c.batch(&args.batch)?;
    while args.wait
        && !["completed", "failed", "expired", "cancelled"]
            .contains(&b["status"].as_str().unwrap_or_default())
    {
        std::thread::sleep(Duration::from_millis(500));
        b = c.batch(&args.batch)?;
    }
    println!("{}", describe(&b));
    Ok(())
}

/// Runs `ft batch cancel`.
pub fn cancel(args: BatchStatusArgs) -> anyhow::Result<()> {
    let b = client(&args.server).cancel(&args.batch)?;
    println!("{}", describe(&b));
    Ok(())
}

/// Runs `ft batch results`.
pub fn results(args: BatchResultsArgs) -> anyhow::Result<()> {
    let c = client(&args.server);
    let b = c.batch(&args.batch)?;
    let status = b["status"].as_str().unwrap_or_default();
    if !["completed", "expired", "cancelled"].contains(&status) {
        return Err(UsageError(format!(
            "batch {} is {status}: its results come once it ends (ft batch status --wait)",
            args.batch
        ))
        .into());
    }
    for (key, path) in [
        ("output_file_id", Some(&args.output)),
        ("error_file_id", args.errors.as_ref()),
    ] {
        let (Some(id), Some(path)) = (b[key].as_str(), path) else {
            continue;
        };
        let bytes = c.content(id)?;
        ft_adapters::atomic::write_atomic(path, &bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("ft batch: {id} to {}", path.display());
    }
    println!("{}", describe(&b));
    Ok(())
}
