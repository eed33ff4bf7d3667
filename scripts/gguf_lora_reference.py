#!/usr/bin/env python3
"""llama.cpp's greedy tokens and their log-probabilities for a base GGUF with and without a
GGUF LoRA adapter, as the JSON fixture `fixtures/gguf_lora_llamacpp.json` holds them:

    python3 scripts/gguf_lora_reference.py BASE.gguf ADAPTER.gguf PROMPT N > fixture.json

Needs llama-cpp-python (pip install llama-cpp-python numpy). The prompt is tokenized by
llama.cpp without a BOS; each step takes the most likely token and records its
log-probability from the full softmax.
"""

import hashlib
import json
import sys

import numpy as np
from llama_cpp import Llama, __version__


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def greedy(base, adapter, prompt, n):
    kwargs = {"lora_path": adapter} if adapter else {}
    llm = Llama(model_path=base, n_ctx=64, n_threads=1, logits_all=True, verbose=False, **kwargs)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    out, logprobs = [], []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        logits -= logits.max()
        log_softmax = logits - np.log(np.exp(logits).sum())
        token = int(np.argmax(log_softmax))
        out.append(token)
        logprobs.append(float(log_softmax[token]))
        llm.eval([token])
    return {"prompt_ids": list(ids), "ids": out, "logprobs": logprobs}


def main():
    base, adapter, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    print(json.dumps({
        "llama_cpp_python": __version__,
        "base_sha256": sha256(base),
        "adapter_sha256": sha256(adapter),
        "prompt": prompt,
        "with_adapter": greedy(base, adapter, prompt, n),
        "base_only": greedy(base, None, prompt, n),
    }, indent=1))


if __name__ == "__main__":
    main()
