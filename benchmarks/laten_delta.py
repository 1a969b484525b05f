"""How large LaTen's Δ is, and how much of it each weight precision keeps when it is merged into the student.

    python benchmarks/laten_delta.py --extraction RESULTS/cache/laten-extract-KEY --student DIR

Reads a cached LaTen extraction (the trained translator and the fusion's teacher vectors, `methods/laten/store.py`),
computes Δ = translator(teacher vectors) as `LaTen.transfer` does, and, over every student weight Δ targets,
prints |Δ| and |Δ| / |W| quantiles (over the weights that are not 0; their share is printed), the share of
weights whose stored value changes when W + Δ (summed in fp32) is cast to bf16 (the CPU grid's precision), fp16
(upstream's) and fp32, and how far training moved the translator's weights from their seeded init (LaTen's
default `translator_init_std` and `extract_seed`). For a bf16 student the bf16 count equals the record's
`costs.weights_changed`. Light: loads the student only, no forward pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from methods.laten import LaTenConfig  # noqa: E402
from methods.laten.align import Translator, targets  # noqa: E402
from methods.laten.store import load_fusion  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTILES = (0.5, 0.9, 0.99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extraction", required=True, help="a laten-extract-* folder of a results cache")
    parser.add_argument("--student", required=True, help="the student the extraction was made for")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.student, dtype="auto")  # W as the student stores it
    translator, selection, vectors = load_fusion(Path(args.extraction))
    defaults = LaTenConfig()
    first = next(iter(translator.mlps.values()))
    init = Translator(list(translator.mlps), first[0].in_features, first[2].out_features, first[0].out_features,
                      defaults.translator_init_std, defaults.extract_seed)
    with torch.no_grad():
        moved = max(float((p - p0).abs().max()) for p, p0 in zip(translator.parameters(), init.parameters()))
        deltas = translator(vectors)
    params = dict(model.named_parameters())
    targeted, zeros, changed, sizes, ratios = 0, 0, dict.fromkeys(DTYPES, 0), [], []
    with torch.no_grad():
        for name, axis, indices, block in targets(model, selection, deltas):
            w = params[name].index_select(axis, indices).float()  # W + Δ summed in fp32, as `align.merge` does
            targeted += w.numel()
            zeros += int((w == 0).sum())
            for label, dtype in DTYPES.items():
                changed[label] += int(((w + block).to(dtype) != w.to(dtype)).sum())
            sizes.append(block.abs().flatten())
            ratios.append((block.abs() / w.abs())[w != 0])
    q = torch.tensor(QUANTILES)
    size, ratio = torch.cat(sizes), torch.cat(ratios)
    draw = torch.Generator().manual_seed(0)
    size, ratio = (x[torch.randperm(x.numel(), generator=draw)[: 2**24]] for x in (size, ratio))  # quantile's limit
    print(f"student stored in {model.dtype}; weights Δ targets: {targeted:,}, of which 0: {zeros / targeted:.1%}")
    print(f"translator: largest move of a weight from its init (σ = {defaults.translator_init_std:g}): {moved:.2e}")
    print("| quantile | " + " | ".join(f"{x:g}" for x in QUANTILES) + " |")
    print("|---|" + "---|" * len(QUANTILES))
    print("| abs(Δ) | " + " | ".join(f"{v:.2e}" for v in torch.quantile(size, q).tolist()) + " |")
    print("| abs(Δ) / abs(W), W ≠ 0 | " + " | ".join(f"{v:.2e}" for v in torch.quantile(ratio, q).tolist()) + " |")
    print("\n| merged in | weights changed | share |\n|---|---|---|")
    for label, count in changed.items():
        print(f"| {label} | {count:,} | {count / targeted:.1%} |")


if __name__ == "__main__":
    main()
