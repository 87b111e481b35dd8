"""Figures for patching results: layer x position heatmaps with the prompt's tokens, per-head grids, and the
attribution-vs-exact scatter. Pure functions of results; they never run a model.

Colours: a diverging scale centred on the unpatched run's level (0 for denoising, 1 for noising when
normalised), so white means "no effect", and symmetric around it, never clipped: negative components stay
visible. Blue is above the unpatched level (towards or beyond clean), red below.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.patching.inputs import SITE_LABELS
from workbench.patching.result import AttributionComparison, PatchingResult
from workbench.viz.common import white
from workbench.viz.registry import draws

COLORSCALE = "RdBu"
# subplot titles of multi-site grids: short enough for a third of a notebook-wide figure
SITE_SHORT = {
    "resid_pre": "resid_pre (entering the block)",
    "resid_mid": "resid_mid (between attn and MLP)",
    "resid_post": "resid_post (leaving the block)",
    "attn_out": "attn_out (attention output)",
    "mlp_out": "mlp_out (MLP output)",
    "z": "z (head output)",
    "pattern": "pattern (attention pattern)",
}


def value_title(result: PatchingResult, metric: str | None, normalize: bool) -> str:
    label = result.metric_label(metric)
    if normalize:
        return f"normalised {label} (0 = corrupt, 1 = clean)"
    return label + (" (nats)" if (metric or result.metric) == "kl" else "")


def position_labels(result: PatchingResult, pair: int | None = None) -> list[str]:
    """Labels of the position axis: the index and the clean token ("clean/corrupt" where they differ) of `pair`
    (the first pair when None: the mean over pairs is labelled with the first pair's tokens)."""
    if pair is None or pair == 0:
        return list(result.position_labels)
    clean, corrupt = result.clean_tokens[pair], result.corrupt_tokens[pair]
    out = []
    for group, first_label in zip(result.positions, result.position_labels):
        if len(group) != 1:  # all positions together, or a group: the same for every pair
            out.append(first_label)
            continue
        t = group[0]
        tok = clean[t] if clean[t] == corrupt[t] else f"{clean[t]}/{corrupt[t]}"
        out.append(f"{t}:{tok}")
    return out


def _layout_axes(
    result: PatchingResult, pair: int | None = None
) -> tuple[str, list[str], str, list[str], str]:
    """(y name, y labels, x name, x labels, mode) of each facet."""
    layers = [f"L{layer}" for layer in result.layers]
    positions = position_labels(result, pair)
    if not result.per_head:
        return "layer", layers, "position", positions, "layer_pos"
    heads = [f"H{h}" for h in result.heads]
    if len(result.positions) == 1:
        return "layer", layers, "head", heads, "layer_head"
    if len(result.layers) == 1:
        return "head", heads, "position", positions, "head_pos"
    rows = [f"L{layer}H{h}" for layer in result.layers for h in result.heads]
    return "layer, head", rows, "position", positions, "layerhead_pos"


def _facet(values: np.ndarray, mode: str) -> np.ndarray:
    """values [layer, position(, head)] of one site -> the 2-D grid shown."""
    if mode == "layer_pos":
        return values
    if mode == "layer_head":
        return values[:, 0, :]
    if mode == "head_pos":
        return values[0].T
    return values.transpose(0, 2, 1).reshape(-1, values.shape[1])  # (layer, head) rows


def _cell_ids(result: PatchingResult, mode: str) -> np.ndarray:
    """customdata [y, x, 3] = (layer, position index, head or -1) of each shown cell, for click handlers."""
    n_layers, n_pos = len(result.layers), len(result.positions)
    heads = result.heads or (-1,)
    grid = np.zeros((n_layers, n_pos, len(heads), 3), dtype=int)
    grid[..., 0] = np.array(result.layers)[:, None, None]
    grid[..., 1] = np.arange(n_pos)[None, :, None]
    grid[..., 2] = np.array(heads)[None, None, :]
    if mode == "layer_pos":
        return grid[:, :, 0]
    if mode == "layer_head":
        return grid[:, 0]
    if mode == "head_pos":
        return grid[0].transpose(1, 0, 2)
    return grid.transpose(0, 2, 1, 3).reshape(-1, n_pos, 3)


def _shown_values(result: PatchingResult, metric: str | None, normalize: bool, pair: int | None):
    values = result.values(metric, normalize, per_pair=pair is not None)
    return values[pair] if pair is not None else values


def effect_reach(
    result: PatchingResult, metric: str | None = None, normalize: bool = True, pair: int | None = None
) -> float:
    """The largest |value - unpatched level| of the view (0 when nothing moved): half the span of its colours."""
    values = _shown_values(result, metric, normalize, pair).numpy()
    values = values[np.isfinite(values)]
    base = result.base_level(metric, normalize)
    return float(np.abs(values - base).max()) if values.size else 0.0


def _blank_nan(a: np.ndarray) -> np.ndarray:
    """`a` with NaN (cells not computed yet, in a partial sweep) as None: blank cells, and JSON the page accepts."""
    nan = np.isnan(a)
    if not nan.any():
        return a
    out = a.astype(object)
    out[nan] = None
    return out


@draws(PatchingResult)
def heatmap(
    result: PatchingResult,
    metric: str | None = None,
    normalize: bool = True,
    pair: int | None = None,
    height: int | None = None,
    reach: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Heatmap per site: layer x position (block sites), layer x head (per-head sites patched at all positions
    at once), head x position (one layer), or (layer, head) x position.

    metric: which stored metric (default the result's primary); normalize: (M - corrupt) / (clean - corrupt);
    pair: show one prompt pair (its values, and its tokens on the position axis) instead of the mean over pairs.
    reach: the colour scale spans the unpatched level +- reach (default: the largest effect shown), so a
    drill-down can share its main map's scale. Hover shows the exact value, the raw metric and the spread over
    pairs.
    """
    values = _shown_values(result, metric, normalize, pair)
    raw = _shown_values(result, metric, False, pair)
    spread = result.spread(metric, normalize) if pair is None else None
    base = result.base_level(metric, normalize)
    ylab, ys, xlab, xs, mode = _layout_axes(result, pair)
    grids = [_facet(values[i].numpy(), mode) for i in range(len(result.sites))]
    raws = [_facet(raw[i].numpy(), mode) for i in range(len(result.sites))]
    spreads = (
        [_facet(spread[i].numpy(), mode) for i in range(len(result.sites))] if spread is not None else None
    )
    largest = effect_reach(result, metric, normalize, pair)
    reach = reach if reach is not None and reach > 0 else (largest or 1.0)
    ids = _cell_ids(result, mode)
    n = len(result.sites)
    if n == 1:  # make_subplots costs as much as the rest of a one-site figure, and a redraw should be fast
        fig, cells = go.Figure(), [{}]
    else:
        # separate y axes with the same rows, not shared ones: plotly.js keeps the rows of earlier data on
        # matched category axes when a figure is updated in place (a drill-down at another layer then shows its row
        # half outside the plot)
        fig = make_subplots(
            rows=1,
            cols=n,
            horizontal_spacing=0.04,
            subplot_titles=[SITE_SHORT.get(s, s) for s in result.sites],
        )
        fig.update_annotations(font_size=12)
        cells = [{"row": 1, "col": i + 1} for i in range(n)]
    white(fig)
    vtitle = value_title(result, metric, normalize)
    for i, site in enumerate(result.sites):
        extra = np.stack([raws[i], spreads[i] if spreads else np.zeros_like(raws[i])], -1)
        custom = np.concatenate([ids, extra], -1)
        hover = (
            f"{site}<br>{ylab}: %{{y}}<br>{xlab}: %{{x}}<br>value: %{{z:.6g}}"
            + ("<br>raw: %{customdata[3]:.6g}" if normalize else "")
            + ("<br>std over pairs: %{customdata[4]:.3g}" if spreads else "")
            + "<extra></extra>"
        )
        fig.add_trace(
            go.Heatmap(
                z=_blank_nan(grids[i]),
                x=xs,
                y=ys,
                customdata=_blank_nan(custom),
                hovertemplate=hover,
                colorscale=COLORSCALE,
                zmid=base,
                zmin=base - reach,
                zmax=base + reach,
                coloraxis=None,
                showscale=i == n - 1,
                colorbar={"title": {"text": vtitle, "side": "right", "font": {"size": 11}}},
                name=site,
                xgap=1,
                ygap=1,
            ),
            **cells[i],
        )
        many = len(xs) > 16 or (xlab == "position" and n > 1)
        fig.update_xaxes(
            title_text=xlab,
            type="category",
            tickangle=(-90 if many else -45) if xlab == "position" else 0,
            tickfont_size=10 if many else 12,
            **cells[i],
        )
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_yaxes(title_text=ylab, **cells[0])
    if n > 1:
        fig.update_yaxes(showticklabels=False, col=None, row=None, selector=lambda axis: axis.anchor != "x")
    who = f"pair {pair}" if pair is not None else f"mean of {result.n_pairs} pair{'s' * (result.n_pairs > 1)}"
    method = "Attribution patching (estimate)" if result.method == "attribution" else "Activation patching"
    site_text = f" of {SITE_LABELS.get(result.sites[0], result.sites[0])}" if n == 1 else ""
    if title is None:
        # two lines: one line is wider than a default-width figure (700 px) and plotly clips it
        title = f"{method}{site_text}, {result.direction}:<br>{vtitle}; {who}"
    if reach != (largest or 1.0):  # a scale given by the caller: say how strong the colours here really are
        title += f"<br>largest effect here {largest:.3g}; colour scale ±{reach:.3g}"
    fig.update_layout(
        title={"text": title, "x": 0.01},
        # tall enough for the colour bar's title, which runs along the bar
        height=height or max(480, 22 * len(ys) + 180),
        # a multi-site grid's subplot titles sit at the top of the plots: room above them for the title
        margin={"l": 60, "r": 20, "t": 130 if n > 1 else 80, "b": 80},
    )
    return fig


@draws(AttributionComparison)
def comparison(comp: AttributionComparison, height: int = 420) -> go.Figure:
    """Scatter of attribution estimates (y) against exact patching (x), one point per cell, with y = x."""
    fig = go.Figure()
    sites = list(dict.fromkeys(comp.cell_sites))
    exact, approx = comp.exact.numpy(), comp.attribution.numpy()
    for site in sites:
        mask = np.array([s == site for s in comp.cell_sites])
        fig.add_trace(
            go.Scatter(
                x=exact[mask],
                y=approx[mask],
                mode="markers",
                name=site,
                text=[label for label, m in zip(comp.labels, mask) if m],
                hovertemplate="%{text}<br>exact: %{x:.6g}<br>attribution: %{y:.6g}<extra></extra>",
                marker={"size": 7, "opacity": 0.8},
            )
        )
    lo = float(min(exact.min(), approx.min()))
    hi = float(max(exact.max(), approx.max()))
    fig.add_trace(
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line={"dash": "dot", "color": "#888"})
    )
    unit = "normalised " if comp.normalize else ""
    white(fig).update_layout(
        title={
            "text": f"Attribution vs exact patching ({comp.direction}, {unit}{comp.metric}): Pearson "
            f"{comp.pearson:.3f}, Spearman {comp.spearman:.3f}, top-{comp.top_k} agreement "
            f"{comp.top_k_agreement:.0%}",
            "x": 0.01,
        },
        xaxis_title=f"exact ({unit}{comp.metric})",
        yaxis_title=f"attribution estimate ({unit}{comp.metric})",
        height=height,
    )
    return fig
