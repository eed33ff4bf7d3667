//! `ft adapters ...`: the adapter registry from the command line, adapters converted to
//! llama.cpp's GGUF LoRA file, and whether other servers load them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ft_adapters::compat::{self, Server};
use ft_adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use ft_adapters::registry::{parse_ref, AddInfo};
use ft_adapters::{AdapterError, PeftAdapter, Registry};
use ft_model::formats::gguf_export::GgufExportType;
use ft_model::formats::gguf_lora::write_gguf_lora;
use ft_model::pretrained::TextSide;

use crate::args::{
    AdapterFormat, AdaptersAddArgs, AdaptersCheckArgs, AdaptersConvertArgs, AdaptersExportArgs,
    AdaptersListArgs, AdaptersRefArgs, GgufLoraArgs, RegistryArgs,
};
use crate::error::{usage, UsageError};

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
    match args.format {
        AdapterFormat::Peft => reg.export(&record, &args.dir)?,
        AdapterFormat::Gguf => {
            let staging = tempfile::tempdir()?;
            reg.export(&record, staging.path())?;
            write_gguf(staging.path(), &args.dir, &args.gguf)?;
        }
    }
    println!("exported {} to {}", record.id(), args.dir.display());
    Ok(())
}

/// `ft adapters check`: one line per server; fails (exit 1) unless each loads the adapter
/// as PEFT means it.
pub fn check(args: AdaptersCheckArgs) -> anyhow::Result<()> {
    let servers: Vec<Server> = if args.servers.is_empty() {
        Server::ALL.to_vec()
    } else {
        args.servers
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e: String| UsageError(format!("--for {e}")))
            })
            .collect::<Result<_, _>>()?
    };
    let (config, weights) = adapter_files(&args.adapter, &args.registry)?;
    let mut faithful = true;
    for server in servers {
        let verdict = compat::check(&config, &weights, server)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.adapter))?;
        faithful &= verdict.faithful();
        println!("{}", verdict.summary());
    }
    if !faithful {
        anyhow::bail!(
            "{}: not every server loads it as PEFT means it",
            args.adapter
        );
    }
    Ok(())
}

/// The config and weights bytes of a PEFT folder, or of NAME[:VERSION] in the registry.
fn adapter_files(adapter: &str, registry: &RegistryArgs) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let dir = Path::new(adapter);
    if dir.is_dir() {
        return Ok(ft_adapters::peft::read_files(dir)?);
    }
    let (name, version) = parse_ref(adapter).map_err(usage_err)?;
    let reg = open_read_only(registry)?;
    let record = reg.get(&name, version)?;
    let blob = |f: &str| -> anyhow::Result<Vec<u8>> {
        let hex = record
            .files
            .get(f)
            .ok_or_else(|| anyhow::anyhow!("{}: no {f} in the registry", record.id()))?;
        Ok(reg.blob(hex)?)
    };
    Ok((blob(CONFIG_FILE)?, blob(WEIGHTS_FILE)?))
}

/// `ft adapters convert`: a PEFT folder to llama.cpp's GGUF LoRA file.
pub fn convert(args: AdaptersConvertArgs) -> anyhow::Result<()> {
    write_gguf(&args.dir, &args.out, &args.gguf)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Writes the PEFT adapter in `dir` as a GGUF LoRA file at `out` for the base `args.base`,
/// and, when the base is a GGUF file, an Ollama Modelfile beside it (`OUT.Modelfile`).
fn write_gguf(dir: &Path, out: &Path, args: &GgufLoraArgs) -> anyhow::Result<()> {
    let ty = match args.ty.as_str() {
        "f32" => GgufExportType::F32,
        "f16" => GgufExportType::F16,
        other => return Err(usage("--type", "f32 or f16", other)),
    };
    let base =
        ft_model::source::resolve(&args.base).with_context(|| format!("--base {}", args.base))?;
    let text = TextSide::load(&base).with_context(|| format!("--base {}", args.base))?;
    let adapter = PeftAdapter::read(dir)?;
    write_gguf_lora(&adapter, &text.config, ty, out)?;
    if base.is_file() {
        let modelfile = out.with_extension("Modelfile");
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let text = format!(
            "FROM {}\nADAPTER {}\n",
            absolute(&base).display(),
            absolute(out).display()
        );
        ft_adapters::atomic::write_atomic(&modelfile, text.as_bytes())
            .with_context(|| format!("{}", modelfile.display()))?;
        println!(
            "wrote {} (ollama create NAME -f {})",
            modelfile.display(),
            modelfile.display()
        );
    }
    Ok(())
}
