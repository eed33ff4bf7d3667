//! Recording benchmark tables: appended to a Markdown file under a heading that gives the
//! command line, the machine and the date, so every figure keeps its provenance.

use std::io::Write;
use std::path::Path;

/// Appends `table` under a heading `title, date` with the command line and machine.
pub fn record(file: &Path, title: &str, table: &str) -> anyhow::Result<()> {
    let command: Vec<String> = std::env::args().collect();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?;
    write!(
        f,
        "\n### {title}, {}\n\nCommand: `{}`  \nMachine: {cpu}, {cores} cores\n\n{table}",
        today(),
        command.join(" ")
    )?;
    Ok(())
}

/// Today's UTC date as YYYY-MM-DD.
fn today() -> String {
    ft_adapters::registry::now_rfc3339()[..10].to_string()
}
