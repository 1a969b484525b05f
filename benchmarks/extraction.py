"""Sensitivity extraction: time and memory against plain training passes, block search and factorization speed.

    python benchmarks/extraction.py --teacher DIR --student DIR [--data PATH/gsm8k/train.jsonl] [--seeds 8]

Prints one table; every figure is a ratio against a baseline measured in the same run:
- extraction (layer-wise sensitivity over the seeds) wall time / one plain forward+backward per seed;
- peak RSS during the pass / the teacher's weight bytes, for the extraction and for the plain passes (each in
  a fresh process; the peak is reset after loading, so the loader's transient copies do not count; the RSS
  after imports, before loading, is subtracted);
- the vectorized max-sum block search / a Python loop over window offsets (the reference's search), same block;
- the factorizations (exact: Gram eigenvectors; randomized: svd_lowrank) / a full SVD (`full_matrices=True` as
  in the reference, and `False`), with the approximation error relative to the optimal rank-r error.
Timings of the block search and factorizations are the best of 3 after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def seeds(data: Path | None, n: int):
    from pkt_bench.api import Example

    if data is None:  # no data: fixed arithmetic word problems of GSM8K length
        return [Example(f"Question: Sam has {i} apples and buys {i + 3} more. How many apples does he have?\nAnswer:",
                        f" Sam has {i} + {i + 3} = {2 * i + 3} apples.\n#### {2 * i + 3}", str(i)) for i in range(n)]
    rows = [json.loads(line) for line in data.read_text().splitlines()[:n]]
    return [Example(f"Question: {r['question']}\nAnswer:", " " + r["answer"], str(i)) for i, r in enumerate(rows)]


def child(mode: str, teacher: str, data: str | None, n: int, max_length: int) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pkt_bench.finetune import encode
    from pkt_bench.methods.sensitivity import matrix_key, sensitivity

    torch.set_num_threads(torch.get_num_threads())
    base = _status_mb("VmRSS")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    examples = seeds(Path(data) if data else None, n)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    started = time.perf_counter()
    if mode == "plain":  # what training does per sample: a forward and a backward through every parameter
        model.requires_grad_(True)
        for example in examples:
            ids, labels = encode(example, tokenizer, max_length)
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
            model.zero_grad(set_to_none=False)
    else:
        totals = [0.0] * model.config.num_hidden_layers
        for _name, score in sensitivity(model, tokenizer, examples, max_length,
                                        lambda n: matrix_key(n) is not None and "embed" not in n and "lm_head" not in n,
                                        totals):
            del score
    wall = time.perf_counter() - started
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_growth_mb": _status_mb("VmHWM") - base,
                      "weight_mb": weight_mb}))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def direct_block(score, rows: int, cols: int) -> tuple[int, int]:
    """The naive search: a Python loop over every window offset, summing each window."""
    best, where = -1.0, (0, 0)
    for a in range(score.shape[0] - rows + 1):
        for b in range(score.shape[1] - cols + 1):
            total = score[a : a + rows, b : b + cols].double().sum().item()
            if total > best:
                best, where = total, (a, b)
    return where


def naive_block(score, rows: int, cols: int) -> tuple[int, int]:
    """The reference's search: summed-area table, then a Python loop over every window offset."""
    prefix = torch.nn.functional.pad(score.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    best, where = -1.0, (0, 0)
    for a in range(score.shape[0] - rows + 1):
        for b in range(score.shape[1] - cols + 1):
            total = (prefix[a + rows, b + cols] - prefix[a, b + cols] - prefix[a + rows, b] + prefix[a, b]).item()
            if total > best:
                best, where = total, (a, b)
    return where


def best_of(fn, repeat: int = 3):
    """(best wall seconds of `repeat` calls after one warm-up call, the last result)."""
    result, best = fn(), float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def block_and_svd(teacher: str, student: str, rank: int) -> list[tuple[str, float, float, str]]:
    from safetensors import safe_open
    from transformers import AutoConfig

    from pkt_bench.methods.sensitivity import factorize, max_block

    rows_out = []
    t_cfg, s_cfg = AutoConfig.from_pretrained(teacher), AutoConfig.from_pretrained(student)
    with safe_open(next(Path(teacher).glob("*.safetensors")), "pt") as f:
        matrices = {name: f.get_tensor(f"model.layers.0.{name}.weight").float()
                    for name in ("self_attn.k_proj", "self_attn.q_proj", "mlp.up_proj")}
    kv = s_cfg.num_key_value_heads * getattr(s_cfg, "head_dim", s_cfg.hidden_size // s_cfg.num_attention_heads)
    for name, search, (rows, cols) in (("self_attn.k_proj", direct_block, (kv, s_cfg.hidden_size)),
                                       ("self_attn.k_proj", naive_block, (kv, s_cfg.hidden_size)),
                                       ("self_attn.q_proj", naive_block, (s_cfg.hidden_size, s_cfg.hidden_size))):
        weight = matrices[name]
        score = weight.abs() * torch.rand_like(weight)  # a real matrix's shape with a sensitivity-like map
        fast_s, fast = best_of(lambda: max_block(score, rows, cols))
        started = time.perf_counter()
        slow = search(score, rows, cols)
        slow_s = time.perf_counter() - started
        how = "summing each window" if search is direct_block else "summed-area table (the reference)"
        rows_out.append((f"block search, {name} {tuple(weight.shape)} -> {rows}x{cols}, vs a Python loop {how}",
                         fast_s, slow_s, f"{slow_s / fast_s:,.0f}x faster, same block: {fast == slow}"))
    up = matrices["mlp.up_proj"]
    block = up[: s_cfg.intermediate_size, : s_cfg.hidden_size].contiguous()
    for full in (True, False):
        svd_s, (u, s, vh) = best_of(lambda: torch.linalg.svd(block, full_matrices=full))
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        for how in ("exact", "randomized"):
            ours, (b, a) = best_of(lambda: factorize(block, rank, "paper", how))
            excess = ((block - b @ a).norm() / (block - best).norm() - 1).item()
            rows_out.append((f"rank-{rank} {how} factorization of up_proj block {tuple(block.shape)} vs full SVD "
                             f"(full_matrices={full})", ours, svd_s,
                             f"{svd_s / ours:.1f}x faster; error {excess:+.1e} over optimal; "
                             f"‖BA − best‖/‖best‖ {((b @ a - best).norm() / best.norm()).item():.1e}"))
    del t_cfg
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--data", help="GSM8K train.jsonl for the seeds (default: built-in word problems)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--only", choices=("extract", "plain", "kernels"),
                        help="run one part only (e.g. when memory does not allow both passes at once)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.teacher, args.data, args.seeds, args.max_length)

    from rich.console import Console
    from rich.table import Table

    runs = {}
    for mode in [m for m in ("plain", "extract") if args.only in (None, m)]:
        command = [sys.executable, __file__, "--child", mode, "--teacher", args.teacher, "--student", args.student,
                   "--seeds", str(args.seeds), "--max-length", str(args.max_length)] + (
                       ["--data", args.data] if args.data else [])
        runs[mode] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    table = Table(title=f"sensitivity extraction, teacher {Path(args.teacher).name} fp32 on CPU, {args.seeds} seeds, "
                        f"{torch.get_num_threads()} threads")
    for column in ("measurement", "ours", "baseline", "ratio"):
        table.add_column(column)
    if len(runs) == 2:
        table.add_row("wall time: extraction vs plain forward+backward per seed", f"{runs['extract']['wall_s']:.1f} s",
                      f"{runs['plain']['wall_s']:.1f} s", f"{runs['extract']['wall_s'] / runs['plain']['wall_s']:.2f}")
    for name, run in runs.items():
        table.add_row(f"peak RSS during the pass / teacher weight bytes: {name}{' (wall ' + format(run['wall_s'], '.0f') + ' s)' if len(runs) == 1 else ''}", f"{run['peak_growth_mb']:,.0f} MB",
                      f"{run['weight_mb']:,.0f} MB", f"{run['peak_growth_mb'] / run['weight_mb']:.2f}")
    for label, ours, baseline, note in block_and_svd(args.teacher, args.student, args.rank) \
            if args.only in (None, "kernels") else ():
        table.add_row(label, f"{ours:.3f} s", f"{baseline:.3f} s", note)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
