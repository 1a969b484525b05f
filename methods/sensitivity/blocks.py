"""Layer maps, blocks and factors: which teacher layers and sub-matrices move, and their rank-r LoRA factors."""

from __future__ import annotations

import random

from pkt_bench.api import UserError


def layer_map(layer_scores: list[float], n_student: int, how: str, seed: int = 0) -> list[int]:
    """Teacher layer for each student layer 0..n_student-1."""
    n_teacher = len(layer_scores)
    if n_teacher < n_student:
        raise UserError(f"the teacher has {n_teacher} layers, fewer than the student's {n_student}; "
                        f"pick a deeper teacher")
    if how == "uniform":
        return [round(i * (n_teacher - 1) / max(n_student - 1, 1)) for i in range(n_student)]
    if how == "random":
        return sorted(random.Random(f"{seed}:layers").sample(range(n_teacher), n_student))
    ranked = sorted(range(n_teacher), key=lambda layer: -layer_scores[layer])[:n_student]
    return sorted(ranked)


def max_block(score, rows: int, cols: int) -> tuple[int, int]:
    """Offsets (a, b) of the rows x cols window of `score` with the largest sum (2-D prefix sums, float64)."""
    import torch

    n, m = score.shape
    prefix = torch.nn.functional.pad(score.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # [n+1, m+1]
    sums = prefix[rows:, cols:] - prefix[: n - rows + 1, cols:] - prefix[rows:, : m - cols + 1] \
        + prefix[: n - rows + 1, : m - cols + 1]  # [n-rows+1, m-cols+1]: sum of the window starting at (a, b)
    best = int(torch.argmax(sums))  # first maximum in row-major order: smallest row, then column
    return divmod(best, sums.shape[1])


def select(how: str, score, shape: tuple[int, int], rows: int, cols: int, seed: str) -> dict:
    """The block of a teacher matrix of `shape` to take for a rows x cols student matrix.

    Contiguous strategies give {"row": a, "col": b}; the others {"rows": [...], "cols": [...]}, sorted
    (embeddings keep every token row: {"row": 0, "col": b} or {"cols": [...]}).
    """
    n, m = shape
    rng = random.Random(seed)
    if how == "max-sum":
        a, b = max_block(score, rows, cols)
        return {"row": a, "col": b}
    if how == "random-block":
        return {"row": rng.randint(0, n - rows), "col": rng.randint(0, m - cols)}
    if how == "top-rows-cols":
        import torch

        return {"rows": sorted(torch.topk(score.double().sum(1), rows).indices.tolist()),
                "cols": sorted(torch.topk(score.double().sum(0), cols).indices.tolist())}
    return {"rows": sorted(rng.sample(range(n), rows)), "cols": sorted(rng.sample(range(m), cols))}


def cut(weight, block: dict, rows: int, cols: int):
    """The [rows, cols] part of `weight` that `block` (from `select`) names; no "rows": the first `rows`."""
    if "row" in block:
        return weight[block["row"] : block["row"] + rows, block["col"] : block["col"] + cols]
    return weight[block["rows"] if "rows" in block else slice(rows)][:, block["cols"]]


def factorize(block, rank: int, split: str, svd: str = "exact"):
    """(B [rows, r], A [r, cols]) with B·A the best rank-r approximation of `block`.

    "exact": from the eigenvectors of the smaller Gram matrix (XᵀX or XXᵀ) in float64, exact up to rounding and
    deterministic. "randomized": `torch.svd_lowrank` (Halko et al., 4 power iterations), an order of magnitude
    faster on large blocks; its error is near the optimum, but with a flat spectrum its factors are not the top-r
    singular vectors.
    """
    import torch

    if svd == "randomized":
        u, s, v = torch.svd_lowrank(block.float(), q=min(rank + 8, *block.shape), niter=4)
        u, s, v = u[:, :rank].double(), s[:rank].double(), v[:, :rank].double()
        return _split(u * s, s, v, split)
    x = block.double()
    if x.shape[0] >= x.shape[1]:
        v = torch.linalg.eigh(x.T @ x).eigenvectors[:, -rank:].flip(1)  # [cols, r], largest first
        us = x @ v  # U_r Σ_r
        s = us.norm(dim=0)
    else:
        u = torch.linalg.eigh(x @ x.T).eigenvectors[:, -rank:].flip(1)  # [rows, r]
        vs = x.T @ u  # V_r Σ_r
        s = vs.norm(dim=0)
        v, us = vs / torch.where(s > 0, s, 1.0), u * s
    return _split(us, s, v, split)


def _split(us, s, v, split: str):
    """(B, A) from U_rΣ_r, Σ_r and V_r: all of Σ in B ("paper") or √Σ on each side ("balanced")."""
    import torch

    if split == "balanced":
        root = s.sqrt()
        return (us / torch.where(root > 0, root, 1.0)).float(), (root[:, None] * v.T).float()
    return us.float(), v.T.float()
