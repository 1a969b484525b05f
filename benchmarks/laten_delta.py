"""How large LaTen's Δ is, and how much of it each weight precision keeps when it is merged into the student.

    python benchmarks/laten_delta.py --extraction RESULTS/cache/laten-extract-KEY --student DIR

Reads a cached LaTen extraction (the trained translator and the fusion's teacher vectors, `methods/laten/store.py`),
computes Δ = translator(teacher vectors) as `LaTen.transfer` does, and, over every student weight Δ targets,
prints |Δ| and |Δ| / |W| quantiles and the share of weights whose stored value changes when W + Δ (summed in
fp32) is cast to bf16 (the CPU grid's precision), fp16 (upstream's) and fp32. The bf16 count equals the record's
`costs.weights_changed`. Light: loads the student only, no forward pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from methods.laten.align import _targets  # noqa: E402
from methods.laten.store import load_fusion  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTILES = (0.5, 0.9, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extraction", required=True, help="a laten-extract-* folder of a results cache")
    parser.add_argument("--student", required=True, help="the student the extraction was made for")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    translator, selection, vectors = load_fusion(Path(args.extraction))
    with torch.no_grad():
        deltas = translator(vectors)
    params = dict(model.named_parameters())
    targeted, changed, sizes, ratios = 0, dict.fromkeys(DTYPES, 0), [], []
    with torch.no_grad():
        for name, axis, indices, block in _targets(model, selection, deltas):
            # W as the student stores it (bf16 for the Qwen pair), then W + Δ summed in fp32 as `align.merge` does
            w = params[name].index_select(axis, indices).to(torch.bfloat16).float()
            targeted += w.numel()
            for label, dtype in DTYPES.items():
                changed[label] += int(((w + block).to(dtype) != w.to(dtype)).sum())
            sizes.append(block.abs().flatten())
            ratios.append((block.abs() / w.abs().clamp_min(1e-12)).flatten())
    q = torch.tensor(QUANTILES)
    size, ratio = torch.cat(sizes), torch.cat(ratios)
    sample = torch.randperm(size.numel(), generator=torch.Generator().manual_seed(0))[: 2**24]  # quantile's size limit
    print(f"weights Δ targets: {targeted:,}")
    print("| quantile | " + " | ".join(f"{x:g}" for x in QUANTILES) + " |")
    print("|---|" + "---|" * len(QUANTILES))
    print("| abs(Δ) | " + " | ".join(f"{v:.2e}" for v in torch.quantile(size[sample], q).tolist()) + " |")
    print("| abs(Δ) / abs(W) | " + " | ".join(f"{v:.2e}" for v in torch.quantile(ratio[sample], q).tolist()) + " |")
    print("\n| merged in | weights changed | share |\n|---|---|---|")
    for label, count in changed.items():
        print(f"| {label} | {count:,} | {count / targeted:.1%} |")


if __name__ == "__main__":
    main()
