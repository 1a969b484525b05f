"""The shared fine-tuning loop: step time and peak RSS of one optimizer step, old loss against new, fp32 against
bf16 autocast, with and without length grouping and gradient checkpointing.

    python benchmarks/finetune.py --student DIR [--data-dir shared/data/eval] [--examples 16] [--batch 8] [--steps 2]
        [--config CONFIG.json]   # random weights of that architecture (timing and memory do not depend on them)

Each variant runs in a fresh process on the same gsm8k train examples (the task's fixed transfer sample), LoRA
rank 16 on every linear matrix (as `methods/lora.py`). Prints one table: seconds per optimizer step (the mean
over steps after the first), its ratio against the old loop (logits at every position, one cross-entropy over
[batch x length, vocab]) measured in the same run (against the first variant that finished, when the old loop
runs out of memory), peak RSS during training and its growth over the RSS after
loading, and the losses (the variants must agree to bf16 rounding).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

VARIANTS = {
    "old loop (full logits), fp32": {"objective": "full"},
    "response-only chunked CE, fp32": {},
    "  + bf16 autocast": {"autocast": "bf16"},
    "  + bf16 autocast + group_by_length": {"autocast": "bf16", "group_by_length": True},
    "  + bf16 + group_by_length + grad. checkpointing": {"autocast": "bf16", "group_by_length": True,
                                                          "gradient_checkpointing": True},
}


def full_logit_ce(model, batch):
    """The loss as the loop computed it before this change: logits at every position of every row."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                             reduction="sum")


def child(args, options: dict) -> dict:
    import threading

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pkt_bench import finetune as ft
    from pkt_bench.models import LINEAR_MODULES
    from pkt_bench.spec import Budget
    from pkt_bench.stages import rss_bytes
    from pkt_bench.tasks.gsm8k import GSM8K

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    if args.config:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEAR_MODULES,
                                             task_type="CAUSAL_LM"))
    examples = GSM8K(args.data_dir).transfer_data("train")[: args.examples]
    options = dict(options)
    objective = full_logit_ce if options.pop("objective", None) == "full" else None
    budget = Budget(examples=args.examples, epochs=args.steps * args.batch // args.examples or 1,
                    batch_size=args.batch, max_length=512, warmup_ratio=0.0, **options)
    loaded = rss_bytes()
    peak = [loaded]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_bytes())

    times: list[float] = []
    original_step = torch.optim.AdamW.step

    def timed_step(self, *a, **k):  # one optimizer step ends here: note the time since the previous one
        out = original_step(self, *a, **k)
        times.append(time.perf_counter())
        return out

    torch.optim.AdamW.step = timed_step
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    stats = ft.finetune(model, tokenizer, examples, budget, seed=0, objective=objective)
    done.set()
    thread.join()
    steps = [b - a for a, b in zip([started, *times], times)]
    return {"step_s": steps, "peak_mb": peak[0] / 2**20, "loaded_mb": loaded / 2**20,
            "losses": [stats.first_loss, stats.last_loss],
            "autocast": stats.autocast}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="HF folder of the student (its tokenizer at least)")
    parser.add_argument("--config", default="", help="config.json: random weights of this architecture")
    parser.add_argument("--data-dir", default="shared/data/eval")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args, VARIANTS[args.variant])))
        return
    results = {}
    for name in VARIANTS:
        command = [sys.executable, __file__, "--student", args.student, "--data-dir", args.data_dir, "--examples",
                   str(args.examples), "--batch", str(args.batch), "--steps", str(args.steps), "--variant", name]
        if args.config:
            command += ["--config", args.config]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, json.dumps(results[name]), flush=True)
    base = next(iter(results.values()), None)
    if base is None:
        return

    def step(r):
        later = r["step_s"][1:] or r["step_s"]
        return sum(later) / len(later)

    print("\n| variant | s / step | vs first | peak RSS (MB) | growth over loaded (MB) | losses (first, last) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name.strip()} | {step(r):.1f} | {step(base) / step(r):.2f}x | {r['peak_mb']:.0f} | "
              f"{r['peak_mb'] - r['loaded_mb']:.0f} | {r['losses'][0]:.3f}, {r['losses'][1]:.3f} |")


if __name__ == "__main__":
    main()
