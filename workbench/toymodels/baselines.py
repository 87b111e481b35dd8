"""Baselines that need no training: naive, naive + offset (dense regime), semi-NMF of the mixing target.

- **naive**: neuron i computes feature i exactly for i < d (W_in[i, i] = W_out[i, i] = 1), the other n - d outputs
  are 0. On the clean task L/p = (n - d)/n * E[ReLU(v)^2] = 1/12 at n = 100, d = 50, at every p. On a noisy task
  (M != 0) the same weights ignore M x and do worse: the papers' dashed line is the *clean-task* naive.
- **naive + offset**: also W_out[j, o] = b for j < d <= o: each active neuron adds b to every unimplemented
  output. With S = sum_{j<d} ReLU(x_j) and R = ReLU(x_o), an unimplemented output's loss is
  b^2 E[S^2] - 2 b E[S] E[R] + E[R^2], minimised at b* = E[S] E[R] / E[S^2] (0.0132 at p = 0.1, 0.0194 at p = 1).
- **semi-NMF**: for a positive one-hot input a e_j the network outputs a (W_in W_out)[j] and the label row is
  a (I + M^T)[j]; so factor T ~ U V with U >= 0 (W_in) and V free (W_out). The critique's code factors I + M
  instead ("code" orientation): the same for symmetric M, not for asymmetric M. Both are offered, labelled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from workbench.core import CancelToken, Run
from workbench.errors import InputError
from workbench.results import Provenance, Result
from workbench.toymodels.config import ToyConfig
from workbench.toymodels.data import generator
from workbench.toymodels.evaluate import evaluate, naive_loss
from workbench.toymodels.models import ToyModel, build_task, built_model
from workbench.toymodels.train import as_config

ORIENTATIONS = {
    "exact": "T = I + M^T: the target rows of one-hot inputs under y = ReLU(x) + x M^T",
    "code": "T = I + M: what the critique's script factors (differs from exact for asymmetric M)",
}


# -- naive and naive + offset ------------------------------------------------------------------------------


def naive_weights(n_features: int, d_mlp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, d], [d, n]) weights computing features 0..d-1 exactly."""
    k = min(n_features, d_mlp)
    W_in, W_out = torch.zeros(n_features, d_mlp), torch.zeros(d_mlp, n_features)
    W_in[range(k), range(k)] = 1.0
    W_out[range(k), range(k)] = 1.0
    return W_in, W_out


def naive_model(cfg: ToyConfig | dict | None = None, **changes) -> ToyModel:
    """The naive model, scored on `cfg`'s task (its M: the clean task gives 1/12, a noisy task more)."""
    cfg = as_config(cfg, **changes)
    W_in, W_out = naive_weights(cfg.n_features, cfg.d_mlp)
    where = "" if cfg.mixing == "clean" else f" on {cfg.describe()} labels"
    return built_model(cfg, W_in, W_out, kind="naive", label=f"naive{where}")


def offset_model(b: float, cfg: ToyConfig | dict | None = None, **changes) -> ToyModel:
    """Naive plus a constant `b` from every implemented neuron to every unimplemented output."""
    cfg = as_config(cfg, **changes)
    W_in, W_out = naive_weights(cfg.n_features, cfg.d_mlp)
    W_out[:, cfg.d_mlp :] = float(b)
    return built_model(cfg, W_in, W_out, kind="naive+offset", label=f"naive + offset b={b:.4g}", b=float(b))


def _offset_moments(n: int, d: int, p: float) -> tuple[float, float, float, float]:
    """E[S^2], E[S] E[R], E[R^2], (n - d)/n for S = sum of d ReLU(x_j), R = one ReLU(x_o), x ~ Bernoulli(p) U(-1,1)."""
    er, er2 = p / 4, p / 6
    d = min(d, n)
    es = d * er
    es2 = d * (er2 - er**2) + es**2
    return es2, es * er, er2, (n - d) / n


def offset_loss(p: float, b: float | torch.Tensor, n_features: int = 100, d_mlp: int = 50):
    """Analytic L/p of naive + offset b on the clean task (b may be a tensor)."""
    es2, cross, er2, frac = _offset_moments(n_features, d_mlp, p)
    return frac * (b * b * es2 - 2 * b * cross + er2) / p


def best_offset(p: float, n_features: int = 100, d_mlp: int = 50) -> tuple[float, float]:
    """(b*, L/p at b*) of naive + offset on the clean task, analytically."""
    es2, cross, er2, frac = _offset_moments(n_features, d_mlp, p)
    b = cross / es2
    return b, frac * (er2 - cross**2 / es2) / p


@dataclasses.dataclass(frozen=True)
class OffsetSweep(Result):
    """Naive + offset on the clean task: L/p against the offset b at several densities.

    Axes: p, offset.

    Attributes:
        p: [p] densities; b: [offset] offsets.
        loss: [p, offset] analytic L/p. best_b, best_loss: [p] the analytic optimum.
        mc_loss, mc_stderr: [p] L/p of the model with b = best_b measured by `evaluate` (Monte Carlo).
        naive: the naive L/p (b = 0). n_features, d_mlp: sizes. n_samples: Monte Carlo samples per density.
    """

    p: torch.Tensor
    b: torch.Tensor
    loss: torch.Tensor
    best_b: torch.Tensor
    best_loss: torch.Tensor
    mc_loss: torch.Tensor
    mc_stderr: torch.Tensor
    naive: float
    n_features: int
    d_mlp: int
    n_samples: int
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "p": "p",
        "b": "b",
        "loss": "p b",
        "best_b": "p",
        "best_loss": "p",
        "mc_loss": "p",
        "mc_stderr": "p",
    }

    def at(self, p: float) -> tuple[float, float, float]:
        """(best b, analytic L/p, Monte Carlo L/p) at the swept density nearest `p`."""
        i = int((self.p.double().log() - math.log(p)).abs().argmin())
        return float(self.best_b[i]), float(self.best_loss[i]), float(self.mc_loss[i])

    def to_frame(self):
        """One row per (p, b): analytic L/p; plus the optimum and its Monte Carlo check per p."""
        import pandas as pd

        rows = []
        for i, p in enumerate(self.p.tolist()):
            for j, b in enumerate(self.b.tolist()):
                rows.append({"p": p, "b": b, "loss_per_p": float(self.loss[i, j])})
        return pd.DataFrame(rows)

    def table(self):
        """One row per density: best b, its analytic L/p, the Monte Carlo L/p and standard error."""
        import pandas as pd

        return pd.DataFrame(
            {
                "p": self.p.numpy(),
                "best_b": self.best_b.numpy(),
                "loss_per_p": self.best_loss.numpy(),
                "monte_carlo": self.mc_loss.numpy(),
                "mc_stderr": self.mc_stderr.numpy(),
                "gain_vs_naive": (self.naive - self.best_loss).numpy(),
            }
        )


def offset_sweep(
    p: Sequence[float] = (0.001, 0.01, 0.1, 1.0),
    b: Sequence[float] | torch.Tensor | None = None,
    *,
    n_features: int = 100,
    d_mlp: int = 50,
    n_samples: int = 200_000,
    seed: int = 0,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> OffsetSweep:
    """L/p of naive + offset b against b (analytic, default geomspace(0.002, 0.05, 100)) at each density,
    and a Monte Carlo check of the optimum with the model's real forward pass."""
    ps = torch.as_tensor(p, dtype=torch.float64).flatten()
    if len(ps) == 0 or bool((ps <= 0).any()) or bool((ps > 1).any()):
        raise InputError(f"Densities p must be in (0, 1], got {p!r}.")
    bs = (
        torch.logspace(math.log10(0.002), math.log10(0.05), 100, dtype=torch.float64)
        if b is None
        else torch.as_tensor(b, dtype=torch.float64).flatten()
    )
    run = Run.of(run, progress=progress, cancel=cancel)
    loss = torch.stack([offset_loss(float(q), bs, n_features, d_mlp) for q in ps])
    best = [best_offset(float(q), n_features, d_mlp) for q in ps]

    def check(i: int):
        q = float(ps[i])
        model = offset_model(best[i][0], ToyConfig(n_features=n_features, d_mlp=d_mlp, p=q))
        r = evaluate(model, q, n_samples=n_samples, seed=seed + i, progress=False, cancel=run.cancel)
        return float(r.loss[0, 0]), float(r.stderr[0, 0])

    mc = run.map(list(range(len(ps))), check, desc="naive + offset")
    return OffsetSweep(
        p=ps.float(),
        b=bs.float(),
        loss=loss.float(),
        best_b=torch.tensor([x[0] for x in best]),
        best_loss=torch.tensor([x[1] for x in best]),
        mc_loss=torch.tensor([x[0] for x in mc]),
        mc_stderr=torch.tensor([x[1] for x in mc]),
        naive=naive_loss(n_features, d_mlp),
        n_features=n_features,
        d_mlp=d_mlp,
        n_samples=n_samples,
        provenance=Provenance.capture(
            "toymodels",
            p=ps.tolist(),
            b=bs.tolist(),
            n_features=n_features,
            d_mlp=d_mlp,
            n_samples=n_samples,
            seed=seed,
        ),
    )


# -- semi-NMF ----------------------------------------------------------------------------------------------


def _nmf_init(A: torch.Tensor, d: int, gen: torch.Generator, iters: int) -> torch.Tensor:
    """W >= 0 [n, d] of a rank-d NMF of A >= 0 (sklearn's random init scale; Lee-Seung multiplicative updates)."""
    n, m = A.shape
    scale = math.sqrt(float(A.mean()) / d)
    W = scale * torch.randn(n, d, generator=gen, dtype=torch.float64).abs()
    H = scale * torch.randn(d, m, generator=gen, dtype=torch.float64).abs()
    eps = 1e-12
    for _ in range(iters):
        H *= (W.T @ A) / (W.T @ W @ H + eps)
        W *= (A @ H.T) / (W @ H @ H.T + eps)
    return W


def semi_nmf(
    T: torch.Tensor,
    d: int,
    *,
    iters: int = 500,
    pg_steps: int = 5,
    lr: tuple[float, float] = (0.1, 0.001),
    nmf_iters: int = 1000,
    seed: int = 42,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T [n, m] ~ U V with U >= 0 [n, d], V [d, m] (the critique's alternating scheme).

    U starts from a rank-d NMF of |T|; then `iters` times: V = pinv(U) T (skipped when cond(U) >= 1e12), and
    `pg_steps` projected-gradient steps U <- max(U - eta (U V - T) V^T, 1e-8), eta cosine-annealed from lr[0]
    to lr[1]. The critique initialises with sklearn's NMF (coordinate descent, 5000 iterations); this uses
    multiplicative updates with the same random-init scale, so the starting U differs.
    """
    T = torch.as_tensor(T, dtype=torch.float64)
    gen = generator(seed, "snmf")
    U = _nmf_init(T.abs(), d, gen, nmf_iters)
    V = torch.linalg.pinv(U) @ T
    for it in range(iters):
        if float(torch.linalg.cond(U)) < 1e12:
            V = torch.linalg.pinv(U) @ T
        eta = lr[1] + 0.5 * (lr[0] - lr[1]) * (1 + math.cos(math.pi * it / iters))
        for _ in range(pg_steps):
            U = (U - eta * (U @ V - T) @ V.T).clamp_min(1e-8)
    return U, V


def snmf_target(M: torch.Tensor, orientation: str = "exact") -> torch.Tensor:
    """I + M^T ("exact") or I + M ("code", the critique's script)."""
    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}.")
    eye = torch.eye(len(M), dtype=torch.float64)
    M = M.double()
    return eye + (M.T if orientation == "exact" else M)


def snmf_model(
    cfg: ToyConfig | dict | None = None, *, orientation: str = "exact", seed: int = 42, **changes
) -> ToyModel:
    """The semi-NMF baseline for `cfg`'s task: W_in = U >= 0, W_out = V from factorising its target."""
    cfg = as_config(cfg, **changes)
    M = build_task(cfg).mixing(cfg.sigma)
    U, V = semi_nmf(snmf_target(M, orientation), cfg.d_mlp, seed=seed)
    return built_model(
        cfg,
        U.float(),
        V.float(),
        kind="semi-NMF",
        label=f"semi-NMF ({orientation}) {cfg.describe()}",
        orientation=orientation,
        seed=seed,
    )


@dataclasses.dataclass(frozen=True)
class SNMFSweep(Result):
    """The semi-NMF baseline's L/p against the mixing scale sigma, per orientation and evaluation mode.

    Axes: variant (orientation x evaluation mode), sigma.

    Attributes:
        sigma: [sigma]; variants: [variant] labels like "exact, one-hot eval"; orientation, mode: [variant].
        loss, stderr: [variant, sigma] L/p. naive: the clean-task naive L/p.
        naive_noisy: [sigma] the naive weights on the noisy labels (Bernoulli evaluation).
        kind: the mixing kind; p: the Bernoulli evaluation density.
    """

    sigma: torch.Tensor
    variants: tuple[str, ...]
    orientation: tuple[str, ...]
    mode: tuple[str, ...]
    loss: torch.Tensor
    stderr: torch.Tensor
    naive: float
    naive_noisy: torch.Tensor
    kind: str
    p: float
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "sigma": "sigma",
        "loss": "variants sigma",
        "stderr": "variants sigma",
        "naive_noisy": "sigma",
    }

    def to_frame(self):
        import pandas as pd

        rows = []
        for v, name in enumerate(self.variants):
            for j, s in enumerate(self.sigma.tolist()):
                rows.append(
                    {
                        "variant": name,
                        "orientation": self.orientation[v],
                        "mode": self.mode[v],
                        "sigma": s,
                        "loss_per_p": float(self.loss[v, j]),
                        "stderr": float(self.stderr[v, j]),
                    }
                )
        return pd.DataFrame(rows)

    def at(self, variant: str, sigma: float) -> float:
        j = int((self.sigma - sigma).abs().argmin())
        return float(self.loss[self.variants.index(variant), j])


def snmf_sweep(
    sigmas: Sequence[float] = (0.0, 0.005, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04),
    *,
    kind: str = "asymmetric",
    orientations: Sequence[str] = ("code", "exact"),
    modes: Sequence[str] = ("one_hot", "bernoulli"),
    p: float = 0.01,
    n_features: int = 100,
    d_mlp: int = 50,
    n_samples: int = 200_000,
    mixing_seed: int = 0,
    seed: int = 42,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> SNMFSweep:
    """Semi-NMF baselines for a Gaussian mixing at each sigma (one unit draw, scaled), in both orientations,
    evaluated with one-hot inputs (the critique's plot) and Bernoulli(p) inputs (comparable to trained models)."""
    if kind not in ("symmetric", "asymmetric"):
        raise InputError(f"kind must be 'symmetric' or 'asymmetric', got {kind!r}.")
    for o in orientations:
        if o not in ORIENTATIONS:
            raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {o!r}.")
    run = Run.of(run, progress=progress, cancel=cancel)
    sig = [float(s) for s in sigmas]

    def one(s: float):
        cfg = ToyConfig(
            n_features=n_features, d_mlp=d_mlp, p=p, mixing=kind, sigma=s, mixing_seed=mixing_seed
        )
        models = [snmf_model(cfg, orientation=o, seed=seed) for o in orientations]
        out = {}
        for mode in modes:
            r = evaluate(models, p, n_samples=n_samples, mode=mode, progress=False, cancel=run.cancel)
            for i, o in enumerate(orientations):
                out[(o, mode)] = (float(r.loss[i, 0]), float(r.stderr[i, 0]))
        naive = evaluate(naive_model(cfg), p, n_samples=n_samples, progress=False, cancel=run.cancel)
        return out, float(naive.loss[0, 0])

    parts = run.map(sig, one, desc="semi-NMF sweep")
    variants = [(o, m) for o in orientations for m in modes]
    names = tuple(f"{o}, {'one-hot' if m == 'one_hot' else 'Bernoulli'} eval" for o, m in variants)
    return SNMFSweep(
        sigma=torch.tensor(sig),
        variants=names,
        orientation=tuple(o for o, _ in variants),
        mode=tuple(m for _, m in variants),
        loss=torch.tensor([[parts[j][0][v][0] for j in range(len(sig))] for v in variants]),
        stderr=torch.tensor([[parts[j][0][v][1] for j in range(len(sig))] for v in variants]),
        naive=naive_loss(n_features, d_mlp),
        naive_noisy=torch.tensor([parts[j][1] for j in range(len(sig))]),
        kind=kind,
        p=float(p),
        provenance=Provenance.capture(
            "toymodels",
            sigmas=sig,
            kind=kind,
            orientations=list(orientations),
            modes=list(modes),
            p=p,
            n_features=n_features,
            d_mlp=d_mlp,
            n_samples=n_samples,
            mixing_seed=mixing_seed,
            seed=seed,
        ),
    )
