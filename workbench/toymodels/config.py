"""`ToyConfig`: everything that determines one trained toy model (task, model, optimiser, seeds).

Two configs with the same fields train bit-identical models (CPU, one thread), so a trained model is cached
under its config's `key`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from workbench.errors import InputError
from workbench.toymodels.data import EMBED_SIGNS, MIXINGS

MODELS = {
    "mlp": "simplified MLP n -> d -> n, no biases: y_hat = ReLU(x W_in) W_out (the critique's model)",
    "residual": "Braun et al.'s CC model: x W_E -> r + W_2^T ReLU(W_1^T r) -> W_E^T, W_E frozen (d_embed wide)",
}
LABELS = {"relu": "ReLU(x)", "x+relu": "x + ReLU(x)"}
DATA_MODES = {
    "bernoulli": "each feature active with probability p, value U(-1, 1)",
    "one_hot": "exactly one active feature per sample, value U(-1, 1)",
}
SCHEDULES = {
    "cosine": "lr (1 + cos(pi t / T)) / 2 (torch CosineAnnealingLR, the critique's code)",
    "apd": "lr cos(pi/2 t / (T - 1)) (APD's trainer)",
    "constant": "lr",
}


def paper_steps(p: float, n_features: int = 100, base: int = 10_000) -> int:
    """The critique's step rule: base / (1 - (1 - p)^n), the same number of non-empty samples at every p."""
    return int(base / (1 - (1 - p) ** n_features))


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """One toy model: task, architecture, optimiser and seeds. Defaults are the critique's settings.

    Args:
        n_features, d_mlp: input/output features and hidden neurons (100 and 50).
        p: probability that a feature is active (training data; "bernoulli" mode).
        mixing: "clean", "embed", "symmetric", "asymmetric" or "lowrank" (see `workbench.toymodels.MIXINGS`).
        sigma: the scale of a Gaussian or low-rank mixing (entry std / rms); its initial value if learned.
        learn_sigma: train sigma with the weights (the critique's "learned noise scale"; weight decay applies).
        embed_sign: "I-G" (the exact reduction of the residual model) or "G-I" (the sign in the critique's code).
        d_embed: residual-stream width of the embedding-like mixing and of the residual model (1000).
        rank, lowrank_symmetric, lowrank_flat: the low-rank mixing (U = V; orthonormal columns).
        model: "mlp" (simplified) or "residual" (Braun et al.'s CC model; needs mixing="embed", sign "I-G").
        label: "relu" or "x+relu"; default "relu" for the MLP and "x+relu" (the CC labels) for the residual model.
        data: "bernoulli" or "one_hot" (exactly one active feature per sample).
        steps, batch_size, lr, weight_decay, schedule: AdamW and its learning-rate schedule.
        loss_power: 2 for MSE (the papers); 4 trains on mean |y_hat - y|^4 (evaluation stays MSE).
        seed: model initialisation and the training data stream.
        mixing_seed: the mixing matrix / embedding draw (default: `seed`); fix it to vary init with M fixed.
    """

    n_features: int = 100
    d_mlp: int = 50
    p: float = 0.01
    mixing: str = "clean"
    sigma: float = 0.0
    learn_sigma: bool = False
    embed_sign: str = "I-G"
    d_embed: int = 1000
    rank: int | None = None
    lowrank_symmetric: bool = True
    lowrank_flat: bool = True
    model: str = "mlp"
    label: str | None = None
    data: str = "bernoulli"
    steps: int = 10_000
    batch_size: int = 2048
    lr: float = 3e-3
    weight_decay: float = 0.01
    schedule: str = "cosine"
    loss_power: int = 2
    seed: int = 0
    mixing_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_features", "d_mlp", "steps", "batch_size", "d_embed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive whole number, got {value!r}.")
        if self.d_mlp > self.n_features * 4:
            raise InputError(
                f"d_mlp={self.d_mlp} is far wider than n_features={self.n_features}; check the sizes."
            )
        if not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise InputError(f"p must be in (0, 1], got {self.p!r}.")
        if self.mixing not in MIXINGS:
            raise InputError(f"mixing must be one of {', '.join(MIXINGS)}, got {self.mixing!r}.")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise InputError(f"sigma must be a finite number >= 0, got {self.sigma!r}.")
        if self.learn_sigma and self.mixing not in ("symmetric", "asymmetric", "lowrank"):
            raise InputError(
                "learn_sigma needs a Gaussian or low-rank mixing (symmetric, asymmetric, lowrank)."
            )
        if self.learn_sigma and self.sigma == 0:
            raise InputError("A learned sigma needs a nonzero starting value (the critique starts at 0.01).")
        if self.embed_sign not in EMBED_SIGNS:
            raise InputError(f"embed_sign must be one of {EMBED_SIGNS}, got {self.embed_sign!r}.")
        if self.mixing == "lowrank" and (
            isinstance(self.rank, bool)
            or not isinstance(self.rank, int)
            or not 1 <= self.rank <= self.n_features
        ):
            raise InputError(f"mixing='lowrank' needs rank in 1..{self.n_features}, got {self.rank!r}.")
        if self.model not in MODELS:
            raise InputError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}.")
        if self.model == "residual" and (self.mixing != "embed" or self.embed_sign != "I-G"):
            raise InputError(
                "The residual CC model's mixing comes from its own embedding: use mixing='embed', "
                "embed_sign='I-G' (the residual stream puts I - W_E W_E^T into the MLP's target)."
            )
        if self.label is not None and self.label not in LABELS:
            raise InputError(f"label must be one of {', '.join(LABELS)}, got {self.label!r}.")
        if self.data not in DATA_MODES:
            raise InputError(f"data must be one of {', '.join(DATA_MODES)}, got {self.data!r}.")
        if self.schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and self.weight_decay >= 0):
            raise InputError("lr must be > 0 and weight_decay >= 0.")
        if self.loss_power not in (2, 4):
            raise InputError(f"loss_power must be 2 (MSE) or 4, got {self.loss_power!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be a whole number, got {self.seed!r}.")

    # -- derived -----------------------------------------------------------------------------------------
    @property
    def label_fn(self) -> str:
        """The label function actually used ("relu" for the MLP, "x+relu" for the residual model by default)."""
        return self.label or ("x+relu" if self.model == "residual" else "relu")

    @property
    def p_eval(self) -> float:
        """The density the model's own L/p refers to (1/n for one-hot data: one active feature per sample)."""
        return 1 / self.n_features if self.data == "one_hot" else self.p

    @property
    def has_sigma(self) -> bool:
        return self.mixing in ("symmetric", "asymmetric", "lowrank")

    def replace(self, **changes: Any) -> ToyConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise InputError(f"Unknown toy-model config fields: {sorted(unknown)}.")
        return cls(**data)

    @property
    def key(self) -> str:
        """A hash of every field: the cache key of the trained model."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """A short label: mixing (and sigma), p, model."""
        if self.mixing == "clean":
            mix = "M = 0"
        elif self.mixing == "embed":
            mix = f"embedding-like {self.embed_sign} (d_embed {self.d_embed})"
        else:
            name = {"symmetric": "sym", "asymmetric": "asym", "lowrank": f"rank {self.rank}"}[self.mixing]
            mix = f"{name} σ={'learned from ' if self.learn_sigma else ''}{self.sigma:g}"
        extra = "" if self.model == "mlp" else " residual CC"
        data = " one-hot" if self.data == "one_hot" else f" p={self.p:g}"
        return f"{mix}{data}{extra}"

    def changes(self) -> dict[str, Any]:
        """The fields that differ from the defaults (the critique's settings)."""
        default = ToyConfig()
        return {k: v for k, v in self.to_dict().items() if getattr(default, k) != v}

    def code(self) -> str:
        """The constructor call for this config, listing only fields that differ from the defaults."""
        return f"ToyConfig({', '.join(f'{k}={v!r}' for k, v in self.changes().items())})"
