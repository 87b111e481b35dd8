"""`PatchSpec`: a patching experiment resolved and checked before any model runs.

`sweep` and `attribute` turn their arguments into a spec first. The spec is what runs (its tensors), what the
result records as provenance, what keys the remote result cache, and what ``code()`` prints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from workbench.patching.inputs import (
    Pairs,
    check_model,
    prepare_pairs,
    resolve_direction,
    resolve_heads,
    resolve_layers,
    resolve_positions,
    resolve_sites,
)
from workbench.patching.metrics import Metric, resolve_metrics
from workbench.results import Provenance


def plain_versions(provenance: Provenance) -> Provenance:
    """`provenance` with its package versions as plain strings: torch.__version__ is a str subclass that a
    weights-only load refuses."""
    return dataclasses.replace(provenance, versions={k: str(v) for k, v in provenance.versions.items()})


class PairedSpec:
    """What specs of clean/corrupt experiments share (`PatchSpec`, `workbench.circuits.spec.CircuitSpec`): the
    prompt `pairs`, the `direction` and every metric computed (`metric` names the primary one)."""

    pairs: Pairs
    direction: str
    metrics: tuple[Metric, ...]
    metric: str

    @property
    def all_positions(self) -> bool:
        """Whether a metric reads logits at every position (else only the last position's are computed)."""
        return any(m.all_positions for m in self.metrics)

    @property
    def n_pairs(self) -> int:
        return self.pairs.n_pairs

    def base_run(self, clean, corrupt):
        """Of a clean and a corrupt value, the one of the run that is patched: corrupt when denoising, clean when
        noising."""
        return corrupt if self.direction == "denoising" else clean

    @property
    def base_tokens(self) -> torch.Tensor:
        """[pair, pos] the run that is patched: corrupt when denoising, clean when noising."""
        return self.base_run(self.pairs.clean, self.pairs.corrupt)

    def halves(self) -> tuple[slice, slice]:
        """(base, source) halves of a [clean; corrupt] batch: the run that is patched, and where patches come
        from."""
        return self.pairs.halves(self.direction)

    def metric_index(self, name: str | None = None) -> int:
        names = [m.name for m in self.metrics]
        return names.index(self.metric if name is None else name)

    def run_fields(self, clean: torch.Tensor, corrupt: torch.Tensor) -> dict[str, Any]:
        """What a patching result records of its runs: the metrics' names and titles, the primary metric, the
        baselines `clean` and `corrupt` [metric, pair], and the pairs' tokens and answers."""
        p = self.pairs
        return {
            "metrics": tuple(m.name for m in self.metrics),
            "metric_labels": tuple(m.title for m in self.metrics),
            "metric": self.metric,
            "clean": clean,
            "corrupt": corrupt,
            "clean_tokens": p.clean_tokens,
            "corrupt_tokens": p.corrupt_tokens,
            "answers": p.answer_tokens,
        }

    def evaluate(self, logits: torch.Tensor, pair: torch.Tensor, clean_lp: torch.Tensor) -> torch.Tensor:
        """[metric, row] from logits [row, (pos,) d_vocab] of runs of pairs `pair` [row]."""
        answers = self.pairs.answers.to(logits.device)[pair.to(logits.device)]
        last = logits if logits.dim() == 2 else logits[:, -1]
        clp = clean_lp[pair.to(clean_lp.device)].to(logits.device)
        logp = torch.log_softmax(last.float(), -1)  # shared by the built-ins
        return torch.stack(
            [m(logits if m.all_positions else last, answers, clp, logp) for m in self.metrics]
        ).float()


@dataclasses.dataclass(frozen=True)
class PatchSpec(PairedSpec):
    """Everything a sweep or an attribution run needs, checked.

    pairs: the tokenised prompt pairs; sites, layers, heads (per-head sites) and position groups as resolved
    indices; metrics: every metric computed (built-ins first), `metric` the primary one's name; `positions` as
    the caller wrote it (for the code view).
    """

    model: str
    pairs: Pairs
    direction: str
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    heads: tuple[int, ...] | None
    metrics: tuple[Metric, ...]
    metric: str
    positions: Any = "each"

    @classmethod
    def resolve(
        cls, model, clean, corrupt=None, answers=None, *, site, direction, layers, positions, heads, metric
    ) -> PatchSpec:
        """Validate every argument (see `sweep`) before any model runs."""
        check_model(model, "Patching")
        direction = resolve_direction(direction)
        sites = resolve_sites(model, site)
        layers = resolve_layers(model, layers)
        heads = resolve_heads(model, heads, sites)
        metrics, primary = resolve_metrics(metric)
        pairs = prepare_pairs(model, clean, corrupt, answers)
        groups = resolve_positions(positions, pairs.n_pos)
        return cls(model.name, pairs, direction, sites, layers, groups, heads, metrics, primary, positions)

    # -- what runs -----------------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return len(self.heads) if self.heads is not None else 1

    @property
    def cells(self) -> int:
        """Patched runs per pair and (site, layer): position groups x heads."""
        return len(self.groups) * self.n_heads

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """The result's raw axes: [metric, pair, site, layer, position group(, head)]."""
        heads = (self.n_heads,) if self.heads else ()
        return (
            len(self.metrics),
            self.pairs.n_pairs,
            len(self.sites),
            len(self.layers),
            len(self.groups),
            *heads,
        )

    def unchanged(self) -> frozenset[tuple[int, int]]:
        """(pair, position group) whose patch writes the value the base run already holds: every position of the
        group lies in the prefix the pair's prompts share, where a causal model computes the same activations in
        both runs. Their patched runs are the base run: a sweep copies its metric values instead of running them."""
        shared = (self.pairs.clean == self.pairs.corrupt).int().cumprod(1).sum(1).tolist()  # [pair]
        return frozenset(
            (pi, g) for pi, n in enumerate(shared) for g, group in enumerate(self.groups) if max(group) < n
        )

    def empty_raw(self) -> torch.Tensor:
        """NaN [metric, pair, site, layer, cell] for a sweep to fill; ``.view(grid_shape)`` gives the result's axes."""
        return torch.full(
            (len(self.metrics), self.pairs.n_pairs, len(self.sites), len(self.layers), self.cells),
            float("nan"),
        )

    # -- what it records -----------------------------------------------------------------------------
    def arguments(self) -> dict[str, Any]:
        """The engine call's arguments as plain data: prompts as text where given as text."""
        p = self.pairs
        user = [m for m in self.metrics if not m.builtin]
        metric = self.metric if not user else [self.metric, *(m.name for m in user if m.name != self.metric)]
        return {
            **p.prompts(),
            "answers": [list(a) for a in p.answer_tokens],
            "site": self.sites[0] if len(self.sites) == 1 else list(self.sites),
            "direction": self.direction,
            "layers": list(self.layers),
            "positions": self.positions,
            "heads": None if self.heads is None else list(self.heads),
            "metric": metric,
        }

    def provenance(self, method: str, **options: Any) -> Provenance:
        """Provenance of a result computed from this spec (`options`: run settings such as the batch size)."""
        p = self.pairs
        return Provenance.capture(
            self.model,
            method=method,
            direction=self.direction,
            sites=list(self.sites),
            layers=list(self.layers),
            positions=[list(g) for g in self.groups],
            heads=None if self.heads is None else list(self.heads),
            metrics=[m.name for m in self.metrics],
            answers=[list(a) for a in p.answer_tokens],
            **p.prompts(),
            **options,
        )
