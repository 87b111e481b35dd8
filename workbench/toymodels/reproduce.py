"""Every number of the critique that the tutorial shows, computed at one of three profiles.

    from workbench.toymodels.reproduce import reproduce
    out = reproduce("cpu")              # about 10 minutes on 2 idle cores
    out.compare()                       # ours vs the paper, with the measured tolerances

Profiles (`PROFILES`): "full" is the critique's settings (82 trainings in the sigma sweep, 105k steps at
p = 0.001, 20k steps for the mechanism model); "cpu" trains every model with the paper's per-model recipe (10k
steps, batch 2048) but fewer of them (7 sigma values, 4 densities, steps capped at 20k); "ci" is the tests' and
CI's run in about a minute: the same calls with far fewer steps, so its tolerances are wider (the models are
undertrained) and say so. `notebooks/08_computation_in_superposition.ipynb` makes the same calls step by step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from workbench.core import CancelToken, Run
from workbench.errors import InputError
from workbench.toymodels import paper
from workbench.toymodels.analysis import mechanism, regime_steps, regimes, responses, sigma_sweep, transplant
from workbench.toymodels.baselines import naive_model, offset_model, offset_sweep, snmf_sweep
from workbench.toymodels.config import ToyConfig
from workbench.toymodels.data import bernoulli_batch, embed_mixing, embedding, generator
from workbench.toymodels.evaluate import default_ps, evaluate
from workbench.toymodels.train import train, train_many


@dataclasses.dataclass(frozen=True)
class Profile:
    """How much of the critique to run. Steps are per model; samples are non-empty evaluation samples."""

    steps: int  # the p = 0.01 models of the M-types figure
    residual_steps: int  # Braun et al.'s residual CC model
    sweep_sigmas: tuple[float, ...]
    sweep_steps: int
    mech_steps: int  # asymmetric sigma = 0.03 model of the mechanism figures (the sweep's when equal)
    transplant_steps: int
    snmf_sigmas: tuple[float, ...]
    regime_ps: tuple[float, ...]  # two regimes: training densities (asymmetric sigma = 0.02)
    dense_ps: tuple[float, ...]  # clean models trained at these densities (dense regime)
    max_steps: int | None  # cap on the critique's step rule base / (1 - (1 - p)^n)
    n_eval: int  # samples for the single numbers at p = 0.01
    n_sweep: int  # samples per sweep point
    n_curve: int  # samples per point of L/p-vs-p curves
    curve_points: int  # log-spaced densities 0.001..1 (a multiple of 3, plus 1, puts 0.01 on the grid)
    next_steps: int  # the "next experiment" (L4 loss, 500 features)


PROFILES: dict[str, Profile] = {
    "full": Profile(
        steps=10_000,
        residual_steps=10_000,
        sweep_sigmas=tuple(round(0.002 * i, 3) for i in range(41)),
        sweep_steps=10_000,
        mech_steps=20_000,
        transplant_steps=10_000,
        snmf_sigmas=(0.0, 0.005, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04),
        regime_ps=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
        dense_ps=(0.001, 0.01, 0.1, 1.0),
        max_steps=None,
        n_eval=1_000_000,
        n_sweep=1_000_000,
        n_curve=200_000,
        curve_points=40,
        next_steps=10_000,
    ),
    "cpu": Profile(
        steps=10_000,
        residual_steps=10_000,
        sweep_sigmas=(0.0, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08),
        sweep_steps=10_000,
        mech_steps=10_000,
        transplant_steps=10_000,
        snmf_sigmas=(0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04),
        regime_ps=(0.002, 0.01, 0.2, 1.0),
        dense_ps=(0.01, 0.1, 1.0),
        max_steps=20_000,
        n_eval=1_000_000,
        n_sweep=200_000,
        n_curve=100_000,
        curve_points=13,
        next_steps=2_000,
    ),
    "ci": Profile(
        steps=3_000,
        residual_steps=500,
        sweep_sigmas=(0.0, 0.03, 0.08),
        sweep_steps=1_000,
        mech_steps=1_000,
        transplant_steps=1_000,
        snmf_sigmas=(0.01, 0.03),
        regime_ps=(0.01, 1.0),
        dense_ps=(0.01, 1.0),
        max_steps=1_000,
        n_eval=100_000,
        n_sweep=50_000,
        n_curve=20_000,
        curve_points=7,
        next_steps=100,
    ),
}

MTYPES: dict[str, dict[str, Any]] = {
    "clean": dict(mixing="clean"),
    "embed_GI": dict(mixing="embed", embed_sign="G-I"),
    "embed_IG": dict(mixing="embed", embed_sign="I-G"),
    "sym_learned": dict(mixing="symmetric", sigma=0.01, learn_sigma=True),
    "asym_learned": dict(mixing="asymmetric", sigma=0.01, learn_sigma=True),
}
"""The models of the critique's M-types figure (learned sigma starts at 0.01), plus the exact-sign embedding."""


def get_profile(name: str | Profile) -> Profile:
    """The `Profile` called `name` ("full", "cpu" or "ci"), or `name` itself when it is one."""
    if isinstance(name, Profile):
        return name
    if name not in PROFILES:
        raise InputError(f"profile must be one of {', '.join(PROFILES)}, got {name!r}.")
    return PROFILES[name]


# -- sections: each returns ({quantity: value}, {name: result}) -----------------------------------------------


def analytic(P: Profile, seed: int = 0, run: Run | None = None):
    """Naive 1/12 by Monte Carlo, W_E W_E^T statistics, the all-zero fraction."""
    run = Run.of(run, progress=False)
    naive = evaluate(naive_model(), 0.01, n_samples=P.n_eval, seed=seed, run=run)
    w = embedding(100, 1000, generator(seed, "mixing"))
    g = w @ w.T
    off = ~torch.eye(100, dtype=torch.bool)
    eig = torch.linalg.eigvalsh(embed_mixing(w, "G-I").double())
    batch = bernoulli_batch(100_000, 100, 0.01, generator(seed, "data"))
    zero = 1 - len(torch.unique(batch.rows)) / batch.batch
    values = {
        "naive": float(naive.loss[0, 0]),
        "offdiag_std": float(g[off].std()),
        "eig_min_GI": float(eig.min()),
        "eig_max_GI": float(eig.max()),
        "zero_fraction": zero,
    }
    return values, {"naive": naive}


def mtypes(P: Profile, seed: int = 0, n_workers: int = 2, run: Run | None = None):
    """The four models of the M-types figure (and the exact-sign embedding, and the residual CC model)."""
    run = Run.of(run, progress=False)
    cfgs = {name: ToyConfig(steps=P.steps, seed=seed, **kw) for name, kw in MTYPES.items()}
    cfgs["residual"] = ToyConfig(model="residual", mixing="embed", steps=P.residual_steps, seed=seed)
    models = dict(zip(cfgs, train_many(list(cfgs.values()), n_workers=n_workers, run=run)))
    names = list(MTYPES)
    curves = evaluate([models[n] for n in names], default_ps(P.curve_points), n_samples=P.n_curve, own_p=True,
                      seed=seed, run=run)  # fmt: skip
    at01 = evaluate([models[n] for n in [*names, "residual"]], 0.01, n_samples=P.n_eval, seed=seed, run=run)
    values: dict[str, float] = {}
    for i, n in enumerate([*names, "residual"]):
        values[f"{n}_p01"] = float(at01.loss[i, 0])
    for i, n in enumerate(names):
        if n == "embed_IG":
            continue
        values[f"{n}_p001"] = curves.at(i, 0.001)
        values[f"{n}_p1"] = curves.at(i, 1.0)
        if n != "clean":
            values[f"{n}_cross"] = curves.crossing(i)
    values["sym_learned_sigma"] = models["sym_learned"].sigma
    values["asym_learned_sigma"] = models["asym_learned"].sigma
    values["embed_std"] = models["embed_GI"].mixing_std
    return values, {"models": models, "curves": curves, "at01": at01}


def sweep(P: Profile, seed: int = 0, n_workers: int = 2, run: Run | None = None):
    """L/p against a fixed sigma, symmetric and asymmetric."""
    run = Run.of(run, progress=False)
    sw = sigma_sweep(P.sweep_sigmas, ("symmetric", "asymmetric"), base=ToyConfig(steps=P.sweep_steps, seed=seed),
                     n_samples=P.n_sweep, n_workers=n_workers, seed=seed, run=run)  # fmt: skip
    values = {"sweep_zero": float(sw.loss[:, 0].mean()) if P.sweep_sigmas[0] == 0 else math.nan}
    for kind, short in (("symmetric", "sym"), ("asymmetric", "asym")):
        s_min, l_min = sw.minimum(kind)
        values[f"sweep_{short}_min"] = l_min
        values[f"sweep_{short}_argmin"] = s_min
        values[f"sweep_{short}_cross"] = sw.crossing(kind)
        if 0.08 in P.sweep_sigmas:
            values[f"sweep_{short}_008"] = float(sw.loss[sw.kinds.index(kind), P.sweep_sigmas.index(0.08)])
    if len(P.sweep_sigmas) < 5:  # too few points for a minimum's position or a crossing
        for short in ("sym", "asym"):
            values.pop(f"sweep_{short}_argmin")
            values.pop(f"sweep_{short}_cross")
    return {k: v for k, v in values.items() if not math.isnan(v)}, {"sweep": sw}


def mechanism_model(P: Profile, seed: int = 0, sw=None, run: Run | None = None):
    """The asymmetric sigma = 0.03 model (the sweep's when it has one with the same steps) and its mechanism."""
    if sw is not None and P.mech_steps == P.sweep_steps and 0.03 in P.sweep_sigmas:
        model = sw.model("asymmetric", 0.03)
    else:
        model = train(ToyConfig(mixing="asymmetric", sigma=0.03, steps=P.mech_steps, seed=seed), run=run)
    mech = mechanism(model)
    d = mech.d_mlp
    values = {
        "eig_cos_top": mech.mean_cos(0, d - 10),
        "eig_cos_tail": mech.mean_cos(d + 10, len(mech.eig_cos)),
        "offdiag_slope": mech.offdiag_slope,
        "diag_slope": mech.diag_slope,
        "diag_intercept": mech.diag_intercept,
    }
    return values, {"model": model, "mechanism": mech}


def transplant_section(P: Profile, model, seed: int = 0, run: Run | None = None):
    """The embedding-like model fine-tuned on M = 0 (the model whose second phase the critique plots)."""
    tr = transplant(model, steps=P.transplant_steps, n_samples=P.n_eval, seed=seed, run=run)
    return {"transplant_after": tr.clean_after}, {"transplant": tr}


def snmf_section(P: Profile, seed: int = 0, run: Run | None = None):
    """Semi-NMF baselines (both orientations, both evaluations) and the naive weights on noisy labels."""
    run = Run.of(run, progress=False)
    sn = snmf_sweep(P.snmf_sigmas, n_samples=P.n_curve, mixing_seed=seed, run=run)
    values = {
        f"snmf_{s:g}": sn.at("code, one-hot eval", s) for s in P.snmf_sigmas if f"snmf_{s:g}" in paper.PAPER
    }
    for s in (0.01, 0.03):
        if s in P.snmf_sigmas:
            values[f"naive_noisy_{s:g}"] = float(sn.naive_noisy[P.snmf_sigmas.index(s)])
    embed = evaluate(naive_model(mixing="embed", embed_sign="G-I", seed=seed), 0.01, n_samples=P.n_curve, seed=seed,
                     run=run)  # fmt: skip
    values["naive_noisy_embed"] = float(embed.loss[0, 0])
    return values, {"snmf": sn}


def dense_section(P: Profile, seed: int = 0, n_workers: int = 2, run: Run | None = None):
    """Naive + offset (analytic, Monte Carlo check) and clean models trained at several densities."""
    run = Run.of(run, progress=False)
    off = offset_sweep((0.001, 0.01, 0.1, 1.0), n_samples=P.n_curve, seed=seed, run=run)
    cfgs = [ToyConfig(p=q, steps=regime_steps(q, 100, P.steps, P.max_steps), seed=seed) for q in P.dense_ps]
    models = train_many(cfgs, n_workers=n_workers, run=run)
    models = [dataclasses.replace(m, label=f"clean, trained at p={m.p:g}") for m in models]
    offsets = [offset_model(float(off.best_b[i]), p=float(off.p[i])) for i in range(len(off.p))]
    offsets = [
        dataclasses.replace(m, label=f"naive + offset b={m.W_out[0, -1]:.4f} (best at p={m.p:g})")
        for m in offsets
    ]
    curves = evaluate([*models, *offsets], default_ps(P.curve_points), n_samples=P.n_curve, own_p=True, seed=seed,
                      run=run)  # fmt: skip
    values = {}
    for q, key in ((0.1, "p0.1"), (1.0, "p1")):
        b, _analytic, mc = off.at(q)
        values[f"offset_b_{key}"], values[f"offset_loss_{key}"] = b, mc
    if 1.0 in P.dense_ps:
        values["clean_trained_p1"] = float(curves.own_loss[list(P.dense_ps).index(1.0)])
    return values, {"offsets": off, "models": models, "curves": curves}


def regimes_section(P: Profile, seed: int = 0, n_workers: int = 2, run: Run | None = None):
    """Two regimes (asymmetric sigma = 0.02): one model per training density, each evaluated everywhere."""
    curves = regimes(P.regime_ps, base=ToyConfig(mixing="asymmetric", sigma=0.02, seed=seed), max_steps=P.max_steps,
                     eval_ps=default_ps(P.curve_points), n_samples=P.n_curve, n_workers=n_workers, seed=seed,
                     run=run)  # fmt: skip
    values = {}
    for i, q in enumerate(P.regime_ps):
        key = f"regime_{q:g}"
        if key in paper.PAPER:
            values[key] = float(curves.own_loss[i])
    cfg_sparse = ToyConfig(mixing="asymmetric", sigma=0.02, seed=seed, p=P.regime_ps[0],
                           steps=regime_steps(P.regime_ps[0], 100, 10_000, P.max_steps))  # fmt: skip
    cfg_dense = cfg_sparse.replace(
        p=P.regime_ps[-1], steps=regime_steps(P.regime_ps[-1], 100, 10_000, P.max_steps)
    )
    sparse, dense = train(cfg_sparse, run=run), train(cfg_dense, run=run)  # cached by regimes()
    r_sparse, r_dense = responses(sparse), responses(dense)
    values["sparse_slope_median"] = float(r_sparse.slope_pos.median())
    values["dense_features_above_half"] = float((r_dense.slope_pos > 0.5).sum())
    return values, {"curves": curves, "sparse": r_sparse, "dense": r_dense}


@dataclasses.dataclass(frozen=True)
class Reproduction:
    """The numbers (`values`) and results of one `reproduce` run."""

    profile: str
    seed: int
    values: dict[str, float]
    results: dict[str, dict[str, Any]]

    def compare(self):
        """Ours vs the paper (a DataFrame; `within` where the difference is inside the measured tolerance)."""
        known = {k: v for k, v in self.values.items() if k in paper.PAPER}
        return paper.compare(known, self.profile)


SECTIONS = ("analytic", "mtypes", "sweep", "mechanism", "transplant", "snmf", "dense", "regimes")


def reproduce(
    profile: str = "cpu",
    *,
    seed: int = 0,
    n_workers: int = 2,
    sections: Sequence[str] = SECTIONS,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> Reproduction:
    """Compute the critique's numbers at `profile` ("ci", "cpu" or "full"); see the module docstring."""
    P = get_profile(profile)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise InputError(f"Unknown sections {sorted(unknown)}; sections: {', '.join(SECTIONS)}.")
    run = Run.of(run, progress=progress, cancel=cancel)
    values: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}

    def add(name, out):
        values.update(out[0])
        results[name] = out[1]

    if "analytic" in sections:
        add("analytic", analytic(P, seed, run))
    if "mtypes" in sections or "transplant" in sections:
        add("mtypes", mtypes(P, seed, n_workers, run))
    sw = None
    if "sweep" in sections or "mechanism" in sections:
        add("sweep", sweep(P, seed, n_workers, run))
        sw = results["sweep"]["sweep"]
    if "mechanism" in sections:
        add("mechanism", mechanism_model(P, seed, sw, run))
    if "transplant" in sections:
        add("transplant", transplant_section(P, results["mtypes"]["models"]["embed_GI"], seed, run))
    if "snmf" in sections:
        add("snmf", snmf_section(P, seed, run))
    if "dense" in sections:
        add("dense", dense_section(P, seed, n_workers, run))
    if "regimes" in sections:
        add("regimes", regimes_section(P, seed, n_workers, run))
    return Reproduction(profile=profile if isinstance(profile, str) else "custom", seed=seed, values=values,
                        results=results)  # fmt: skip


def quantities(profile: str | Profile = "cpu") -> list[str]:
    """The names (keys of `paper.PAPER`) of every number `reproduce` and the notebook compare at `profile`."""
    P = get_profile(profile)
    names = ["naive", "offdiag_std", "eig_min_GI", "eig_max_GI", "zero_fraction"]
    for n in ("clean", "embed_GI", "sym_learned", "asym_learned"):
        names += [f"{n}_p01", f"{n}_p001", f"{n}_p1"]
    names += ["embed_IG_p01", "embed_GI_cross", "sym_learned_cross", "asym_learned_cross"]
    names += [
        "sym_learned_sigma",
        "asym_learned_sigma",
        "embed_std",
        "sweep_zero",
        "sweep_sym_min",
        "sweep_asym_min",
    ]
    if len(P.sweep_sigmas) >= 5:
        names += ["sweep_sym_argmin", "sweep_sym_cross", "sweep_asym_argmin", "sweep_asym_cross"]
    if 0.08 in P.sweep_sigmas:
        names += ["sweep_sym_008", "sweep_asym_008"]
    names += [
        "transplant_after",
        "eig_cos_top",
        "eig_cos_tail",
        "offdiag_slope",
        "diag_slope",
        "diag_intercept",
    ]
    names += [f"snmf_{s:g}" for s in P.snmf_sigmas if f"snmf_{s:g}" in paper.PAPER]
    names += [f"naive_noisy_{s:g}" for s in (0.01, 0.03) if s in P.snmf_sigmas] + ["naive_noisy_embed"]
    names += ["offset_b_p0.1", "offset_loss_p0.1", "offset_b_p1", "offset_loss_p1"]
    if 1.0 in P.dense_ps:
        names.append("clean_trained_p1")
    names += [f"regime_{q:g}" for q in P.regime_ps if f"regime_{q:g}" in paper.PAPER]
    names += ["sparse_slope_median", "dense_features_above_half"]
    return names
