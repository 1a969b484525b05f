"""SemAlign's semantic bases on real LM heads: time and peak memory, against an fp64 SVD pseudo-inverse.

    python benchmarks/semalign.py --teacher DIR --student DIR [--slice 16384]

For each model, in a fresh process: the head is read from its safetensors file alone (`lm_head.weight`, else the
tied `model.embed_tokens.weight`) and cut to the tokenizer's rows; then
- bases: `semantic_bases` (the Gram route, fp64 [D, D], head in chunks) on the whole head, its seconds and its peak
  RSS above the RSS after loading (the peak is reset there, so the loader's copies do not count), as a ratio to the bytes of the fp32 result;
- baseline: on the first `--slice` rows, the Gram route against `torch.linalg.pinv` of the slice in fp64 (an SVD,
  what the notes suggest), their time ratio and the largest difference between the two bases (unit columns).
The whole-head SVD is not run: in fp64 it needs several times the head's size (≈ 2 GB for 152k × 1536 each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def peak_mb(reset: bool = False) -> float:
    """The process's peak RSS (VmHWM); `reset` restarts it from the current RSS (Linux clear_refs 5)."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def head(folder: str):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    rows = len(AutoTokenizer.from_pretrained(folder))
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as f:
        name = "lm_head.weight" if "lm_head.weight" in f.keys() else "model.embed_tokens.weight"
        return f.get_tensor(name)[:rows].float()


def measure(folder: str, slice_rows: int) -> dict:
    import torch

    from pkt_bench.methods.semalign.bases import semantic_bases

    torch.manual_seed(0)
    w = head(folder)
    loaded = peak_mb(reset=True)
    start = time.perf_counter()
    bases = semantic_bases(w)
    seconds = time.perf_counter() - start
    peak = peak_mb() - loaded
    part = w[:slice_rows]
    start = time.perf_counter()
    gram = semantic_bases(part)
    gram_s = time.perf_counter() - start
    start = time.perf_counter()
    svd = torch.linalg.pinv(part.double()).float()
    svd = svd / svd.norm(dim=0, keepdim=True).clamp_min(1e-12)
    svd_s = time.perf_counter() - start
    return {"rows": w.shape[0], "width": w.shape[1], "bases_s": seconds, "peak_added_mb": peak,
            "result_mb": bases.numel() * 4 / 2**20, "slice_gram_s": gram_s, "slice_svd_s": svd_s,
            "slice_max_diff": (gram - svd).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--slice", type=int, default=16384)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.slice)))
        return
    print("| model | rows × width | bases s | peak added / fp32 result | slice: SVD s / Gram s | slice max |Δ| |")
    print("|---|---|---|---|---|---|")
    for which in ("student", "teacher"):
        folder = getattr(args, which)
        out = subprocess.run([sys.executable, __file__, "--teacher", "-", "--student", "-", "--slice",
                              str(args.slice), "--one", folder], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {which} | {r['rows']} × {r['width']} | {r['bases_s']:.1f} | "
              f"{r['peak_added_mb']:.0f} MB / {r['result_mb']:.0f} MB = {r['peak_added_mb'] / r['result_mb']:.2f} | "
              f"{r['slice_svd_s']:.2f} / {r['slice_gram_s']:.2f} = {r['slice_svd_s'] / r['slice_gram_s']:.1f} | "
              f"{r['slice_max_diff']:.1e} |")


if __name__ == "__main__":
    main()
