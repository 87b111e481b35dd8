"""Figures for SAEs and the synthetic-activation tests: curves with their markers, histograms and CDFs with KS,
a sample's latents beside its twin's, dataset statistics of real codes, stable-region paths, an SAE's evaluation,
latent dashboards and attributions. Pure functions of results; they never run a model.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.errors import InputError
from workbench.sae.attribution import LatentAttribution
from workbench.sae.dashboard import LatentContexts
from workbench.sae.evaluate import SAEEvaluation
from workbench.sae.stable import StableRegionsResult
from workbench.sae.sweep import LatentSweep
from workbench.sae.synthetic import SyntheticTestResult
from workbench.viz.registry import draws

PALETTE = qualitative.Plotly + qualitative.D3
_HEADER_PX, _ROW_PX = 28, 30  # summary tables: pixels of the header and of each row
FAMILY_COLOURS = {
    "real": "#1f77b4",
    "random": "#d62728",
    "synthetic_baseline": "#ff7f0e",
    "synthetic_structured": "#2ca02c",
    "single_latent": "#9467bd",
    "sae_reconstruction": "#8c564b",
    "real_own": "#17becf",
}


def colour(family: str, i: int = 0) -> str:
    return FAMILY_COLOURS.get(family, PALETTE[i % len(PALETTE)])


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


# -- the two tests --------------------------------------------------------------------------------------------


def _metric_title(result, metric: str) -> str:
    if metric == "l2":
        return f"L2 distance at {result.read_label} from step 0"
    return "KL(step 0 ‖ step k), nats"


def _step_title(result) -> str:
    if result.test == "blowup":
        return f"step k (x = (1 - k/{result.n_steps - 1}) A + k/{result.n_steps - 1} T)"
    return f"step k (x = X + k h u, h = {result.step_size:.3g} L2 units)"


@draws(SyntheticTestResult)
def curves(
    result,
    metric: str = "l2",
    max_per_family: int = 20,
    families: list[str] | None = None,
    threshold: float | None = None,
) -> go.Figure:
    """Example curves per family (up to `max_per_family`), each with a marker at its statistic (max-slope step
    or plateau length) and, in test 2, the threshold line. Traces carry meta {"role": "curve", "family",
    "sample"} for click handlers."""
    fams = families or list(result.families)
    data = result.curves(metric)
    stat = result.statistic(metric, threshold)
    fig = go.Figure()
    steps = result.steps.numpy()
    for fam in fams:
        if fam not in result.families:
            raise InputError(f"{fam!r} is not among the result's families {result.families}.")
        f = result.families.index(fam)
        col = colour(fam, f)
        n = min(max_per_family, data.shape[1])
        for s in range(n):
            y = data[f, s].numpy()
            k = int(stat[f, s])
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=y,
                    mode="lines",
                    line=dict(color=_rgba(col, 0.55), width=1.2),
                    name=result.label(fam),
                    legendgroup=fam,
                    showlegend=s == 0,
                    customdata=np.full((len(steps), 2), [f, s]),
                    hovertemplate=f"{result.label(fam)}, sample {s}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
                    meta={"role": "curve", "family": fam, "sample": s},
                )
            )
            if k < len(steps):
                fig.add_trace(
                    go.Scatter(
                        x=[steps[k]],
                        y=[y[k]],
                        mode="markers",
                        marker=dict(color=col, size=7, symbol="x" if result.test == "blowup" else "circle"),
                        legendgroup=fam,
                        showlegend=False,
                        hovertemplate=f"{result.statistic_name}: {k}<extra>{result.label(fam)} {s}</extra>",
                        meta={"role": "marker", "family": fam, "sample": s},
                    )
                )
    if result.test == "plateau":
        tau = result.threshold if threshold is None else threshold
        if metric == "l2":
            frac = tau / result.typical_distance
            text = f"threshold {tau:.3g} = {frac:.2f} × typical distance ({result.typical_distance:.3g})"
        else:
            text = f"threshold {tau:.3g} nats"
        # a trace, not a shape: panels redraw FigureWidgets, which keep traces reliably
        fig.add_trace(
            go.Scatter(x=[steps[0], steps[-1]], y=[tau, tau], mode="lines", name=text,
                       line=dict(color="#444", dash="dash", width=1), hoverinfo="name",
                       meta={"role": "threshold", "value": tau})
        )  # fmt: skip
    kind = "x: max-slope step" if result.test == "blowup" else "o: plateau length"
    fig.update_layout(
        title=f"{'Test 1 (blow-up toward a target)' if result.test == 'blowup' else 'Test 2 (plateau toward a random target)'}"
        f" — {kind}; click a curve",
        xaxis_title=_step_title(result),
        yaxis_title=_metric_title(result, metric),
        template="plotly_white",
        height=440,
        legend=dict(orientation="h", y=-0.2),
    )
    return fig


def histograms(result, metric: str = "l2", cdf: bool = False, threshold: float | None = None) -> go.Figure:
    """The statistic's distribution per family (shared bins, or CDFs), and a table of mean, std, median and the
    KS statistic against the real family."""
    stat = result.statistic(metric, threshold).double()
    table = result.summary(metric, threshold)
    # the table's share of the height fits every family's row (a fixed share scrolled rows out of view)
    chart_px, table_px = 340, _HEADER_PX + _ROW_PX * len(table) + 8
    fig = make_subplots(
        rows=2,
        cols=1,
        row_heights=[chart_px, table_px],
        vertical_spacing=70 / (chart_px + table_px),
        specs=[[{"type": "xy"}], [{"type": "table"}]],
    )
    lo, hi = float(stat.min()), float(stat.max())
    size = max(1.0, np.ceil((hi - lo + 1) / 30))
    for f, fam in enumerate(result.families):
        v = stat[f].numpy()
        row = table.iloc[f]
        ks = "" if fam == "real" or np.isnan(row.ks_vs_real) else f", KS {row.ks_vs_real:.2f}"
        name = f"{result.label(fam)} ({row['mean']:.1f} ± {row['std']:.1f}{ks})"
        if cdf:
            xs = np.sort(v)
            fig.add_trace(
                go.Scatter(x=xs, y=np.arange(1, len(xs) + 1) / len(xs), mode="lines", name=name,
                           line=dict(color=colour(fam, f), shape="hv"), meta={"role": "cdf", "family": fam}),
                row=1, col=1,
            )  # fmt: skip
        else:
            fig.add_trace(
                go.Histogram(x=v, name=name, marker_color=colour(fam, f), opacity=0.55,
                             xbins=dict(start=lo - 0.5, end=hi + 0.5, size=size),
                             meta={"role": "hist", "family": fam}),
                row=1, col=1,
            )  # fmt: skip
    cells = [
        [result.label(f) for f in table.family],
        [f"{v:.2f}" for v in table["mean"]],
        [f"{v:.2f}" for v in table["std"]],
        [f"{v:.1f}" for v in table["median"]],
        ["—" if np.isnan(v) else f"{v:.3f}" for v in table.ks_vs_real],
        ["—" if np.isnan(v) else f"{v:.2g}" for v in table.ks_p],
        ["—" if np.isnan(v) else f"{v:.2f}" for v in table.reencoding],
    ]
    fig.add_trace(
        go.Table(
            header=dict(
                values=["family", "mean", "std", "median", "KS vs real", "KS p", "re-encoding"], height=_HEADER_PX
            ),
            cells=dict(values=cells, height=_ROW_PX),
            columnwidth=[2.6, 1, 1, 1, 1.3, 1, 1.4],  # family names on one line
        ),
        row=2, col=1,
    )  # fmt: skip
    fig.update_layout(
        barmode="overlay",
        title=f"{result.statistic_name} per family ({'CDF' if cdf else 'histogram'}, {metric})",
        template="plotly_white",
        height=chart_px + table_px + 70 + 140,  # plus the spacing and the margins
        margin=dict(t=110, b=30),
        legend=dict(orientation="h", y=1.08),
    )
    fig.update_xaxes(title_text=result.statistic_name, row=1, col=1)
    fig.update_yaxes(title_text="fraction ≤ x" if cdf else "samples", row=1, col=1)
    return fig


def _latent_rows(latents: torch.Tensor, values: torch.Tensor, cos: torch.Tensor, freq: torch.Tensor):
    on = latents >= 0
    idx = latents[on].long()
    return idx.numpy(), values[on].numpy(), cos[on].numpy(), freq[idx].clamp(min=1e-7).numpy()


def sample_latents(result, family: str, sample: int) -> go.Figure:
    """The real code behind a sample (top row) beside its twin of `family` (bottom row): activation, firing
    frequency (log scale) and decoder cosine to the top latent of each active latent, largest first."""
    if family not in result.families:
        raise InputError(f"{family!r} is not among the result's families {result.families}.")
    if not 0 <= sample < result.l2.shape[1]:
        raise InputError(f"sample must be in 0..{result.l2.shape[1] - 1}.")
    f = result.families.index(family)
    fig = make_subplots(
        rows=2, cols=3, shared_xaxes=False, vertical_spacing=0.2, horizontal_spacing=0.07,
        subplot_titles=["activation", "firing frequency (log)", "cosine to the top latent", "", "", ""],
    )  # fmt: skip
    sides = [
        ("real code", result.source_latents[sample], result.source_values[sample], result.source_cos_to_top[sample]),
        (f"{result.label(family)} twin", result.twin_latents[f, sample], result.twin_values[f, sample],
         result.twin_cos_to_top[f, sample]),
    ]  # fmt: skip
    for row, (label, lat, val, cos) in enumerate(sides, start=1):
        idx, v, c, fr = _latent_rows(lat, val, cos, result.latent_frequency)
        names = [str(i) for i in idx]
        col = "#1f77b4" if row == 1 else colour(family, f)
        for col_i, y in enumerate((v, fr, c), start=1):
            fig.add_trace(
                go.Bar(x=names, y=y, marker_color=col, name=label, showlegend=col_i == 1,
                       hovertemplate="latent %{x}: %{y:.4g}<extra>" + label + "</extra>",
                       meta={"role": "latents", "side": label}),
                row=row, col=col_i,
            )  # fmt: skip
        fig.update_yaxes(type="log", row=row, col=2)
        fig.update_xaxes(type="category", title_text=f"{label}: latents (L0 {len(idx)})", row=row, col=1)
    prompt = result.prompts[result.sample_prompt[sample]]
    start, target = float(result.start_norm[f, sample]), float(result.target_norm[f, sample])
    what = "target" if result.test == "blowup" else "start"
    norm = target if result.test == "blowup" else start
    fig.update_layout(
        title=(
            f"Sample {sample}: {prompt[-60:]!r}<br><sub>{result.label(family)} {what} norm {norm:.3g}; real "
            f"activations' median norm {result.real_norm:.3g}, N(mean, cov) median norm {result.mvn_norm:.3g}</sub>"
        ),
        template="plotly_white",
        height=560,
        barmode="group",
    )
    return fig


def dataset(result) -> go.Figure:
    """Statistics of the real codes behind the samples (the authors' ad-hoc plots): L0, activation share by rank,
    decoder cosine of active latents to the top latent, firing frequency against activation share."""
    lat, val, cos = result.source_latents, result.source_values, result.source_cos_to_top
    on = lat >= 0
    l0 = on.sum(-1).numpy()
    share = val / val.sum(-1, keepdim=True).clamp(min=1e-12)
    ranks = min(10, share.shape[1])
    fig = make_subplots(
        rows=2, cols=2, vertical_spacing=0.16, horizontal_spacing=0.1,
        subplot_titles=["active latents (L0)", "share of the summed activation by rank",
                        "cosine of other active latents to the top latent", "firing frequency vs share"],
    )  # fmt: skip
    fig.add_trace(go.Histogram(x=l0, marker_color="#1f77b4", name="L0", showlegend=False), row=1, col=1)
    for r in range(ranks):
        s = share[:, r][on[:, r]].numpy()
        fig.add_trace(go.Box(y=s, name=str(r + 1), marker_color="#1f77b4", showlegend=False), row=1, col=2)
    others = cos[:, 1:][on[:, 1:]].numpy()
    fig.add_trace(
        go.Histogram(x=others, xbins=dict(start=-1, end=1, size=0.05), marker_color="#2ca02c", showlegend=False),
        row=2, col=1,
    )  # fmt: skip
    freq = result.latent_frequency[lat.clamp(min=0).long()][on].clamp(min=1e-7).numpy()
    fig.add_trace(
        go.Scattergl(x=freq, y=share[on].numpy(), mode="markers", marker=dict(size=4, color="#9467bd", opacity=0.5),
                     showlegend=False),
        row=2, col=2,
    )  # fmt: skip
    fig.update_xaxes(title_text="rank", row=1, col=2)
    fig.update_xaxes(type="log", title_text="firing frequency", row=2, col=2)
    fig.update_yaxes(title_text="share", row=2, col=2)
    fig.update_layout(
        title=f"Real codes of {len(l0)} samples: L0 {l0.mean():.1f} ± {l0.std():.1f}; top latent's share "
        f"{float(share[:, 0].median()):.2f} (median)",
        template="plotly_white",
        height=620,
    )
    return fig


# -- stable regions -------------------------------------------------------------------------------------------


@draws(StableRegionsResult)
def stable_regions(result, max_pairs: int = 30) -> go.Figure:
    """Normalised distance d(a)/d(1) along the paths of each model (thin lines, median bold) and the sharpness
    distribution per model."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=["d(α) / d(1)", "sharpness = max d'(α) / d(1)"])  # fmt: skip
    a = result.alphas.numpy()
    for m, label in enumerate(result.models):
        col = PALETTE[m % len(PALETTE)]
        d = result.distance[m]
        for p in range(min(max_pairs, d.shape[0])):
            fig.add_trace(
                go.Scatter(x=a, y=d[p].numpy(), mode="lines", line=dict(color=_rgba(col, 0.25), width=1),
                           legendgroup=label, showlegend=False, hoverinfo="skip",
                           meta={"role": "pair", "model": label, "pair": p}),
                row=1, col=1,
            )  # fmt: skip
        fig.add_trace(
            go.Scatter(x=a, y=d.nanmedian(0).values.numpy(), mode="lines", line=dict(color=col, width=3),
                       name=f"{label} (median sharpness {float(result.sharpness[m].nanmedian()):.2f})",
                       legendgroup=label, meta={"role": "median", "model": label}),
            row=1, col=1,
        )  # fmt: skip
        s = result.sharpness[m]
        fig.add_trace(
            go.Histogram(x=s[~s.isnan()].numpy(), marker_color=col, opacity=0.6, name=label, showlegend=False,
                         meta={"role": "sharpness", "model": label}),
            row=1, col=2,
        )  # fmt: skip
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#999", dash="dot"),
                             name="straight line (sharpness 1)"), row=1, col=1)  # fmt: skip
    fig.update_xaxes(title_text="α (0: prompt A's activation, 1: prompt B's)", row=1, col=1)
    fig.update_xaxes(title_text="sharpness", row=1, col=2)
    fig.update_layout(
        barmode="overlay",
        title=f"Stable regions: {result.site} {result.layer} -> {result.read_label}, {result.distance.shape[1]} pairs",
        template="plotly_white",
        height=430,
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


# -- SAEs -----------------------------------------------------------------------------------------------------


@draws(SAEEvaluation)
def evaluation(result) -> go.Figure:
    """Firing frequencies of the latents (log10; dead latents counted apart) and L0 per token and by position."""
    f = result.firing_frequency
    live = f[f > 0]
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=[f"log10 firing frequency ({result.dead} dead)", "L0 per token",
                                        "mean L0 by position"])  # fmt: skip
    fig.add_trace(go.Histogram(x=torch.log10(live).numpy(), nbinsx=40, marker_color="#1f77b4", showlegend=False),
                  row=1, col=1)  # fmt: skip
    fig.add_vline(
        x=float(np.log10(result.dense_threshold)), line=dict(dash="dash", color="#c62828"), row=1, col=1
    )
    fig.add_trace(
        go.Histogram(x=result.l0_per_token.numpy(), marker_color="#2ca02c", showlegend=False), row=1, col=2
    )
    pos = result.l0_by_position
    fig.add_trace(
        go.Scatter(x=np.arange(len(pos)), y=pos.numpy(), mode="lines", showlegend=False), row=1, col=3
    )
    fig.update_layout(
        title=f"{result.sae}: L0 {result.l0:.1f}, explained variance {result.explained_variance:.3f}, "
        f"{100 * result.frac_recovered:.1f}% of loss recovered",
        template="plotly_white",
        height=360,
    )
    return fig


@draws(LatentContexts)
def contexts(result, latent: int | None = None) -> go.Figure:
    """The top contexts of one latent as a token grid coloured by the latent's activation."""
    latent = int(result.latents[0]) if latent is None else latent
    i = result.index_of(latent)
    ids, vals = result.context_ids[i], result.context_acts[i]
    used = result.row[i] >= 0
    ids, vals = ids[used], vals[used]
    text = [[result.token_strings.get(int(t), "") if t >= 0 else "" for t in row] for row in ids.tolist()]
    fig = go.Figure(
        go.Heatmap(
            z=vals.numpy(),
            text=text,
            texttemplate="%{text}",
            colorscale="Oranges",
            zmin=0,
            hovertemplate="%{text}: %{z:.3g}<extra></extra>",
            meta={"role": "contexts", "latent": latent},
        )
    )
    fig.update_yaxes(autorange="reversed", tickvals=list(range(len(text))),
                     ticktext=[f"{float(v):.2f}" for v in result.values[i][used]], title="top activation")  # fmt: skip
    fig.update_xaxes(tickvals=[result.center], ticktext=["firing token"])
    fig.update_layout(
        title=f"Latent {latent}: fires on {100 * float(result.frequency[i]):.2f}% of {result.n_tokens} tokens, "
        f"mean {float(result.mean_active[i]):.3g} when active",
        template="plotly_white",
        height=max(260, 34 * len(text) + 120),
    )
    return fig


@draws(LatentAttribution)
def attribution(result, top: int = 12, prompt: int | None = None) -> go.Figure:
    """Latent x position attribution of the `top` latents by total |attribution| (summed over prompts, or one)."""
    table = result.by_latent()
    latents = [int(v) for v in table.latent[:top]]
    if not latents:
        raise InputError("No active latents to show.")
    grid = result.grid(latents, prompt)
    row = 0 if prompt is None else prompt
    labels = [
        f"{q}: {result.token_strings.get(int(t), str(int(t)))!r}"
        for q, t in enumerate(result.tokens[row].tolist())
    ]
    bound = float(grid.abs().max()) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=grid.numpy(),
            x=labels,
            y=[f"latent {i}" for i in latents],
            colorscale="RdBu",
            zmid=0,
            zmin=-bound,
            zmax=bound,
            hovertemplate="%{y} at %{x}: %{z:.4g}<extra></extra>",
            meta={"role": "attribution"},
        )
    )
    fig.update_yaxes(autorange="reversed")
    scope = "summed over prompts" if prompt is None else f"prompt {prompt}"
    fig.update_layout(
        title=f"Latent attribution to {result.metric} ({scope}); error term total "
        f"{float(result.error_attribution.sum() if prompt is None else result.error_attribution[prompt].sum()):.3g}",
        template="plotly_white",
        height=max(300, 26 * len(latents) + 160),
    )
    return fig


@draws(LatentSweep)
def latent_sweep(result, prompt: int | None = None) -> go.Figure:
    """Latent x position heatmap of the metric's change when each latent is edited at each position."""
    grid = result.grid(prompt)
    row = 0 if prompt is None else prompt
    labels = [
        f"{q}: {result.token_strings.get(int(t), str(int(t)))!r}"
        for q, t in enumerate(result.tokens[row].tolist())
    ]
    finite = grid[torch.isfinite(grid)]
    bound = float(finite.abs().max()) if finite.numel() and float(finite.abs().max()) > 0 else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=grid.numpy(),
            x=labels,
            y=[f"latent {int(i)}" for i in result.latents],
            colorscale="RdBu",
            zmid=0,
            zmin=-bound,
            zmax=bound,
            colorbar={"title": {"text": f"change of {result.metric}"}},
            hovertemplate="%{y} at %{x}: %{z:.4g}<extra></extra>",
            meta={"role": "latent-sweep"},
        )
    )
    fig.update_yaxes(autorange="reversed")
    what = {"ablate": "ablated", "steer": f"steered by {result.scale:g}", "patch": "patched from the source"}[
        result.mode
    ]
    scope = f"mean of {result.values.shape[0]} prompts" if prompt is None else f"prompt {prompt}"
    fig.update_layout(
        title=f"Each latent {what} at one position: change of {result.metric} ({scope})",
        xaxis_title="position",
        template="plotly_white",
        height=max(300, 26 * len(result.latents) + 160),
    )
    return fig
