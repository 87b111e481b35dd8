"""Stable regions (Janiak et al. 2024, arXiv 2409.17113): how sharp are the boundaries between prompts' regions?

For pairs of prompts (A, B), walk from A's activation to B's at one site, x(a) = (1 - a) x_A + a x_B, in A's
context, and read the distance of a later activation from its value at a = 0, normalised by its value at a = 1:
d(a) / d(1). A straight line means no stable regions; a step means the output stays with A, then jumps.
Sharpness = max_a d'(a) / d(1) (finite differences; 1 for a line). Janiak et al. read the final residual after
the final norm (Hugging Face ``hidden_states[-1]``; here ``read_site="ln_final"``), and found regions that
sharpen with training and are absent at random initialisation: `stable_regions` compares models (the trained one
and `reinitialised(model)`, a copy of its architecture with fresh random weights) on the same pairs, with
`workbench.plateau.interpolate` (batched, prefix reuse, local or remote).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from workbench.core import CancelToken, ProgressCallback, Run
from workbench.core.tables import grid_index
from workbench.errors import InputError, UnsupportedModelError
from workbench.models import load_model
from workbench.plateau import interpolate
from workbench.plateau.core import SiteLabels
from workbench.plateau.stats import as_token_rows
from workbench.results import Provenance, Result

# pandas and scipy are imported where a summary table is built: they are slow to import and the engine does not
# need them.


def reinitialised(model, seed: int = 0):
    """A `WorkbenchModel` with `model`'s architecture and tokenizer and fresh random weights (the transformers
    initialisation, seeded; the global random state is left as it was). Janiak et al.'s random-init control."""
    if model.remote is True or not model.is_transformer:
        raise UnsupportedModelError("reinitialised() needs a local transformers model.")

    config = model.module.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    copy = load_model(fresh, model.tokenizer, device=model.device, dtype=model.dtype)
    copy.name = f"{model.name} (re-initialised, seed {seed})"
    return copy


@dataclasses.dataclass(frozen=True)
class StableRegionsResult(SiteLabels, Result):
    """Normalised distance along the paths between prompt pairs, for one or more models.

    Attributes:
        models: [model] labels.
        model_names: [model] the models' names.
        alphas: [step] from 0 (A's activation) to 1 (B's).
        distance: [model, pair, step] d(a) / d(1).
        l2: [model, pair, step] the distance itself (read-site L2 from the a = 0 run).
        kl: [model, pair, step] KL(A unperturbed || path point), nats.
        sharpness: [model, pair] max d'(a) / d(1) (NaN where d(1) = 0).
        prompts_a, prompts_b: the pairs.
        site, layer, read_site, read_layer: where.
    """

    models: tuple[str, ...]
    model_names: tuple[str, ...]
    alphas: torch.Tensor
    distance: torch.Tensor
    l2: torch.Tensor
    kl: torch.Tensor
    sharpness: torch.Tensor
    prompts_a: tuple[str, ...]
    prompts_b: tuple[str, ...]
    site: str
    layer: int
    read_site: str
    read_layer: int | None
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "alphas": "step",
        "distance": "models prompts_a step",
        "l2": "models prompts_a step",
        "kl": "models prompts_a step",
        "sharpness": "models prompts_a",
    }

    def summary(self):
        """Per model: median and interquartile range of the sharpness over pairs (a DataFrame), and the
        one-sided Mann-Whitney p-value that the first model's sharpness is larger than each other's."""
        import pandas as pd
        from scipy import stats

        rows = []
        first = self.sharpness[0].double().numpy()
        first = first[~np.isnan(first)]
        for i, label in enumerate(self.models):
            s = self.sharpness[i].double().numpy()
            s = s[~np.isnan(s)]
            q25, q50, q75 = np.quantile(s, [0.25, 0.5, 0.75]) if len(s) else (np.nan,) * 3
            p = float("nan")
            if i > 0 and len(s) and len(first):
                p = float(stats.mannwhitneyu(first, s, alternative="greater").pvalue)
            rows.append({"model": label, "pairs": len(s), "median_sharpness": q50, "q25": q25, "q75": q75,
                         f"p({self.models[0]} sharper)": p})  # fmt: skip
        return pd.DataFrame(rows)

    def to_frame(self):
        """Tidy table: one row per (model, pair, alpha)."""
        import pandas as pd

        m, p, s = grid_index(self.distance.shape)
        return pd.DataFrame(
            {
                "model": [self.models[i] for i in m.tolist()],
                "pair": p.numpy(),
                "alpha": self.alphas[s].numpy(),
                "distance": self.distance[m, p, s].numpy(),
                "l2": self.l2[m, p, s].numpy(),
                "kl": self.kl[m, p, s].numpy(),
                "sharpness": self.sharpness[m, p].numpy(),
            }
        )

    def __repr__(self) -> str:
        med = [f"{label} {float(self.sharpness[i].nanmedian()):.2f}" for i, label in enumerate(self.models)]
        return (
            f"StableRegionsResult({self.distance.shape[1]} pairs x {self.distance.shape[2]} steps, "
            f"{self.site} {self.layer} -> {self.read_label}; median sharpness: {', '.join(med)})"
        )


def stable_regions(
    models,
    prompts,
    prompts_b=None,
    *,
    layer: int = 1,
    site: str = "resid_pre",
    position: int = -1,
    n_steps: int = 11,
    read_site: str = "ln_final",
    read_layer: int | None = None,
    memory_budget: int | float | str | None = None,
    run: Run | None = None,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> StableRegionsResult:
    """Interpolate between prompt pairs at `site` of `layer` and measure the sharpness, for each model.

    Args:
        models: a `WorkbenchModel`, or {label: model} (e.g. ``{"trained": m, "re-initialised": reinitialised(m)}``);
            the models must share a tokenizer (the same prompts run in each).
        prompts: texts or token rows. Without `prompts_b` they are paired consecutively: (0, 1), (2, 3), ...
        prompts_b: the B side of each pair (then `prompts` is the A side).
        n_steps: alphas from 0 to 1 (Janiak et al.'s default 11).
        read_site, read_layer: where the distance is read (default: after the final norm, as Janiak et al.).
    """
    if not isinstance(models, Mapping):
        models = {"model": models}
    if not models:
        raise InputError("Give at least one model.")
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget)
    first = next(iter(models.values()))
    if prompts_b is None:
        rows = as_token_rows(first, prompts)
        if len(rows) < 2:
            raise InputError("Give at least two prompts to pair.")
        a, b = rows[0 : len(rows) - 1 : 2], rows[1::2]
    else:
        a, b = as_token_rows(first, prompts), as_token_rows(first, prompts_b)
    if not isinstance(n_steps, int) or n_steps < 3:
        raise InputError("n_steps must be an integer >= 3 (sharpness needs a slope between the endpoints).")
    quiet = run.quiet()
    where = dict(
        layer=layer, site=site, position=position, n_steps=n_steps, read_site=read_site, read_layer=read_layer
    )
    results = run.map(
        list(models.values()), lambda m: interpolate(m, a, b, **where, run=quiet), desc="stable regions"
    )
    ref = results[0]
    return StableRegionsResult(
        models=tuple(models),
        model_names=tuple(m.name for m in models.values()),
        alphas=ref.alphas,
        distance=torch.stack([r.distance for r in results]),
        l2=torch.stack([r.l2 for r in results]),
        kl=torch.stack([r.kl for r in results]),
        sharpness=torch.stack([r.sharpness().float() for r in results]),
        prompts_a=ref.prompts_a,
        prompts_b=ref.prompts_b,
        site=ref.site,
        layer=ref.layer,
        read_site=ref.read_site,
        read_layer=ref.read_layer,
        provenance=Provenance.capture(
            ", ".join(m.name for m in models.values()),
            models=list(models),
            prompts_a=list(ref.prompts_a),
            prompts_b=list(ref.prompts_b),
            **where,
        ),
    )
