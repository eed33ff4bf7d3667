"""PEFT's side of `ft bench train --vs-peft`: the job ft trained, replayed with Hugging Face
transformers + PEFT on torch's CPU backend.

Usage: python peft_train.py JOB.json

JOB.json (written by ft, ft_eval::peers::peft::PeftJob) names an HF folder holding ft's own f32
base weights, the LoRA hyperparameters, AdamW's, the learning rate of every step, the thread
count and the micro-batches of every step exactly as ft's plan drew them: right-padded ids, an
attention mask, and labels that are -100 wherever ft trains no token (prompt tokens, padding).

The loss of a micro-batch is ft's: the summed next-token NLL of its labels divided by the
trained tokens of the whole step (so gradient accumulation averages over tokens, not batches),
then global-norm clipping and AdamW, as ft's step loop does. The first `warmup` steps run
untimed. Progress goes to stderr; stdout gets one JSON line: library versions, threads, timed
steps, the median step time, non-padding tokens per second over the timed steps, the peak
resident memory and the loss of the first step (the adapters start at B = 0, so it is the
base's loss on the first batch and should equal ft's).
"""

import json
import resource
import statistics
import sys
import time


def peak_rss():
    # VmHWM starts over at exec; ru_maxrss may carry the parent's peak across it.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    try:
        import torch
        import torch.nn.functional as F
        import transformers
        import peft
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        sys.exit(f"torch, transformers and peft are needed ({e})")

    torch.set_num_threads(job["threads"])
    torch.manual_seed(job["seed"])

    # f32 as stored: `dtype` since transformers 4.56, `torch_dtype` before.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(job["model"], **{dtype_kw: torch.float32})
    lora = job["lora"]
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["targets"],
        layers_to_transform=lora["layers"],
        use_rslora=lora["rslora"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = job["optimizer"]
    optimizer = torch.optim.AdamW(
        params,
        lr=opt["lr"][0],
        betas=tuple(opt["betas"]),
        eps=opt["eps"],
        weight_decay=opt["weight_decay"],
    )

    warmup = job["warmup"]
    times, tokens, losses = [], [], []
    for i, micro in enumerate(job["steps"]):
        batches = [
            (
                torch.tensor(b["input_ids"], dtype=torch.long),
                torch.tensor(b["attention_mask"], dtype=torch.long),
                torch.tensor(b["labels"], dtype=torch.long),
            )
            for b in micro
        ]
        for group in optimizer.param_groups:
            group["lr"] = opt["lr"][i]
        t0 = time.perf_counter()
        step_tokens = max(1, sum(int((y[:, 1:] != -100).sum()) for _, _, y in batches))
        loss_sum, real = 0.0, 0
        for ids, mask, labels in batches:
            shifted = labels[:, 1:]
            if not (shifted != -100).any():
                continue
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = (
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    shifted.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                / step_tokens
            )
            loss.backward()
            loss_sum += loss.item()
            real += int(mask.sum())
        if opt["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, opt["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss_sum)
        if i >= warmup:
            times.append(dt)
            tokens.append(real)
        kind = "warm-up" if i < warmup else "timed"
        print(
            f"PEFT step {i + 1}/{len(job['steps'])} ({kind}): loss {loss_sum:.4f}, {dt:.3f} s",
            file=sys.stderr,
            flush=True,
        )

    if not times:
        sys.exit("no timed step: the job has no steps after its warm-up")
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "threads": torch.get_num_threads(),
                "steps": len(times),
                "step_s": statistics.median(times),
                "tokens_per_s": sum(tokens) / sum(times),
                "peak_rss": peak_rss(),
                "first_loss": losses[0],
            }
        )
    )


if __name__ == "__main__":
    main()
