"""Shared parts of every panel: a run/stop bar with progress, a status line, figure updates, "show code".

A panel subclasses `Panel`, builds its controls, and calls `self.start(compute, on_result)` from its Run
button. `compute(progress, cancel)` runs an engine in a background thread, so the kernel stays responsive and
the Stop button works; `on_result(result)` stores the result and redraws. Errors the workbench raises on purpose
(`WorkbenchError`) appear in the status line as their sentence; the last good result and its picture stay. A
result that cannot be drawn in the current view (`draw_failed`) says why in the status line and in the figure,
never "Done" over an older picture. **Show code** follows the last successful run.
"""

from __future__ import annotations

import ast
import html
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from workbench import remote
from workbench.codegen import call, literal
from workbench.core import CancelToken
from workbench.errors import Cancelled, InputError, WorkbenchError
from workbench.tasks.corpus import SPLIT_SEEDS, demo_corpus
from workbench.viz.common import message_figure
from workbench.widgets.figure import PanelFigure, replace_figure

__all__ = [
    "Panel",
    "PanelFigure",
    "engine_call",
    "replace_figure",
    "check_choice",
    "show_app",
    "source_of",
    "add_classes",
    "lines",
    "text_area",
    "parse_answers",
    "format_answers",
    "FULL_WIDTH",
]

# `width: 100%` plus the 2 px margins ipywidgets puts around every control overflows the output area by 4 px
# (a horizontal scrollbar); in a column, `auto` fills the width inside the margins.
FULL_WIDTH = "auto"


def add_classes(prefix: str, **named: widgets.DOMWidget) -> None:
    """Give each widget the CSS class `prefix-name` (underscores as hyphens), by which tests and styles find it:
    `add_classes("wb-plateau", max_size=box)` -> "wb-plateau-max-size"."""
    for name, widget in named.items():
        widget.add_class(f"{prefix}-{name.replace('_', '-')}")


def text_area(value: str, description: str, placeholder: str = "", least: int = 1) -> widgets.Textarea:
    """A text box as wide as the panel that shows every line of its text (from `least` up to 8 rows) as it is
    edited: a box of several prompts shows all of them."""

    def fit(box):
        box.rows = max(least, min(8, len(box.value.split("\n"))))

    box = widgets.Textarea(
        value=value, description=description, placeholder=placeholder, layout=widgets.Layout(width=FULL_WIDTH)
    )
    fit(box)
    box.observe(lambda change: fit(change["owner"]), "value")
    return box


def lines(text: str) -> list[str]:
    """The non-blank lines of a text box (one prompt per line)."""
    return [line for line in (t.rstrip("\r") for t in text.split("\n")) if line.strip()]


def parse_answers(text: str) -> list[tuple[str, str]]:
    """Answer lines like ``' Mary', ' John'`` (Python string literals, so leading spaces are exact)."""
    out = []
    for i, line in enumerate(lines(text)):
        try:
            value = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError):
            value = None
        if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            raise InputError(
                f"Answers line {i + 1} ({line.strip()!r}): write the correct and the incorrect answer as two quoted "
                "tokens, e.g. ' Mary', ' John' (one line for all pairs, or one line per pair)."
            )
        out.append(value)
    if not out:
        raise InputError("Give the answers, e.g. ' Mary', ' John' (correct, then incorrect).")
    return out


def format_answers(answers) -> str:
    """The text of an answers box: one ``'correct', 'incorrect'`` line per pair (one pair or a list of pairs)."""
    answers = list(answers)
    if not answers:
        return ""
    if isinstance(answers[0], str):
        answers = [answers]
    return "\n".join(f"{a!r}, {b!r}" for a, b in answers)


def check_choice(name: str, value, allowed, error: type[WorkbenchError] = InputError, hint: str = "") -> None:
    """Raise `error` with a sentence listing `allowed` when `value` is not one of them (a panel constructor's
    check, before the value reaches a widget, whose own error is a long TraitError)."""
    allowed = list(allowed)
    if value not in allowed:
        raise error(
            f"{name}={value!r} is not available here; choose one of {', '.join(map(repr, allowed))}."
            + (f" {hint}" if hint else "")
        )


def source_of(data):
    """Code (a `workbench.codegen.Expr`) for data a panel was given: the `demo_corpus(split, n)` call that
    makes it when it is the demo corpus, else its literal (texts, or a token tensor)."""
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data):
        for split in SPLIT_SEEDS:
            if demo_corpus(split, 1)[0] == data[0] and demo_corpus(split, len(data)) == list(data):
                return call("workbench.tasks", "demo_corpus", [split, len(data)])
    return literal(data)


def _in_voila() -> bool:
    return os.environ.get("SERVER_SOFTWARE", "").startswith("voila/")


def show_app(
    build: Callable[[], widgets.Widget], placeholder: str = "Loading the panels..."
) -> widgets.Widget:
    """The widget `build()` returns, for a notebook's app cell.

    Under Voila the app is built when the page first shows it, not while the notebook runs. Voila (without
    progressive rendering) runs every cell before the page connects, and the page then loads all existing widgets
    at once; some plotly figures loaded that way never receive a later update (measured: 2 of 3 figures stayed
    on their first picture after a click, in 4 of 5 page loads). Widgets created after the page connected are
    announced to it one by one, as in JupyterLab, and update reliably. Elsewhere (JupyterLab, a notebook run by
    a script) `build()` runs at once.
    """
    if not _in_voila():
        return build()
    # the page reports its views of the box (`_view_count` 0, not None): the first one means it is connected. Set
    # when the box is made, so the page learns it with the box itself: set afterwards, a page that renders the box
    # before the change arrives (Voila's progressive rendering) never counts its view, and the app never loads.
    box = widgets.VBox(
        [widgets.HTML(f'<span style="color:#555">{html.escape(placeholder)}</span>')], _view_count=0
    )
    box.add_class("wb-app")

    def shown(change) -> None:
        if change["new"] and not getattr(box, "_built", False):
            box._built = True
            box.children = [build()]

    box.observe(shown, "_view_count")
    return box


_COLOURS = {"info": "#444", "ok": "#1a7f37", "error": "#c62828", "busy": "#8a6d00"}


def engine_call(
    fn: Callable, model, *args, **kwargs
) -> Callable[[Callable[[int, int], None], CancelToken], Any]:
    """A compute function for `Panel.start` that calls one engine: ``fn(model, *args, **kwargs)`` with the run's
    progress and Stop. For a remote model the call goes through the run's `RemoteRunner`, whose result cache
    serves a repeated call (a redraw, a second panel) without a new NDIF job; for a local one it is a plain call."""

    def compute(progress, cancel):
        return remote.call(fn, model, *args, progress=progress, cancel=cancel, **kwargs)

    return compute


class Panel(widgets.VBox):
    """Base class for the workbench's panels.

    Attributes:
        result: the last good result (None before the first successful run).
        figure: the panel's `go.FigureWidget`.
        background: run computations in a thread (True in notebooks); tests may set it to False.
    """

    background = True

    def __init__(self, *, figure: go.FigureWidget | None = None, **kwargs):
        self.result = None
        self.done_note: str | None = None  # what the status line says instead of "Done" (set by `on_result`)
        self.draw_error: str | None = None
        self.figure = figure if figure is not None else PanelFigure()
        self.status = widgets.HTML(layout=widgets.Layout(min_height="22px"))
        self.progress = widgets.FloatProgress(
            value=0, min=0, max=1, layout=widgets.Layout(width="220px", visibility="hidden")
        )
        self.run_button = widgets.Button(
            description="Run", button_style="primary", icon="play", layout=widgets.Layout(width="100px")
        )
        self.stop_button = widgets.Button(
            description="Stop", icon="stop", disabled=True, layout=widgets.Layout(width="90px")
        )
        self.code_button = widgets.ToggleButton(
            description="Show code", icon="code", value=False, layout=widgets.Layout(width="120px")
        )
        self.code_view = widgets.HTML(layout=widgets.Layout(display="none"))
        self.stop_button.on_click(lambda _: self.cancel())
        self.code_button.observe(self._toggle_code, names="value")
        self._thread: threading.Thread | None = None
        self._cancel: CancelToken | None = None
        self.run_bar = widgets.HBox(
            [self.run_button, self.stop_button, self.progress, self.code_button],
            layout=widgets.Layout(align_items="center"),
        )
        super().__init__(**kwargs)

    # -- status --------------------------------------------------------------------------------------
    def set_status(self, text: str, kind: str = "info") -> None:
        colour = _COLOURS.get(kind, _COLOURS["info"])
        self.status.value = (
            f'<span class="wb-status wb-{kind}" style="color:{colour}">{html.escape(text)}</span>'
        )

    @property
    def status_text(self) -> str:
        """The status line as plain text (for tests)."""
        return html.unescape(re.sub(r"<[^>]+>", "", self.status.value))

    # -- show code -----------------------------------------------------------------------------------
    def code(self) -> str:
        """The public-API calls that reproduce what the panel shows: its last successful run, in the current
        view (see `workbench.codegen`)."""
        raise NotImplementedError

    def _toggle_code(self, change) -> None:
        if change["new"]:
            self.refresh_code()
            self.code_view.layout.display = ""
        else:
            self.code_view.layout.display = "none"

    def refresh_code(self) -> None:
        """Reprint the code (after a run or a view change) if it is shown."""
        if not self.code_button.value:
            return
        try:
            text = self.code()
        except WorkbenchError as err:
            text = f"# {err}"
        self.code_view.value = (
            f'<pre class="wb-code" style="font-size:12px;white-space:pre-wrap">{html.escape(text)}</pre>'
        )

    # -- drawing -------------------------------------------------------------------------------------
    def draw_failed(self, figure: go.FigureWidget, err: Exception) -> None:
        """`figure` cannot show the current view (e.g. normalising a metric whose baselines are equal): the
        figure and the status line say why, and the run that produced the result does not report "Done"."""
        self.draw_error = str(err)
        replace_figure(figure, message_figure(str(err)))
        self.set_status(str(err), "error")

    # -- running -------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
            self.set_status("Stopping after the current chunk...", "busy")

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current run finishes (for scripts, tests and notebook cells that need the result)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.value = done / max(total, 1)

    def _on_remote_update(self, update) -> None:
        """An NDIF job's state in the status line: job id, lifecycle state, elapsed time."""
        self.set_status(update.text(), "error" if update.state == "ERROR" else "busy")

    def start(
        self,
        compute: Callable[[Callable[[int, int], None], CancelToken], Any],
        on_result: Callable[[Any], None],
        *,
        label: str = "Running",
    ) -> None:
        """Run `compute(progress, cancel)`; on success keep its result and call `on_result(result)`."""
        if self.busy:
            self.set_status("Still running; press Stop first.", "busy")
            return
        self._cancel = CancelToken()
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.progress.value, self.progress.layout.visibility = 0, "visible"
        self.set_status(f"{label}...", "busy")
        started = time.perf_counter()

        # Remote traces inside `compute` report here (whatever model they use), and Stop ends their wait too.
        reporting = remote.RemoteRunner(self._on_remote_update, cancel=self._cancel)

        def job():
            try:
                with reporting:
                    result = compute(self._on_progress, self._cancel)
                self.draw_error = self.done_note = None
                on_result(result)
                self.result = result
                if self.draw_error is None:
                    self.set_status(self.done_note or f"Done in {time.perf_counter() - started:.1f} s.", "ok")
                self.refresh_code()
            except Cancelled:
                self.set_status("Stopped; the previous result is kept.", "info")
            except WorkbenchError as err:
                self.set_status(str(err), "error")
            except Exception as err:  # a bug: say so plainly, keep the panel alive
                self.set_status(f"Unexpected error ({type(err).__name__}: {err}). Please report it.", "error")
                traceback.print_exc()
            finally:
                self.run_button.disabled, self.stop_button.disabled = False, True
                self.progress.layout.visibility = "hidden"

        if self.background:
            self._thread = threading.Thread(target=job, daemon=True)
            self._thread.start()
        else:
            job()

    def show_error(self, err: Exception) -> None:
        """Show a validation error raised before a run started (keeps the last result)."""
        self.set_status(str(err), "error")
