"""Measures shared by engines, usable inside traces (they are plain torch)."""

from __future__ import annotations

import torch


def kl_divergence(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) in nats, over the last axis, in float32.

    p_logp, q_logp: log-probabilities [..., vocab] (broadcastable).
    """
    p_logp, q_logp = p_logp.float(), q_logp.float()
    return (p_logp.exp() * (p_logp - q_logp)).sum(-1)
