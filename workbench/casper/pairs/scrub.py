"""Causal scrubbing of the challenge-2 model's resid_mid: the solution's resampling schemes, run by the generic
engine in `workbench.scrubbing`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.casper.pairs.analysis import AndGate
from workbench.casper.pairs.labels import N_PAIRS, all_pairs
from workbench.casper.pairs.model import PairTransformer, _labels_of
from workbench.errors import InputError
from workbench.scrubbing import (
    Hypothesis,
    Resample,
    fixed_donors,
    labels_kept,
    random_donors,
    same_value,
    scrub,
)

SCRUB_SITE = "blocks.0.hook_resid_mid"
SCHEMES = ("[1]", "[1*]", "[1+2]", "[1+3a]", "[1+3b]", "[1+2+3a]", "[1+2+3b]", "[1+2+3a+3b]")
SCHEME_DESCRIPTIONS = {
    "[1]": "every coordinate but the two filters resampled from a random pair",
    "[1*]": "as [1], but coordinate 3 kept (PC3 for a gate in two components)",
    "[1+2]": "[1], and each filter coordinate resampled from a pair on which that filter gives the same result",
    "[1+3a]": "[1], and the alpha coordinate resampled among all pairs whose beta filter fails",
    "[1+3b]": "[1], and the beta coordinate resampled among all pairs whose alpha filter fails",
    "[1+2+3a]": "[1+2], but alpha drawn within three groups: beta fails; beta and alpha pass; beta passes, alpha fails",
    "[1+2+3b]": "[1+2], but beta drawn within three groups: alpha fails; alpha and beta pass; alpha passes, beta fails",
    "[1+2+3a+3b]": "[1+2+3a], then beta as in [1+2+3b] but grouped by the alpha outcome after resampling alpha",
}


def _resample_within(mask: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
    """Group keys for `same_value`: pairs where `mask` holds share one group (or groups by `key`); every other
    pair is its own group, i.e. keeps its value."""
    n = len(mask)
    inside = torch.zeros(n, dtype=torch.long) if key is None else key.long()
    return torch.where(mask, inside, n + torch.arange(n))


def scrub_hypotheses(gate: AndGate, resid_mid: torch.Tensor, schemes: Sequence[str] = SCHEMES, seed: int = 0):
    """The solution's resampling schemes as `workbench.scrubbing.Hypothesis` objects.

    Coordinates are those of `AndGate.basis` (0: alpha, 1: beta, 2..: PC3...). gate: fitted on `resid_mid`
    [pair, d_model], the resid_mid of the model being scrubbed, whose filter results define the groups.
    A scheme's resampling of one coordinate draws, for each pair, a donor from its group (a random permutation
    within each group), as the solution does; where two steps touch the same coordinate, the later group applies.
    """
    unknown = [s for s in schemes if s not in SCHEME_DESCRIPTIONS]
    if unknown:
        raise InputError(f"unknown scrubbing scheme(s) {unknown}; choose from {list(SCHEMES)}")
    basis = gate.basis()
    d = basis.shape[0]
    passes = gate.filters(resid_mid) > 0
    alpha, beta = passes[:, 0], passes[:, 1]
    generator = torch.Generator().manual_seed(seed)

    def rule(units, donors):
        return Resample(SCRUB_SITE, donors, units=list(units), basis=basis, at=(2,))

    hypotheses = []
    for name in schemes:
        rules = [rule(range(3 if name == "[1*]" else 2, d), random_donors())]
        if name in ("[1+2]", "[1+2+3b]"):
            rules.append(rule([0], same_value(alpha.long())))
        if name in ("[1+2]", "[1+2+3a]"):
            rules.append(rule([1], same_value(beta.long())))
        if name == "[1+3a]":
            rules.append(rule([0], same_value(_resample_within(~beta))))
        if name == "[1+3b]":
            rules.append(rule([1], same_value(_resample_within(~alpha))))
        if name in ("[1+2+3a]", "[1+2+3a+3b]"):
            # beta fails: alpha from any pair whose beta fails; beta passes: alpha from a pair with the same alpha
            key = torch.where(~beta, torch.full_like(alpha, 2, dtype=torch.long), alpha.long())
            alpha_donors = same_value(key).draw(len(key), generator)
            rules.append(rule([0], fixed_donors(alpha_donors)))
            if name == "[1+2+3a+3b]":
                new_alpha = alpha[alpha_donors]  # the alpha filter depends on coordinate 0 only
                key = torch.where(~new_alpha, torch.full_like(beta, 2, dtype=torch.long), beta.long())
                rules.append(rule([1], same_value(key)))
        if name == "[1+2+3b]":
            key = torch.where(~alpha, torch.full_like(beta, 2, dtype=torch.long), beta.long())
            rules.append(rule([1], same_value(key)))
        hypotheses.append(Hypothesis(name, tuple(rules)))
    return hypotheses


class _AgreesWith:
    """Scrubbing metric: 1.0 where the patched label equals a fixed reference label (e.g. the full model's),
    instead of the scrubbed model's own clean label. Needs the whole batch in one trace."""

    def __init__(self, reference: torch.Tensor):
        self.reference = reference.flatten().long()

    def __call__(self, clean: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        if len(patched) != len(self.reference):
            raise InputError(
                "the reference labels must cover the whole batch (scrub with batch_size >= all pairs)"
            )
        return (_labels_of(patched[:, -1]) == self.reference).float()

    def __repr__(self) -> str:
        return "agreement with the full model's labels"


def scrub_schemes(
    model: PairTransformer,
    gate: AndGate,
    resid_mid: torch.Tensor,
    *,
    reference: torch.Tensor | None = None,
    schemes: Sequence[str] = SCHEMES,
    seed: int = 0,
    progress: bool = False,
):
    """Run the resampling schemes on `model` with `workbench.scrubbing.scrub` and return its `ScrubResult`.

    `kept` is the fraction of pairs whose label is unchanged, against `reference` labels [A, B] if given (the
    full model's labels, when scrubbing the fixed-attention model; `clean_score` is then the baseline), else
    against `model`'s own labels.
    """
    metric = _AgreesWith(reference) if reference is not None else labels_kept(position=-1, classes=(0, 1))
    hypotheses = scrub_hypotheses(gate, resid_mid, schemes, seed=seed)
    return scrub(
        model,
        all_pairs(),
        hypotheses,
        output="unembed",
        metric=metric,
        batch_size=N_PAIRS,
        seed=seed,
        progress=progress,
    )
