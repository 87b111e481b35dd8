"""The zero-shot LayerNorm-removal preview: what breaks if a norm's scale is frozen now, without fine-tuning.

`preview` measures, on a text set:
- the loss of the unmodified model and every norm's per-token scale (`NormStatistics`);
- the loss with each norm site frozen alone (the single-site sweep);
- the loss as sites are frozen one after another in the paper's removal order (the cumulative curve);
- the per-token error a frozen scale makes: a frozen norm's output is the real one times
  ``r = sigma_token / sigma_frozen`` (about its bias), so ``|r - 1|`` is its relative error for that token.

These numbers say how *fragile* each site is. They are not what a site costs after removal fine-tuning: the
paper's final gaps (+0.01 to +0.1 nats) come from adapting the weights after every removal, and the cumulative
zero-shot curve is far steeper.

Cost: one forward pass per site and per cumulative step. Locally, a site at layer L reuses the cached outputs of
blocks 0..L-1 (they are unchanged), so the single-site sweep costs about half its forward passes. On a remote
model every pass runs in full on the server and only losses come back.
"""

from __future__ import annotations

import dataclasses

import torch

from workbench.core import CancelToken, Run, chunks
from workbench.errors import InputError
from workbench.lnfree.calibration import FrozenScales, NormStatistics, rows_per_chunk
from workbench.lnfree.data import eot_id, eot_mask, text_tokens
from workbench.lnfree.freezing import frozen_forward, norm_infos
from workbench.lnfree.sites import norm_module, norm_modules, paper_order, parse_sites, site_label, split_site
from workbench.models.prefix import reuses_cache
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.


@dataclasses.dataclass(frozen=True)
class RemovalPreview(Result):
    """Zero-shot freezing losses on a text set.

    Attributes:
        sites: the sites frozen one at a time (paper order).
        base_loss: mean next-token cross-entropy of the unmodified model (nats).
        single_loss: [site] mean cross-entropy with only that site frozen.
        order: the cumulative order; ``cumulative_loss[k]`` freezes ``order[: k + 1]``.
        cumulative_loss: [step] or None.
        scales: the frozen scales used.
        statistics: per-token scales and losses of the unmodified model.
    """

    model: str
    sites: list[str]
    base_loss: float
    single_loss: torch.Tensor
    order: list[str]
    cumulative_loss: torch.Tensor | None
    scales: FrozenScales
    statistics: NormStatistics
    provenance: Provenance

    @property
    def single_delta(self) -> torch.Tensor:
        """[site] loss increase from freezing each site alone (nats)."""
        return self.single_loss - self.base_loss

    @property
    def cumulative_delta(self) -> torch.Tensor | None:
        """[step] loss increase after freezing ``order[: k + 1]`` (nats)."""
        return None if self.cumulative_loss is None else self.cumulative_loss - self.base_loss

    def ratio(self, site: str) -> torch.Tensor:
        """[row, pos] ``r = sigma_token / sigma_frozen`` at `site`: the factor by which freezing scales that
        token's normalised vector (1 = no error)."""
        return self.statistics.norm_scales(norm_module(site)) / self.scales[site]

    def token_error(self, site: str) -> torch.Tensor:
        """[row, pos] relative error ``|r - 1|`` of the frozen norm's output (about its bias) per token."""
        return (self.ratio(site) - 1).abs()

    def error_summary(self, site: str, threshold: float = 0.5) -> dict[str, float]:
        """Mean relative error, and the share of tokens above `threshold`, over all tokens, over positions >0,
        and at position 0."""
        err = self.token_error(site)
        return {
            "mean_error": float(err.mean()),
            "mean_error_excl_first": float(err[:, 1:].mean()) if err.shape[1] > 1 else float("nan"),
            "first_pos_error": float(err[:, 0].mean()),
            "share_above": float((err > threshold).float().mean()),
        }

    def to_frame(self):
        """One row per site: scale, single-site loss and increase, cumulative loss (when computed), error."""
        import pandas as pd

        rows = []
        cumulative = (
            {} if self.cumulative_loss is None else dict(zip(self.order, self.cumulative_loss.tolist()))
        )
        for i, site in enumerate(self.sites):
            kind, layer = split_site(site)
            rows.append(
                {
                    "site": site,
                    "label": site_label(site),
                    "kind": kind,
                    "layer": layer,
                    "frozen_scale": self.scales[site],
                    "base_loss": self.base_loss,
                    "single_loss": float(self.single_loss[i]),
                    "single_delta": float(self.single_loss[i]) - self.base_loss,
                    "cumulative_loss": cumulative.get(site),
                    **self.error_summary(site),
                }
            )
        return pd.DataFrame(rows)


def _mean(parts: list[tuple[float, int]]) -> float:
    total = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    return total / max(count, 1)


def preview(
    model,
    data,
    *,
    sites=None,
    cumulative: bool = True,
    order=None,
    scales: FrozenScales | None = None,
    method: str = "mean",
    exclude_first: bool = False,
    exclude_eot: bool = False,
    momentum: float = 0.9,
    seq_len: int | None = None,
    n_rows: int | None = None,
    batch_size: int | None = None,
    memory_budget=None,
    skip_unchanged: bool | None = None,
    eot: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> RemovalPreview:
    """Zero-shot LayerNorm-removal preview of `model` on a text set.

    Args:
        data: token ids [row, pos] or a list of documents (packed into rows of `seq_len` tokens).
        sites: the norm sites to freeze one at a time (default all; see `workbench.lnfree.sites.parse_sites`).
        cumulative: also freeze sites one after another along `order` (default: the paper's order of `sites`).
        scales: frozen scales to use; by default calibrated on `data` with `method`, `exclude_first`,
            `exclude_eot` and `momentum` (see `NormStatistics.frozen_scales`).
        skip_unchanged: reuse cached block outputs below each frozen site (default: on for local models).
        batch_size: rows per trace (default: from `memory_budget`). run: a `workbench.core.Run` carrying
            `batch_size`, `memory_budget`, `progress` and `cancel` instead.
    """
    infos = norm_infos(model)
    n_layers = model.cfg.n_layers
    tokens = text_tokens(model, data, seq_len=seq_len, n_rows=n_rows)
    single_sites = parse_sites(sites, n_layers)
    if cumulative:
        steps = parse_sites(single_sites, n_layers) if order in (None, "paper") else _ordered(order, n_layers)
    else:
        steps = []
    if scales is not None and not isinstance(scales, FrozenScales):
        raise InputError(
            "scales must be a FrozenScales (from calibrate() or NormStatistics.frozen_scales())."
        )
    if scales is not None and scales.sites != paper_order(n_layers):
        raise InputError(f"These frozen scales belong to a model with other layers than {model.name}.")
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    skip = reuses_cache(model) if skip_unchanged is None else bool(skip_unchanged)
    calibration = dict(method=method, exclude_first=exclude_first, exclude_eot=exclude_eot, momentum=momentum)
    sweep = _PreviewSweep(model, tokens, infos, single_sites, steps, scales, skip, run, eot, calibration)
    run.map(sweep.units, sweep.run_unit, desc="LN removal preview")
    stats = sweep.statistics
    return RemovalPreview(
        model=model.name,
        sites=single_sites,
        base_loss=stats.mean_loss,
        single_loss=torch.tensor([_mean(sweep.single[s]) for s in single_sites], dtype=torch.float64),
        order=steps,
        cumulative_loss=torch.tensor([_mean(p) for p in sweep.cumul], dtype=torch.float64) if steps else None,
        scales=sweep.scales,
        statistics=stats,
        provenance=Provenance.capture(
            model.name,
            sites=single_sites,
            order=steps,
            method=sweep.scales.method,
            exclude_first=sweep.scales.exclude_first,
            exclude_eot=sweep.scales.exclude_eot,
            n_rows=len(tokens),
            seq_len=tokens.shape[1],
            skip_unchanged=skip,
        ),
    )


class _PreviewSweep:
    """The passes of one preview, as work units in order: the statistics pass over every chunk (it calibrates
    the scales), then per chunk the single sites and the cumulative steps. Locally, the blocks below a frozen
    site are not rerun: their outputs are cached once per chunk."""

    def __init__(self, model, tokens, infos, single_sites, steps, scales, skip, run, eot, calibration):
        self.model, self.tokens, self.infos, self.run = model, tokens, infos, run
        self.steps, self.scales, self.skip, self.eot, self.calibration = steps, scales, skip, eot, calibration
        n_layers = model.cfg.n_layers
        chunk = rows_per_chunk(model, tokens.shape[1], run, cache_blocks=skip)
        self.bounds = chunks(len(tokens), chunk)
        n_chunks = len(self.bounds)
        self.norms = norm_modules(n_layers)
        variants = [("single", s) for s in single_sites] + [("cumulative", k) for k in range(len(steps))]
        # Freezing only the final norm runs every block unchanged: done first, it caches their outputs for the
        # chunk's other passes (with a single chunk the statistics pass already has them).
        if "final" in single_sites or (skip and n_chunks > 1):
            variants = [("single", "final")] + [v for v in variants if v != ("single", "final")]
        self.variants = variants
        self.units = [("stats", c, None) for c in range(n_chunks)]
        self.units += [("variant", c, v) for c in range(n_chunks) for v in variants]
        self.stats_parts: list = []
        self.cache = None
        self.statistics: NormStatistics | None = None
        self.single: dict[str, list] = {s: [] for s in single_sites}
        self.cumul: list[list] = [[] for _ in steps]

    def run_unit(self, unit) -> None:
        what, c, v = unit
        lo, hi = self.bounds[c]
        batch = self.tokens[lo:hi]
        if what == "stats":
            self._statistics_pass(batch, last=c == len(self.bounds) - 1)
        else:
            self._variant_pass(batch, v)

    def _statistics_pass(self, batch, last: bool) -> None:
        n_layers = self.model.cfg.n_layers
        # With one chunk, this pass's block outputs serve every skip of the sweep.
        keep = self.skip and len(self.bounds) == 1
        out = frozen_forward(
            self.model, batch, infos=self.infos, read_scales=True, cache_blocks=keep, run=self.run
        )
        if keep:
            self.cache = [out[f"block.{i}"] for i in range(n_layers)]
        scales = torch.stack([out[f"scale.{n}"].float().cpu() for n in self.norms])
        self.stats_parts.append((scales, out["loss"].float().cpu()))
        if last:
            self._finish_statistics()

    def _variant_pass(self, batch, v) -> None:
        kind, key = v
        names = [key] if kind == "single" else self.steps[: key + 1]
        freeze = {s: self.scales[s] for s in names}
        if kind == "single" and key == "final" and self.skip and self.cache is None:
            out = frozen_forward(
                self.model, batch, infos=self.infos, freeze=freeze, cache_blocks=True, run=self.run
            )
            self.cache = [out[f"block.{i}"] for i in range(self.model.cfg.n_layers)]
        else:
            cache = self.cache if self.skip else None
            out = frozen_forward(
                self.model, batch, infos=self.infos, freeze=freeze, skip_cache=cache, run=self.run
            )
        loss = out["loss"].double()
        entry = (float(loss.sum()), loss.numel())
        if kind == "single":
            self.single[key].append(entry)
        else:
            self.cumul[key].append(entry)
        if v == self.variants[-1]:
            self.cache = None  # the next chunk has other rows

    def _finish_statistics(self) -> None:
        model, tokens = self.model, self.tokens
        token = eot_id(model, self.eot)
        self.statistics = NormStatistics(
            model=model.name,
            tokens=tokens,
            norms=self.norms,
            scales=torch.cat([p[0] for p in self.stats_parts], dim=1),
            eot=eot_mask(tokens, token),
            loss=torch.cat([p[1] for p in self.stats_parts]),
            kind=self.infos["ln_final"][0],
            n_layers=model.cfg.n_layers,
            provenance=Provenance.capture(model.name, n_rows=len(tokens), seq_len=tokens.shape[1], eot=token),
        )
        if self.scales is None:
            self.scales = self.statistics.frozen_scales(**self.calibration)


def _ordered(order, n_layers: int) -> list[str]:
    if isinstance(order, str):
        raise InputError(f"order={order!r}: give 'paper' or a list of sites in the order to freeze them.")
    steps: list[str] = []
    for item in order:
        for site in parse_sites([item], n_layers):
            if site not in steps:
                steps.append(site)
    if not steps:
        raise InputError("order is empty: give at least one site.")
    return steps
