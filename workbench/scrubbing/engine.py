"""The resample-ablation engine behind `workbench.scrubbing` (see the package docstring for the method)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import nnsight
import torch

from workbench.core import CancelToken, Run
from workbench.core.selectors import renamed
from workbench.errors import InputError, SiteError, UnsupportedModelError
from workbench.models.model import WorkbenchModel
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.

# ---------------------------------------------------------------------------------------------------------------
# donor samplers


@dataclasses.dataclass(frozen=True, eq=False)
class DonorSampler:
    """How each input picks the donor whose activation replaces its own. Build one with the functions below.

    `draw(n, generator)` returns LongTensor [n]: the donor index for each of the n inputs.
    """

    kind: str
    values: torch.Tensor | None = None
    """same_value: the feature per input [n] or [n, k]; nearest_value: a scalar per input [n]; fixed: donors."""
    noise: float = 0.0

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.values is not None and len(self.values) != n:
            raise InputError(
                f"the {self.kind} donor sampler was built for {len(self.values)} inputs but scrub() got {n}; "
                "build it from values for exactly the inputs you scrub"
            )
        if self.kind == "random":
            return torch.randperm(n, generator=generator)
        if self.kind == "fixed":
            return self.values.long()
        if self.kind == "same":
            return _within_groups(self.values, generator)
        if self.kind == "nearest":
            return _nearest(self.values, self.noise, generator)
        raise InputError(f"unknown donor sampler kind {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "random":
            return "any input"
        if self.kind == "fixed":
            return "given donors"
        if self.kind == "same":
            return "an input with the same value"
        return f"the input with the nearest value after Gaussian noise (std {self.noise:.4g})"


def random_donors() -> DonorSampler:
    """Donors drawn at random: a uniform random permutation of the inputs (the hypothesis says 'irrelevant')."""
    return DonorSampler("random")


def fixed_donors(donors: Sequence[int] | torch.Tensor) -> DonorSampler:
    """Explicit donors: input i takes the activation of input ``donors[i]``."""
    donors = torch.as_tensor(donors)
    if donors.ndim != 1 or donors.dtype.is_floating_point:
        raise InputError("fixed_donors needs a 1-D sequence of integer input indices")
    return DonorSampler("fixed", donors.long())


def same_value(values: Sequence | torch.Tensor) -> DonorSampler:
    """Donors drawn uniformly among inputs whose `values` are equal (an equivalence class of the hypothesis).

    `values`: [n] (labels, booleans, bins) or [n, k] (a tuple of features per input; rows must match exactly).
    """
    values = torch.as_tensor(values)
    if values.ndim not in (1, 2) or len(values) == 0:
        raise InputError(f"same_value needs values of shape [n] or [n, k], got {tuple(values.shape)}")
    return DonorSampler("same", values)


def nearest_value(values: Sequence[float] | torch.Tensor, noise: float = 0.0) -> DonorSampler:
    """Each input takes the donor whose value is nearest to its own plus Gaussian noise of std `noise`.

    `noise=0` picks the input itself (or one with an identical value); larger noise relaxes "same feature" to
    "similar feature". Targets beyond the range of `values` take the nearest end.
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.ndim != 1 or len(values) == 0:
        raise InputError(f"nearest_value needs a 1-D tensor of values, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise InputError("nearest_value got NaN or infinite values")
    if not noise >= 0:
        raise InputError(f"noise must be a non-negative standard deviation, got {noise}")
    return DonorSampler("nearest", values, float(noise))


def _within_groups(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random permutation that maps every input to an input with the same value."""
    if values.ndim == 2:
        values = torch.unique(values, dim=0, return_inverse=True)[1]
    n = len(values)
    by_key = torch.sort(values, stable=True).indices
    shuffled = torch.randperm(n, generator=generator)
    by_key_shuffled = shuffled[torch.sort(values[shuffled], stable=True).indices]
    donors = torch.empty(n, dtype=torch.long)
    donors[by_key] = by_key_shuffled  # both lists run through the groups in the same order and sizes
    return donors


def _nearest(values: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    target = values + noise * torch.randn(len(values), generator=generator, dtype=torch.float64)
    sorted_values, order = torch.sort(values)
    right = torch.searchsorted(sorted_values, target).clamp(max=len(values) - 1)
    left = (right - 1).clamp(min=0)
    take_left = (target - sorted_values[left]).abs() <= (sorted_values[right] - target).abs()
    return order[torch.where(take_left, left, right)]


# ---------------------------------------------------------------------------------------------------------------
# hypotheses


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class Resample:
    """Replace part of one activation with the donors' clean values.

    module: path of the module whose output is the activation, a tensor [batch, *middle, d] (e.g. "relu3";
        the old keyword ``site=`` still works, with a DeprecationWarning: sites name standard transformer sites).
    donors: a `DonorSampler`.
    units: indices along the last axis to replace (None: all of them).
    basis: [d, d] invertible matrix whose rows are the coordinate directions; `units` then index coordinates in
        this basis (x = coords @ basis) and the other coordinates are kept. None: the standard basis.
    at: int or slice indices into the middle axes (e.g. ``(2,)`` for position 2 of [batch, pos, d]).
    """

    module: str
    donors: DonorSampler
    units: Sequence[int] | torch.Tensor | None = None
    basis: torch.Tensor | None = None
    at: tuple[int | slice, ...] = ()

    def __init__(self, module=None, donors=None, units=None, basis=None, at=(), *, site=None):
        module = renamed("site", site, "module", module)
        if not isinstance(module, str):
            raise InputError(f"Resample needs the path of a module (a string), got {module!r}.")
        for name, value in (("module", module), ("donors", donors), ("units", units), ("basis", basis)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "at", tuple(at) if isinstance(at, (tuple, list)) else at)

    def describe(self) -> str:
        what = "all units" if self.units is None else f"{len(torch.as_tensor(self.units).reshape(-1))} units"
        where = f" at {self.at}" if self.at else ""
        basis = " (in the given basis)" if self.basis is not None else ""
        return f"{self.module}{where}: {what}{basis} from {self.donors.describe()}"


@dataclasses.dataclass(frozen=True, eq=False)
class Hypothesis:
    """A named set of `Resample` rules that together state one hypothesis."""

    name: str
    resamples: tuple[Resample, ...]

    def describe(self) -> str:
        return "; ".join(r.describe() for r in self.resamples) or "nothing resampled"


# ---------------------------------------------------------------------------------------------------------------
# metrics


@dataclasses.dataclass(frozen=True)
class labels_kept:  # noqa: N801 - used like a function: labels_kept(), labels_kept(position=-1, classes=[0, 1])
    """Per-input score 1.0 where the patched run's label (argmax) equals the clean run's, else 0.0.

    position: index of the output's second axis to read (e.g. -1, the last token); None for [batch, classes].
    classes: restrict the argmax to these output indices (e.g. [0, 1] when only two logits are compared).
    """

    position: int | None = None
    classes: tuple[int, ...] | None = None

    def __call__(self, clean: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        return (self._labels(clean) == self._labels(patched)).float()

    def _labels(self, logits: torch.Tensor) -> torch.Tensor:
        if self.position is not None:
            logits = logits[:, self.position]
        if self.classes is not None:
            logits = logits[..., list(self.classes)]
        return logits.argmax(-1)


# ---------------------------------------------------------------------------------------------------------------
# result


@dataclasses.dataclass(frozen=True)
class ScrubResult(Result):
    """Behaviour kept under each hypothesis.

    names, descriptions: one per hypothesis. kept: [hypothesis], the mean per-input score. scores:
    [hypothesis, input]. clean_score: the metric of the clean run against itself (1.0 for `labels_kept`).
    donors: per hypothesis, per rule, LongTensor [input] of the donors used.
    """

    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    kept: torch.Tensor
    scores: torch.Tensor
    clean_score: float
    donors: tuple[tuple[torch.Tensor, ...], ...]
    provenance: Provenance

    def __getitem__(self, name: str) -> float:
        try:
            return float(self.kept[self.names.index(name)])
        except ValueError:
            raise InputError(f"no hypothesis named {name!r}; have {list(self.names)}") from None

    def recovered(self, baseline: str) -> torch.Tensor:
        """[hypothesis]: (kept - kept[baseline]) / (clean - kept[baseline]); 1 = as clean, 0 = as the baseline."""
        base = self[baseline]
        if abs(self.clean_score - base) < 1e-12:
            raise InputError(f"the baseline {baseline!r} scores as the clean run; nothing to normalise by")
        return (self.kept - base) / (self.clean_score - base)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "hypothesis": list(self.names),
                "kept": self.kept.tolist(),
                "description": list(self.descriptions),
            }
        )


# ---------------------------------------------------------------------------------------------------------------
# the engine


def _wrap(model, run: Run) -> tuple[Callable, torch.nn.Module, Any, str]:
    """(trace, torch module, nnsight root, name) of a WorkbenchModel, an nnsight model or a plain torch module.

    A WorkbenchModel is traced through `WorkbenchModel.trace`, so its remote setting and trace lock apply.
    """
    if isinstance(model, WorkbenchModel):
        return functools.partial(model.trace, run=run), model.module, model.nnsight, model.name
    if hasattr(model, "_module") and hasattr(model, "trace"):  # an nnsight model
        return model.trace, model._module, model, type(model._module).__name__
    if isinstance(model, torch.nn.Module):
        net = nnsight.NNsight(model)
        return net.trace, model, net, type(model).__name__
    raise InputError(
        f"scrub() needs a torch module, an nnsight model or a WorkbenchModel, got {type(model).__name__}"
    )


def _forward_order(module: torch.nn.Module, sites: list[str]) -> list[str]:
    """`sites` sorted by module registration order (the forward order of ordinary models); "" (the root) last."""
    order = {name: i for i, (name, _) in enumerate(module.named_modules()) if name}
    order[""] = len(order) + 1
    missing = [s for s in sites if s not in order]
    if missing:
        names = [n for n in order if n][:40]
        raise SiteError(
            f"unknown site(s) {missing}: give module paths of the model, e.g. {names}"
            + (" ..." if len(order) > 41 else "")
        )
    return sorted(set(sites), key=order.__getitem__)


def _check_rule(rule: Resample, shape: torch.Size) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate a rule against its site's activation shape [N, *middle, d]; return (units, inverse basis)."""
    if not isinstance(rule.donors, DonorSampler):
        raise InputError(
            f"{rule.module}: donors must be a DonorSampler (random_donors(), same_value(...), ...)"
        )
    middle, d = shape[1:-1], shape[-1]
    if len(rule.at) > len(middle) or not all(isinstance(a, (int, slice)) for a in rule.at):
        raise InputError(
            f"{rule.module}: at={rule.at} must be ints or slices into the {len(middle)} middle axes of an "
            f"activation of shape {tuple(shape)}"
        )
    for a, size in zip(rule.at, middle):
        if isinstance(a, int) and not -size <= a < size:
            raise SiteError(f"{rule.module}: index {a} in at={rule.at} is out of range for size {size}")
    units = None
    if rule.units is not None:
        units = torch.as_tensor(rule.units).reshape(-1).long()
        if len(units) and (units.min() < -d or units.max() >= d):
            raise SiteError(
                f"{rule.module}: units must lie in [0, {d}), got {units.min().item()}..{units.max().item()}"
            )
    inverse = None
    if rule.basis is not None:
        basis = torch.as_tensor(rule.basis, dtype=torch.float64)
        if basis.shape != (d, d):
            raise InputError(
                f"{rule.module}: basis must be [{d}, {d}] (rows = directions), got {tuple(basis.shape)}"
            )
        if torch.linalg.matrix_rank(basis) < d:
            raise InputError(
                f"{rule.module}: the basis is singular; its {d} rows must be linearly independent"
            )
        inverse = torch.linalg.inv(basis)
    return units, inverse


def _patch(current: torch.Tensor, donor: torch.Tensor, rule: Resample, units, inverse) -> torch.Tensor:
    """`current` with `rule`'s part replaced by `donor`'s (both [b, *middle, d]); returns a new tensor."""
    new = current.clone()
    index = (slice(None), *rule.at)
    view, source = new[index], donor[index].to(new.dtype)
    if inverse is None:
        if units is None:
            view[...] = source
        else:
            view[..., units] = source[..., units]
        return new
    basis = torch.as_tensor(rule.basis, dtype=torch.float64)
    coords_delta = (source.double() - view.double()) @ inverse  # donor minus current, in coordinates
    if units is not None:
        keep = torch.zeros(basis.shape[0], dtype=torch.bool)
        keep[units] = True
        coords_delta[..., ~keep] = 0
    view += (coords_delta @ basis).to(new.dtype)
    return new


def scrub(
    model,
    inputs: torch.Tensor,
    hypotheses: Hypothesis | Sequence[Hypothesis],
    *,
    output: str = "",
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool | Callable[[int, int], None] = True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    trace_kwargs: dict | None = None,
    prepare: Callable[[torch.Tensor], Any] | None = None,
    chunk: int | None = None,
) -> ScrubResult:
    """Test each hypothesis by resampling its modules' outputs and report the fraction of behaviour kept.

    Args:
        model: a torch module, an nnsight model, or a `WorkbenchModel`.
        inputs: [N, ...] batch-first inputs (images, token ids); donors are drawn among these N inputs.
        hypotheses: one `Hypothesis` or several (names must differ).
        output: module path whose output is the behaviour ("" = the model's own output).
        metric: ``metric(clean_output, patched_output) -> [batch]`` per-input score; default `labels_kept()`.
        batch_size: inputs per trace (default 1024; ``chunk=`` is its old name). seed: seeds the donor draws
            (each hypothesis gets its own stream).
        progress: a tqdm bar (True), a ``callback(done, total)``, or False. cancel: a `CancelToken`. run: a
            `workbench.core.Run` carrying these settings instead.
        trace_kwargs: extra keyword arguments for ``model.trace`` (e.g. ``use_cache=False``).
        prepare: applied to each chunk of inputs before it is traced (e.g. uint8 pixels -> floats), so that the
            full input set can stay in its compact form.
    """
    hypotheses = _check_hypotheses(hypotheses)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim == 0 or len(inputs) == 0:
        raise InputError("inputs must be a non-empty batch-first tensor [N, ...]")
    batch_size = renamed("chunk", chunk, "batch_size", batch_size)
    run = Run.of(run, progress=progress, cancel=cancel, batch_size=batch_size)
    batch = run.batch_size or DEFAULT_BATCH
    metric = metric or labels_kept()
    trace_kwargs = trace_kwargs or {}
    prepare = prepare or (lambda x: x)
    trace, module, net, model_name = _wrap(model, run)
    n = len(inputs)
    rule_modules = [r.module for h in hypotheses for r in h.resamples]
    modules = _forward_order(module, rule_modules + [output])

    # 1. clean run: cache every module a rule reads from, and the behaviour
    def clean_chunk(start: int, stop: int):
        saved = {}
        with torch.no_grad(), trace(prepare(inputs[start:stop]), **trace_kwargs):
            for name in modules:
                value = net.get(name).output if name else net.output
                saved[name] = value.save()
        return saved

    cache = _concat_outputs(run.chunked(n, batch, clean_chunk, desc="clean run"), modules)
    clean_out = cache[output]
    clean_scores = metric(clean_out, clean_out)
    if clean_scores.shape != (n,):
        raise InputError(
            f"metric must return one score per input, shape [{n}], got {tuple(clean_scores.shape)}"
        )
    checked = {id(r): _check_rule(r, cache[r.module].shape) for h in hypotheses for r in h.resamples}

    # 2-4. per hypothesis: draw donors, rerun with the rules applied, score against the clean behaviour
    all_scores, all_donors = [], []
    for h_index, hypothesis in enumerate(hypotheses):
        donors = _draw_donors(hypothesis, n, torch.Generator().manual_seed(seed * 1_000_003 + h_index))
        by_module = {
            m: [(r, d) for r, d in zip(hypothesis.resamples, donors) if r.module == m]
            for m in set(rule_modules)
        }

        def patched_chunk(start: int, stop: int, by_module=by_module):
            with torch.no_grad(), trace(prepare(inputs[start:stop]), **trace_kwargs):
                for name in modules:
                    envoy = net.get(name) if name else net
                    rules = by_module.get(name)
                    if rules:
                        new = envoy.output
                        for rule, d in rules:
                            new = _patch(new, cache[name][d[start:stop]], rule, *checked[id(rule)])
                        envoy.output = new
                    if name == output:
                        behaviour = envoy.output.save()
            return metric(clean_out[start:stop], behaviour)

        all_scores.append(torch.cat(run.chunked(n, batch, patched_chunk, desc=hypothesis.name)).float())
        all_donors.append(tuple(donors))

    scores = torch.stack(all_scores)
    provenance = Provenance.capture(
        model_name,
        n_inputs=n,
        output=output or "(model output)",
        seed=seed,
        batch_size=batch,
        metric=repr(metric),
        hypotheses={h.name: h.describe() for h in hypotheses},
    )
    return ScrubResult(
        names=tuple(h.name for h in hypotheses),
        descriptions=tuple(h.describe() for h in hypotheses),
        kept=scores.mean(1),
        scores=scores,
        clean_score=float(clean_scores.float().mean()),
        donors=tuple(all_donors),
        provenance=provenance,
    )


DEFAULT_BATCH = 1024
"""Inputs per trace when no batch size is given."""


def _check_hypotheses(hypotheses) -> list[Hypothesis]:
    if isinstance(hypotheses, Hypothesis):
        hypotheses = [hypotheses]
    hypotheses = list(hypotheses)
    if not hypotheses or not all(isinstance(h, Hypothesis) for h in hypotheses):
        raise InputError("give at least one Hypothesis")
    names = [h.name for h in hypotheses]
    if len(set(names)) != len(names):
        raise InputError(f"hypothesis names must be unique, got {names}")
    return hypotheses


def _concat_outputs(parts: list[dict], modules: list[str]) -> dict[str, torch.Tensor]:
    """Chunk outputs per module, concatenated; each must be one tensor."""
    cache: dict[str, torch.Tensor] = {}
    for name in modules:
        values = [c[name] for c in parts]
        if not all(isinstance(p, torch.Tensor) for p in values):
            raise UnsupportedModelError(
                f"the output of {name or 'the model'} is a {type(values[0]).__name__}, not a tensor; choose a "
                "module whose output is one tensor (wrap the activation in an identity module if needed)"
            )
        cache[name] = torch.cat([p.detach() for p in values])
    return cache


def _draw_donors(hypothesis: Hypothesis, n: int, generator: torch.Generator) -> list[torch.Tensor]:
    donors = []
    for rule in hypothesis.resamples:
        d = rule.donors.draw(n, generator)
        if d.shape != (n,) or (len(d) and (d.min() < 0 or d.max() >= n)):
            raise InputError(f"{rule.module}: donors must be {n} indices in [0, {n}), one per input")
        donors.append(d)
    return donors
