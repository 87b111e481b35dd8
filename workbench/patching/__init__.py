"""Activation patching: which activations carry the information that makes a model's answer?

Run a model on a *clean* prompt and on a *corrupt* prompt that differs in a few tokens (e.g. swapped names),
then copy one activation from one run into the other and watch a metric of the answer move:

- **denoising** (`direction="denoising"`, the default): clean activation into the corrupt run. If the metric
  recovers, that activation is *sufficient* (from where it sits onward) to restore the behaviour.
- **noising** (`direction="noising"`): corrupt activation into the clean run. If the metric drops, the
  activation is *necessary*.

Scores are normalised as (M_patched - M_corrupt) / (M_clean - M_corrupt): 0 = the corrupt run's level, 1 = the
clean run's, in both directions. The recommended metric is the logit difference between the correct and the
incorrect answer (Heimersheim & Nanda 2024, Zhang & Nanda 2023).

    from workbench.patching import sweep, attribute, compare_attribution
    r = sweep(model, clean, corrupt, answers=(" Mary", " John"), site="resid_pre")   # [site, layer, position]
    r.plot()                                         # layer x position heatmap with the prompt's tokens
    heads = sweep(model, clean, corrupt, answers, site="z", positions="all")        # [site, layer, all, head]
    fast = attribute(model, clean, corrupt, answers, site="resid_pre")              # gradient estimate
    compare_attribution(r, fast)                     # correlation and top-k agreement with exact patching

*Attribution patching* (Nanda 2023) estimates every cell at once from one forward and one backward pass per
metric: M(patched) ~ M(base) + (a_source - a_base) . dM/da at the base run. It is a screen for large models;
verify its top cells with exact patching (it is poor for large changes such as the residual stream, and misses
saturated attention; Kramar et al. 2024).
"""

from workbench.patching.attribution import attribute, compare_attribution
from workbench.patching.inputs import BLOCK_SITES, DIRECTIONS, HEAD_SITES
from workbench.patching.metrics import BUILTIN as METRICS
from workbench.patching.metrics import Metric
from workbench.patching.result import AttributionComparison, PatchingResult
from workbench.patching.sweep import sweep

__all__ = [
    "BLOCK_SITES",
    "DIRECTIONS",
    "HEAD_SITES",
    "METRICS",
    "AttributionComparison",
    "Metric",
    "PatchingResult",
    "attribute",
    "compare_attribution",
    "sweep",
]
