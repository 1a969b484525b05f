"""Structured pruning of a Llama/Qwen2-layout model, and the index map from a pruned model back to its ancestor.

A pruned model keeps, of its ancestor, some layers, some residual (hidden) dimensions, some FFN units per layer,
some key/value heads (with every query head of their GQA group) and some dimensions inside each head. Its weights
before any training are exact sub-blocks of the ancestor's; `Kept` records the indices, and `source(name, kept)`
says from which ancestor parameter, at which indices, a parameter of the pruned model was cut. The same map
serves `graft`, which cuts the teacher's change since the ancestor to the student's shape.

Attention needs care: Llama's RoPE rotates dimension i of a head together with dimension i + head_dim/2 (at the
frequency of pair i), so head dimensions are kept in such pairs. Keeping every k-th pair, when the head size
shrinks k times, gives each kept pair the same frequency in the smaller head as in the ancestor's.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Kept:
    """Ancestor indices a pruned model kept, per dimension (sorted), and the ancestor's attention layout."""

    layers: list[int]
    hidden: list[int]
    ffn: list[list[int]]  # per kept layer, in the student's layer order
    kv_heads: list[int]
    head_dims: list[int]  # inside each head
    heads: int  # the ancestor's query heads
    source_kv_heads: int
    source_head_dim: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Kept:
        return cls(**data)

    @classmethod
    def everything(cls, config) -> Kept:
        """Nothing removed: every index of `config`'s model."""
        head_dim = _head_dim(config)
        return cls(list(range(config.num_hidden_layers)), list(range(config.hidden_size)),
                   [list(range(config.intermediate_size))] * config.num_hidden_layers,
                   list(range(config.num_key_value_heads)), list(range(head_dim)), config.num_attention_heads,
                   config.num_key_value_heads, head_dim)

    @property
    def q_heads(self) -> list[int]:
        group = self.heads // self.source_kv_heads
        return [g * group + i for g in self.kv_heads for i in range(group)]

    def rows(self, heads: list[int]) -> list[int]:
        """Rows of a q/k/v projection (or columns of o_proj) for the kept dims of `heads`."""
        return [h * self.source_head_dim + d for h in heads for d in self.head_dims]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def source(name: str, kept: Kept) -> tuple[str, tuple[list[int] | None, ...]]:
    """The ancestor parameter that the pruned model's parameter `name` was cut from, and the kept indices of
    each of its dimensions (None: all)."""
    hidden = kept.hidden
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match is None:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return name, (None, hidden)  # [vocab, hidden]
        assert name == "model.norm.weight", f"no index map for {name}"
        return name, (hidden,)
    layer, part = int(match[1]), match[2]
    src = f"model.layers.{kept.layers[layer]}.{part}"
    q_rows, kv_rows, ffn = kept.rows(kept.q_heads), kept.rows(kept.kv_heads), kept.ffn[layer]
    module, kind = part.rsplit(".", 1)
    rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
            "mlp.gate_proj": ffn, "mlp.up_proj": ffn, "self_attn.o_proj": hidden, "mlp.down_proj": hidden,
            "input_layernorm": hidden, "post_attention_layernorm": hidden,
            "self_attn.q_norm": kept.head_dims, "self_attn.k_norm": kept.head_dims}[module]
    if kind == "bias" or module.endswith(("layernorm", "_norm")):
        return src, (rows,)
    columns = {"self_attn.o_proj": q_rows, "mlp.down_proj": ffn}.get(module, hidden)
    return src, (rows, columns)  # [d_out, d_in]


def cut(tensor, indices: tuple[list[int] | None, ...]):
    """The sub-block of `tensor` at `indices` (one list, or None for all, per dimension)."""
    import torch

    for dim, index in enumerate(indices):
        if index is not None:
            tensor = tensor.index_select(dim, torch.tensor(index, dtype=torch.long, device=tensor.device))
    return tensor


def prune(model, kept: Kept):
    """A new model made of the sub-blocks of `model` that `kept` names (Llama/Qwen2 layout)."""
    import torch
    from transformers import AutoModelForCausalLM

    assert len({len(units) for units in kept.ffn}) == 1, "every layer must keep as many FFN units"
    config = copy.deepcopy(model.config)
    config.num_hidden_layers, config.hidden_size = len(kept.layers), len(kept.hidden)
    config.intermediate_size = len(kept.ffn[0])
    config.num_attention_heads, config.num_key_value_heads = len(kept.q_heads), len(kept.kv_heads)
    config.head_dim = len(kept.head_dims)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept.layers]
    pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    ancestor = model.state_dict()
    with torch.no_grad():
        for name, param in pruned.state_dict().items():
            src, indices = source(name, kept)
            param.copy_(cut(ancestor[src], indices))
    return pruned


def choose(model, n_layers: int | None, width) -> Kept:
    """What to keep when cutting `model` to `n_layers` layers and the widths of `width` (a `ModelShape`), None
    keeping that axis whole: the first n − 1 layers and the last (a contiguous block of deep layers goes, as in
    Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"); the hidden dimensions and FFN
    units with the largest weight norms; every k-th RoPE pair inside each head; the first key/value heads."""
    import torch

    kept = Kept.everything(model.config)
    layers = kept.layers
    if n_layers is not None:
        last = model.config.num_hidden_layers - 1
        layers = [*range(n_layers - 1), last] if n_layers > 1 else [last]
    if width is None:
        return Kept(layers, kept.hidden, [kept.ffn[i] for i in layers], kept.kv_heads, kept.head_dims, kept.heads,
                    kept.source_kv_heads, kept.source_head_dim)
    head_dim = width.hidden // width.heads
    ratio = kept.source_head_dim // head_dim
    assert ratio * head_dim == kept.source_head_dim and width.heads // width.kv_heads == kept.heads // len(
        kept.kv_heads), "width pruning keeps whole GQA groups and shrinks heads by a whole factor"
    half = kept.source_head_dim // 2
    pairs = list(range(0, half, ratio))
    weights = {name: p.detach().float() for name, p in model.named_parameters()}
    hidden_score = weights["model.embed_tokens.weight"].pow(2).sum(0)
    if "lm_head.weight" in weights:  # absent when tied to the input embeddings
        hidden_score += weights["lm_head.weight"].pow(2).sum(0)
    ffn = []
    for i in layers:
        prefix = f"model.layers.{i}."
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            hidden_score += weights[f"{prefix}{module}.weight"].pow(2).sum(0)
        for module in ("self_attn.o_proj", "mlp.down_proj"):
            hidden_score += weights[f"{prefix}{module}.weight"].pow(2).sum(1)
        unit_score = (weights[f"{prefix}mlp.gate_proj.weight"].pow(2).sum(1) + weights[f"{prefix}mlp.up_proj.weight"]
                      .pow(2).sum(1) + weights[f"{prefix}mlp.down_proj.weight"].pow(2).sum(0))
        ffn.append(sorted(torch.topk(unit_score, width.intermediate).indices.tolist()))
    hidden = sorted(torch.topk(hidden_score, width.hidden).indices.tolist())
    return Kept(layers, hidden, ffn, list(range(width.kv_heads)), pairs + [p + half for p in pairs], kept.heads,
                kept.source_kv_heads, kept.source_head_dim)
