"""What a browser page showing a plotly `FigureWidget` holds, computed in Python.

plotly's widget JavaScript (`plotly/package_data/widgetbundle.js`) starts a page from the widget's synced state
(`_widget_data`, `_widget_layout`) and then applies each Python -> JS message: `addTraces`, `deleteTraces`,
`moveTraces`, and `restyle` / `relayout` / `update` deltas, which set each named property path (lodash `set`) or,
for `null`, delete it (lodash `unset`). `Frontend` replays the same messages on the same state, so a test can
compare what the page ends with against a freshly built figure without a browser. It also does what plotly.js
does on every restyle (the widget's view sends each update to `Plotly.update` with a `_doNotReportToPy` style key,
so even a layout-only update restyles the traces it names, all of them when it names none): it forgets the `type`
of x and y axes unless the update's layout names the axis (of the first n traces when n are restyled: see
`_clear_axis_types`), and would guess it again from the data.
The browser tests check the same things against plotly.js itself.
"""

from __future__ import annotations

import base64
import math
import re

import numpy as np
from plotly.basedatatypes import Undefined

MESSAGES = (
    "_py2js_addTraces",
    "_py2js_deleteTraces",
    "_py2js_moveTraces",
    "_py2js_restyle",
    "_py2js_relayout",
    "_py2js_update",
    "_py2js_removeLayoutProps",
    "_py2js_removeTraceProps",
)


SKIP = "_undefined_"  # how plotly's widget serialiser sends "leave this trace's value alone"


def plain(value):
    """JSON-like copy as the page receives it: numpy arrays as (nested) lists, NaN and infinities as null."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:  # plotly's base64 typed array
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
            shape = value.get("shape", array.shape)
            if isinstance(shape, str):  # "2, 3"
                shape = [int(n) for n in shape.split(",")]
            return plain(array.reshape(shape))
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if value is Undefined:
        return SKIP
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def figure_json(fig) -> dict:
    """{"data": [...], "layout": {...}} of a figure, without the trace ids a FigureWidget adds."""
    spec = plain(fig.to_plotly_json())
    for trace in spec["data"]:
        trace.pop("uid", None)
    spec.setdefault("layout", {})
    return spec


def _path(key) -> list:
    if isinstance(key, (tuple, list)):
        return list(key)
    parts = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", key):
        parts.append(int(index) if index else name)
    return parts


def _set(obj, key, value) -> None:
    parts = _path(key)
    for here, nxt in zip(parts[:-1], parts[1:]):
        if isinstance(obj, list):
            while len(obj) <= here:
                obj.append(None)
            if obj[here] is None:
                obj[here] = [] if isinstance(nxt, int) else {}
            obj = obj[here]
        else:
            if not isinstance(obj.get(here), (dict, list)):
                obj[here] = [] if isinstance(nxt, int) else {}
            obj = obj[here]
    last = parts[-1]
    if isinstance(obj, list):
        while len(obj) <= last:
            obj.append(None)
    obj[last] = value


def _unset(obj, key) -> None:
    parts = _path(key)
    for here in parts[:-1]:
        try:
            obj = obj[here]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(obj, dict):
        obj.pop(parts[-1], None)
    elif isinstance(obj, list) and parts[-1] < len(obj):
        obj[parts[-1]] = None


def _apply(obj, delta: dict) -> None:
    for key, value in delta.items():
        if value is None:
            _unset(obj, key)
        else:
            _set(obj, key, value)


class Frontend:
    """A page that shows `fig` from now on: starts from the state a page would request, then applies each
    message `fig` sends."""

    def __init__(self, fig):
        fig.get_state(["_widget_data", "_widget_layout"])  # what a connecting page receives (refreshed here)
        self.data = plain(fig._widget_data)
        self.layout = plain(fig._widget_layout)
        self.messages: list[tuple[str, dict]] = []
        fig.observe(self._receive, names=list(MESSAGES))

    def _receive(self, change) -> None:
        if change["new"] is None:
            return
        name, msg = change["name"], plain(change["new"])
        self.messages.append((name, msg))
        getattr(self, "_" + name.removeprefix("_py2js_"))(msg)

    def _traces(self, indexes) -> list[int]:
        if indexes is None:
            return list(range(len(self.data)))
        return indexes if isinstance(indexes, list) else [indexes]

    def _restyle_traces(self, delta: dict, indexes) -> None:
        indexes = self._traces(indexes)
        for key, values in delta.items():
            values = values if isinstance(values, list) else [values]
            for i, index in enumerate(indexes):
                value = values[i % len(values)]
                if value == SKIP:
                    continue
                if value is None:
                    _unset(self.data[index], key)
                else:
                    _set(self.data[index], key, value)

    def _addTraces(self, msg) -> None:
        self.data.extend(msg["trace_data"])

    def _deleteTraces(self, msg) -> None:
        for i in reversed(msg["delete_inds"]):
            del self.data[i]

    def _moveTraces(self, msg) -> None:
        moved = [self.data[i] for i in msg["current_trace_inds"]]
        for i in sorted(msg["current_trace_inds"], reverse=True):
            del self.data[i]
        for i, trace in sorted(zip(msg["new_trace_inds"], moved), key=lambda p: p[0]):
            self.data.insert(i, trace)

    def _clear_axis_types(self, indexes, layout_update: dict) -> None:
        """plotly.js `Axes.clearAxisTypes`: axes lose their type (log excepted) unless the same update names the
        axis or its type. Which axes: those of the first n traces for n restyled traces, whichever these are
        (plotly.js reads `gd._fullData[i]` for the i-th index, not `gd._fullData[traces[i]]`), so a restyle of
        traces on the second subplot clears the first subplot's axes."""
        for index in range(len(self._traces(indexes))):
            trace = self.data[index]
            for letter in "xy":
                ref = trace.get(f"{letter}axis", letter)
                name = f"{letter}axis{ref[1:]}"
                axis = self.layout.get(name)
                named = name in layout_update or f"{name}.type" in layout_update
                if isinstance(axis, dict) and axis.get("type") != "log" and not named:
                    axis.pop("type", None)

    def _restyle(self, msg) -> None:
        self._restyle_traces(msg["restyle_data"], msg["restyle_traces"])
        self._clear_axis_types(msg["restyle_traces"], {})

    def _relayout(self, msg) -> None:
        _apply(self.layout, msg["relayout_data"])

    def _update(self, msg) -> None:
        self._restyle_traces(msg["style_data"] or {}, msg["style_traces"])
        layout_update = msg["layout_data"] or {}
        _apply(self.layout, layout_update)
        self._clear_axis_types(msg["style_traces"], layout_update)

    def _removeLayoutProps(self, msg) -> None:
        for key in msg["remove_props"]:
            _unset(self.layout, key)

    def _removeTraceProps(self, msg) -> None:
        for key in msg["remove_props"]:
            _unset(self.data[msg["remove_trace"]], key)

    def figure(self) -> dict:
        """What the page shows, in the form of `figure_json`."""
        data = [{k: v for k, v in t.items() if k != "uid"} for t in self.data]
        return {"data": data, "layout": self.layout}


def watched(*figures) -> list[Frontend]:
    """A page for each figure, watching it from now on."""
    return [Frontend(f) for f in figures]


def assert_same_figure(panel_figure, page: Frontend, fresh_figure) -> None:
    """`panel_figure` (redrawn in place), the page that watched it, and a page connecting now all show exactly
    `fresh_figure` (a panel's figure built straight for the same state)."""
    expected = figure_json(fresh_figure)
    assert figure_json(panel_figure) == expected
    assert page.figure() == expected, "the page holds something else than the figure"
    assert Frontend(panel_figure).figure() == expected, "a page connecting now gets something else"
