//! `ft adapters ...`: the adapter registry from the command line.

use std::path::PathBuf;

use ft_adapters::registry::{parse_ref, AddInfo};
use ft_adapters::{AdapterError, Registry};

use crate::args::{
    AdaptersAddArgs, AdaptersExportArgs, AdaptersListArgs, AdaptersRefArgs, RegistryArgs,
};
use crate::error::UsageError;

/// The registry folder the flags name (default `$FT_HOME/registry`).
pub fn registry_dir(args: &RegistryArgs) -> PathBuf {
    args.registry
        .clone()
        .unwrap_or_else(|| ft_model::source::ft_home().join("registry"))
}

fn open(args: &RegistryArgs) -> anyhow::Result<Registry> {
    Ok(Registry::open(&registry_dir(args))?)
}

/// The registry for commands that only read it: works where it cannot be written.
fn open_read_only(args: &RegistryArgs) -> anyhow::Result<Registry> {
    Ok(Registry::open_read_only(&registry_dir(args))?)
}

/// A bad name or reference is a usage error (exit 2).
fn usage_err(e: AdapterError) -> anyhow::Error {
    match e {
        AdapterError::BadName(m) => UsageError(m).into(),
        other => other.into(),
    }
}

/// `ft adapters add`.
pub fn add(args: AdaptersAddArgs) -> anyhow::Result<()> {
    ft_adapters::registry::validate_name(&args.name).map_err(usage_err)?;
    let mut reg = open(&args.registry)?;
    let info = AddInfo {
        task: args.task,
        base_model: args.base,
        ..Default::default()
    };
    let record = reg.add(&args.dir, &args.name, info)?;
    println!("added {}", record.id());
    Ok(())
}

/// `ft adapters list`.
pub fn list(args: AdaptersListArgs) -> anyhow::Result<()> {
    let (records, damaged) = open_read_only(&args.registry)?.list_all()?;
    for d in damaged {
        eprintln!("warning: {d}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    println!("name\tversion\ttask\tr\talpha\tbase\tcreated\tpublished");
    for r in records {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.name,
            r.version,
            r.task.as_deref().unwrap_or("-"),
            r.r,
            r.alpha,
            r.base_model.as_deref().unwrap_or("-"),
            r.created_at,
            if r.published.is_empty() {
                "-".into()
            } else {
                r.published.join(",")
            }
        );
    }
    Ok(())
}

/// `ft adapters show`.
pub fn show(args: AdaptersRefArgs) -> anyhow::Result<()> {
    let (name, version) = parse_ref(&args.adapter).map_err(usage_err)?;
    let record = open_read_only(&args.registry)?.get(&name, version)?;
    println!("{}", serde_json::to_string_pretty(&record)?);
    Ok(())
}

/// `ft adapters rm`.
pub fn rm(args: AdaptersRefArgs) -> anyhow::Result<()> {
    let (name, version) = parse_ref(&args.adapter).map_err(usage_err)?;
    for id in open(&args.registry)?.remove(&name, version)? {
        println!("removed {id}");
    }
    Ok(())
}

/// `ft adapters export`.
pub fn export(args: AdaptersExportArgs) -> anyhow::Result<()> {
    let (name, version) = parse_ref(&args.adapter).map_err(usage_err)?;
    let reg = open_read_only(&args.registry)?;
    let record = reg.get(&name, version)?;
    reg.export(&record, &args.dir)?;
    println!("exported {} to {}", record.id(), args.dir.display());
    Ok(())
}
