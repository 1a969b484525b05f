"""Align and fuse: LaTen's *translator* (its hypernetwork), the injection it is trained through, and the merge.

The translator is one small MLP per module type, g_m(x) = W2 · ReLU(W1 · x) with no biases, applied to each
teacher vector (an up_proj row, a down_proj column, a v_proj row, an o_proj column; teacher width) on its own,
giving a student-width vector Δ. One MLP serves every layer and every neuron. *Injection* adds the r-th
translated vector to the r-th selected row (up, v) or column (down, o) of the student: W' = W + Δ there and
nowhere else. The student stays frozen; its LM loss reaches the translator through W' by
`torch.func.functional_call`, which runs the student with W' in place of W without touching its parameters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pkt_bench.api import Example
from pkt_bench.finetune import encode

from .locate import MODULES, Selection

BETAS = (0.9, 0.95)  # upstream's AdamW betas; OneCycle cycles β1 between 0.95 and 0.85 (its defaults)
PCT_START = 0.1  # upstream's OneCycle warm-up share; cosine annealing, final lr = initial lr = max_lr / 25


class Translator(nn.Module):
    def __init__(self, modules: list[str], d_teacher: int, d_student: int, hidden: int, init_std: float,
                 seed: int):
        super().__init__()
        self.mlps = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d_teacher, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, d_student, bias=False))
            for m in modules
        })
        draws = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=draws) * init_std)

    def forward(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Teacher vectors [L, n, d_teacher] per module -> Δ vectors [L, n, d_student]."""
        return {m: self.mlps[m](v) for m, v in vectors.items()}


def targets(model, selection: Selection, deltas: dict[str, torch.Tensor]) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(parameter name, axis, indices, Δ rows or columns) for every student matrix that receives Δ."""
    prefix = model.base_model_prefix
    for module, delta in deltas.items():  # [L_student, n, d_student]
        path, kind, axis = MODULES[module]
        indices = getattr(selection, kind)
        for layer in range(delta.shape[0]):
            block = delta[layer] if axis == 0 else delta[layer].T  # [n, d] rows or [d, n] columns
            yield f"{prefix}.layers.{layer}.{path}.weight", axis, indices[layer], block


def injected(model, selection: Selection, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W' = W + Δ at the selected rows/columns, as new tensors differentiable in Δ (the model is untouched)."""
    params = dict(model.named_parameters())
    out = {}
    for name, axis, indices, block in targets(model, selection, deltas):
        base = params[name]
        out[name] = base.index_add(axis, indices.to(base.device), block.to(base.device, base.dtype))
    return out


@torch.no_grad()
def merge(model, selection: Selection, deltas: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Write W + Δ into the student's weights (summed in fp32, then cast to the weight's dtype). Returns the
    number of weights Δ targets and of those whose stored value changed: in bf16, a Δ smaller than half a
    weight's rounding step (2⁻⁹ of it) leaves that weight as it was."""
    params = dict(model.named_parameters())
    targeted = changed = 0
    for name, axis, indices, block in targets(model, selection, deltas):
        base = params[name]
        indices = indices.to(base.device)
        before = base.index_select(axis, indices)
        base.copy_(base.float().index_add(axis, indices, block.to(base.device, torch.float32)))
        targeted += before.numel()
        changed += int((base.index_select(axis, indices) != before).sum())
    return targeted, changed


def forward_injected(model, selection: Selection, deltas: dict[str, torch.Tensor], input_ids: torch.Tensor):
    """The student's logits with W' in place of W."""
    return torch.func.functional_call(model, injected(model, selection, deltas), (), {"input_ids": input_ids}).logits


@dataclass
class Step:
    """One optimizer step: the located teacher vectors, the student's neurons they go to, the align batch."""

    vectors: dict[str, torch.Tensor]
    selection: Selection
    batch: list[Example]


def align_batch(extract: Example, align: list[Example], size: int, seed: int, step: int) -> list[Example]:
    """`size - 1` distinct align examples drawn for this step, then the step's extract example (as upstream)."""
    drawn = random.Random(f"{seed}:{step}").sample(align, min(size - 1, len(align)))
    return [*drawn, extract]


def _example_loss(model, tokenizer, selection, deltas, example, max_length, train_on_inputs):
    ids, labels = encode(example, tokenizer, max_length)
    targets = torch.tensor(ids if train_on_inputs else labels)[1:]
    if (targets != -100).sum() == 0:
        return None  # cut away entirely by max_length: nothing to learn from
    device = next(model.parameters()).device
    logits = forward_injected(model, selection, deltas, torch.tensor([ids], device=device))
    return nn.functional.cross_entropy(logits[0, :-1].float(), targets.to(device))


def train(model, tokenizer, translator: Translator, steps: list[Step], *, lr: float, weight_decay: float,
          reg_weight: float, schedule_steps: int, max_length: int, train_on_inputs: bool,
          costs: dict[str, int]) -> list[float]:
    """Fit the translator: per step, Σ over its batch of CE + λ·Σ_m mean(Δ_m²); AdamW + OneCycle. Step losses."""
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    translator.to(device)
    optimizer = torch.optim.AdamW(translator.parameters(), lr=lr, weight_decay=weight_decay, betas=BETAS)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=schedule_steps,
                                                   pct_start=PCT_START, anneal_strategy="cos", final_div_factor=1)
    losses = []
    for step in steps:
        vectors = {m: v.to(device) for m, v in step.vectors.items()}
        total = 0.0
        for example in step.batch:
            deltas = translator(vectors)
            ce = _example_loss(model, tokenizer, step.selection, deltas, example, max_length, train_on_inputs)
            if ce is None:
                continue
            loss = ce + reg_weight * sum(d.pow(2).mean() for d in deltas.values())
            costs["student_forward"] = costs.get("student_forward", 0) + 1
            if math.isfinite(loss.item()):
                loss.backward()
                costs["student_backward"] = costs.get("student_backward", 0) + 1
                total += loss.item()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        costs["translator_steps"] = costs.get("translator_steps", 0) + 1
        losses.append(total)
    return losses
