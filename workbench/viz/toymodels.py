"""Figures for the compressed-computation toy models. Pure functions of results; they never train or run a
model beyond reading stored numbers.

Every L/p figure draws the clean-task naive line (1/12 at n = 100, d = 50) dashed; where the critique published a
value, `paper=True` adds it as open black markers ("paper") so the two can be compared at a glance.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.toymodels import (
    FeatureResponse,
    LossCurves,
    Mechanism,
    OffsetSweep,
    SigmaSweep,
    SNMFSweep,
    ToyModel,
    Transplant,
)
from workbench.toymodels import paper as ref
from workbench.viz.registry import draws

PALETTE = qualitative.Plotly + qualitative.D3
NAIVE_STYLE = dict(color="#555", dash="dash", width=1.5)
PAPER_MARKER = dict(symbol="circle-open", size=10, color="black", line=dict(width=2))


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def running_mean(values: torch.Tensor | np.ndarray, window: int = 100) -> np.ndarray:
    """Mean over the last `window` values at each step (shorter at the start)."""
    v = _np(values).astype(np.float64)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _naive_line(fig: go.Figure, value: float, **where) -> None:
    """The clean-task naive L/p as a dashed line across the plot, named in the legend (an annotation would be
    misplaced on log axes, where plotly reads its position as log10)."""
    fig.add_hline(y=value, line=NAIVE_STYLE, **where)
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            line=NAIVE_STYLE,
            name=f"naive, clean task ({value:.4f})",
            meta={"role": "naive"},
        ),
        **where,
    )


# -- training ------------------------------------------------------------------------------------------------


@draws(ToyModel)
def training_curve(models, *, window: int = 100, log_y: bool = True, title: str | None = None) -> go.Figure:
    """Running mean (over `window` steps) of the training L/p of one model or several."""
    models = [models] if not isinstance(models, (list, tuple)) else list(models)
    fig = go.Figure()
    for i, m in enumerate(models):
        y = running_mean(m.curve, window)
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, len(y) + 1),
                y=y,
                mode="lines",
                name=m.label,
                line=dict(color=PALETTE[i % len(PALETTE)]),
                meta={"role": "training", "model": i},
            )
        )
    if models:
        _naive_line(fig, (models[0].n_features - models[0].d_mlp) / models[0].n_features / 6)
    fig.update_layout(
        title=title or f"training loss per feature (running mean over {window} steps)",
        xaxis_title="step",
        yaxis_title="L / p",
        yaxis_type="log" if log_y else "linear",
        height=380,
        legend=dict(yanchor="top", y=0.99, xanchor="right", x=0.99),
    )
    return fig


def live_curve(
    label: str, curve: torch.Tensor, steps: int, *, window: int = 100, naive: float = 1 / 12
) -> go.Figure:
    """The loss curve of a model still training (x axis spans the whole run)."""
    y = running_mean(curve, window)
    fig = go.Figure(
        go.Scatter(
            x=np.arange(1, len(y) + 1), y=y, mode="lines", name=label, meta={"role": "training", "model": 0}
        )
    )
    _naive_line(fig, naive)
    fig.update_layout(
        title=f"training: {label} ({len(y):,} / {steps:,} steps)",
        xaxis=dict(title="step", range=[0, steps]),
        yaxis=dict(title="L / p (running mean)", type="log"),
        height=380,
    )
    return fig


# -- L/p vs p ------------------------------------------------------------------------------------------------


def _paper_points(fig: go.Figure, points: list[tuple[float, float]], name: str = "paper", **where) -> None:
    if not points:
        return
    xs, ys = zip(*points)
    fig.add_trace(
        go.Scatter(
            x=list(xs),
            y=list(ys),
            mode="markers",
            name=name,
            marker=PAPER_MARKER,
            meta={"role": "paper"},
            hovertemplate="paper: %{y:.4f} at %{x:.3g}<extra></extra>",
        ),
        **where,
    )


@draws(LossCurves)
def loss_vs_p(
    curves,
    *,
    paper: dict[str, list[tuple[float, float]]] | None = None,
    log_y: bool = True,
    highlight: int | None = None,
    show_own: bool = True,
    title: str | None = None,
) -> go.Figure:
    """L/p against evaluation density (log-log), one line per model; dots at each model's own training p and a
    dotted black line through them; the naive line dashed; `paper` = {legend: [(p, L/p), ...]} as open markers.
    Each line's customdata is its model index (click-through)."""
    fig = go.Figure()
    p = _np(curves.p)
    for m, label in enumerate(curves.labels):
        colour = PALETTE[m % len(PALETTE)]
        width = 4 if highlight == m else 2
        fig.add_trace(
            go.Scatter(
                x=p,
                y=_np(curves.loss[m]),
                error_y=dict(type="data", array=_np(curves.stderr[m]), visible=True, thickness=1, width=0),
                mode="lines+markers" if len(p) < 30 else "lines",
                name=label,
                line=dict(color=colour, width=width, dash="dot" if curves.kinds[m] != "trained" else None),
                marker=dict(size=4),
                customdata=np.full(len(p), m),
                meta={"role": "curve", "model": m},
                hovertemplate=f"{label}<br>p=%{{x:.3g}}<br>L/p=%{{y:.4f}}<extra></extra>",
            )
        )
    own = _np(curves.own_loss)
    tp = _np(curves.train_p)
    ok = ~np.isnan(own)
    if show_own and ok.any():
        order = np.argsort(tp[ok])
        fig.add_trace(
            go.Scatter(
                x=tp[ok][order],
                y=own[ok][order],
                mode="lines+markers",
                name="at own training p",
                line=dict(color="black", dash="dot", width=1.5),
                marker=dict(color="black", size=8),
                customdata=np.nonzero(ok)[0][order],
                meta={"role": "own"},
                hovertemplate="trained at p=%{x:.3g}: L/p=%{y:.4f}<extra></extra>",
            )
        )
    naive = float(curves.naive[0])
    _naive_line(fig, naive)
    for name, pts in (paper or {}).items():
        _paper_points(fig, pts, name=f"paper: {name}")
    fig.update_layout(
        title=title
        or f"loss per feature vs input density ({curves.mode} inputs, {curves.n_samples:,} samples per point)",
        xaxis=dict(title="evaluation p (feature probability)", type="log"),
        yaxis=dict(title="L / p", type="log" if log_y else "linear"),
        height=460,
        legend=dict(font=dict(size=10)),
    )
    return fig


# -- sigma sweep ---------------------------------------------------------------------------------------------


@draws(SigmaSweep)
def sigma_sweep(
    sweep,
    *,
    paper: bool = True,
    show_naive_noisy: bool = True,
    selected: tuple[str, float] | None = None,
    title: str | None = None,
) -> go.Figure:
    """L/p against sigma per kind; the naive line (clean task) dashed, the naive weights on the noisy labels
    dotted; the critique's minima and crossings as open markers. customdata: [kind index, sigma index]."""
    fig = go.Figure()
    s = _np(sweep.sigma)
    for k, kind in enumerate(sweep.kinds):
        colour = PALETTE[k]
        fig.add_trace(
            go.Scatter(
                x=s,
                y=_np(sweep.loss[k]),
                error_y=dict(type="data", array=_np(sweep.stderr[k]), visible=True, thickness=1, width=0),
                mode="lines+markers",
                name=f"trained, {kind}",
                line=dict(color=colour),
                customdata=np.stack([np.full(len(s), k), np.arange(len(s))], 1),
                meta={"role": "sweep", "kind": kind},
                hovertemplate=f"{kind} σ=%{{x:.3g}}<br>L/p=%{{y:.4f}}<br>click: load this model<extra></extra>",
            )
        )
        if show_naive_noisy:
            fig.add_trace(
                go.Scatter(
                    x=s,
                    y=_np(sweep.naive_noisy[k]),
                    mode="lines",
                    name=f"naive weights on the {kind} noisy labels",
                    line=dict(color=colour, dash="dot", width=1),
                    meta={"role": "naive_noisy", "kind": kind},
                )
            )
        if paper and kind in ref.SWEEP:
            pts = ref.SWEEP[kind]
            _paper_points(fig, pts, name=f"paper: {kind} (minimum, crossing, σ=0.08)")
    if selected is not None:
        k, j = sweep._index(*selected)
        fig.add_trace(
            go.Scatter(
                x=[s[j]],
                y=[float(sweep.loss[k, j])],
                mode="markers",
                name="selected",
                marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color="crimson", width=3)),
                meta={"role": "selected"},
            )
        )
    _naive_line(fig, sweep.naive)
    shown = [float(sweep.loss.min()), float(sweep.loss.max()), sweep.naive]
    shown += [y for kind in sweep.kinds for _, y in ref.SWEEP.get(kind, [])] if paper else []
    fig.update_yaxes(
        range=[min(shown) - 0.01, max(shown) + 0.015]
    )  # the naive-on-noisy lines may run off the top
    fig.update_layout(
        title=title or f"L/p at p = {sweep.p:g} against the mixing scale σ (one model per point)",
        xaxis_title="σ (std of M's entries)",
        yaxis_title="L / p",
        height=440,
        legend=dict(font=dict(size=10)),
    )
    return fig


# -- transplant ----------------------------------------------------------------------------------------------


@draws(Transplant)
def transplant(tr, *, window: int = 100, paper: bool = True, title: str | None = None) -> go.Figure:
    """Running mean of training L/p: phase 1 on the noisy task, then the same weights fine-tuned on M = 0."""
    n1 = len(tr.phase1)
    y1 = running_mean(tr.phase1, window)
    y2 = running_mean(tr.phase2, window)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=np.arange(1, n1 + 1), y=y1, mode="lines", name=f"phase 1: {tr.label}", meta={"role": "phase1"}
        )
    )
    fig.add_trace(
        go.Scatter(
            x=np.arange(n1 + 1, n1 + len(y2) + 1),
            y=y2,
            mode="lines",
            name="phase 2: the same weights trained on M = 0",
            meta={"role": "phase2"},
        )
    )
    marks = [
        (n1, tr.noisy_before, "end of phase 1, its noisy task"),
        (n1 + 1, tr.clean_before, "same weights, clean task"),
        (n1 + len(y2), tr.clean_after, "after phase 2, clean task"),
    ]
    fig.add_trace(
        go.Scatter(
            x=[m[0] for m in marks],
            y=[m[1] for m in marks],
            mode="markers+text",
            text=[f"{m[1]:.4f}" for m in marks],
            textposition=["top left", "bottom right", "top left"],
            marker=dict(size=9, color="black"),
            name="evaluated L/p",
            hovertext=[m[2] for m in marks],
            meta={"role": "evaluated"},
        )
    )
    fig.add_vline(x=n1, line=dict(color="#999", dash="dot"))
    _naive_line(fig, tr.naive)
    if paper:
        _paper_points(
            fig, [(n1 + len(y2), ref.PAPER["transplant_after"].value)], name="paper: after phase 2 (≈)"
        )
    fig.update_layout(
        title=title or "transplant: train with mixing, then continue on M = 0",
        xaxis_title="step",
        yaxis=dict(title=f"L / p (running mean over {window} steps)", type="log"),
        height=420,
    )
    return fig


# -- mechanism -----------------------------------------------------------------------------------------------


@draws(Mechanism)
def spectrum(mech, *, basis: str = "eig", title: str | None = None) -> go.Figure:
    """M's spectrum (bars, descending) with the top-d band shaded, and cos(E_i, W W E_i) (or the singular-vector
    version, basis="sv") on the right axis."""
    if basis not in ("eig", "sv"):
        raise InputError(
            "basis must be 'eig' (eigenvectors of (M + M^T)/2) or 'sv' (singular vectors of I + M)."
        )
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    idx = np.arange(1, len(mech.eigenvalues) + 1)
    if basis == "eig":
        bars, cos = _np(mech.eigenvalues), _np(mech.eig_cos)
        bar_name, cos_name = "eigenvalue of (M + Mᵀ)/2", "cos(E_i, (W_in W_out)ᵀ E_i)"
    else:
        bars, cos = _np(mech.singular_values), _np(mech.sv_cos)
        bar_name, cos_name = "singular value of I + M", "cos(U_i, (W_in W_out)ᵀ V_i)"
    fig.add_trace(
        go.Bar(x=idx, y=bars, name=bar_name, marker_color="#9ecae1", meta={"role": "spectrum"}),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=idx,
            y=cos,
            mode="lines+markers",
            name=cos_name,
            marker=dict(size=4),
            line=dict(color="crimson"),
            customdata=idx - 1,
            meta={"role": "cos"},
        ),
        secondary_y=True,
    )
    fig.add_vrect(
        x0=0.5,
        x1=mech.d_mlp + 0.5,
        fillcolor="#ffe9a8",
        opacity=0.35,
        line_width=0,
        layer="below",
        annotation_text=f"top {mech.d_mlp} (= neurons)",
        annotation_position="top left",
    )
    fig.update_yaxes(title_text=bar_name, secondary_y=False)
    fig.update_yaxes(
        title_text="cosine",
        range=[-0.3, 1.05],
        tickvals=[-0.25, 0, 0.25, 0.5, 0.75, 1],
        showgrid=False,
        secondary_y=True,
    )
    fig.update_layout(
        title=title or f"{mech.label}: does the network map M's directions onto themselves?",
        xaxis_title="direction i (sorted, largest first)",
        height=400,
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def _heatmap_grid(
    panels: list[tuple[np.ndarray, str]],
    *,
    hover: str | None = None,
    vertical_spacing: float = 0.12,
    cap: float = math.inf,
) -> tuple[go.Figure, list[tuple[int, int]]]:
    """A 2 x 2 grid of heatmaps on one symmetric colour scale, at most ±`cap` (the first carries the colour
    bar), and each panel's (row, col)."""
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=[name for _, name in panels],
        horizontal_spacing=0.08,
        vertical_spacing=vertical_spacing,
    )
    lim = min(max(float(np.abs(z).max()) for z, _ in panels), cap) or 1.0
    where = [(i // 2 + 1, i % 2 + 1) for i in range(len(panels))]
    for i, ((z, _name), (row, col)) in enumerate(zip(panels, where)):
        heat = go.Heatmap(
            z=z,
            zmin=-lim,
            zmax=lim,
            colorscale="RdBu",
            reversescale=True,
            showscale=i == 0,
            hovertemplate=hover,
        )
        fig.add_trace(heat, row=row, col=col)
    return fig, where


def projections(mech, title: str | None = None) -> go.Figure:
    """Heatmaps of the weights projected on M's directions: Eᵀ W_in, Eᵀ W_outᵀ, Vᵀ W_in, Uᵀ W_outᵀ."""
    panels = [
        (_np(mech.proj_eig_in), "Eᵀ W_in"),
        (_np(mech.proj_eig_out), "Eᵀ W_outᵀ"),
        (_np(mech.proj_sv_in), "Vᵀ W_in"),
        (_np(mech.proj_sv_out), "Uᵀ W_outᵀ"),
    ]
    hover = "direction %{y}<br>neuron %{x}<br>%{z:.3f}<extra></extra>"
    fig, where = _heatmap_grid(panels, hover=hover, vertical_spacing=0.16)
    for row, col in where:
        fig.add_hline(y=mech.d_mlp - 0.5, line=dict(color="black", dash="dot", width=1), row=row, col=col)
    fig.update_yaxes(autorange="reversed", title_text="direction (largest first)")
    fig.update_xaxes(title_text="neuron")
    fig.update_layout(
        title=title or f"{mech.label}: neurons load on the top-{mech.d_mlp} directions only", height=700
    )
    return fig


def scatter(mech, *, paper: bool = True, max_points: int = 4000, title: str | None = None) -> go.Figure:
    """Entries of (W_in W_out)ᵀ against entries of M: off-diagonal (fit through 0) and diagonal (fit a M + b)."""
    n = mech.M.shape[0]
    off = ~np.eye(n, dtype=bool)
    x, y = _np(mech.M)[off], _np(mech.WW)[off]
    if len(x) > max_points:
        keep = np.random.default_rng(0).choice(len(x), max_points, replace=False)
        x, y = x[keep], y[keep]
    dx, dy = np.diag(_np(mech.M)), np.diag(_np(mech.WW))
    fig = go.Figure()
    fig.add_trace(
        go.Scattergl(
            x=x,
            y=y,
            mode="markers",
            marker=dict(size=3, opacity=0.4, color=PALETTE[0]),
            name="off-diagonal entries",
            meta={"role": "offdiag"},
        )
    )
    fig.add_trace(
        go.Scatter(
            x=dx,
            y=dy,
            mode="markers",
            marker=dict(size=6, color=PALETTE[1]),
            name="diagonal entries",
            meta={"role": "diag"},
        )
    )
    lo, hi = float(min(x.min(initial=0), dx.min(initial=0))), float(max(x.max(initial=0), dx.max(initial=0)))
    grid = np.linspace(lo, hi, 2)
    if not math.isnan(mech.offdiag_slope):
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=mech.offdiag_slope * grid,
                mode="lines",
                line=dict(color=PALETTE[0]),
                name=f"off-diagonal fit: {mech.offdiag_slope:.3f}·M",
                meta={"role": "fit"},
            )
        )
    if not math.isnan(mech.diag_slope):
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=mech.diag_slope * grid + mech.diag_intercept,
                mode="lines",
                line=dict(color=PALETTE[1]),
                name=f"diagonal fit: {mech.diag_slope:.3f}·M + {mech.diag_intercept:.3f}",
                meta={"role": "fit"},
            )
        )
    if paper:
        a = ref.PAPER["offdiag_slope"].value
        b, c = ref.PAPER["diag_slope"].value, ref.PAPER["diag_intercept"].value
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=a * grid,
                mode="lines",
                line=dict(color="black", dash="dot", width=1),
                name=f"paper off-diagonal: {a}·M",
                meta={"role": "paper"},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=grid,
                y=b * grid + c,
                mode="lines",
                line=dict(color="black", dash="dash", width=1),
                name=f"paper diagonal: {b}·M + {c}",
                meta={"role": "paper"},
            )
        )
    fig.update_layout(
        title=title or f"{mech.label}: (W_in W_out)ᵀ against M, entry by entry",
        xaxis_title="M entry",
        yaxis_title="(W_in W_out)ᵀ entry",
        height=440,
    )
    return fig


def weight_images(mech, title: str | None = None) -> go.Figure:
    """W_in and W_outᵀ as images (feature x neuron)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["W_in", "W_outᵀ"], horizontal_spacing=0.08)
    for i, z in enumerate([_np(mech.W_in), _np(mech.W_out).T]):
        lim = float(np.abs(z).max()) or 1.0
        fig.add_trace(
            go.Heatmap(z=z, zmin=-lim, zmax=lim, colorscale="RdBu", reversescale=True, showscale=i == 0),
            row=1,
            col=i + 1,
        )
    fig.update_yaxes(autorange="reversed", title_text="feature")
    fig.update_xaxes(title_text="neuron")
    fig.update_layout(title=title or f"{mech.label}: weights", height=420)
    return fig


# -- per-feature responses -----------------------------------------------------------------------------------


@draws(FeatureResponse)
def responses(resp, *, highlight: int | None = None, title: str | None = None) -> go.Figure:
    """Output i for input x e_i, one thin line per feature (coloured by index), the ReLU label dashed.
    customdata: the feature index (click to highlight)."""
    n = resp.out.shape[0]
    colours = sample_colorscale("Viridis", [i / max(n - 1, 1) for i in range(n)])
    fig = go.Figure()
    x = _np(resp.x)
    for i in range(n):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=_np(resp.out[i]),
                mode="lines",
                line=dict(color=colours[i], width=4 if highlight == i else 1),
                opacity=1.0 if highlight in (None, i) else 0.25,
                name=f"feature {i}",
                showlegend=False,
                customdata=np.full(len(x), i),
                meta={"role": "feature", "feature": i},
                hovertemplate=f"feature {i}: slope {float(resp.slope_pos[i]):.2f} (x>0), "
                f"{float(resp.slope_neg[i]):.2f} (x<0)<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=np.maximum(x, 0),
            mode="lines",
            line=dict(color="black", dash="dash", width=2),
            name="ReLU(x)",
            meta={"role": "relu"},
        )
    )
    fig.update_layout(
        title=title or f"{resp.model_label}: each feature's response to its own input",
        xaxis_title="input x_i (all other features 0)",
        yaxis_title="output i",
        height=420,
    )
    return fig


def slope_histogram(resp, title: str | None = None) -> go.Figure:
    """Histogram of the per-feature positive slopes (1 = the feature's ReLU computed exactly)."""
    fig = go.Figure(go.Histogram(x=_np(resp.slope_pos), nbinsx=40, name="slope for x > 0"))
    fig.add_trace(go.Histogram(x=_np(resp.slope_neg), nbinsx=40, name="slope for x < 0", opacity=0.6))
    fig.update_layout(
        barmode="overlay",
        title=title or f"{resp.model_label}: per-feature slopes",
        xaxis_title="slope",
        yaxis_title="features",
        height=360,
    )
    return fig


def onehot_maps(resp, title: str | None = None) -> go.Figure:
    """Outputs and labels for one-hot inputs ±e_j (output feature x input feature)."""
    panels = [
        (_np(resp.onehot_pos).T, "output, x = +e_j"),
        (_np(resp.target_pos).T, "label, x = +e_j"),
        (_np(resp.onehot_neg).T, "output, x = −e_j"),
        (_np(resp.target_neg).T, "label, x = −e_j"),
    ]
    fig, _ = _heatmap_grid(
        panels, vertical_spacing=0.1, cap=1.0
    )  # the labels' ReLU part is 1: keep it visible
    fig.update_yaxes(autorange="reversed", title_text="output feature")
    fig.update_xaxes(title_text="input feature j")
    fig.update_layout(title=title or f"{resp.model_label}: one-hot inputs", height=720)
    return fig


def contributions(resp, title: str | None = None) -> go.Figure:
    """Stacked bars of W_in[i, k] W_out[k, i] per feature i, one colour per neuron k."""
    c = _np(resp.contrib)
    n, d = c.shape
    fig = go.Figure()
    for k in range(d):
        fig.add_trace(
            go.Bar(
                x=np.arange(n),
                y=c[:, k],
                name=f"neuron {k}",
                showlegend=False,
                marker_color=PALETTE[k % len(PALETTE)],
            )
        )
    fig.update_layout(
        barmode="relative",
        title=title or f"{resp.model_label}: W_in ⊙ W_outᵀ per feature, by neuron",
        xaxis_title="feature",
        yaxis_title="contribution",
        height=360,
    )
    return fig


# -- baselines -----------------------------------------------------------------------------------------------


@draws(OffsetSweep)
def offset_sweep(sweep, *, paper: bool = True, title: str | None = None) -> go.Figure:
    """Naive + offset: L/p against the offset b at each density (analytic lines, Monte Carlo check at the best
    b as dots), naive dashed; the critique's optima as open markers."""
    fig = go.Figure()
    b = _np(sweep.b)
    for i, p in enumerate(_np(sweep.p)):
        colour = PALETTE[i % len(PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=b,
                y=_np(sweep.loss[i]),
                mode="lines",
                name=f"p = {p:g}",
                line=dict(color=colour),
                meta={"role": "analytic"},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=[float(sweep.best_b[i])],
                y=[float(sweep.mc_loss[i])],
                mode="markers",
                marker=dict(color=colour, size=9),
                name=f"p = {p:g}: best b, Monte Carlo",
                error_y=dict(type="data", array=[float(sweep.mc_stderr[i])]),
                meta={"role": "mc"},
                showlegend=False,
            )
        )
    if paper:
        _paper_points(fig, ref.OFFSET_POINTS, name="paper: best offsets")
    _naive_line(fig, sweep.naive)
    fig.update_layout(
        title=title or "naive + offset on the clean task: the dense-regime solution",
        xaxis=dict(title="offset b", type="log"),
        yaxis=dict(title="L / p", type="log"),
        height=420,
    )
    return fig


@draws(SNMFSweep)
def snmf_sweep(sweep, *, trained=None, paper: bool = True, title: str | None = None) -> go.Figure:
    """Semi-NMF L/p against sigma per variant (orientation x evaluation), the naive lines, optionally a trained
    `SigmaSweep` of the same kind for comparison, and the critique's plotted values."""
    fig = go.Figure()
    s = _np(sweep.sigma)
    for v, name in enumerate(sweep.variants):
        fig.add_trace(
            go.Scatter(
                x=s,
                y=_np(sweep.loss[v]),
                mode="lines+markers",
                name=f"semi-NMF: {name}",
                line=dict(color=PALETTE[v], dash="solid" if sweep.mode[v] == "one_hot" else "dash"),
                meta={"role": "snmf", "variant": name},
            )
        )
    fig.add_trace(
        go.Scatter(
            x=s,
            y=_np(sweep.naive_noisy),
            mode="lines",
            name="naive weights on the noisy labels",
            line=dict(color="#777", dash="dot"),
            meta={"role": "naive_noisy"},
        )
    )
    if trained is not None and sweep.kind in trained.kinds:
        k = trained.kinds.index(sweep.kind)
        fig.add_trace(
            go.Scatter(
                x=_np(trained.sigma),
                y=_np(trained.loss[k]),
                mode="lines+markers",
                name=f"trained ({sweep.kind})",
                line=dict(color="black"),
                meta={"role": "trained"},
            )
        )
    if paper:
        _paper_points(fig, ref.SNMF_POINTS, name="paper: semi-NMF (code, one-hot eval)")
    _naive_line(fig, sweep.naive)
    fig.update_layout(
        title=title or f"semi-NMF of the target, no training ({sweep.kind} M)",
        xaxis_title="σ",
        yaxis_title="L / p",
        height=440,
        legend=dict(font=dict(size=10)),
    )
    return fig


def comparison_table(frame, title: str = "ours vs the paper") -> go.Figure:
    """A `paper.compare` frame as a plotly table (ticks where ours is within the tolerance)."""
    cols = ["quantity", "paper", "ours", "tolerance", "within"]
    values = [frame[c].tolist() for c in cols]
    values[1] = [f"{v:.4g}" for v in values[1]]
    values[2] = [f"{v:.4g}" for v in values[2]]
    values[3] = [f"± {v:.3g}" for v in values[3]]
    values[4] = ["✓" if v else "✗" for v in values[4]]
    fig = go.Figure(go.Table(header=dict(values=cols), cells=dict(values=values, align="left")))
    fig.update_layout(title=title, height=60 + 28 * len(frame))
    return fig
