"""`LNRemovalPreview` driven from Python: run, choose norms (per site, per kind, paper-order preset), the loss of
the chosen set, the figure, `.code()` reproducing the widget's numbers, and errors in the status line."""

from __future__ import annotations

import pytest
import torch

from workbench.lnfree import evaluate_loss, paper_prefix
from workbench.models.toy import random_model
from workbench.widgets.lnfree import ESTIMATORS, LNRemovalPreview

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model():
    return random_model("gpt2", "tiny", seed=11)


@pytest.fixture(scope="module")
def tokens(model):
    gen = torch.Generator().manual_seed(1)
    toks = torch.randint(2, model.cfg.d_vocab, (4, 12), generator=gen)
    toks[:, 0] = 0
    return toks


@pytest.fixture(scope="module")
def panel(model, tokens):
    p = LNRemovalPreview(model, tokens, n_rows=None)
    p.background = False
    p.run_button.click()
    return p


def test_run_draws_the_preview(panel, model):
    assert panel.preview is not None and panel.status_text.startswith("Done")
    names = {t.name for t in panel.figure.data}
    assert {"MLP", "attn q/k", "attn v", "final", "position 0", "frozen scale"} <= names
    assert panel.figure.layout.title.text.startswith(model.name)
    assert panel.preset.max == 3 * model.cfg.n_layers + 1
    assert "wb-lnfree-figure" in panel.figure._dom_classes and "wb-lnfree-sites" in panel.sites._dom_classes


def test_choosing_norms_measures_their_loss_together(panel, model, tokens):
    panel.select(["mlp.1", "final"])
    assert panel.selected == ["mlp.1", "final"]
    expected = evaluate_loss(
        model, tokens, freeze=["mlp.1", "final"], scales=panel.preview.scales, progress=False
    )
    assert panel.selection_loss == pytest.approx(expected.mean, rel=1e-6)
    assert f"{expected.mean:.4f}" in panel.figure.layout.title.text
    mlp = next(t for t in panel.figure.data if t.name == "MLP")
    assert list(mlp.marker.opacity) == [0.3, 1.0]
    assert panel.preset.value == 0  # not a prefix of the paper's order
    boxes = {t.name: t.marker.color for t in panel.figure.data if t.type == "box"}
    assert boxes["ln2.1"] == boxes["ln_final"] != boxes["ln2.0"]  # the chosen norms' distributions stand out


def test_preset_and_kind_buttons(panel, model):
    panel.preset.value = 3
    assert panel.selected == paper_prefix(3, model.cfg.n_layers)
    star = [t for t in panel.figure.data if t.type == "scatter" and t.marker.symbol == "star"]
    assert star and star[0].x == (3,)
    panel.clear_button.click()
    assert panel.selected == [] and panel.selection_loss is None and panel.preset.value == 0
    panel.kind_buttons["v"].click()
    assert panel.selected == ["v.0", "v.1"]
    panel.kind_buttons["v"].click()  # again: off
    assert panel.selected == []
    panel.kind_buttons["mlp"].click()
    assert panel.selected == ["mlp.0", "mlp.1"] and panel.preset.value == 2  # a prefix: the slider follows


def test_code_reproduces_the_widgets_numbers(panel, model, tokens, monkeypatch):
    panel.preset.value = 4
    monkeypatch.setattr("workbench.models.load_model", lambda name: model)
    code = panel.code()
    assert "tokens = torch.tensor(" in code  # the data is written out: the code runs on its own
    namespace = {}
    exec(code, namespace)
    assert namespace["frozen"].mean == pytest.approx(panel.selection_loss, rel=1e-6)
    assert torch.allclose(namespace["result"].single_loss, panel.preview.single_loss)
    # the estimator takes effect on Run: until then the code is the last run's
    panel.estimator.value = list(ESTIMATORS)[1]
    assert "press Run" in panel.status_text and "exclude_first" not in panel.code()
    panel.run()
    assert "exclude_first=True" in panel.code()
    panel.estimator.value = list(ESTIMATORS)[0]
    panel.run()


def test_one_norm_reads_in_the_singular(panel):
    panel.select(["final"])
    assert "1 norm frozen: loss" in panel.figure.layout.title.text


def test_demo_corpus_is_written_as_its_call(model):
    from workbench.tasks import demo_corpus

    docs = demo_corpus("validation", 3)
    p = LNRemovalPreview(model, docs, n_rows=2)
    assert "tokens = demo_corpus('validation', 3)" in p.code()
    assert p.code().startswith("# not run yet")
    other = LNRemovalPreview(model, ["a made-up document"], n_rows=1)
    assert "tokens = ['a made-up document']" in other.code()


def test_constructor_checks_its_arguments(model, tokens):
    from workbench.errors import InputError

    with pytest.raises(InputError, match="n_rows=0: give a positive whole number"):
        LNRemovalPreview(model, tokens, n_rows=0)
    with pytest.raises(InputError, match="data_var='my tokens'"):
        LNRemovalPreview(model, tokens, data_var="my tokens")


def test_errors_show_in_the_status_line(model):
    bad = LNRemovalPreview(model, torch.full((2, 5), 10_000))
    bad.background = False
    bad.sites.value = ("mlp.0",)
    assert "Press Run first" in bad.status_text
    bad.run()
    assert "Token ids must lie" in bad.status_text and bad.preview is None
    bad.select(["mlp.9"])
    assert "out of range" in bad.status_text
