//! One module per subcommand; each validates its flags and calls into the library crates.

mod adapters;
mod batch;
mod bench;
mod bench_batch;
mod bench_cache;
mod bench_distill;
mod bench_train;
mod bench_train_peft;
mod cascade;
mod compress;
mod data;
mod eval;
mod generate;
mod hub;
mod merge;
mod perplexity;
mod ptq;
mod quant;
mod recipe;
mod report;
mod scaling;
mod serve;
mod tokenize;
mod train;

use crate::args::{
    AdaptersCommand, BatchCommand, BenchCommand, CascadeCommand, Command, DataCommand,
    QuantCommand, RecipeCommand, ScalingCommand,
};

/// Runs one parsed command.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Tokenize(args) => tokenize::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Compress(args) => compress::run(args),
        Command::Bench(BenchCommand::Generate(args)) => bench::generate(args),
        Command::Bench(BenchCommand::Train(args)) => bench_train::run(args),
        Command::Bench(BenchCommand::Distill(args)) => bench_distill::run(args),
        Command::Bench(BenchCommand::Serve(args)) => serve::bench(args),
        Command::Bench(BenchCommand::Cache(args)) => bench_cache::run(args),
        Command::Bench(BenchCommand::Batch(args)) => bench_batch::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Quant(QuantCommand::Compare(args)) => quant::compare(args),
        Command::Quant(QuantCommand::Measure(args)) => quant::measure(args),
        Command::Quant(QuantCommand::Save(args)) => quant::save(args),
        Command::Quant(QuantCommand::Gptq(args)) => ptq::gptq(args),
        Command::Quant(QuantCommand::Awq(args)) => ptq::awq(args),
        Command::Quant(QuantCommand::Rtn(args)) => ptq::rtn(args),
        Command::Train(args) => train::run(args),
        Command::Recipe(RecipeCommand::Check(args)) => recipe::check(args),
        Command::Recipe(RecipeCommand::Show(args)) => recipe::show(args),
        Command::Recipe(RecipeCommand::Plan(args)) => recipe::plan(args),
        Command::Recipe(RecipeCommand::Export(args)) => recipe::export(args),
        Command::Scaling(ScalingCommand::Fit(args)) => scaling::fit(args),
        Command::Scaling(ScalingCommand::Plan(args)) => scaling::plan(args),
        Command::Scaling(ScalingCommand::Sweep(args)) => scaling::sweep(args),
        Command::Eval(args) => eval::run(args),
        Command::Batch(BatchCommand::Run(args)) => batch::run(args),
        Command::Batch(BatchCommand::Submit(args)) => batch::submit(args),
        Command::Batch(BatchCommand::Status(args)) => batch::status(args),
        Command::Batch(BatchCommand::Results(args)) => batch::results(args),
        Command::Batch(BatchCommand::Cancel(args)) => batch::cancel(args),
        Command::Cascade(CascadeCommand::Fit(args)) => cascade::fit(args),
        Command::Cascade(CascadeCommand::Eval(args)) => cascade::eval(args),
        Command::Data(DataCommand::Tasks(args)) => data::tasks(args),
        Command::Adapters(AdaptersCommand::Add(args)) => adapters::add(args),
        Command::Adapters(AdaptersCommand::List(args)) => adapters::list(args),
        Command::Adapters(AdaptersCommand::Show(args)) => adapters::show(args),
        Command::Adapters(AdaptersCommand::Rm(args)) => adapters::rm(args),
        Command::Adapters(AdaptersCommand::Export(args)) => adapters::export(args),
        Command::Adapters(AdaptersCommand::Convert(args)) => adapters::convert(args),
        Command::Adapters(AdaptersCommand::Check(args)) => adapters::check(args),
        Command::Publish(args) => hub::publish(args),
        Command::Pull(args) => hub::pull(args),
        Command::Serve(args) => serve::run(args),
    }
}
