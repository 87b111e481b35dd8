"""Redrawing a plotly `FigureWidget` so that the browser shows exactly what a fresh figure would.

A FigureWidget talks to the browser in deltas: `Plotly.restyle` / `Plotly.relayout` / `Plotly.update` messages
that *merge* into what the page already holds. A property the new figure lacks is therefore kept by the page
unless the delta names it with `null`: subplot titles, axes and ranges of the previous view survive. `replace_figure`
sends one delta that sets every changed top-level property (a container as a whole, so its stale sub-keys go
too) and deletes every property the new figure does not have, for the layout and for each kept trace.

`PanelFigure` is a FigureWidget whose widget state (what a page that connects later, or reloads, draws first) is the
current figure: plain FigureWidgets keep the state they were built with and rely on deltas only, which a page
that connects after the deltas were sent (Voila without progressive rendering) never sees.
"""

from __future__ import annotations

import re
from copy import deepcopy

import numpy as np
import plotly.graph_objects as go
from plotly.basedatatypes import Undefined
from traitlets import observe


class PanelFigure(go.FigureWidget):
    """A `go.FigureWidget` whose synced state always describes its current traces and layout.

    The deltas that `replace_figure` sends update pages that are already showing the figure; a page that asks
    for the widget's state later (a reloaded notebook, a Voila app that connects after its cells ran) gets the
    figure as it is now, not as it was built.
    """

    # set the default template as a plain go.Figure does, without validating plotly's own template again
    # (~50 ms per figure widget otherwise)
    _allow_disable_validation = True

    # After each change the page reports what plotly.js computed besides (autoranges, axis types, default
    # colours). A plain FigureWidget then deletes every property such a report names from its own traces and
    # layout, and tells the page to do the same: a report that crosses a newer change (reports arrive on another
    # thread, in the middle of a redraw) strips values Python had just set (x, y, names, markers), the next
    # redraw resends them as changes, and the page restyles traces the new figure did not change (the LN preview's
    # layer axis turned linear and hid the "final" bar in 2 of 4 browser runs). Here the figure is what Python set
    # and nothing else: a report only marks the change as done.
    @observe("_js2py_traceDeltas")
    def _handler_js2py_traceDeltas(self, change):
        if change["new"]:
            self._edit_reported("trace", change["new"]["trace_edit_id"])
            self._js2py_traceDeltas = None

    @observe("_js2py_layoutDelta")
    def _handler_js2py_layoutDelta(self, change):
        if change["new"]:
            self._edit_reported("layout", change["new"]["layout_edit_id"])
            self._js2py_layoutDelta = None

    def _edit_reported(self, kind: str, edit_id: int) -> None:
        """The page has applied the latest `kind` ("trace" or "layout") edit: run what waits for all edits."""
        if edit_id != getattr(self, f"_last_{kind}_edit_id"):
            return
        setattr(self, f"_{kind}_edit_in_process", False)
        if not (self._trace_edit_in_process or self._layout_edit_in_process):
            while self._waiting_edit_callbacks:
                self._waiting_edit_callbacks.pop()()

    def get_state(self, key=None, drop_defaults=False):
        keys = self.keys if key is None else [key] if isinstance(key, str) else key
        # (every synced change asks for its own key: copy the figure only when its state is asked for)
        if hasattr(self, "_layout_obj") and ("_widget_data" in keys or "_widget_layout" in keys):
            # set without a change notification: this state is being read, not changed
            self._trait_values["_widget_data"] = deepcopy(self._data)
            self._trait_values["_widget_layout"] = deepcopy(self._layout_obj._props)
        return super().get_state(key=key, drop_defaults=drop_defaults)


def replace_figure(target: go.FigureWidget, new: go.Figure) -> None:
    """Make `target` show `new`: afterwards its traces and layout equal `new`'s, in Python and in the browser.

    A trace is kept where the new figure has a trace of the same type at the same index (its click handlers stay,
    and only its changed properties are sent); the old traces after the first difference are removed and the new
    ones added. Properties are compared at the top level: a changed one is sent whole, a vanished one as null
    (deleted). The changes to kept traces and to the layout go in one `Plotly.update` message.
    """
    old_traces = [t.to_plotly_json() for t in target.data]
    new_traces = [t.to_plotly_json() for t in new.data]
    keep = 0
    while (
        keep < min(len(old_traces), len(new_traces)) and old_traces[keep]["type"] == new_traces[keep]["type"]
    ):
        keep += 1
    deltas = {i: _delta(old_traces[i], new_traces[i]) for i in range(keep)}
    deltas = {i: d for i, d in deltas.items() if d}
    indexes = sorted(deltas)
    restyle = {
        key: [deltas[i].get(key, Undefined) for i in indexes]
        for key in sorted({k for d in deltas.values() for k in d})
    }
    new_layout = new.layout.to_plotly_json()
    relayout = _delta(target.layout.to_plotly_json(), new_layout)
    if keep < len(old_traces):
        target.data = target.data[:keep]
    for key in relayout.keys() - set(target.layout):
        if relayout[key] is not None:
            target.layout[key] = {}  # a new subplot (xaxis2, ...): the layout accepts it from now on
    if restyle or relayout:
        _update(target, restyle, relayout, indexes, new_layout)
    if keep < len(new_traces):
        target.add_traces(list(new.data[keep:]))


def _update(target, restyle: dict, relayout: dict, indexes: list[int], layout: dict) -> None:
    """`target.plotly_update(restyle, relayout, indexes)`, with two differences in the message to the page:

    - every axis of the layout goes along whole: plotly.js, restyling a trace's data (or any of many other
      properties), forgets axis types unless the same update names the axis, and guesses them again (a category
      axis of layers "0", "1", "final" became linear, hiding the "final" bar). Which axes it forgets: for n
      restyled traces, those of the first n traces of the figure, whichever traces were restyled;
    - without trace changes it is a relayout: an update naming no property still restyles every trace in
      plotly.js, with the same effect.
    """
    restyle_changes, relayout_changes, indexes = target._perform_plotly_update(restyle, relayout, indexes)
    restyle_changes, relayout_changes = restyle_changes or {}, relayout_changes or {}
    if restyle_changes:
        for axis in _cartesian_axes(layout):
            relayout_changes.setdefault(axis, layout[axis])
        target._send_update_msg(restyle_changes, relayout_changes, indexes)
        target._dispatch_trace_change_callbacks(restyle_changes, indexes)
    elif relayout_changes:
        target._send_relayout_msg(relayout_changes)
    if relayout_changes:
        target._dispatch_layout_change_callbacks(relayout_changes)
    # plotly_update changes the property dicts only: the Python objects of the changed properties
    # (fig.layout.annotations, ...) are rebuilt from them on next access
    _forget(target.layout, relayout)
    for i in indexes:
        _forget(target.data[i], restyle)


def _cartesian_axes(layout: dict) -> list[str]:
    """The x and y axes a layout sets ('xaxis', 'yaxis2', ...)."""
    return [key for key in layout if re.fullmatch(r"[xy]axis\d*", key)]


def _forget(obj, keys) -> None:
    subplots = getattr(obj, "_subplotid_props", ())
    for key in keys:
        obj._compound_props.pop(key, None)
        obj._compound_array_props.pop(key, None)
        if key in subplots:  # (xaxis2, ...: read from this cache without a fallback)
            obj._compound_props[key] = obj._get_validator(key).data_class(_parent=obj, plotly_name=key)


def _delta(current: dict, props: dict) -> dict:
    """Top-level properties to set (changed or new) and to delete (None) to turn `current` into `props`."""
    delta = {k: v for k, v in props.items() if k not in current or not _equal(current[k], v)}
    delta.update({k: None for k in current.keys() - props.keys() if k != "uid"})
    delta.pop("uid", None)  # a FigureWidget names its traces itself
    return delta


def _equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
        )
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b
