"""**Show code** runs on its own: for every panel and view, the printed code of the last successful run, executed
in a fresh kernel with nothing defined before it, computes the same numbers as the panel (demo model, tiny
inputs)."""

from __future__ import annotations

import ast
import warnings

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from workbench.models import load_model
from workbench.tasks import demo_corpus, ioi_pairs
from workbench.widgets.lnfree import LNRemovalPreview
from workbench.widgets.patching import PatchingExplorer
from workbench.widgets.plateau import PlateauProbe

pytestmark = pytest.mark.slow  # two runs of every engine on the demo model, one of them in a new kernel


@pytest.fixture(scope="module")
def model():
    return load_model("demo")


def quiet(panel):
    panel.background = False
    return panel


@pytest.fixture(scope="module")
def views(model):
    """{view: (code, {name: expected tensor})}: each panel in each of its views after a successful run."""
    out = {}
    pairs = ioi_pairs(2, templates=0)
    explorer = quiet(PatchingExplorer(model, list(pairs.clean), list(pairs.corrupt), list(pairs.answers)))
    explorer.run()
    explorer.pair_box.value = 1
    out["patching grid, pair 1"] = (explorer.code(), {"result.raw": explorer.grid.raw})
    explorer.drill(model.cfg.n_layers - 1, len(explorer.grid.positions) - 1)
    out["patching drill-down"] = (
        explorer.code(),
        {"result.raw": explorer.grid.raw, "heads.raw": explorer.heads.raw},
    )
    explorer.site_box.value = "z"
    explorer.normalize_box.value = False
    explorer.run()
    out["patching per head"] = (explorer.code(), {"result.raw": explorer.grid.raw})

    ln = quiet(LNRemovalPreview(model, demo_corpus("validation", 4), n_rows=2, seq_len=24))
    ln.run()
    out["layernorm preview"] = (ln.code(), {"result.single_loss": ln.preview.single_loss})
    ln.preset.value = 3
    out["layernorm three norms frozen"] = (
        ln.code(),
        {"result.single_loss": ln.preview.single_loss, "frozen.mean": torch.tensor(ln.selection_loss)},
    )

    prompt = pairs.clean[0]
    g = torch.Generator().manual_seed(0)
    mine = {"mine": torch.randn(2, model.cfg.d_model, generator=g)}
    probe = quiet(PlateauProbe(model, prompt, reference_data=demo_corpus("validation", 8), directions=mine))
    probe.n_directions_box.value = 2
    probe.n_sizes_box.value = 3
    probe.families_box.value = ("isotropic", "cov_random", "mine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe.run()
    out["plateau curves"] = (probe.code(), {"result.kl": probe.plateau.kl})
    probe.view_box.value = "Plateau lengths"
    out["plateau lengths"] = (probe.code(), {"result.kl": probe.plateau.kl})
    probe.view_box.value = "Interpolation"
    probe.prompt_b_box.value = pairs.corrupt[1]
    probe.run()
    out["plateau interpolation"] = (probe.code(), {"result.distance": probe.interpolation.distance})
    return out


def test_every_view_prints_valid_code_that_defines_its_data(views):
    for name, (code, _) in views.items():
        ast.parse(code)
        assert "load_model('demo')" in code, name
        assert "# not run yet" not in code, name
    assert "tokens = demo_corpus('validation', 4)" in views["layernorm preview"][0]
    assert "corpus = demo_corpus('validation', 8)" in views["plateau curves"][0]
    assert (
        "directions = {" in views["plateau curves"][0]
        and "'mine': torch.tensor(" in views["plateau curves"][0]
    )


def test_printed_code_reproduces_each_view_in_a_fresh_kernel(views, tmp_path):
    nb = nbformat.v4.new_notebook()
    for i, (code, expected) in enumerate(views.values()):
        saved = ", ".join(f"{key!r}: torch.as_tensor({key})" for key in expected)
        nb.cells.append(nbformat.v4.new_code_cell(code))
        nb.cells.append(
            nbformat.v4.new_code_cell(f"import torch\ntorch.save({{{saved}}}, {str(tmp_path / f'{i}.pt')!r})")
        )
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    for i, (name, (_, expected)) in enumerate(views.items()):
        got = torch.load(tmp_path / f"{i}.pt")
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value.to(got[key].dtype), msg=f"{name}: {key}")
