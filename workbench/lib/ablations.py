"""Node and edge ablations in a graph's basis, scored on held-out data.

- `node_ablation`: at one node layer keep the first k basis directions (the constant one first, then by Lambda or
  variance): f -> f C_k C_k^+, so ablated directions go to their mean; run the rest of the model; score.
- `edge_ablation`: keep the m largest edges of a section (edges to and from the constant direction are kept for
  free); each output direction is computed from a run of the section in which the input directions of its cut
  edges are set to 0 (their mean); bisect on m for the fewest edges that keep the score within `tolerance`.
"""

from __future__ import annotations

import dataclasses

import torch

from workbench.core import Run
from workbench.errors import InputError
from workbench.lib.build import LibGraph, collect_acts, float64_twin
from workbench.lib.data import LibData
from workbench.lib.models import LibModel
from workbench.results import Provenance, Result

# pandas is imported where a table is built: it is slow to import and the engine does not need it.


def exponential_schedule(n: int, every_below: int = 30, factor: float = 1.05) -> list[int]:
    """Directions kept: every k from 0 while k < `every_below` or while k * factor adds less than one, then k
    grows by `factor` (rounded), always ending at n."""
    ks = [0]
    while ks[-1] < n:
        k = ks[-1]
        ks.append(k + 1 if k < every_below else max(k + 1, round(k * factor)))
    ks[-1] = n
    return sorted(set(ks))


def _check(model: LibModel, graph: LibGraph, data: LibData) -> None:
    if not isinstance(graph, LibGraph):
        raise InputError(f"graph must be a LibGraph from build_graph, got {type(graph).__name__}")
    if not isinstance(data, LibData):
        raise InputError(f"data must be a LibData (modadd_data('test'), ...), got {type(data).__name__}")
    missing = [n for n in graph.node_layers if n not in model.node_layers]
    if missing:
        raise InputError(
            f"the graph's node layers {missing} are not node layers of {model.code}; was it built on another model?"
        )


def _scores(model: LibModel, start: int, f: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-example scores of the model run from node layer index `start` on activations f."""
    out = []
    with torch.no_grad():
        for a in range(0, len(f), rows):
            out.append(model.score(model.logits_from(start, f[a : a + rows]), y[a : a + rows]))
    return torch.cat(out)


def base_score(model: LibModel, data: LibData) -> float:
    """The unablated model's mean score on `data` (float64 run)."""
    m = float64_twin(model)
    with torch.no_grad():
        f = m.node_input(data.x)
    return float(_scores(m, 0, f, data.y, 4096).mean())


@dataclasses.dataclass(frozen=True)
class NodeAblation(Result):
    """Score against directions kept, per node layer.

    Axes: node layer (`layers`), point (directions kept, `kept`).

    Attributes:
        layers: the node layers ablated.
        basis: the graph's basis ("lib", "pca", "neuron").
        kept: per layer [point] directions kept (the constant one counts).
        scores: per layer [point] mean score (accuracy, or next-token loss for language models).
        n_directions: per layer, the basis size.
        base_score: the unablated model's score on the same data.
        metric: "accuracy" or "loss".
    """

    layers: tuple[str, ...]
    basis: str
    kept: tuple[torch.Tensor, ...]
    scores: tuple[torch.Tensor, ...]
    n_directions: tuple[int, ...]
    base_score: float
    metric: str
    data_code: str
    provenance: Provenance

    def score_at(self, layer: str, k: int) -> float:
        """The score with `k` directions kept at `layer` (k must be a point of the schedule)."""
        i = self._layer(layer)
        hits = (self.kept[i] == k).nonzero()
        if len(hits) == 0:
            raise InputError(
                f"k={k} was not a point of the ablation at {layer}; points: {self.kept[i].tolist()}"
            )
        return float(self.scores[i][hits[0, 0]])

    def min_kept(self, layer: str, threshold: float) -> int | None:
        """Fewest directions kept from which on every point scores at least `threshold` (accuracy) or at most it
        (loss); None if even the full basis does not."""
        i = self._layer(layer)
        ok = self.scores[i] >= threshold if self.metric == "accuracy" else self.scores[i] <= threshold
        if not bool(ok[-1]):
            return None
        bad = (~ok).nonzero()
        start = int(bad[-1, 0]) + 1 if len(bad) else 0
        return int(self.kept[i][start])

    def _layer(self, layer: str) -> int:
        if layer not in self.layers:
            raise InputError(f"{layer!r} was not ablated; layers: {list(self.layers)}")
        return self.layers.index(layer)

    def to_frame(self):
        import pandas as pd

        rows = [
            {"layer": layer, "basis": self.basis, "kept": int(k), self.metric: float(s)}
            for i, layer in enumerate(self.layers)
            for k, s in zip(self.kept[i].tolist(), self.scores[i].tolist())
        ]
        return pd.DataFrame(rows)


def node_ablation(
    model: LibModel,
    graph: LibGraph,
    data: LibData,
    *,
    layers=None,
    schedule: str | list[int] = "exponential",
    max_kept: int | None = None,
    batch_size: int | None = None,
    progress=True,
    cancel=None,
    run: Run | None = None,
) -> NodeAblation:
    """Score of `model` on `data` when only the first k directions of `graph`'s basis are kept at a node layer.

    layers: node layers to ablate (all but the logits by default), one at a time. schedule: "exponential"
    (every k up to 30, then x1.05; see `exponential_schedule`) or a list of k. max_kept: leave out points above
    it (wide layers such as MNIST's pixels). The full basis (k = its size) is always a point: it differs from the
    unablated model only by the truncated directions, which go to their mean. Progress and cancel per (layer, k).
    """
    run = Run.of(run, progress=progress, cancel=cancel, batch_size=batch_size)
    _check(model, graph, data)
    m = float64_twin(model)
    layers = [n for n in graph.node_layers if n != "output"] if layers is None else list(layers)
    for name in layers:
        if name not in graph.node_layers or name == "output":
            raise InputError(
                f"cannot ablate {name!r}: choose among {[n for n in graph.node_layers if n != 'output']}"
            )
    idx = [m.index(n) for n in layers]
    acts = collect_acts(m, data.x, idx, run)
    base = base_score(model, data)
    rows = run.batch_size or 4096
    plans = []
    if max_kept is not None and (isinstance(max_kept, bool) or not isinstance(max_kept, int) or max_kept < 0):
        raise InputError(f"max_kept must be a whole number >= 0, got {max_kept!r}")
    coords = {}
    for name, f in zip(layers, acts):
        n = graph.n_nodes(name)
        if schedule == "exponential":
            ks = exponential_schedule(n)
        else:
            if isinstance(schedule, str):
                raise InputError(f"schedule must be 'exponential' or a list of k, got {schedule!r}")
            ks = sorted({int(k) for k in schedule if 0 <= int(k) <= n} | {n})
        if max_kept is not None:
            ks = [k for k in ks if k <= max_kept or k == n]
        coords[name] = f @ graph.C[graph.layer_index(name)]  # f_hat, once per layer
        plans += [(name, k) for k in ks]

    def one(plan):
        name, k = plan
        C_pinv = graph.C_pinv[graph.layer_index(name)]
        f_hat = coords[name]
        g = (
            f_hat[..., :k] @ C_pinv[:k]
            if k > 0
            else torch.zeros(*f_hat.shape[:-1], C_pinv.shape[1], dtype=f_hat.dtype)
        )
        return float(_scores(m, m.index(name), g, data.y, rows).mean())

    results = run.map(plans, one, desc=f"{graph.basis.upper()} node ablation")
    kept, scores = [], []
    for name in layers:
        sel = [(k, s) for (n, k), s in zip(plans, results) if n == name]
        kept.append(torch.tensor([k for k, _ in sel]))
        scores.append(torch.tensor([s for _, s in sel], dtype=torch.float64))
    return NodeAblation(
        layers=tuple(layers),
        basis=graph.basis,
        kept=tuple(kept),
        scores=tuple(scores),
        n_directions=tuple(graph.n_nodes(n) for n in layers),
        base_score=base,
        metric=model.metric,
        data_code=data.code,
        provenance=Provenance.capture(
            model.code, data=data.code, basis=graph.basis, layers=layers, schedule=schedule, max_kept=max_kept
        ),
    )


# ---------------------------------------------------------------------------------------------------------------
# edges


@dataclasses.dataclass(frozen=True)
class EdgeAblation(Result):
    """Score against edges kept, per section, and the fewest edges that keep the score within `tolerance`.

    Axes: section (`sections`), point (edges kept, `tried`, in the order the bisection tried them).

    Attributes:
        sections: "in -> out" per section ablated.
        section_index: their indices among the graph's sections.
        tried: per section [point] numbers of (non-constant) edges kept.
        scores: per section [point] mean score.
        n_edges: per section, all non-constant edges.
        min_edges: per section, the fewest edges kept whose score is within `tolerance` of `base_score`.
        base_score: the unablated model's score.
        tolerance: allowed drop in accuracy (or rise in loss).
    """

    sections: tuple[str, ...]
    section_index: tuple[int, ...]
    basis: str
    tried: tuple[torch.Tensor, ...]
    scores: tuple[torch.Tensor, ...]
    n_edges: tuple[int, ...]
    min_edges: tuple[int, ...]
    base_score: float
    tolerance: float
    metric: str
    data_code: str
    provenance: Provenance

    def to_frame(self):
        import pandas as pd

        rows = [
            {
                "section": sec,
                "basis": self.basis,
                "edges_kept": int(k),
                self.metric: float(s),
                "min_edges": self.min_edges[i],
            }
            for i, sec in enumerate(self.sections)
            for k, s in zip(self.tried[i].tolist(), self.scores[i].tolist())
        ]
        return pd.DataFrame(rows)


def edge_mask(E: torch.Tensor, m: int, const_in: bool, const_out: bool) -> torch.Tensor:
    """Bool [k_out, k_in]: the `m` largest non-constant edges, plus every edge to or from the constant direction."""
    r0, c0 = int(const_out), int(const_in)
    sub = E[r0:, c0:]
    mask = torch.ones_like(E, dtype=torch.bool)
    keep = torch.zeros(sub.numel(), dtype=torch.bool)
    if m > 0:
        keep[torch.argsort(sub.flatten(), descending=True)[:m]] = True
    mask[r0:, c0:] = keep.reshape(sub.shape)
    return mask


def masked_section_scores(
    model: LibModel,
    graph: LibGraph,
    section: int,
    f_in: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    rows: int,
) -> torch.Tensor:
    """Per-example scores when each output direction of `section` sees only its kept input directions.

    Output directions that keep the same input directions share one run of the section; the runs of several such
    groups are stacked into one batch. Each group's input is built from the kept or the cut directions, whichever
    are fewer (cut ones are subtracted from the full reconstruction).
    """
    a_name, b_name = graph.node_layers[section], graph.node_layers[section + 1]
    ia, ib = model.index(a_name), model.index(b_name)
    C_in, C_in_pinv = graph.C[section], graph.C_pinv[section]
    C_out, C_out_pinv = graph.C[section + 1], graph.C_pinv[section + 1]
    unique, inverse = torch.unique(mask, dim=0, return_inverse=True)
    groups = [((inverse == u).nonzero().flatten(), in_mask) for u, in_mask in enumerate(unique)]
    out = []
    with torch.no_grad():
        for a in range(0, len(f_in), rows):
            f_hat = f_in[a : a + rows] @ C_in
            full = f_hat @ C_in_pinv
            n = len(f_hat)
            per_batch = max(1, (4 * rows) // n)
            new = None
            for g0 in range(0, len(groups), per_batch):
                batch = groups[g0 : g0 + per_batch]
                inputs = []
                for _, in_mask in batch:
                    kept, cut = in_mask.nonzero().flatten(), (~in_mask).nonzero().flatten()
                    if len(kept) <= len(cut):
                        inputs.append(f_hat[..., kept] @ C_in_pinv[kept])
                    else:
                        inputs.append(full - f_hat[..., cut] @ C_in_pinv[cut])
                f_out = model.run(torch.cat(inputs), ia, ib)
                for j, (outs, _) in enumerate(batch):
                    rows_j = f_out[j * n : (j + 1) * n]
                    part = rows_j @ C_out[:, outs] if C_out is not None else rows_j[..., outs]
                    if new is None:
                        new = torch.zeros(*part.shape[:-1], len(mask), dtype=part.dtype)
                    new[..., outs] = part
            f_b = new @ C_out_pinv if C_out is not None else new
            out.append(model.score(model.logits_from(ib, f_b), y[a : a + rows]))
    return torch.cat(out)


def edge_ablation(
    model: LibModel,
    graph: LibGraph,
    data: LibData,
    *,
    sections=None,
    tolerance: float = 0.001,
    points: list[int] | None = None,
    batch_size: int | None = None,
    progress=True,
    cancel=None,
    run: Run | None = None,
) -> EdgeAblation:
    """Fewest edges per section that keep the score within `tolerance` of the unablated model (bisection).

    sections: section indices (all by default). points: extra numbers of kept edges to score (for a curve).
    Progress and cancel per evaluation.
    """
    run = Run.of(run, progress=progress, cancel=cancel, batch_size=batch_size)
    _check(model, graph, data)
    graph._require_edges()
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise InputError(f"tolerance must be a number >= 0, got {tolerance!r}")
    m = float64_twin(model)
    n_sec = len(graph.sections)
    sections = list(range(n_sec)) if sections is None else [int(s) for s in sections]
    for s in sections:
        if not 0 <= s < n_sec:
            raise InputError(f"section {s} is out of range: the graph has sections 0..{n_sec - 1}")
    base = base_score(model, data)
    higher = model.higher_is_better
    rows = run.batch_size or 2048

    def ok(score: float) -> bool:
        return score >= base - tolerance if higher else score <= base + tolerance

    caches: dict[int, dict[int, float]] = {s: {} for s in sections}
    totals: dict[int, int] = {}

    def evaluations():
        """Scores one (section, edges kept) per step: the extra points, then the bisection (whose next point
        depends on the last score)."""
        for s in sections:
            (f_in,) = collect_acts(m, data.x, [m.index(graph.node_layers[s])], run)
            E = graph.edges[s]
            const_in, const_out = graph.has_const(s), graph.has_const(s + 1)
            total = totals[s] = E[int(const_out) :, int(const_in) :].numel()
            cache = caches[s]

            def score(
                k: int, E=E, cache=cache, s=s, f_in=f_in, const_in=const_in, const_out=const_out
            ) -> float:
                if k not in cache:
                    mask = edge_mask(E, k, const_in, const_out)
                    cache[k] = float(masked_section_scores(m, graph, s, f_in, data.y, mask, rows).mean())
                return cache[k]

            for k in points or []:
                yield score(min(max(int(k), 0), total))
            lo, hi = 0, total
            if not ok(score(hi)):
                continue
            yield
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ok(score(mid)):
                    hi = mid
                else:
                    lo = mid
                yield

    n_steps = sum(len(points or []) + 2 + graph.edges[s].numel().bit_length() for s in sections)
    steps = evaluations()
    for _ in run.steps(n_steps, desc=f"{graph.basis.upper()} edge ablation"):
        if next(steps, StopIteration) is StopIteration:
            break
    for _ in steps:  # n_steps is an upper bound; this only runs if it was not
        run.check()
    tried_all, scores_all, n_edges, min_edges = [], [], [], []
    for s in sections:
        cache = caches[s]
        kept_ok = sorted(k for k, v in cache.items() if ok(v))
        min_edges.append(kept_ok[0] if kept_ok else totals[s])
        tried_all.append(torch.tensor(list(cache)))
        scores_all.append(torch.tensor(list(cache.values()), dtype=torch.float64))
        n_edges.append(totals[s])
    return EdgeAblation(
        sections=tuple(f"{graph.node_layers[s]} -> {graph.node_layers[s + 1]}" for s in sections),
        section_index=tuple(sections),
        basis=graph.basis,
        tried=tuple(tried_all),
        scores=tuple(scores_all),
        n_edges=tuple(n_edges),
        min_edges=tuple(min_edges),
        base_score=base,
        tolerance=float(tolerance),
        metric=model.metric,
        data_code=data.code,
        provenance=Provenance.capture(
            model.code, data=data.code, basis=graph.basis, sections=sections, tolerance=tolerance
        ),
    )
