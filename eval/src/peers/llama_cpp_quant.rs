//! llama.cpp's own quantizer and its perplexity, through llama-cpp-python: the anchor of
//! `ft quant compare --vs-llama-cpp`. llama.cpp rounds an f16 GGUF to Q4_0 itself
//! (`llama_model_quantize`, round-to-nearest), then scores that file, the f16 file and any
//! other GGUF (ft's GPTQ/AWQ files) on the same token ids and windows as `ft perplexity`, so
//! that one evaluator ranks them all.

use serde::Deserialize;
use std::path::{Path, PathBuf};

use super::llama_cpp::run_llama_cpp;
use crate::error::EvalError;

/// What llama.cpp made and measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCppQuant {
    /// llama-cpp-python's version.
    pub version: String,
    /// Seconds `llama_model_quantize` took to write the Q4_0 file.
    pub quantize_s: f64,
    /// Each scored file: its perplexity on each text, and its top-1 predictions on the first.
    pub scores: Vec<LlamaCppScore>,
}

/// One file as llama.cpp scored it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaCppScore {
    /// The GGUF file.
    pub path: PathBuf,
    /// Perplexity of each text, in order.
    pub perplexity: Vec<f64>,
    /// The most likely next token at each scored position of the first text.
    pub predictions: Vec<u32>,
}

/// Quantizes `f16` to Q4_0 at `q4_0` with llama.cpp, then scores `f16`, `q4_0` and `others`
/// on every text of `texts` (token ids), in non-overlapping windows of `window` tokens each
/// from an empty cache, on `threads` threads, in a `python3` child process.
pub fn quantize_and_score(
    f16: &Path,
    q4_0: &Path,
    others: &[PathBuf],
    texts: &[Vec<u32>],
    window: usize,
    threads: usize,
) -> Result<LlamaCppQuant, EvalError> {
    let mut files = vec![f16.to_path_buf(), q4_0.to_path_buf()];
    files.extend(others.iter().cloned());
    let request = serde_json::json!({
        "f16": f16, "q4_0": q4_0, "files": files, "texts": texts,
        "window": window, "threads": threads,
    });
    let spawn = |source| EvalError::PeerSpawn {
        program: "python3".into(),
        source,
    };
    let dir = tempfile::tempdir().map_err(spawn)?;
    let request_file = dir.path().join("request.json");
    std::fs::write(&request_file, request.to_string()).map_err(spawn)?;
    let stdout = run_llama_cpp(SCRIPT, &[request_file.into_os_string()])?;
    parse(&stdout)
}

/// Reads the script's one JSON line.
fn parse(stdout: &[u8]) -> Result<LlamaCppQuant, EvalError> {
    #[derive(Deserialize)]
    struct Printed {
        version: Option<String>,
        quantize_s: f64,
        scores: Vec<LlamaCppScore>,
    }
    let p: Printed =
        serde_json::from_slice(stdout).map_err(|source| EvalError::PeerOutput { source })?;
    Ok(LlamaCppQuant {
        version: p.version.unwrap_or_else(|| "?".into()),
        quantize_s: p.quantize_s,
        scores: p.scores,
    })
}

/// Argument: a JSON request (f16, q4_0, files, texts, window, threads). Prints one JSON
/// object: version, quantize_s, and per file its perplexity on each text and its top-1
/// predictions on the first.
const SCRIPT: &str = r#"
import ctypes, json, sys, time
try:
    import llama_cpp, numpy as np
    from llama_cpp import Llama
except ImportError as e:
    sys.exit(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python")
req = json.load(open(sys.argv[1]))
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
params.nthread = req["threads"]
t = time.perf_counter()
rc = llama_cpp.llama_model_quantize(req["f16"].encode(), req["q4_0"].encode(), ctypes.byref(params))
quantize_s = time.perf_counter() - t
if rc != 0:
    sys.exit(f"llama_model_quantize failed ({rc})")
window = req["window"]
scores = []
for path in req["files"]:
    llm = Llama(model_path=path, n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                n_threads=req["threads"], n_threads_batch=req["threads"], verbose=False)
    ppl, predictions = [], []
    for k, ids in enumerate(req["texts"]):
        nll, n = 0.0, 0
        for at in range(0, len(ids), window):
            w = ids[at:at + window]
            if len(w) < 2:
                continue
            llm.reset()
            llm.eval(w)
            logits = np.array(llm.scores[:len(w) - 1], dtype=np.float64)
            m = logits.max(axis=1, keepdims=True)
            logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
            target = np.array(w[1:])
            nll += float((logz - logits[np.arange(len(w) - 1), target]).sum())
            n += len(w) - 1
            if k == 0:
                predictions += [int(i) for i in logits.argmax(axis=1)]
        ppl.append(float(np.exp(nll / max(n, 1))))
    scores.append({"path": path, "perplexity": ppl, "predictions": predictions})
    del llm
print(json.dumps({"version": llama_cpp.__version__, "quantize_s": quantize_s, "scores": scores}))
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_result_is_read() {
        let out = br#"{"version": "0.3.36", "quantize_s": 1.5, "scores": [{"path": "a.gguf", "perplexity": [8.0, 20.0], "predictions": [1, 2]}]}"#;
        let r = parse(out).unwrap();
        assert_eq!((r.version.as_str(), r.quantize_s), ("0.3.36", 1.5));
        assert_eq!(r.scores[0].perplexity, vec![8.0, 20.0]);
        assert_eq!(r.scores[0].predictions, vec![1, 2]);
        assert!(matches!(
            parse(b"Traceback"),
            Err(EvalError::PeerOutput { .. })
        ));
    }
}
