"""Figures for causal-scrubbing results (`workbench.scrubbing.ScrubResult`), whichever model they come from.

Pure functions: results in, plotly figures out; nothing here runs a model.
"""

from __future__ import annotations

import plotly.graph_objects as go

from workbench.scrubbing import ScrubResult
from workbench.viz.registry import draws


@draws(ScrubResult)
def scrub_bars(result, *, published: dict[str, float] | None = None, title: str | None = None) -> go.Figure:
    """Behaviour kept per hypothesis of a `ScrubResult`, with the clean run first (and published values, if any:
    {hypothesis name: fraction kept})."""
    names = ["clean", *result.names]
    kept = [result.clean_score, *result.kept.tolist()]
    fig = go.Figure(
        go.Bar(x=names, y=kept, name="ours", text=[f"{v:.1%}" for v in kept], textposition="outside")
    )
    if published:
        fig.add_trace(
            go.Bar(
                x=list(published),
                y=list(published.values()),
                name="published",
                text=[f"{v:.1%}" for v in published.values()],
                textposition="outside",
            )
        )
    fig.update_yaxes(range=[0, 1.12], tickformat=".0%", title_text="behaviour kept")
    fig.update_layout(title=title, barmode="group", height=420, width=800)
    return fig
