"""Activation plateau probes: how far can an activation move before the model's output changes?

Real activations sit on plateaus: small pushes barely change the output, then it jumps (Heimersheim & Mendel
2024; Janiak et al. 2024, arXiv 2409.17113; Giglemiani et al. 2024, arXiv 2409.15019). Which directions break the
plateau early ("sensitive directions") says something about which directions the model reads: directions toward
other real activations, feature directions (SAE decoder rows), or random ones with matched statistics (Lee &
Heimersheim 2024, arXiv 2410.12555).

The experiment: take the activation x0 at one site (default: `resid_pre` of layer 1, the residual stream after
block 0) and position (default: the last token; position 0 is never used unless asked for), replace it by
x0 + s * d for unit directions d and sizes s, run the rest of the model, and record

- KL(unperturbed || perturbed) of the next-token distribution at that position, in nats, computed in float32;
- the L2 distance of a later activation (default: the last block's `resid_post`) from its unperturbed value.

Sizes are in units of the median norm of real activations at the site (`scale`), stated on every plot.

    from workbench.plateau import probe, reference_stats, interpolate
    ref = reference_stats(model, corpus, layer=1)              # mean, covariance (Ledoit-Wolf), median norm
    res = probe(model, prompts, layer=1, reference=ref)        # 5 direction families x 16 directions x 33 sizes
    res.compare(baseline="cov_mixture")                        # plateau lengths per family, Mann-Whitney / KS
    res.plot()                                                 # median and spread of the curves per family
    interpolate(model, "prompt A", "prompt B").plot()          # A's activation -> B's, top tokens on the way

Direction families (`workbench.plateau.directions.FAMILIES`): `isotropic`; `cov_random` (toward a sample of
N(mean, cov)); `cov_mixture` (difference of two such samples: independent of x0, the improved baseline);
`toward_real` (toward another real activation); `real_mixture` (difference of two real activations); and your
own, `directions={"sae": W_dec}`. `bases=("real", "cov_random")` also perturbs synthetic activations drawn from
N(mean, cov) in place of the real ones: the plateau test ("are real activations more stable?").

All directions x sizes of a base run as large batches from the write layer onward: the blocks below are skipped
(their output is the cached clean residual), the prompt is cut after the perturbed position, the earlier
positions' attention keys and values are reused from the clean run (local models; on NDIF the whole prompt runs),
and logits are computed for that position only. Chunks follow a memory budget and report progress.
"""

from workbench.plateau.core import READ_SITES, WRITE_SITES, kl_divergence
from workbench.plateau.directions import FAMILIES
from workbench.plateau.interpolation import InterpolationResult, SliceResult, interpolate, slice_2d
from workbench.plateau.metrics import compare_samples, max_slope, plateau_length, sharpness
from workbench.plateau.probe import DEFAULT_FAMILIES, PlateauResult, probe
from workbench.plateau.stats import RefStats, ledoit_wolf, reference_stats, stats_from_activations

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "READ_SITES",
    "WRITE_SITES",
    "InterpolationResult",
    "PlateauResult",
    "RefStats",
    "SliceResult",
    "compare_samples",
    "interpolate",
    "kl_divergence",
    "ledoit_wolf",
    "max_slope",
    "plateau_length",
    "probe",
    "reference_stats",
    "sharpness",
    "slice_2d",
    "stats_from_activations",
]
