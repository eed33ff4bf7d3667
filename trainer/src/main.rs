//! The `ft` binary: parses the command line, dispatches, prints errors with their causes and
//! chooses the exit code (0 ok, 1 failure, 2 usage error).

use std::process::ExitCode;

use clap::Parser;
use ft_quant::matvec::{Isa, MAX_ISA_VAR};
use ft_trainer::cli::Cli;
use ft_trainer::commands;
use ft_trainer::error::UsageError;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
