"""Figures for Casper's challenge 1 (the MNIST CNN); causal-scrubbing results are drawn by `workbench.viz.scrubbing`.

Pure functions: tensors or results in, plotly figures out; nothing here runs a model. Scatter plots of the 60k
images draw a fixed random subset (`max_points`) so that notebooks stay light; the statistics they illustrate are
computed on all images elsewhere.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

CLASS_COLOURS = {0: "#6a3d9a", 1: "#e6b400"}  # purple / yellow, as in the solution's figures
GROUP_COLOURS = {"anti-1": "#1f77b4", "1": "#ff7f0e"}
LINE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _histogram(values: np.ndarray, edges: np.ndarray, **bar) -> go.Bar:
    """A histogram binned here (so the figure carries counts, not every value) drawn as bars."""
    counts, _ = np.histogram(values, bins=edges)
    centres, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    return go.Bar(x=centres, y=counts, width=widths, **bar)


def _subset(n: int, max_points: int | None, seed: int = 0) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


# ---------------------------------------------------------------------------------------------------------------
# images


def image_row(
    images: dict[str, torch.Tensor], *, diverging: bool = False, title: str | None = None
) -> go.Figure:
    """Images [28, 28] side by side. `diverging`: red-blue centred at 0, each image on its own scale."""
    fig = make_subplots(rows=1, cols=len(images), subplot_titles=list(images), horizontal_spacing=0.03)
    for i, img in enumerate(images.values(), start=1):
        z = _np(img).astype(float)
        if diverging:
            scale = np.abs(z).max() or 1.0
            trace = go.Heatmap(z=z, zmin=-scale, zmax=scale, colorscale="RdBu", showscale=False)
        else:
            trace = go.Heatmap(z=z, colorscale="gray", showscale=False)
        fig.add_trace(trace, 1, i)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i if i > 1 else ''}", row=1, col=i)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(
        title=title,
        height=260 + 10 * (title is not None),
        width=max(300, 210 * len(images)),
        margin=dict(l=10, r=10, t=60, b=10),
    )
    return fig


def image_grid(
    images: torch.Tensor, labels: list[str], *, cols: int = 20, title: str | None = None
) -> go.Figure:
    """Many images [k, 28, 28] tiled in one heatmap; each tile on its own red-blue scale (max |value| = 1)."""
    imgs = _np(images).astype(float)
    k = len(imgs)
    if len(labels) != k:
        raise ValueError(f"{k} images but {len(labels)} labels")
    rows = -(-k // cols)
    tile = 28 + 2
    mosaic = np.full((rows * tile, cols * tile), np.nan)
    annotations = []
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        scale = np.abs(img).max() or 1.0
        mosaic[r * tile : r * tile + 28, c * tile : c * tile + 28] = img / scale
        annotations.append(
            dict(
                x=c * tile + 13.5,
                y=r * tile + 29.5,
                text=labels[i],
                showarrow=False,
                font=dict(size=9),
                yanchor="top",
            )
        )
    fig = go.Figure(
        go.Heatmap(
            z=np.round(mosaic, 3), zmin=-1, zmax=1, colorscale="RdBu", showscale=False, hoverinfo="skip"
        )
    )
    fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor="x")
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(
        title=title,
        annotations=annotations,
        height=max(200, 62 * rows + 80),
        width=max(400, 62 * cols + 40),
        margin=dict(l=10, r=10, t=50, b=10),
        plot_bgcolor="white",
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# weights and loadings


def fc2_weights(weight: torch.Tensor) -> go.Figure:
    """The fc2 weights [2, 200] as a heatmap, and each neuron's logit-difference weight (class 1 - 0) sorted."""
    w = _np(weight).astype(float)
    diff = np.sort(w[1] - w[0])
    fig = make_subplots(
        rows=2,
        cols=1,
        row_heights=[0.35, 0.65],
        vertical_spacing=0.15,
        subplot_titles=("fc2 weights (rows: class 0, class 1)", "Logit-difference weight per neuron, sorted"),
    )
    scale = np.abs(w).max()
    fig.add_trace(
        go.Heatmap(
            z=w,
            zmin=-scale,
            zmax=scale,
            colorscale="RdBu",
            y=["class 0", "class 1"],
            colorbar=dict(len=0.35, y=0.85),
        ),
        1,
        1,
    )
    fig.add_trace(go.Scatter(y=diff, mode="lines", name="w1 - w0", showlegend=False), 2, 1)
    fig.add_hline(y=0, line=dict(color="black", width=1), row=2, col=1)
    fig.update_xaxes(title_text="neuron", row=1, col=1)
    fig.update_xaxes(title_text="neurons, sorted by weight", row=2, col=1)
    fig.update_yaxes(title_text="logit diff weight", row=2, col=1)
    fig.update_layout(height=520, width=800)
    return fig


def loadings(lines: dict[str, torch.Tensor], *, title: str | None = None) -> go.Figure:
    """Per-neuron values [200] of several directions, as lines over the neuron index."""
    fig = go.Figure()
    for i, (name, values) in enumerate(lines.items()):
        fig.add_trace(
            go.Scatter(
                y=_np(values),
                mode="lines",
                name=name,
                line=dict(color=LINE_COLOURS[i % len(LINE_COLOURS)], width=1.5),
            )
        )
    fig.update_layout(
        title=title, xaxis_title="neuron", height=360, width=1000, legend=dict(orientation="h", y=1.1)
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# PCA space


def pca_scatter(
    points: torch.Tensor,
    colour: torch.Tensor,
    *,
    colour_name: str = "model label",
    arrows: dict[str, torch.Tensor] | None = None,
    markers: dict[str, torch.Tensor] | None = None,
    explained: torch.Tensor | None = None,
    max_points: int | None = 20000,
    title: str | None = None,
) -> go.Figure:
    """The images in the plane of the first two PCs, coloured by a label [N] (class or digit).

    arrows: name -> [2] vector drawn from the origin (arm directions, the logit-difference direction).
    markers: name -> [2] point drawn large (the clue, the anti-1).
    """
    p, c = _np(points).astype(float), _np(colour)
    keep = _subset(len(p), max_points)
    p, c = p[keep], c[keep]
    classes = np.unique(c)
    colours = CLASS_COLOURS if len(classes) <= 2 else {}
    fig = go.Figure(class_traces(p, c, classes, colours=colours, name=colour_name, opacity=0.5))
    for i, (name, vec) in enumerate((arrows or {}).items()):
        v = _np(vec).astype(float)
        fig.add_annotation(
            x=v[0],
            y=v[1],
            ax=0,
            ay=0,
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=3,
            arrowwidth=2.5,
            arrowcolor=LINE_COLOURS[(i + 2) % len(LINE_COLOURS)],
            text=name,
            font=dict(color=LINE_COLOURS[(i + 2) % len(LINE_COLOURS)]),
        )
    for i, (name, pt) in enumerate((markers or {}).items()):
        v = _np(pt).astype(float).reshape(-1)
        fig.add_trace(
            go.Scatter(
                x=[v[0]],
                y=[v[1]],
                mode="markers+text",
                name=name,
                text=[name],
                textposition="top center",
                marker=dict(size=14, color=["red", "blue", "green"][i % 3]),
            )
        )
    x_title, y_title = pc_titles(explained)
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=520, width=700)
    return fig


def class_traces(
    points, labels, classes, *, colours, name: str, opacity: float | None = None
) -> list[go.Scattergl]:
    """One marker trace per value in `classes` of the points [N, 2] with that label (labels [N]), named
    "<name> <value>" and coloured by `colours[value]` (plotly's sequence where absent). A class with no points
    still gets its (empty) trace, so that a figure updated in place keeps its trace layout."""
    p, c = _np(points).astype(float), _np(labels).reshape(-1)
    traces = []
    for value in classes:
        m = c == value
        traces.append(
            go.Scattergl(
                x=p[m, 0],
                y=p[m, 1],
                mode="markers",
                name=f"{name} {value}",
                marker=dict(size=3, opacity=opacity, color=colours.get(int(value))),
            )
        )
    return traces


def pc_titles(explained=None) -> tuple[str, str]:
    """Axis titles "PC1 (x% of variance)", "PC2 (...)" (the share only when `explained` [>= 2] is given)."""
    ev = _np(explained) if explained is not None else None
    return tuple(f"PC{i + 1}" + (f" ({ev[i]:.1%} of variance)" if ev is not None else "") for i in (0, 1))


# ---------------------------------------------------------------------------------------------------------------
# the rule


def similarity_histograms(
    s: torch.Tensor, labels: torch.Tensor, thresholds: tuple[float, float], *, nbins: int = 150
) -> go.Figure:
    """Histograms of the similarity s by model label, with the band's two thresholds as vertical lines.

    The thresholds are the figure's first two layout shapes, so a widget can move them.
    """
    s_np, lab = _np(s).astype(float), _np(labels)
    edges = np.linspace(s_np.min(), s_np.max(), nbins + 1)
    fig = go.Figure()
    for value in (0, 1):
        fig.add_trace(
            _histogram(
                s_np[lab == value],
                edges,
                name=f"model label {value}",
                opacity=0.6,
                marker_color=CLASS_COLOURS[value],
                marker_line_width=0,
            )
        )
    for t in thresholds:
        fig.add_vline(x=t, line=dict(color="black", dash="dot"))
    fig.update_layout(
        barmode="overlay",
        xaxis_title="similarity s = Σ x · (clue − anti-1)",
        yaxis_title="images",
        height=380,
        width=800,
        legend=dict(orientation="h", y=1.1),
    )
    return fig


def similarity_vs_pc(
    s: torch.Tensor,
    pc: torch.Tensor,
    labels: torch.Tensor,
    thresholds: tuple[float, float],
    *,
    max_points: int | None = 20000,
) -> go.Figure:
    """s against the first principal component, coloured by model label, with the band's thresholds."""
    keep = _subset(len(s), max_points)
    s_np, pc_np, lab = _np(s)[keep], _np(pc)[keep], _np(labels)[keep]
    fig = go.Figure()
    for value in (0, 1):
        m = lab == value
        fig.add_trace(
            go.Scattergl(
                x=s_np[m],
                y=pc_np[m],
                mode="markers",
                name=f"model label {value}",
                marker=dict(size=3, opacity=0.5, color=CLASS_COLOURS[value]),
            )
        )
    for t in thresholds:
        fig.add_vline(x=t, line=dict(color="black", dash="dot"))
    fig.update_layout(xaxis_title="similarity s", yaxis_title="PC1", height=420, width=700)
    return fig


def detector_activity(
    s: torch.Tensor, mean_anti: torch.Tensor, mean_one: torch.Tensor, *, max_points: int | None = 20000
) -> go.Figure:
    """Mean activation of the anti-1 detectors and of the 1 detectors [N] against s [N]."""
    keep = _subset(len(s), max_points)
    fig = go.Figure()
    for name, y in (("anti-1", mean_anti), ("1", mean_one)):
        fig.add_trace(
            go.Scattergl(
                x=_np(s)[keep],
                y=_np(y)[keep],
                mode="markers",
                name=f"{name} detectors",
                marker=dict(size=3, opacity=0.3, color=GROUP_COLOURS[name]),
            )
        )
    fig.update_layout(
        xaxis_title="similarity s (anti-1-like ← → 1-like)",
        yaxis_title="mean activation",
        height=400,
        width=700,
    )
    return fig


# ---------------------------------------------------------------------------------------------------------------
# ablations


def ablation_scatter(
    clean: torch.Tensor,
    ablated: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    max_points: int | None = 3000,
) -> go.Figure:
    """PCA points [N, 2] of the clean run and of each ablation, with a grey line from each clean point to where
    the ablation moved it. `labels` [N] colour the clean points."""
    keep = _subset(len(clean), max_points)
    c, lab = _np(clean)[keep].astype(float), _np(labels)[keep]
    fig = make_subplots(
        rows=1,
        cols=1 + len(ablated),
        subplot_titles=["clean", *ablated],
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.02,
    )
    for trace in class_traces(c, lab, (0, 1), colours=CLASS_COLOURS, name="model label"):
        fig.add_trace(trace, 1, 1)
    for col, moved in enumerate(ablated.values(), start=2):
        a = _np(moved)[keep].astype(float)
        xs = np.stack([c[:, 0], a[:, 0], np.full(len(c), np.nan)], 1).reshape(-1)
        ys = np.stack([c[:, 1], a[:, 1], np.full(len(c), np.nan)], 1).reshape(-1)
        fig.add_trace(
            go.Scattergl(
                x=xs,
                y=ys,
                mode="lines",
                line=dict(color="rgba(0,0,0,0.08)", width=1),
                showlegend=False,
                hoverinfo="skip",
            ),
            1,
            col,
        )
        fig.add_trace(
            go.Scattergl(
                x=a[:, 0],
                y=a[:, 1],
                mode="markers",
                showlegend=False,
                marker=dict(size=3, color=[CLASS_COLOURS[int(v)] for v in lab]),
            ),
            1,
            col,
        )
    fig.update_layout(height=360, width=300 * (1 + len(ablated)), legend=dict(orientation="h", y=-0.15))
    return fig


def logit_diff_histograms(lds: dict[str, torch.Tensor], *, nbins: int = 60) -> go.Figure:
    """Histogram of the logit difference [N] per setting, with its median and mean in the panel title."""
    titles = [
        f"{name}<br>median {float(v.median()):.2f}, mean {float(v.mean()):.2f}" for name, v in lds.items()
    ]
    fig = make_subplots(
        rows=1, cols=len(lds), subplot_titles=titles, shared_xaxes=True, horizontal_spacing=0.04
    )
    lo = min(float(v.min()) for v in lds.values())
    hi = max(float(v.max()) for v in lds.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, nbins + 1)
    for col, v in enumerate(lds.values(), start=1):
        fig.add_trace(
            _histogram(_np(v), edges, showlegend=False, marker_color="#4c78a8", marker_line_width=0), 1, col
        )
        fig.add_vline(x=0, line=dict(color="black", width=1), row=1, col=col)
    fig.update_xaxes(title_text="logit diff")
    fig.update_layout(height=330, width=300 * len(lds), margin=dict(t=80))
    return fig


def ablation_bars(table) -> go.Figure:
    """From `ablation_table`: median and mean logit difference per setting, and labels kept on each side."""
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.45, 0.55],
        horizontal_spacing=0.1,
        subplot_titles=("logit difference", "labels kept"),
    )
    settings = list(table["setting"])
    fig.add_trace(go.Bar(x=settings, y=table["median_logit_diff"], name="median logit diff"), 1, 1)
    fig.add_trace(go.Bar(x=settings, y=table["mean_logit_diff"], name="mean logit diff"), 1, 1)
    for column, name in (("kept_anti_side", "anti-1 side"), ("kept_one_side", "1 side")):
        fig.add_trace(
            go.Bar(
                x=settings,
                y=table[column],
                name=f"kept, {name}",
                text=[f"{v:.0%}" for v in table[column]],
                textposition="outside",
            ),
            1,
            2,
        )
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%", row=1, col=2)
    fig.update_layout(barmode="group", height=450, width=1100, legend=dict(orientation="h", y=-0.35))
    return fig


def sorted_logit_diff(
    clean: torch.Tensor, ablated: dict[str, torch.Tensor], *, n: int = 60, seed: int = 0
) -> go.Figure:
    """For `n` random images sorted by clean logit difference: the clean curve and each ablation's values."""
    idx = _subset(len(clean), n, seed)
    c = _np(clean)[idx]
    order = np.argsort(c)
    idx, c = idx[order], c[order]
    fig = go.Figure(go.Scatter(y=c, mode="lines", name="clean", line=dict(width=3)))
    for name, v in ablated.items():
        fig.add_trace(go.Scatter(y=_np(v)[idx], mode="markers", name=name))
    fig.update_layout(
        xaxis_title="random images, sorted by clean logit difference",
        yaxis_title="logit diff (class 1 − class 0)",
        height=380,
        width=900,
    )
    return fig


def detector_contributions(
    contributions: torch.Tensor, anti: torch.Tensor, *, n: int = 100, seed: int = 0
) -> go.Figure:
    """Stacked contributions [N, 2] of the anti-1 and 1 detectors to the logit difference, for `n` random images
    from each side (`anti` [N] bool), sorted by their sum (the line)."""
    contrib, side = _np(contributions).astype(float), _np(anti).astype(bool)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("images on the anti-1 side", 'images on the "1" side'),
        horizontal_spacing=0.08,
    )
    for col, mask in ((1, side), (2, ~side)):
        pool = np.flatnonzero(mask)
        pick = pool[_subset(len(pool), n, seed)]
        total = contrib[pick].sum(1)
        pick = pick[np.argsort(total)]
        for j, name in enumerate(("anti-1", "1")):
            fig.add_trace(
                go.Bar(
                    y=contrib[pick, j],
                    name=f"{name} detectors",
                    showlegend=col == 1,
                    marker_color=GROUP_COLOURS[name],
                ),
                1,
                col,
            )
        fig.add_trace(
            go.Scatter(
                y=contrib[pick].sum(1),
                mode="lines",
                name="sum",
                showlegend=col == 1,
                line=dict(color="green", width=2),
            ),
            1,
            col,
        )
    fig.update_yaxes(title_text="contribution to logit diff (no biases)", row=1, col=1)
    fig.update_layout(barmode="relative", bargap=0.1, height=400, width=1000)
    return fig
