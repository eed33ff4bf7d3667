#!/usr/bin/env python3
"""Runs what `ft recipe export` wrote through the real packages, and prints as JSON what they
make of it:

    python3 scripts/export_check.py AXOLOTL_DIR TORCHTUNE_DIR N > out.json

- axolotl (0.18): `validate_config` of axolotl.yaml, the keys its schema does not know, and the
  input ids and labels its `input_output` strategy makes of the first N training examples,
  with the model's tokenizer.json (written by the torchtune export) as a fast HF tokenizer;
- torchtune: the tokens and labels ft_data.py (which imports torch and tokenizers only)
  gives the same examples.

Needs torch, transformers and tokenizers, and axolotl with pillow and addict on the path.
"""

import json
import os
import sys

import yaml
from axolotl.prompt_strategies.input_output import load as input_output
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
from axolotl.utils.schemas.config import AxolotlInputConfig
from axolotl.utils.schemas.datasets import SFTDataset
from transformers import PreTrainedTokenizerFast


def rows(path, n):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def main():
    ax_dir, tt_dir, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(os.path.join(ax_dir, "axolotl.yaml"), encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    cfg = validate_config(DictDefault(yaml.safe_load(yaml.safe_dump(raw))))
    unknown = [k for k in raw if k not in AxolotlInputConfig.model_fields]
    for d in raw.get("datasets", []) + raw.get("test_datasets", []):
        unknown += ["datasets." + k for k in d if k not in SFTDataset.model_fields]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(tt_dir, "tokenizer", "tokenizer.json"),
        eos_token="<|im_end|>",
    )
    strategy = input_output(tokenizer, cfg)
    train = os.path.join(ax_dir, raw["datasets"][0]["path"])
    axolotl = []
    for row in rows(train, n):
        t = strategy.tokenize_prompt(row)
        axolotl.append({"input_ids": t["input_ids"], "labels": t["labels"]})

    sys.path.insert(0, tt_dir)
    with open(os.path.join(tt_dir, "torchtune.yaml"), encoding="utf-8") as f:
        tt = yaml.safe_load(f)
    import ft_data

    tok = tt["tokenizer"]
    tt_tokenizer = ft_data.SegmentsTokenizer(
        os.path.join(tt_dir, tok["path"]), tok["pad_id"], tok["eos_id"], tok["max_seq_len"]
    )
    sources = [os.path.join(tt_dir, s) for s in tt["dataset"]["sources"]]
    dataset = ft_data.segments_dataset(tt_tokenizer, sources)
    torchtune = [dataset[i] for i in range(n)]

    json.dump({
        "axolotl_optimizer": cfg.get("optimizer"),
        "axolotl_unknown": unknown,
        "axolotl": axolotl,
        "torchtune": torchtune,
        "torchtune_examples": len(dataset),
    }, sys.stdout)
    print()


if __name__ == "__main__":
    main()
