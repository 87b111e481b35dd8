"""`CircuitSpec`: the prompt pairs, direction and metrics of a circuit experiment, checked before any model runs.

Every engine of `workbench.circuits` resolves its arguments into a spec first (the same prompt-pair checks,
metrics and directions as activation patching), records it as provenance and prints it back in ``code()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from workbench.errors import InputError
from workbench.patching.inputs import Pairs, prepare_pairs, resolve_direction
from workbench.patching.inputs import check_model as check_patchable
from workbench.patching.metrics import Metric, resolve_metrics
from workbench.patching.spec import PairedSpec, plain_versions
from workbench.results import Provenance


@dataclasses.dataclass(frozen=True)
class CircuitSpec(PairedSpec):
    """pairs: tokenised prompt pairs; direction: "denoising" (clean values into the corrupt run) or "noising"
    (corrupt values into the clean run); metrics: every metric computed (built-ins first), `metric` the primary
    one; positions: the positions a patch applies at (None: all)."""

    model: str
    pairs: Pairs
    direction: str
    metrics: tuple[Metric, ...]
    metric: str
    positions: tuple[int, ...] | None = None

    @classmethod
    def rerun(cls, model, result, positions: tuple[int, ...] | None = None) -> CircuitSpec:
        """The spec of a result's prompt pairs (its token ids), direction and primary metric, to run them again."""
        metrics, _ = resolve_metrics(result.metric)
        pairs = prepare_pairs(model, result.clean_ids, result.corrupt_ids, result.answer_ids)
        return cls(model.name, pairs, result.direction, metrics, result.metric, positions)

    def rerun_fields(self, clean: torch.Tensor, corrupt: torch.Tensor) -> dict[str, Any]:
        """What a result records so that `rerun` can run its prompts again: the metric names, the primary
        metric, the baselines `clean` and `corrupt` [metric, pair] and the token ids of the pairs and answers."""
        p = self.pairs
        return {
            "metrics": tuple(m.name for m in self.metrics),
            "metric": self.metric,
            "clean": clean,
            "corrupt": corrupt,
            "clean_ids": p.clean,
            "corrupt_ids": p.corrupt,
            "answer_ids": p.answers,
        }

    @classmethod
    def resolve(
        cls, model, clean, corrupt=None, answers=None, *, direction, metric, positions=None
    ) -> CircuitSpec:
        check_model(model)
        direction = resolve_direction(direction)
        metrics, primary = resolve_metrics(metric)
        pairs = prepare_pairs(model, clean, corrupt, answers)
        return cls(
            model.name, pairs, direction, metrics, primary, resolve_patch_positions(positions, pairs.n_pos)
        )

    def arguments(self) -> dict[str, Any]:
        """The prompts, answers, direction and metric as plain data (for provenance and code)."""
        p = self.pairs
        return {
            **p.prompts(),
            "answers": [list(a) for a in p.answer_tokens],
            "direction": self.direction,
            "metric": self.metric,
        }

    def provenance(self, method: str, **options: Any) -> Provenance:
        return plain_versions(Provenance.capture(self.model, method=method, **self.arguments(), **options))

    # -- metrics -----------------------------------------------------------------------------------------
    def baselines(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean and corrupt metric values [metric, pair] from [clean; corrupt] logits, and the clean run's
        last-position log-probs [pair, d_vocab]."""
        n = self.n_pairs
        clean_lp = torch.log_softmax((logits[:n] if logits.dim() == 2 else logits[:n, -1]).float(), -1)
        pair = torch.arange(n)
        return (
            self.evaluate(logits[:n], pair, clean_lp).cpu(),
            self.evaluate(logits[n:], pair, clean_lp).cpu(),
            clean_lp,
        )


def check_model(model) -> None:
    """Refuse models circuit analysis cannot run on (see `workbench.patching.inputs.check_model`)."""
    check_patchable(model, "Circuit analysis")


def resolve_patch_positions(positions, n_pos: int) -> tuple[int, ...] | None:
    """None or "all": patches apply at every position; an int or a list of ints: only there."""
    if positions is None or (isinstance(positions, str) and positions in ("all", "together")):
        return None
    items = [positions] if not isinstance(positions, (list, tuple)) else list(positions)
    out = []
    for p in items:
        if isinstance(p, bool) or not isinstance(p, int) or not -n_pos <= p < n_pos:
            raise InputError(
                f"Position {p!r} is out of range: the prompts have {n_pos} tokens (positions 0..{n_pos - 1}, or -1 "
                "for the last); or leave positions=None to patch at every position."
            )
        out.append(p % n_pos)
    if not out or len(set(out)) != len(out):
        raise InputError(f"positions={positions!r}: give distinct positions, or None for all.")
    return tuple(sorted(out))
