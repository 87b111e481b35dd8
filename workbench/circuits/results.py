"""Results of the circuit engines: frozen dataclasses with named axes, baselines, provenance, tables and figures.

Values are stored raw (metric values of patched runs, or estimated changes) per prompt pair; normalised views
are computed on demand as (M - M_corrupt) / (M_clean - M_corrupt): 0 = the corrupt run's level, 1 = the clean
run's, in both directions.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from workbench.errors import InputError
from workbench.results import Provenance, Result


def _equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(1.0)
    return (a - b).abs() <= 1e-6 * scale


class _Baselines:
    """Metric lookup and normalisation shared by results that carry clean/corrupt baselines [metric, pair]."""

    metrics: tuple[str, ...]
    metric: str
    clean: torch.Tensor
    corrupt: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.clean.shape[1]

    def metric_index(self, metric: str | None = None) -> int:
        metric = self.metric if metric is None else metric
        if metric not in self.metrics:
            raise InputError(f"Metric {metric!r} is not in this result; it has {', '.join(self.metrics)}.")
        return self.metrics.index(metric)

    def baseline(self, which: str, metric: str | None = None, per_pair: bool = False) -> torch.Tensor:
        """Raw baseline of the "clean" or "corrupt" run: [pair] if per_pair, else the mean over pairs."""
        values = {"clean": self.clean, "corrupt": self.corrupt}[which][self.metric_index(metric)]
        return values if per_pair else values.mean()

    def gap(self, metric: str | None = None, per_pair: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrupt level, clean - corrupt) for normalising; `InputError` where they are equal."""
        clean, corrupt = self.baseline("clean", metric, per_pair), self.baseline("corrupt", metric, per_pair)
        if _equal(clean, corrupt).any():
            raise InputError(
                f"Cannot normalise {metric or self.metric}: its clean and corrupt baselines are equal, so "
                "(patched - corrupt) / (clean - corrupt) is undefined. Use normalize=False or another metric."
            )
        return corrupt, clean - corrupt


@dataclasses.dataclass(frozen=True)
class PathPatchingResult(_Baselines, Result):
    """Path patching over sender groups x receiver groups.

    `raw` [metric, pair, sender, receiver]: the metric of the base run with the senders' source values patched
    along their direct edges into the receivers (NaN where a receiver does not read the sender: it comes first).
    `base` [metric, pair] is the unpatched run (corrupt when denoising, clean when noising). `positions` are the
    positions patched (None: all). `noop` [metric, pair]: the clean run with every requested edge patched from
    the clean run itself (it must equal `clean`; see `warnings`).
    """

    direction: str
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    positions: tuple[int, ...] | None
    metrics: tuple[str, ...]
    metric_labels: tuple[str, ...]
    metric: str
    raw: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    noop: torch.Tensor
    clean_tokens: tuple[tuple[str, ...], ...]
    corrupt_tokens: tuple[tuple[str, ...], ...]
    answers: tuple[tuple[str, str], ...]
    provenance: Provenance
    warnings: tuple[str, ...] = ()

    viz_module: ClassVar[str] = "workbench.viz.circuits"
    shapes: ClassVar[dict[str, str]] = {
        "raw": "metrics pair senders receivers",
        "clean": "metrics pair",
        "corrupt": "metrics pair",
        "noop": "metrics pair",
    }

    def values(
        self, metric: str | None = None, normalize: bool = True, per_pair: bool = False
    ) -> torch.Tensor:
        """[sender, receiver] (or [pair, sender, receiver]); normalised: 0 = corrupt level, 1 = clean level."""
        raw = self.raw[self.metric_index(metric)]
        values = raw if per_pair else raw.nanmean(0) if raw.isnan().any() else raw.mean(0)
        if not normalize:
            return values
        corrupt, gap = self.gap(metric, per_pair)
        if per_pair:
            return (values - corrupt.view(-1, 1, 1)) / gap.view(-1, 1, 1)
        return (values - corrupt) / gap

    def base_level(self, metric: str | None = None, normalize: bool = True) -> float:
        """The unpatched run's value: 0 (denoising) or 1 (noising) when normalised."""
        which = "corrupt" if self.direction == "denoising" else "clean"
        if normalize:
            self.gap(metric)
            return 0.0 if which == "corrupt" else 1.0
        return float(self.baseline(which, metric))

    def effect(self, metric: str | None = None, normalize: bool = True) -> torch.Tensor:
        """[sender, receiver] change from the unpatched run (towards clean is positive when denoising)."""
        return self.values(metric, normalize) - self.base_level(metric, normalize)

    def top(self, k: int = 10, metric: str | None = None, normalize: bool = True):
        """The k (sender, receiver) cells that move the metric most, by absolute change."""
        import pandas as pd

        change = self.effect(metric, normalize)
        flat = torch.nan_to_num(change.abs(), nan=-1.0).flatten()
        rows = []
        for i in flat.argsort(descending=True)[:k].tolist():
            s, r = divmod(i, len(self.receivers))
            if flat[i] < 0:
                break
            rows.append(
                {
                    "sender": self.senders[s],
                    "receiver": self.receivers[r],
                    "value": float(self.values(metric, normalize)[s, r]),
                    "change": float(change[s, r]),
                }
            )
        return pd.DataFrame(rows)

    def to_frame(self, per_pair: bool = False):
        """One row per (sender, receiver) cell (and pair), one column per metric, raw and normalised."""
        import pandas as pd

        pairs = range(self.n_pairs) if per_pair else [None]
        cols: dict[str, list] = {"direction": [], "sender": [], "receiver": []}
        if per_pair:
            cols["pair"] = []
        for p in pairs:
            for s in self.senders:
                for r in self.receivers:
                    cols["direction"].append(self.direction)
                    cols["sender"].append(s)
                    cols["receiver"].append(r)
                    if per_pair:
                        cols["pair"].append(p)
        for m in self.metrics:
            cols[m] = self.values(m, False, per_pair).reshape(-1).tolist()
            try:
                cols[f"{m}_norm"] = self.values(m, True, per_pair).reshape(-1).tolist()
            except InputError:
                cols[f"{m}_norm"] = [float("nan")] * len(cols[m])
        return pd.DataFrame(cols)

    def __repr__(self) -> str:
        return (
            f"PathPatchingResult({self.direction}, {len(self.senders)} senders x {len(self.receivers)} receivers, "
            f"{self.n_pairs} pairs, metric={self.metric!r})"
        )
