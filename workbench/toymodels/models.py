"""`ToyModel` (a trained or hand-built toy model, a Result) and the task every model is scored on.

Every model is stored in the reduced form of the critique: ``y_hat = ReLU(x W_in) W_out`` scored against
``y = ReLU(x) + x M^T``. The residual CC model reduces to it exactly: with G = W_E W_E^T,
``y_hat = x G + ReLU(x W_E W_1) W_2 W_E^T`` against ``x + ReLU(x)``, i.e. W_in = W_E W_1, W_out = W_2 W_E^T and
M = I - G; its raw weights are kept alongside (`W_E`, `W_1`, `W_2`) and `residual_forward` runs them literally.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from workbench.errors import InputError
from workbench.results import Provenance, Result
from workbench.toymodels.config import ToyConfig
from workbench.toymodels.data import embed_mixing, embedding, generator, unit_mixing

KINDS = {
    "trained": "trained with AdamW on its task",
    "naive": "features 0..d-1 implemented exactly (one neuron each), the rest output 0",
    "naive+offset": "naive, plus a constant b from every neuron to every unimplemented output",
    "semi-NMF": "W_in >= 0, W_out free, factorising the one-hot target I + M^T (or I + M), no training",
    "transplanted": "a noise-trained model fine-tuned on the clean task (M = 0)",
    "weights": "weights given by the user",
}


@dataclasses.dataclass(frozen=True)
class Task:
    """The matrices of a config's task. Effective mixing: ``M = fixed + scale * unit`` (scale = sigma)."""

    fixed: (
        torch.Tensor
    )  # [feature, feature]: the part that does not scale (identity from labels, -G, embed M)
    unit: torch.Tensor | None  # [feature, feature]: the Gaussian / low-rank draw at sigma = 1
    W_E: torch.Tensor | None  # [feature, embed] for the residual model

    def mixing(self, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        return self.fixed if self.unit is None else self.fixed + sigma * self.unit


def build_task(cfg: ToyConfig) -> Task:
    """The task's matrices for `cfg`, drawn from the mixing stream of ``cfg.mixing_seed`` (default ``cfg.seed``)."""
    gen = generator(cfg.seed if cfg.mixing_seed is None else cfg.mixing_seed, "mixing")
    n = cfg.n_features
    eye = torch.eye(n)
    unit, w_e = None, None
    if cfg.model == "residual":
        w_e = embedding(n, cfg.d_embed, gen)
        g = (w_e.double() @ w_e.double().T).float()
        fixed = (eye if cfg.label_fn == "x+relu" else 0 * eye) - g
        return Task(fixed=fixed, unit=None, W_E=w_e)
    fixed = eye.clone() if cfg.label_fn == "x+relu" else torch.zeros(n, n)
    if cfg.mixing == "embed":
        fixed = fixed + embed_mixing(embedding(n, cfg.d_embed, gen), cfg.embed_sign)
    elif cfg.mixing != "clean":
        unit = unit_mixing(
            cfg.mixing, n, gen, rank=cfg.rank, symmetric=cfg.lowrank_symmetric, flat=cfg.lowrank_flat
        )
    return Task(fixed=fixed, unit=unit, W_E=w_e)


def forward(x: torch.Tensor, W_in: torch.Tensor, W_out: torch.Tensor) -> torch.Tensor:
    """[batch, feature] ReLU(x W_in) W_out."""
    return torch.relu(x @ W_in) @ W_out


def residual_forward(
    x: torch.Tensor, W_E: torch.Tensor, W_1: torch.Tensor, W_2: torch.Tensor
) -> torch.Tensor:
    """Braun et al.'s CC model run literally: r = x W_E; r <- r + ReLU(r W_1) W_2; y_hat = r W_E^T."""
    r = x @ W_E
    r = r + torch.relu(r @ W_1) @ W_2
    return r @ W_E.T


@dataclasses.dataclass(frozen=True)
class ToyModel(Result):
    """A toy model in reduced form, with its task and training record.

    Axes: feature (input/output, n), neuron (d), step (training).

    Attributes:
        W_in: [feature, neuron]; W_out: [neuron, feature].
        M: [feature, feature] the mixing its task puts into the label y = ReLU(x) + x M^T (final sigma if learned).
        sigma: the final mixing scale (|sigma| if learned); NaN for clean and embedding-like tasks.
        curve: [step] training loss / p per step (MSE over batch and features; empty for built models).
        sigma_curve: [step] sigma during training when learned (else empty).
        config: the `ToyConfig` fields (its `key` names the model in caches).
        kind: "trained", "naive", "naive+offset", "semi-NMF", "transplanted" or "weights".
        label: a short description for legends.
        W_E, W_1, W_2: the residual CC model's frozen embedding [feature, embed] and trained MLP weights
            [embed, neuron], [neuron, embed]; None for the simplified model.
    """

    W_in: torch.Tensor
    W_out: torch.Tensor
    M: torch.Tensor
    sigma: float
    curve: torch.Tensor
    sigma_curve: torch.Tensor
    config: dict[str, Any]
    kind: str
    label: str
    W_E: torch.Tensor | None
    W_1: torch.Tensor | None
    W_2: torch.Tensor | None
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "W_in": "feature neuron",
        "W_out": "neuron feature",
        "M": "feature feature",
        "curve": "step",
        "sigma_curve": "sigma_step",
        "W_E": "feature embed",
        "W_1": "embed neuron",
        "W_2": "neuron embed",
    }

    @property
    def cfg(self) -> ToyConfig:
        return ToyConfig.from_dict(self.config)

    @property
    def key(self) -> str:
        """The cache key: the config's for trained models, kind and config for built ones."""
        base = self.cfg.key
        return base if self.kind == "trained" else f"{self.kind}:{base}:{self.label}"

    @property
    def n_features(self) -> int:
        return self.W_in.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.W_in.shape[1]

    @property
    def p(self) -> float:
        """The training density (1/n for one-hot data)."""
        return self.cfg.p_eval

    @property
    def mixing_std(self) -> float:
        """Standard deviation of the off-diagonal entries of M (the critique's legend: 0.031 for the embedding)."""
        off = ~torch.eye(self.n_features, dtype=torch.bool)
        return float(self.M[off].std())

    @property
    def final_loss(self) -> float:
        """Mean training loss / p over the last 1% of steps (NaN for built models)."""
        if len(self.curve) == 0:
            return math.nan
        k = max(1, len(self.curve) // 100)
        return float(self.curve[-k:].mean())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, feature] outputs for inputs x [batch, feature]."""
        return forward(x, self.W_in, self.W_out)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, feature] the labels of its task, ReLU(x) + x M^T."""
        return torch.relu(x) + x @ self.M.T

    def with_task(self, M: torch.Tensor | None = None, label: str | None = None) -> ToyModel:
        """The same weights scored on another mixing `M` (None: M = 0, the clean task)."""
        M = torch.zeros_like(self.M) if M is None else torch.as_tensor(M, dtype=torch.float32)
        if M.shape != self.M.shape:
            raise InputError(f"M must be {tuple(self.M.shape)}, got {tuple(M.shape)}.")
        return dataclasses.replace(
            self, M=M, label=label or f"{self.label} on {'M = 0' if not M.any() else 'new M'}"
        )

    def to_frame(self):
        """One row per training step: step, loss / p (and sigma when learned)."""
        import pandas as pd

        data = {"step": list(range(len(self.curve))), "loss_per_p": self.curve.numpy()}
        if len(self.sigma_curve):
            data["sigma"] = self.sigma_curve.numpy()
        return pd.DataFrame(data)

    def __repr__(self) -> str:
        extra = f", final training L/p {self.final_loss:.4f}" if len(self.curve) else ""
        return (
            f"ToyModel({self.kind}: {self.label}, {self.n_features} features x {self.d_mlp} neurons{extra})"
        )


def built_model(
    cfg: ToyConfig, W_in: torch.Tensor, W_out: torch.Tensor, *, kind: str, label: str, M=None, **options: Any
) -> ToyModel:
    """A model from given weights, scored on `cfg`'s task (or on `M`)."""
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    task = build_task(cfg)
    M = task.mixing(cfg.sigma) if M is None else torch.as_tensor(M, dtype=torch.float32)
    n, d = cfg.n_features, W_in.shape[1]
    if W_in.shape != (n, d) or W_out.shape != (d, n):
        raise InputError(
            f"W_in must be [{n}, d] and W_out [d, {n}], got {tuple(W_in.shape)}, {tuple(W_out.shape)}."
        )
    return ToyModel(
        W_in=W_in.detach().float().clone(),
        W_out=W_out.detach().float().clone(),
        M=M.detach().float().clone(),
        sigma=float(cfg.sigma) if cfg.has_sigma else math.nan,
        curve=torch.empty(0),
        sigma_curve=torch.empty(0),
        config=cfg.to_dict(),
        kind=kind,
        label=label,
        W_E=None,
        W_1=None,
        W_2=None,
        provenance=Provenance.capture("toymodels", kind=kind, config=cfg.to_dict(), **options),
    )


def from_weights(W_in, W_out, M=None, *, label: str = "custom weights", p: float = 0.01) -> ToyModel:
    """Wrap your own weights [n, d] and [d, n] as a `ToyModel` scored on mixing `M` (default 0)."""
    W_in, W_out = torch.as_tensor(W_in, dtype=torch.float32), torch.as_tensor(W_out, dtype=torch.float32)
    if W_in.ndim != 2:
        raise InputError("W_in must be a [feature, neuron] matrix.")
    cfg = ToyConfig(n_features=W_in.shape[0], d_mlp=W_in.shape[1], p=p)
    return built_model(cfg, W_in, W_out, kind="weights", label=label, M=M)
