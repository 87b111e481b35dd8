"""Every notebook in notebooks/ runs top to bottom, with the small parameters it declares for CI.

Convention: a notebook's cell tagged ``parameters`` holds its knobs with full-size defaults. The notebook's
metadata ``{"workbench": {"ci_parameters": {"NAME": value, ...}}}`` lists the small values used here; they are
injected as a cell right after the parameters cell (as papermill does). Committed notebooks carry no outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if not p.name.startswith("_"))
# what a newcomer opens first (README, Binder): it must run clean, without a warning to puzzle over
ENTRY_POINTS = {"00_quickstart.ipynb", "dashboard.ipynb"}


def _inject_ci_parameters(nb) -> None:
    params = nb.metadata.get("workbench", {}).get("ci_parameters", {})
    if not params:
        return
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if idx is None:
        raise AssertionError("notebook declares ci_parameters but has no cell tagged 'parameters'")
    source = "# injected by tests/test_notebooks.py: small CI parameters\n" + "\n".join(
        f"{name} = {value!r}" for name, value in params.items()
    )
    nb.cells.insert(idx + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, shared_data):
    nb = nbformat.read(path, as_version=4)
    _inject_ci_parameters(nb)
    env_before = dict(os.environ)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = shared_data
    if data is not None and (data / "casper").is_dir():  # the Casper tutorials read the challenge files here
        os.environ.setdefault("WORKBENCH_CASPER_DIR", str(data / "casper"))
    if data is not None and (data / "lib").is_dir():  # the LIB tutorial reads the authors' checkpoints here
        os.environ.setdefault("WORKBENCH_LIB_DIR", str(data / "lib"))
    if path.name in ENTRY_POINTS:
        nb.cells.append(nbformat.v4.new_code_cell(PANEL_WARNINGS))
    try:
        client = NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    if path.name in ENTRY_POINTS:
        printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("output_type") == "stream")
        assert int(printed.split(" panels")[0]) >= 3, (
            f"{path.name}: expected its three panels, got {printed!r}"
        )
        assert not _warnings(nb), f"{path.name} shows warnings: {_warnings(nb)}"


# appended to the entry points: wait for every panel's run, then print what its warning lines show
PANEL_WARNINGS = """
import ipywidgets as _w
from workbench.widgets.base import Panel as _Panel

def _html(widget):
    if isinstance(widget, _w.HTML):
        yield widget.value
    for child in getattr(widget, "children", ()):
        yield from _html(child)

_panels = {id(v): v for v in [*globals().values(), *Out.values()] if isinstance(v, _Panel)}
for _p in _panels.values():
    _p.wait(600)
print(len(_panels), "panels")
for _p in _panels.values():
    for _text in _html(_p):
        if "⚠" in _text:
            print("PANEL WARNING", type(_p).__name__, _text)
"""


def _warnings(nb) -> list[str]:
    """Warnings the run printed (stderr) or a panel shows (its warning lines, marked ⚠)."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") != "stream":
                continue
            if out.get("name") == "stderr":
                found.append(out["text"])
            found += [line for line in out["text"].splitlines() if line.startswith("PANEL WARNING")]
    return found
