"""Loss per feature, L/p, of toy models over a range of input densities p.

L is the mean squared error per output feature per sample over *all* samples, all-zero ones included (the
papers' convention), and L/p divides it by the density. A bias-free model outputs exactly 0 on an all-zero input,
whose label is 0, so those samples add nothing but zeros: L = P(K >= 1) * E[loss | K >= 1] exactly, K the number of
active features. The estimate samples only non-empty inputs, stratified by K (K ~ Binomial(n, p) given K >= 1,
proportional allocation, every stratum's exact weight), so 10^6 samples here are the paper's 10^6 / (1 - (1-p)^n)
with less variance. All models in one call see the same inputs (common random numbers), so their differences
are less noisy than their values.

"one_hot" mode evaluates on exactly one active feature per sample and reports L / (1/n) (the semi-NMF
scripts' generator: one active feature per sample is p = 1/n on average).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from workbench.core import CancelToken, Run, positive_size
from workbench.errors import InputError
from workbench.results import Provenance, Result
from workbench.toymodels.data import (
    active_count_weights,
    generator,
    k_active,
    nonempty_fraction,
)
from workbench.toymodels.models import ToyModel

MODES = ("bernoulli", "one_hot")
SPARSE_K = 8
"""Strata with at most this many active features run as sparse gathers; denser ones as dense matmuls."""
CHUNK_ROWS = 65_536


def naive_loss(n_features: int = 100, d_mlp: int = 50) -> float:
    """L/p of the naive model on the clean task: (n - d)/n * E[ReLU(v)^2] = (n - d)/(6 n) (1/12 at 100, 50)."""
    return max(n_features - d_mlp, 0) / n_features / 6


def default_ps(n: int = 20, low: float = 0.001, high: float = 1.0) -> torch.Tensor:
    """`n` log-spaced densities from `low` to `high` (the critique's plots: 0.001 to 1)."""
    return torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64).float()


@dataclasses.dataclass(frozen=True)
class LossCurves(Result):
    """L/p of several models at several densities.

    Axes: model, p, feature.

    Attributes:
        p: [p] evaluation densities (for "one_hot" mode the single value 1/n).
        loss: [model, p] L/p. stderr: [model, p] its standard error (sampling).
        per_feature: [model, p, feature] the loss of each output feature / p (their mean is `loss`).
        labels, kinds: [model] legend labels and kinds ("trained", "naive", ...).
        train_p: [model] each model's training density (NaN for built models).
        own_loss, own_stderr: [model] L/p at the model's own training density (NaN where not trained).
        naive: [model] the clean-task naive L/p for the model's sizes, (n - d) / (6 n).
        mode: "bernoulli" or "one_hot". n_samples: non-empty samples per density. seed: the evaluation seed.
    """

    p: torch.Tensor
    loss: torch.Tensor
    stderr: torch.Tensor
    per_feature: torch.Tensor
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    train_p: torch.Tensor
    own_loss: torch.Tensor
    own_stderr: torch.Tensor
    naive: torch.Tensor
    mode: str
    n_samples: int
    seed: int
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "p": "p",
        "loss": "labels p",
        "stderr": "labels p",
        "per_feature": "labels p feature",
        "train_p": "labels",
        "own_loss": "labels",
        "own_stderr": "labels",
        "naive": "labels",
    }

    @property
    def value(self) -> float:
        """L/p of the only model at the only density."""
        if self.loss.numel() != 1:
            raise InputError(f"value needs one model at one density; this holds {tuple(self.loss.shape)}.")
        return float(self.loss)

    def __float__(self) -> float:
        return self.value

    def at(self, model: int | str = 0, p: float | None = None) -> float:
        """L/p of `model` (index or label) at the evaluated density nearest `p` (default: the first)."""
        m = self.labels.index(model) if isinstance(model, str) else model
        j = 0 if p is None else int((self.p.log() - math.log(p)).abs().argmin())
        return float(self.loss[m, j])

    def crossing(self, model: int | str = 0, level: float | None = None) -> float:
        """The density where `model`'s curve first rises above `level` (default: its naive line), log-interpolated;
        NaN if it never does within the evaluated range or starts above it."""
        m = self.labels.index(model) if isinstance(model, str) else model
        level = float(self.naive[m]) if level is None else level
        y = self.loss[m].double()
        logp = self.p.double().log()
        if y[0] >= level:
            return math.nan
        for j in range(1, len(y)):
            if y[j] >= level:
                t = (level - y[j - 1]) / (y[j] - y[j - 1])
                return float((logp[j - 1] + t * (logp[j] - logp[j - 1])).exp())
        return math.nan

    def to_frame(self):
        """One row per (model, p): label, kind, p, loss_per_p, stderr, train_p, naive."""
        import pandas as pd

        rows = []
        for m, label in enumerate(self.labels):
            for j, p in enumerate(self.p.tolist()):
                rows.append(
                    {
                        "model": label,
                        "kind": self.kinds[m],
                        "p": p,
                        "loss_per_p": float(self.loss[m, j]),
                        "stderr": float(self.stderr[m, j]),
                        "train_p": float(self.train_p[m]),
                        "naive": float(self.naive[m]),
                    }
                )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        if self.loss.numel() == 1:
            return f"LossCurves({self.labels[0]}: L/p = {self.value:.4f} ± {float(self.stderr):.4f} at p = {float(self.p):g})"
        return f"LossCurves({len(self.labels)} models x {len(self.p)} densities, {self.mode}, {self.n_samples:,} samples each)"


def _as_models(models) -> list[ToyModel]:
    models = [models] if isinstance(models, ToyModel) else list(models)
    if not models:
        raise InputError("Give at least one model.")
    for m in models:
        if not isinstance(m, ToyModel):
            raise InputError(f"Expected ToyModel results, got {type(m).__name__}.")
    n = {m.n_features for m in models}
    if len(n) != 1:
        raise InputError(
            f"Models compared in one evaluation need the same number of features, got {sorted(n)}."
        )
    return models


def _check_ps(p) -> torch.Tensor:
    ps = torch.as_tensor(p, dtype=torch.float64).flatten()
    if len(ps) == 0 or not torch.isfinite(ps).all() or bool((ps <= 0).any()) or bool((ps > 1).any()):
        raise InputError(f"Densities p must be in (0, 1], got {p!r}.")
    return ps


def _strata(n: int, p: float, n_samples: int, mode: str) -> list[tuple[int, float, int]]:
    """[(k, weight, samples)] for the non-empty strata of density p."""
    if mode == "one_hot":
        return [(1, 1.0, n_samples)]
    weights = active_count_weights(n, p)
    return [(k, w, max(16, round(n_samples * w))) for k, w in weights.items()]


@dataclasses.dataclass
class _Plan:
    """The sampling plan of one evaluation: per density its strata [(k, weight, samples)], a generator per
    stratum, and the chunks (density index, stratum index, rows) that `run.map` walks through."""

    ps: list[float]
    strata: list[list[tuple[int, float, int]]]
    gens: dict[tuple[int, int], torch.Generator]
    chunks: list[tuple[int, int, int]]


def _plan(n: int, ps: list[float], n_samples: int, mode: str, seed: int, rows: int) -> _Plan:
    strata, gens, chunks = [], {}, []
    for i, q in enumerate(ps):
        strata.append(_strata(n, q, n_samples, mode))
        for s, (k, _w, count) in enumerate(strata[i]):
            # inputs depend on (seed, p, k) only, so a model's numbers do not depend on what it is evaluated with
            gens[(i, s)] = generator(seed * 100_003 + round(q * 1e7) * 1009 + k, "eval")
            chunks += [(i, s, min(rows, count - a)) for a in range(0, count, rows)]
    return _Plan(ps, strata, gens, chunks)


def _chunk_losses(plan: _Plan, item, n: int, mode: str, weights) -> list[tuple[torch.Tensor, float, float]]:
    """Per model: ([feature] summed squared error, sum and sum of squares of the per-sample loss) on one chunk."""
    i, s, count = item
    k = plan.strata[i][s][0]
    gen = plan.gens[(i, s)]
    if mode == "one_hot":
        cols = torch.randint(0, n, (count, 1), generator=gen)
        vals = torch.rand(count, 1, generator=gen) * 2 - 1
    else:
        cols, vals = k_active(count, n, k, gen)
    dense = torch.zeros(count, n).scatter_(1, cols, vals) if k > SPARSE_K else None
    out = []
    for W_in, W_out, MT in weights:
        if dense is None:  # x @ W as a sum of k gathered rows
            h = (W_in[cols] * vals[..., None]).sum(1)
            y = (MT[cols] * vals[..., None]).sum(1).scatter_add_(1, cols, torch.relu(vals))
        else:
            h = dense @ W_in
            y = torch.relu(dense) + dense @ MT
        err = torch.relu(h) @ W_out - y
        sq = err * err
        per_sample = sq.sum(1).double() / n
        out.append((sq.sum(0).double(), float(per_sample.sum()), float((per_sample**2).sum())))
    return out


def _combine_strata(plan: _Plan, parts, n_models: int, n: int, mode: str):
    """([model, p] L/p, [model, p] standard error, [model, p, feature] per-feature L/p) from the chunks' sums:
    each stratum's mean weighted by its exact probability."""
    n_p = len(plan.ps)
    sums = torch.zeros(n_models, n_p, max(len(s) for s in plan.strata), n, dtype=torch.float64)
    s1 = torch.zeros(n_models, n_p, sums.shape[2], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for (i, s, _), out in parts:
        for m, (feat, a, b) in enumerate(out):
            sums[m, i, s] += feat
            s1[m, i, s] += a
            s2[m, i, s] += b
    loss = torch.zeros(n_models, n_p, dtype=torch.float64)
    var = torch.zeros_like(loss)
    per_feature = torch.zeros(n_models, n_p, n, dtype=torch.float64)
    for i, q in enumerate(plan.ps):
        # one-hot: L / (1/n), one active feature per sample; Bernoulli: P(K >= 1) E[loss | K >= 1] / p
        scale = n if mode == "one_hot" else nonempty_fraction(n, q) / q
        for s, (_k, w, count) in enumerate(plan.strata[i]):
            mean = s1[:, i, s] / count
            v = (s2[:, i, s] / count - mean**2).clamp_min(0) / max(count - 1, 1)
            loss[:, i] += scale * w * mean
            var[:, i] += (scale * w) ** 2 * v
            per_feature[:, i] += scale * w * sums[:, i, s] / count
    return loss, var.sqrt(), per_feature


def evaluate(
    models,
    p: float | Sequence[float] | torch.Tensor | None = None,
    *,
    n_samples: int = 1_000_000,
    mode: str = "bernoulli",
    own_p: bool = False,
    seed: int = 0,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> LossCurves:
    """L/p of `models` at densities `p` on `n_samples` non-empty samples each.

    Args:
        models: a `ToyModel` or a list (same number of features); each is scored on its own task (its M).
        p: one density or several (default: the first model's training p; 20 log-spaced values from 0.001 to 1
            with ``default_ps()``). Ignored in "one_hot" mode (p = 1/n).
        n_samples: non-empty samples per density (10^6: standard error ~0.3% of L/p at p = 0.01).
        mode: "bernoulli" (independent features) or "one_hot" (exactly one active feature per sample).
        own_p: also evaluate every trained model at its own training density (`own_loss`).
        seed: the evaluation inputs (the same for every model).
        progress, cancel, run: the shared execution core; chunks of 65,536 rows (or ``run.batch_size``).
    """
    models = _as_models(models)
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}.")
    n_samples = positive_size(n_samples, "n_samples", allow_none=False)
    n = models[0].n_features
    if mode == "one_hot":
        ps = torch.tensor([1 / n], dtype=torch.float64)
    else:
        ps = _check_ps(models[0].p if p is None else p)
    train_p = torch.tensor(
        [m.p if m.kind in ("trained", "transplanted") else math.nan for m in models], dtype=torch.float64
    )
    all_ps = ps.tolist()
    if own_p and mode == "bernoulli":
        all_ps += sorted({tp for tp in train_p.tolist() if not math.isnan(tp)} - set(all_ps))
    run = Run.of(run, progress=progress, cancel=cancel)
    plan = _plan(n, all_ps, n_samples, mode, seed, run.batch_size or CHUNK_ROWS)
    weights = [(m.W_in, m.W_out, m.M.T.contiguous()) for m in models]
    with torch.no_grad():
        parts = run.map(
            plan.chunks,
            lambda item: (item, _chunk_losses(plan, item, n, mode, weights)),
            desc="evaluating L/p",
            weights=[c[2] for c in plan.chunks],
        )
    loss, stderr, per_feature = _combine_strata(plan, parts, len(models), n, mode)
    own = torch.full((len(models),), math.nan)
    own_se = torch.full((len(models),), math.nan)
    for m, tp in enumerate(train_p.tolist()):
        if own_p and not math.isnan(tp):
            j = 0 if mode == "one_hot" else all_ps.index(tp)
            own[m], own_se[m] = loss[m, j], stderr[m, j]
    keep = len(ps)
    return LossCurves(
        p=ps.float(),
        loss=loss[:, :keep].float(),
        stderr=stderr[:, :keep].float(),
        per_feature=per_feature[:, :keep].float(),
        labels=tuple(m.label for m in models),
        kinds=tuple(m.kind for m in models),
        train_p=train_p.float(),
        own_loss=own,
        own_stderr=own_se,
        naive=torch.tensor([naive_loss(m.n_features, m.d_mlp) for m in models]),
        mode=mode,
        n_samples=n_samples,
        seed=seed,
        provenance=Provenance.capture(
            "toymodels",
            models=[m.key for m in models],
            p=ps.tolist(),
            n_samples=n_samples,
            mode=mode,
            own_p=own_p,
            seed=seed,
        ),
    )


def loss_per_feature(model: ToyModel, p: float | None = None, **kwargs) -> LossCurves:
    """L/p of one model at one density (``float(result)`` is the number); see `evaluate`."""
    return evaluate([model], model.p if p is None else p, **kwargs)


def combine(parts: Sequence[LossCurves]) -> LossCurves:
    """Stack `LossCurves` of different models evaluated on the same densities, mode, samples and seed (so on the
    same inputs: the result equals one joint evaluation)."""
    parts = list(parts)
    if not parts:
        raise InputError("Nothing to combine.")
    first = parts[0]
    for r in parts[1:]:
        if (
            r.mode != first.mode
            or r.n_samples != first.n_samples
            or r.seed != first.seed
            or not torch.equal(r.p, first.p)
        ):
            raise InputError(
                "Only curves evaluated on the same densities, mode, samples and seed can be combined."
            )
    cat = lambda name: torch.cat([getattr(r, name) for r in parts])  # noqa: E731
    return dataclasses.replace(
        first,
        loss=cat("loss"),
        stderr=cat("stderr"),
        per_feature=cat("per_feature"),
        labels=tuple(x for r in parts for x in r.labels),
        kinds=tuple(x for r in parts for x in r.kinds),
        train_p=cat("train_p"),
        own_loss=cat("own_loss"),
        own_stderr=cat("own_stderr"),
        naive=cat("naive"),
        provenance=Provenance.capture(
            "toymodels",
            models=[m for r in parts for m in r.provenance.options.get("models", [])],
            p=first.p.tolist(),
            n_samples=first.n_samples,
            mode=first.mode,
            seed=first.seed,
        ),
    )
