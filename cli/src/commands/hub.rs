//! `ft publish` and `ft pull`: registry adapters to and from the Hugging Face Hub.

use ft_adapters::compat::{self, Server};
use ft_adapters::hub::{model_card, token_from_env, validate_repo, HubClient, UploadFile};
use ft_adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use ft_adapters::registry::{parse_ref, AddInfo};
use ft_adapters::Registry;

use crate::args::{PublishArgs, PullArgs};
use crate::commands::adapters::registry_dir;
use crate::error::UsageError;

/// `ft publish`: uploads the adapter files and a model card, then marks the version published.
pub fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let (name, version) = parse_ref(&args.adapter).map_err(|e| UsageError(e.to_string()))?;
    validate_repo(&args.repo).map_err(|e| UsageError(format!("--repo: {e}")))?;
    let mut reg = Registry::open(&registry_dir(&args.registry))?;
    let record = reg.get(&name, version)?;
    let token = token_from_env().ok_or_else(|| {
        anyhow::anyhow!(
            "no Hugging Face token: set HF_TOKEN or log in with `huggingface-cli login`"
        )
    })?;
    let mut files = Vec::new();
    for (file, hex) in &record.files {
        files.push(UploadFile {
            path: file.clone(),
            bytes: reg.blob(hex)?,
        });
    }
    let file = |name: &str| {
        files
            .iter()
            .find(|f| f.path == name)
            .map(|f| f.bytes.as_slice())
    };
    let serving: Vec<String> = match (file(CONFIG_FILE), file(WEIGHTS_FILE)) {
        (Some(config), Some(weights)) => Server::ALL
            .iter()
            .filter_map(|&s| compat::check(config, weights, s).ok())
            .map(|v| v.summary())
            .collect(),
        _ => Vec::new(),
    };
    files.push(UploadFile {
        path: "README.md".into(),
        bytes: model_card(&record, &args.repo, &args.license, &serving).into_bytes(),
    });
    let client = HubClient::new(&args.endpoint, Some(token));
    let message = format!("Upload {} (ft adapter registry)", record.id());
    let commit = client.upload(&args.repo, args.private, &files, &message)?;
    reg.mark_published(&record.name, record.version, &args.repo)?;
    println!("published {} to {} {commit}", record.id(), args.repo);
    Ok(())
}

/// `ft pull hf:OWNER/NAME`: downloads the PEFT files and adds them to the registry.
pub fn pull(args: PullArgs) -> anyhow::Result<()> {
    let repo = args
        .source
        .strip_prefix("hf:")
        .ok_or_else(|| UsageError(format!("{}: expected hf:OWNER/NAME", args.source)))?;
    let (_, repo_name) = validate_repo(repo).map_err(|e| UsageError(e.to_string()))?;
    let name = args.name.clone().unwrap_or_else(|| repo_name.to_string());
    ft_adapters::registry::validate_name(&name).map_err(|e| UsageError(format!("--name: {e}")))?;
    let client = HubClient::new(&args.endpoint, token_from_env());
    let tmp = tempfile::tempdir()?;
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let bytes = client.download(repo, file, &args.revision)?;
        std::fs::write(tmp.path().join(file), bytes)?;
    }
    let mut reg = Registry::open(&registry_dir(&args.registry))?;
    let record = reg.add(tmp.path(), &name, AddInfo::default())?;
    println!("pulled hf:{repo} as {}", record.id());
    Ok(())
}
