"""Measures shared by engines, usable inside traces (they are plain torch)."""

from __future__ import annotations

import torch


def kl_divergence(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) in nats, over the last axis, in float32.

    p_logp, q_logp: log-probabilities [..., vocab] (broadcastable).
    """
    p_logp, q_logp = p_logp.float(), q_logp.float()
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """[n] the rank of each value of `x` [n] (0 = smallest; ties in order of position), float64."""
    return x.argsort().argsort().double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of `a` and `b` [n], in float64; NaN when either is constant."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of `a` and `b` [n] (`pearson` of their `ranks`)."""
    return pearson(ranks(a), ranks(b))
