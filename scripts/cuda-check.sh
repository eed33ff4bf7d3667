#!/usr/bin/env bash
# CUDA against CPU on one model, with an ft built with `--features cuda`:
#   scripts/cuda-check.sh MODEL [FT]
# MODEL is an HF folder (or GGUF file), FT the binary (default target/debug/ft). Prints greedy
# tokens and perplexity on both devices, then trains the same small LoRA and QLoRA recipe on
# both and compares the loss curves step by step.
set -u
model=$(realpath "$1")
ft=$(realpath "${2:-target/debug/ft}")
work=$(mktemp -d)
cd "$work"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

printf 'In the beginning God created the heaven and the earth.\n%.0s' $(seq 20) > text.txt
for dev in cpu cuda; do
  echo "== $dev generate"; timeout 120 "$ft" generate --model "$model" --prompt "In the beginning" --max-new-tokens 16 --json --device $dev | tail -1
  echo "== $dev perplexity"; timeout 120 "$ft" perplexity --model "$model" --file text.txt --window 64 --json --device $dev | tail -1
done

python3 - <<'PY'
import json
rows = [{"prompt": f"{i} plus {j} is", "completion": f" {i + j}"} for i in range(12) for j in range(6)]
open("train.jsonl", "w").write("\n".join(json.dumps(r) for r in rows) + "\n")
PY
for name in lora qlora; do
  quant=none; [ $name = qlora ] && quant=nf4
  cat > $name.toml <<TOML
[model]
source = "$model"
[quant]
base = "$quant"
double_quant = $([ $name = qlora ] && echo true || echo false)
[lora]
r = 8
alpha = 16
dropout = 0.0
[data]
train = "train.jsonl"
val_fraction = 0.1
[train]
max_steps = 20
micro_batch_size = 8
lr = 0.005
optimizer = "paged_adamw"
page_min_elements = 1000
eval_every = 10
TOML
  for dev in cpu cuda; do
    echo "== $name $dev"
    timeout 240 "$ft" train $name.toml --set model.device=$dev --set output.dir=runs/$name-$dev > $name-$dev.log 2>&1
    echo "exit $?"
  done
  python3 - "$name" <<'PY'
import json, sys
name = sys.argv[1]
def losses(dev):
    try:
        return [json.loads(l)["train/loss"] for l in open(f"runs/{name}-{dev}/metrics.jsonl")]
    except FileNotFoundError:
        return []
c, g = losses("cpu"), losses("cuda")
diff = max((abs(a - b) / abs(a) for a, b in zip(c, g)), default=float("nan"))
print(name, "steps", len(c), len(g), "max relative loss difference", diff)
for dev in ["cpu", "cuda"]:
    try:
        s = json.load(open(f"runs/{name}-{dev}/summary.json"))
        print(name, dev, "val_loss", round(s["val_loss"], 5), "train tok/s", round(s["train_tokens_per_s"], 1))
    except FileNotFoundError:
        print(name, dev, "did not finish")
PY
done
