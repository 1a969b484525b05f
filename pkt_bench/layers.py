"""Depth pairing of teacher and student layers, and taps that record what a layer reads and writes.

The *depth map* (SemAlign, arXiv 2510.24208 §4.1) pairs student layer k (1-based, of L_S) with teacher layer
ℓ_T(k) = max(1, ⌊(L_T / L_S)·k⌋): the teacher layer at the same relative depth. For L_T > L_S it skips teacher
layers (40 -> 32 never pairs 4, 9, 14, ...); for L_T < L_S some teacher layers serve two student layers.
Where the ratio is not an integer, a target at exactly depth k interpolates the two teacher layers around
u = L_T·k / L_S (`interpolation`). `semalign` and `hidden-kd` both pair layers this way.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from fractions import Fraction


def depth_map(n_teacher: int, n_student: int) -> list[int]:
    """ℓ_T(k) for k = 1..n_student, 1-based teacher layer numbers."""
    return [max(1, n_teacher * k // n_student) for k in range(1, n_student + 1)]


def student_layer_for(critical: int, n_teacher: int, n_student: int) -> int:
    """k† = min{k : ℓ_T(k) ≥ critical} (1-based), or L_S when no student layer reaches that deep."""
    return next((k for k, t in enumerate(depth_map(n_teacher, n_student), 1) if t >= critical), n_student)


def interpolation(k: int, n_teacher: int, n_student: int) -> tuple[int, int, float]:
    """(a, b, λ): the target at student depth k is (1 − λ)·h_T^(a) + λ·h_T^(b), layers 1-based, b = a + 1."""
    u = Fraction(n_teacher * k, n_student)
    a = max(1, min(math.floor(u), n_teacher - 1))
    return a, a + 1, float(min(max(u - a, 0), 1))


def decoder_layers(model):
    """The decoder's list of layers, under PEFT wrapping or not (Llama and Qwen2 layouts)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.get_decoder().layers


PARTS = ("layer", "self_attn", "mlp")


@contextmanager
def tap(model, layers: list[int], part: str = "layer"):
    """Record, for the 0-based `layers`, what a part of each reads and writes during forward passes in the block.

    `part`: the whole decoder layer (`layer`), or one of its sublayers (`self_attn`, `mlp`: the attention block and
    the MLP, each without its norm before and its residual addition after). Yields a dict: layer -> (input,
    output) [batch, tokens, width] of that part in the last pass; gradients flow through them as through the
    model. A whole layer's *residual write* is output − input; a sublayer's write is its output.
    """
    if part not in PARTS:
        raise ValueError(f"tap part must be one of {PARTS}, got {part!r}")
    modules = decoder_layers(model)
    seen: dict[int, tuple] = {}

    def hook(index):
        def record(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[index] = (hidden, output[0] if isinstance(output, tuple) else output)
        return record

    handles = [(modules[i] if part == "layer" else getattr(modules[i], part)).register_forward_hook(
        hook(i), with_kwargs=True) for i in sorted(set(layers))]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
