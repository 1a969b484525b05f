"""Which teacher layer supervises which student layer, from the depth map (`pkt_bench.layers`) and the teacher's
layer attribution scores. Layers are 1-based here, as in the paper.

A *source* (a, b, λ) is the teacher target (1 − λ)·Δ_T^(a) + λ·Δ_T^(b); a source of one layer has a = b, λ = 0.
"""

from __future__ import annotations

from pkt_bench.layers import depth_map, interpolation, student_layer_for

Source = tuple[int, int, float]


def critical_pairs(scores: list[float], n_student: int, top: int, interpolate: bool) -> dict[int, Source]:
    """v1: the `top` best-scoring teacher layers ℓ*, each trained at k† = min{k : ℓ_T(k) ≥ ℓ*} with the teacher
    target at depth k† (interpolated around L_T·k† / L_S, or the depth-map layer ℓ_T(k†)); student layer -> source."""
    n_teacher = len(scores)
    critical = sorted(range(1, n_teacher + 1), key=lambda layer: -scores[layer - 1])[:top]
    pairs = {}
    for layer in critical:
        k = student_layer_for(layer, n_teacher, n_student)
        centre = depth_map(n_teacher, n_student)[k - 1]
        pairs[k] = interpolation(k, n_teacher, n_student) if interpolate else (centre, centre, 0.0)
    return dict(sorted(pairs.items()))


def window_sources(scores: list[float], n_student: int) -> dict[int, Source]:
    """v2 reconstruction: one teacher layer per student layer, the best-scoring one within ±1 of ℓ_T(k), with the
    order kept monotone (strictly, while the teacher has at least as many layers); student layer -> source."""
    n_teacher = len(scores)
    strict = n_teacher >= n_student
    sources, previous = {}, 0
    for k, centre in enumerate(depth_map(n_teacher, n_student), 1):
        low = max(1, centre - 1, previous + strict)
        high = min(n_teacher, centre + 1, n_teacher - (n_student - k) if strict else n_teacher)
        assert low <= high, (k, centre, previous)
        previous = max(range(low, high + 1), key=lambda layer: (scores[layer - 1], -abs(layer - centre)))
        sources[k] = (previous, previous, 0.0)
    return sources
