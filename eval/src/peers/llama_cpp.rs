//! llama.cpp, through llama-cpp-python, decoding the same prompt ids from the same GGUF as ft:
//! the peer of `ft bench generate --vs-llama-cpp`.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;

use crate::error::EvalError;

/// What one llama.cpp measurement saw.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCppDecode {
    /// llama-cpp-python's version.
    pub version: String,
    /// Seconds to load the GGUF.
    pub load_s: f64,
    /// Prefill tokens/s, median of the timed runs.
    pub prefill: f64,
    /// Decode tokens/s, median of the timed runs.
    pub decode: f64,
    /// The child process's peak resident memory in bytes.
    pub peak_rss: u64,
    /// CPU threads llama.cpp ran on.
    pub threads: usize,
}

/// Greedy-decodes `n_new` tokens after `prompt` with llama.cpp from the GGUF file `gguf` on
/// `threads` threads, one warm-up and `runs` timed runs, in a `python3` child process.
pub fn decode(
    gguf: &Path,
    prompt: &[u32],
    n_new: usize,
    threads: usize,
    runs: u64,
) -> Result<LlamaCppDecode, EvalError> {
    let stdout = run_llama_cpp(
        SCRIPT,
        &[
            gguf.as_os_str().to_owned(),
            serde_json::json!(prompt).to_string().into(),
            n_new.to_string().into(),
            threads.to_string().into(),
            runs.to_string().into(),
        ],
    )?;
    parse(&stdout, threads)
}

/// The interpreter that runs the llama.cpp scripts.
const PYTHON: &str = "python3";

/// Runs a llama-cpp-python `script` with `args` in a `python3` child process; its stdout.
pub(crate) fn run_llama_cpp(script: &str, args: &[OsString]) -> Result<Vec<u8>, EvalError> {
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .map_err(|source| EvalError::PeerSpawn {
            program: PYTHON.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(EvalError::PeerFailed {
            peer: "llama.cpp".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// Reads the script's one JSON line; a missing version reads `?`.
fn parse(stdout: &[u8], threads: usize) -> Result<LlamaCppDecode, EvalError> {
    #[derive(Deserialize)]
    struct Printed {
        version: Option<String>,
        load_s: f64,
        prefill: f64,
        decode: f64,
        peak_rss: u64,
    }
    let p: Printed =
        serde_json::from_slice(stdout).map_err(|source| EvalError::PeerOutput { source })?;
    Ok(LlamaCppDecode {
        version: p.version.unwrap_or_else(|| "?".into()),
        load_s: p.load_s,
        prefill: p.prefill,
        decode: p.decode,
        peak_rss: p.peak_rss,
        threads,
    })
}

/// Arguments: GGUF path, prompt ids as JSON, new tokens, threads, timed runs. Prints one JSON
/// object: version, load_s, prefill and decode (medians, warm-up dropped), peak_rss.
const SCRIPT: &str = r#"
import json, resource, statistics, sys, time
try:
    from llama_cpp import Llama
    import llama_cpp, numpy as np
except ImportError as e:
    sys.exit(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python")
def peak_rss():
    # VmHWM is reset by exec; ru_maxrss would carry over the parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path, ids, n_new, threads, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t = time.perf_counter()
llm = Llama(model_path=path, n_ctx=len(ids) + n_new + 8, n_batch=512, n_threads=threads,
            n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - t
pre, dec = [], []
for _ in range(runs + 1):
    llm.reset()
    t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t3 = time.perf_counter()
    pre.append(len(ids) / (t1 - t0)); dec.append((n_new - 1) / (t3 - t2))
print(json.dumps({"version": llama_cpp.__version__, "load_s": load_s,
                  "prefill": statistics.median(pre[1:]), "decode": statistics.median(dec[1:]),
                  "peak_rss": peak_rss()}))
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_result_is_read_with_the_threads_it_ran_on() {
        let out = br#"{"version": "0.3.2", "load_s": 0.5, "prefill": 120.0, "decode": 30.5, "peak_rss": 1048576}"#;
        let r = parse(out, 4).unwrap();
        assert_eq!(r.version, "0.3.2");
        assert_eq!((r.load_s, r.prefill, r.decode), (0.5, 120.0, 30.5));
        assert_eq!((r.peak_rss, r.threads), (1 << 20, 4));
    }

    #[test]
    fn an_unreadable_result_is_an_error() {
        assert!(matches!(
            parse(b"Traceback", 2),
            Err(EvalError::PeerOutput { .. })
        ));
    }
}
