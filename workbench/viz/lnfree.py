"""Figures for LayerNorm removal: the preview, norm-scale distributions, training curves, DLA exactness.

Pure functions from `workbench.lnfree` results to plotly figures; `plot(result, **kw)` picks the right one.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.lnfree.calibration import FrozenScales, NormStatistics
from workbench.lnfree.evaluation import DLAExactness, LossStats
from workbench.lnfree.finetune import TrainingHistory
from workbench.lnfree.preview import RemovalPreview
from workbench.lnfree.sites import KIND_LABELS, norm_module, site_label, split_site
from workbench.viz.common import log_ticks
from workbench.viz.registry import draws

KIND_COLOURS = {"mlp": "#1f77b4", "qk": "#ff7f0e", "v": "#2ca02c", "final": "#7f3fbf"}
FIRST_COLOUR, EOT_COLOUR = "#d62728", "#111111"


# ---------------------------------------------------------------------------------------------------------------
# preview


def _single_bars(fig, result, selected: set[str], row: int, col: int) -> None:
    delta = result.single_delta.tolist()
    by_kind: dict[str, list[tuple[str, float]]] = {}
    for site, d in zip(result.sites, delta):
        by_kind.setdefault(split_site(site)[0], []).append((site, d))
    for kind, items in by_kind.items():
        x = ["final" if kind == "final" else split_site(s)[1] for s, _ in items]
        fig.add_trace(
            go.Bar(
                x=x,
                y=[d for _, d in items],
                name=KIND_LABELS[kind],
                legendgroup=kind,
                marker={
                    "color": KIND_COLOURS[kind],
                    "opacity": [1.0 if not selected or s in selected else 0.3 for s, _ in items],
                    "line": {"width": [2 if s in selected else 0 for s, _ in items], "color": "#000"},
                },
                customdata=[[site_label(s), result.scales[s], s in selected] for s, _ in items],
                hovertemplate="%{customdata[0]}<br>loss change %{y:+.4f} nats<br>frozen scale %{customdata[1]:.4g}"
                "<br>selected: %{customdata[2]}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    fig.update_xaxes(title_text="layer", type="category", row=row, col=col)
    fig.update_yaxes(title_text="loss change, one norm frozen (nats)", row=row, col=col)


def _cumulative(fig, result, k: int | None, row: int, col: int) -> None:
    if result.cumulative_loss is None:
        fig.add_annotation(
            text="cumulative curve not computed",
            showarrow=False,
            row=row,
            col=col,
            x=0.5,
            y=0.5,
            xref="x domain",
            yref="y domain",
        )
        return
    delta = result.cumulative_delta.tolist()
    steps = list(range(1, len(delta) + 1))
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=delta,
            mode="lines+markers",
            name="frozen cumulatively",
            line={"color": "#444"},
            marker={"color": [KIND_COLOURS[split_site(s)[0]] for s in result.order], "size": 7},
            customdata=[site_label(s) for s in result.order],
            hovertemplate="step %{x}: + %{customdata}<br>loss change %{y:+.4f} nats<extra></extra>",
            showlegend=False,
        ),
        row=row,
        col=col,
    )
    if k:
        k = min(k, len(delta))
        fig.add_trace(
            go.Scatter(
                x=[k],
                y=[delta[k - 1]],
                mode="markers",
                name=f"paper order up to step {k}",
                marker={"symbol": "star", "size": 15, "color": "#c00"},
                showlegend=False,
                hovertemplate=f"preset: first {k} sites<br>loss change %{{y:+.4f}} nats<extra></extra>",
            ),
            row=row,
            col=col,
        )
    fig.update_xaxes(title_text="sites frozen (removal order)", row=row, col=col)
    fig.update_yaxes(title_text="loss change (nats)", row=row, col=col)


def _distributions(
    fig, stats, scales, norms: list[str], row: int, col: int, max_points: int = 4000, highlight=frozenset()
) -> None:
    first = torch.zeros_like(stats.eot)
    first[:, 0] = True
    shown = []  # every value drawn, for the log axis' ticks
    for norm in norms:
        s = stats.norm_scales(norm)
        shown.append(s.flatten().float())
        body = s[~first & ~stats.eot]
        if body.numel() > max_points:  # a box needs the quantiles only; keep the figure light
            body = body[torch.linspace(0, body.numel() - 1, max_points).long()]
        fig.add_trace(
            go.Box(
                y=body.numpy(),  # an array: plotly checks a list point by point
                name=norm,
                marker_color="#1f3b73" if norm in highlight else "#9aa9bd",
                boxpoints=False,
                showlegend=False,
                hovertemplate=f"{norm}<br>per-token scale %{{y:.4g}}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    for mask, label, colour, symbol in (
        (first, "position 0", FIRST_COLOUR, "diamond"),
        (stats.eot & ~first, "end-of-text", EOT_COLOUR, "x"),
    ):
        xs, ys = [], [torch.empty(0)]
        for norm in norms:
            vals = stats.norm_scales(norm)[mask]
            xs += [norm] * len(vals)
            ys.append(vals.float())
        ys = torch.cat(ys).numpy()
        if len(ys):
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="markers",
                    name=label,
                    marker={"color": colour, "symbol": symbol, "size": 7},
                    hovertemplate=f"{label}<br>%{{x}}: scale %{{y:.4g}}<extra></extra>",
                ),
                row=row,
                col=col,
            )
    if scales is not None:
        values = {norm_module(s): scales[s] for s in scales.sites}
        fig.add_trace(
            go.Scatter(
                x=norms,
                y=[values[n] for n in norms],
                mode="markers",
                name="frozen scale",
                marker={"symbol": "line-ew-open", "size": 26, "color": "#000", "line": {"width": 3}},
                hovertemplate="%{x}<br>frozen scale %{y:.4g}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    if scales is not None:
        shown.append(torch.tensor([float(scales[s]) for s in scales.sites]))
    values = torch.cat(shown) if shown else torch.empty(0)
    values = values[torch.isfinite(values) & (values > 0)]
    ticks = log_ticks(float(values.min()), float(values.max())) if values.numel() else {}
    fig.update_yaxes(type="log", title_text="per-token scale (log)", **ticks, row=row, col=col)
    fig.update_xaxes(title_text="norm module (input of)", type="category", row=row, col=col)


def _errors(fig, result, row: int, col: int) -> None:
    modules, seen = [], set()
    for site in result.sites:
        mod = norm_module(site)
        if mod not in seen:
            seen.add(mod)
            modules.append((mod, site))
    order = list(result.statistics.norms)  # the order of the scale distributions above
    modules.sort(key=lambda m: order.index(m[0]) if m[0] in order else len(order))
    all_err = [result.error_summary(site)["mean_error"] for _, site in modules]
    rest = [result.error_summary(site)["mean_error_excl_first"] for _, site in modules]
    first = [result.error_summary(site)["first_pos_error"] for _, site in modules]
    names = [m for m, _ in modules]
    for ys, label, colour in (
        (all_err, "all tokens", "#7a8ca3"),
        (rest, "positions > 0", "#b8c4d6"),
        (first, "position 0", FIRST_COLOUR),
    ):
        fig.add_trace(
            go.Bar(
                x=names,
                y=ys,
                name=label,
                marker_color=colour,
                legendgroup="err",
                hovertemplate=f"%{{x}}<br>{label}: mean |r - 1| = %{{y:.3f}}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    fig.update_yaxes(title_text="relative error of frozen scale |r-1|", row=row, col=col)
    fig.update_xaxes(type="category", row=row, col=col)


@draws(RemovalPreview)
def preview_figure(
    result,
    *,
    selected=None,
    k: int | None = None,
    norms: list[str] | None = None,
    frozen_loss: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Four panels: loss change from freezing each norm alone (per layer and kind, `selected` highlighted), the
    cumulative curve in the removal order (`k` marks the preset "paper order up to step k"), per-token scale
    distributions with position 0 and end-of-text marked (the norms of `selected` sites darker), and the mean
    per-token error of each frozen scale.

    `frozen_loss`, when given, is the measured loss with the `selected` sites frozen together (in the title)."""
    selected = set(selected or [])
    stats = result.statistics
    norms = norms or stats.norms
    fig = make_subplots(
        rows=3,
        cols=2,
        specs=[[{}, {}], [{"colspan": 2}, None], [{"colspan": 2}, None]],
        row_heights=[0.36, 0.38, 0.26],
        vertical_spacing=0.11,
        subplot_titles=(
            "freezing one norm (zero-shot)",
            "freezing in the removal order (cumulative)",
            "per-token scale each norm divides by",
            "per-token error of the frozen scale",
        ),
    )
    _single_bars(fig, result, selected, 1, 1)
    _cumulative(fig, result, k, 1, 2)
    _distributions(fig, stats, result.scales, norms, 2, 1, highlight={norm_module(s) for s in selected})
    _errors(fig, result, 3, 1)
    if title is None:
        title = f"{result.model}: zero-shot LayerNorm removal preview (base loss {result.base_loss:.4f} nats)"
        if frozen_loss is not None and selected:
            n = len(selected)
            title += (
                f"<br>{n} norm{'s' * (n != 1)} frozen{' together' * (n != 1)}: loss {frozen_loss:.4f} "
                f"({frozen_loss - result.base_loss:+.4f} nats)"
            )
    fig.update_layout(title=title, height=980, barmode="group", legend={"orientation": "h", "y": -0.06})
    return fig


# ---------------------------------------------------------------------------------------------------------------
# statistics, scales, history, DLA, loss


@draws(NormStatistics)
def statistics_figure(
    stats, *, norms: list[str] | None = None, scales=None, title: str | None = None
) -> go.Figure:
    """Per-token scale distributions per norm module (log axis), position 0 and end-of-text marked."""
    fig = make_subplots(rows=1, cols=1)
    _distributions(fig, stats, scales, norms or stats.norms, 1, 1)
    fig.update_layout(
        title=title or f"{stats.model}: the scale each norm divides every token by ({stats.kind})", height=460
    )
    return fig


@draws(FrozenScales)
def scales_figure(scales, *, title: str | None = None) -> go.Figure:
    """The frozen scale of every site, per layer and kind."""
    fig = go.Figure()
    for kind in ("mlp", "qk", "v", "final"):
        sites = [s for s in scales.sites if split_site(s)[0] == kind]
        fig.add_trace(
            go.Scatter(
                x=["final" if kind == "final" else split_site(s)[1] for s in sites],
                y=[scales[s] for s in sites],
                mode="lines+markers",
                name=KIND_LABELS[kind],
                marker_color=KIND_COLOURS[kind],
                hovertemplate="%{x}: %{y:.4g}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title or f"frozen scales ({scales.method})",
        xaxis={"title": "layer", "type": "category"},
        yaxis={"title": "frozen scale", "type": "log"},
    )
    return fig


@draws(TrainingHistory)
def history_figure(history, *, control=None, title: str | None = None) -> go.Figure:
    """Training loss (and validation loss) per optimizer step with the removal events marked; `control` (a
    second `TrainingHistory`) is overlaid in grey."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.72, 0.28], vertical_spacing=0.06)
    runs = [(history, "LN removal" if history.removed else "fine-tune", "#1f77b4")]
    if control is not None:
        runs.append((control, "control (with LN)", "#888"))
    for run, label, colour in runs:
        steps = (run.step + 1).tolist()
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=run.loss.tolist(),
                name=f"{label}: train loss",
                line={"color": colour, "width": 1},
                hovertemplate="step %{x}<br>train loss %{y:.4f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        if len(run.val_loss):
            fig.add_trace(
                go.Scatter(
                    x=run.val_step.tolist(),
                    y=run.val_loss.tolist(),
                    name=f"{label}: validation loss",
                    mode="lines+markers",
                    line={"color": colour, "dash": "dot"},
                    hovertemplate="after %{x} steps<br>validation loss %{y:.4f}<extra></extra>",
                ),
                row=1,
                col=1,
            )
    if history.removed:
        fig.add_trace(
            go.Scatter(
                x=(history.step + 1).tolist(),
                y=history.aux_loss.tolist(),
                name="aux loss (weighted)",
                line={"color": "#d62728", "width": 1},
                hovertemplate="step %{x}<br>aux %{y:.4g}<extra></extra>",
            ),
            row=2,
            col=1,
        )
        for kind in ("mlp", "qk", "v", "final"):
            steps = [step for step, site in history.events if split_site(site)[0] == kind]
            if steps:
                fig.add_vrect(
                    x0=min(steps) + 0.5,
                    x1=max(steps) + 1.5,
                    fillcolor=KIND_COLOURS[kind],
                    opacity=0.12,
                    line_width=0,
                    annotation_text=f"{KIND_LABELS[kind]} removed",
                    annotation_position="top left",
                    row=1,
                    col=1,
                )
    fig.update_xaxes(title_text="optimizer step", row=2, col=1)
    fig.update_yaxes(title_text="cross-entropy (nats)", row=1, col=1)
    fig.update_yaxes(title_text="aux loss", type="log", row=2, col=1)
    fig.update_layout(title=title or f"{history.model}: removal fine-tuning", height=620)
    return fig


@draws(DLAExactness)
def dla_figure(result, *, title: str | None = None, zmax: float | None = None) -> go.Figure:
    """Per-head NMAE of DLA against the true direct effect (percent; 0 = exact)."""
    nmae = (100 * result.nmae_heads).tolist()
    n_layers, n_heads = result.nmae_heads.shape
    fig = go.Figure(
        go.Heatmap(
            z=nmae,
            x=[f"H{h}" for h in range(n_heads)],
            y=[f"L{layer}" for layer in range(n_layers)],
            colorscale="Reds",
            zmin=0,
            zmax=zmax if zmax is not None else max(1e-9, max(max(r) for r in nmae)),
            colorbar={"title": "NMAE %"},
            hovertemplate="layer %{y}, head %{x}<br>|DLA - DE| / |DE| = %{z:.3g}%<extra></extra>",
        )
    )
    fig.update_layout(
        title=title
        or f"{result.model}: DLA error vs direct effect, mean over heads {100 * result.mean_nmae:.3g}% "
        f"(final norm: {result.final_norm})",
        yaxis={"autorange": "reversed", "title": "layer"},
        xaxis={"title": "head"},
    )
    return fig


@draws(LossStats)
def loss_figure(stats, *, others=None, title: str | None = None) -> go.Figure:
    """Per-token loss distributions (box) of one or more `LossStats` ({label: LossStats} in `others`)."""
    fig = go.Figure()
    for label, s in [(s_label(stats), stats), *(others or {}).items()]:
        flat = s.finite
        if flat.numel() > 20000:
            flat = flat[:: max(1, flat.numel() // 20000)]
        fig.add_trace(
            go.Box(
                y=flat.tolist(),
                name=f"{label}<br>mean {s.mean:.4f}",
                boxmean=True,
                boxpoints=False,
                hovertemplate="%{y:.3f} nats<extra></extra>",
            )
        )
    fig.update_layout(title=title or "per-token cross-entropy", yaxis={"title": "cross-entropy (nats)"})
    return fig


def s_label(stats) -> str:
    return stats.model + (f" ({len(stats.frozen)} norms frozen)" if stats.frozen else "")
