"""Exact edge patching, batched: the machinery under path patching, faithfulness curves and edge verification.

A *row* is one patched run: the base prompt of a pair, a source run, and a set of edges (receiver, sender) of
the component graph (`workbench.circuits.graph`). In the row's run every patched edge's receiver reads
``(its input in this run) + (sender in the source run - sender in this run)``; nothing else changes, and all
downstream computation is redone. How rows run:

1. One trace over [clean; corrupt] caches every sender's output that some edge uses (each head's ``z @ W_O``,
   each MLP's output, the embedding), the residual entering every layer, and the baselines' logits.
2. Rows are sorted by the first layer they touch and batched. Blocks below that layer compute nothing that
   differs from the base run, so they are skipped and the cached base residual is fed in (locally; a remote
   model runs them). Senders below it are the base run's, so their differences come from the cache; senders at
   or above it are read in the run itself, row by row (an earlier patched receiver may have changed them).
3. At each receiver the summed differences of its patched edges are added to its input: for a head's query
   (key, value) through the `q_input` (`k_input`, `v_input`) site, which normalises and projects that head's
   input alone (only for the rows that patch it); for an MLP through `mlp_in`; for the logits at the final
   norm's input.
"""

from __future__ import annotations

import dataclasses

import nnsight
import torch

from workbench.circuits.graph import Graph
from workbench.core import chunks, concat
from workbench.models.prefix import bytes_per_row, enter_at

_DEFAULT_MAX_ROWS = {"cpu": 128, "cuda": 1024}


@dataclasses.dataclass(frozen=True)
class Row:
    """One patched run: `base` and `source` index the [clean; corrupt] batch (0..n-1 clean, n..2n-1 corrupt);
    `edges` [edge, 2] holds (receiver, sender) indices into the graph."""

    pair: int
    base: int
    source: int
    edges: torch.Tensor


def head_results(model, layer: int, heads: list[int] | None = None) -> torch.Tensor:
    """Inside a trace: [batch, pos, len(heads), d_model] each head's output in the residual basis (z @ W_O),
    with the weights read through the trace (so it also runs on NDIF)."""
    cfg = model.cfg
    heads = list(range(cfg.n_heads)) if heads is None else list(heads)
    z = model.site("z", layer).value[:, :, heads]
    w = model.submodule("out_proj", layer).weight
    w = w if model.adapter.weights_transposed else w.T
    w = w.reshape(cfg.n_heads, cfg.d_head, cfg.d_model)[heads]
    return torch.einsum("bphd,hdm->bphm", z.to(w.dtype), w)


def cached_runs(model, graph: Graph, spec, run, senders: set[int] | None = None):
    """`sender_cache` of the [clean; corrupt] runs of `spec` (every sender unless `senders`) and the baselines:
    (cache, clean [metric, pair], corrupt [metric, pair], the clean run's last-position log-probs)."""
    tokens = torch.cat([spec.pairs.clean, spec.pairs.corrupt])
    senders = set(range(len(graph.senders))) if senders is None else senders
    cache = sender_cache(model, graph, tokens, senders, run, all_positions=spec.all_positions)
    return (cache, *spec.baselines(cache["logits"]))


def sender_cache(model, graph: Graph, tokens: torch.Tensor, senders: set[int], run, *, all_positions: bool):
    """Per sender (index) its output [2n, pos, d_model] on `tokens` ([clean; corrupt]), the residual entering
    every layer ("resid", layer), the final norm's input "final", and "logits" [2n, (pos,) d_vocab]."""
    head_layers = sorted({graph.senders[u].layer for u in senders if graph.senders[u].kind == "head"})
    mlp_layers = sorted({graph.senders[u].layer for u in senders if graph.senders[u].kind == "mlp"})
    chunk = run.rows_per_chunk(
        bytes_per_row(model, tokens.shape[1], extra=4 * tokens.shape[1] * model.cfg.d_model * len(senders)),
        model.device,
        _DEFAULT_MAX_ROWS.get(torch.device(model.device).type, 128),
    )
    parts = [
        _cache_trace(model, tokens[a:b].to(model.device), head_layers, mlp_layers, all_positions)
        for a, b in chunks(len(tokens), chunk)
    ]
    cache = concat(parts) if len(parts) > 1 else parts[0]
    out = {("resid", layer): cache[("resid", layer)] for layer in range(graph.n_layers)}
    out["final"], out["logits"] = cache["final"], cache["logits"]
    for u in senders:
        node = graph.senders[u]
        if node.kind == "embed":
            out[u] = cache[("resid", 0)]
        elif node.kind == "head":
            out[u] = cache[("heads", node.layer)][:, :, node.head]
        else:
            out[u] = cache[("mlp", node.layer)]
    return out


def _cache_trace(model, tokens, head_layers, mlp_layers, all_positions: bool) -> dict:
    kwargs = {} if all_positions else {"logits_to_keep": 1}
    with torch.no_grad(), model.trace(tokens, **kwargs):
        out = {}
        for layer in range(model.cfg.n_layers):
            out[("resid", layer)] = model.site("resid_pre", layer).value.clone()
            if layer in head_layers:
                out[("heads", layer)] = head_results(model, layer).clone()
            if layer in mlp_layers:
                out[("mlp", layer)] = model.site("mlp_out", layer).value.clone()
        out["final"] = model.submodule("ln_final").input.clone()
        logits = model.site("logits").value
        out["logits"] = (logits if all_positions else logits[:, -1]).clone()
        nnsight.save(out)
    return {k: v.detach() for k, v in out.items()}


def first_layer(graph: Graph, row: Row) -> int:
    """The first layer whose input a row changes (n_layers for the logits alone)."""
    layers = [graph.receivers[r].layer for r in row.edges[:, 0].tolist()]
    return min((graph.n_layers if layer is None else layer) for layer in layers) if layers else graph.n_layers


def run_rows(model, graph: Graph, spec, cache: dict, rows: list[Row], run, *, clean_lp, desc="edge patching"):
    """[metric, row] metric values of the patched runs (see the module docstring)."""
    tokens = torch.cat([spec.pairs.clean, spec.pairs.corrupt])
    order = sorted(range(len(rows)), key=lambda i: first_layer(graph, rows[i]))
    senders = sorted({u for row in rows for u in row.edges[:, 1].tolist()})
    c, n_pos = model.cfg, tokens.shape[1]
    extra = 4 * n_pos * c.d_model * (2 * len(senders) + 3 * c.n_heads + 2) + 4 * len(graph.receivers) * len(
        senders
    )
    chunk = run.rows_per_chunk(
        bytes_per_row(model, n_pos, logit_pos=n_pos if spec.all_positions else 1, extra=extra),
        model.device,
        _DEFAULT_MAX_ROWS.get(torch.device(model.device).type, 128),
    )
    # chunks never mix first layers, so each chunk skips as many blocks as it can
    chunks, current = [], []
    for i in order:
        if current and (
            len(current) == chunk or first_layer(graph, rows[i]) != first_layer(graph, rows[current[0]])
        ):
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    out = torch.full((len(spec.metrics), len(rows)), float("nan"))

    def one(idx: list[int]) -> None:
        logits = patched_logits(model, graph, spec, cache, tokens, [rows[i] for i in idx])
        pair = torch.tensor([rows[i].pair for i in idx])
        out[:, idx] = spec.evaluate(logits, pair, clean_lp).cpu()

    run.map(chunks, one, desc=desc, weights=[len(ch) for ch in chunks])
    return out


@dataclasses.dataclass(frozen=True)
class _Layer:
    """What the patched trace does at one layer (plain data, so it can travel to NDIF)."""

    layer: int
    qkv: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (q|k|v, heads, receiver columns)
    head_heads: tuple[int, ...]  # heads of this layer whose outputs are senders in this chunk
    head_cols: tuple[int, ...]  # their columns among the chunk's senders
    mlp_recv: int | None  # receiver column of this layer's MLP input
    mlp_col: int | None  # sender column of this layer's MLP output


def patched_logits(
    model, graph: Graph, spec, cache: dict, tokens: torch.Tensor, rows: list[Row]
) -> torch.Tensor:
    """Logits [row, d_vocab] (or [row, pos, d_vocab]) of one chunk of rows that share their first layer."""
    device = model.device
    base_idx = torch.tensor([r.base for r in rows])
    src_idx = torch.tensor([r.source for r in rows])
    start = first_layer(graph, rows[0])
    senders = sorted({u for r in rows for u in r.edges[:, 1].tolist()})
    receivers = sorted({v for r in rows for v in r.edges[:, 0].tolist()})
    col = {u: j for j, u in enumerate(senders)}
    rcol = {v: j for j, v in enumerate(receivers)}
    mask = torch.zeros(len(rows), len(receivers), len(senders))
    for i, r in enumerate(rows):
        e = r.edges
        mask[i, [rcol[v] for v in e[:, 0].tolist()], [col[u] for u in e[:, 1].tolist()]] = 1.0
    pos_mask = torch.ones(tokens.shape[1])
    if spec.positions is not None:
        pos_mask = torch.zeros(tokens.shape[1])
        pos_mask[list(spec.positions)] = 1.0
    pos_mask = pos_mask[None, :, None]
    # below the first layer every sender is the base run's: its difference comes from the cache; above it the
    # trace subtracts the value it reads from the source value stored here
    diffs = torch.stack(
        [cache[u][src_idx] - (cache[u][base_idx] if _below(graph, u, start) else 0) for u in senders],
        1,
    ).float()
    diffs = diffs * pos_mask.unsqueeze(1).to(diffs.device)  # (the cache sits where the model ran)
    plan = []
    for layer in range(start, graph.n_layers):
        qkv = []
        for which in "qkv":
            sel = [
                v for v in receivers if graph.receivers[v].kind == which and graph.receivers[v].layer == layer
            ]
            if sel:
                qkv.append((which, tuple(graph.receivers[v].head for v in sel), tuple(rcol[v] for v in sel)))
        heads = [u for u in senders if graph.senders[u].kind == "head" and graph.senders[u].layer == layer]
        mlp_r = [
            v for v in receivers if graph.receivers[v].kind == "mlp" and graph.receivers[v].layer == layer
        ]
        mlp_s = [u for u in senders if graph.senders[u].kind == "mlp" and graph.senders[u].layer == layer]
        step = _Layer(
            layer,
            tuple(qkv),
            tuple(graph.senders[u].head for u in heads),
            tuple(col[u] for u in heads),
            rcol[mlp_r[0]] if mlp_r else None,
            col[mlp_s[0]] if mlp_s else None,
        )
        if step.qkv or step.head_heads or step.mlp_recv is not None or step.mlp_col is not None:
            plan.append(step)
    logits_recv = rcol.get(len(graph.receivers) - 1)
    enter = cache[("resid", start)][base_idx] if start < graph.n_layers else cache["final"][base_idx]
    skip = model.remote is False
    return _patched_trace(
        model,
        tokens[base_idx].to(device),
        start,
        enter.to(device) if skip else None,
        tuple(plan),
        mask.to(device),
        diffs.to(device),
        pos_mask.to(device),
        logits_recv,
        spec.all_positions,
    )


def _below(graph: Graph, sender: int, layer: int) -> bool:
    node = graph.senders[sender]
    return node.kind == "embed" or node.layer < layer


def deltas(mask: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    """[row, receiver, pos, d_model]: each receiver's summed sender differences; mask [row, receiver, sender],
    diffs [row, sender, pos, d_model]."""
    return torch.einsum("rvu,rupd->rvpd", mask, diffs)


def entry_deltas(mask: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    """[entry, pos, d_model]: one receiver's summed sender differences per entry; mask [entry, sender], diffs
    [entry, sender, pos, d_model]."""
    return torch.einsum("eu,eupd->epd", mask, diffs)


def _patched_trace(model, tokens, start, enter, plan, mask, diffs, pos_mask, logits_recv, all_positions):
    kwargs = {} if all_positions else {"logits_to_keep": 1}
    with torch.no_grad(), model.trace(tokens, **kwargs):
        if enter is not None:
            enter_at(model, start, enter)
        for step in plan:
            if step.qkv:
                x = model.site("q_input", step.layer).value[:, :, 0]
                for which, heads, cols in step.qkv:
                    rows, entries = mask[:, list(cols)].any(-1).nonzero(as_tuple=True)
                    d = entry_deltas(mask[rows, torch.tensor(cols, device=rows.device)[entries]], diffs[rows])
                    model.site(f"{which}_input", step.layer).set_head_inputs_at(
                        rows, torch.tensor(heads, device=rows.device)[entries], x[rows] + d.to(x.dtype)
                    )
            if step.head_cols:
                res = head_results(model, step.layer, list(step.head_heads)).transpose(1, 2)
                diffs[:, list(step.head_cols)] -= res.float() * pos_mask.unsqueeze(1)
            if step.mlp_recv is not None:
                handle = model.site("mlp_in", step.layer)
                old = handle.value
                handle.value = old + deltas(mask[:, [step.mlp_recv]], diffs)[:, 0].to(old.dtype)
            if step.mlp_col is not None:
                out = model.site("mlp_out", step.layer).value
                diffs[:, step.mlp_col] -= out.float() * pos_mask
        if logits_recv is not None:
            lnf = model.submodule("ln_final")
            x = lnf.input
            lnf.input = x + deltas(mask[:, [logits_recv]], diffs)[:, 0].to(x.dtype)
        logits = model.site("logits").value
        result = (logits if all_positions else logits[:, -1]).save()
    return result
