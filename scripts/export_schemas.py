#!/usr/bin/env python3
"""The config schemas `ft recipe export` writes against, as the JSON fixture
`fixtures/reference/export_schemas.json` holds them:

    PYTHONPATH=AXOLOTL_AND_TORCHTUNE_SITE python3 scripts/export_schemas.py > fixture.json

axolotl's are read from its pydantic models (axolotl imports with torch, transformers, peft,
pydantic, pillow and addict: install axolotl with --no-deps beside them). torchtune's are
read from its source with `ast`, without importing it (torchtune pins torchao to the torch of
its day): every component's parameters, and the top-level keys its LoRA recipe reads.
"""

import ast
import importlib.util
import json
import re
import sys
from importlib.metadata import version
from pathlib import Path

from axolotl.utils.schemas.config import AxolotlInputConfig
from axolotl.utils.schemas.datasets import SFTDataset

# The torchtune components the export names, by dotted path: (module file, function or class).
COMPONENTS = {
    "torchtune.models.llama3_2._component_builders.lora_llama3_2": (
        "torchtune/models/llama3_2/_component_builders.py", "lora_llama3_2"),
    "torchtune.training.FullModelHFCheckpointer": (
        "torchtune/training/checkpointing/_checkpointer.py", "FullModelHFCheckpointer"),
    "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup": (
        "torchtune/training/lr_schedulers.py", "get_cosine_schedule_with_warmup"),
    "torchtune.modules.loss.CEWithChunkedOutputLoss": (
        "torchtune/modules/loss/ce_chunked_output_loss.py", "CEWithChunkedOutputLoss"),
    "torchtune.training.metric_logging.DiskLogger": (
        "torchtune/training/metric_logging.py", "DiskLogger"),
    "torchtune.training.metric_logging.TensorBoardLogger": (
        "torchtune/training/metric_logging.py", "TensorBoardLogger"),
    "torchtune.training.setup_torch_profiler": (
        "torchtune/training/_profiler.py", "setup_torch_profiler"),
}

# Parameters the recipe passes itself (the optimizer's params, the tokenizer of a dataset).
PASSED = {"self", "model", "optimizer", "num_training_steps", "last_epoch", "params", "cfg"}


def parameters(tree, name):
    """The parameter names of function or class `name` (its __init__) in `tree`, and whether
    it takes **kwargs."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            fn = node
            break
        if isinstance(node, ast.ClassDef) and node.name == name:
            fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            break
    else:
        raise SystemExit(f"{name} not found")
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return [n for n in names if n not in PASSED], a.kwarg is not None


def torchtune(root):
    out = {}
    for path, (file, name) in COMPONENTS.items():
        tree = ast.parse((root / file).read_text())
        params, kwargs = parameters(tree, name)
        out[path] = {"parameters": params, "kwargs": kwargs}
    recipe = (root / "recipes" / "lora_finetune_distributed.py").read_text()
    keys = set(re.findall(r"cfg\.get\(\s*\"(\w+)\"", recipe)) | set(re.findall(r"cfg\.(\w+)", recipe))
    keys -= {"get", "pop"}
    return {"components": out, "recipe_keys": sorted(keys)}


def main():
    # Found, not imported.
    root = Path(importlib.util.find_spec("torchtune").origin).parent.parent
    json.dump({
        "axolotl": {
            "version": version("axolotl"),
            "config_fields": sorted(AxolotlInputConfig.model_fields),
            "dataset_fields": sorted(SFTDataset.model_fields),
        },
        "torchtune": {"version": version("torchtune"), **torchtune(root)},
    }, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
