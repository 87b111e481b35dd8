"""Synthetic activations composed of SAE latents, and the two perturbation tests of Giglemiani et al. (2024).

Giglemiani, Petrova, Mangat, Janiak & Heimersheim, "Evaluating Synthetic Activations composed of SAE Latents in
GPT-2" (arXiv 2409.15019). If real activations are sums of SAE latents, activations decoded from made-up codes
should behave like real ones when the model's later layers react to perturbations. Families of activations
(`FAMILIES`; the paper's names in the UI):

- **real** ("Model generated"): another prompt's activation at the same site and position;
- **random** ("Random"): a sample of N(mean, cov) of real activations (Ledoit-Wolf shrunk covariance);
- **synthetic_baseline**: for each active latent of a real code (index order), a live latent drawn uniformly
  among the `n_neighbours` closest in firing frequency (the latent itself and latents already used excluded)
  gets its activation; decoded. Same multiset of activation values, similar sparsities, nothing else;
- **synthetic_structured**: t = the real code's top latent; anchor c = among the `n_anchor_candidates` live
  latents closest in firing frequency to t, the one whose decoder cosine to t is closest to `anchor_cosine`
  (0.42 in the authors' code, without derivation; "auto" uses the mean decoder cosine between the top latents
  of two different real activations); then each active latent i (index order) is replaced by the unused live
  latent j whose cosine to c is closest to cos(t, i), with i's activation. Keeps the cosine profile around the
  top latent;
- **single_latent**: one random live latent at the mean L2 norm of real codes (the paper's "Synthetic BoF");
- **sae_reconstruction**: decode(encode(another prompt's activation));
- **real_own** (test 2 only; not in the paper): the prompt's own activation, in its own context. The paper's real
  family in test 2 is another prompt's activation placed in P's context; this control separates "real" from
  "in its own context".

The two tests swap the roles of start and target (keep them apart: they give opposite-looking orderings):

- **Test 1, "blowup"** (relative steps): x_k = (1 - k/(K-1)) A + k/(K-1) T from the real activation A of prompt
  P to a target T of the family, in P's context; d_k = |R(x_k) - R(A)| at the read site. Statistic: the
  max-slope step argmax_k (d_k - d_{k-1}) (K - 1 when no slope exceeds `flat_slope`).
- **Test 2, "plateau"** (absolute steps): the activation under test X (of the family) is put in P's context and
  pushed toward a fresh random target R: x_k = X + h k (R - X)/|R - X|; d_k = |R(x_k) - R(X)|. Statistic: the
  plateau length, the first k < |R - X|/h with d_k >= threshold (`n_steps` when none).

GPT-2's constants (h = 0.5, threshold 20) are in GPT-2 units. Here h defaults to the median |R - X| of the real
family over `n_steps`, and the threshold is a fraction of the typical distance between two prompts' read-site
vectors (both shown). All rows run on the plateau engine's batched path (`workbench.plateau.core`): the blocks
below the site are skipped, the prompt's earlier positions are reused from a key/value cache, logits at the last
position only, chunks to a memory budget.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from workbench.core import CancelToken, ProgressCallback, Run
from workbench.core.tables import grid_index
from workbench.errors import InputError
from workbench.plateau import kl_divergence, metrics
from workbench.plateau.core import (
    WRITE_SITES,
    SiteLabels,
    Where,
    clean_bases,
    reference_rows,
    resolve_positions,
    run_rows,
)
from workbench.plateau.stats import RefStats, as_token_rows, prompt_texts, resolve_reference
from workbench.results import Provenance, Result
from workbench.sae.model import SAE

# pandas and scipy are imported where a summary table is built: they are slow to import and the engine does not
# need them.

FAMILIES: dict[str, str] = {
    "real": "Model generated",
    "random": "Random (MVN)",
    "synthetic_baseline": "Synthetic baseline",
    "synthetic_structured": "Synthetic structured",
    "single_latent": "Single latent",
    "sae_reconstruction": "SAE reconstruction",
    "real_own": "Model generated (own context)",
}
"""Activation families and their names in the paper ("real_own", test 2 only, is not the paper's: the prompt's own
activation, a control for placing another prompt's activation in a foreign context)."""
DEFAULT_FAMILIES = ("real", "random", "synthetic_baseline", "synthetic_structured")
TESTS = {
    "blowup": "Test 1: from a real activation toward a target of the family, relative steps, max-slope step",
    "plateau": "Test 2: from an activation of the family toward a random one, absolute steps, plateau length",
}
PAPER_ANCHOR_COSINE = 0.42
DEFAULT_THRESHOLD = 0.1
"""Test 2's threshold as a fraction of the typical read-site distance between two prompts (GPT-2: 20 units). On
the demo model with the demo SAE, 0.1 puts the real family's mean plateau near 20 of 100 steps (GPT-2: 15)."""
FLAT_SLOPE = 1e-4
"""Test 1: a curve none of whose steps rises by more than this fraction of the typical distance has no blow-up
(the authors' 0.02 GPT-2 units)."""
KL_FLAT_SLOPE = 1e-4
KL_THRESHOLD = 0.1

PAPER_GPT2 = {
    "source": "Giglemiani et al. 2024, the authors' notebooks (jettjaniak/teren, branch explorations @ 0381673), "
    "GPT-2 small, blocks.1.hook_resid_pre -> blocks.11.hook_resid_post, last of 10 tokens, n = 1000",
    "blowup": {  # max-slope step of the L2 curve (relative steps, 100 points), run A
        "real": (51.65, 7.42, None),
        "random": (64.89, 10.50, 0.62),
        "synthetic_structured": (55.69, 11.31, 0.22),
        "synthetic_baseline": (57.07, 11.29, 0.27),
        "single_latent": (55.25, 8.74, 0.19),
    },
    "plateau": {  # plateau length in steps of 0.5, threshold 20
        "real": (15.12, 8.62, None),
        "random": (8.33, 3.80, 0.568),
        "synthetic_structured": (7.76, 3.76, 0.633),
        "synthetic_baseline": (6.18, 3.13, 0.754),
    },
    "l0_last_token": (21.2, 13.5),
    "mean_code_norm": 25.93,
}
"""The GPT-2 reference numbers, (mean, std, KS vs real) per family, as printed in the authors' notebooks
(research note `sae_synthetic.md` §5). They are targets for a GPT-2 run, not for the demo model."""


# -- synthetic codes (model-independent) -----------------------------------------------------------------------


def _order(code: torch.Tensor) -> torch.Tensor:
    """Indices of the active latents of `code` [d_sae], in index order."""
    return torch.nonzero(code > 0).flatten()


def _nearest_in_frequency(freq: torch.Tensor, latent: int, allowed: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the (at most) `n` latents among `allowed` [d_sae] whose firing frequency `freq` [d_sae] is
    closest to that of `latent` (the latent itself excluded)."""
    dist = (freq - freq[latent]).abs()
    dist[latent] = float("inf")
    dist[~allowed] = float("inf")
    n_ok = int(torch.isfinite(dist).sum())
    if n_ok == 0:
        raise InputError("The SAE has too few live latents to build a synthetic code.")
    return dist.topk(min(n, n_ok), largest=False).indices


def baseline_code(
    code: torch.Tensor,
    frequency: torch.Tensor,
    live: torch.Tensor,
    *,
    n_neighbours: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Synthetic baseline [d_sae]: each active latent's value moved to a random live latent among the
    `n_neighbours` closest to it in firing frequency (itself and latents already used excluded)."""
    out = torch.zeros_like(code)
    free = live.clone()
    freq = frequency.double()
    for i in _order(code).tolist():
        near = _nearest_in_frequency(freq, i, free, n_neighbours)
        j = int(near[torch.randint(len(near), (1,), generator=generator)])
        out[j] = code[i]
        free[j] = False
    return out


def structured_code(
    code: torch.Tensor,
    frequency: torch.Tensor,
    live: torch.Tensor,
    unit_decoder: torch.Tensor,
    *,
    anchor_cosine: float = PAPER_ANCHOR_COSINE,
    n_anchor_candidates: int = 100,
) -> tuple[torch.Tensor, int]:
    """Synthetic structured [d_sae] and the anchor latent: the cosine profile around the top latent t kept
    around an anchor c of similar frequency (module docstring). unit_decoder: [d_sae, d_in] unit rows."""
    active = _order(code)
    if len(active) == 0:
        return torch.zeros_like(code), -1
    t = int(code.argmax())
    candidates = _nearest_in_frequency(frequency.double(), t, live, n_anchor_candidates)
    cos_t = unit_decoder @ unit_decoder[t]  # [d_sae]
    c = int(candidates[(cos_t[candidates] - anchor_cosine).abs().argmin()])
    cos_c = unit_decoder @ unit_decoder[c]
    out = torch.zeros_like(code)
    free = live.clone()
    for i in active.tolist():
        gap = (cos_c - cos_t[i]).abs()
        gap[~free] = float("inf")
        j = int(gap.argmin())
        if not torch.isfinite(gap[j]):
            raise InputError("The SAE has too few live latents to build a synthetic code.")
        out[j] = code[i]
        free[j] = False
    return out, c


def single_latent_code(
    d_sae: int, live: torch.Tensor, activation: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[d_sae] one random live latent at `activation`."""
    idx = torch.nonzero(live).flatten()
    if len(idx) == 0:
        raise InputError("The SAE has no live latents.")
    out = torch.zeros(d_sae)
    out[int(idx[torch.randint(len(idx), (1,), generator=generator)])] = activation
    return out


def reencoding_overlap(sae: SAE, codes: torch.Tensor) -> torch.Tensor:
    """[n] fraction of each code's active latents that are active again in encode(decode(code)) (NaN for an
    empty code). codes: [n, d_sae]."""
    again = sae.encode(sae.decode(codes)) > 0
    chosen = codes > 0
    n = chosen.sum(-1).float()
    hit = (again & chosen).sum(-1).float()
    return torch.where(n > 0, hit / n.clamp(min=1), torch.full_like(n, float("nan")))


def top_latent_cosine(sae: SAE, codes: torch.Tensor, other: torch.Tensor) -> float:
    """Mean decoder cosine between the top latent of each code [n, d_sae] and that of `other` [n, d_sae] (the
    note's derivation of the anchor cosine for a new SAE)."""
    unit = sae.W_dec.detach().float()
    unit = unit / unit.norm(dim=-1, keepdim=True)
    ok = (codes.amax(-1) > 0) & (other.amax(-1) > 0)
    if not bool(ok.any()):
        raise InputError("No pair of non-empty codes to derive the anchor cosine from.")
    a, b = unit[codes[ok].argmax(-1)], unit[other[ok].argmax(-1)]
    return float((a * b).sum(-1).mean())


# -- statistics of curves -------------------------------------------------------------------------------------


def max_slope_step(curves: torch.Tensor, flat: float) -> torch.Tensor:
    """[...] the step k where d_k - d_{k-1} is largest (the authors' `find_blowup_max_slope`: slope 0 := slope 1;
    the last step when no slope exceeds `flat`). curves: [..., step]."""
    s = curves.diff(dim=-1)
    s = torch.cat([s[..., :1], s], dim=-1)
    best = s.argmax(-1)
    return torch.where((s > flat).any(-1), best, torch.full_like(best, curves.shape[-1] - 1))


def plateau_steps(curves: torch.Tensor, threshold: float, reach: torch.Tensor) -> torch.Tensor:
    """[...] the first step k < reach with d_k >= threshold; the number of steps when there is none.
    curves: [..., step]; reach: [...] steps before the target is passed."""
    n = curves.shape[-1]
    k = torch.arange(n)
    hit = (curves >= threshold) & (k < reach[..., None])
    first = hit.float().argmax(-1)
    return torch.where(hit.any(-1), first, torch.full_like(first, n))


def path_points(
    test: str, start: torch.Tensor, target: torch.Tensor, k: torch.Tensor, n_steps: int, step_size: float
) -> torch.Tensor:
    """[r, d] the activations written at steps `k` [r] of paths from `start` [r, d] toward `target` [r, d]:
    test 1 x_k = (1 - k/(n_steps-1)) start + k/(n_steps-1) target; test 2 x_k = start + step_size k u with
    u = (target - start)/|target - start|."""
    k = k.to(start.dtype)[:, None]
    if test == "blowup":
        a = k / (n_steps - 1)
        return (1 - a) * start + a * target
    diff = target - start
    return start + step_size * k * diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# -- the result -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticTestResult(SiteLabels, Result):
    """Curves and per-curve statistics of one of the two tests, per family and sample.

    Axes: family, sample, step. Sample n runs in the context of prompt `sample_prompt[n]`; its "other" prompt
    (the real and reconstruction families) is `other_prompt[n]`.

    Attributes:
        test: "blowup" (test 1) or "plateau" (test 2).
        families: [family] keys of `FAMILIES`.
        l2: [family, sample, step] distance of the read site from the step-0 run (the start's own run).
        kl: [family, sample, step] KL(step-0 run || step k) of the next-token distribution, nats.
        steps: [step] step indices; alphas: [step] the interpolation fractions (test 1; test 2: h k / |R - X|
            of the median real sample, for reference).
        reach: [family, sample] steps before the target is passed (test 2); n_steps for test 1.
        step_size: h in L2 units (test 2; NaN for test 1).
        typical_distance: median read-site distance between the clean runs of a prompt and its other prompt.
        threshold: test 2's threshold in L2 units; threshold_fraction: the same / typical_distance.
        flat_slope: test 1's "no blow-up" slope in L2 units.
        start, target: [family, sample, d_model] each path's start (test 1: the real activation A; test 2: the
            family's activation X) and target (test 1: the family's activation T; test 2: the random R), in the
            SAE's input space; `path_points` gives the activations written.
        start_norm, target_norm: [family, sample] their norms.
        real_norm, mvn_norm: median norms of real activations and of N(mean, cov) samples.
        source_latents, source_values: [sample, m] the active latents of the real code behind each sample
            (index -1 pads), largest first; source_cos_to_top: their decoder cosine to the top latent.
        twin_latents, twin_values, twin_cos_to_top: [family, sample, m] the same for the family's activation
            (its own code for synthetic families, the SAE encoding of the vector otherwise).
        reencoding: [family, sample] fraction of a synthetic code's latents active again after decode+encode
            (NaN for families that are not built from codes).
        latent_frequency: [latent] the SAE's firing frequencies used for the synthetic picks.
        anchor_cosine, single_latent_activation: the values used.
        noise_floor: [sample] KL(clean run || the engine's unperturbed path) of each real start.
        prompts, sample_prompt, other_prompt: prompt texts and indices.
        site, layer, position, read_site, read_layer, sae: where and what.
        warnings: notes raised during the run.
    """

    test: str
    families: tuple[str, ...]
    l2: torch.Tensor
    kl: torch.Tensor
    steps: torch.Tensor
    alphas: torch.Tensor
    reach: torch.Tensor
    step_size: float
    typical_distance: float
    threshold: float
    threshold_fraction: float
    flat_slope: float
    start: torch.Tensor
    target: torch.Tensor
    start_norm: torch.Tensor
    target_norm: torch.Tensor
    real_norm: float
    mvn_norm: float
    source_latents: torch.Tensor
    source_values: torch.Tensor
    source_cos_to_top: torch.Tensor
    twin_latents: torch.Tensor
    twin_values: torch.Tensor
    twin_cos_to_top: torch.Tensor
    reencoding: torch.Tensor
    latent_frequency: torch.Tensor
    anchor_cosine: float
    single_latent_activation: float
    noise_floor: torch.Tensor
    prompts: tuple[str, ...]
    sample_prompt: tuple[int, ...]
    other_prompt: tuple[int, ...]
    site: str
    layer: int
    position: int
    read_site: str
    read_layer: int | None
    sae: str
    warnings: tuple[str, ...]
    provenance: Provenance

    shapes: ClassVar[dict[str, str]] = {
        "l2": "families sample_prompt step",
        "kl": "families sample_prompt step",
        "steps": "step",
        "alphas": "step",
        "reach": "families sample_prompt",
        "start": "families sample_prompt d_model",
        "target": "families sample_prompt d_model",
        "start_norm": "families sample_prompt",
        "target_norm": "families sample_prompt",
        "source_latents": "sample_prompt m",
        "source_values": "sample_prompt m",
        "source_cos_to_top": "sample_prompt m",
        "twin_latents": "families sample_prompt m",
        "twin_values": "families sample_prompt m",
        "twin_cos_to_top": "families sample_prompt m",
        "reencoding": "families sample_prompt",
        "latent_frequency": "latent",
        "noise_floor": "sample_prompt",
    }

    @property
    def n_steps(self) -> int:
        return int(self.l2.shape[-1])

    def label(self, family: str) -> str:
        return FAMILIES.get(family, family)

    def curves(self, metric: str = "l2") -> torch.Tensor:
        return metrics.choose(metric, {"l2": self.l2, "kl": self.kl})

    def statistic(self, metric: str = "l2", threshold: float | None = None) -> torch.Tensor:
        """[family, sample] the test's statistic: max-slope step (test 1) or plateau length in steps (test 2).
        `threshold` (test 2) defaults to `self.threshold` for L2 and `KL_THRESHOLD` nats for KL."""
        curves = self.curves(metric)
        if self.test == "blowup":
            flat = self.flat_slope if metric == "l2" else KL_FLAT_SLOPE
            return max_slope_step(curves, flat)
        if threshold is None:
            threshold = self.threshold if metric == "l2" else KL_THRESHOLD
        return plateau_steps(curves, threshold, self.reach)

    @property
    def statistic_name(self) -> str:
        return "max-slope step" if self.test == "blowup" else "plateau length (steps)"

    def summary(self, metric: str = "l2", threshold: float | None = None):
        """Per family: n, mean, std, median of the statistic, and the two-sample Kolmogorov-Smirnov statistic
        and p-value against the real family (a DataFrame)."""
        import pandas as pd
        from scipy import stats

        values = self.statistic(metric, threshold).double().numpy()
        real = values[self.families.index("real")] if "real" in self.families else None
        rows = []
        for i, fam in enumerate(self.families):
            v = values[i]
            row = {
                "family": fam,
                "name": self.label(fam),
                "n": len(v),
                "mean": float(v.mean()),
                "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                "median": float(np.median(v)),
                "ks_vs_real": float("nan"),
                "ks_p": float("nan"),
            }
            if real is not None and fam != "real":
                ks = stats.ks_2samp(v, real)
                row.update(ks_vs_real=float(ks.statistic), ks_p=float(ks.pvalue))
            reenc = self.reencoding[i]
            row["reencoding"] = float(reenc.nanmean()) if bool((~reenc.isnan()).any()) else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)

    def paper(self):
        """The GPT-2 numbers of the authors' notebooks for this test, beside this run's (a DataFrame; the
        paper's columns are GPT-2 values, not targets for other models)."""
        import pandas as pd

        ours = self.summary().set_index("family")
        rows = []
        for fam in self.families:
            ref = PAPER_GPT2[self.test].get(fam)
            rows.append(
                {
                    "family": fam,
                    "name": self.label(fam),
                    "this run: mean": ours.loc[fam, "mean"],
                    "this run: std": ours.loc[fam, "std"],
                    "this run: KS vs real": ours.loc[fam, "ks_vs_real"],
                    "GPT-2 (paper): mean": ref[0] if ref else float("nan"),
                    "GPT-2 (paper): std": ref[1] if ref else float("nan"),
                    "GPT-2 (paper): KS vs real": (ref[2] if ref and ref[2] is not None else float("nan")),
                }
            )
        return pd.DataFrame(rows)

    def to_frame(self):
        """Tidy table: one row per (family, sample, step)."""
        import pandas as pd

        f, s, k = grid_index(self.l2.shape)
        return pd.DataFrame(
            {
                "family": [self.families[i] for i in f.tolist()],
                "sample": s.numpy(),
                "prompt": [self.sample_prompt[i] for i in s.tolist()],
                "step": k.numpy(),
                "l2": self.l2[f, s, k].numpy(),
                "kl": self.kl[f, s, k].numpy(),
            }
        )

    def __repr__(self) -> str:
        n_f, n_s, n_k = self.l2.shape
        return (
            f"SyntheticTestResult({self.test}: {n_s} samples x {n_f} families ({', '.join(self.families)}) x "
            f"{n_k} steps, {self.site} {self.layer} -> {self.read_label})"
        )


# -- the engine -----------------------------------------------------------------------------------------------


def _sparse(codes: torch.Tensor, m: int, unit_decoder: torch.Tensor):
    """Codes [..., d_sae] as their m largest active entries: (latents [..., m] with -1 pads, values [..., m],
    decoder cosine of each to the code's top latent [..., m])."""
    vals, idx = codes.topk(min(m, codes.shape[-1]), dim=-1)
    on = vals > 0
    idx = torch.where(on, idx, torch.full_like(idx, -1))
    vals = torch.where(on, vals, torch.zeros_like(vals))
    top = unit_decoder[codes.argmax(-1)]  # [..., d_in]
    cos = torch.einsum("...md,...d->...m", unit_decoder[idx.clamp(min=0)], top)
    return idx.int(), vals.float(), torch.where(on, cos, torch.zeros_like(cos)).float()


def _check_families(families, test: str) -> tuple[str, ...]:
    families = tuple(families)
    if test == "blowup" and "real_own" in families:
        raise InputError(
            "'real_own' is a test-2 family: in test 1 every path starts at the prompt's own activation."
        )
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise InputError(f"Unknown families {unknown}; families: {', '.join(FAMILIES)}.")
    if not families or len(set(families)) != len(families):
        raise InputError("Give each family at most once, and at least one.")
    if "real" in families:  # real first: everything is compared against it
        families = ("real", *(f for f in families if f != "real"))
    return families


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """A synthetic-activation test resolved and checked before any model runs (see `synthetic_activation_test`
    for the arguments).

    rows: the prompts as [1, pos] token tensors; positions: the tested position of each row; texts: the prompts as
    text; notes: pitfalls found while checking (raised as warnings with those of the run).
    """

    test: str
    families: tuple[str, ...]
    where: Where
    rows: tuple[torch.Tensor, ...]
    positions: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]
    position: int
    n_steps: int
    step_size: float | None
    threshold: float
    threshold_abs: float | None
    n_neighbours: int
    n_anchor_candidates: int
    anchor_cosine: float | str
    single_latent_activation: float | str
    max_latents: int
    seed: int
    notes: tuple[str, ...]

    @classmethod
    def resolve(
        cls,
        model,
        sae: SAE,
        prompts,
        *,
        test,
        families,
        position,
        n_steps,
        step_size,
        threshold,
        threshold_abs,
        read_site,
        read_layer,
        n_neighbours,
        n_anchor_candidates,
        anchor_cosine,
        single_latent_activation,
        max_latents,
        seed,
    ) -> SyntheticSpec:
        if test not in TESTS:
            raise InputError(f"test must be one of {', '.join(TESTS)}, got {test!r}.")
        if not isinstance(sae, SAE):
            raise InputError(f"sae must be a workbench SAE, got {type(sae).__name__}.")
        families = _check_families(families, test)
        if sae.cfg.site not in WRITE_SITES:
            raise InputError(
                f"The SAE reads {sae.cfg.site}; the tests write activations at residual-basis sites: "
                f"{', '.join(WRITE_SITES)}."
            )
        where = Where.resolve(model, sae.cfg.site, sae.cfg.layer, read_site, read_layer)
        if sae.d_in != model.cfg.d_model:
            raise InputError(f"The SAE reads width {sae.d_in}; {model.name} has d_model {model.cfg.d_model}.")
        _check_settings(
            n_steps=n_steps, n_neighbours=n_neighbours, n_anchor_candidates=n_anchor_candidates,
            max_latents=max_latents, threshold=threshold, threshold_abs=threshold_abs, step_size=step_size,
            anchor_cosine=anchor_cosine, single_latent_activation=single_latent_activation,
        )  # fmt: skip
        rows = as_token_rows(model, prompts)
        if len(rows) < 2:
            raise InputError("Give at least two prompts: each sample needs another prompt.")
        if not isinstance(position, int) or isinstance(position, bool):
            raise InputError("position must be one integer.")
        notes, positions = [], []
        for r in rows:
            pos, zero = resolve_positions(position, r.shape[-1])
            if zero:
                notes.append("Position 0 is used: its activation is an outlier (attention sink).")
            positions.append(tuple(pos))
        return cls(
            test, families, where, tuple(rows), tuple(positions), prompt_texts(model, rows, prompts), position,
            n_steps, step_size, threshold, threshold_abs, n_neighbours, n_anchor_candidates, anchor_cosine,
            single_latent_activation, max_latents, seed, tuple(notes),
        )  # fmt: skip

    def provenance(self, model, sae: SAE) -> Provenance:
        return Provenance.capture(
            model.name,
            sae=repr(sae),
            prompts=list(self.texts),
            test=self.test,
            families=list(self.families),
            position=self.position,
            n_steps=self.n_steps,
            step_size=self.step_size,
            threshold=self.threshold,
            threshold_abs=self.threshold_abs,
            read_site=self.where.read_site,
            read_layer=self.where.read_layer,
            n_neighbours=self.n_neighbours,
            n_anchor_candidates=self.n_anchor_candidates,
            anchor_cosine=self.anchor_cosine,
            single_latent_activation=self.single_latent_activation,
            seed=self.seed,
        )


def _check_settings(
    *,
    n_steps,
    n_neighbours,
    n_anchor_candidates,
    max_latents,
    threshold,
    threshold_abs,
    step_size,
    anchor_cosine,
    single_latent_activation,
) -> None:
    for name, value, low in (("n_steps", n_steps, 3), ("n_neighbours", n_neighbours, 1),
                             ("n_anchor_candidates", n_anchor_candidates, 1), ("max_latents", max_latents, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be a whole number >= {low}, got {value!r}.")
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise InputError(f"threshold is a positive fraction of the typical distance, got {threshold!r}.")
    if threshold_abs is not None and not threshold_abs > 0:
        raise InputError("threshold_abs must be positive.")
    if step_size is not None and not step_size > 0:
        raise InputError("step_size must be positive.")
    if not (
        anchor_cosine == "auto" or (isinstance(anchor_cosine, (int, float)) and -1 <= anchor_cosine <= 1)
    ):
        raise InputError(f"anchor_cosine must be 'auto' or a cosine in [-1, 1], got {anchor_cosine!r}.")
    single = single_latent_activation
    if not (single == "auto" or (isinstance(single, (int, float)) and single > 0)):
        raise InputError("single_latent_activation must be 'auto' or a positive number.")


@dataclasses.dataclass(frozen=True)
class _Families:
    """The samples' real codes and every family's activation, in the SAE's input space.

    codes: [sample, d_sae] codes of the real activations; frequency: [d_sae] firing frequencies of the synthetic
    picks; unit_decoder: [d_sae, d_in] unit decoder rows; anchor, single: the anchor cosine and single-latent
    activation used; vectors: [family, sample, d_in]; codes_of: [family, sample, d_sae] each activation's code
    (its own for synthetic families, its SAE encoding otherwise); reencoding: [family, sample] (NaN for families
    not built from codes).
    """

    codes: torch.Tensor
    frequency: torch.Tensor
    unit_decoder: torch.Tensor
    anchor: float
    single: float
    vectors: torch.Tensor
    codes_of: torch.Tensor
    reencoding: torch.Tensor


def _family_activations(sae: SAE, spec: SyntheticSpec, A, other, mvn, gen, notes: list[str]) -> _Families:
    """Each family's activation for each sample (module docstring). A: [sample, d_in] real activations; other:
    [sample] each sample's other prompt; mvn(k): k samples of N(mean, cov); draws from `gen` in family order."""
    sae_cpu = sae.to("cpu")
    n = len(A)
    with torch.no_grad():
        codes = sae_cpu.encode(A)
        live = sae_cpu.live()
        freq = sae_cpu.firing_frequency
        if freq is None:
            notes.append(
                "The SAE has no firing frequencies: synthetic picks treat all latents as equally frequent."
            )
            freq = torch.ones(sae.d_sae)
        unit_dec = sae_cpu.W_dec.detach().float()
        unit_dec = unit_dec / unit_dec.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        auto_anchor = spec.anchor_cosine == "auto"
        anchor = top_latent_cosine(sae_cpu, codes, codes[other]) if auto_anchor else float(spec.anchor_cosine)
        code_norm = float(codes.norm(dim=-1).mean())
        auto_single = spec.single_latent_activation == "auto"
        single = code_norm if auto_single else float(spec.single_latent_activation)

        vectors, codes_of = [], []
        reenc = torch.full((len(spec.families), n), float("nan"))
        for fi, fam in enumerate(spec.families):
            if fam == "real":
                v, c = A[other], codes[other]
            elif fam == "real_own":
                v, c = A, codes
            elif fam == "random":
                v = mvn(n)
                c = sae_cpu.encode(v)
            elif fam == "sae_reconstruction":
                c = codes[other]
                v = sae_cpu.decode(c)
            else:
                if fam == "synthetic_baseline":
                    c = torch.stack([baseline_code(codes[i], freq, live, n_neighbours=spec.n_neighbours,
                                                   generator=gen) for i in range(n)])  # fmt: skip
                elif fam == "synthetic_structured":
                    c = torch.stack([structured_code(codes[i], freq, live, unit_dec, anchor_cosine=anchor,
                                                     n_anchor_candidates=spec.n_anchor_candidates)[0]
                                     for i in range(n)])  # fmt: skip
                else:
                    c = torch.stack([single_latent_code(sae.d_sae, live, single, gen) for _ in range(n)])
                v = sae_cpu.decode(c)
                reenc[fi] = reencoding_overlap(sae_cpu, c)
            vectors.append(v.float())
            codes_of.append(c)
    return _Families(
        codes, freq, unit_dec, anchor, single, torch.stack(vectors), torch.stack(codes_of), reenc
    )


@dataclasses.dataclass(frozen=True)
class _Paths:
    """The path of every (family, sample): where it starts and ends, and the base it runs on.

    bases: the bases the rows run on; base_index: [family * sample] each path's base; start, target: [family,
    sample, d_in]; reach: [family, sample] steps before the target is passed; step_size: h (NaN for test 1);
    alphas: [step] the interpolation fractions (test 2: h k / |R - X| of the median sample).
    """

    bases: list
    base_index: torch.Tensor
    start: torch.Tensor
    target: torch.Tensor
    reach: torch.Tensor
    step_size: float
    alphas: torch.Tensor


def _paths(spec: SyntheticSpec, bases, A, V, mvn) -> _Paths:
    """Test 1: from the real activation A toward each family's V, in A's prompt; test 2: from V toward a fresh
    random R, in the prompt behind V. A: [sample, d_in]; V: [family, sample, d_in]."""
    n_f, n = V.shape[:2]
    n_steps = spec.n_steps
    ks = torch.arange(n_steps, dtype=torch.float32)
    if spec.test == "blowup":
        reach = torch.full((n_f, n), n_steps)
        return _Paths(bases, torch.arange(n).repeat(n_f), A.expand(n_f, n, -1), V, reach, float("nan"),
                      ks / (n_steps - 1))  # fmt: skip
    R = mvn(n_f * n).reshape(n_f, n, -1)
    gap = (R - V).norm(dim=-1)
    if spec.step_size is None:
        real_gap = gap[spec.families.index("real")] if "real" in spec.families else gap.flatten()
        h = float(real_gap.median()) / n_steps
    else:
        h = float(spec.step_size)
    reach = torch.floor(gap / h).long().clamp(max=n_steps)
    run_bases = [
        dataclasses.replace(bases[i], x0=V[f, i], clean_logp=None) for f in range(n_f) for i in range(n)
    ]
    alphas = ks * h / max(float(gap.median()), 1e-12)
    return _Paths(run_bases, torch.arange(n_f * n), V, R, reach, h, alphas)


def _run_paths(model, spec: SyntheticSpec, paths: _Paths, reference, run: Run):
    """l2, kl [family, sample, step] along every path; paths of bases of one length run together."""
    n_f, n = paths.start.shape[:2]
    n_steps = spec.n_steps
    lengths = torch.tensor([len(b.tokens) for b in paths.bases])
    blocks = torch.tensor(sorted(range(n_f * n), key=lambda j: int(lengths[paths.base_index[j]])))
    base_of_row = paths.base_index[blocks].repeat_interleave(n_steps)
    flat_start = paths.start.reshape(n_f * n, -1)
    flat_target = paths.target.reshape(n_f * n, -1)

    def vectors_for(lo: int, hi: int) -> torch.Tensor:
        r = torch.arange(lo, hi)
        blk = blocks[r // n_steps]
        return path_points(
            spec.test, flat_start[blk], flat_target[blk], r % n_steps, n_steps, paths.step_size
        )

    out = run_rows(
        model,
        spec.where,
        paths.bases,
        base_of_row,
        vectors_for,
        reference=reference,
        desc=f"synthetic activations ({spec.test})",
        top_k=1,
        run=run,
    )
    inv = torch.empty_like(blocks)
    inv[blocks] = torch.arange(len(blocks))

    def grid(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(len(blocks), n_steps)[inv].reshape(n_f, n, n_steps)

    return grid(out["l2"]), grid(out["kl"])


def synthetic_activation_test(
    model,
    sae: SAE,
    prompts,
    *,
    test: str = "blowup",
    families: Sequence[str] = DEFAULT_FAMILIES,
    reference: RefStats | Any = None,
    position: int = -1,
    n_steps: int = 100,
    step_size: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    threshold_abs: float | None = None,
    read_site: str = "resid_post",
    read_layer: int | None = -1,
    n_neighbours: int = 10,
    n_anchor_candidates: int = 100,
    anchor_cosine: float | str = "auto",
    single_latent_activation: float | str = "auto",
    max_latents: int = 64,
    seed: int = 0,
    memory_budget: int | float | str | None = None,
    run: Run | None = None,
    progress: bool | ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> SyntheticTestResult:
    """Run test 1 ("blowup") or test 2 ("plateau") of Giglemiani et al. on `model` with `sae` (module docstring).

    Args:
        model: a `WorkbenchModel` (local or remote: only the plateau engine's traces run on the model).
        sae: an `SAE` at a residual-basis site of `model` (its site and layer are where activations are written).
        prompts: texts or a [batch, pos] token tensor, one sample per prompt (at least two: each sample's "other"
            prompt is another one, drawn with the seed).
        test: "blowup" or "plateau".
        families: any of `FAMILIES` ("real" is needed for the KS statistics).
        reference: `RefStats` at the SAE's site, or texts/tokens to compute them from (mean and covariance of
            the random family and test 2's targets). None: the prompts' own activations, with a warning.
        position: the token position (default: the last).
        n_steps: points per curve (the authors: 100).
        step_size: test 2's h in L2 units (default: the median |R - X| of the real family / n_steps).
        threshold: test 2's threshold as a fraction of the typical read-site distance between two prompts;
            `threshold_abs` sets it in L2 units instead.
        read_site, read_layer: where the distance is read (default: the last block's resid_post, as the paper's
            blocks.11.hook_resid_post).
        n_neighbours, n_anchor_candidates, anchor_cosine: the synthetic recipes' knobs ("auto": derived from
            the samples' top latents, see `top_latent_cosine`).
        single_latent_activation: the single-latent family's activation ("auto": mean norm of real codes).
        max_latents: active latents kept per code for display.
        seed: seeds every draw (other prompts, random samples, synthetic picks).
        memory_budget / run / progress / cancel: as every engine.
    """
    spec = SyntheticSpec.resolve(
        model, sae, prompts, test=test, families=families, position=position, n_steps=n_steps,
        step_size=step_size, threshold=threshold, threshold_abs=threshold_abs, read_site=read_site,
        read_layer=read_layer, n_neighbours=n_neighbours, n_anchor_candidates=n_anchor_candidates,
        anchor_cosine=anchor_cosine, single_latent_activation=single_latent_activation, max_latents=max_latents,
        seed=seed,
    )  # fmt: skip
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget)
    quiet = run.quiet()
    notes = list(spec.notes)
    where, n = spec.where, len(spec.rows)
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, n, (n,), generator=gen)
    other = (torch.arange(n) + shift) % n

    space = sae.prepare  # the SAE's input space (centred for SAEs of centred TransformerLens models)
    bases = clean_bases(model, where, spec.rows, spec.positions, run=quiet)
    if sae.cfg.centre_input:
        bases = [dataclasses.replace(b, x0=space(b.x0)) for b in bases]
    A = torch.stack([b.x0 for b in bases]).float()
    ref = None
    if "random" in spec.families or test == "plateau":
        ref = resolve_reference(model, reference, spec.rows, where.site, where.layer, quiet)
        if reference is None:
            notes.append(
                "The random family's mean and covariance come from the prompts' own activations; pass "
                "reference=texts (or RefStats) with at least 10 x d_model activations for a good covariance."
            )
        notes.extend(ref.warnings)

    def mvn(k: int) -> torch.Tensor:
        return space(ref.sample_normal(k, gen)).float()

    fam = _family_activations(sae, spec, A, other, mvn, gen, notes)
    clean_ref = reference_rows(model, where, bases, top_k=1, run=quiet)
    floor = torch.tensor([float(kl_divergence(b.clean_logp, clean_ref[0][i])) for i, b in enumerate(bases)])
    typical = float((clean_ref[1] - clean_ref[1][other]).norm(dim=-1).median())
    if typical == 0:
        raise InputError("All prompts give the same read-site vector; use different prompts.")
    paths = _paths(spec, bases, A, fam.vectors, mvn)
    step_ref = (
        clean_ref if test == "blowup" else reference_rows(model, where, paths.bases, top_k=1, run=quiet)
    )
    l2, kl = _run_paths(model, spec, paths, step_ref, run)
    if float(floor.max()) > 1e-4:
        notes.append(
            f"The engine's unperturbed path differs from the clean run by up to {float(floor.max()):.2g} nats."
        )
    mvn_norm = float(mvn(max(256, n)).norm(dim=-1).median()) if ref is not None else float("nan")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return _result(model, sae, spec, fam, paths, A, l2, kl, floor, typical, mvn_norm, other, notes)


def _result(
    model, sae: SAE, spec: SyntheticSpec, fam: _Families, paths: _Paths, A, l2, kl, floor, typical: float,
    mvn_norm: float, other, notes: list[str],
) -> SyntheticTestResult:  # fmt: skip
    if spec.threshold_abs is not None:
        tau, frac = float(spec.threshold_abs), float(spec.threshold_abs) / typical
    else:
        tau, frac = float(spec.threshold) * typical, float(spec.threshold)
    most = int(max((fam.codes > 0).sum(-1).max(), (fam.codes_of > 0).sum(-1).max()))
    m = max(1, min(spec.max_latents, most))
    src = _sparse(fam.codes, m, fam.unit_decoder)
    twin = _sparse(fam.codes_of, m, fam.unit_decoder)
    start, target = paths.start, paths.target
    return SyntheticTestResult(
        test=spec.test,
        families=spec.families,
        l2=l2,
        kl=kl,
        steps=torch.arange(spec.n_steps),
        alphas=paths.alphas,
        reach=paths.reach,
        step_size=paths.step_size,
        typical_distance=typical,
        threshold=tau,
        threshold_fraction=frac,
        flat_slope=FLAT_SLOPE * typical,
        start=start.float().contiguous(),
        target=target.float().contiguous(),
        start_norm=start.norm(dim=-1).float(),
        target_norm=target.norm(dim=-1).float(),
        real_norm=float(A.norm(dim=-1).median()),
        mvn_norm=mvn_norm,
        source_latents=src[0],
        source_values=src[1],
        source_cos_to_top=src[2],
        twin_latents=twin[0],
        twin_values=twin[1],
        twin_cos_to_top=twin[2],
        reencoding=fam.reencoding,
        latent_frequency=fam.frequency.float().clone(),
        anchor_cosine=fam.anchor,
        single_latent_activation=fam.single,
        noise_floor=floor,
        prompts=spec.texts,
        sample_prompt=tuple(range(len(spec.rows))),
        other_prompt=tuple(int(o) for o in other),
        **dataclasses.asdict(spec.where),
        position=spec.position,
        sae=repr(sae),
        warnings=tuple(dict.fromkeys(notes)),
        provenance=spec.provenance(model, sae),
    )
