"""Analyses of the critique: sigma sweep, transplant to M = 0, the eigenvector mechanism, per-feature curves,
the two regimes (sparse and dense inputs).

    sweep = sigma_sweep([0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08])      # L/p vs sigma, symmetric and asymmetric
    mechanism(sweep.model("symmetric", 0.03)).plot()                 # does W_in W_out live in M's top eigenspace?
    transplant(train(mixing="symmetric", sigma=0.03)).plot()         # the same model, then trained on M = 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from workbench.core import CancelToken, Run
from workbench.errors import InputError
from workbench.results import Provenance, Result
from workbench.toymodels.baselines import naive_model
from workbench.toymodels.config import ToyConfig, paper_steps
from workbench.toymodels.evaluate import LossCurves, default_ps, evaluate, naive_loss
from workbench.toymodels.models import ToyModel
from workbench.toymodels.train import as_config, finetune, train_many

# -- mechanism -----------------------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise cosine of [n, k] matrices (0 where a column is 0)."""
    num = (a * b).sum(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


@dataclasses.dataclass(frozen=True)
class Mechanism(Result):
    """How a model's weights relate to its mixing matrix M.

    Axes: direction (eigen- or singular directions, sorted descending), neuron, feature.

    Attributes:
        eigenvalues: [direction] of the symmetrised S = (M + M^T)/2, descending; eigenvectors E (columns).
        eig_cos: [direction] cos(E_i, (W_in W_out)^T E_i): how well the linearised network maps E_i onto itself.
        singular_values: [direction] of I + M = U diag(s) V^T; sv_cos: [direction] cos(U_i, (W_in W_out)^T V_i).
        proj_eig_in, proj_eig_out: [direction, neuron] E^T W_in and E^T W_out^T.
        proj_sv_in, proj_sv_out: [direction, neuron] V^T W_in and U^T W_out^T.
        top_fraction_in, top_fraction_out: share of |W_in|^2 (|W_out|^2) inside the top-d eigen-directions (d/n if
            the weights ignored M's spectrum).
        WW: [feature, feature] (W_in W_out)^T (row: output, column: input), comparable with M entry by entry.
        M: [feature, feature]. W_in: [feature, neuron]; W_out: [neuron, feature].
        offdiag_slope: least-squares slope through the origin of WW_oi against M_oi, o != i (NaN if M's
            off-diagonal is 0); offdiag_r2: its R^2.
        diag_slope, diag_intercept: least-squares line WW_ii = a M_ii + b (slope NaN if M's diagonal is constant).
        d_mlp: neurons. label: the model's label.
    """

    eigenvalues: torch.Tensor
    eig_cos: torch.Tensor
    singular_values: torch.Tensor
    sv_cos: torch.Tensor
    proj_eig_in: torch.Tensor
    proj_eig_out: torch.Tensor
    proj_sv_in: torch.Tensor
    proj_sv_out: torch.Tensor
    top_fraction_in: float
    top_fraction_out: float
    WW: torch.Tensor
    M: torch.Tensor
    W_in: torch.Tensor
    W_out: torch.Tensor
    offdiag_slope: float
    offdiag_r2: float
    diag_slope: float
    diag_intercept: float
    d_mlp: int
    label: str
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "eigenvalues": "direction",
        "eig_cos": "direction",
        "singular_values": "direction",
        "sv_cos": "direction",
        "proj_eig_in": "direction d_mlp",
        "proj_eig_out": "direction d_mlp",
        "proj_sv_in": "direction d_mlp",
        "proj_sv_out": "direction d_mlp",
        "WW": "feature feature",
        "M": "feature feature",
        "W_in": "feature d_mlp",
        "W_out": "d_mlp feature",
    }

    def mean_cos(self, start: int, stop: int, basis: str = "eig") -> float:
        """Mean cosine over directions start..stop-1 (0-based) of the eigen ("eig") or singular ("sv") basis."""
        values = self.eig_cos if basis == "eig" else self.sv_cos
        return float(values[start:stop].mean())

    def to_frame(self):
        """One row per direction: eigenvalue, eig_cos, singular value, sv_cos."""
        import pandas as pd

        return pd.DataFrame(
            {
                "direction": range(1, len(self.eigenvalues) + 1),
                "eigenvalue": self.eigenvalues.numpy(),
                "eig_cos": self.eig_cos.numpy(),
                "singular_value": self.singular_values.numpy(),
                "sv_cos": self.sv_cos.numpy(),
            }
        )

    def __repr__(self) -> str:
        d = self.d_mlp
        return (
            f"Mechanism({self.label}: mean cos over the top {d - 10} eigen-directions {self.mean_cos(0, d - 10):.2f}, "
            f"beyond {d + 10}: {self.mean_cos(d + 10, len(self.eig_cos)):.2f}; slopes off-diag {self.offdiag_slope:.3f}, "
            f"diag {self.diag_slope:.3f} M_ii + {self.diag_intercept:.3f})"
        )


def mechanism(model: ToyModel) -> Mechanism:
    """Eigen/singular-vector cosines, projections and the W_in W_out vs M fits of `model` (milliseconds)."""
    if not isinstance(model, ToyModel):
        raise InputError(f"mechanism needs a ToyModel, got {type(model).__name__}.")
    M = model.M.double()
    n, d = model.n_features, model.d_mlp
    W_in, W_out = model.W_in.double(), model.W_out.double()
    WW = (W_in @ W_out).T
    evals, E = torch.linalg.eigh((M + M.T) / 2)
    order = torch.argsort(evals, descending=True)
    evals, E = evals[order], E[:, order]
    U, s, Vh = torch.linalg.svd(torch.eye(n, dtype=torch.float64) + M)
    V = Vh.T
    off = ~torch.eye(n, dtype=torch.bool)
    x, y = M[off], WW[off]
    sxx = float((x * x).sum())
    slope = float((x * y).sum()) / sxx if sxx > 0 else math.nan
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - slope * x) ** 2).sum()) / sst if sxx > 0 and sst > 0 else math.nan
    dx, dy = M.diagonal(), WW.diagonal()
    if float(dx.var()) > 1e-20:
        a, b = (
            torch.linalg.lstsq(torch.stack([dx, torch.ones_like(dx)], 1), dy[:, None])
            .solution.flatten()
            .tolist()
        )
    else:
        a, b = math.nan, float(dy.mean())
    top = E[:, :d]
    frac_in = float((top.T @ W_in).pow(2).sum() / W_in.pow(2).sum().clamp_min(1e-300))
    frac_out = float((top.T @ W_out.T).pow(2).sum() / W_out.pow(2).sum().clamp_min(1e-300))
    return Mechanism(
        eigenvalues=evals.float(),
        eig_cos=_cos(E, WW @ E).float(),
        singular_values=s.float(),
        sv_cos=_cos(U, WW @ V).float(),
        proj_eig_in=(E.T @ W_in).float(),
        proj_eig_out=(E.T @ W_out.T).float(),
        proj_sv_in=(V.T @ W_in).float(),
        proj_sv_out=(U.T @ W_out.T).float(),
        top_fraction_in=frac_in,
        top_fraction_out=frac_out,
        WW=WW.float(),
        M=M.float(),
        W_in=model.W_in,
        W_out=model.W_out,
        offdiag_slope=slope,
        offdiag_r2=r2,
        diag_slope=a,
        diag_intercept=b,
        d_mlp=d,
        label=model.label,
        provenance=Provenance.capture("toymodels", source=model.key),
    )


# -- per-feature responses -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureResponse(Result):
    """Input-output curves of every feature: input x e_i swept over [-1, 1], output i read off.

    Axes: feature, value, neuron.

    Attributes:
        x: [value]; out: [feature, value] output i for input x e_i; label: [feature, value] its target
            ReLU(x) + M_ii x.
        slope_pos, slope_neg: [feature] the response's slope for x > 0 and x < 0 (a bias-free ReLU network is
            linear on each side of 0 along one axis).
        onehot_pos, onehot_neg: [input feature, output feature] outputs for the inputs +e_j and -e_j.
        target_pos, target_neg: [input feature, output feature] their labels.
        contrib: [feature, neuron] W_in[i, k] W_out[k, i], each neuron's share of feature i's positive slope
            (for neurons with W_in[i, k] > 0).
        model_label: the model's label.
    """

    x: torch.Tensor
    out: torch.Tensor
    label: torch.Tensor
    slope_pos: torch.Tensor
    slope_neg: torch.Tensor
    onehot_pos: torch.Tensor
    onehot_neg: torch.Tensor
    target_pos: torch.Tensor
    target_neg: torch.Tensor
    contrib: torch.Tensor
    model_label: str
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "x": "x",
        "out": "feature x",
        "label": "feature x",
        "slope_pos": "feature",
        "slope_neg": "feature",
        "onehot_pos": "feature feature",
        "onehot_neg": "feature feature",
        "target_pos": "feature feature",
        "target_neg": "feature feature",
        "contrib": "feature neuron",
    }

    def to_frame(self):
        """One row per feature: positive and negative slopes."""
        import pandas as pd

        return pd.DataFrame(
            {
                "feature": range(len(self.slope_pos)),
                "slope_pos": self.slope_pos.numpy(),
                "slope_neg": self.slope_neg.numpy(),
            }
        )


def responses(model: ToyModel, n_points: int = 101) -> FeatureResponse:
    """Per-feature input-output curves and one-hot output maps of `model` (a forward pass, milliseconds)."""
    if not isinstance(n_points, int) or n_points < 3:
        raise InputError("n_points must be an integer >= 3.")
    n = model.n_features
    xs = torch.linspace(-1, 1, n_points)
    eye = torch.eye(n)
    with torch.no_grad():
        # output i of input x e_i: ReLU(x W_in[i]) W_out[:, i], for every feature at once
        hidden = torch.relu(xs[None, :, None] * model.W_in[:, None, :])  # [feature, value, neuron]
        out = torch.einsum("fvk,kf->fv", hidden, model.W_out)
        target = torch.relu(xs)[None, :] + model.M.diagonal()[:, None] * xs[None, :]
        pos, neg = model(eye), model(-eye)
        tpos, tneg = model.target(eye), model.target(-eye)
    return FeatureResponse(
        x=xs,
        out=out,
        label=target,
        slope_pos=pos.diagonal().clone(),
        slope_neg=-neg.diagonal().clone(),
        onehot_pos=pos,
        onehot_neg=neg,
        target_pos=tpos,
        target_neg=tneg,
        contrib=(model.W_in * model.W_out.T),
        model_label=model.label,
        provenance=Provenance.capture("toymodels", source=model.key, n_points=n_points),
    )


# -- sigma sweep ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SigmaSweep(Result):
    """L/p against a fixed mixing scale sigma, one trained model per (kind, sigma).

    Axes: kind (symmetric / asymmetric), sigma, feature, neuron, step.

    Attributes:
        sigma: [sigma]; kinds: [kind].
        loss, stderr: [kind, sigma] L/p at density `p`.
        naive_noisy: [kind, sigma] the naive weights on the same noisy labels.
        naive: the clean-task naive L/p (the papers' dashed line).
        W_in: [kind, sigma, feature, neuron]; W_out: [kind, sigma, neuron, feature]; M: [kind, sigma, f, f].
        curves: [kind, sigma, step] training L/p.
        configs: the `ToyConfig` fields of every model, kind-major.
        p: evaluation density. n_samples: evaluation samples per model.
    """

    sigma: torch.Tensor
    kinds: tuple[str, ...]
    loss: torch.Tensor
    stderr: torch.Tensor
    naive_noisy: torch.Tensor
    naive: float
    W_in: torch.Tensor
    W_out: torch.Tensor
    M: torch.Tensor
    curves: torch.Tensor
    configs: tuple[dict[str, Any], ...]
    p: float
    n_samples: int
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "sigma": "sigma",
        "loss": "kinds sigma",
        "stderr": "kinds sigma",
        "naive_noisy": "kinds sigma",
        "W_in": "kinds sigma feature neuron",
        "W_out": "kinds sigma neuron feature",
        "M": "kinds sigma feature feature",
        "curves": "kinds sigma step",
    }

    def _index(self, kind: str, sigma: float) -> tuple[int, int]:
        if kind not in self.kinds:
            raise InputError(f"kind must be one of {self.kinds}, got {kind!r}.")
        return self.kinds.index(kind), int((self.sigma - sigma).abs().argmin())

    def model(self, kind: str, sigma: float) -> ToyModel:
        """The trained model of `kind` at the swept sigma nearest `sigma`."""
        k, j = self._index(kind, sigma)
        cfg = ToyConfig.from_dict(self.configs[k * len(self.sigma) + j])
        return ToyModel(
            W_in=self.W_in[k, j],
            W_out=self.W_out[k, j],
            M=self.M[k, j],
            sigma=cfg.sigma if cfg.has_sigma else math.nan,
            curve=self.curves[k, j],
            sigma_curve=torch.empty(0),
            config=cfg.to_dict(),
            kind="trained",
            label=cfg.describe(),
            W_E=None,
            W_1=None,
            W_2=None,
            provenance=self.provenance,
        )

    def minimum(self, kind: str, fit: bool = True) -> tuple[float, float]:
        """(sigma, L/p) at the curve's minimum; `fit` refines it by a parabola through the lowest point and
        its two neighbours (on an uneven grid too)."""
        k = self.kinds.index(kind)
        y = self.loss[k].double()
        x = self.sigma.double()
        j = int(y.argmin())
        if not fit or j == 0 or j == len(y) - 1:
            return float(x[j]), float(y[j])
        X = torch.stack([x[j - 1 : j + 2] ** 2, x[j - 1 : j + 2], torch.ones(3, dtype=torch.float64)], 1)
        a, b, c = torch.linalg.solve(X, y[j - 1 : j + 2]).tolist()
        if a <= 0:
            return float(x[j]), float(y[j])
        xm = -b / (2 * a)
        return xm, a * xm * xm + b * xm + c

    def crossing(self, kind: str) -> float:
        """The sigma above the minimum where L/p rises back above the naive line (linear interpolation); NaN if
        it stays below within the sweep."""
        k = self.kinds.index(kind)
        y, x = self.loss[k].double(), self.sigma.double()
        j0 = int(y.argmin())
        for j in range(j0 + 1, len(y)):
            if y[j] >= self.naive:
                t = (self.naive - y[j - 1]) / (y[j] - y[j - 1])
                return float(x[j - 1] + t * (x[j] - x[j - 1]))
        return math.nan

    def to_frame(self):
        import pandas as pd

        rows = []
        for k, kind in enumerate(self.kinds):
            for j, s in enumerate(self.sigma.tolist()):
                rows.append(
                    {
                        "kind": kind,
                        "sigma": s,
                        "loss_per_p": float(self.loss[k, j]),
                        "stderr": float(self.stderr[k, j]),
                        "naive_on_noisy_labels": float(self.naive_noisy[k, j]),
                    }
                )
        return pd.DataFrame(rows)


def sigma_sweep(
    sigmas: Sequence[float] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08),
    kinds: Sequence[str] = ("symmetric", "asymmetric"),
    *,
    base: ToyConfig | dict | None = None,
    n_samples: int = 1_000_000,
    n_workers: int = 2,
    cache: bool = True,
    seed: int = 0,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    **changes: Any,
) -> SigmaSweep:
    """Train one model per (kind, sigma) with a fixed sigma and measure L/p at the base density.

    Args:
        sigmas: the mixing scales (the critique: linspace(0, 0.08, 41); CPU: 7 values).
        kinds: "symmetric" and/or "asymmetric".
        base: the other settings (default `ToyConfig()`: p = 0.01, 10k steps); keywords change fields.
        n_samples: evaluation samples per model (the critique: 10^8 symmetric / 10^7 asymmetric).
        n_workers: training processes (one thread each).
        seed: the evaluation seed (shared by every model).
    """
    base = as_config(base, **changes)
    kinds = tuple(kinds)
    for k in kinds:
        if k not in ("symmetric", "asymmetric"):
            raise InputError(f"kinds must be 'symmetric' and/or 'asymmetric', got {k!r}.")
    values = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()]
    if not values or any(not math.isfinite(s) or s < 0 for s in values):
        raise InputError("sigmas must be a non-empty list of finite values >= 0.")
    sig = torch.tensor(values)
    run = Run.of(run, progress=progress, cancel=cancel)
    # sigma = 0 is the clean task whatever the kind: one model (the clean config) serves every kind there
    configs = [
        base.replace(mixing=k, sigma=s, learn_sigma=False)
        if s > 0
        else base.replace(mixing="clean", sigma=0.0)
        for k in kinds
        for s in values
    ]
    models = train_many(configs, n_workers=n_workers, cache=cache, run=run)

    def score(m: ToyModel):
        both = evaluate(
            [m, naive_model(m.cfg)],
            base.p_eval,
            n_samples=n_samples,
            seed=seed,
            progress=False,
            cancel=run.cancel,
            mode="one_hot" if base.data == "one_hot" else "bernoulli",
        )
        return [(float(both.loss[i, 0]), float(both.stderr[i, 0])) for i in range(2)]

    scores = run.map(models, score, desc="evaluating the sweep")
    shape = (len(kinds), len(sig))

    def grid(values):
        return torch.tensor(values).reshape(*shape, *torch.tensor(values).shape[1:])

    return SigmaSweep(
        sigma=sig,
        kinds=kinds,
        loss=grid([s[0][0] for s in scores]),
        stderr=grid([s[0][1] for s in scores]),
        naive_noisy=grid([s[1][0] for s in scores]),
        naive=naive_loss(base.n_features, base.d_mlp),
        W_in=torch.stack([m.W_in for m in models]).reshape(*shape, *models[0].W_in.shape),
        W_out=torch.stack([m.W_out for m in models]).reshape(*shape, *models[0].W_out.shape),
        M=torch.stack([m.M for m in models]).reshape(*shape, *models[0].M.shape),
        curves=torch.stack([m.curve for m in models]).reshape(*shape, -1),
        configs=tuple(m.config for m in models),
        p=base.p_eval,
        n_samples=n_samples,
        provenance=Provenance.capture(
            "toymodels",
            sigmas=sig.tolist(),
            kinds=list(kinds),
            base=base.to_dict(),
            n_samples=n_samples,
            seed=seed,
        ),
    )


# -- transplant ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transplant(Result):
    """One model trained on a noisy task (phase 1), then fine-tuned on the clean task M = 0 (phase 2).

    Axes: step (phase 1 then phase 2), feature, neuron.

    Attributes:
        phase1, phase2: [step] training L/p of the two phases (phase 2 on clean labels).
        noisy_before: L/p of the phase-1 weights on their own noisy task.
        clean_before: L/p of the same weights on the clean task (the moment of the switch).
        clean_after: L/p after fine-tuning on the clean task. *_stderr: their standard errors.
        naive: the clean-task naive L/p.
        W_in_before, W_out_before, W_in_after, W_out_after: the weights before and after phase 2.
        source, target: the configs of the two phases. label: the source model's label. p: the density.
    """

    phase1: torch.Tensor
    phase2: torch.Tensor
    noisy_before: float
    noisy_before_stderr: float
    clean_before: float
    clean_before_stderr: float
    clean_after: float
    clean_after_stderr: float
    naive: float
    W_in_before: torch.Tensor
    W_out_before: torch.Tensor
    W_in_after: torch.Tensor
    W_out_after: torch.Tensor
    source: dict[str, Any]
    target: dict[str, Any]
    label: str
    p: float
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "phase1": "step1",
        "phase2": "step2",
        "W_in_before": "feature neuron",
        "W_out_before": "neuron feature",
        "W_in_after": "feature neuron",
        "W_out_after": "neuron feature",
    }

    def to_frame(self):
        """One row per step of both phases: phase, step (continuing across phases), loss_per_p."""
        import pandas as pd

        n1 = len(self.phase1)
        return pd.DataFrame(
            {
                "phase": ["noisy"] * n1 + ["clean"] * len(self.phase2),
                "step": list(range(n1 + len(self.phase2))),
                "loss_per_p": torch.cat([self.phase1, self.phase2]).numpy(),
            }
        )


def transplant(
    model: ToyModel,
    *,
    steps: int | None = None,
    n_samples: int = 1_000_000,
    seed: int = 0,
    cache: bool = True,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> Transplant:
    """Fine-tune `model` on M = 0 (fresh AdamW and cosine schedule, `steps` default its own) and measure L/p
    before (noisy and clean labels) and after. Both phases belong to the same model (the critique's script
    shows one model's first phase and another's second)."""
    if not isinstance(model, ToyModel) or model.kind != "trained":
        raise InputError("transplant needs a trained ToyModel.")
    run = Run.of(run, progress=progress, cancel=cancel)
    after = finetune(model, steps=steps, cache=cache, run=run)
    clean_before = model.with_task(None, label=f"{model.label} on M = 0")
    ev_kw = dict(n_samples=n_samples, seed=seed, progress=False, cancel=run.cancel)
    noisy = evaluate(model, model.p, **ev_kw)
    both = evaluate([clean_before, after], model.p, **ev_kw)
    return Transplant(
        phase1=model.curve,
        phase2=after.curve,
        noisy_before=float(noisy.loss[0, 0]),
        noisy_before_stderr=float(noisy.stderr[0, 0]),
        clean_before=float(both.loss[0, 0]),
        clean_before_stderr=float(both.stderr[0, 0]),
        clean_after=float(both.loss[1, 0]),
        clean_after_stderr=float(both.stderr[1, 0]),
        naive=naive_loss(model.n_features, model.d_mlp),
        W_in_before=model.W_in,
        W_out_before=model.W_out,
        W_in_after=after.W_in,
        W_out_after=after.W_out,
        source=model.config,
        target=after.config,
        label=model.label,
        p=model.p,
        provenance=Provenance.capture(
            "toymodels", source=model.key, steps=steps, n_samples=n_samples, seed=seed
        ),
    )


# -- two regimes ---------------------------------------------------------------------------------------------


def regime_steps(p: float, n_features: int = 100, base: int = 10_000, max_steps: int | None = None) -> int:
    """The critique's steps at density p (the same number of non-empty samples), capped at `max_steps`."""
    steps = paper_steps(p, n_features, base)
    return min(steps, max_steps) if max_steps else steps


def regimes(
    train_ps: Sequence[float] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
    *,
    base: ToyConfig | dict | None = None,
    base_steps: int = 10_000,
    max_steps: int | None = None,
    eval_ps: Sequence[float] | torch.Tensor | None = None,
    n_samples: int = 200_000,
    n_workers: int = 2,
    cache: bool = True,
    seed: int = 0,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    **changes: Any,
) -> LossCurves:
    """Train one model per training density and evaluate every model over `eval_ps` (and at its own p).

    The default base is the critique's two-regimes figure: asymmetric M with fixed sigma = 0.02. Steps follow
    the critique's rule base_steps / (1 - (1 - p)^n) (105k at p = 0.001), capped at `max_steps` when given.
    """
    if base is None and not changes:
        base = ToyConfig(mixing="asymmetric", sigma=0.02)
    base = as_config(base, **changes)
    configs = [
        base.replace(p=float(q), steps=regime_steps(float(q), base.n_features, base_steps, max_steps))
        for q in train_ps
    ]
    run = Run.of(run, progress=progress, cancel=cancel)
    models = train_many(configs, n_workers=n_workers, cache=cache, run=run)
    models = [dataclasses.replace(m, label=f"trained at p={m.p:g} ({m.cfg.steps:,} steps)") for m in models]
    ps = default_ps(20) if eval_ps is None else eval_ps
    return evaluate(models, ps, n_samples=n_samples, own_p=True, seed=seed, run=run)
