"""Widget parts for remote models: a job status line with Cancel, and a model picker.

    status = RemoteStatus()
    runner = status.runner(timeout=600)          # reports to the line; its Cancel button stops the wait
    panel.start(tracked(compute, runner), on_result)

    picker = ModelPicker()                       # lists what NDIF serves when it is reachable
    model = picker.load()                        # load_model(picker.value, remote=picker.remote)

Panels run engine calls in a background thread (`workbench.widgets.base.Panel`), so waiting for NDIF never
blocks the kernel; `tracked` makes every remote trace of that call report to a `RemoteRunner`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from workbench.core import CancelToken
from workbench.errors import InputError, RemoteError
from workbench.models import load_model
from workbench.remote import JobUpdate, RemoteRunner, served_models, settings

_STATE_COLOURS = {
    "RECEIVED": "#00838f",
    "QUEUED": "#8a6d00",
    "PROVISIONING": "#7e57c2",
    "DEPLOYING": "#6a1b9a",
    "DISPATCHED": "#6a1b9a",
    "RUNNING": "#1565c0",
    "COMPLETED": "#1a7f37",
    "ERROR": "#c62828",
    "CANCELLED": "#444",
    "TIMEOUT": "#c62828",
    "DISCONNECTED": "#c62828",
}
_STEPS = ("RECEIVED", "QUEUED", "RUNNING", "COMPLETED")


def _plain_text(value: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", value))


class RemoteStatus(widgets.HBox):
    """One line for remote jobs: ``NDIF job 3f2a91c0 · RUNNING · 12.4 s``, the lifecycle so far, and Cancel.

    Call `update` with each `JobUpdate` (or hand `runner()` to the code that runs the job). Cancel sets the
    bound `CancelToken`: the wait stops within a fraction of a second; NDIF has no cancel request, so the job
    may still finish there and its result is discarded.
    """

    def __init__(self, cancel: CancelToken | None = None):
        self.line = widgets.HTML(value=self._render(None), layout=widgets.Layout(min_height="22px"))
        self.cancel_button = widgets.Button(
            description="Cancel job",
            icon="times",
            disabled=cancel is None,
            tooltip="Stop waiting for the NDIF job",
            layout=widgets.Layout(width="120px"),
        )
        self.cancel_button.on_click(lambda _: self.cancel())
        self.cancel_button.add_class("wb-remote-cancel")
        self.token = cancel
        self.last: JobUpdate | None = None
        super().__init__([self.line, self.cancel_button], layout=widgets.Layout(align_items="center"))
        self.add_class("wb-remote-status")

    @staticmethod
    def _render(update: JobUpdate | None) -> str:
        if update is None:
            return '<span class="wb-remote-line" style="color:#777">No remote job yet.</span>'
        colour = _STATE_COLOURS.get(update.state, "#444")
        reached = _STEPS.index(update.state) if update.state in _STEPS else -1
        if update.state in ("PROVISIONING", "DEPLOYING", "DISPATCHED"):
            reached = 1
        steps = " › ".join(
            f'<b style="color:{colour}">{s}</b>'
            if s == update.state
            else (s if i <= reached else f'<span style="color:#bbb">{s}</span>')
            for i, s in enumerate(_STEPS)
        )
        return (
            f'<span class="wb-remote-line wb-remote-{update.state.lower()}" style="color:{colour}">'
            f"{html.escape(update.text())}</span>"
            f'<span class="wb-remote-steps" style="margin-left:12px;font-size:11px">{steps}</span>'
        )

    def update(self, update: JobUpdate) -> None:
        """Show `update` (safe to call from the thread that waits for the job)."""
        if update.log and self.last is not None:
            update = JobUpdate(**{**update.__dict__, "state": self.last.state})
        self.last = update
        self.line.value = self._render(update)
        self.cancel_button.disabled = self.token is None or update.finished

    @property
    def text(self) -> str:
        """The line as plain text (for tests)."""
        return _plain_text(self.line.value)

    def bind(self, token: CancelToken) -> None:
        """Let the Cancel button set `token`."""
        self.token = token
        self.cancel_button.disabled = False

    def cancel(self) -> None:
        if self.token is not None:
            self.token.cancel()
            self.cancel_button.disabled = True

    def runner(self, cancel: CancelToken | None = None, **options) -> RemoteRunner:
        """A `RemoteRunner` reporting here, bound to this line's Cancel button (and `cancel`, if given);
        `options` go to `RemoteRunner` (timeout, max_result_mb, cache)."""
        token = cancel if cancel is not None else CancelToken()
        self.bind(token)
        return RemoteRunner(self.update, cancel=token, **options)


def tracked(compute: Callable[..., Any], runner: RemoteRunner | Callable[[CancelToken], RemoteRunner]):
    """Wrap a panel's ``compute(progress, cancel)`` so that its remote traces report to `runner`.

    `runner` may be a `RemoteRunner`, or a function of the panel's cancel token returning one (so the panel's
    Stop button also stops the wait): ``tracked(compute, lambda token: status.runner(token))``.
    """

    def wrapped(progress, cancel):
        active = runner(cancel) if callable(runner) and not isinstance(runner, RemoteRunner) else runner
        with active:
            return compute(progress, cancel)

    return wrapped


class ModelPicker(widgets.VBox):
    """Pick a model and where it runs: the models NDIF serves now (when reachable), or any hub id or local
    directory typed in.

    Args:
        value: the initial model name.
        remote: True (NDIF), False (this machine) or "local" (this machine, through nnsight's serialising dry
            run of the NDIF path).
        fetch: ask NDIF for its model list now (else press Refresh).
    """

    def __init__(self, value: str = "", *, remote: bool | str = True, fetch: bool = True):
        self.served = []
        self.name = widgets.Combobox(
            value=value,
            options=[],
            ensure_option=False,
            placeholder="hub id, e.g. openai-community/gpt2",
            description="Model",
            layout=widgets.Layout(width="420px"),
        )
        self.name.add_class("wb-model-name")
        self.where = widgets.ToggleButtons(
            options=[("NDIF", True), ("This machine", False), ("Dry run", "local")],
            value=remote,
            description="Run on",
            tooltips=["on NDIF's GPUs", "here", "here, serialised exactly as for NDIF"],
        )
        self.where.add_class("wb-model-where")
        self.refresh_button = widgets.Button(
            description="Refresh", icon="refresh", layout=widgets.Layout(width="100px")
        )
        self.refresh_button.on_click(lambda _: self.refresh())
        self.info = widgets.HTML()
        super().__init__([widgets.HBox([self.name, self.refresh_button]), self.where, self.info])
        self.add_class("wb-model-picker")
        if fetch:
            self.refresh()
        else:
            self._say(str(settings()), "#444")

    def _say(self, text: str, colour: str) -> None:
        self.info.value = f'<span class="wb-model-info" style="color:{colour}">{html.escape(text)}</span>'

    @property
    def info_text(self) -> str:
        return _plain_text(self.info.value)

    def refresh(self) -> None:
        """Ask NDIF which models it serves; the list becomes the name box's suggestions."""
        config = settings()
        try:
            self.served = served_models(text_generation_only=True)
        except RemoteError as err:
            self.served = []
            self._say(str(err), "#c62828")
            return
        self.name.options = [m.repo_id for m in self.served]
        ready = sum(m.ready for m in self.served)
        text = f"NDIF serves {len(self.served)} text-generation models ({ready} running) at {config.host}."
        if not config.has_key:
            text += " No API key is configured: set NDIF_API_KEY or run `nnsight login` before running jobs."
        self._say(text, "#1a7f37" if config.has_key else "#8a6d00")

    @property
    def value(self) -> str:
        return self.name.value.strip()

    @property
    def remote(self) -> bool | str:
        return self.where.value

    def code(self) -> str:
        return f"model = load_model({self.value!r}, remote={self.remote!r})"

    def load(self, **kwargs):
        """``load_model(value, remote=remote, **kwargs)``; for NDIF nothing is downloaded but the config and
        tokenizer."""
        if not self.value:
            raise InputError("Type or pick a model name first.")
        return load_model(self.value, remote=self.remote, **kwargs)
