"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of senders on chosen receivers only.

Activation patching a head changes everything downstream of it. Path patching asks a narrower question: what does
sender S do *through* receiver R? S's source value is patched along its direct edges into R (R's query, key or
value input, an MLP's input, or the logits through the final norm), every other reader of S keeps S's value in the
base run, and everything downstream of R is recomputed. A sweep runs every (sender group, receiver group) cell.

    from workbench.circuits import path_patch
    r = path_patch(model, pairs, senders="heads", receivers="logits")      # each head's direct effect [sender, 1]
    r = path_patch(model, pairs, senders="L0H3", receivers="qkv")           # L0H3 into every later q, k and v
    r.plot()

Directions as in activation patching: "denoising" patches clean sender values into the corrupt run (is the path
sufficient?), "noising" corrupt values into the clean run (is it necessary?). Values are normalised as
(M - M_corrupt) / (M_clean - M_corrupt).
"""

from __future__ import annotations

import torch

from workbench.circuits import guards
from workbench.circuits.edges import Row, cached_runs, run_rows
from workbench.circuits.graph import Graph
from workbench.circuits.results import PathPatchingResult
from workbench.circuits.spec import CircuitSpec
from workbench.core import CancelToken, Run


def path_patch(
    model,
    clean,
    corrupt=None,
    answers=None,
    *,
    senders="heads",
    receivers="logits",
    direction: str = "denoising",
    positions=None,
    metric="logit_diff",
    memory_budget: int | str | None = "auto",
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    warn: bool = True,
) -> PathPatchingResult:
    """Exact path patching over sender groups x receiver groups, for several prompt pairs at once.

    Args:
        model, clean, corrupt, answers: as for `workbench.patching.sweep` (prompt pairs of one token length, or a
            `PromptPairs`; answers (correct, incorrect) single tokens).
        senders: labels ("embed", "L0H3", "MLP1"), group words ("heads", "mlps", "components", "layer 2"), or a
            list of them; an inner list is one group patched together, e.g. [["L2H0", "L2H3"], "L0H3"].
        receivers: "logits" (the direct path), "q" / "k" / "v" / "qkv" (each head's input on its own), "heads"
            (each head's q, k and v together), "mlps", labels ("L2H0.q", "L2H0", "MLP3"), or a list.
        direction: "denoising" or "noising". positions: None (every position) or positions to patch at.
        metric: as for `sweep` ("logit_diff" default; all built-ins are computed).
        memory_budget, batch_size, progress, cancel, run: execution settings (`workbench.core.Run`).
        warn: issue the result's warnings as UserWarnings.

    Returns:
        `PathPatchingResult` with raw metric values [metric, pair, sender, receiver] (NaN where the receiver comes
        before the sender), both baselines and a no-op check.
    """
    spec = CircuitSpec.resolve(
        model, clean, corrupt, answers, direction=direction, metric=metric, positions=positions
    )
    graph = Graph.of(model)
    sender_groups = graph.resolve_senders(senders)
    receiver_groups = graph.resolve_receivers(receivers)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    adjacency = graph.adjacency
    n = spec.n_pairs
    base_half, source_half = spec.halves()
    cells, rows = [], []
    for si, sg in enumerate(sender_groups):
        for ri, rg in enumerate(receiver_groups):
            edges = torch.tensor([(r, s) for r in rg for s in sg if adjacency[r, s]], dtype=torch.long)
            if len(edges):
                cells.append((si, ri))
                for p in range(n):
                    rows.append(Row(p, base_half.start + p, source_half.start + p, edges))
    every = torch.tensor(
        sorted({tuple(e) for row in rows for e in row.edges.tolist()}), dtype=torch.long
    ).view(-1, 2)
    # the no-op check: the clean run with every requested edge patched from the clean run itself
    noop_rows = [Row(p, p, p, every) for p in range(n)] if len(every) else []
    used = {u for row in rows for u in row.edges[:, 1].tolist()}
    cache, clean_m, corrupt_m, clean_lp = cached_runs(model, graph, spec, run, used)
    values = run_rows(
        model, graph, spec, cache, rows + noop_rows, run, clean_lp=clean_lp, desc="path patching"
    )
    raw = torch.full((len(spec.metrics), n, len(sender_groups), len(receiver_groups)), float("nan"))
    for c, (si, ri) in enumerate(cells):
        raw[:, :, si, ri] = values[:, c * n : (c + 1) * n]
    noop = values[:, len(rows) :] if noop_rows else clean_m.clone()
    i = spec.metric_index()
    messages = guards.checks(model, spec, clean_m, corrupt_m)
    if noop_rows:
        messages += guards.noop(noop[i], clean_m[i], corrupt_m[i], "every requested edge")
    result = PathPatchingResult(
        direction=spec.direction,
        senders=tuple(graph.group_label(g, "sender") for g in sender_groups),
        receivers=tuple(graph.group_label(g, "receiver") for g in receiver_groups),
        positions=spec.positions,
        raw=raw,
        noop=noop,
        **spec.run_fields(clean_m, corrupt_m),
        provenance=spec.provenance(
            "path_patch",
            senders=_plain_spec(senders),
            receivers=_plain_spec(receivers),
            positions=None if spec.positions is None else list(spec.positions),
        ),
        warnings=tuple(messages),
    )
    if warn:
        guards.issue(result.warnings)
    return result


def _plain_spec(spec):
    if isinstance(spec, str):
        return spec
    return [item if isinstance(item, str) else list(item) for item in spec]
