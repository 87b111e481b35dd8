"""The shared panel machinery: results are kept across failures, errors read as sentences, runs can stop."""

from __future__ import annotations

import json
import threading

import numpy as np
import plotly.graph_objects as go
import pytest
from frontend_mirror import Frontend, figure_json
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from plotly.subplots import make_subplots

from workbench.core import Run
from workbench.errors import InputError
from workbench.widgets.base import Panel, PanelFigure, replace_figure


class Echo(Panel):
    def code(self):
        return "echo()"


@pytest.fixture
def panel():
    p = Echo()
    p.background = False
    return p


def test_success_keeps_result_and_reports(panel):
    drawn = []
    panel.start(lambda progress, cancel: 42, drawn.append)
    assert panel.result == 42 and drawn == [42]
    assert panel.status_text.startswith("Done in")
    assert not panel.run_button.disabled and panel.stop_button.disabled


def test_workbench_error_keeps_last_good_result(panel):
    panel.start(lambda p, c: 1, lambda r: None)

    def fail(progress, cancel):
        raise InputError("Clean and corrupt prompts differ in length; edit one of them.")

    panel.start(fail, lambda r: None)
    assert panel.result == 1
    assert panel.status_text == "Clean and corrupt prompts differ in length; edit one of them."


def test_unexpected_error_is_reported_not_raised(panel, capsys):
    panel.start(lambda p, c: 1 / 0, lambda r: None)
    assert "ZeroDivisionError" in panel.status_text and panel.result is None


def test_stop_cancels_between_chunks():
    panel = Echo()
    gate = threading.Event()

    def compute(progress, cancel):
        def chunk(start, stop):
            gate.wait(5)
            return start

        return Run(progress=progress, cancel=cancel).chunked(10, 1, chunk)

    panel.start(compute, lambda r: None)
    assert panel.busy
    panel.cancel()
    gate.set()
    panel.wait(10)
    assert panel.result is None and "Stopped" in panel.status_text


def test_show_code_toggle(panel):
    panel.code_button.value = True
    assert "echo()" in panel.code_view.value and panel.code_view.layout.display == ""
    panel.code_button.value = False
    assert panel.code_view.layout.display == "none"


def _shown(fig) -> dict:
    """A figure as the browser gets it, without the trace ids a FigureWidget adds."""
    spec = json.loads(fig.to_json())
    for trace in spec["data"]:
        trace.pop("uid", None)
    return spec


def _grid(z, title, n_sites=1):
    fig = make_subplots(rows=1, cols=n_sites) if n_sites > 1 else go.Figure()
    for i in range(n_sites):
        where = {"row": 1, "col": i + 1} if n_sites > 1 else {}
        fig.add_trace(go.Heatmap(z=np.asarray(z) + i, zmid=0.0, customdata=np.zeros((2, 2))), **where)
    fig.update_layout(title={"text": title}, template="plotly_white")
    return fig


def test_replace_figure_with_a_new_structure():
    fw = go.FigureWidget(go.Figure(go.Bar(y=[1, 2])))
    new = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]), layout={"title": {"text": "new"}})
    replace_figure(fw, new)
    assert fw.data[0].type == "heatmap" and fw.layout.title.text == "new"
    assert _shown(fw) == _shown(new)
    # fewer subplots: the extra axes and subplot titles go
    fw = go.FigureWidget()
    replace_figure(fw, _grid([[1, 2], [3, 4]], "three", n_sites=3))
    assert fw.layout.xaxis3 is not None and len(fw.data) == 3
    replace_figure(fw, _grid([[0, 0], [0, 0]], "one"))
    assert "xaxis3" not in fw.layout.to_plotly_json() and _shown(fw) == _shown(_grid([[0, 0], [0, 0]], "one"))


def test_replace_figure_updates_values_in_place():
    """Same structure: the traces stay (with their click handlers) and only the changed values are set."""
    fw = go.FigureWidget()
    replace_figure(fw, _grid([[1, 2], [3, 4]], "first", n_sites=2))
    traces, template = list(fw.data), fw.layout.template
    clicks = []
    for trace in fw.data:
        trace.on_click(lambda *args: clicks.append(args))
    sent = []
    fw._send_update_msg = lambda *args, **kwargs: sent.append([args, kwargs])  # what goes to the browser
    new = _grid([[5, 6], [7, float("nan")]], "second", n_sites=2)
    new.data[1].zmid = 1.5
    replace_figure(fw, new)
    assert all(a is b for a, b in zip(fw.data, traces)) and fw.layout.template is template
    assert _shown(fw) == _shown(new)
    assert all(len(t._click_callbacks) == 1 for t in fw.data)
    assert sent, "the changes must reach the browser"
    changed = json.dumps(sent, default=str)
    assert (
        "zmid" in changed
        and "second" in changed
        and "customdata" not in changed
        and "template" not in changed
    )


# -- a redraw in place shows exactly what a fresh figure would ------------------------------------------------
FIGURE_PARTS = st.fixed_dictionaries(
    {
        "kinds": st.lists(st.sampled_from(["heatmap", "bar", "scatter"]), min_size=1, max_size=3),
        "n": st.integers(1, 4),
        "subplot_titles": st.booleans(),
        "title": st.one_of(st.none(), st.sampled_from(["first view", "second view"])),
        "legend_title": st.one_of(st.none(), st.just("family")),
        "hline": st.one_of(st.none(), st.floats(-1, 1)),
        "x_range": st.one_of(st.none(), st.tuples(st.just(-0.5), st.floats(1, 5))),
        "log_y": st.booleans(),
        "numeric_categories": st.booleans(),
        "height": st.one_of(st.none(), st.sampled_from([300, 480])),
    }
)


def build_figure(parts: dict) -> go.Figure:
    """A figure with the layout pieces the panels use: subplots and their titles, a title, a legend title, a
    threshold line with its label, a fixed axis range, a log axis, a height."""
    kinds, n = parts["kinds"], parts["n"]
    titles = [f"{k} {i}" for i, k in enumerate(kinds)] if parts["subplot_titles"] else None
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=titles) if len(kinds) > 1 else go.Figure()
    for i, kind in enumerate(kinds):
        where = {"row": 1, "col": i + 1} if len(kinds) > 1 else {}
        values = np.arange(n, dtype=float) + i
        if kind == "heatmap":
            trace = go.Heatmap(z=np.outer(values, values), x=[f"p{j}" for j in range(n)], zmid=0.0)
        elif kind == "bar":
            # layers named "0", "1", ... on a category axis: plotly.js guesses "linear" if it forgets the type
            labels = (
                [str(j) for j in range(n)] if parts["numeric_categories"] else [f"L{j}" for j in range(n)]
            )
            trace = go.Bar(x=labels, y=values, name=f"bars {i}")
        else:
            trace = go.Scatter(x=values, y=values**2, mode="lines", name=f"line {i}", line={"width": 1 + i})
        fig.add_trace(trace, **where)
    if parts["hline"] is not None:
        fig.add_hline(y=parts["hline"], annotation_text=f"threshold {parts['hline']:.3g}")
    if parts["x_range"] is not None:
        fig.update_xaxes(range=list(parts["x_range"]))
    if parts["log_y"]:
        fig.update_yaxes(type="log")
    if parts["numeric_categories"]:
        fig.update_xaxes(type="category")
    fig.update_layout(template="plotly_white")
    if parts["title"] is not None:
        fig.update_layout(title={"text": parts["title"]})
    if parts["legend_title"] is not None:
        fig.update_layout(legend={"title": {"text": parts["legend_title"]}})
    if parts["height"] is not None:
        fig.update_layout(height=parts["height"])
    return fig


BARS = dict(
    kinds=["bar"], n=3, subplot_titles=False, title=None, legend_title=None, hline=None, x_range=None,
    log_y=False, numeric_categories=True, height=None,
)  # fmt: skip
THREE_SITES = dict(
    BARS, kinds=["heatmap"] * 3, subplot_titles=True, numeric_categories=False, title="first view"
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FIGURE_PARTS, min_size=1, max_size=5))
# new data on a category axis of "0", "1", "2" (the LN preview's layers); three subplots, then one
@example([BARS, dict(BARS, n=4)])
@example([THREE_SITES, dict(THREE_SITES, kinds=["heatmap"], subplot_titles=False)])
def test_any_sequence_of_redraws_shows_the_last_figure(sequence):
    """After any sequence of in-place redraws, the figure (in Python), what a page that watched every delta
    holds, and what a page that connects now receives all equal the last figure built fresh."""
    target = PanelFigure()
    watching = Frontend(target)
    for parts in sequence:
        fresh = build_figure(parts)
        replace_figure(target, fresh)
        expected = figure_json(fresh)
        assert figure_json(target) == expected
        assert watching.figure() == expected
    assert Frontend(target).figure() == expected


def _bars_and_line(y) -> go.Figure:
    fig = make_subplots(rows=1, cols=2)
    fig.add_trace(go.Bar(x=["0", "1", "final"], y=[1, 2, 3]), row=1, col=1)
    fig.add_trace(go.Scatter(x=[1, 2], y=y), row=1, col=2)
    return fig.update_xaxes(type="category", row=1, col=1)


def test_restyling_a_later_subplot_keeps_the_first_subplots_axis_type():
    """For n restyled traces plotly.js forgets the axis types of the figure's first n traces (not those of the
    restyled ones): a redraw that changes the second subplot only must keep the first one's category axis."""
    target = PanelFigure()
    replace_figure(target, _bars_and_line([1, 2]))
    page = Frontend(target)
    replace_figure(target, _bars_and_line([3, 4]))
    assert page.figure() == figure_json(_bars_and_line([3, 4]))


@pytest.mark.parametrize("widget", [PanelFigure, go.FigureWidget])
def test_the_pages_reports_leave_the_figure_as_python_set_it(widget):
    """After each change the page reports what plotly.js computed; a report naming properties Python set (as one
    does that crosses a newer change) must not remove them from the figure, nor from the page's copy."""
    target = widget(go.Figure(go.Bar(x=["a", "b"], y=[1, 2], name="bars")))
    before = figure_json(target)
    removals = []
    target.observe(
        lambda c: c["new"] and removals.append(c["new"]),
        ["_py2js_removeTraceProps", "_py2js_removeLayoutProps"],
    )
    target._js2py_traceDeltas = {
        "trace_deltas": [{"uid": target.data[0].uid, "x": ["a", "b"], "name": "bars", "opacity": 1}],
        "trace_edit_id": target._last_trace_edit_id,
    }
    target._js2py_layoutDelta = {
        "layout_delta": {"xaxis": {"type": "category"}},
        "layout_edit_id": target._last_layout_edit_id,
    }
    if widget is go.FigureWidget:  # what a plain FigureWidget does (why panels use PanelFigure)
        assert figure_json(target) != before and removals
    else:
        assert figure_json(target) == before and not removals
