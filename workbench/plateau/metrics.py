"""Summaries of response curves (output change against perturbation size) and comparisons between families.

Every function takes curves as a tensor [..., size] sampled at increasing `sizes` [size] and works on any
leading axes ([base, direction] in a `PlateauResult`, [pair] in an `InterpolationResult`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from workbench.errors import InputError

# pandas and scipy are imported where a comparison table is built: they are slow to import and the curves'
# statistics do not need them.


def choose(metric: str, curves: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The curves named `metric`, one of the keys of `curves` (the error lists them in their order)."""
    if metric in curves:
        return curves[metric]
    raise InputError(f"metric must be {' or '.join(map(repr, curves))}, got {metric!r}.")


def _check(curves: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    curves = torch.as_tensor(curves, dtype=torch.float64)
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    if sizes.dim() != 1 or len(sizes) < 2:
        raise InputError("Curve metrics need at least two sizes (a 1-D tensor).")
    if curves.shape[-1] != len(sizes):
        raise InputError(f"Curves have {curves.shape[-1]} points but there are {len(sizes)} sizes.")
    if not bool((sizes[1:] > sizes[:-1]).all()):
        raise InputError("Sizes must increase strictly.")
    return curves, sizes


def plateau_length(curves: torch.Tensor, sizes: torch.Tensor, threshold: float) -> torch.Tensor:
    """The size at which each curve first exceeds `threshold` ("plateau length"), [...].

    Linear interpolation between the last point at or below the threshold and the first above it, so lengths
    are not tied to the grid. A curve that starts above the threshold has length `sizes[0]`; one that never
    exceeds it has length +inf (censored: the plateau is longer than the sweep). A curve with a NaN point
    before it crosses has length NaN: where it would cross is unknown.
    """
    curves, sizes = _check(curves, sizes)
    above = curves > threshold
    first = torch.where(above.any(-1), above.float().argmax(-1), torch.full(above.shape[:-1], -1))
    out = torch.full(curves.shape[:-1], float("inf"), dtype=torch.float64)
    crossed = first >= 0
    out[crossed & (first == 0)] = sizes[0]
    inner = crossed & (first > 0)
    if inner.any():
        hi = first[inner]
        y1 = curves[inner].gather(-1, hi[:, None]).squeeze(-1)
        y0 = curves[inner].gather(-1, (hi - 1)[:, None]).squeeze(-1)
        x1, x0 = sizes[hi], sizes[hi - 1]
        frac = ((threshold - y0) / (y1 - y0)).clamp(0, 1)
        out[inner] = x0 + frac * (x1 - x0)
    nan = curves.isnan()
    first_nan = torch.where(nan.any(-1), nan.float().argmax(-1), torch.full(nan.shape[:-1], curves.shape[-1]))
    out[nan.any(-1) & (~crossed | (first_nan < first))] = float("nan")
    return out


def slopes(curves: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Finite-difference slopes between consecutive sizes, [..., size - 1]."""
    curves, sizes = _check(curves, sizes)
    return curves.diff(dim=-1) / sizes.diff()


def max_slope(curves: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The steepest finite-difference slope of each curve and the size where it happens (the "blow-up").

    Returns (slope [...], size [...]); the size is the midpoint of the steepest interval.
    """
    _, sizes64 = _check(curves, sizes)
    d = slopes(curves, sizes)
    best = d.argmax(-1)
    mid = (sizes64[:-1] + sizes64[1:]) / 2
    return d.max(-1).values, mid[best]


def sharpness(curves: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Max slope relative to the mean slope over the sweep, [...]: 1 for a straight line, large for a step.

    For interpolation curves normalised to run from 0 to 1 over alpha in [0, 1], this is Janiak et al.'s
    max d'(alpha) / d(1). Curves that do not rise at all give NaN.
    """
    curves64, sizes64 = _check(curves, sizes)
    rise = (curves64[..., -1] - curves64[..., 0]) / (sizes64[-1] - sizes64[0])
    steepest, _ = max_slope(curves, sizes)
    return torch.where(rise > 0, steepest / rise, torch.full_like(rise, float("nan")))


def compare_samples(samples: Mapping[str, np.ndarray | torch.Tensor], baseline: str):
    """Compare each sample of values (e.g. plateau lengths per family) with the `baseline` sample.

    Returns a pandas DataFrame, one row per group: n, median, q25, q75, fraction finite, and against the
    baseline the two-sided Mann-Whitney U test (U, p) with its common-language effect size
    `p_greater` = P(value > baseline value) + P(tie) / 2, and the two-sample Kolmogorov-Smirnov test (D, p).
    Infinite values (curves that never crossed) rank above every finite one.
    """
    import pandas as pd
    from scipy import stats

    if baseline not in samples:
        raise InputError(f"Baseline {baseline!r} is not among the groups: {', '.join(samples)}.")
    arrays = {k: np.asarray(torch.as_tensor(v).double().flatten()) for k, v in samples.items()}
    arrays = {k: v[~np.isnan(v)] for k, v in arrays.items()}
    base = arrays[baseline]

    def quantile(x: np.ndarray, q: float) -> float:
        if not len(x):
            return float("nan")
        # interpolating towards +inf gives NaN; take the nearest order statistic when some curves never crossed
        return float(np.quantile(x, q, method="linear" if np.isfinite(x).all() else "nearest"))

    rows = []
    for name, x in arrays.items():
        row = {
            "group": name,
            "n": len(x),
            "median": quantile(x, 0.5),
            "q25": quantile(x, 0.25),
            "q75": quantile(x, 0.75),
            "finite": float(np.isfinite(x).mean()) if len(x) else float("nan"),
            "baseline": baseline,
        }
        if name != baseline and len(x) and len(base):
            # Ranks are all the tests need; a large finite stand-in keeps scipy away from inf arithmetic.
            big = np.nanmax(
                np.abs(np.concatenate([x, base])[np.isfinite(np.concatenate([x, base]))]), initial=1
            )
            xf, bf = np.nan_to_num(x, posinf=4 * big + 1), np.nan_to_num(base, posinf=4 * big + 1)
            mw = stats.mannwhitneyu(xf, bf, alternative="two-sided")
            ks = stats.ks_2samp(xf, bf)
            row.update(
                mw_u=float(mw.statistic),
                mw_p=float(mw.pvalue),
                p_greater=float(mw.statistic) / (len(x) * len(base)),
                ks_d=float(ks.statistic),
                ks_p=float(ks.pvalue),
            )
        else:
            row.update(mw_u=np.nan, mw_p=np.nan, p_greater=np.nan, ks_d=np.nan, ks_p=np.nan)
        rows.append(row)
    return pd.DataFrame(rows)
