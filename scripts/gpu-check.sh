#!/usr/bin/env bash
# The check of the CUDA path, about 8 minutes on one H100:
#
#   scripts/gpu-check.sh [MODEL] [FT]
#
# MODEL  a GGUF file or HF folder (default: the default model, fetched into $FT_HOME).
# FT     an ft built with `--features cuda` (default: built here into target-cuda/).
#
# 1. Numerics: greedy tokens and perplexity of the CUDA forward against the CPU's; fails when
#    the tokens differ or the perplexities differ by more than 1e-3 (relative).
# 2. A 20-step QLoRA run on the GPU whose training loss must fall.
# 3. Benchmark: one recipe as QLoRA (NF4 + double quant base, paged AdamW; base matmuls in
#    f32 and in bf16) and as LoRA on a bf16 base (AdamW, bf16 matmuls): training tokens/s (the
#    median step after 10 warm-up steps, which include the kernels' compilation), peak device
#    memory of each process (nvidia-smi, polled every 0.2 s) and the run's own memory report
#    (device-resident weights, adapters, gradients, moments; paged moments in host memory).
#
# Where no NVIDIA GPU is found the CUDA checks are skipped with a message and the script exits
# 0. DEVICE=cpu runs the same steps on the CPU against itself (a dry run of the script).
set -u
device=${DEVICE:-cuda}
root=$(cd "$(dirname "$0")/.." && pwd)

if [ "$device" != cpu ]; then
  if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L 2> /dev/null | grep -q GPU; then
    echo "gpu-check: skipped, no NVIDIA GPU found (nvidia-smi lists none)"
    exit 0
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # The CUDA backend compiles its kernels at run time with NVRTC: find its library.
  nvrtc=$(find -L /usr/local/cuda*/lib64 /usr/local/cuda*/targets /usr/lib/x86_64-linux-gnu -name 'libnvrtc.so*' \
    2> /dev/null | head -1)
  [ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"
fi

model=${1:-smollm2-135m-instruct}
[ -e "$model" ] && model=$(realpath "$model")
if [ -n "${2:-}" ]; then
  ft=$(realpath "$2")
else
  echo "== building ft with --features cuda"
  (cd "$root" && cargo build -p ft-cli --features cuda --bin ft --target-dir target-cuda) || exit 1
  ft=$root/target-cuda/debug/ft
fi
work=$(mktemp -d)
cd "$work" || exit 1
# burn's CUDA backend compiles kernels at run time; let the runs below share what one compiled.
cat > cubecl.toml <<'TOML'
[compilation]
cache = "local"
[autotune]
cache = "local"
TOML
failed=0
fail() { echo "FAIL: $*"; failed=1; }

echo "== $(date +%T) 1. numerics: $device against cpu on $model"
cp "$root/fixtures/reference/kjv_genesis_1-3.txt" text.txt
for dev in cpu "$device"; do
  timeout 180 "$ft" generate --model "$model" --prompt "In the beginning" --max-new-tokens 16 \
    --json --device "$dev" > "generate-$dev.json" || fail "generate on $dev"
  timeout 180 "$ft" perplexity --model "$model" --file text.txt --json --device "$dev" \
    > "perplexity-$dev.json" || fail "perplexity on $dev"
done
python3 - "$device" <<'PY' || failed=1
import json, sys
dev = sys.argv[1]
def last(path):
    lines = [l for l in open(path) if l.strip()]
    return json.loads(lines[-1]) if lines else {}
g_cpu, g_dev = last("generate-cpu.json"), last(f"generate-{dev}.json")
p_cpu, p_dev = last("perplexity-cpu.json"), last(f"perplexity-{dev}.json")
ok = True
if g_cpu.get("ids") != g_dev.get("ids"):
    print("FAIL: greedy tokens differ:", g_cpu.get("ids"), g_dev.get("ids")); ok = False
a, b = p_cpu.get("perplexity"), p_dev.get("perplexity")
rel = abs(a - b) / abs(a) if a and b else float("nan")
print(f"perplexity cpu {a} {dev} {b} relative difference {rel:.2e}")
if not rel <= 1e-3:
    print("FAIL: perplexity differs by more than 1e-3"); ok = False
sys.exit(0 if ok else 1)
PY

recipe() { # name quant optimizer steps [compute dtype]
  local compute=${5:-f32}
  [ "$device" = cpu ] && compute=f32
  cat > "$1.toml" <<TOML
[model]
source = "$model"
device = "$device"
[quant]
base = "$2"
double_quant = $([ "$2" = nf4 ] && echo true || echo false)
compute_dtype = "$compute"
[lora]
r = 16
alpha = 32
dropout = 0.0
[data]
task = "dates"
max_seq_len = 64
[train]
max_steps = $4
micro_batch_size = 8
lr = 1e-3
warmup_steps = 2
optimizer = "$3"
[eval]
exact_match = false
[output]
dir = "runs/$1"
TOML
}

# Runs `ft train NAME.toml` with a timeout; prints the peak device memory of the process.
train() {
  timeout "$2" "$ft" train "$1.toml" > "$1.log" 2>&1 &
  local pid=$! peak=0 used
  while kill -0 $pid 2> /dev/null; do
    if [ "$device" != cpu ]; then
      used=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits \
        2> /dev/null | awk -F', ' -v p="$(pgrep -P $pid ft || echo $pid)" '$1 == p { print $2 }')
      # Where the process table hides other namespaces' pids: the whole card's use above idle.
      [ -z "$used" ] && used=$(( $(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits \
        2> /dev/null | head -1) - idle_used ))
      [ -n "$used" ] && [ "$used" -gt "$peak" ] && peak=$used
    fi
    sleep 0.2
  done
  wait $pid
  local rc=$?
  echo "$peak" > "$1.peak"
  return $rc
}

idle_used=0
[ "$device" != cpu ] && idle_used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)

echo "== $(date +%T) 2. a short QLoRA run on $device"
recipe short nf4 paged_adamw 20
train short 150 || fail "the short QLoRA run (see $work/short.log)"
python3 - <<'PY' || failed=1
import json
losses = [json.loads(l)["train/loss"] for l in open("runs/short/metrics.jsonl")]
first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"loss, mean of the first 5 steps {first:.4f}, of the last 5 {last:.4f}")
if not last < first:
    print("FAIL: the loss did not fall")
    raise SystemExit(1)
PY

echo "== $(date +%T) 3. benchmark: QLoRA (nf4 + dq, paged AdamW) against LoRA on a bf16 base, 40 steps"
recipe qlora nf4 paged_adamw 40 f32
recipe qlora-bf16 nf4 paged_adamw 40 bf16
recipe lora-bf16 bf16 adamw 40 bf16
for name in qlora qlora-bf16 lora-bf16; do
  train $name 150 || fail "$name (see $work/$name.log)"
done
python3 - <<'PY'
import json, statistics
mib = lambda b: f"{b / 2**20:.1f}"
print("| recipe | base | matmuls | train tok/s | peak device memory (nvidia-smi) "
      "| device-resident: weights / LoRA+grads / moments | host: paged moments | final loss |")
print("|---|---|---|---|---|---|---|---|")
for name, base, compute in [("qlora", "nf4 + double quant", "f32"),
                            ("qlora-bf16", "nf4 + double quant", "bf16"),
                            ("lora-bf16", "bf16", "bf16")]:
    try:
        s = json.load(open(f"runs/{name}/summary.json"))
        steps = [json.loads(l) for l in open(f"runs/{name}/metrics.jsonl")]
        rates = [m["train/tokens_per_s"] for m in steps if "train/tokens_per_s" in m]
        rate = statistics.median(rates[10:] or rates)
        peak = open(f"{name}.peak").read().strip()
        peak = f"{peak} MiB" if peak != "0" else "-"
        m = s["memory"]
        print(f"| {name} | {base} | {compute} | {rate:.1f} | {peak} "
              f"| {mib(m['device_weights'])} / {mib(m['device_trainable'] + m['device_gradients'])}"
              f" / {mib(m['device_optimizer_states'])} MiB "
              f"| {mib(m['host_paged_optimizer_states'])} MiB | {s['train_loss']:.4f} |")
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        print(f"| {name} | {base} | {compute} | did not finish | - | - | - | - |")
PY

echo "== $(date +%T) done"
if [ $failed = 0 ]; then echo "gpu-check: passed ($work)"; else echo "gpu-check: FAILED ($work)"; fi
exit $failed
