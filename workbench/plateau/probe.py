"""`probe`: push real (or synthetic) activations along families of directions and record the output change."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from workbench.core import CancelToken, ProgressCallback, Run, positive_size
from workbench.core.tables import grid_index
from workbench.errors import InputError
from workbench.plateau import directions as dirs
from workbench.plateau import metrics
from workbench.plateau.core import (
    Base,
    SiteLabels,
    Where,
    clean_bases,
    kl_divergence,
    reference_rows,
    resolve_positions,
    run_rows,
)
from workbench.plateau.stats import RefStats, as_token_rows, prompt_texts, resolve_reference
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

DEFAULT_FAMILIES = ("isotropic", "cov_random", "cov_mixture", "toward_real", "real_mixture")
BASE_KINDS = {
    "real": "the model's own activation at the position",
    "cov_random": "a sample of N(mean, cov) of real activations put in its place (the plateau test's control)",
}
KL_THRESHOLD = 0.1
"""Default plateau threshold on KL, in nats: the size where the next-token distribution has clearly changed."""
L2_THRESHOLD = 0.1
"""Default plateau threshold on the read-site L2 distance, as a fraction of the read site's typical norm."""
FLOAT_NOISE_WARN = 1e-4
"""Warn when the unperturbed path's KL to the clean run (the noise floor) exceeds this many nats."""


def default_sizes() -> torch.Tensor:
    """0 to 1 x the median norm in 32 equal steps (33 sizes)."""
    return torch.linspace(0, 1, 33)


@dataclasses.dataclass(frozen=True)
class PlateauResult(SiteLabels, Result):
    """Output change against perturbation size, for every base activation and direction.

    Axes: base (one per prompt x position x base kind), direction (families concatenated in order), size.

    Attributes:
        kl: [base, direction, size] KL(unperturbed || perturbed) of the next-token distribution at the perturbed
            position, nats, float32. "Unperturbed" is the base run through the same path (for real bases, the
            clean run; `noise_floor` is their difference).
        l2: [base, direction, size] L2 distance of the read site's activation at that position.
        top_ids, top_probs: [base, direction, size, k] the k most likely next tokens and their probabilities.
        ref_top_ids, ref_top_probs: [base, k] the same, unperturbed.
        x0: [base, d_model] the activation each base starts from (float32).
        directions: [base, direction, d_model] the unit directions.
        sizes: [size] perturbation sizes in units of `scale`; the activation written is x0 + sizes * scale * d.
        scale: the unit of `sizes` in L2 (by default the median norm of real activations at the site).
        scale_label: what `scale` is, for axis titles.
        read_scale: the median L2 norm of the read site's unperturbed activations over the real bases.
        families: [direction] the family of each direction.
        base_kind, base_prompt, base_position, base_token: [base] labels.
        noise_floor: [base] KL(clean run || unperturbed probe path); NaN for synthetic bases.
        prompts: the prompts as text.
        token_strings: {token id: string} for every id in top_ids / ref_top_ids.
        site, layer, read_site, read_layer: where the perturbation was written and the L2 read.
        warnings: pitfalls met during the run (also raised as Python warnings).
    """

    kl: torch.Tensor
    l2: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    ref_top_ids: torch.Tensor
    ref_top_probs: torch.Tensor
    x0: torch.Tensor
    directions: torch.Tensor
    sizes: torch.Tensor
    scale: float
    scale_label: str
    read_scale: float
    families: tuple[str, ...]
    base_kind: tuple[str, ...]
    base_prompt: tuple[int, ...]
    base_position: tuple[int, ...]
    base_token: tuple[str, ...]
    noise_floor: torch.Tensor
    prompts: tuple[str, ...]
    token_strings: dict[int, str]
    site: str
    layer: int
    read_site: str
    read_layer: int | None
    warnings: tuple[str, ...]
    provenance: Provenance

    # -- labels ------------------------------------------------------------------------------------------
    @property
    def family_names(self) -> list[str]:
        """Families in order of first appearance."""
        return list(dict.fromkeys(self.families))

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(self.base_kind))

    def group_of(self, base: int, direction: int) -> str:
        """The comparison group of a curve: its family, plus the base kind when several kinds were run."""
        fam = self.families[direction]
        return fam if len(self.kinds) == 1 else f"{fam} @ {self.base_kind[base]} base"

    def groups(self) -> list[str]:
        return list(
            dict.fromkeys(
                self.group_of(b, d) for b in range(len(self.base_kind)) for d in range(len(self.families))
            )
        )

    def base_label(self, base: int) -> str:
        kind = "" if self.base_kind[base] == "real" else f" ({self.base_kind[base]} base)"
        return (
            f"prompt {self.base_prompt[base]}, pos {self.base_position[base]} {self.base_token[base]!r}{kind}"
        )

    # -- curves and their summaries ---------------------------------------------------------------------
    def curves(self, metric: str = "kl") -> torch.Tensor:
        """[base, direction, size] curves of `metric` ("kl" or "l2")."""
        return metrics.choose(metric, {"kl": self.kl, "l2": self.l2})

    def default_threshold(self, metric: str = "kl") -> float:
        """`KL_THRESHOLD` nats for KL; `L2_THRESHOLD` x `read_scale` for L2."""
        self.curves(metric)
        return KL_THRESHOLD if metric == "kl" else L2_THRESHOLD * self.read_scale

    def plateau_length(self, metric: str = "kl", threshold: float | None = None) -> torch.Tensor:
        """[base, direction] size (in units of `scale`) where the curve first exceeds `threshold`; inf if never."""
        threshold = self.default_threshold(metric) if threshold is None else threshold
        return metrics.plateau_length(self.curves(metric), self.sizes, threshold)

    def max_slope(self, metric: str = "kl") -> tuple[torch.Tensor, torch.Tensor]:
        """([base, direction] steepest slope, [base, direction] size where it happens)."""
        return metrics.max_slope(self.curves(metric), self.sizes)

    def sharpness(self, metric: str = "kl") -> torch.Tensor:
        """[base, direction] max slope / mean slope over the sweep (1 = straight line, large = step)."""
        return metrics.sharpness(self.curves(metric), self.sizes)

    def _by_group(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, list[float]] = {}
        for b in range(values.shape[0]):
            for d in range(values.shape[1]):
                out.setdefault(self.group_of(b, d), []).append(float(values[b, d]))
        return {k: torch.tensor(v) for k, v in out.items()}

    def compare(self, baseline: str = "cov_mixture", metric: str = "kl", threshold: float | None = None):
        """Plateau lengths per group against `baseline` (Mann-Whitney U and Kolmogorov-Smirnov); a DataFrame.

        `p_greater` is the probability that a curve of the group has a longer plateau than one of the baseline
        (0.5: no difference). Lengths are in units of `scale`; curves that never cross count as longest.
        """
        lengths = self._by_group(self.plateau_length(metric, threshold))
        frame = metrics.compare_samples(lengths, baseline)
        sharp = self._by_group(self.sharpness(metric))
        frame.insert(6, "median_sharpness", [float(torch.nanmedian(sharp[g])) for g in frame["group"]])
        return frame.rename(columns={"median": "median_length", "q25": "q25_length", "q75": "q75_length"})

    # -- tables --------------------------------------------------------------------------------------------
    def tokens_along(self, base: int = 0, direction: int = 0, k: int = 3):
        """What the model predicts along one curve: a DataFrame, one row per size (size 0: unperturbed)."""
        import pandas as pd

        rows = [{"size": 0.0, "kl": 0.0, **self._top(self.ref_top_ids[base], self.ref_top_probs[base], k)}]
        for j, s in enumerate(self.sizes.tolist()):
            if s == 0:
                continue
            top = self._top(self.top_ids[base, direction, j], self.top_probs[base, direction, j], k)
            rows.append({"size": s, "kl": float(self.kl[base, direction, j]), **top})
        return pd.DataFrame(rows)

    def _top(self, ids: torch.Tensor, probs: torch.Tensor, k: int) -> dict[str, Any]:
        out = {}
        for i in range(min(k, len(ids))):
            out[f"top{i + 1}"] = self.token_strings.get(int(ids[i]), str(int(ids[i])))
            out[f"p{i + 1}"] = float(probs[i])
        return out

    def to_frame(self):
        """Tidy table: one row per (base, direction, size) with kl, l2, the top token and all labels."""
        import pandas as pd

        b, d, s = grid_index(self.kl.shape)
        sizes = self.sizes[s]
        top1 = self.top_ids[b, d, s, 0]
        return pd.DataFrame(
            {
                "base": b.numpy(),
                "base_kind": [self.base_kind[i] for i in b.tolist()],
                "prompt": [self.base_prompt[i] for i in b.tolist()],
                "position": [self.base_position[i] for i in b.tolist()],
                "direction": d.numpy(),
                "family": [self.families[i] for i in d.tolist()],
                "size": sizes.numpy(),
                "size_l2": (sizes * self.scale).numpy(),
                "kl": self.kl[b, d, s].numpy(),
                "l2": self.l2[b, d, s].numpy(),
                "top1": [self.token_strings.get(int(t), str(int(t))) for t in top1],
                "top1_prob": self.top_probs[b, d, s, 0].numpy(),
            }
        )

    def __repr__(self) -> str:
        n_b, n_d, n_s = self.kl.shape
        return (
            f"PlateauResult({self.site_label}, {n_b} bases x {n_d} directions ({', '.join(self.family_names)}) "
            f"x {n_s} sizes up to {float(self.sizes[-1]):.3g} x {self.scale:.4g})"
        )


# ---------------------------------------------------------------------------------------------------------------


def _check_sizes(sizes) -> torch.Tensor:
    sizes = default_sizes() if sizes is None else torch.as_tensor(sizes, dtype=torch.float32).flatten()
    if len(sizes) < 2:
        raise InputError("Give at least two sizes.")
    if not torch.isfinite(sizes).all() or bool((sizes < 0).any()):
        raise InputError("Sizes must be finite and >= 0 (to push the other way, negate the directions).")
    if not bool((sizes[1:] > sizes[:-1]).all()):
        raise InputError("Sizes must increase strictly.")
    return sizes


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """A plateau probe resolved and checked before any model runs (see `probe` for the arguments).

    rows: the prompts as [1, pos] token tensors; pos_lists: the perturbed positions of each; user: the user's
    directions by family name; notes: pitfalls found while checking (raised as warnings by `probe`).
    """

    where: Where
    rows: tuple[torch.Tensor, ...]
    texts: tuple[str, ...]
    pos_lists: tuple[tuple[int, ...], ...]
    positions: Any
    families: tuple[str, ...]
    user: dict[str, torch.Tensor]
    n_directions: int
    sizes: torch.Tensor
    scale: float | None
    bases: tuple[str, ...]
    top_k: int
    seed: int
    notes: tuple[str, ...]

    @classmethod
    def resolve(
        cls,
        model,
        prompts,
        *,
        layer,
        site,
        positions,
        families,
        directions,
        n_directions,
        sizes,
        scale,
        bases,
        read_site,
        read_layer,
        top_k,
        seed,
    ) -> ProbeSpec:
        where = Where.resolve(model, site, layer, read_site, read_layer)
        families = tuple(families)
        unknown = [f for f in families if f not in dirs.FAMILIES]
        if unknown:
            raise InputError(f"Unknown direction families {unknown}; families: {', '.join(dirs.FAMILIES)}.")
        user = dirs.check_user_directions(directions, model.cfg.d_model)
        if not families and not user:
            raise InputError("No directions: choose at least one family or give directions={name: tensor}.")
        if len(set(families)) != len(families):
            raise InputError("A family is listed twice.")
        n_directions = positive_size(n_directions, "n_directions", allow_none=False)
        bases = tuple(bases)
        if not bases or any(b not in BASE_KINDS for b in bases) or len(set(bases)) != len(bases):
            raise InputError(f"bases must be a non-empty selection of {', '.join(BASE_KINDS)}, got {bases}.")
        sizes = _check_sizes(sizes)
        if not isinstance(top_k, int) or not 1 <= top_k <= model.cfg.d_vocab:
            raise InputError(f"top_k must be an integer in 1..{model.cfg.d_vocab}.")
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise InputError(f"scale must be a positive finite number of L2 units, got {scale!r}.")
        if scale is not None and not bool(torch.isfinite(sizes * float(scale)).all()):
            raise InputError("sizes x scale overflows: give smaller sizes or a smaller scale.")
        rows = as_token_rows(model, prompts)
        notes: list[str] = []
        pos_lists = []
        for i, r in enumerate(rows):
            pos, asked_zero = resolve_positions(positions, r.shape[-1])
            if asked_zero:
                notes.append(
                    f"Prompt {i}: position 0 is perturbed. Its activation is an outlier (an attention sink with a "
                    "very large norm); plateau statistics there say little about other positions."
                )
            pos_lists.append(tuple(pos))
        if model.dtype in (torch.bfloat16, torch.float16):
            notes.append(
                f"The model runs in {str(model.dtype).removeprefix('torch.')}: rounding puts a noise floor under "
                "small KLs and small perturbations can vanish, which can fake or hide a plateau. Load the model "
                "in float32 for plateau probes if you can (see noise_floor)."
            )
        texts = prompt_texts(model, rows, prompts)
        scale = None if scale is None else float(scale)
        return cls(
            where, tuple(rows), texts, tuple(pos_lists), positions, families, user, n_directions, sizes,
            scale, bases, top_k, seed, tuple(notes),
        )  # fmt: skip

    @property
    def needs_reference(self) -> bool:
        """Whether reference statistics of real activations are needed (covariance, samples, or the scale)."""
        needs = dirs.NEEDS_COVARIANCE + dirs.NEEDS_SAMPLE
        return any(f in needs for f in self.families) or "cov_random" in self.bases or self.scale is None

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(prompt, position) of every real base, in order."""
        return [(i, p) for i, pos in enumerate(self.pos_lists) for p in pos]

    @property
    def family_of_direction(self) -> list[str]:
        return [f for f in self.families for _ in range(self.n_directions)] + [
            n for n, v in self.user.items() for _ in v
        ]

    def provenance(self, model, scale: float) -> Provenance:
        w = self.where
        p = self.positions
        return Provenance.capture(
            model.name,
            prompts=list(self.texts),
            layer=w.layer,
            site=w.site,
            positions=p if isinstance(p, (int, str)) else list(p),
            families=list(self.families),
            user_directions={k: int(len(v)) for k, v in self.user.items()},
            n_directions=self.n_directions,
            sizes=self.sizes.tolist(),
            scale=float(scale),
            bases=list(self.bases),
            read_site=w.read_site,
            read_layer=w.read_layer,
            seed=self.seed,
            model_dtype=str(model.dtype),
        )


def probe(
    model,
    prompts,
    *,
    layer: int = 1,
    site: str = "resid_pre",
    positions: int | Sequence[int] | str = -1,
    families: Sequence[str] = DEFAULT_FAMILIES,
    directions: dict[str, torch.Tensor] | torch.Tensor | None = None,
    n_directions: int = 16,
    sizes: Sequence[float] | torch.Tensor | None = None,
    scale: float | None = None,
    reference: RefStats | Any = None,
    bases: Sequence[str] = ("real",),
    read_site: str = "resid_post",
    read_layer: int | None = -1,
    top_k: int = 5,
    seed: int = 0,
    memory_budget: int | float | str | None = None,
    progress: bool | ProgressCallback = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> PlateauResult:
    """Perturb activations at one site along families of directions and record how the output changes.

    For each prompt and position (a *base*), the activation x0 at `site` of `layer` is replaced by
    x0 + s * scale * d for every unit direction d and size s, the rest of the model runs, and the result records
    KL(unperturbed || perturbed) of the next-token distribution at that position (nats, float32) and the L2
    distance of `read_site` there. All directions x sizes run as large batches from the write layer onward.

    Args:
        model: a `WorkbenchModel` (transformer).
        prompts: a text, texts (any lengths) or a [batch, pos] token tensor.
        layer, site: where to perturb (default: resid_pre of layer 1, the residual after block 0).
        positions: an int (default -1, the last token), a list, or a word of `workbench.core.selectors`
            ("all-but-first": every position except 0, whose activation is an outlier; "each"; "last").
        families: built-in direction families (see `workbench.plateau.directions.FAMILIES`).
        directions: your own directions as {name: [k, d_model]} (e.g. SAE decoder rows); each row is normalised
            to unit length and becomes a family of its own, the same directions for every base.
        n_directions: directions drawn per built-in family and base.
        sizes: perturbation sizes in units of `scale`, increasing, >= 0 (default 0..1 in 33 steps).
        scale: the L2 length of size 1 (default: the median norm of real activations at the site).
        reference: `RefStats` for the site, or texts / tokens to compute them from (`reference_stats`). None uses
            the prompts' own activations (with a warning: too few for a good covariance).
        bases: "real" (the model's activations) and/or "cov_random" (a sample of N(mean, cov) put in their place:
            the control of the plateau test, "are real activations more stable than random ones?").
        read_site, read_layer: the later activation whose L2 distance is recorded (default: the last resid_post).
        top_k: top tokens kept per run (shown along curves).
        seed: seeds every random draw (directions and synthetic bases).
        memory_budget: bytes or "2GB" per chunk of rows (default: a quarter of free memory).
        progress: True for a progress bar, or a callback(done, total).
        cancel: a `workbench.core.CancelToken`. run: a `workbench.core.Run` carrying these settings instead.
    """
    spec = ProbeSpec.resolve(
        model, prompts, layer=layer, site=site, positions=positions, families=families,
        directions=directions, n_directions=n_directions, sizes=sizes, scale=scale, bases=bases,
        read_site=read_site, read_layer=read_layer, top_k=top_k, seed=seed,
    )  # fmt: skip
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget)
    notes = list(spec.notes)
    ref = None
    if spec.needs_reference:
        ref = resolve_reference(model, reference, spec.rows, spec.where.site, spec.where.layer, run)
        notes.extend(ref.warnings)
    if spec.scale is None:
        scale, scale_label = ref.median_norm, f"median ‖{spec.where.label()}‖ = {ref.median_norm:.4g}"
    else:
        scale = spec.scale
        scale_label = "L2 units" if scale == 1 else f"{scale:.4g} L2 units"
    all_bases, labels, D = _bases_and_directions(model, spec, ref, run)
    ref_logp, ref_read, floor = _reference_runs(model, spec, all_bases, run)
    if bool((floor > FLOAT_NOISE_WARN).any()):
        notes.append(
            f"The unperturbed probe path differs from the clean run by up to {float(floor.nanmax()):.2g} nats of "
            "KL (numerical noise): KLs below that are not meaningful."
        )
    grids = _perturbed_runs(model, spec, all_bases, D, scale, (ref_logp, ref_read), run)
    notes.extend(_non_finite_notes(grids["kl"], spec.sizes, labels))
    ref_top = ref_logp.topk(spec.top_k, dim=-1)
    ids = torch.unique(torch.cat([grids["top_ids"].flatten(), ref_top.indices.flatten()])).tolist()
    real = [j for j, (k, _, _) in enumerate(labels) if k == "real"] or list(range(len(all_bases)))
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return PlateauResult(
        **grids,
        ref_top_ids=ref_top.indices,
        ref_top_probs=ref_top.values.exp(),
        x0=torch.stack([b.x0 for b in all_bases]),
        directions=D,
        sizes=spec.sizes,
        scale=float(scale),
        scale_label=scale_label,
        read_scale=float(ref_read[real].norm(dim=-1).median()),
        families=tuple(spec.family_of_direction),
        base_kind=tuple(k for k, _, _ in labels),
        base_prompt=tuple(i for _, i, _ in labels),
        base_position=tuple(p for _, _, p in labels),
        base_token=tuple(_token(model, spec.rows[i][0, p]) for _, i, p in labels),
        noise_floor=floor,
        prompts=spec.texts,
        token_strings={i: model.tokenizer.decode([i]) for i in ids} if model.tokenizer is not None else {},
        **dataclasses.asdict(spec.where),
        warnings=tuple(dict.fromkeys(notes)),
        provenance=spec.provenance(model, scale),
    )


def _bases_and_directions(model, spec: ProbeSpec, ref: RefStats | None, run: Run):
    """Clean runs of every prompt, synthetic bases put in their place, and the directions of every base.

    Returns (bases, labels [(kind, prompt, position)], directions [base, direction, d_model]). Each cell gets
    the same direction draws for every base kind, so comparisons between kinds are paired.
    """
    clean = clean_bases(model, spec.where, spec.rows, spec.pos_lists, run=run)
    cells = spec.cells
    base_gen = torch.Generator().manual_seed(spec.seed + 7919)
    all_bases: list[Base] = []
    labels: list[tuple[str, int, int]] = []
    for kind in spec.bases:
        for (i, p), b in zip(cells, clean):
            if kind == "real":
                all_bases.append(b)
            else:
                x0 = ref.sample_normal(1, base_gen)[0]
                all_bases.append(dataclasses.replace(b, x0=x0, clean_logp=None))
            labels.append((kind, i, p))
    dir_sets = []
    for (_, i, p), b in zip(labels, all_bases):
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + cells.index((i, p)))
        parts = [dirs.draw(f, spec.n_directions, b.x0, ref, gen) for f in spec.families] + list(
            spec.user.values()
        )
        dir_sets.append(torch.cat(parts))
    return all_bases, labels, torch.stack(dir_sets)


def _reference_runs(model, spec: ProbeSpec, all_bases: list[Base], run: Run):
    """Each base unperturbed through the probe path: log-probs [base, d_vocab], read [base, d_read], and the noise
    floor [base] KL(clean run || that path) (NaN for synthetic bases)."""
    ref_logp, ref_read = reference_rows(model, spec.where, all_bases, top_k=spec.top_k, run=run.quiet())
    floor = torch.tensor(
        [
            float(kl_divergence(b.clean_logp, ref_logp[j])) if b.clean_logp is not None else float("nan")
            for j, b in enumerate(all_bases)
        ]
    )
    return ref_logp, ref_read, floor


def _perturbed_runs(model, spec: ProbeSpec, all_bases, D, scale: float, reference, run: Run) -> dict:
    """kl, l2 [base, direction, size] and top_ids, top_probs [base, direction, size, k] of every perturbed run
    (size 0 is the unperturbed reference, not run again)."""
    sizes = spec.sizes
    nonzero = torch.nonzero(sizes > 0).flatten()
    n_b, n_d, n_s = len(all_bases), D.shape[1], len(nonzero)
    order = sorted(range(n_b), key=lambda j: len(all_bases[j].tokens))
    per_base = n_d * n_s
    base_of_row = torch.tensor(order).repeat_interleave(per_base)
    x0s = torch.stack([b.x0 for b in all_bases])
    step = sizes[nonzero] * scale

    def vectors(start: int, stop: int) -> torch.Tensor:
        r = torch.arange(start, stop)
        b = base_of_row[r]
        d, s = (r % per_base) // n_s, r % n_s
        return x0s[b] + step[s, None] * D[b, d]

    out = run_rows(
        model, spec.where, all_bases, base_of_row, vectors, reference=reference, top_k=spec.top_k,
        run=run, desc="plateau probe",
    )  # fmt: skip

    def place(values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Rows (in run order) -> [base, direction, size, ...], with size-0 entries from `fill` [base, ...]."""
        tail = values.shape[1:]
        grid = torch.empty((n_b, n_d, len(sizes), *tail), dtype=values.dtype)
        grid[torch.tensor(order)[:, None, None], torch.arange(n_d)[:, None], nonzero] = values.reshape(
            n_b, n_d, n_s, *tail
        )
        zero = torch.nonzero(sizes == 0).flatten()
        if len(zero):
            grid[:, :, zero] = fill[:, None, None].expand(n_b, n_d, len(zero), *tail).to(values.dtype)
        return grid

    ref_top = reference[0].topk(spec.top_k, dim=-1)
    return {
        "kl": place(out["kl"], torch.zeros(n_b)),
        "l2": place(out["l2"], torch.zeros(n_b)),
        "top_ids": place(out["top_ids"], ref_top.indices),
        "top_probs": place(out["top_probs"], ref_top.values.exp()),
    }


def _non_finite_notes(kl: torch.Tensor, sizes: torch.Tensor, labels) -> list[str]:
    """A sentence when some KLs are not finite: where they first appear (the activations overflowed)."""
    bad = ~torch.isfinite(kl)
    if not bool(bad.any()):
        return []
    first_size = int(bad.any(0).any(0).nonzero()[0])
    b = int(bad[:, :, first_size].any(1).nonzero()[0])
    kind, prompt, pos = labels[b]
    return [
        f"{int(bad.sum())} of {bad.numel()} KL values are not finite (NaN or inf), first at size "
        f"{float(sizes[first_size]):.4g} on prompt {prompt}, position {pos} ({kind} base): the perturbed "
        "activations overflow or the model's weights are not finite. Those curves' plateau lengths are NaN; "
        "use smaller sizes or scale."
    ]


def _token(model, token_id) -> str:
    if model.tokenizer is None:
        return str(int(token_id))
    return model.tokenizer.decode([int(token_id)])
