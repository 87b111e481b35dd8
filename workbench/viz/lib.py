"""Figures for the Local Interaction Basis: spectra, the interaction graph, ablation curves, node profiles, edge
scatters, Fourier labels. Pure functions of `workbench.lib` results; they never run a model.

The graph figure puts node layers in columns and each layer's nodes top-down in basis order (the constant
direction first, then by Lambda or variance). Each node's customdata is ``["node", layer, node]`` and each edge's
dot (on the edge, apart from the others) ``["edge", section, out_node, in_node]``, for click handlers.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.lib import (
    EdgeAblation,
    EdgeAttributions,
    FeatureActivations,
    FourierLabels,
    GraphCommunities,
    LibGraph,
    NodeAblation,
)
from workbench.lib.data import MODULUS
from workbench.lib.fourier import term_shares, top_terms
from workbench.viz.common import edge_dots
from workbench.viz.registry import draws

BASIS_COLOURS = {"lib": "#d62728", "pca": "#1f77b4", "neuron": "#7f7f7f"}
BASIS_NAMES = {"lib": "LIB", "pca": "PCA", "neuron": "neurons"}
PALETTE = qualitative.D3 + qualitative.Set2 + qualitative.Pastel1


# ---------------------------------------------------------------------------------------------------------------
# spectra


def spectra(graphs, *, layers=None, height: int = 360) -> go.Figure:
    """Eigenvalue spectra per node layer, log scale: Lambda for LIB graphs, the centred Gram's eigenvalues for
    PCA and neuron graphs (the constant direction's entry left out), with each graph's truncation as a line."""
    graphs = [graphs] if not isinstance(graphs, (list, tuple)) else list(graphs)
    if not graphs:
        raise InputError("give at least one LibGraph")
    names = [n for n in graphs[0].node_layers if n != "output"] if layers is None else list(layers)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.06)
    for g in graphs:
        colour = BASIS_COLOURS.get(g.basis, "#333")
        for c, name in enumerate(names, start=1):
            i = g.layer_index(name)
            values = g.eigenvalues[i] if g.basis == "lib" else g.gram_eigenvalues[i]
            start = 1 if g.center else 0
            v = values[start:].numpy()
            v = v[v > 0]
            label = (
                "Lambda (LIB)"
                if g.basis == "lib"
                else f"Gram eigenvalues ({BASIS_NAMES.get(g.basis, g.basis)})"
            )
            fig.add_trace(
                go.Scatter(
                    x=np.arange(start, start + len(v)),
                    y=v,
                    mode="lines+markers",
                    marker={"size": 4},
                    line={"color": colour},
                    name=label,
                    legendgroup=g.basis,
                    showlegend=c == 1,
                    hovertemplate=f"{name}<br>direction %{{x}}<br>%{{y:.4g}}<extra>{label}</extra>",
                ),
                row=1,
                col=c,
            )
            fig.add_hline(y=g.truncation, line={"dash": "dot", "color": "#999", "width": 1}, row=1, col=c)
    fig.update_yaxes(type="log", exponentformat="power")
    fig.update_yaxes(title_text="eigenvalue (log)", row=1, col=1)
    fig.update_xaxes(title_text="direction (constant = 0, left out)")
    fig.update_layout(
        height=height, margin={"t": 40, "b": 40, "l": 60, "r": 20}, legend={"orientation": "h", "y": -0.2}
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# the interaction graph


def shown_edges(graph, section: int, threshold: float, show_const: bool, nodes_per_layer: int | None):
    """(out, in, weight) of the smallest set of edges holding `threshold` of the section's weight (among edges
    between shown nodes), largest first."""
    E = graph.edges[section]
    k_out = (
        E.shape[0]
        if nodes_per_layer is None
        else min(E.shape[0], nodes_per_layer + int(graph.has_const(section + 1)))
    )
    k_in = (
        E.shape[1]
        if nodes_per_layer is None
        else min(E.shape[1], nodes_per_layer + int(graph.has_const(section)))
    )
    sub = E[:k_out, :k_in].clone()
    if not show_const:
        if graph.has_const(section + 1):
            sub[0] = 0
        if graph.has_const(section):
            sub[:, 0] = 0
    flat = sub.flatten()
    order = torch.argsort(flat, descending=True)
    total = float(flat.sum())
    if total <= 0:
        return []
    cum = flat[order].cumsum(0)
    n = min(int((cum < threshold * total).sum()) + 1, len(order))
    return [(int(i) // k_in, int(i) % k_in, float(flat[i])) for i in order[:n] if flat[i] > 0]


@draws(LibGraph)
def graph_figure(
    graph,
    *,
    threshold: float = 0.9,
    nodes_per_layer: int | None = 30,
    show_const: bool = False,
    communities=None,
    selected: tuple | None = None,
    height: int = 560,
) -> go.Figure:
    """The interaction graph: node layers as columns, nodes top-down in basis order, and for each section the
    edges that hold `threshold` of its weight (between the first `nodes_per_layer` nodes of each layer), line width
    by weight. Nodes are coloured by community when `communities` (a `GraphCommunities`) is given, else by
    log eigenvalue. `selected`: ("node", layer, node) or ("edge", section, out, in) to highlight."""
    graph._require_edges()
    if not 0 < threshold <= 1:
        raise InputError(f"threshold must be in (0, 1], got {threshold}")
    n_drawn = _shown_nodes(graph, nodes_per_layer)
    fig = go.Figure()
    for trace in _graph_edges(graph, threshold, show_const, nodes_per_layer):
        fig.add_trace(trace)
    for i, k in enumerate(n_drawn):
        fig.add_trace(_layer_nodes(graph, i, k, communities))
    if selected is not None:
        fig.add_trace(_selection_mark(selected))
    sections = range(len(graph.node_layers) - 1)
    edge_counts = [len(shown_edges(graph, s, threshold, show_const, nodes_per_layer)) for s in sections]
    _graph_layout(fig, graph, threshold, edge_counts, max(n_drawn), height)
    return fig


def _shown_nodes(graph, nodes_per_layer: int | None) -> list[int]:
    """How many nodes of each layer are drawn: the first `nodes_per_layer`, plus the constant one where it exists."""
    ys = []
    for i in range(len(graph.node_layers)):
        n = graph.n_nodes(i)
        ys.append(min(n, (nodes_per_layer or n) + int(graph.has_const(i))))
    return ys


def _along(s: int, n: int, o: int):
    """The edge from node n of column s to node o of column s + 1, as t -> (x, y) (nodes are drawn at y = -node)."""
    return lambda t: (s + t, -(n + t * (o - n)))


def _graph_edges(graph, threshold: float, show_const: bool, nodes_per_layer: int | None) -> list[go.Scatter]:
    """The shown edges, bucketed by width so that a few line traces draw them all, then the "edges" dots."""
    edge_x, edge_y, edge_w, mids = [], [], [], []
    for s in range(len(graph.node_layers) - 1):
        for o, n, w in shown_edges(graph, s, threshold, show_const, nodes_per_layer):
            edge_x.append((s, s + 1))
            edge_y.append((-n, -o))
            edge_w.append(w)
            mids.append((s, o, n, w))
    if not edge_w:
        return []
    w_max = max(edge_w)
    buckets: dict[int, tuple[list, list]] = {}
    for (x0, x1), (y0, y1), w in zip(edge_x, edge_y, edge_w):
        b = min(5, int(math.ceil(6 * math.sqrt(w / w_max))))
        xs, yy = buckets.setdefault(b, ([], []))
        xs += [x0, x1, None]
        yy += [y0, y1, None]
    traces = [
        go.Scatter(
            x=xs,
            y=yy,
            mode="lines",
            line={"width": 0.6 + 1.2 * b, "color": f"rgba(60,60,60,{0.25 + 0.12 * b:.2f})"},
            hoverinfo="skip",
            showlegend=False,
        )
        for b, (xs, yy) in sorted(buckets.items())
    ]
    dots = edge_dots([_along(s, n, o) for s, o, n, _ in mids], gap=(0.05, 0.45))
    traces.append(
        go.Scatter(
            x=[x for x, _ in dots],
            y=[y for _, y in dots],
            mode="markers",
            marker={"size": 7, "color": "rgba(0,0,0,0.05)"},
            customdata=[["edge", s, o, n] for s, o, n, _ in mids],
            hovertemplate="%{text}<extra></extra>",
            text=[
                f"{graph.node_layers[s]}[{n}] -> {graph.node_layers[s + 1]}[{o}]<br>E = {w:.4g} "
                f"({w / float(graph.edges[s].sum()):.2%} of the section)"
                for s, o, n, w in mids
            ],
            name="edges",
            showlegend=False,
        )
    )
    return traces


def _layer_nodes(graph, i: int, k: int, communities) -> go.Scatter:
    """The first `k` nodes of layer `i` as one marker trace, coloured by community or by log eigenvalue."""
    name = graph.node_layers[i]
    nodes = list(range(k))
    values = graph.eigenvalues[i][:k] if len(graph.eigenvalues[i]) else torch.zeros(k)
    by_community = communities is not None and name in communities.node_layers
    if by_community:
        colour = [
            PALETTE[(communities.of(name, n) or 0) % len(PALETTE)]
            if communities.of(name, n) is not None
            else "#ccc"
            for n in nodes
        ]
        comm = [communities.of(name, n) for n in nodes]
    else:
        colour = torch.log10(values.clamp(min=1e-30)).numpy() if len(values) else np.zeros(k)
        comm = [None] * k
    marker = {"size": 9, "line": {"width": 0.5, "color": "#333"}}
    if by_community:
        marker["color"] = colour
    else:
        marker.update(
            color=colour,
            colorscale="Viridis",
            cmin=-2,
            cmax=6,
            showscale=i == 0,
            colorbar={"title": "log10 eigenvalue", "len": 0.6},
        )
    return go.Scatter(
        x=[i] * k,
        y=[-n for n in nodes],
        mode="markers",
        marker=marker,
        customdata=[["node", i, n] for n in nodes],
        text=_node_labels(graph, i, values, comm),
        hovertemplate="%{text}<extra></extra>",
        name=name,
        showlegend=False,
    )


def _node_labels(graph, i: int, values, comm: list) -> list[str]:
    """Hover text of layer `i`'s drawn nodes: name, constant flag, Lambda or variance, community."""
    name = graph.node_layers[i]
    labels = []
    for n in range(len(comm)):
        text = f"{name}[{n}]" + (" (constant)" if n == 0 and graph.has_const(i) else "")
        if len(values):
            text += f"<br>{'Lambda' if graph.basis == 'lib' else 'variance'} {float(values[n]):.4g}"
        if comm[n] is not None:
            text += f"<br>community {comm[n]}"
        labels.append(text)
    return labels


def _selection_mark(selected: tuple) -> go.Scatter:
    """An orange ring around the selected ("node", layer, node) or an orange line over the selected edge."""
    if selected[0] == "node":
        _, li, n = selected
        return go.Scatter(
            x=[li],
            y=[-n],
            mode="markers",
            marker={"size": 18, "color": "rgba(0,0,0,0)", "line": {"width": 3, "color": "#e6550d"}},
            hoverinfo="skip",
            showlegend=False,
        )
    _, s, o, n = selected
    return go.Scatter(
        x=[s, s + 1],
        y=[-n, -o],
        mode="lines",
        line={"width": 4, "color": "#e6550d"},
        hoverinfo="skip",
        showlegend=False,
    )


def _graph_layout(
    fig: go.Figure, graph, threshold: float, counts: list[int], y_max: int, height: int
) -> None:
    """Title with each section's edge `counts`, layer names on the x axis, node numbers every 5 on the y axis."""
    L = len(graph.node_layers)
    title = (
        f"{BASIS_NAMES.get(graph.basis, graph.basis)} interaction graph: edges holding {threshold:.0%} of each "
        f"section's weight among the nodes shown ({', '.join(map(str, counts))})"
    )
    fig.update_layout(
        title={"text": title, "font": {"size": 13}},
        height=height,
        xaxis={
            "tickvals": list(range(L)),
            "ticktext": list(graph.node_layers),
            "range": [-0.4, L - 0.6],
            "showgrid": False,
            "zeroline": False,
        },
        yaxis={
            "title": "node (basis order)",
            "range": [-(y_max - 0.5), 0.8],
            "tickvals": [-n for n in range(0, y_max, 5)],
            "ticktext": [str(n) for n in range(0, y_max, 5)],
            "zeroline": False,
        },
        margin={"t": 50, "b": 40, "l": 60, "r": 20},
        plot_bgcolor="white",
        clickmode="event",
    )


# ---------------------------------------------------------------------------------------------------------------
# ablations


@draws(NodeAblation)
def ablation_curves(
    results, *, reference: dict | None = None, x_max: int | None = 40, height: int = 340
) -> go.Figure:
    """Score against directions kept, one panel per node layer, one line per basis; the unablated score dashed.
    `reference`: {basis: {layer: {k: score}}} drawn as open markers (e.g. `PAPER["node_ablation"]`)."""
    results = [results] if not isinstance(results, (list, tuple)) else list(results)
    layers = list(dict.fromkeys(layer for r in results for layer in r.layers))
    fig = make_subplots(
        rows=1, cols=len(layers), subplot_titles=layers, shared_yaxes=True, horizontal_spacing=0.04
    )
    for r in results:
        colour = BASIS_COLOURS.get(r.basis, "#333")
        for c, layer in enumerate(layers, start=1):
            if layer not in r.layers:
                continue
            i = r.layers.index(layer)
            fig.add_trace(
                go.Scatter(
                    x=r.kept[i].numpy(),
                    y=r.scores[i].numpy(),
                    mode="lines+markers",
                    marker={"size": 4},
                    line={"color": colour},
                    name=f"{BASIS_NAMES.get(r.basis, r.basis)} (ours)",
                    legendgroup=r.basis,
                    showlegend=c == 1,
                    hovertemplate=f"{layer}<br>%{{x}} kept<br>{r.metric} %{{y:.4f}}<extra>{r.basis}</extra>",
                ),
                row=1,
                col=c,
            )
            if reference and layer in reference.get(r.basis, {}):
                ref = reference[r.basis][layer]
                fig.add_trace(
                    go.Scatter(
                        x=list(ref),
                        y=list(ref.values()),
                        mode="markers",
                        marker={"symbol": "circle-open", "size": 10, "color": colour, "line": {"width": 2}},
                        name=f"{BASIS_NAMES.get(r.basis, r.basis)} (authors)",
                        legendgroup=r.basis + "-ref",
                        showlegend=c == 1,
                    ),
                    row=1,
                    col=c,
                )
    base = results[0].base_score
    for c in range(1, len(layers) + 1):
        fig.add_hline(y=base, line={"dash": "dash", "color": "#555", "width": 1}, row=1, col=c)
        if x_max:
            fig.update_xaxes(range=[0, x_max], row=1, col=c)
    fig.update_xaxes(title_text="directions kept (constant included)")
    fig.update_yaxes(title_text=results[0].metric, row=1, col=1)
    fig.update_layout(
        height=height, margin={"t": 40, "b": 40, "l": 60, "r": 20}, legend={"orientation": "h", "y": -0.25}
    )
    return fig


@draws(EdgeAblation)
def edge_ablation_figure(results, *, height: int = 320) -> go.Figure:
    """Score against edges kept (the bisection's points), one panel per section, the minimum marked."""
    results = [results] if not isinstance(results, (list, tuple)) else list(results)
    sections = list(dict.fromkeys(s for r in results for s in r.sections))
    fig = make_subplots(
        rows=1, cols=len(sections), subplot_titles=sections, shared_yaxes=True, horizontal_spacing=0.05
    )
    for r in results:
        colour = BASIS_COLOURS.get(r.basis, "#333")
        for c, sec in enumerate(sections, start=1):
            if sec not in r.sections:
                continue
            i = r.sections.index(sec)
            order = torch.argsort(r.tried[i])
            fig.add_trace(
                go.Scatter(
                    x=r.tried[i][order].numpy(),
                    y=r.scores[i][order].numpy(),
                    mode="lines+markers",
                    line={"color": colour},
                    name=BASIS_NAMES.get(r.basis, r.basis),
                    legendgroup=r.basis,
                    showlegend=c == 1,
                ),
                row=1,
                col=c,
            )
            fig.add_vline(x=r.min_edges[i], line={"color": colour, "dash": "dot"}, row=1, col=c)
    fig.update_xaxes(type="log", title_text="edges kept")
    for c in range(1, len(sections) + 1):
        fig.add_hline(
            y=results[0].base_score, line={"dash": "dash", "color": "#555", "width": 1}, row=1, col=c
        )
    fig.update_yaxes(title_text=results[0].metric, row=1, col=1)
    fig.update_layout(height=height, margin={"t": 40, "b": 40, "l": 60, "r": 20})
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Fourier labels and communities


@draws(FourierLabels)
def fourier_figure(labels, *, layer: str | None = None, height: int = 420) -> go.Figure:
    """A table of each direction's top Fourier terms (one layer, or all side by side)."""
    layers = [layer] if layer else list(labels.layers)
    header, cells = ["direction"], [list(range(max(len(t) for t in labels.terms)))]
    for name in layers:
        i = labels.layers.index(name)
        header.append(name)
        cells.append([labels.label(name, d) for d in range(len(labels.terms[i]))])
    fig = go.Figure(
        go.Table(
            header={"values": header, "align": "left"},
            cells={"values": cells, "align": "left", "font": {"size": 11}},
            columnwidth=[60] + [300] * len(layers),
        )
    )
    fig.update_layout(height=height, margin={"t": 10, "b": 10, "l": 10, "r": 10})
    return fig


@draws(GraphCommunities)
def communities_figure(comm, *, height: int = 300) -> go.Figure:
    """Nodes per community and layer (stacked bars)."""
    fig = go.Figure()
    for c in range(comm.n_communities):
        fig.add_trace(
            go.Bar(
                x=list(comm.node_layers),
                y=[int((comm.community[i] == c).sum()) for i in range(len(comm.node_layers))],
                name=f"community {c}",
                marker={"color": PALETTE[c % len(PALETTE)]},
            )
        )
    fig.update_layout(
        barmode="stack",
        height=height,
        title={
            "text": f"{comm.n_communities} Louvain communities, modularity {comm.modularity:.3f} (resolution {comm.resolution})",
            "font": {"size": 13},
        },
        yaxis={"title": "nodes"},
        margin={"t": 40, "b": 40, "l": 60, "r": 20},
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# node profiles and edges


@draws(FeatureActivations)
def node_profile(features, layer: str | None = None, node: int = 1, *, height: int = 360) -> go.Figure:
    """What one node responds to. mod-add: its activation over all (x, y) and its Fourier terms; MNIST: the
    images it responds to most and its input-space direction; language models: its top tokens in context."""
    layer = layer or features.layers[0]
    acts = features.of(layer)
    if not 0 <= node < acts.shape[-1]:
        raise InputError(f"node {node} is out of range: {layer} has {acts.shape[-1]} nodes")
    if features.kind == "modadd":
        return _modadd_profile(features, layer, node, height)
    if features.kind == "mnist":
        return _mnist_profile(features, layer, node, height)
    if features.kind == "lm":
        return _lm_profile(features, layer, node, height)
    fig = go.Figure(go.Histogram(x=acts[..., node].flatten().numpy()))
    fig.update_layout(height=height, title=f"{layer}[{node}]: activations")
    return fig


def _modadd_profile(features, layer, node, height):
    a = features.of(layer)
    if a.shape[0] != MODULUS * MODULUS:
        raise InputError(
            "the mod-add profile needs activations on all 12769 pairs: feature_activations(..., modadd_data('all'))"
        )
    grid = (a.sum(1) if a.shape[1] > 1 else a[:, -1])[:, node].reshape(MODULUS, MODULUS).to(torch.float64)
    terms = top_terms(term_shares(grid))
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.5, 0.5],
        subplot_titles=[f"{layer}[{node}] over (x, y)", "Fourier terms (share of variance)"],
    )
    fig.add_trace(
        go.Heatmap(
            z=grid.T.numpy(),
            colorscale="RdBu",
            zmid=0,
            colorbar={"len": 0.8, "x": 0.46},
            hovertemplate="x %{x}, y %{y}<br>%{z:.4g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=[s for _, s in terms][::-1],
            y=[t for t, _ in terms][::-1],
            orientation="h",
            marker={"color": "#d62728"},
            hovertemplate="%{y}: %{x:.1%}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="x", row=1, col=1)
    fig.update_yaxes(title_text="y", row=1, col=1)
    fig.update_xaxes(tickformat=".0%", range=[0, 1], row=1, col=2)
    fig.update_layout(height=height, showlegend=False, margin={"t": 40, "b": 40, "l": 50, "r": 20})
    return fig


def _mnist_profile(features, layer, node, height, n_top: int = 8):
    a = features.of(layer)[:, -1, node]
    top = torch.topk(a, min(n_top, len(a))).indices
    cols = n_top + 1
    fig = make_subplots(
        rows=1,
        cols=cols,
        subplot_titles=["input direction"] + [f"{float(a[i]):.3g} ({int(features.y[i])})" for i in top],
        horizontal_spacing=0.01,
    )
    directions = features.input_directions[features.layers.index(layer)]
    if directions.numel():
        d = directions[node].reshape(28, 28).numpy()
        lim = float(np.abs(d).max()) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=d[::-1],
                colorscale="RdBu",
                zmin=-lim,
                zmax=lim,
                showscale=False,
                hovertemplate="%{z:.3g}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    for c, i in enumerate(top, start=2):
        img = features.x[i].reshape(28, 28).numpy()[::-1]
        fig.add_trace(go.Heatmap(z=img, colorscale="Greys", showscale=False, hoverinfo="skip"), row=1, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor=None)
    fig.update_layout(
        height=max(200, height // 2),
        margin={"t": 40, "b": 10, "l": 10, "r": 10},
        title={"text": f"{layer}[{node}]: top images (activation, digit)", "font": {"size": 13}},
    )
    return fig


def _lm_profile(features, layer, node, height, n_top: int = 12, context: int = 6):
    top = features.top_examples(layer, node, n_top)
    a = features.of(layer)[..., node]
    rows = []
    for ex, pos in top.tolist():
        ids = features.x[ex, max(0, pos - context) : pos + 1].tolist()
        text = "".join(features.tokens.get(i, f"<{i}>") for i in ids[:-1])
        rows.append((f"{float(a[ex, pos]):.3g}", text, features.tokens.get(ids[-1], f"<{ids[-1]}>")))
    fig = go.Figure(
        go.Table(
            header={"values": ["activation", "context", "token"], "align": "left"},
            cells={
                "values": [list(c) for c in zip(*rows)] if rows else [[], [], []],
                "align": ["right", "right", "left"],
                "font": {"size": 11},
            },
            columnwidth=[70, 380, 120],
        )
    )
    fig.update_layout(
        height=height,
        margin={"t": 30, "b": 10, "l": 10, "r": 10},
        title={"text": f"{layer}[{node}]: top tokens", "font": {"size": 13}},
    )
    return fig


@draws(EdgeAttributions)
def edge_scatter(attr, *, max_points: int = 4000, height: int = 340) -> go.Figure:
    """The edge's input feature against its output feature over the data, coloured by the attribution, and the
    attribution's distribution."""
    n = len(attr.x_in)
    idx = (
        torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_points]
        if n > max_points
        else torch.arange(n)
    )
    a = attr.attribution[idx].numpy()
    lim = float(np.abs(a).max()) or 1.0
    a_name, b_name = attr.section.split(" -> ")
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.6, 0.4],
        subplot_titles=[f"{b_name}[{attr.out_node}] against {a_name}[{attr.in_node}]", "attribution"],
    )
    fig.add_trace(
        go.Scattergl(
            x=attr.x_in[idx].numpy(),
            y=attr.y_out[idx].numpy(),
            mode="markers",
            marker={
                "size": 4,
                "color": a,
                "colorscale": "RdBu",
                "cmin": -lim,
                "cmax": lim,
                "colorbar": {"title": "attribution", "len": 0.8, "x": 0.56},
            },
            hovertemplate="in %{x:.4g}<br>out %{y:.4g}<br>attribution %{marker.color:.4g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(go.Histogram(x=attr.attribution.numpy(), nbinsx=60, marker={"color": "#555"}), row=1, col=2)
    fig.update_xaxes(title_text=f"{a_name}[{attr.in_node}]", row=1, col=1)
    fig.update_yaxes(title_text=f"{b_name}[{attr.out_node}]", row=1, col=1)
    fig.update_xaxes(title_text=f"E = {attr.edge_weight:.4g}", row=1, col=2)
    fig.update_layout(height=height, showlegend=False, margin={"t": 40, "b": 40, "l": 60, "r": 20})
    return fig
