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

/// Today's UTC date as YYYY-MM-DD (Hinnant's civil-from-days).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
