"""Sparse-feature inputs, mixing matrices and labels of the compressed-computation toy models.

Conventions (row vectors, as in the papers' code): an input is x [batch, feature]; the simplified model's label
is ``y = ReLU(x) + x @ M.T`` (output o gets ``sum_i M[o, i] x_i``); the residual CC model's label is
``y = x + ReLU(x)``. Every draw comes from an explicit seeded `torch.Generator`: the authors' dataset seeds
itself from the wall clock when no seed is given, here nothing does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.errors import InputError

STREAMS = {"init": 1, "data": 2, "mixing": 3, "eval": 4, "transplant": 5, "snmf": 6}
"""Independent random streams derived from one seed (model init, training data, mixing matrix, evaluation)."""


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for `stream` of `seed`: different streams of one seed never share draws."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + STREAMS[stream] * 7919) % (2**63))


# -- inputs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseBatch:
    """A batch of sparse inputs as coordinates: rows[j], cols[j] hold values[j]; every other entry is 0."""

    batch: int
    n_features: int
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    def dense(self) -> torch.Tensor:
        """[batch, feature] dense inputs."""
        x = torch.zeros(self.batch, self.n_features)
        x[self.rows, self.cols] = self.values
        return x


DENSE_FROM_P = 0.2
"""From this density on, Bernoulli masks are drawn densely; below it as geometric gaps (same law, ~40x faster)."""


def bernoulli_batch(batch: int, n_features: int, p: float, gen: torch.Generator) -> SparseBatch:
    """Each entry independently nonzero with probability `p`, value U(-1, 1); all-zero rows are kept.

    Below `DENSE_FROM_P` the positions of the nonzero entries are drawn as the partial sums of geometric gaps
    (the exact law of Bernoulli trials), which costs O(batch * n * p) random numbers instead of O(batch * n).
    """
    total = batch * n_features
    if p >= DENSE_FROM_P:
        mask = torch.rand(total, generator=gen) < p
        pos = torch.nonzero(mask).flatten()
    else:
        log_q = math.log1p(-p)
        parts, end = [], -1
        while end < total - 1:
            mean = (total - 1 - end) * p
            m = int(mean + 6 * math.sqrt(mean + 1) + 16)
            u = torch.rand(m, generator=gen).clamp_min_(1e-38)
            gaps = torch.floor(torch.log(u) / log_q).long() + 1  # trials up to and including the next success
            pos = end + torch.cumsum(gaps, 0)
            parts.append(pos[pos < total])
            end = int(pos[-1])
        pos = torch.cat(parts)
    values = torch.rand(len(pos), generator=gen) * 2 - 1
    return SparseBatch(batch, n_features, pos // n_features, pos % n_features, values)


def bernoulli_dense(batch: int, n_features: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """[batch, feature] dense inputs with the law of `bernoulli_batch` (for dense p, where coordinates cost more)."""
    mask = torch.rand(batch, n_features, generator=gen) < p
    return (torch.rand(batch, n_features, generator=gen) * 2 - 1) * mask


def one_hot_batch(batch: int, n_features: int, gen: torch.Generator) -> SparseBatch:
    """Exactly one active feature per row, uniformly chosen, value U(-1, 1)."""
    cols = torch.randint(0, n_features, (batch,), generator=gen)
    values = torch.rand(batch, generator=gen) * 2 - 1
    return SparseBatch(batch, n_features, torch.arange(batch), cols, values)


def k_active(batch: int, n_features: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly `k` distinct active features per row (a uniform subset): ([batch, k] columns, [batch, k] values
    U(-1, 1)). Small k: uniform draws with rows holding a repeat drawn again; large k: top-k of uniforms."""
    if k <= 8 and 4 * k <= n_features:
        cols = torch.randint(0, n_features, (batch, k), generator=gen)
        while k > 1:
            s = cols.sort(dim=1).values
            bad = torch.nonzero((s[:, 1:] == s[:, :-1]).any(1)).flatten()
            if len(bad) == 0:
                break
            cols[bad] = torch.randint(0, n_features, (len(bad), k), generator=gen)
    elif k == n_features:
        cols = torch.arange(n_features).expand(batch, n_features).clone()
    else:
        cols = torch.rand(batch, n_features, generator=gen).topk(k, dim=1).indices
    values = torch.rand(batch, k, generator=gen) * 2 - 1
    return cols, values


def k_active_batch(batch: int, n_features: int, k: int, gen: torch.Generator) -> SparseBatch:
    """`k_active` as a `SparseBatch`."""
    cols, values = k_active(batch, n_features, k, gen)
    rows = torch.arange(batch).repeat_interleave(k)
    return SparseBatch(batch, n_features, rows, cols.flatten(), values.flatten())


def active_count_weights(n_features: int, p: float, tail: float = 1e-7) -> dict[int, float]:
    """P(K = k | K >= 1) for K ~ Binomial(n, p), over the k whose weight is at least `tail` (renormalised)."""
    log_q = math.log1p(-p) if p < 1 else -math.inf
    out = {}
    for k in range(1, n_features + 1):
        if p >= 1:
            lp = 0.0 if k == n_features else -math.inf
        else:
            lp = (
                math.lgamma(n_features + 1)
                - math.lgamma(k + 1)
                - math.lgamma(n_features - k + 1)
                + k * math.log(p)
                + (n_features - k) * log_q
            )
        out[k] = math.exp(lp) if lp > -math.inf else 0.0
    nonempty = 1 - (1 - p) ** n_features
    weights = {k: w / nonempty for k, w in out.items() if w / nonempty >= tail}
    s = sum(weights.values())
    return {k: w / s for k, w in weights.items()}


def nonempty_fraction(n_features: int, p: float) -> float:
    """P(at least one feature active) = 1 - (1 - p)^n."""
    return 1 - (1 - p) ** n_features


def zero_fraction(n_features: int, p: float) -> float:
    """Fraction of all-zero inputs, (1 - p)^n (0.366 at n = 100, p = 0.01)."""
    return (1 - p) ** n_features


def relu_moments() -> tuple[float, float]:
    """E[ReLU(v)] and E[ReLU(v)^2] for v ~ U(-1, 1): 1/4 and 1/6."""
    return 0.25, 1 / 6


# -- mixing matrices ---------------------------------------------------------------------------------------

MIXINGS = {
    "clean": "M = 0 (labels ReLU(x))",
    "embed": "embedding-like: M = I - W_E W_E^T (exact reduction) or W_E W_E^T - I (the critique's code)",
    "symmetric": "symmetric Gaussian: M = triu(A) + triu(A, 1)^T, A_ij ~ N(0, sigma^2)",
    "asymmetric": "asymmetric Gaussian: M_ij ~ N(0, sigma^2) i.i.d., diagonal included",
    "lowrank": "low rank r: M = U V^T scaled to entry rms sigma (U = V if symmetric; orthonormal if flat)",
}
EMBED_SIGNS = ("I-G", "G-I")


def embedding(n_features: int, d_embed: int, gen: torch.Generator) -> torch.Tensor:
    """[feature, embed] W_E with N(0, 1) entries and unit-norm rows (Braun et al.'s fixed embedding)."""
    w = torch.randn(n_features, d_embed, generator=gen, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).float()


def unit_mixing(
    kind: str,
    n_features: int,
    gen: torch.Generator,
    *,
    rank: int | None = None,
    symmetric: bool = True,
    flat: bool = True,
) -> torch.Tensor:
    """[out feature, in feature] the mixing matrix at sigma = 1 for the Gaussian and low-rank kinds."""
    if kind == "asymmetric":
        return torch.randn(n_features, n_features, generator=gen)
    if kind == "symmetric":
        a = torch.randn(n_features, n_features, generator=gen)
        return torch.triu(a) + torch.triu(a, 1).T
    if kind == "lowrank":
        if rank is None or not 1 <= rank <= n_features:
            raise InputError(f"A low-rank mixing needs rank in 1..{n_features}, got {rank!r}.")
        u = torch.randn(n_features, rank, generator=gen, dtype=torch.float64)
        v = u if symmetric else torch.randn(n_features, rank, generator=gen, dtype=torch.float64)
        if flat:  # orthonormal columns: every nonzero singular value equal
            u = torch.linalg.qr(u).Q
            v = u if symmetric else torch.linalg.qr(v).Q
        m = u @ v.T
        return (
            m / m.pow(2).mean().sqrt()
        ).float()  # entries with rms 1, so sigma means the same for any rank
    raise InputError(f"No unit mixing for kind {kind!r}.")


def embed_mixing(w_e: torch.Tensor, sign: str) -> torch.Tensor:
    """I - W_E W_E^T (sign "I-G", the exact reduction of the residual model) or W_E W_E^T - I ("G-I")."""
    if sign not in EMBED_SIGNS:
        raise InputError(f"embed_sign must be one of {EMBED_SIGNS}, got {sign!r}.")
    w = w_e.double()
    g = w @ w.T
    eye = torch.eye(len(g), dtype=torch.float64)
    return ((eye - g) if sign == "I-G" else (g - eye)).float()


def labels(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """[batch, feature] ReLU(x) + x @ M^T (the simplified model's target; the residual model reduces to it)."""
    return torch.relu(x) + x @ M.T


def sparse_matmul(batch: SparseBatch, weight: torch.Tensor) -> torch.Tensor:
    """[batch, cols] x @ weight for x given as coordinates (differentiable in `weight`)."""
    out = torch.zeros(batch.batch, weight.shape[1], dtype=weight.dtype)
    return out.index_add(0, batch.rows, weight[batch.cols] * batch.values[:, None])


def sparse_labels(batch: SparseBatch, MT: torch.Tensor) -> torch.Tensor:
    """[batch, feature] ReLU(x) + x @ M^T from coordinates; `MT` is M^T [in feature, out feature]."""
    y = sparse_matmul(batch, MT)
    return y.index_put((batch.rows, batch.cols), torch.relu(batch.values), accumulate=True)
