"""SemAlign's objectives for the shared loop (each returns a loss summed over the micro-batch's response tokens).

Both supervise what a student layer writes, h_S^(k), with what the teacher writes at its source layer(s), carried
into the student's space by the transfer matrix M (`bases.py`): the *supervisory residual* R̃ = (h_T / ‖h_T‖) M,
per token, a constant (no gradient). What a layer "writes" is the *interface* (`INTERFACES`): v1's "sublayer output
before the residual addition" (`mlp`, by default, or `attention`), or the whole layer's residual write
Δ = output − input (`write`, the v2 abstract's "residual contribution"). The layer term runs over the *positions*
chosen (`response`: v1's supervised positions, those that predict a response token; `all`: every non-padding
token), the output term over the response tokens; a per-token mean is scaled by the batch's response tokens so
that the loop's division by the step's response tokens gives it back as a mean.

- `Cosine` (v1, "representation steering", the published equations): L = [1 − mean cos(h_S^(k), R̃)] +
  [1 − mean cos(z, e_y)], z the final logits and e_y the one-hot label; only the paired layer(s) train (the
  caller freezes the rest).
- `Frontier` (**a reconstruction** of the v2 / ACL 2026 objective from its abstracts alone, no equations
  published): the budget's optimizer steps split evenly into L_S stages, shallow to deep; in stage k only
  layer k's LoRA trains. L = L_layer + KL(p_T ‖ p_S) at the output (T = 1, shared vocabulary), L_layer one of
  * `geometry` (arXiv v2): ‖G(Δ_S) − G(R̃)‖²_F / n² per sequence, G(X) = H X̂ X̂ᵀ H, X̂ the rows at unit norm and
    H = I − 11ᵀ/n centring over the sequence's n tokens;
  * `fisher` (ACL abstract): ½[Σ_i p_i δ_i² − (Σ_i p_i δ_i)²] per token, δ = W_S Δ_S − W_S R̃, p = softmax(W_S R̃),
    the second-order expansion of KL; R̃ is first rescaled per token to ‖Δ_S‖ (detached), since its norm is
    arbitrary and this loss, unlike the others, is not scale-invariant.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from pkt_bench.finetune import response_logits, response_positions
from pkt_bench.layers import tap

from pkt_bench.methods.kd import OnlineTeacher, kl_divergence
from .pairing import Source

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def lora_layers(model) -> dict[int, list[torch.nn.Parameter]]:
    """0-based layer -> that layer's LoRA parameters."""
    found: dict[int, list] = {}
    for name, param in model.named_parameters():
        match = _LAYER.search(name)
        if "lora_" in name and match:
            found.setdefault(int(match.group(1)), []).append(param)
    return found


def train_only(model, layers: set[int]) -> None:
    """Let only the LoRA parameters of the 0-based `layers` train."""
    for layer, params in lora_layers(model).items():
        for param in params:
            param.requires_grad_(layer in layers)


INTERFACES = {"mlp": "mlp", "attention": "self_attn", "write": "layer"}
"""Interface -> the part of a decoder layer `pkt_bench.layers.tap` records for it."""


def written(seen: dict, layer: int, interface: str) -> torch.Tensor:
    """What the 0-based `layer` writes at `interface`, from a `tap` of `INTERFACES[interface]`: a sublayer's output
    (before its residual addition), or the whole layer's Δ = output − input."""
    hidden_in, hidden_out = seen[layer]
    return hidden_out - hidden_in if interface == "write" else hidden_out


def supervisory_residual(seen: dict, source: Source, matrix: torch.Tensor, interface: str,
                         eps: float = 1e-8) -> torch.Tensor:
    """R̃ [B, T, D_S] from the teacher's writes at source (a, b, λ), 1-based."""
    a, b, weight = source
    h = written(seen, a - 1, interface).float()
    if weight:
        h = (1 - weight) * h + weight * written(seen, b - 1, interface).float()
    return (h / h.norm(dim=-1, keepdim=True).clamp_min(eps)) @ matrix


def layer_positions(batch, positions: str) -> torch.Tensor:
    """[B, T] bool: where the layer term runs, `response` (the supervised positions) or `all` non-padding ones."""
    return response_positions(batch) if positions == "response" else batch["attention_mask"].bool()


def teacher_layers(sources: list[Source]) -> list[int]:
    return sorted({layer - 1 for a, b, w in sources for layer in ((a, b) if w else (a,))})


def relation_geometry(x: torch.Tensor) -> torch.Tensor:
    """G(X) = H X̂ X̂ᵀ H for the rows of x [n, D]: centred cosine similarities [n, n]."""
    unit = F.normalize(x.float(), dim=-1)
    gram = unit @ unit.T
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def geometry_loss(student: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of ‖G(Δ_S) − G(R̃)‖²_F / n² on each sequence's `keep` tokens."""
    losses = []
    for s, t, m in zip(student, target, keep):
        n = int(m.sum())
        if n:  # a sequence cut before its response has no positions to compare
            losses.append((relation_geometry(s[m]) - relation_geometry(t[m])).pow(2).sum() / n**2)
    return torch.stack(losses).mean() if losses else student.sum() * 0.0


def fisher_loss(student: torch.Tensor, target: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ½ δᵀ(diag(p) − ppᵀ)δ; student, target [n, D_S], head W_S [V, D_S]."""
    target = target * (student.detach().norm(dim=-1, keepdim=True) /
                       target.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    aligned = target @ head.T.float()  # z̃ [n, V]
    delta = student.float() @ head.T.float() - aligned
    p = aligned.softmax(-1)
    return 0.5 * ((p * delta**2).sum(-1) - (p * delta).sum(-1) ** 2).mean()


class OnlineTargets:
    """v1's supervisory residuals {k: R̃ [B, T, D_S]} of a batch, from the teacher run on it."""

    def __init__(self, teacher: OnlineTeacher, pairs: dict[int, Source], matrix: torch.Tensor, interface: str):
        self.teacher, self.pairs, self.matrix, self.interface = teacher, pairs, matrix, interface

    def __call__(self, batch) -> dict[int, torch.Tensor]:
        _, states = self.teacher(batch, teacher_layers(list(self.pairs.values())), logits=False,
                                 part=INTERFACES[self.interface])
        return {k: supervisory_residual(states, source, self.matrix, self.interface)
                for k, source in self.pairs.items()}


class StoredTargets:
    """v1's supervisory residuals computed ahead of training, micro-batch by micro-batch, once per example (not
    once per epoch), and kept on the CPU by token ids; the teacher is not needed while the student trains."""

    def __init__(self, targets: OnlineTargets, batches: list[dict[str, torch.Tensor]]):
        self.table: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}
        for batch in batches:
            found = targets(batch)
            for row, (ids, keep) in enumerate(zip(batch["input_ids"], batch["attention_mask"].bool())):
                self.table[tuple(ids[keep].tolist())] = {k: t[row][keep].cpu() for k, t in found.items()}

    def __call__(self, batch) -> dict[int, torch.Tensor]:
        rows = [self.table[tuple(ids[keep].tolist())]
                for ids, keep in zip(batch["input_ids"], batch["attention_mask"].bool())]
        out = {}
        for k, first in rows[0].items():
            out[k] = torch.zeros(*batch["input_ids"].shape, first.shape[-1], device=batch["input_ids"].device)
            for i, row in enumerate(rows):
                out[k][i, : len(row[k])] = row[k]  # the loop pads on the right
        return out


class Cosine:
    """v1: cosine layer loss on the paired student layers plus the cosine output loss against the labels."""

    def __init__(self, targets: OnlineTargets | StoredTargets, pairs: dict[int, Source], interface: str,
                 positions: str):
        self.targets, self.pairs, self.interface, self.positions = targets, pairs, interface, positions

    def __call__(self, model, batch):
        keep = layer_positions(batch, self.positions)
        goals = self.targets(batch)
        with tap(model, [k - 1 for k in self.pairs], INTERFACES[self.interface]) as seen:
            logits, targets = response_logits(model, batch)
        if not keep.any():  # every response cut by max_length: nothing to supervise, but keep the graph
            return logits.sum() * 0.0
        layer = torch.stack([1 - F.cosine_similarity(written(seen, k - 1, self.interface)[keep].float(),
                                                     goals[k][keep], dim=-1).mean() for k in self.pairs]).mean()
        logits = logits.float()
        output = (1 - logits.gather(1, targets[:, None]).squeeze(1) / logits.norm(dim=-1).clamp_min(1e-8)).sum()
        return layer * len(targets) + output


class Frontier:
    """The v2 reconstruction: one frontier layer trains per stage, shallow to deep; layer loss plus the output KL.

    The loop calls an objective once per micro-batch, `grad_accum` per optimizer step, so the stage follows from
    the calls counted; the switch happens before a step's first micro-batch. A layer that is not the frontier has
    no gradient, so AdamW leaves it (and its moments) as they are.
    """

    def __init__(self, teacher: OnlineTeacher, sources: dict[int, Source], matrix: torch.Tensor, layer_loss: str,
                 head: torch.Tensor, vocab: int, temperature: float, total_steps: int, grad_accum: int,
                 interface: str, positions: str):
        self.teacher, self.sources, self.matrix, self.layer_loss = teacher, sources, matrix, layer_loss
        self.interface, self.positions = interface, positions
        self.head, self.vocab, self.temperature = head, vocab, temperature
        self.total_steps, self.grad_accum = total_steps, grad_accum
        self.calls, self.frontier = 0, None

    def stage(self, step: int) -> int:
        """The 1-based frontier layer at optimizer step `step` (0-based)."""
        return min(step * len(self.sources) // self.total_steps + 1, len(self.sources))

    def __call__(self, model, batch):
        k = self.stage(self.calls // self.grad_accum)
        self.calls += 1
        if k != self.frontier:
            train_only(model, {k - 1})
            self.frontier = k
        keep = layer_positions(batch, self.positions)
        part = INTERFACES[self.interface]
        teacher_logits, states = self.teacher(batch, teacher_layers([self.sources[k]]), part=part)
        with tap(model, [k - 1], part) as seen:
            logits, targets = response_logits(model, batch)
        student = written(seen, k - 1, self.interface)
        target = supervisory_residual(states, self.sources[k], self.matrix, self.interface)
        if self.layer_loss == "geometry":
            layer = geometry_loss(student, target, keep)
        else:
            layer = fisher_loss(student[keep], target[keep], self.head[: self.vocab])
        output = kl_divergence(teacher_logits[:, : self.vocab], logits[:, : self.vocab], self.temperature)
        return layer * len(targets) + output
