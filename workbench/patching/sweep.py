"""Exact activation patching, batched: many patched copies of the base run per forward pass.

How a sweep runs (all numbers equal, within float tolerance, to patching one cell at a time):

1. One trace over [clean; corrupt] caches the source activations at every requested site and layer, the base
   run's residual stream entering each layer, and the baselines' logits.
2. For each (site, layer) the patched runs are rows of one batch: row r is the base prompt of pair p with the
   source activation written at position group g (and head h). Blocks below the layer are not recomputed:
   they are skipped and the cached base residual is fed to the patched layer (it is what they would compute).
   Only the last position's logits are computed unless a metric needs all of them.
3. Rows are chunked to a memory budget; progress is reported and a `CancelToken` is honoured between chunks.

On NDIF (and in the dry run) there is no local cache to start from: `remote_sweep` runs the patched rows in one
batch with the clean and corrupt runs instead, usually as one job (the last section of this module).
"""

from __future__ import annotations

import dataclasses

import nnsight
import torch

from workbench.core import CancelToken, Run, chunks
from workbench.errors import InputError, JobTooLarge
from workbench.errors import warn as warn_user
from workbench.models.prefix import bytes_per_row as row_bytes
from workbench.models.prefix import enter_at, kv_cache, reuses_cache
from workbench.models.sites import SITES
from workbench.patching.inputs import position_labels
from workbench.patching.result import PatchingResult
from workbench.patching.spec import PatchSpec, plain_versions

_DEFAULT_MAX_ROWS = {"cpu": 128, "cuda": 1024}
Setup = PatchSpec  # the name benchmarks used before specs


def setup(model, clean, corrupt, answers, site, direction, layers, positions, heads, metric) -> PatchSpec:
    """`PatchSpec.resolve` with positional arguments."""
    return PatchSpec.resolve(
        model,
        clean,
        corrupt,
        answers,
        site=site,
        direction=direction,
        layers=layers,
        positions=positions,
        heads=heads,
        metric=metric,
    )


def _rank(site: str) -> float:
    return SITES[site].rank


def read_caches(
    model,
    s: PatchSpec,
    *,
    extra: tuple[str, ...] = (),
    chunk: int | None = None,
    kv: bool = False,
    run: Run | None = None,
) -> dict:
    """Traces over [clean; corrupt], `chunk` rows at a time (default: all at once): logits (last position unless
    a metric needs all) and, per layer, the residual entering it plus every requested site (and `extra` sites),
    each [2 * pair, ...]. With `kv`, also every layer's keys and values, ``("kv", layer)`` -> (keys, values)
    [2 * pair, kv_head, pos, d_head], for runs that start from a prefix of these prompts."""
    tokens = torch.cat([s.pairs.clean, s.pairs.corrupt])
    kwargs = {} if s.all_positions else {"logits_to_keep": 1}
    if kv:
        kwargs["use_cache"] = True
    names = sorted(set(s.sites) | set(extra) | {"resid_pre"}, key=_rank)
    layers = sorted(s.layers)
    n_layers = model.cfg.n_layers
    parts = []
    for start in range(0, len(tokens), chunk or len(tokens)):
        with (
            torch.no_grad(),
            model.trace(tokens[start : start + (chunk or len(tokens))].to(model.device), run=run, **kwargs),
        ):
            cache = {}
            for layer in layers:
                for name in names:
                    cache[(name, layer)] = model.site(name, layer).value.clone()
            cache["logits"] = model.site("logits").value.clone()
            if kv:
                cache["past"] = model.nnsight.output.past_key_values
            nnsight.save(cache)
        if kv:
            past = cache.pop("past").layers
            for layer in range(n_layers):
                cache[("kv", layer)] = (past[layer].keys, past[layer].values)
        parts.append(cache)
    if len(parts) == 1:
        return parts[0]
    return {
        k: tuple(torch.cat([p[k][i] for p in parts]) for i in range(2))
        if k[0] == "kv"
        else torch.cat([p[k] for p in parts])
        for k in parts[0]
    }


def baselines(s: PatchSpec, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean and corrupt metric values [metric, pair] and the clean run's last-position log-probs [pair, vocab]."""
    n = s.pairs.n_pairs
    clean_logits, corrupt_logits = logits[:n], logits[n:]
    clean_lp = torch.log_softmax(clean_logits[:, -1].float(), -1)
    answers = s.pairs.answers.to(logits.device)

    def evaluate(lg):
        return torch.stack([m(lg if m.all_positions else lg[:, -1], answers, clean_lp) for m in s.metrics])

    return evaluate(clean_logits).cpu(), evaluate(corrupt_logits).cpu(), clean_lp


@dataclasses.dataclass(frozen=True)
class Rows:
    """The patched runs of one chunk: row r runs pair `pair[r]`; the flat entries (row, pos, pair, head) say
    which activation entries are written."""

    pair: torch.Tensor  # [row]
    cell: torch.Tensor  # [row] index into the layer's (group, head) cells
    r: torch.Tensor  # [entry]
    t: torch.Tensor
    p: torch.Tensor
    h: torch.Tensor


def _rows(s: PatchSpec, cells: list[tuple[int, int]], device) -> Rows:
    """Rows running (pair, cell) for each of `cells`; a cell is group x heads + head index."""
    n_heads = len(s.heads) if s.heads is not None else 1
    pair, cell, r, t, p, h = [], [], [], [], [], []
    for row, (pi, c) in enumerate(cells):
        g, hi = divmod(c, n_heads)
        head = s.heads[hi] if s.heads is not None else 0
        pair.append(pi)
        cell.append(c)
        for pos in s.groups[g]:
            r.append(row)
            t.append(pos)
            p.append(pi)
            h.append(head)

    def tensor(x):
        return torch.tensor(x, dtype=torch.long, device=device)

    return Rows(tensor(pair), tensor(cell), tensor(r), tensor(t), tensor(p), tensor(h))


@dataclasses.dataclass(frozen=True)
class Unit:
    """One forward pass of a sweep: patched runs `cells` [(pair, cell)] at (site, layer), computing positions
    `start` onward (the earlier positions' keys and values come from the base run)."""

    site: str
    layer: int
    cells: tuple[tuple[int, int], ...]
    start: int = 0


SUFFIX_BUCKET_ROWS = 32
"""Rows a bucket of start positions aims for: fewer, and batches get too small to gain from skipping
positions; more, and rows recompute positions they could skip (see benchmarks/bench_patching_more.py)."""


def suffix_reuse(model, s: PatchSpec) -> str | None:
    """Why a sweep cannot start its patched runs at the first patched position (None: it can).

    In a causal model a patch at position p changes nothing before p: those positions' keys and values are the
    base run's, so rows patched at p need only compute positions p onward.
    """
    if not reuses_cache(model):
        return "the model runs remotely, where the base run's keys and values are not kept"
    if torch.device(model.device).type == "cuda":
        # measured on an H200 (GPT-2-small shape): the position buckets' smaller batches ran 2.5x slower than the
        # full batches at 16 tokens and 1.3x at 64; a GPU is bound by launches there, not by arithmetic
        return "on a GPU the full batches are faster"
    if s.all_positions:
        return "a metric reads logits at every position"
    window = getattr(model.module.config, "sliding_window", None)
    if window is not None and window < s.pairs.n_pos:
        return f"sliding-window attention ({window} tokens) shorter than the prompt"
    return None


def plan(
    s: PatchSpec, chunk: int, suffix: bool, skip: frozenset[tuple[int, int]] = frozenset()
) -> list[Unit]:
    """The forward passes of a sweep, leaving out the (pair, group) cells in `skip`. Without `suffix`: per (site,
    layer), rows pair-major in chunks of `chunk`. With it: per (site, layer), position groups in order of their
    first position are bucketed (about `SUFFIX_BUCKET_ROWS` rows a bucket) and each bucket runs from its
    smallest first position."""
    n, heads = s.pairs.n_pairs, range(s.n_heads)

    def kept(pairs, g):
        return [(pi, g * s.n_heads + h) for pi in pairs if (pi, g) not in skip for h in heads]

    if not suffix:
        buckets = [(0, [cell for pi in range(n) for g in range(len(s.groups)) for cell in kept([pi], g)])]
    else:
        buckets = []
        for g in sorted(range(len(s.groups)), key=lambda g: min(s.groups[g])):
            cells = kept(range(n), g)
            if not cells:
                continue
            if not buckets or len(buckets[-1][1]) >= SUFFIX_BUCKET_ROWS:
                buckets.append((min(s.groups[g]), []))
            buckets[-1][1].extend(cells)
    return [
        Unit(site, layer, tuple(cells[a:b]), start)
        for site in s.sites
        for layer in s.layers
        for start, cells in buckets
        for a, b in chunks(len(cells), chunk)
    ]


def fill_unchanged(
    s: PatchSpec, raw: torch.Tensor, skip, clean, corrupt, site=slice(None), layer=slice(None)
):
    """Write the base run's metric values (from `clean` / `corrupt` [metric, pair]) into raw [metric, pair, site,
    layer, cell] at the `skip` cells (`PatchSpec.unchanged`), whose patched runs are the base run (at the indices
    `site` and `layer`, default all)."""
    base = s.base_run(clean, corrupt)
    for pi, g in skip:
        raw[:, pi, site, layer, g * s.n_heads : (g + 1) * s.n_heads] = base[:, pi, None, None, None]


def patched_logits(
    model,
    s: PatchSpec,
    site: str,
    layer: int,
    rows: Rows,
    base_resid,
    source,
    *,
    start: int = 0,
    kv=None,
    run: Run | None = None,
):
    """Logits [row, d_vocab] (or [row, pos, d_vocab]) of the base run with `source` written at `rows`.

    base_resid: [pair, pos, d_model] the base run's residual entering `layer`; source: the source run's
    activation at (site, layer), [pair, ...]; for "pattern" it is [pair, head, query, key].

    Blocks below `layer` would recompute the cached base residual, so they are skipped and it is fed in. With
    `start` > 0 only positions `start` onward run, on top of `kv`: per layer, the base run's (keys, values)
    [pair, kv_head, pos, d_head]. A pattern acts only through z = pattern @ v, so patching it writes the z that
    the source pattern gives (over every key: the cached ones too).
    (The trace body has no comments: remote serialisation drops them and shifts line numbers.)
    """
    tokens = s.base_tokens.to(model.device)[rows.pair][:, start:]
    kwargs = {} if s.all_positions else {"logits_to_keep": 1}
    prefix_v = None
    if start > 0:
        n = len(rows.pair)
        # layers below `layer` are skipped and never read their cache: a broadcast view fills their place
        kv_rows = [
            (k[rows.pair, :, :start], v[rows.pair, :, :start])
            if i >= layer
            else tuple(x[:1, :, :start].expand(n, -1, -1, -1) for x in (k, v))
            for i, (k, v) in enumerate(kv)
        ]
        kwargs.update(past_key_values=kv_cache(model, kv_rows), use_cache=True)
        prefix_v = kv_rows[layer][1].transpose(1, 2)
    t = rows.t - start
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    with torch.no_grad(), model.trace(tokens, run=run, **kwargs):
        if layer > 0:
            x = base_resid[rows.pair][:, start:]
            if site == "resid_pre":
                x[rows.r, t] = source[rows.p, rows.t]
            enter_at(model, layer, x)
        elif site == "resid_pre":
            x = model.site("resid_pre", 0).value
            x[rows.r, t] = source[rows.p, rows.t]
        if site in ("resid_mid", "resid_post", "attn_out", "mlp_out"):
            act = model.site(site, layer).value
            act[rows.r, t] = source[rows.p, rows.t]
        elif site == "z":
            act = model.site("z", layer).value
            act[rows.r, t, rows.h] = source[rows.p, rows.t, rows.h]
        elif site == "pattern":
            v = model.site("v", layer).value
            if prefix_v is not None:
                v = torch.cat([prefix_v.to(v.dtype), v], dim=1)
            z = model.site("z", layer).value
            p_src = source[rows.p, rows.h, rows.t].to(v.dtype)
            z[rows.r, t, rows.h] = torch.einsum("ek,ekd->ed", p_src, v[rows.r, :, rows.h // group])
        logits = model.site("logits").value
        out = (logits if s.all_positions else logits[:, -1]).save()
    return out


def bytes_per_row(model, s: PatchSpec) -> int:
    """A generous estimate of the peak memory of one patched run (inference, no gradients)."""
    t = s.pairs.n_pos
    return row_bytes(model, t, logit_pos=t if s.all_positions else 1)


def rows_per_chunk(model, s: PatchSpec, run: Run, *, suffix: bool) -> int:
    """Patched runs per forward pass (with `suffix`: each also holds the base run's keys and values)."""
    per_row = bytes_per_row(model, s) + (row_bytes(model, 0, kv_pos=s.pairs.n_pos) if suffix else 0)
    return run.rows_per_chunk(per_row, model, _DEFAULT_MAX_ROWS.get(torch.device(model.device).type, 128))


def make_result(
    model, s: PatchSpec, method: str, raw, clean, corrupt, options: dict, *, complete: bool = True
) -> PatchingResult:
    provenance = plain_versions(s.provenance(method, dtype=str(model.dtype), **options))
    return PatchingResult(
        method=method,
        direction=s.direction,
        sites=s.sites,
        layers=s.layers,
        positions=s.groups,
        position_labels=position_labels(s.pairs, s.groups),
        heads=s.heads,
        raw=raw,
        **s.run_fields(clean, corrupt),
        provenance=provenance,
        warnings=baseline_warnings(s, clean, corrupt) + (non_finite_warnings(s, raw) if complete else ()),
    )


def non_finite_warnings(s: PatchSpec, raw: torch.Tensor) -> tuple[str, ...]:
    """A sentence when patched values [metric, pair, site, layer, group(, head)] are not finite: how many, and
    the first cell (its metric, pair, site, layer and positions)."""
    bad = ~torch.isfinite(raw)
    if not bad.any():
        return ()
    m, pair, si, li, g, *head = (int(i) for i in bad.nonzero()[0])
    at = f"{s.sites[si]} layer {s.layers[li]}, positions {list(s.groups[g])}"
    at += f", head {s.heads[head[0]]}" if head else ""
    return (
        f"{int(bad.sum())} of {bad.numel()} patched values are not finite (NaN or inf), first for "
        f"{s.metrics[m].name} of pair {pair} at {at}: the patched run overflows or the metric returns "
        "non-finite numbers there.",
    )


def baseline_notes(clean: torch.Tensor, corrupt: torch.Tensor, metric: str) -> list[str]:
    """Sentences about baselines [pair] of the primary metric that make normalised values unreliable."""
    gap = clean - corrupt
    mean = float(gap.mean())
    out = []
    if metric == "logit_diff" and abs(mean) < 1.0:
        out.append(
            f"The clean and corrupt logit differences differ by only {mean:+.3g} on average (less than 1 logit): "
            "normalised values divide by this gap and amplify noise. Check that the model answers the clean "
            "prompts and that the corrupt prompts change the answer."
        )
    flipped = [j for j, g in enumerate(gap.tolist()) if g * mean < 0]
    if flipped and len(gap) > 1:
        out.append(
            f"For pair{'s' * (len(flipped) > 1)} {', '.join(map(str, flipped))} the clean - corrupt gap of "
            f"{metric} has the opposite sign to the mean's: the mean hides a disagreement (see per-pair views)."
        )
    return out


def baseline_warnings(s: PatchSpec, clean: torch.Tensor, corrupt: torch.Tensor) -> tuple[str, ...]:
    """Sentences about baselines [metric, pair] that make normalised values unreliable (`baseline_notes` of the
    primary metric; `warn_baselines` issues them)."""
    i = s.metric_index()
    return tuple(baseline_notes(clean[i], corrupt[i], s.metric))


def warn_baselines(result: PatchingResult) -> PatchingResult:
    """Issue each of `result.warnings` as a UserWarning pointing at the caller of `sweep` / `attribute`."""
    for message in result.warnings:
        warn_user(message)
    return result


def sweep(
    model,
    clean,
    corrupt=None,
    answers=None,
    *,
    site: str | list[str] = "resid_pre",
    direction: str = "denoising",
    layers: int | list[int] | None = None,
    positions="each",
    heads: int | list[int] | None = None,
    metric="logit_diff",
    memory_budget: int | str | None = "auto",
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    warn: bool = True,
    run: Run | None = None,
) -> PatchingResult:
    """Activation patching over sites x layers x positions (x heads), for several prompt pairs at once.

    Directions:
        "denoising": run the corrupt prompt and write one clean activation into it. A high score means the
            activation is *sufficient* to restore the clean behaviour (from where it sits onward).
        "noising": run the clean prompt and write one corrupt activation into it. A low score means the
            activation is *necessary*: losing its clean value breaks the behaviour. The two disagree on AND- and
            OR-like circuits (Heimersheim & Nanda 2024), so run both.

    Args:
        model: a `WorkbenchModel` (`workbench.models.load_model`).
        clean, corrupt: prompts (a string or a list) or [pair, pos] token tensors with equal token lengths; or
            a `workbench.tasks.PromptPairs` as `clean` (corrupt and answers come from it).
        answers: (correct, incorrect) single tokens for all pairs, or one tuple per pair, or a [pair, 2] tensor.
        site: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out" (block sites; a list gives a site
            axis), or "z" (each head's output) / "pattern" (each head's attention pattern; positions are query
            positions).
        layers: layers to patch (default all). positions: "each", "all", or chosen positions or groups
            (see `inputs.resolve_positions`). heads: heads of per-head sites (default all).
        metric: primary metric: "logit_diff" (default), "logprob", "prob", "kl", a function
            fn(logits [row, d_vocab], answers [row, 2]) -> [row], or a `Metric`. All built-ins are always
            computed so views can switch between them.
        memory_budget: bytes or "2GB"; "auto" = a quarter of free memory. batch_size: at most this many
            patched runs per forward pass (default 128 on CPU, 1024 on GPU, or fewer to fit the budget).
        progress: True for a progress bar, or a callback(done, total). cancel: a `CancelToken`.
        run: a `workbench.core.Run` carrying all of these settings instead (then leave them unset).
        warn: issue the result's baseline warnings (`PatchingResult.warnings`) as UserWarnings; panels that
            show them pass False.

    Returns:
        `PatchingResult` with raw values [metric, pair, site, layer, position(, head)] and both baselines.
    """
    s = setup(model, clean, corrupt, answers, site, direction, layers, positions, heads, metric)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    if not reuses_cache(model) and in_batch_off(s) is None:
        return remote_sweep(model, s, run, warn)
    no_suffix = suffix_reuse(model, s)
    chunk = rows_per_chunk(model, s, run, suffix=no_suffix is None)
    cache = read_caches(model, s, chunk=chunk, kv=no_suffix is None, run=run)
    clean_m, corrupt_m, clean_lp = baselines(s, cache["logits"])
    check_baselines(s, clean_m, corrupt_m)
    skip = s.unchanged()
    base_half, source_half = s.halves()
    kv = (
        [(k[base_half], v[base_half]) for k, v in (cache[("kv", i)] for i in range(model.cfg.n_layers))]
        if (no_suffix is None)
        else None
    )
    units = plan(s, chunk, suffix=no_suffix is None, skip=skip)
    raw = s.empty_raw()
    options = {
        "memory_budget": run.memory_budget,
        "batch_size": chunk,
        "suffix_reuse": no_suffix is None,
        **({"suffix_reuse_off": no_suffix} if no_suffix else {}),
        "unchanged_cells": len(skip),
    }
    by_layer: dict[tuple[str, int], list[Unit]] = {
        (site, layer): [] for site in s.sites for layer in s.layers
    }
    for unit in units:
        by_layer[(unit.site, unit.layer)].append(unit)
    done = [0]

    def run_layer(key: tuple[str, int]) -> None:
        site, layer = key
        base_resid = cache[("resid_pre", layer)][base_half]
        source = cache[(site, layer)][source_half]
        si, li = s.sites.index(site), s.layers.index(layer)
        fill_unchanged(s, raw, skip, clean_m, corrupt_m, slice(si, si + 1), slice(li, li + 1))
        for unit in by_layer[key]:
            rows = _rows(s, list(unit.cells), base_resid.device)
            logits = patched_logits(
                model, s, site, layer, rows, base_resid, source, start=unit.start, kv=kv, run=run
            )
            values = s.evaluate(logits, rows.pair, clean_lp).cpu()
            raw[:, rows.pair.cpu(), si, li, rows.cell.cpu()] = values
        done[0] += 1
        if run.on_partial is not None and done[0] < len(by_layer):
            partial = make_partial(
                model, s, raw.view(s.grid_shape).clone(), clean_m, corrupt_m, options, done[0]
            )
            run.partial(partial)

    # one progress step (and one partial picture) per (site, layer)
    run.map(list(by_layer), run_layer, desc=f"patching {'+'.join(s.sites)}")
    result = make_result(model, s, "exact", raw.view(s.grid_shape), clean_m, corrupt_m, options)
    return warn_baselines(result) if warn else result


def make_partial(model, s: PatchSpec, raw, clean, corrupt, options: dict, done: int) -> PatchingResult:
    """The sweep so far: cells not yet computed are NaN, and a warning says how far it got."""
    result = make_result(model, s, "exact", raw, clean, corrupt, options, complete=False)
    total = len(s.sites) * len(s.layers)
    note = (
        f"Partial: {done} of {total} (site, layer) rows computed; the others are empty until the sweep "
        "finishes."
    )
    return dataclasses.replace(result, warnings=(note, *result.warnings))


def check_baselines(s: PatchSpec, clean: torch.Tensor, corrupt: torch.Tensor) -> None:
    """Refuse non-finite baselines [metric, pair]: every normalised cell would be NaN."""
    for name, values in (("clean", clean), ("corrupt", corrupt)):
        bad = ~torch.isfinite(values)
        if bad.any():
            m, pair = (int(i) for i in bad.nonzero()[0])
            raise InputError(
                f"The {name} run's {s.metrics[m].name} is {float(values[m, pair])} for pair {pair}: the model's "
                "outputs (or the metric) are not finite, so no patching value would be. Check the weights for "
                "NaN/inf (e.g. a failed load or fine-tune) and, for your own metric, that it returns finite "
                "numbers."
            )


# -- remote models: the patched rows ride in one batch with the runs they read -------------------------------
# On NDIF every trace is a job that waits in the queue, and cached activations fed into a trace would cross the
# network twice. So a remote sweep runs [clean; corrupt; patched rows...] in one trace: at each patched (site,
# layer), in the order the forward pass reaches them, the patched rows take the source run's activation from its
# rows of the same batch, and only the logits the metrics read come back. One job unless the memory budget
# splits the rows (each job carries the clean and corrupt rows again).


def in_batch_off(s: PatchSpec) -> str | None:
    """Why `s` cannot patch within one batch (None: it can)."""
    if "pattern" in s.sites:
        return "a pattern patch writes z from the patched rows' values, which runs one trace per layer"
    return None


def jobs(s: PatchSpec, chunk: int, skip: frozenset[tuple[int, int]]) -> list[list[Unit]]:
    """The sweep's patched rows, but for the `skip` cells (`PatchSpec.unchanged`), packed into jobs of at most
    `chunk` rows, the clean and corrupt rows included."""
    room = max(1, chunk - 2 * s.pairs.n_pairs)
    packed: list[list[Unit]] = [[]]
    used = 0
    for unit in plan(s, room, suffix=False, skip=skip):
        if used + len(unit.cells) > room:
            packed.append([])
            used = 0
        packed[-1].append(unit)
        used += len(unit.cells)
    return packed


def job_logits(model, s: PatchSpec, job: list[tuple[Unit, Rows]], run: Run | None = None):
    """Logits [2 * pair + row, pos, d_vocab] (pos 1 unless a metric reads every position) of one job: the clean
    rows, the corrupt rows, then each unit's patched `Rows` in order."""
    n = s.pairs.n_pairs
    source = s.halves()[1].start  # the source run's first row in [clean; corrupt]
    tokens, writes, offset = [s.pairs.clean, s.pairs.corrupt], {}, 2 * n
    for unit, rows in job:
        tokens.append(s.base_tokens[rows.pair])
        dst, t, src, h = writes.setdefault((unit.site, unit.layer), ([], [], [], []))
        dst.append(offset + rows.r), t.append(rows.t), src.append(source + rows.p), h.append(rows.h)
        offset += len(rows.pair)
    order = sorted(writes, key=lambda key: (key[1], _rank(key[0])))
    writes = [(site, layer, *(torch.cat(x) for x in writes[(site, layer)])) for site, layer in order]
    kwargs = {} if s.all_positions else {"logits_to_keep": 1}
    with torch.no_grad(), model.trace(torch.cat(tokens).to(model.device), run=run, **kwargs):
        for site, layer, dst, t, src, h in writes:
            act = model.site(site, layer).value
            if site == "z":
                act[dst, t, h] = act[src, t, h]
            else:
                act[dst, t] = act[src, t]
        out = model.site("logits").value.save()
    return out


def split_job(job: list[Unit]) -> tuple[list[Unit], list[Unit]] | None:
    """A job's patched rows in two halves (None: one row, nothing to split)."""
    if len(job) > 1:
        return job[: len(job) // 2], job[len(job) // 2 :]
    if not job:  # only the clean and corrupt runs: every patched run is the base run (`PatchSpec.unchanged`)
        return None
    (unit,) = job
    if len(unit.cells) < 2:
        return None
    half = len(unit.cells) // 2
    return [dataclasses.replace(unit, cells=unit.cells[:half])], [
        dataclasses.replace(unit, cells=unit.cells[half:])
    ]


def sweep_in_batch(model, s: PatchSpec, chunk: int, run: Run, skip: frozenset[tuple[int, int]]):
    """raw [metric, pair, site, layer, cell], the clean and corrupt metric values [metric, pair], and how many jobs
    ran; the `skip` cells (`PatchSpec.unchanged`) hold the base run's values. A job NDIF refuses as too large
    (`JobTooLarge`) runs again as two jobs of half its rows."""
    n = s.pairs.n_pairs
    raw = s.empty_raw()
    found: dict = {"jobs": 0}

    def run_job(job: list[Unit]) -> None:
        job_rows = [(unit, _rows(s, list(unit.cells), torch.device("cpu"))) for unit in job]
        try:
            logits = job_logits(model, s, job_rows, run).cpu()
        except JobTooLarge as err:
            halves = split_job(job)
            if halves is None:
                raise JobTooLarge(
                    f"{err} The clean and corrupt runs with one patched run are the smallest job a sweep sends."
                ) from err
            for half in halves:
                run_job(half)
            return
        found["jobs"] += 1
        if "clean" not in found:
            found["clean"], found["corrupt"], found["clean_lp"] = baselines(s, logits[: 2 * n])
            check_baselines(s, found["clean"], found["corrupt"])
            fill_unchanged(s, raw, skip, found["clean"], found["corrupt"])
        offset = 2 * n
        for unit, rows in job_rows:
            part = logits[offset : offset + len(rows.pair)]
            values = s.evaluate(part, rows.pair, found["clean_lp"]).cpu()
            raw[:, rows.pair, s.sites.index(unit.site), s.layers.index(unit.layer), rows.cell] = values
            offset += len(rows.pair)

    run.map(jobs(s, chunk, skip), run_job, desc=f"patching {'+'.join(s.sites)}")
    return raw, found["clean"], found["corrupt"], found["jobs"]


def remote_jobs(model, s: PatchSpec, run: Run | None = None) -> int:
    """How many NDIF jobs `sweep` sends for `s` on a remote `model` (with `run`'s memory budget and batch size)."""
    run = run or Run(progress=False)
    chunk, skip = rows_per_chunk(model, s, run, suffix=False), s.unchanged()
    if in_batch_off(s) is None:
        return len(jobs(s, chunk, skip))
    cache_jobs = -(-2 * s.pairs.n_pairs // chunk)
    return cache_jobs + len(plan(s, chunk, suffix=False, skip=skip))


def remote_sweep(model, s: PatchSpec, run: Run, warn: bool) -> PatchingResult:
    """`sweep` for a model whose runs cannot start from a local cache (NDIF, the dry run): `sweep_in_batch`."""
    chunk = rows_per_chunk(model, s, run, suffix=False)  # (the clean and corrupt rows included)
    skip = s.unchanged()
    raw, clean_m, corrupt_m, n_jobs = sweep_in_batch(model, s, chunk, run, skip)
    options = {
        "memory_budget": run.memory_budget,
        "batch_size": chunk,
        "suffix_reuse": False,
        "suffix_reuse_off": suffix_reuse(model, s),
        "in_batch": True,
        "jobs": n_jobs,
        "unchanged_cells": len(skip),
    }
    result = make_result(model, s, "exact", raw.view(s.grid_shape), clean_m, corrupt_m, options)
    return warn_baselines(result) if warn else result
