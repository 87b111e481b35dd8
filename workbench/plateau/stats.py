"""Reference statistics of real activations at one site: mean, covariance, typical norm, a sample of vectors.

They set the unit of perturbation sizes (the median norm) and feed the matched-statistics baselines
(`cov_random`, `cov_mixture`, `toward_real`). Position 0 is excluded: the first token's residual is an outlier
(an attention sink with a norm many times the others) and would dominate mean, covariance and norm.

A covariance from n samples in d dimensions is poor when n is not much larger than d (rank-deficient when
n <= d). `ledoit_wolf` shrinks it toward a scaled identity by the data-driven amount of Ledoit & Wolf (2004);
`reference_stats` warns when n < 10 d.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from workbench.core import CancelToken, ProgressCallback, Run, positive_size
from workbench.errors import InputError
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

MIN_SAMPLES_PER_DIM = 10
"""Below this many samples per dimension `reference_stats` warns that the covariance is poorly estimated."""


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of samples `x` [n, d]: (cov [d, d] float64, shrinkage in [0, 1]).

    cov = (1 - shrinkage) * S + shrinkage * (tr(S) / d) * I, with S the maximum-likelihood covariance and the
    shrinkage that minimises the expected Frobenius error (the estimator scikit-learn's `ledoit_wolf` uses).
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    n, d = x.shape
    if n < 2:
        raise InputError("A covariance needs at least two samples.")
    xc = x - x.mean(0)
    s = xc.T @ xc / n
    mu = torch.trace(s) / d
    x2 = xc**2
    beta_ = (x2.T @ x2).sum()
    delta_ = (s**2).sum()
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * torch.trace(s) + d * mu**2) / d
    beta = torch.minimum(beta, delta)
    shrinkage = 0.0 if float(delta) == 0 else float(beta / delta)
    cov = (1 - shrinkage) * s + shrinkage * mu * torch.eye(d, dtype=torch.float64)
    return cov, shrinkage


def sqrt_factor(cov: torch.Tensor) -> torch.Tensor:
    """A factor F [d, d] with F F^T = cov (symmetric square root via eigh; tolerates a singular cov)."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)
    return evecs * evals.clamp(min=0).sqrt()


@dataclasses.dataclass(frozen=True)
class RefStats(Result):
    """Statistics of real activations at one site (position 0 excluded).

    Attributes:
        mean: [d_model] mean activation.
        cov: [d_model, d_model] covariance (float64), shrunk by `shrinkage`.
        factor: [d_model, d_model] with factor @ factor.T == cov, for sampling N(mean, cov).
        median_norm: the median L2 norm of the activations: the unit of perturbation sizes.
        norm_quantiles: norms at the 5th, 25th, 50th, 75th and 95th percentiles.
        sample: [m, d_model] real activations kept for `toward_real` / `real_mixture` directions.
        n_samples: activations the mean and covariance were estimated from.
        shrinkage: Ledoit-Wolf (or given) shrinkage intensity in [0, 1].
        site, layer: where the activations were read.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    factor: torch.Tensor
    median_norm: float
    norm_quantiles: tuple[float, ...]
    sample: torch.Tensor
    n_samples: int
    shrinkage: float
    site: str
    layer: int | None
    warnings: tuple[str, ...]
    provenance: Provenance

    @property
    def d_model(self) -> int:
        return self.mean.shape[-1]

    def sample_normal(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n, d_model] samples of N(mean, cov) in float32."""
        z = torch.randn(n, self.d_model, generator=generator, dtype=torch.float64)
        return (self.mean.double() + z @ self.factor.T).float()

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "site": self.site,
                    "layer": self.layer,
                    "n_samples": self.n_samples,
                    "d_model": self.d_model,
                    "median_norm": self.median_norm,
                    "shrinkage": self.shrinkage,
                    "mean_norm": float(self.mean.norm()),
                }
            ]
        )

    def __repr__(self) -> str:
        return (
            f"RefStats({self.site} layer {self.layer}: {self.n_samples} activations, d_model {self.d_model}, "
            f"median norm {self.median_norm:.4g}, shrinkage {self.shrinkage:.3f})"
        )


def stats_from_activations(
    acts: torch.Tensor,
    *,
    site: str = "resid_pre",
    layer: int | None = None,
    shrinkage: str | float = "ledoit_wolf",
    keep: int = 4096,
    seed: int = 0,
    model_name: str = "activations",
    **options: Any,
) -> RefStats:
    """`RefStats` from activations you already have, [n, d_model] (position 0 already removed)."""
    acts = torch.as_tensor(acts).detach().float().cpu()
    if acts.dim() != 2 or len(acts) < 2:
        raise InputError("Reference activations must be a [n, d_model] tensor with at least two rows.")
    if not torch.isfinite(acts).all():
        raise InputError("Reference activations contain NaN or inf.")
    n, d = acts.shape
    notes = []
    if shrinkage == "ledoit_wolf":
        cov, amount = ledoit_wolf(acts)
    elif isinstance(shrinkage, (int, float)) and 0 <= shrinkage <= 1:
        xc = acts.double() - acts.double().mean(0)
        s = xc.T @ xc / n
        amount = float(shrinkage)
        cov = (1 - amount) * s + amount * torch.trace(s) / d * torch.eye(d, dtype=torch.float64)
    else:
        raise InputError(f"shrinkage must be 'ledoit_wolf' or a number in [0, 1], got {shrinkage!r}.")
    if n < MIN_SAMPLES_PER_DIM * d:
        notes.append(
            f"The covariance at {site} (layer {layer}) comes from {n} activations for {d} dimensions "
            f"(fewer than {MIN_SAMPLES_PER_DIM}x); it was shrunk toward the identity by {amount:.2f}. "
            f"For matched-statistics baselines use at least {MIN_SAMPLES_PER_DIM * d} activations "
            "(reference_stats(model, corpus, ...))."
        )
    if amount == 0 and n <= d:
        notes.append(f"The covariance is singular ({n} samples <= {d} dimensions) and not shrunk.")
    norms = acts.norm(dim=-1)
    qs = torch.quantile(norms, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
    gen = torch.Generator().manual_seed(seed)
    sample = acts[torch.randperm(n, generator=gen)[:keep]] if n > keep else acts.clone()
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return RefStats(
        mean=acts.mean(0),
        cov=cov,
        factor=sqrt_factor(cov),
        median_norm=float(qs[2]),
        norm_quantiles=tuple(float(q) for q in qs),
        sample=sample,
        n_samples=n,
        shrinkage=amount,
        site=site,
        layer=layer,
        warnings=tuple(notes),
        provenance=Provenance.capture(model_name, site=site, layer=layer, shrinkage=shrinkage, **options),
    )


def collect_activations(
    model,
    tokens: list[torch.Tensor],
    *,
    site: str,
    layer: int | None,
    skip_positions: int = 1,
    max_samples: int | None = None,
    batch_size: int = 32,
    progress: bool | ProgressCallback = False,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> torch.Tensor:
    """[n, d_model] activations at `site` for every position >= `skip_positions` of each token row."""
    batch_size = positive_size(batch_size, "batch_size", allow_none=False)
    run = Run.of(run, progress=progress, cancel=cancel)
    by_len: dict[int, list[torch.Tensor]] = {}
    for t in tokens:
        by_len.setdefault(t.shape[-1], []).append(t.reshape(-1))
    batches = [
        torch.stack(rows[i : i + batch_size])
        for rows in by_len.values()
        for i in range(0, len(rows), batch_size)
    ]
    out: list[torch.Tensor] = []
    total = 0

    def one(batch: torch.Tensor) -> None:
        nonlocal total
        if max_samples is not None and total >= max_samples:
            return
        with torch.no_grad(), model.trace(batch.to(model.device), run=run):
            value = model.site(site, layer).value.save()
        acts = value[:, skip_positions:].detach().float().cpu().reshape(-1, value.shape[-1])
        out.append(acts)
        total += len(acts)

    run.map(batches, one, desc="reference activations")
    if not out:
        raise InputError(f"No activations at positions >= {skip_positions}: the prompts are too short.")
    acts = torch.cat(out)
    return acts[:max_samples] if max_samples is not None else acts


def as_token_rows(model, data) -> list[torch.Tensor]:
    """Prompts as a list of [1, pos] token rows: texts (any lengths) or a [batch, pos] tensor."""
    if isinstance(data, torch.Tensor):
        toks = model.to_tokens(data)
        return [row[None] for row in toks]
    if isinstance(data, str):
        data = [data]
    data = list(data)
    if not data:
        raise InputError("No prompts given.")
    rows = []
    for item in data:
        if isinstance(item, torch.Tensor):
            rows.append(model.to_tokens(item))
        else:
            rows.append(model.to_tokens([item]))
    return rows


def reference_stats(
    model,
    data,
    *,
    layer: int = 1,
    site: str = "resid_pre",
    max_samples: int = 20_000,
    shrinkage: str | float = "ledoit_wolf",
    skip_positions: int = 1,
    keep: int = 4096,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool | ProgressCallback = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> RefStats:
    """Mean, covariance and typical norm of real activations at `site` of `layer`, position 0 excluded.

    Args:
        model: a `WorkbenchModel`.
        data: texts (any lengths) or a [batch, pos] token tensor, e.g. `workbench.tasks.pack(model, docs, 64)`.
        max_samples: stop after this many activations (all positions >= `skip_positions` count).
        shrinkage: "ledoit_wolf" (default, data-driven) or a fixed intensity in [0, 1] (0: sample covariance).
        skip_positions: leading positions left out (1 excludes the BOS / first token).
        keep: real activations kept in `RefStats.sample` for the `toward_real` and `real_mixture` families.
    """
    model.check_site(site, layer)
    if skip_positions < 0:
        raise InputError("skip_positions must be >= 0.")
    layer = layer % model.cfg.n_layers if layer is not None else None
    rows = as_token_rows(model, data)
    acts = collect_activations(
        model,
        rows,
        site=site,
        layer=layer,
        skip_positions=skip_positions,
        max_samples=max_samples,
        batch_size=batch_size,
        run=Run.of(run, progress=progress, cancel=cancel),
    )
    return stats_from_activations(
        acts,
        site=site,
        layer=layer,
        shrinkage=shrinkage,
        keep=keep,
        seed=seed,
        model_name=model.name,
        max_samples=max_samples,
        skip_positions=skip_positions,
    )


def resolve_reference(model, reference, rows, site: str, layer: int, run: Run) -> RefStats:
    """Reference statistics at `site` of `layer` (where an engine writes activations): `reference` itself when it
    is a `RefStats` (checked), else computed from texts or tokens, or (None) from the prompts' own token rows
    `rows` (their warnings are left to the engine, which raises them with its others)."""
    if isinstance(reference, RefStats):
        if (reference.site, reference.layer) != (site, layer):
            raise InputError(
                f"The reference statistics are for {reference.site} layer {reference.layer}, but activations are "
                f"written at {site} layer {layer}; compute them at the same site."
            )
        if reference.d_model != model.cfg.d_model:
            raise InputError("The reference statistics have a different width (d_model) from this model.")
        return reference
    if reference is None:
        acts = collect_activations(model, rows, site=site, layer=layer, run=run.quiet())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return stats_from_activations(acts, site=site, layer=layer, model_name=model.name)
    return reference_stats(model, reference, layer=layer, site=site, run=run)


def row_texts(model, rows) -> tuple[str, ...]:
    """Token rows ([1, pos] each) as text (or "tokens [...]" without a tokenizer)."""
    if model.tokenizer is None:
        return tuple(f"tokens {r[0].tolist()}" for r in rows)
    return tuple("".join(model.to_str_tokens(r[0])) for r in rows)


def prompt_texts(model, rows, data) -> tuple[str, ...]:
    """The prompts `data` as the caller gave them when they are texts, else their token `rows` as text."""
    if isinstance(data, str):
        return (data,)
    if not isinstance(data, torch.Tensor) and all(isinstance(x, str) for x in data):
        return tuple(data)
    return row_texts(model, rows)
