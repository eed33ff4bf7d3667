//! ft-cli: the `ft` binary. Parses the command line into plain values ([`args`]), loads what
//! they name ([`load`]), dispatches to one thin file per command ([`commands`]) on the backend
//! the flags chose ([`device`]), prints errors with their causes and chooses the exit code (0
//! ok, 1 failure, 2 usage error).
//!
//! The top of the stack and the only crate that uses clap and anyhow, and the only one that
//! prints: it may import every ft crate but ft-quant (ft-model re-exports what is needed).

use std::process::ExitCode;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::{self as fmt, FmtContext};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{filter, EnvFilter};

use clap::Parser;
use ft_model::kernels::{Isa, MAX_ISA_VAR};
use ft_trainer::error::TrainError;

mod args;
mod commands;
mod device;
mod error;
mod load;

use args::Cli;
use error::UsageError;

/// Keeps the panic hook silent for panics a library catches and reports as an error (a
/// malformed Parquet file's, a malformed tokenizer's), so the user sees that error alone; any
/// other panic prints as usual.
fn quiet_caught_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !ft_model::caught::catching() {
            default(info);
        }
    }));
}

fn main() -> ExitCode {
    init_logging();
    quiet_caught_panics();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    if let Ok(name) = std::env::var(MAX_ISA_VAR) {
        if Isa::from_name(&name).is_none() {
            eprintln!("error: {MAX_ISA_VAR}={name}: expected portable, avx2 or avx512-vnni");
            return ExitCode::from(2);
        }
    }
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error::report(&e));
            let usage = e.downcast_ref::<UsageError>().is_some()
                || e.downcast_ref::<TrainError>()
                    .is_some_and(TrainError::is_usage);
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// What the libraries report as progress (info events of the ft crates: "resuming from ...",
/// "exact match after training ...") goes to stdout as plain lines, as a user reads it;
/// warnings, and whatever `RUST_LOG` asks for, go to stderr with level and target.
fn init_logging() {
    let progress = fmt::layer()
        .event_format(Plain)
        .with_writer(std::io::stdout)
        .with_filter(filter::filter_fn(|m| {
            *m.level() == Level::INFO && m.is_event() && m.target().starts_with("ft_")
        }));
    let log = fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")));
    tracing_subscriber::registry()
        .with(progress)
        .with(log)
        .init();
}

/// An event's message and fields alone, one line each.
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
