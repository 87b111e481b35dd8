"""Figure parts every panel uses: a message in place of a figure, readable ticks for log axes."""

from __future__ import annotations

import math
import textwrap

import plotly.graph_objects as go
import plotly.io as pio


def white(fig: go.Figure) -> go.Figure:
    """`fig` with the plotly_white template, set as plotly sets its default template: without validating the
    registered template again (validating it costs ~25 ms, most of a panel's redraw budget)."""
    validate = fig.layout._validate
    fig.layout._validate = False
    try:
        fig.layout.template = pio.templates["plotly_white"]
    finally:
        fig.layout._validate = validate
    return fig


def message_figure(text: str, height: int = 360) -> go.Figure:
    """An empty figure that says `text` (why there is nothing to show, or what to do to see something)."""
    fig = go.Figure()
    fig.add_annotation(
        text="<br>".join(textwrap.wrap(text, 90)),
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        showarrow=False,
        font={"size": 14, "color": "#555"},
    )
    white(fig).update_layout(
        xaxis={"visible": False},
        yaxis={"visible": False},
        height=height,
        margin={"l": 20, "r": 20, "t": 20, "b": 20},
    )
    return fig


def log_ticks(low: float, high: float) -> dict:
    """Tick values and labels for a log axis spanning [low, high] (> 0): 1-2-5 steps, every label a whole
    number such as 0.2 (plotly's own ticks on short ranges read "5, 2, 1, 5, 2, 0.1, 5")."""
    if not (low > 0 and high > 0):
        return {}
    low, high = min(low, high), max(low, high)
    values = []
    for exponent in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1):
        for mantissa in (1, 2, 5):
            v = mantissa * 10.0**exponent
            if low / 1.5 <= v <= high * 1.5:
                values.append(float(f"{v:.6g}"))
    if len(values) > 12:  # a long range: decades only
        values = [v for v in values if f"{v:.6g}".lstrip("0.").startswith("1")]
    return {"tickvals": values, "ticktext": [f"{v:g}" for v in values]}


# where a dot may sit along an edge, middle first
ALONG = (0.5, 0.45, 0.55, 0.4, 0.6, 0.35, 0.65, 0.3, 0.7, 0.25, 0.75, 0.2, 0.8)


def edge_dots(edges, gap: tuple[float, float]) -> list[tuple[float, float]]:
    """(x, y) of one clickable dot per edge: the first point along it (`ALONG`) at least `gap` = (dx, dy) away,
    in x or in y, from the dots placed before it, else the point farthest from them. `edges`: functions
    t -> (x, y) tracing each edge from t = 0 to 1, most important first. Middles alone coincide for edges that
    share both ends or cross at their middles, and a click would then reach only one of them."""
    dx, dy = gap
    taken: list[tuple[float, float]] = []
    grid: dict[tuple[int, int], list[tuple[float, float]]] = {}  # placed dots by cell of one gap

    def room(point) -> float:
        """How far, in gaps, the nearest placed dot is (inf beyond one gap: only neighbouring cells are read)."""
        x, y = point
        cx, cy = int(x // dx), int(y // dy)
        near = [d for i in (cx - 1, cx, cx + 1) for j in (cy - 1, cy, cy + 1) for d in grid.get((i, j), ())]
        return min((max(abs(x - a) / dx, abs(y - b) / dy) for a, b in near), default=float("inf"))

    for at in edges:
        points = [at(t) for t in ALONG]
        dot = next((p for p in points if room(p) >= 1), None) or max(points, key=room)
        taken.append(dot)
        grid.setdefault((int(dot[0] // dx), int(dot[1] // dy)), []).append(dot)
    return taken
