"""Figures for the circuit engines: path-patching grids, the edge graph, faithfulness curves, AtP vs exact, the
logit lens, direct logit attribution and attention patterns. Pure functions of results; they never run a model.

Colours follow the patching figures: a diverging scale centred on "no effect" (blue towards the clean answer, red
away from it), never clipped, so negative components stay visible.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.circuits import results
from workbench.viz.common import edge_dots
from workbench.viz.registry import draws

COLORSCALE = "RdBu"
POSITIVE, NEGATIVE = "#2166ac", "#b2182b"
_DASH = {"q": "solid", "k": "dash", "v": "dot", "mlp": "solid", "logits": "solid"}


def _layout(fig: go.Figure, title: str, height: int, **kwargs) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01},
        height=height,
        template="plotly_white",
        margin={"l": 70, "r": 20, "t": 80, "b": 70},
        **kwargs,
    )
    return fig


# -- path patching ------------------------------------------------------------------------------------------------


@draws(results.PathPatchingResult)
def path_heatmap(
    result: results.PathPatchingResult,
    metric: str | None = None,
    normalize: bool = True,
    pair: int | None = None,
    height: int | None = None,
) -> go.Figure:
    """Senders (rows) x receivers (columns); empty where a receiver comes before the sender."""
    values = result.values(metric, normalize, per_pair=pair is not None)
    if pair is not None:
        values = values[pair]
    base = result.base_level(metric, normalize)
    z = values.numpy()
    finite = np.abs(z[np.isfinite(z)] - base)
    reach = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    unit = "normalised " if normalize else ""
    label = f"{unit}{metric or result.metric}" + (" (0 = corrupt, 1 = clean)" if normalize else "")
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(result.receivers),
            y=list(result.senders),
            colorscale=COLORSCALE,
            zmid=base,
            zmin=base - reach,
            zmax=base + reach,
            hovertemplate="sender %{y}<br>receiver %{x}<br>value %{z:.4g}<extra></extra>",
            colorbar={"title": {"text": label, "side": "right", "font": {"size": 11}}},
            xgap=1,
            ygap=1,
        )
    )
    fig.update_xaxes(title_text="receiver", type="category", tickangle=-45)
    fig.update_yaxes(title_text="sender", type="category", autorange="reversed")
    who = f"pair {pair}" if pair is not None else f"mean of {result.n_pairs} pairs"
    where = "" if result.positions is None else f" at positions {list(result.positions)}"
    return _layout(
        fig,
        f"Path patching ({result.direction}{where}): senders into receivers only<br>{label}; {who}",
        height or max(420, 22 * len(result.senders) + 200),
    )


# -- the edge graph -----------------------------------------------------------------------------------------------


def node_positions(n_layers: int, n_heads: int) -> dict[str, tuple[float, float]]:
    """x, y of every drawn node: columns embed | L0 heads | MLP0 | L1 heads | ... | logits; heads stacked above
    the line that carries the embedding, the MLPs and the logits."""
    line = -1.5
    pos = {"embed": (0.0, line), "logits": (2.0 * n_layers + 1, line)}
    for layer in range(n_layers):
        for h in range(n_heads):
            pos[f"L{layer}H{h}"] = (2.0 * layer + 1, float(h))
        pos[f"MLP{layer}"] = (2.0 * layer + 2, line)
    return pos


def _curve(a: tuple[float, float], b: tuple[float, float], n: int = 12) -> tuple[list[float], list[float]]:
    """Points of an edge: straight, or, between two nodes on the same line, an arc below it that is deeper the
    more columns it skips (so skip edges do not hide behind shorter ones)."""
    (x0, y0), (x1, y1) = a, b
    if y0 != y1:
        return [x0, (x0 + x1) / 2, x1], [y0, (y0 + y1) / 2, y1]
    depth = 0.35 * (abs(x1 - x0) - 1)
    t = np.linspace(0, 1, n if n % 2 else n + 1)
    return list(x0 + (x1 - x0) * t), list(y0 - depth * 4 * t * (1 - t))


def _drawn_receiver(label: str) -> tuple[str, str]:
    """The drawn node and the input kind of a receiver label ("L1H2.q" -> ("L1H2", "q"))."""
    if "." in label:
        node, kind = label.split(".")
        return node.replace("KV", "H"), kind
    return label, "mlp" if label.startswith("MLP") else "logits"


@draws(results.EdgeScores)
def edge_graph(
    scores: results.EdgeScores,
    threshold: float | None = None,
    top_k: int | None = 30,
    normalize: bool = True,
    highlight: tuple[str, str] | None = None,
    height: int = 520,
) -> go.Figure:
    """The component graph drawn as layers of nodes; edges above `threshold` (|score|, normalised by the
    clean - corrupt gap when `normalize`) or else the `top_k` strongest. Blue edges raise the metric when patched,
    red ones lower it; width grows with |score|; a query input is a solid line, a key dashed, a value dotted.
    Hovering or clicking an edge's marker shows its score (customdata: receiver, sender index)."""
    n_layers, n_heads = _model_shape(scores)
    pos = node_positions(n_layers, n_heads)
    shown = _drawn_edges(scores, threshold, top_k, normalize)
    fig = go.Figure()
    for trace in _edge_lines(scores, shown, pos):
        fig.add_trace(trace)
    fig.add_trace(_edge_markers(scores, shown, pos))
    fig.add_trace(_graph_nodes(scores, shown, pos))
    if highlight is not None:
        fig.add_trace(_highlighted_edge(highlight, pos))
    _layer_axes(fig, n_layers)
    return _layout(fig, _edge_graph_title(scores, shown, threshold, normalize), height)


def _model_shape(scores: results.EdgeScores) -> tuple[int, int]:
    """(layers, heads per layer) of the model whose edges `scores` holds, read from its sender labels."""
    n_layers = 1 + max((int(s[1 : s.index("H")]) for s in scores.senders if s.startswith("L")), default=-1)
    n_heads = 1 + max((int(s[s.index("H") + 1 :]) for s in scores.senders if s.startswith("L")), default=0)
    return n_layers, n_heads


def _drawn_edges(
    scores: results.EdgeScores, threshold: float | None, top_k: int | None, normalize: bool
) -> list[tuple[int, int, float]]:
    """(receiver, sender, score) of the edges to draw: |score| >= `threshold`, else the `top_k` strongest."""
    edges = scores.edge_list(normalize)
    if threshold is not None:
        return [e for e in edges if abs(e[2]) >= threshold]
    return edges[: top_k if top_k is not None else len(edges)]


def _edge_lines(scores: results.EdgeScores, shown: list, pos: dict) -> list[go.Scatter]:
    """One line trace per (sign, input kind, width) group of the shown edges, in sorted group order."""
    biggest = max((abs(v) for _, _, v in shown), default=1.0) or 1.0
    groups: dict[tuple, list] = {}
    for r, s, v in shown:
        node, kind = _drawn_receiver(scores.receivers[r])
        width = 1 + 2 * min(2, int(3 * abs(v) / biggest))
        groups.setdefault((v >= 0, kind, width), []).append((r, s, node))
    traces = []
    for (positive, kind, width), items in sorted(groups.items()):
        xs, ys = [], []
        for _, s, node in items:
            cx, cy = _curve(pos[scores.senders[s]], pos[node])
            xs += [*cx, None]
            ys += [*cy, None]
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                line={"color": POSITIVE if positive else NEGATIVE, "width": width, "dash": _DASH[kind]},
                opacity=0.75,
                hoverinfo="skip",
                showlegend=False,
            )
        )
    return traces


def _along(a: tuple[float, float], b: tuple[float, float]):
    """The edge from a to b as drawn by `_curve`, as t -> (x, y)."""
    (x0, y0), (x1, y1) = a, b
    depth = 0.0 if y0 != y1 else 0.35 * (abs(x1 - x0) - 1)
    return lambda t: (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t - depth * 4 * t * (1 - t))


def _edge_markers(scores: results.EdgeScores, shown: list, pos: dict) -> go.Scatter:
    """The "edges" trace: a faint marker on each shown edge carrying its score and (receiver, sender); at the
    middle unless another edge's marker is there (a head's q, k and v edges from one sender share both ends)."""
    text, custom, paths = [], [], []
    for r, s, v in shown:
        node, _ = _drawn_receiver(scores.receivers[r])
        paths.append(_along(pos[scores.senders[s]], pos[node]))
        text.append(f"{scores.senders[s]} -> {scores.receivers[r]}<br>score {v:+.4g}")
        custom.append([r, s])
    dots = edge_dots(paths, gap=(0.15, 0.3))
    return go.Scatter(
        x=[x for x, _ in dots],
        y=[y for _, y in dots],
        mode="markers",
        marker={"size": 9, "color": "rgba(0,0,0,0.15)"},
        text=text,
        customdata=custom,
        hovertemplate="%{text}<extra></extra>",
        name="edges",
        showlegend=False,
    )


def _graph_nodes(scores: results.EdgeScores, shown: list, pos: dict) -> go.Scatter:
    """The "nodes" trace: every component, large and dark where a shown edge touches it; MLPs square."""
    used = {scores.senders[s] for _, s, _ in shown} | {
        _drawn_receiver(scores.receivers[r])[0] for r, _, _ in shown
    }
    names = list(pos)
    return go.Scatter(
        x=[pos[n][0] for n in names],
        y=[pos[n][1] for n in names],
        mode="markers+text",
        text=names,
        textposition="top center",
        textfont={"size": 10},
        marker={
            "size": [14 if n in used else 8 for n in names],
            "color": ["#333" if n in used else "#ccc" for n in names],
            "symbol": ["square" if n.startswith("MLP") else "circle" for n in names],
        },
        hovertemplate="%{text}<extra></extra>",
        name="nodes",
        showlegend=False,
    )


def _highlighted_edge(highlight: tuple[str, str], pos: dict) -> go.Scatter:
    """A broad orange line under the (sender, receiver) edge `highlight`."""
    s_label, r_label = highlight
    node, _ = _drawn_receiver(r_label)
    cx, cy = _curve(pos[s_label], pos[node])
    return go.Scatter(
        x=cx,
        y=cy,
        mode="lines",
        line={"color": "#f4a300", "width": 6},
        opacity=0.5,
        hoverinfo="skip",
        showlegend=False,
    )


def _layer_axes(fig: go.Figure, n_layers: int) -> None:
    """Name the node columns on the x axis (embed, L0 heads, ..., MLP0, ..., logits) and hide the y axis."""
    fig.update_xaxes(
        tickvals=[0]
        + [2 * layer + 1 for layer in range(n_layers)]
        + [2 * layer + 2 for layer in range(n_layers)]
        + [2 * n_layers + 1],
        ticktext=["embed"]
        + [f"L{layer} heads" for layer in range(n_layers)]
        + [f"MLP{layer}" for layer in range(n_layers)]
        + ["logits"],
        showgrid=False,
        zeroline=False,
    )
    fig.update_yaxes(visible=False)


def _edge_graph_title(
    scores: results.EdgeScores, shown: list, threshold: float | None, normalize: bool
) -> str:
    """The edge graph's title: method, direction, which edges are shown, and the colour/dash key."""
    unit = "normalised " if normalize else ""
    which = f"|{unit}score| >= {threshold:.3g}" if threshold is not None else f"top {len(shown)}"
    steps = f", {scores.steps} steps" if scores.method == "eap-ig" else ""
    return (
        f"{scores.method.upper()}{steps} edge scores ({scores.direction}): {which} of {scores.n_edges} edges<br>"
        "blue raises the metric when patched, red lowers it; q solid, k dashed, v dotted"
    )


@draws(results.Faithfulness)
def faithfulness_curve(f: results.Faithfulness, metric: str | None = None, height: int = 420) -> go.Figure:
    """The circuit's metric (1 = clean, 0 = corrupt) against the number of edges kept."""
    ks = f.ks.numpy()
    curve = f.curve(metric).numpy()
    x = np.maximum(ks, 0.5)  # k = 0 on a log axis
    fig = go.Figure(
        go.Scatter(
            x=x,
            y=curve,
            mode="lines+markers",
            text=[str(int(k)) for k in ks],
            hovertemplate="%{text} edges kept<br>faithfulness %{y:.3f}<extra></extra>",
            name="circuit",
        )
    )
    for level, name in ((1.0, "clean"), (0.0, "corrupt")):
        fig.add_hline(y=level, line_dash="dot", line_color="#888", annotation_text=name)
    fig.update_xaxes(type="log", title_text=f"edges kept (of {f.n_edges}; 0 drawn at 0.5)")
    fig.update_yaxes(title_text="normalised metric of the circuit")
    return _layout(
        fig, f"Faithfulness of the top-k edges by {f.method.upper()} ({f.direction} scores)", height
    )


def verified_scatter(f: results.Faithfulness, height: int = 380) -> go.Figure:
    """The verified edges: estimate (y) against exact edge patching (x), with y = x."""
    e, a = f.verified_exact.numpy(), f.verified_estimate.numpy()
    labels = [f"{s} -> {r}" for s, r in zip(f.verified_senders, f.verified_receivers)]
    fig = go.Figure(
        go.Scatter(
            x=e,
            y=a,
            mode="markers",
            text=labels,
            hovertemplate="%{text}<br>exact %{x:.4g}<br>estimate %{y:.4g}<extra></extra>",
        )
    )
    if len(e):
        lo, hi = float(min(e.min(), a.min())), float(max(e.max(), a.max()))
        fig.add_trace(
            go.Scatter(
                x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "#888"}, name="y = x"
            )
        )
    fig.update_xaxes(title_text="exact edge patching (metric units)")
    fig.update_yaxes(title_text=f"{f.method} estimate")
    return _layout(fig, f"Top {len(e)} edges: {f.method.upper()} estimate vs exact", height, showlegend=False)


# -- AtP* -----------------------------------------------------------------------------------------------------------


@draws(results.AtPResult)
def atp_figure(result: results.AtPResult, method: str = "atp*", k: int = 20, height: int = 460) -> go.Figure:
    """With exact values: AtP and AtP+QK fix against exact (one point per measured node). Without: the top k
    nodes by `method`."""
    exact = result.grid("exact")
    measured = [n for n in result.nodes() if not math.isnan(float(exact[n]))]
    if len(measured) >= 3:
        return atp_scatter(result, height=height)
    order = result.ranking(method)[:k]
    grid = result.grid(method)
    fig = go.Figure(
        go.Bar(
            x=[float(grid[n]) for n in order],
            y=[result.node_label(n) for n in order],
            orientation="h",
            marker_color=[POSITIVE if float(grid[n]) >= 0 else NEGATIVE for n in order],
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text=f"{method} score (metric units)")
    return _layout(
        fig, f"Top {len(order)} nodes by {method} ({result.direction}); verify them exactly", height
    )


def atp_scatter(result: results.AtPResult, height: int = 460) -> go.Figure:
    exact = result.grid("exact")
    fig = go.Figure()
    for method, colour in (("atp", "#999"), ("atp+qk", POSITIVE)):
        g = result.grid(method)
        nodes = [n for n in result.nodes() if not math.isnan(float(exact[n]))]
        fig.add_trace(
            go.Scatter(
                x=[float(exact[n]) for n in nodes],
                y=[float(g[n]) for n in nodes],
                mode="markers",
                name=method.upper().replace("+QK", " + QK fix"),
                marker={"color": colour, "size": 6, "opacity": 0.7},
                text=[result.node_label(n) for n in nodes],
                hovertemplate="%{text}<br>exact %{x:.4g}<br>estimate %{y:.4g}<extra></extra>",
            )
        )
    values = [float(exact[n]) for n in result.nodes() if not math.isnan(float(exact[n]))]
    lo, hi = min(values), max(values)
    fig.add_trace(
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "#888"}, name="y = x")
    )
    fig.update_xaxes(title_text="exact patching (metric units)")
    fig.update_yaxes(title_text="estimate")
    kinds = "/".join(results.ATP_KINDS)
    return _layout(
        fig, f"AtP vs AtP with the QK fix vs exact, every {kinds} node ({result.direction})", height
    )


# -- logit lens, DLA, attention -------------------------------------------------------------------------------


@draws(results.LogitLensResult)
def logit_lens_figure(
    result: results.LogitLensResult, what: str | None = None, prompt: int = 0, height: int | None = None
) -> go.Figure:
    """Layer (rows) x position (columns) of one prompt, each cell labelled with its top token; coloured by the
    logit difference (with answers) or the top token's probability."""
    what = what or ("logit_diff" if result.logit_diff is not None else "top_prob")
    z = result.values(what, prompt).numpy()
    text = [[result.top_tokens[prompt][li][p][0] for p in range(z.shape[1])] for li in range(z.shape[0])]
    xs = [f"{p}:{t}" for p, t in enumerate(result.tokens[prompt])]
    diverging = what == "logit_diff"
    reach = float(np.abs(z).max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=xs,
            y=list(result.layers),
            text=text,
            texttemplate="%{text}",
            textfont={"size": 9},
            colorscale=COLORSCALE if diverging else "Blues",
            zmid=0 if diverging else None,
            zmin=-reach if diverging else 0,
            zmax=reach if diverging else 1,
            hovertemplate="%{y}, position %{x}<br>top token %{text}<br>" + what + " %{z:.4g}<extra></extra>",
            colorbar={"title": {"text": what.replace("_", " "), "side": "right"}},
        )
    )
    fig.update_xaxes(type="category", tickangle=-45, title_text="position")
    fig.update_yaxes(type="category", title_text="residual stream read")
    answer = (
        f"; answers {result.answers[prompt][0]!r} vs {result.answers[prompt][1]!r}" if result.answers else ""
    )
    return _layout(
        fig,
        f"Logit lens (prompt {prompt}{answer}): top token per layer and position",
        height or 120 + 45 * len(result.layers),
    )


@draws(results.DLAResult)
def dla_figure(result: results.DLAResult, prompt: int | None = None, height: int = 460) -> go.Figure:
    """Per-head contributions as a layer x head grid, and the other parts as bars."""
    values = result.values(prompt).numpy()
    others = [
        (p, v) for p, v in zip(result.parts, values) if not (p.startswith("L") and "H" in p and " " not in p)
    ]
    if result.per_head:
        fig = make_subplots(
            rows=1, cols=2, column_widths=[0.45, 0.55], subplot_titles=["heads (z @ W_O)", "other parts"]
        )
        grid = result.heads() if prompt is None else None
        if grid is None:
            labels = [p for p in result.parts if p.startswith("L") and "H" in p and " " not in p]
            n_layers = 1 + max(int(p[1 : p.index("H")]) for p in labels)
            n_heads = 1 + max(int(p[p.index("H") + 1 :]) for p in labels)
            grid = torch.zeros(n_layers, n_heads)
            for p in labels:
                grid[int(p[1 : p.index("H")]), int(p[p.index("H") + 1 :])] = float(
                    values[result.parts.index(p)]
                )
        g = grid.numpy()
        reach = float(np.abs(g).max()) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=g,
                x=[f"H{h}" for h in range(g.shape[1])],
                y=[f"L{layer}" for layer in range(g.shape[0])],
                colorscale=COLORSCALE,
                zmid=0,
                zmin=-reach,
                zmax=reach,
                hovertemplate="%{y}%{x}: %{z:.4g}<extra></extra>",
                colorbar={"x": 0.42, "len": 0.8},
            ),
            row=1,
            col=1,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=1)
        cell = {"row": 1, "col": 2}
    else:
        fig, cell = go.Figure(), {}
    fig.add_trace(
        go.Bar(
            x=[p for p, _ in others],
            y=[v for _, v in others],
            marker_color=[POSITIVE if v >= 0 else NEGATIVE for _, v in others],
            hovertemplate="%{x}: %{y:.4g}<extra></extra>",
        ),
        **cell,
    )
    who = f"prompt {prompt}" if prompt is not None else f"mean of {len(result.tokens)} prompts"
    total = float(result.total.mean() if prompt is None else result.total[prompt])
    return _layout(
        fig,
        f"Direct logit attribution at position {result.position} ({who}); logit difference {total:.3f}<br>"
        "final-norm scale frozen at this run: parts add up exactly, but are not direct effects",
        height,
        showlegend=False,
    )


@draws(results.AttentionPatterns)
def attention_figure(result: results.AttentionPatterns, height: int | None = None) -> go.Figure:
    """One heatmap per head: queries (rows) x keys (columns), the prompt's tokens on both axes."""
    n = len(result.heads)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=list(result.heads),
        horizontal_spacing=0.08,
        vertical_spacing=0.12,
    )
    labels = [f"{i}:{t}" for i, t in enumerate(result.tokens)]
    for i, head in enumerate(result.heads):
        fig.add_trace(
            go.Heatmap(
                z=result.pattern[i].numpy(),
                x=labels,
                y=labels,
                colorscale="Blues",
                zmin=0,
                zmax=1,
                showscale=i == 0,
                hovertemplate=f"{head}<br>query %{{y}}<br>key %{{x}}<br>weight %{{z:.3f}}<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-60)
    return _layout(fig, "Attention patterns: query (row) attends to key (column)", height or 380 * rows)
