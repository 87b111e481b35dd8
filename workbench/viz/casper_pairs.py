"""Figures for Casper's integer-pair transformer (challenge 2). Pure functions: tensors or results in, plotly out.

Maps over the pairs are drawn like the challenge's hint image: row = A (top to bottom), column = B.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.casper.pairs.replica import ReplicaReport
from workbench.viz.casper import class_traces, pc_titles
from workbench.viz.registry import draws

CLASS_COLOURS = ("#5b3a8e", "#f2c230")  # class 0 purple, class 1 gold (as in the solution's plots)
_BINARY = [[0.0, CLASS_COLOURS[0]], [1.0, CLASS_COLOURS[1]]]


def _grid(x) -> list:
    x = torch.as_tensor(x)
    return x.reshape(113, 113).tolist() if x.numel() == 113 * 113 else x.tolist()


def _map_axes(fig: go.Figure, n: int, cols: int) -> None:
    for i in range(n):
        row, col = i // cols + 1, i % cols + 1
        fig.update_xaxes(title_text="B", row=row, col=col, constrain="domain")
        fig.update_yaxes(
            title_text="A" if col == 1 else None,
            autorange="reversed",
            scaleanchor=f"x{i + 1 if i else ''}",
            row=row,
            col=col,
        )


def label_maps(
    maps: Mapping[str, torch.Tensor], title: str | None = None, height: int | None = None, cols: int = 3
) -> go.Figure:
    """Binary label maps [A, B] keyed by their titles, `cols` per row."""
    n = len(maps)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=list(maps), horizontal_spacing=0.06, vertical_spacing=0.12
    )
    for i, grid in enumerate(maps.values()):
        fig.add_trace(
            go.Heatmap(
                z=_grid(grid),
                zmin=0,
                zmax=1,
                colorscale=_BINARY,
                showscale=False,
                hovertemplate="A=%{y} B=%{x}: label %{z}<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    _map_axes(fig, n, cols)
    fig.update_layout(
        title=title, height=height or 60 + 320 * rows, width=max(380, 330 * cols), margin=dict(t=70, b=40)
    )
    return fig


def disagreement_map(
    reference: torch.Tensor, other: torch.Tensor, names: tuple[str, str], title=None
) -> go.Figure:
    """Where two label maps [A, B] differ: agree-0, agree-1, and the two kinds of disagreement."""
    a, b = torch.as_tensor(reference).long(), torch.as_tensor(other).long()
    code = (a * 2 + b).reshape(113, 113)  # 0: both 0, 3: both 1, 1: ref 0 other 1, 2: ref 1 other 0
    colours = ["#e8e3f0", "#1f77b4", "#d62728", "#f6e7b0"]
    scale = [[i / 4 + e, colours[i]] for i in range(4) for e in (0, 0.25)]
    text = [
        [f"{names[0]} {int(a_)} / {names[1]} {int(b_)}" for a_, b_ in zip(ra, rb)]
        for ra, rb in zip(a.reshape(113, 113).tolist(), b.reshape(113, 113).tolist())
    ]
    fig = go.Figure(
        go.Heatmap(
            z=code.tolist(),
            zmin=-0.5,
            zmax=3.5,
            colorscale=scale,
            text=text,
            hovertemplate="A=%{y} B=%{x}: %{text}<extra></extra>",
            colorbar=dict(
                tickvals=[0, 1, 2, 3],
                ticktext=["both 0", f"{names[1]} only 1", f"{names[0]} only 1", "both 1"],
            ),
        )
    )
    fig.update_yaxes(title_text="A", autorange="reversed", scaleanchor="x")
    fig.update_xaxes(title_text="B", constrain="domain")
    fig.update_layout(title=title, height=430, width=560)
    return fig


def row_transitions(transitions: torch.Tensor, title: str | None = None) -> go.Figure:
    """Label changes along B per row A (a bar per row) and how many rows have 0, 1, 2, ... changes."""
    t = torch.as_tensor(transitions).long()
    counts = torch.bincount(t)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], subplot_titles=["per row", "rows by count"])
    fig.add_trace(
        go.Bar(x=list(range(len(t))), y=t.tolist(), name="changes", marker_color="#555"), row=1, col=1
    )
    fig.add_trace(
        go.Bar(x=list(range(len(counts))), y=counts.tolist(), name="rows", marker_color=CLASS_COLOURS[0]),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="A (row)", row=1, col=1)
    fig.update_yaxes(title_text="label changes along B", row=1, col=1)
    fig.update_xaxes(title_text="changes in the row", dtick=1, row=1, col=2)
    fig.update_yaxes(title_text="rows", row=1, col=2)
    fig.update_layout(title=title, height=330, showlegend=False)
    return fig


@draws(ReplicaReport)
def training_curves(report, title: str | None = None) -> go.Figure:
    """Accuracy (train, test), agreement with the original's labels and train loss over the epochs."""
    frame = report.to_frame()
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for column, name, dash in (
        ("train_accuracy", "train accuracy", "dot"),
        ("test_accuracy", "test accuracy", "solid"),
        ("agreement_with_original", "agreement with the original's labels", "dash"),
    ):
        fig.add_trace(go.Scatter(x=frame.epoch, y=frame[column], name=name, line=dict(dash=dash)))
    fig.add_trace(
        go.Scatter(x=frame.epoch, y=frame.train_loss, name="train loss", line=dict(color="#999")),
        secondary_y=True,
    )
    fig.update_yaxes(title_text="fraction of pairs", range=[0.5, 1.005], secondary_y=False)
    fig.update_yaxes(title_text="train loss", type="log", dtick=1, exponentformat="power", secondary_y=True)
    fig.update_xaxes(title_text="epoch (full-batch step)")
    fig.update_layout(title=title or "Training the replica", height=380)
    return fig


def attention_pattern(pattern: torch.Tensor, title: str | None = None) -> go.Figure:
    """The last query's attention per head, [head, key]."""
    p = torch.as_tensor(pattern)
    fig = go.Figure(
        go.Heatmap(
            z=p.tolist(),
            x=["A (pos 0)", "B (pos 1)", "= (pos 2)"],
            y=[f"head {h}" for h in range(len(p))],
            zmin=0,
            zmax=1,
            colorscale="Blues",
            text=[[f"{v:.2f}" for v in row] for row in p.tolist()],
            texttemplate="%{text}",
            hovertemplate="%{y} -> %{x}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or "Mean attention of the last position", height=360, width=480)
    return fig


def pca_scatter(
    points: torch.Tensor,
    labels: torch.Tensor,
    *,
    gate=None,
    explained: Sequence[float] | None = None,
    title: str | None = None,
    ranges: tuple[tuple[float, float], tuple[float, float]] | None = None,
    figure: go.Figure | None = None,
) -> go.Figure:
    """Points [pair, 2] in the PC1-PC2 plane coloured by label, with the AND gate's corner boundary if given
    (and fitted on two components).

    `figure`: a FigureWidget to update in place (same trace layout), for sliders.
    """
    pts = torch.as_tensor(points).double()
    traces = class_traces(
        pts, labels, (0, 1), colours=dict(enumerate(CLASS_COLOURS)), name="class", opacity=0.6
    )
    if gate is not None and gate.n_components == 2:
        span = float((pts.max(0).values - pts.min(0).values).max())
        arms = gate.boundary_line(extent=2 * span)
        xs = arms[0, :, 0].flip(0).tolist() + arms[1, :, 0].tolist()
        ys = arms[0, :, 1].flip(0).tolist() + arms[1, :, 1].tolist()
        traces.append(
            go.Scatter(x=xs, y=ys, mode="lines", line=dict(color="red", width=2), name="AND boundary")
        )
    if figure is not None:
        with figure.batch_update():
            for trace, new in zip(figure.data, traces):
                trace.x, trace.y = new.x, new.y
            if title:
                figure.layout.title.text = title
        return figure
    fig = go.Figure(traces)
    axis = pc_titles(explained)
    fig.update_xaxes(title_text=axis[0])
    fig.update_yaxes(title_text=axis[1], scaleanchor="x")
    if ranges is None:
        pad = 0.05 * (pts.max(0).values - pts.min(0).values)
        lo, hi = pts.min(0).values - pad, pts.max(0).values + pad
        ranges = ((lo[0].item(), hi[0].item()), (lo[1].item(), hi[1].item()))
    fig.update_xaxes(range=list(ranges[0]))
    fig.update_yaxes(range=list(ranges[1]))
    fig.update_layout(title=title, height=480, width=560)
    return fig


def filter_maps(margins: torch.Tensor, names: Sequence[str] = ("alpha", "beta"), title=None) -> go.Figure:
    """Filter margins [A, B, 2] (value minus threshold; positive = passes) as two diverging heatmaps."""
    m = torch.as_tensor(margins).double().reshape(113, 113, -1)
    fig = make_subplots(
        rows=1, cols=m.shape[-1], subplot_titles=[f"filter {n}" for n in names], horizontal_spacing=0.15
    )
    for i in range(m.shape[-1]):
        bound = m[..., i].abs().max().item()
        fig.add_trace(
            go.Heatmap(
                z=m[..., i].tolist(),
                zmid=0,
                zmin=-bound,
                zmax=bound,
                colorscale="RdBu",
                colorbar=dict(x=1.0 if i else 0.425, len=0.9, thickness=15),
                hovertemplate="A=%{y} B=%{x}: %{z:.3f}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
    _map_axes(fig, m.shape[-1], m.shape[-1])
    fig.update_layout(title=title, height=380, width=860)
    return fig


def additive_parts(parts: Mapping[str, torch.Tensor], title=None) -> go.Figure:
    """Per-token contributions (e.g. "W_A . alpha" over the 113 values of A) as lines."""
    fig = go.Figure()
    for name, values in parts.items():
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=torch.as_tensor(values).tolist(), name=name))
    fig.update_xaxes(title_text="token value (A or B)")
    fig.update_yaxes(title_text="contribution to the filter")
    fig.update_layout(title=title, height=360)
    return fig


def fold_scatter(
    points: torch.Tensor, labels: torch.Tensor, fraction: float, figure=None, ranges=None
) -> go.Figure:
    """One frame of the MLP fold: resid_mid + f * mlp_out in the PC1-PC2 plane of resid_post."""
    return pca_scatter(
        points,
        labels,
        title=f"resid_mid + {fraction:.2f} x mlp_out (PCs of resid_post)",
        figure=figure,
        ranges=ranges,
    )


def scrub_bars(
    kept: Mapping[str, float], *, baseline: float | None = None, goal: float | None = None, title=None
):
    """Fraction of the full model's labels kept per scheme, with the baseline and goal as horizontal lines."""
    names, values = list(kept), [float(v) for v in kept.values()]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=values,
            text=[f"{v:.1%}" for v in values],
            textposition="outside",
            marker_color=CLASS_COLOURS[0],
        )
    )
    low = min(values + [v for v in (baseline, goal) if v is not None])
    for value, name, dash in ((baseline, "baseline", "dash"), (goal, "goal", "dot")):
        if value is not None:
            fig.add_hline(
                y=value, line_dash=dash, annotation_text=f"{name} {value:.1%}", annotation_position="top left"
            )
    fig.update_yaxes(title_text="agreement with the full model's labels", range=[max(0.0, low - 0.05), 1.01])
    fig.update_layout(title=title, height=420)
    return fig
