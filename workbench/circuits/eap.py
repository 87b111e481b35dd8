"""Edge attribution patching: a score for every edge of the component graph from a few backward passes.

EAP (Syed et al. 2023) estimates the effect of patching edge u -> v to first order:

    M(edge patched) - M(base)  ~  (u_source - u_base) . dM/d(input_v) |_base

summed over positions. dM/d(input_v) is the gradient of the metric with respect to receiver v's own input (one
head's query, key or value input, an MLP's input, or the final norm's input), which the engine gets by giving
each receiver its own copy of the residual stream inside the trace (the `q_input` / `k_input` / `v_input` /
`mlp_in` sites) and reading that copy's gradient. One forward and one backward pass give every edge's score.

EAP-IG (Hanna et al. 2024) replaces the gradient at the base run by its average over `steps` runs whose input
embeddings lie on the straight line from the base run's to the source run's (here at the midpoints of `steps`
equal intervals; Hanna et al.'s code takes left endpoints from the corrupt run: both converge to the same
integral). It costs `steps` forward and backward passes and is better where the model is far from linear.

``method="exact"`` patches every edge on its own (one forward pass per edge and pair): the ground truth the
estimates are checked against.

A circuit is the set of top-k edges by |score|; `faithfulness` measures how much of the behaviour it carries
with every other edge corrupted, and verifies the strongest edges' scores by exact edge patching.
"""

from __future__ import annotations

import nnsight
import torch

from workbench.circuits import guards
from workbench.circuits.edges import Row, cached_runs, run_rows
from workbench.circuits.graph import Graph
from workbench.circuits.results import EdgeScores, Faithfulness
from workbench.circuits.spec import CircuitSpec
from workbench.core import CancelToken, Run, chunks
from workbench.errors import InputError
from workbench.models.prefix import bytes_per_row

METHODS = ("eap", "eap-ig", "exact")


def edge_attribution(
    model,
    clean,
    corrupt=None,
    answers=None,
    *,
    method: str = "eap",
    steps: int = 5,
    direction: str = "noising",
    positions=None,
    metric="logit_diff",
    memory_budget: int | str | None = "auto",
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    warn: bool = True,
) -> EdgeScores:
    """Score every edge of the component graph (see the module docstring).

    Args:
        model, clean, corrupt, answers: as for `workbench.patching.sweep`.
        method: "eap", "eap-ig" or "exact". steps: integrated-gradient points for "eap-ig".
        direction: "noising" (default, as in Syed et al. and Hanna et al.: the gradient is taken at the clean run
            and an edge is scored by corrupting it) or "denoising" (at the corrupt run, restoring one clean edge).
        positions: None (edges carry every position) or the positions an edge's patch applies at.
        metric: the metric whose change is scored ("logit_diff" default; also computed: the other built-ins'
            baselines).
        memory_budget, batch_size, progress, cancel, run: execution settings (`workbench.core.Run`).

    Returns:
        `EdgeScores` with scores [pair, receiver, sender] in metric units.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}: use 'eap', 'eap-ig' (integrated gradients) or 'exact'.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps={steps!r}: integrated gradients need a positive whole number of points.")
    spec = CircuitSpec.resolve(
        model, clean, corrupt, answers, direction=direction, metric=metric, positions=positions
    )
    graph = Graph.of(model)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    cache, clean_m, corrupt_m, clean_lp = cached_runs(model, graph, spec, run)
    adjacency = graph.adjacency
    if method == "exact":
        scores = _exact_scores(model, graph, spec, cache, clean_m, corrupt_m, clean_lp, run)
    else:
        scores = _gradient_scores(
            model, graph, spec, cache, clean_lp, run, steps if method == "eap-ig" else 0
        )
    messages = guards.checks(model, spec, clean_m, corrupt_m)
    result = EdgeScores(
        method=method,
        steps=steps if method == "eap-ig" else 1,
        direction=spec.direction,
        senders=tuple(s.label for s in graph.senders),
        receivers=tuple(r.label for r in graph.receivers),
        adjacency=adjacency,
        scores=scores * adjacency,
        positions=spec.positions,
        **spec.rerun_fields(clean_m, corrupt_m),
        clean_tokens=spec.pairs.clean_tokens,
        answers=spec.pairs.answer_tokens,
        provenance=spec.provenance(
            f"edge_attribution:{method}",
            steps=steps,
            positions=None if spec.positions is None else list(spec.positions),
        ),
        warnings=tuple(messages),
    )
    if warn:
        guards.issue(result.warnings)
    return result


def _exact_scores(model, graph, spec, cache, clean_m, corrupt_m, clean_lp, run) -> torch.Tensor:
    n = spec.n_pairs
    base_half, source_half = spec.halves()
    edges = graph.edges()
    rows = [
        Row(p, base_half.start + p, source_half.start + p, torch.tensor([edge]))
        for edge in edges
        for p in range(n)
    ]
    values = run_rows(model, graph, spec, cache, rows, run, clean_lp=clean_lp, desc="exact edge patching")
    base = spec.base_run(clean_m, corrupt_m)[spec.metric_index()]
    change = values[spec.metric_index()].view(len(edges), n) - base
    scores = torch.zeros(n, len(graph.receivers), len(graph.senders))
    for e, (r, s) in enumerate(edges):
        scores[:, r, s] = change[e]
    return scores


def _gradient_scores(model, graph, spec, cache, clean_lp, run, steps: int) -> torch.Tensor:
    """EAP (steps=0) or EAP-IG scores [pair, receiver, sender]."""
    n = spec.n_pairs
    base_half, source_half = spec.halves()
    c = model.cfg
    pos_mask = torch.ones(spec.pairs.n_pos)
    if spec.positions is not None:
        pos_mask = torch.zeros(spec.pairs.n_pos)
        pos_mask[list(spec.positions)] = 1.0
    # every sender's difference between the source and the base run [pair, sender, pos, d_model]
    delta = torch.stack(
        [(cache[u][source_half] - cache[u][base_half]).float() for u in range(len(graph.senders))], 1
    )
    # on the CPU, beside the gradients (the trace hands those back there); the cache sits where the model ran
    delta = delta.cpu() * pos_mask[None, None, :, None]
    alphas = [None] if steps == 0 else [(k + 0.5) / steps for k in range(steps)]
    items = [(p, a) for p in range(n) for a in alphas]
    tokens = spec.base_tokens
    embed = cache[0]
    metric = spec.metrics[spec.metric_index()]
    n_pos = spec.pairs.n_pos
    per_row = 3 * bytes_per_row(model, n_pos) + 4 * n_pos * c.d_model * (3 * c.n_heads + 2) * 4
    chunk = run.rows_per_chunk(per_row, model.device, 64)
    spans = chunks(len(items), chunk)
    scores = torch.zeros(n, len(graph.receivers), len(graph.senders))
    weight = 1.0 / len(alphas)

    def one(span) -> None:
        part = items[span[0] : span[1]]
        pair = torch.tensor([p for p, _ in part])
        embed_in = None
        if steps:
            alpha = torch.tensor([a for _, a in part]).view(-1, 1, 1)
            base_e, src_e = embed[base_half][pair], embed[source_half][pair]
            embed_in = (base_e + alpha.to(base_e.device) * (src_e - base_e)).to(model.device)
        grads = _receiver_grads(
            model,
            tokens[pair].to(model.device),
            embed_in,
            metric,
            spec.pairs.answers[pair].to(model.device),
            clean_lp[pair].to(model.device),
        )
        g = _flatten_grads(graph, grads)  # [row, receiver, pos, d_model]
        s = torch.einsum("rvpd,rupd->rvu", g, delta[pair])
        scores.index_add_(0, pair, s * weight)

    run.map(spans, one, desc="edge attribution" if not steps else f"EAP-IG ({steps} steps)")
    return scores


def _receiver_grads(model, tokens, embed_in, metric, answers, clean_lp) -> dict:
    """dM/d(input) of every receiver at the run of `tokens` (with `embed_in` as the residual entering layer 0
    when given): {("q"|"k"|"v", layer): [row, pos, head, d_model], ("mlp", layer): [row, pos, d_model],
    "logits": [row, pos, d_model]}."""
    c = model.cfg
    kwargs = {} if metric.all_positions else {"logits_to_keep": 1}
    with torch.enable_grad(), model.trace(tokens, **kwargs):
        if embed_in is None:
            start = model.site("embed").value
            start.requires_grad_(True)
        else:
            start = embed_in.clone().requires_grad_(True)
            model.site("resid_pre", 0).value = start
        copies = []
        for layer in range(c.n_layers):
            x = model.site("q_input", layer).value[:, :, 0]
            for which in "qkv":
                n = c.n_heads if which == "q" else c.n_kv_heads
                xi = x.unsqueeze(2).expand(-1, -1, n, -1).clone()
                model.site(f"{which}_input", layer).set_head_inputs(xi)
                copies.append(((which, layer), xi))
            handle = model.site("mlp_in", layer)
            xm = handle.value.clone()
            handle.value = xm
            copies.append((("mlp", layer), xm))
        lnf = model.submodule("ln_final")
        xf = lnf.input.clone()
        lnf.input = xf
        copies.append(("logits", xf))
        logits = model.site("logits").value
        value = metric(logits if metric.all_positions else logits[:, -1], answers, clean_lp)
        grads = {}
        with value.sum().backward(inputs=[start]):
            for key, copy in reversed(copies):
                grads[key] = copy.grad.clone()
        grads = nnsight.save({k: v.detach().float().cpu() for k, v in grads.items()})
    return grads


def _flatten_grads(graph: Graph, grads: dict) -> torch.Tensor:
    """[row, receiver, pos, d_model] in the graph's receiver order."""
    out = []
    for node in graph.receivers:
        if node.kind == "logits":
            out.append(grads["logits"])
        elif node.kind == "mlp":
            out.append(grads[("mlp", node.layer)])
        else:
            out.append(grads[(node.kind, node.layer)][:, :, node.head])
    return torch.stack(out, 1)


# -- circuits ---------------------------------------------------------------------------------------------------


def faithfulness(
    model,
    scores: EdgeScores,
    *,
    ks=None,
    verify: int = 10,
    memory_budget: int | str | None = "auto",
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
) -> Faithfulness:
    """The faithfulness curve of the circuits a scoring gives, and its strongest edges checked exactly.

    For each k in `ks` the circuit is the top-k edges by |score|: the clean run is patched with the corrupt run's
    values along every *other* edge, and the metric is normalised (1 = clean, 0 = corrupt). The `verify`
    strongest edges are then patched one at a time in the scoring's direction and their exact change is set
    beside the estimate. Costs len(ks) + verify forward passes per pair.

    Args:
        scores: an `EdgeScores` of this model (from `edge_attribution`); its prompts are rerun.
        ks: circuit sizes (default: 0, 1, 2, 5, 10, 20, 50, ... up to every edge).
    """
    if not isinstance(scores, EdgeScores):
        raise InputError("faithfulness takes the EdgeScores that edge_attribution returns.")
    graph = Graph.of(model)
    if tuple(s.label for s in graph.senders) != scores.senders:
        raise InputError("These edge scores were computed for a model with another graph (layers or heads).")
    n_edges = scores.n_edges
    if ks is None:
        ks = sorted(
            {k for k in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if k < n_edges} | {n_edges}
        )
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 0 or ks[-1] > n_edges:
        raise InputError(f"ks={ks!r}: circuit sizes must lie in 0..{n_edges} (the number of edges).")
    verify = max(0, min(int(verify), n_edges))
    spec = CircuitSpec.rerun(model, scores, scores.positions)
    run = Run.of(run, progress=progress, cancel=cancel, memory_budget=memory_budget, batch_size=batch_size)
    ranked = scores.edge_list()
    n = spec.n_pairs
    cache, clean_m, corrupt_m, clean_lp = cached_runs(model, graph, spec, run)
    rows = []
    for k in ks:
        outside = torch.tensor([(r, s) for r, s, _ in ranked[k:]], dtype=torch.long).view(-1, 2)
        rows += [Row(p, p, n + p, outside) for p in range(n)]  # the clean run, corrupt values outside
    base_half, source_half = spec.halves()
    for r, s, _ in ranked[:verify]:
        rows += [Row(p, base_half.start + p, source_half.start + p, torch.tensor([[r, s]])) for p in range(n)]
    every = torch.tensor([(r, s) for r, s, _ in ranked], dtype=torch.long)
    rows += [Row(p, p, p, every) for p in range(n)]  # the no-op check: every edge from the clean run itself
    empty = [i for i, row in enumerate(rows) if len(row.edges) == 0]
    live = [i for i in range(len(rows)) if i not in set(empty)]
    values = torch.full((len(spec.metrics), len(rows)), float("nan"))
    if live:
        values[:, live] = run_rows(
            model, graph, spec, cache, [rows[i] for i in live], run, clean_lp=clean_lp, desc="faithfulness"
        )
    for i in empty:  # no edge outside the circuit: the clean run itself
        values[:, i] = clean_m[:, rows[i].pair]
    curve = values[:, : len(ks) * n].view(len(spec.metrics), len(ks), n).transpose(1, 2)
    i = spec.metric_index()
    base = spec.base_run(clean_m, corrupt_m)[i]
    exact = values[i, len(ks) * n : (len(ks) + verify) * n].view(verify, n) - base
    noop = values[i, (len(ks) + verify) * n :]
    estimate = torch.tensor([scores.scores[:, r, s].mean().item() for r, s, _ in ranked[:verify]])
    return Faithfulness(
        method=scores.method,
        direction=scores.direction,
        ks=torch.tensor(ks),
        n_edges=n_edges,
        circuit_values=curve,
        metrics=tuple(m.name for m in spec.metrics),
        metric=spec.metric,
        clean=clean_m,
        corrupt=corrupt_m,
        verified_senders=tuple(scores.senders[s] for _, s, _ in ranked[:verify]),
        verified_receivers=tuple(scores.receivers[r] for r, _, _ in ranked[:verify]),
        verified_estimate=estimate,
        verified_exact=exact.mean(1),
        provenance=spec.provenance("faithfulness", ks=ks, verify=verify, scores_method=scores.method),
        warnings=tuple(scores.warnings) + tuple(guards.noop(noop, clean_m[i], corrupt_m[i], "every edge")),
    )
