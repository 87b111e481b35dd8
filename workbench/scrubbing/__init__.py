"""Causal scrubbing by resampling: test a hypothesis about which input features an activation carries.

The idea (Chan et al., "Causal scrubbing", Redwood Research, 2022). A hypothesis says that, for the model's
behaviour, some activation depends on the input only through some feature of it. If that is true, replacing the
activation on input *i* with its value on a *donor* input *j* that agrees with *i* on that feature must leave the
behaviour unchanged. Activations the hypothesis calls irrelevant may be replaced with those of any input. So:

1. run the model on every input once and cache the activations at the hypothesis' sites;
2. for each input, draw a donor as the hypothesis allows (`random_donors`, `same_value`, `nearest_value`, ...);
3. rerun the model on the original inputs with the chosen parts of each site overwritten by the donors' cached
   activations (through nnsight);
4. compare the rerun's output with the clean output (`labels_kept`, or any metric you give) and report the
   fraction of behaviour kept. Scores near the clean run support the hypothesis; scores near the fully random
   control mean the resampled parts carried information the hypothesis threw away.

A hypothesis is a list of `Resample` rules. Each rule names a site (a module path, e.g. ``"relu3"`` or
``"blocks.0.hook_resid_mid"``), which part of it to swap (`units` along the last axis, optionally in a
coordinate `basis` and at an index `at` of the middle axes, e.g. one position), and a donor sampler. Rules on one
site are applied in order; each takes its donors' *clean* activations, so a rule at a later layer is not
affected by a rule at an earlier one (the usual resample-ablation reading of a hypothesis with independent
parts). Example, for a CNN whose 200 fc1 neurons are claimed to depend only on a scalar criterion ``s``:

    hypothesis = Hypothesis("detectors follow s", (
        Resample("relu3", nearest_value(s, noise=0.01 * (s.max() - s.min())), units=detector_idx),
        Resample("relu3", random_donors(), units=other_idx),
    ))
    result = scrub(model, images, [hypothesis], output="fc2")
    result.kept            # fraction of labels unchanged, one per hypothesis

The same engine serves a transformer: ``Resample("hook_resid_mid", same_value(filter_a), units=[0],
basis=rotation, at=(2,))`` swaps the first coordinate (in the rows of ``rotation``) of the residual stream at
position 2 among inputs with the same filter outcome.
"""

from workbench.scrubbing.engine import (
    DonorSampler,
    Hypothesis,
    Resample,
    ScrubResult,
    fixed_donors,
    labels_kept,
    nearest_value,
    random_donors,
    same_value,
    scrub,
)

__all__ = [
    "DonorSampler",
    "Hypothesis",
    "Resample",
    "ScrubResult",
    "fixed_donors",
    "labels_kept",
    "nearest_value",
    "random_donors",
    "same_value",
    "scrub",
]
