"""`PatchingResult`: a patching grid with named axes, per-pair raw metric values and both baselines.

The stored numbers are raw metric values of every patched run, for every metric, per prompt pair. Views
(normalised or raw, any metric, mean over pairs or per pair) are computed from them on demand, so a figure can
switch metric or normalisation without running the model again.
"""

from __future__ import annotations

import dataclasses

import torch

from workbench.errors import InputError
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engines do not need it.


def _equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(1.0)
    return (a - b).abs() <= 1e-6 * scale


class Baselines:
    """What results with clean and corrupt baselines [metric, pair] share: the metric lookup, the baselines, the
    normalisation (M - M_corrupt) / (M_clean - M_corrupt), the unpatched run's level and the metric columns of
    tidy tables. Results of activation patching and of the circuit engines mix it in."""

    metrics: tuple[str, ...]
    metric: str
    direction: str
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
        equal = _equal(clean, corrupt)
        if equal.any():
            raise self._no_gap(metric, per_pair, clean, equal)
        return corrupt, clean - corrupt

    def _no_gap(
        self, metric: str | None, per_pair: bool, clean: torch.Tensor, equal: torch.Tensor
    ) -> InputError:
        return InputError(
            f"Cannot normalise {metric or self.metric}: its clean and corrupt baselines are equal, so "
            "(patched - corrupt) / (clean - corrupt) is undefined. Use normalize=False or another metric."
        )

    def _normalise(self, values: torch.Tensor, metric: str | None, per_pair: bool) -> torch.Tensor:
        """(values - corrupt) / (clean - corrupt); per pair, `values` [pair, ...] use each pair's baselines."""
        corrupt, gap = self.gap(metric, per_pair)
        if per_pair:
            shape = (-1,) + (1,) * (values.dim() - 1)
            return (values - corrupt.view(shape)) / gap.view(shape)
        return (values - corrupt) / gap

    def base_level(self, metric: str | None = None, normalize: bool = True) -> float:
        """The value of the unpatched run (the corrupt run when denoising, the clean run when noising):
        a patch with no effect scores this (normalised: 0 or 1)."""
        which = "corrupt" if self.direction == "denoising" else "clean"
        if normalize:
            self.gap(metric)
            return 0.0 if which == "corrupt" else 1.0
        return float(self.baseline(which, metric))

    def _metric_columns(self, per_pair: bool) -> dict[str, list]:
        """Per metric its raw `values()` flattened, and normalised (`<metric>_norm`, NaN where the baselines are
        equal): the value columns of a tidy table."""
        columns: dict[str, list] = {}
        for m in self.metrics:
            columns[m] = self.values(m, False, per_pair).reshape(-1).tolist()
            try:
                columns[f"{m}_norm"] = self.values(m, True, per_pair).reshape(-1).tolist()
            except InputError:
                columns[f"{m}_norm"] = [float("nan")] * len(columns[m])
        return columns


@dataclasses.dataclass(frozen=True)
class PatchingResult(Baselines, Result):
    """A patching (or attribution-patching) grid.

    Axes of `raw`: [metric, pair, site, layer, position] plus [head] for per-head sites (z, pattern).
    `positions[i]` are the token positions patched together in column i (one position, or all of them);
    `position_labels[i]` names it with the first pair's clean token ("clean/corrupt" where they differ).
    `clean` and `corrupt` are the unpatched baselines [metric, pair]; `warnings` says when they make the
    normalised view unreliable (a small gap, or pairs whose gap has the other sign). `method` is "exact" (activation
    patching) or "attribution" (first-order estimate of the same grid). `direction` is "denoising" (clean
    activations patched into the corrupt run) or "noising" (corrupt activations patched into the clean run).
    """

    method: str
    direction: str
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    positions: tuple[tuple[int, ...], ...]
    position_labels: tuple[str, ...]
    heads: tuple[int, ...] | None
    metrics: tuple[str, ...]
    metric_labels: tuple[str, ...]
    metric: str
    raw: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    clean_tokens: tuple[tuple[str, ...], ...]
    corrupt_tokens: tuple[tuple[str, ...], ...]
    answers: tuple[tuple[str, str], ...]
    provenance: Provenance
    warnings: tuple[str, ...] = ()

    # -- axes ----------------------------------------------------------------------------------------
    @property
    def per_head(self) -> bool:
        return self.heads is not None

    @property
    def dims(self) -> tuple[str, ...]:
        """Axis names of `values()` (without the leading pair axis of per-pair views)."""
        return ("site", "layer", "position", "head") if self.per_head else ("site", "layer", "position")

    def metric_label(self, metric: str | None = None) -> str:
        return self.metric_labels[self.metric_index(metric)]

    # -- values --------------------------------------------------------------------------------------
    def values(
        self, metric: str | None = None, normalize: bool = True, per_pair: bool = False
    ) -> torch.Tensor:
        """The grid [site, layer, position(, head)], or [pair, site, layer, position(, head)] if per_pair.

        normalize=True gives (M_patched - M_corrupt) / (M_clean - M_corrupt): 0 = the corrupt run's level,
        1 = the clean run's level, in both directions. Without per_pair the mean over pairs is normalised by the
        mean baselines (as in TransformerLens' demos); with per_pair each pair uses its own baselines.
        """
        raw = self.raw[self.metric_index(metric)]  # [pair, ...]
        values = raw if per_pair else raw.mean(0)
        if not normalize:
            return values
        return self._normalise(values, metric, per_pair)

    def _no_gap(
        self, metric: str | None, per_pair: bool, clean: torch.Tensor, equal: torch.Tensor
    ) -> InputError:
        name = self.metric if metric is None else metric
        where = f"pair {int(equal.nonzero()[0])}" if per_pair else "the mean over pairs"
        value = float(clean.flatten()[int(equal.flatten().nonzero()[0])])
        return InputError(
            f"Cannot normalise {name}: its clean and corrupt baselines are equal for {where} "
            f"(both {value:.6g}), so (patched - corrupt) / (clean - corrupt) is undefined. Use "
            "normalize=False, another metric, or a corrupt prompt that changes the answer."
        )

    def spread(self, metric: str | None = None, normalize: bool = True) -> torch.Tensor:
        """Standard deviation over pairs of the per-pair values (zeros for a single pair)."""
        if self.n_pairs < 2:
            return torch.zeros(self.values(metric, normalize).shape)
        return self.values(metric, normalize, per_pair=True).std(0)

    # -- tables --------------------------------------------------------------------------------------
    def _cells(self):
        """(site, layer, position index, head or None) for each cell, in the order of `values().flatten()`."""
        heads = self.heads if self.per_head else (None,)
        for site in self.sites:
            for layer in self.layers:
                for p in range(len(self.positions)):
                    for h in heads:
                        yield site, layer, p, h

    def cell_label(self, site: str, layer: int, p: int, head: int | None) -> str:
        where = f"L{layer}" + (f"H{head}" if head is not None else "")
        site_part = f"{site} " if len(self.sites) > 1 or self.per_head else ""
        return f"{site_part}{where} @ {self.position_labels[p]}"

    def to_frame(self, per_pair: bool = False):
        """Tidy table: one row per patched cell (and per pair if `per_pair`), one column per metric (raw) and
        per metric normalised (`<metric>_norm`, empty where the baselines are equal)."""
        import pandas as pd

        cells = list(self._cells())
        columns: dict[str, list] = {}
        pairs = range(self.n_pairs) if per_pair else [None]
        rows = [(c, pair) for pair in pairs for c in cells]
        columns["method"] = [self.method] * len(rows)
        columns["direction"] = [self.direction] * len(rows)
        columns["site"] = [c[0] for c, _ in rows]
        columns["layer"] = [c[1] for c, _ in rows]
        columns["position"] = [self.position_labels[c[2]] for c, _ in rows]
        columns["positions"] = [",".join(map(str, self.positions[c[2]])) for c, _ in rows]
        if self.per_head:
            columns["head"] = [c[3] for c, _ in rows]
        if per_pair:
            columns["pair"] = [pair for _, pair in rows]
        columns.update(self._metric_columns(per_pair))
        return pd.DataFrame(columns)

    def baselines(self):
        """Per-pair table of the clean and corrupt baselines of every metric, with prompts and answers."""
        import pandas as pd

        data: dict[str, list] = {
            "pair": list(range(self.n_pairs)),
            "clean": ["".join(t) for t in self.clean_tokens],
            "corrupt": ["".join(t) for t in self.corrupt_tokens],
            "correct": [a[0] for a in self.answers],
            "incorrect": [a[1] for a in self.answers],
        }
        for i, m in enumerate(self.metrics):
            data[f"{m}_clean"] = self.clean[i].tolist()
            data[f"{m}_corrupt"] = self.corrupt[i].tolist()
        return pd.DataFrame(data)

    def top(self, k: int = 10, metric: str | None = None, normalize: bool = True):
        """The k cells that move the metric most away from the unpatched run's level (by absolute change)."""
        import pandas as pd

        values = self.values(metric, normalize).flatten()
        change = values - self.base_level(metric, normalize)
        order = change.abs().argsort(descending=True)[:k]
        cells = list(self._cells())
        rows = []
        for i in order.tolist():
            site, layer, p, head = cells[i]
            rows.append(
                {
                    "site": site,
                    "layer": layer,
                    "position": self.position_labels[p],
                    **({"head": head} if self.per_head else {}),
                    "value": float(values[i]),
                    "change": float(change[i]),
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.raw.shape[2:])
        return (
            f"PatchingResult({self.method}, {self.direction}, sites={list(self.sites)}, "
            f"[{', '.join(self.dims)}] = {shape}, {self.n_pairs} pairs, metric={self.metric!r})"
        )


@dataclasses.dataclass(frozen=True)
class AttributionComparison(Result):
    """How well attribution patching matches exact patching on the same grid.

    `exact` and `attribution` are the flattened grids [cell] (normalised when `normalize`); `labels` name the
    cells. `pearson` and `spearman` are correlations over all cells; `top_k_agreement` is the fraction of the
    exact grid's k strongest cells (by absolute change from the unpatched run) that are also among the
    attribution grid's k strongest.
    """

    metric: str
    normalize: bool
    direction: str
    sites: tuple[str, ...]
    exact: torch.Tensor
    attribution: torch.Tensor
    labels: tuple[str, ...]
    cell_sites: tuple[str, ...]
    base_level: float
    pearson: float
    spearman: float
    top_k: int
    top_k_agreement: float
    top_exact: tuple[str, ...]
    top_attribution: tuple[str, ...]
    provenance: Provenance

    def to_frame(self):
        import pandas as pd

        exact_rank = (self.exact - self.base_level).abs().argsort(descending=True).argsort() + 1
        approx_rank = (self.attribution - self.base_level).abs().argsort(descending=True).argsort() + 1
        return pd.DataFrame(
            {
                "cell": list(self.labels),
                "site": list(self.cell_sites),
                "exact": self.exact.tolist(),
                "attribution": self.attribution.tolist(),
                "error": (self.attribution - self.exact).tolist(),
                "exact_rank": exact_rank.tolist(),
                "attribution_rank": approx_rank.tolist(),
            }
        )

    def __repr__(self) -> str:
        return (
            f"AttributionComparison({self.metric}, {len(self.labels)} cells: pearson {self.pearson:.3f}, "
            f"spearman {self.spearman:.3f}, top-{self.top_k} agreement {self.top_k_agreement:.0%})"
        )
