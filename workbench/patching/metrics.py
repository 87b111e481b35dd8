"""Metrics of a patched run, computed per row from its logits.

A metric maps the logits of a batch of runs to one number per run. The built-ins read the last position:

- ``logit_diff``: logit(correct) - logit(incorrect). Roughly linear in the residual stream and specific to the
  task; the recommended default (Heimersheim & Nanda 2024; Zhang & Nanda 2023).
- ``logprob``: log P(correct). Saturates once the answer is top-1.
- ``prob``: P(correct). Exponential in the logits, so plots look sharper than the effects are.
- ``kl``: KL(P_clean || P_run), the divergence of the run's next-token distribution from the clean run's, in
  nats. It sees every change, wanted or not. Lower is closer to clean.

Every sweep computes all four (they cost nothing next to the forward pass), so a figure can switch between them
without rerunning the model. A user metric is any function ``fn(logits, answers) -> [row]`` where logits are
[row, d_vocab] at the last position (or [row, pos, d_vocab] with ``Metric(..., all_positions=True)``) and
answers are [row, 2] token ids (correct, incorrect).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from workbench.core.measures import kl_divergence
from workbench.errors import InputError


@dataclasses.dataclass(frozen=True)
class Metric:
    """A named metric. ``fn(logits, answers)`` returns [row]; see the module docstring for shapes."""

    name: str
    fn: Callable[..., torch.Tensor]
    label: str = ""
    all_positions: bool = False
    builtin: bool = False  # called as fn(logits, answers, clean_logprobs, logprobs)

    def __call__(
        self,
        logits: torch.Tensor,
        answers: torch.Tensor,
        clean_logprobs: torch.Tensor | None = None,
        logprobs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[row]. Built-ins also take the clean run's log-probs [row, d_vocab] (for KL) and may reuse this run's
        last-position log-probs `logprobs` [row, d_vocab] when the caller has them."""
        if self.builtin:
            return self.fn(logits, answers, clean_logprobs, logprobs)
        return self.fn(logits, answers)

    @property
    def title(self) -> str:
        return self.label or self.name


def _last(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1] if logits.dim() == 3 else logits).float()


def _logprobs(logits: torch.Tensor, logprobs: torch.Tensor | None) -> torch.Tensor:
    return torch.log_softmax(_last(logits), -1) if logprobs is None else logprobs


def logit_diff(
    logits: torch.Tensor, answers: torch.Tensor, clean_logprobs=None, logprobs=None
) -> torch.Tensor:
    """[row]: logit(correct) - logit(incorrect) at the last position."""
    last = _last(logits)
    return last.gather(-1, answers[:, :1])[:, 0] - last.gather(-1, answers[:, 1:2])[:, 0]


def logprob(logits: torch.Tensor, answers: torch.Tensor, clean_logprobs=None, logprobs=None) -> torch.Tensor:
    """[row]: log P(correct) at the last position."""
    return _logprobs(logits, logprobs).gather(-1, answers[:, :1])[:, 0]


def prob(logits: torch.Tensor, answers: torch.Tensor, clean_logprobs=None, logprobs=None) -> torch.Tensor:
    """[row]: P(correct) at the last position."""
    return logprob(logits, answers, clean_logprobs, logprobs).exp()


def kl(
    logits: torch.Tensor, answers: torch.Tensor, clean_logprobs: torch.Tensor, logprobs=None
) -> torch.Tensor:
    """[row]: KL(P_clean || P_run) in nats at the last position; `clean_logprobs` [row, d_vocab]."""
    return kl_divergence(clean_logprobs, _logprobs(logits, logprobs))


BUILTIN: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("logit_diff", logit_diff, "logit difference", builtin=True),
        Metric("logprob", logprob, "log-prob of the answer", builtin=True),
        Metric("prob", prob, "probability of the answer", builtin=True),
        Metric("kl", kl, "KL(clean || patched)", builtin=True),
    )
}


def resolve_metrics(metric) -> tuple[tuple[Metric, ...], str]:
    """All metrics a sweep computes (the built-ins plus user metrics) and the name of the primary one.

    `metric`: a built-in name, a callable, a `Metric`, or a list of these (the first is primary).
    """
    items = list(metric) if isinstance(metric, Sequence) and not isinstance(metric, str) else [metric]
    if not items:
        raise InputError("metric=[]: give at least one metric, e.g. 'logit_diff'.")
    extra: list[Metric] = []
    names: list[str] = []
    for item in items:
        if isinstance(item, str):
            if item not in BUILTIN:
                raise InputError(
                    f"Unknown metric {item!r}. Built-in metrics: {', '.join(BUILTIN)}; or pass a function "
                    "fn(logits, answers) -> [row]."
                )
            names.append(item)
        elif isinstance(item, Metric):
            extra.append(item)
            names.append(item.name)
        elif callable(item):
            name = getattr(item, "__name__", "custom")
            name = "custom" if name == "<lambda>" else name
            extra.append(Metric(name, item))
            names.append(name)
        else:
            raise InputError(f"metric={item!r} is neither a metric name, a function nor a Metric.")
    taken = set(BUILTIN)
    for m in extra:
        if m.name in taken:
            raise InputError(
                f"Two metrics are called {m.name!r}; give user metrics distinct names with Metric(name, fn)."
            )
        taken.add(m.name)
    return (*BUILTIN.values(), *extra), names[0]
