"""Figures for plateau probes: response curves, plateau-length histograms, tokens along a curve,
interpolation paths and 2-D slices. Pure functions of results; they never run a model.

Every x axis that shows perturbation sizes states its unit (the median norm of real activations at the site,
unless the probe was given another scale).
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.plateau import InterpolationResult, PlateauResult, SliceResult
from workbench.viz.common import white
from workbench.viz.registry import draws

PALETTE = qualitative.Plotly + qualitative.D3
METRIC_TITLES = {"kl": "KL(unperturbed ‖ perturbed), nats", "l2": "L2 distance at {read}"}


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _metric_title(result, metric: str) -> str:
    return METRIC_TITLES[metric].format(read=result.read_label)


def _size_title(result) -> str:
    return f"perturbation size (× {result.scale_label})"


def group_colours(groups: list[str]) -> dict[str, str]:
    return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}


@draws(PlateauResult)
def curves(
    result,
    metric: str = "kl",
    threshold: float | None = None,
    log_y: bool = False,
    max_lines: int = 24,
    groups: list[str] | None = None,
) -> go.Figure:
    """Output change against size: median and interquartile band per group, plus up to `max_lines` thin
    curves per group (each point's customdata is [base, direction], for click-through).
    """
    values = result.curves(metric).numpy()
    sizes = result.sizes.numpy()
    all_groups = result.groups()
    groups = all_groups if groups is None else [g for g in groups if g in all_groups]
    colours = group_colours(all_groups)
    threshold = result.default_threshold(metric) if threshold is None else threshold
    fig = go.Figure()
    n_b, n_d = values.shape[:2]
    for g in groups:
        cells = [(b, d) for b in range(n_b) for d in range(n_d) if result.group_of(b, d) == g]
        stack = np.stack([values[b, d] for b, d in cells])
        colour = colours[g]
        shown = cells[:: max(1, math.ceil(len(cells) / max_lines))] if max_lines > 0 else []
        if shown:
            # one trace, curves separated by NaN gaps; numpy arrays, as lists plotly validates point by point
            n = len(sizes) + 1
            xs = np.tile(np.append(sizes, np.nan), len(shown))
            ys = np.concatenate([np.append(values[b, d], np.nan) for b, d in shown])
            cd = np.repeat(np.array(shown), n, axis=0)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    customdata=cd,
                    mode="lines",
                    line=dict(color=_rgba(colour, 0.25), width=1),
                    name=f"{g} (single curves)",
                    legendgroup=g,
                    showlegend=False,
                    meta={"role": "curves", "group": g},
                    hovertemplate="base %{customdata[0]}, direction %{customdata[1]} (click for its tokens)"
                    "<br>size %{x:.4g}<br>%{y:.4g}<extra>" + g + "</extra>",
                )
            )
        q25, med, q75 = np.quantile(stack, [0.25, 0.5, 0.75], axis=0)
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([sizes, sizes[::-1]]),
                y=np.concatenate([q75, q25[::-1]]),
                fill="toself",
                fillcolor=_rgba(colour, 0.18),
                line=dict(width=0),
                hoverinfo="skip",
                legendgroup=g,
                showlegend=False,
                name=f"{g} IQR",
                meta={"role": "band", "group": g},
            )
        )
        fig.add_trace(
            go.Scatter(
                x=sizes,
                y=med,
                mode="lines",
                line=dict(color=colour, width=3),
                name=f"{g} (median of {len(cells)})",
                legendgroup=g,
                meta={"role": "median", "group": g},
                hovertemplate="size %{x:.4g}<br>median %{y:.4g}<extra>" + g + "</extra>",
            )
        )
    fig.add_hline(
        y=threshold,
        line=dict(color="#888", dash="dash", width=1),
        annotation_text=f"threshold {threshold:.3g}",
        annotation_position="top left",
    )
    white(fig).update_layout(
        title=f"Response to perturbations at {result.site_label} (median and interquartile range per family)",
        xaxis_title=_size_title(result),
        yaxis_title=_metric_title(result, metric),
        yaxis_type="log" if log_y else "linear",
        legend=dict(title="direction family"),
        height=480,
    )
    return fig


def plateau_lengths(
    result, metric: str = "kl", threshold: float | None = None, baseline: str | None = None
) -> go.Figure:
    """Plateau lengths per group: histogram (top) and cumulative distribution (bottom). Curves that never crossed
    sit right of the sweep. Legend entries give the median and, against `baseline`, the Mann-Whitney p-value and
    P(longer), the probability that a curve of the group has a longer plateau than a baseline curve."""
    threshold = result.default_threshold(metric) if threshold is None else threshold
    lengths = result.plateau_length(metric, threshold)
    groups = result.groups()
    colours = group_colours(groups)
    if baseline is None or baseline not in groups:
        baseline = "cov_mixture" if "cov_mixture" in groups else groups[0]
    stats = result.compare(baseline, metric, threshold).set_index("group")
    smax = float(result.sizes[-1])
    beyond = smax * 1.06
    n_b, n_d = lengths.shape
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.55, 0.45], vertical_spacing=0.06)
    bins = dict(start=0.0, end=beyond + smax * 0.04, size=smax / 32)
    for g in groups:
        vals = torch.tensor(
            [float(lengths[b, d]) for b in range(n_b) for d in range(n_d) if result.group_of(b, d) == g]
        )
        vals = torch.where(torch.isinf(vals), torch.tensor(beyond), vals)
        row = stats.loc[g]
        label = f"{g}: median {row['median_length']:.3g}"
        if g != baseline and not math.isnan(row["mw_p"]):
            label += f", p={row['mw_p']:.2g}, P(longer)={row['p_greater']:.2f}"
        fig.add_trace(
            go.Histogram(
                x=vals.numpy(),
                name=label,
                legendgroup=g,
                marker_color=colours[g],
                opacity=0.55,
                xbins=bins,
                meta={"role": "lengths", "group": g},
                hovertemplate="length %{x:.3g}<br>%{y} curves<extra>" + g + "</extra>",
            ),
            row=1,
            col=1,
        )
        xs = vals.sort().values.numpy()
        fig.add_trace(
            go.Scatter(
                x=[0.0, *xs.tolist()],
                y=[0.0, *((np.arange(1, len(xs) + 1)) / len(xs)).tolist()],
                mode="lines",
                line=dict(color=colours[g], width=2, shape="hv"),
                legendgroup=g,
                showlegend=False,
                meta={"role": "cdf", "group": g},
                hovertemplate="length %{x:.3g}<br>fraction %{y:.2f}<extra>" + g + "</extra>",
            ),
            row=2,
            col=1,
        )
    fig.add_vline(x=smax, line=dict(color="#888", dash="dot", width=1))
    # one label, above the histogram and left of its line (right of it is the legend)
    fig.add_annotation(
        text="never crossed →",
        x=smax,
        y=1,
        xref="x",
        yref="y domain",
        xanchor="right",
        yanchor="bottom",
        showarrow=False,
        font=dict(size=11, color="#666"),
    )
    unit = "nats" if metric == "kl" else "L2"
    white(fig).update_layout(
        barmode="overlay",
        title=f"Plateau length: size where {metric.upper()} first exceeds {threshold:.3g} {unit} "
        f"(tests against {baseline})",
        # below the plots: its entries carry the test results and would squeeze the plots from the side
        legend=dict(title="family", orientation="h", x=0, y=-0.16, yanchor="top"),
        height=640,
        margin=dict(b=150),
    )
    fig.update_xaxes(range=[0, beyond + smax * 0.04])
    fig.update_xaxes(title_text=f"plateau length (× {result.scale_label})", row=2, col=1)
    fig.update_yaxes(title_text="curves", row=1, col=1)
    fig.update_yaxes(title_text="fraction ≤ length", range=[0, 1.02], row=2, col=1)
    return fig


# token labels are placed for a plot area about this wide (a notebook figure's default), in pixels per character
RIBBON_PX, CHAR_PX = 500, 7.0


def ribbon_labels(tokens: list[list[str]]) -> list[list[str]]:
    """Cell labels for rows of tokens: each run of one token is labelled once, as near the middle of the run as
    the label has room (it would otherwise run into its neighbours or out of the plot); hover shows every cell."""
    out = []
    for row in tokens:
        n = len(row)
        cell = RIBBON_PX / max(n, 1)
        labels, right = [""] * n, -0.5
        start = 0
        while start < n:
            end = start
            while end + 1 < n and row[end + 1] == row[start]:
                end += 1
            text = _short(row[start])
            half = len(text) * CHAR_PX / cell / 2
            for c in sorted(range(start, end + 1), key=lambda c: abs(c - (start + end) / 2)):
                if c - half >= right and c + half <= n - 0.5:
                    labels[c], right = text, c + half + 0.2
                    break
            start = end + 1
        out.append(labels)
    return out


def token_ribbon(x, ids, probs, token_strings: dict[int, str], x_title: str, title: str) -> go.Figure:
    """Top-k tokens along a path: x [step], ids/probs [step, k]. Cell colour = probability; each run of one
    token is labelled once where there is room (see `ribbon_labels`); hover shows every cell's token."""
    ids, probs = torch.as_tensor(ids), torch.as_tensor(probs)
    n_steps, k = ids.shape
    tokens = [
        [token_strings.get(int(ids[j, r]), str(int(ids[j, r]))) for j in range(n_steps)] for r in range(k)
    ]
    z = probs.T.numpy()
    fig = go.Figure(
        go.Heatmap(
            x=[float(v) for v in x],
            y=[f"#{r + 1}" for r in range(k)],
            z=z,
            text=ribbon_labels(tokens),
            customdata=tokens,
            texttemplate="%{text}",
            textfont=dict(size=11),
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar=dict(title="probability"),
            hovertemplate="%{x:.4g}<br>rank %{y}: '%{customdata}'<br>p = %{z:.3f}<extra></extra>",
            meta={"role": "tokens"},
        )
    )
    white(fig).update_layout(
        title=title,
        xaxis=dict(title=x_title, nticks=12),
        yaxis=dict(title="rank", autorange="reversed"),
        height=300,
    )
    return fig


def _short(token: str, n: int = 10) -> str:
    token = token.replace("\n", "⏎")
    return token if len(token) <= n else token[: n - 1] + "…"


def direction_label(result, direction: int) -> str:
    """'toward_real direction 5 of 16': the number within its family (the result numbers directions across
    families)."""
    family = result.families[direction]
    same = [i for i, f in enumerate(result.families) if f == family]
    return f"{family} direction {same.index(direction) + 1} of {len(same)}"


def tokens_along(result, base: int = 0, direction: int = 0, k: int = 3) -> go.Figure:
    """The top-k next tokens along one curve of a `PlateauResult` (size 0: unperturbed)."""
    n_b, n_d = result.kl.shape[:2]
    if not (0 <= base < n_b and 0 <= direction < n_d):
        raise InputError(
            f"No curve (base {base}, direction {direction}): there are {n_b} bases, {n_d} directions."
        )
    sizes = result.sizes
    ids, probs = (
        result.top_ids[base, direction, :, :k].clone(),
        result.top_probs[base, direction, :, :k].clone(),
    )
    zero = sizes == 0
    ids[zero], probs[zero] = result.ref_top_ids[base, :k], result.ref_top_probs[base, :k]
    title = f"Predictions along {direction_label(result, direction)}, {result.base_label(base)}"
    return token_ribbon(sizes, ids, probs, result.token_strings, _size_title(result), title)


@draws(InterpolationResult)
def interpolation(result, pair: int = 0, max_pairs: int = 40, k: int = 3) -> go.Figure:
    """Normalised read-site distance d(alpha)/d(1) for every pair (median in black), above the top-k
    tokens along the path of `pair`."""
    n_p = result.distance.shape[0]
    if not 0 <= pair < n_p:
        raise InputError(f"No pair {pair}: there are {n_p}.")
    alphas = result.alphas.numpy()
    fig = make_subplots(
        rows=2,
        cols=1,
        row_heights=[0.62, 0.38],
        vertical_spacing=0.2,
        subplot_titles=(
            f"Normalised distance at {result.read_label}",
            f"Top tokens along pair {pair} (hover for the prompts)",
        ),
    )
    for i in range(min(n_p, max_pairs)):
        fig.add_trace(
            go.Scatter(
                x=alphas,
                y=result.distance[i].numpy(),
                customdata=[[i, float(result.kl[i, j])] for j in range(len(alphas))],
                mode="lines",
                line=dict(
                    color=PALETTE[0] if i == pair else "rgba(99,110,250,0.3)", width=3 if i == pair else 1
                ),
                name=f"pair {i}",
                showlegend=n_p <= 8,
                meta={"role": "pair", "pair": i},
                hovertemplate="pair %{customdata[0]}<br>α %{x:.3g}<br>d/d(1) %{y:.3g}<br>KL %{customdata[1]:.3g}"
                "<extra></extra>",
            ),
            row=1,
            col=1,
        )
    if n_p > 1:
        fig.add_trace(
            go.Scatter(
                x=alphas,
                y=result.distance.median(0).values.numpy(),
                mode="lines",
                line=dict(color="black", width=3),
                name="median",
                meta={"role": "median"},
            ),
            row=1,
            col=1,
        )
    ribbon = token_ribbon(
        result.alphas,
        result.top_ids[pair, :, :k],
        result.top_probs[pair, :, :k],
        result.token_strings,
        "α",
        "",
    )
    ribbon.data[0].colorbar = dict(title="p", len=0.35, y=0.17)
    pair_text = f"{result.prompts_a[pair]!r} → {result.prompts_b[pair]!r}".replace("{", "(").replace("}", ")")
    ribbon.data[0].hovertemplate = (
        "α %{x:.3g}<br>rank %{y}: '%{customdata}'<br>p = %{z:.3f}<extra>" + pair_text + "</extra>"
    )
    fig.add_trace(ribbon.data[0], row=2, col=1)
    fig.update_yaxes(title_text="d(α) / d(1)", row=1, col=1)
    fig.update_xaxes(title_text="α (0: A's activation, 1: B's)", row=1, col=1)
    fig.update_xaxes(title_text="α", row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    white(fig).update_layout(
        title=f"Interpolation: prompt A's activation → prompt B's at {result.site_label}",
        height=620,
        showlegend=n_p <= 8,
    )
    return fig


@draws(SliceResult)
def slice_map(result) -> go.Figure:
    """The plane through A, B and C coloured red/green/blue by closeness of each point's output to the output at
    A, B or C (distance normalised by the mean distance between the endpoints' outputs); hover: top token."""
    scale = result.endpoint_distance[torch.triu_indices(3, 3, 1).unbind()].mean().clamp(min=1e-12)
    close = (1 - (result.distance / scale).clamp(0, 1)).permute(1, 2, 0)  # [v, u, rgb]
    u, v = result.u.numpy(), result.v.numpy()
    du, dv = float(u[1] - u[0]), float(v[1] - v[0])
    fig = go.Figure(
        go.Image(
            z=(close * 255).round().to(torch.uint8).numpy(),
            x0=float(u[0]),
            dx=du,
            y0=float(v[0]),
            dy=dv,
            hoverinfo="skip",
            meta={"role": "slice"},
        )
    )
    text = [[result.token_strings.get(int(t), str(int(t))) for t in row] for row in result.top1]
    fig.add_trace(
        go.Heatmap(
            x=u,
            y=v,
            z=result.kl_to_a.numpy(),
            text=text,
            customdata=result.top1_prob.numpy(),
            opacity=0,
            showscale=False,
            hovertemplate="u %{x:.3g}, v %{y:.3g}<br>top token '%{text}' (p %{customdata:.2f})<br>"
            "KL to A %{z:.3g}<extra></extra>",
            meta={"role": "hover"},
        )
    )
    labels = ["A", "B", "C"]
    fig.add_trace(
        go.Scatter(
            x=[0, 1, 0],
            y=[0, 0, 1],
            mode="markers+text",
            text=labels,
            textposition="top right",
            marker=dict(color="white", size=10, line=dict(color="black", width=2)),
            hovertext=[f"{lab}: {p!r}" for lab, p in zip(labels, result.prompts)],
            hoverinfo="text",
            showlegend=False,
            meta={"role": "endpoints"},
        )
    )
    white(fig).update_layout(
        title=f"Plane through three activations at {result.site_label}: colour = closeness of {result.read_label} "
        "to A (red), B (green), C (blue)",
        xaxis_title="u (A → B)",
        yaxis=dict(title="v (A → C)", autorange=True, scaleanchor="x"),
        height=520,
    )
    return fig
