"""Shared parts of every panel: a run/stop bar with progress, a status line, figure updates, "show code".

A panel subclasses `Panel`, builds its controls, and calls `self.start(compute, on_result)` from its Run
button. `compute(progress, cancel)` runs an engine in a background thread, so the kernel stays responsive and
the Stop button works; `on_result(result)` redraws. Errors the workbench raises on purpose (`WorkbenchError`)
appear in the status line as their sentence; the last good result and its picture stay.
"""

from __future__ import annotations

import html
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go

from workbench.errors import Cancelled, WorkbenchError
from workbench.runner import CancelToken
from workbench.widgets.figure import PanelFigure, replace_figure

__all__ = ["Panel", "PanelFigure", "replace_figure"]

_COLOURS = {"info": "#444", "ok": "#1a7f37", "error": "#c62828", "busy": "#8a6d00"}


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
        import re

        return html.unescape(re.sub(r"<[^>]+>", "", self.status.value))

    # -- show code -----------------------------------------------------------------------------------
    def code(self) -> str:
        """The public-API call that reproduces the panel's current state."""
        raise NotImplementedError

    def _toggle_code(self, change) -> None:
        if change["new"]:
            try:
                text = self.code()
            except WorkbenchError as err:
                text = f"# {err}"
            self.code_view.value = f'<pre class="wb-code" style="font-size:12px">{html.escape(text)}</pre>'
            self.code_view.layout.display = ""
        else:
            self.code_view.layout.display = "none"

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

        def job():
            from workbench.remote import RemoteRunner

            try:
                # Remote traces inside `compute` report here, and Stop ends their wait too.
                with RemoteRunner(self._on_remote_update, cancel=self._cancel):
                    result = compute(self._on_progress, self._cancel)
                on_result(result)
                self.result = result
                self.set_status(f"Done in {time.perf_counter() - started:.1f} s.", "ok")
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
