//! One module per subcommand; each validates its flags and calls into the library crates.

mod bench;
mod generate;
mod merge;
mod perplexity;
mod quant;
mod report;
mod tokenize;

use crate::cli::{BenchCommand, Command, QuantCommand};

/// Runs one parsed command.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Tokenize(args) => tokenize::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Bench(BenchCommand::Generate(args)) => bench::generate(args),
        Command::Merge(args) => merge::run(args),
        Command::Quant(QuantCommand::Compare(args)) => quant::compare(args),
        Command::Quant(QuantCommand::Measure(args)) => quant::measure(args),
        Command::Quant(QuantCommand::Save(args)) => quant::save(args),
    }
}
