//! ft-trainer: the `ft` command line, and later the recipes and the training loop.
//!
//! The CLI parses flags into plain values ([`cli`]), validates them, and calls one library
//! function per subcommand ([`commands`]). Backends are chosen at run time ([`device`]). This is
//! the top of the stack: the only crate that uses clap and anyhow.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod data;
pub mod device;
pub mod distill;
pub mod error;
pub mod eval;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod recipe;
pub mod rss;
pub mod schedule;
pub mod tasks;
pub mod train;
