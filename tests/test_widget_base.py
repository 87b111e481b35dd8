"""The shared panel machinery: results are kept across failures, errors read as sentences, runs can stop."""

from __future__ import annotations

import threading

import plotly.graph_objects as go
import pytest

from workbench.errors import InputError
from workbench.runner import run_chunked
from workbench.widgets.base import Panel, replace_figure


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

        return run_chunked(10, chunk, chunk=1, progress=progress, cancel=cancel)

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


def test_replace_figure():
    fw = go.FigureWidget(go.Figure(go.Bar(y=[1, 2])))
    replace_figure(fw, go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]), layout={"title": {"text": "new"}}))
    assert fw.data[0].type == "heatmap" and fw.layout.title.text == "new"
