"""Semantic bases (Gu et al. 2024, "Vocabulary-Defined Semantics") and the decompose/recompose step of SemAlign.

A model's LM head W [V, D] maps a latent h to logits W·h. Its Moore–Penrose pseudo-inverse W⁺ [D, V] has, as
column i, the least-squares latent whose logits are the one-hot e_i. The *semantic bases* S are those columns
normalised to unit L2 norm. A teacher latent h_T *decomposes* into cosine coefficients c = S_Tᵀ h_T / ‖h_T‖ [V],
and *recomposes* in the student as h̃_S = S_S c [D_S]: the coefficient of token i is reused on the student's base
of the same token, which is why the vocabulary must be shared.

Recomposition after decomposition is linear in ĥ = h / ‖h‖, so training uses the [D_T, D_S] *transfer matrix*
M = S_T S_Sᵀ (ĥ_T M = (S_S c)ᵀ) instead of a [V] coefficient vector per token: the same numbers, without the
two V-wide products per token.
"""

from __future__ import annotations

import torch


def pseudo_inverse(head: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """W⁺ [D, V] of an LM head W [V, D], as (WᵀW)⁺ Wᵀ (an identity for every W) in fp64, returned in fp32.

    Only the [D, D] Gram matrix is inverted, and W is read in row chunks, so a 152k-token head needs about the
    fp32 result in memory rather than an SVD of the whole head in fp64.
    """
    rows = range(0, head.shape[0], chunk)
    gram = sum(head[i : i + chunk].double().T @ head[i : i + chunk].double() for i in rows)  # [D, D]
    inverse_gram = torch.linalg.pinv(gram, hermitian=True)
    inverse = torch.empty(head.shape[1], head.shape[0], dtype=torch.float32, device=head.device)
    for i in rows:
        inverse[:, i : i + chunk] = inverse_gram @ head[i : i + chunk].double().T
    return inverse


def semantic_bases(head: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """S [D, V]: the columns of W⁺ at unit L2 norm (a column that is ~0, an unused token's, stays 0)."""
    inverse = pseudo_inverse(head)
    return inverse.div_(inverse.norm(dim=0, keepdim=True).clamp_min(eps))


def decompose(hidden: torch.Tensor, bases: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """c = Sᵀ h / ‖h‖: coefficients [..., V] of latents [..., D] on the bases [D, V]."""
    return (hidden.float() / hidden.float().norm(dim=-1, keepdim=True).clamp_min(eps)) @ bases


def recompose(coefficients: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """h̃ = S c: latents [..., D] from coefficients [..., V] on the bases [D, V]."""
    return coefficients @ bases.T


def transfer_matrix(teacher_bases: torch.Tensor, student_bases: torch.Tensor) -> torch.Tensor:
    """M = S_T S_Sᵀ [D_T, D_S], so that recompose(decompose(h_T, S_T), S_S) = (h_T / ‖h_T‖) M (fp32, on the bases'
    device: one [D_T, V] × [V, D_S] product)."""
    return teacher_bases.float() @ student_bases.float().T
