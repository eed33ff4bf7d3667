//! The Python virtual environment the PEFT peer runs in: made once with `python3 -m venv`,
//! filled from the package index with pip, and reused while it imports torch, transformers and
//! PEFT.
//!
//! torch comes from PyTorch's CPU wheel index when it answers (a few hundred MB), else from
//! PyPI, whose Linux wheel also pulls the CUDA libraries (a few GB) but computes the same on
//! the CPU. Either way torch's CPU backend runs the job.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::EvalError;

/// PyTorch's index of CPU-only wheels.
const TORCH_CPU_INDEX: &str = "https://download.pytorch.org/whl/cpu";

/// What the environment must import.
const CHECK: &str = "import torch, transformers, peft";

/// The interpreter of the environment in `dir`, which is made and filled first unless it
/// already imports torch, transformers and PEFT.
pub fn ensure(dir: &Path) -> Result<PathBuf, EvalError> {
    let python = dir.join("bin").join("python");
    if imports(&python) {
        tracing::info!("PEFT environment: {}", dir.display());
        return Ok(python);
    }
    if !python.exists() {
        tracing::info!("making a Python environment for PEFT in {}", dir.display());
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| EvalError::io(parent, e))?;
        run(
            Command::new("python3").arg("-m").arg("venv").arg(dir),
            "python3 -m venv",
        )?;
    }
    tracing::info!(
        "installing torch (CPU) into {} (once; minutes)",
        dir.display()
    );
    let cpu = run(
        pip(&python)
            .args(["torch", "--retries", "1", "--timeout", "30", "--index-url"])
            .arg(TORCH_CPU_INDEX),
        "pip install torch (CPU index)",
    );
    if let Err(e) = cpu {
        tracing::info!("PyTorch's CPU index failed ({e}); installing torch from PyPI instead");
        run(pip(&python).arg("torch"), "pip install torch")?;
    }
    tracing::info!("installing transformers and peft into {}", dir.display());
    run(
        pip(&python).args(["transformers", "peft"]),
        "pip install transformers peft",
    )?;
    if !imports(&python) {
        return Err(EvalError::PeerFailed {
            peer: "PEFT environment".into(),
            stderr: format!("{} cannot `{CHECK}` after installing", python.display()),
        });
    }
    Ok(python)
}

/// Whether `python` exists and imports what the peer needs.
fn imports(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .arg("-c")
            .arg(CHECK)
            .output()
            .is_ok_and(|o| o.status.success())
}

/// `python -m pip install --disable-pip-version-check`.
fn pip(python: &Path) -> Command {
    let mut c = Command::new(python);
    c.args(["-m", "pip", "install", "--disable-pip-version-check"]);
    c
}

/// Runs `cmd`; a failure carries the end of its output.
fn run(cmd: &mut Command, what: &str) -> Result<(), EvalError> {
    let out = cmd.output().map_err(|source| EvalError::PeerSpawn {
        program: what.into(),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.trim().lines().collect();
    Err(EvalError::PeerFailed {
        peer: what.into(),
        stderr: lines[lines.len().saturating_sub(20)..].join("\n"),
    })
}
