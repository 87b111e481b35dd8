"""The PatchingExplorer panel: controls -> sweep -> heatmap, click to drill into heads, redraw without rerunning,
errors in the status line with the last picture kept, and `.code()` that reproduces the view."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from plotly.callbacks import Points

import workbench.widgets.patching as panel_module
from workbench.models.toy import random_model
from workbench.patching import Metric, sweep
from workbench.widgets.patching import PatchingExplorer, parse_answers

# random weights answer nothing: their small baseline gaps are warned about (see test_patching.py)
pytestmark = [
    pytest.mark.filterwarnings("ignore:The clean and corrupt logit differences:UserWarning"),
    pytest.mark.filterwarnings("ignore:For pair.*opposite sign:UserWarning"),
]

CLEAN = [
    "When Mary and John went to the store , John gave a drink to",
    "When Tom and Anna went to the park , Anna gave a book to",
]
CORRUPT = [
    "When Mary and John went to the store , Mary gave a drink to",
    "When Tom and Anna went to the park , Tom gave a book to",
]
ANSWERS = [(" Mary", " John"), (" Tom", " Anna")]


@pytest.fixture(scope="module")
def model():
    return random_model("gpt2", seed=1)


@pytest.fixture
def explorer(model):
    panel = PatchingExplorer(model, CLEAN, CORRUPT, ANSWERS)
    panel.background = False
    return panel


def click(figure, row, col):
    trace = figure.data[0]
    callback = trace._click_callbacks[-1]
    callback(trace, Points(point_inds=[[row, col]], xs=[None], ys=[None], trace_name="", trace_index=0), None)


def test_run_draws_the_layer_position_heatmap(explorer, model):
    assert explorer.clean_box.value == "\n".join(CLEAN)
    assert explorer.answers_box.value == "' Mary', ' John'\n' Tom', ' Anna'"
    explorer.run_button.click()
    assert explorer.status_text.startswith("Done"), explorer.status_text
    trace = explorer.figure.data[0]
    assert trace.type == "heatmap" and list(trace.y) == ["L0", "L1"]
    assert trace.x[10] == "10:John/Mary" and "value: %{z:.6g}" in trace.hovertemplate
    expected = sweep(model, CLEAN, CORRUPT, ANSWERS, progress=False).values()[0]
    assert torch.allclose(torch.tensor(trace.z), expected, atol=1e-6)
    assert explorer.pair_box.options[-1] == ("pair 1", 1)
    assert {"wb-patching-figure"} <= set(explorer.figure._dom_classes)
    assert "wb-patching-run" in explorer.run_button._dom_classes


def test_baseline_warnings_show_in_the_panel_only(explorer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explorer.run()
    shown = explorer.warning_line.value
    assert explorer.grid.warnings and all(w.split(":")[0] in shown for w in explorer.grid.warnings)
    assert not [w for w in caught if "logit" in str(w.message)], (
        "a warning the panel shows must not be repeated"
    )


def test_switching_metric_normalisation_and_pair_redraws_without_running(explorer, monkeypatch):
    explorer.run()
    grid = explorer.grid
    monkeypatch.setattr(panel_module, "sweep", lambda *a, **k: pytest.fail("the model must not run again"))
    explorer.metric_box.value = "logprob"
    assert torch.allclose(torch.tensor(explorer.figure.data[0].z), grid.values("logprob")[0], atol=1e-6)
    explorer.normalize_box.value = False
    trace = explorer.figure.data[0]
    assert torch.allclose(torch.tensor(trace.z), grid.values("logprob", normalize=False)[0], atol=1e-6)
    assert trace.zmid == pytest.approx(grid.corrupt[1].mean().item())
    explorer.pair_box.value = 1
    per_pair = grid.values("logprob", normalize=False, per_pair=True)[1, 0]
    assert torch.allclose(torch.tensor(explorer.figure.data[0].z), per_pair, atol=1e-6)
    assert "pair 1" in explorer.figure.layout.title.text
    assert explorer.grid is grid
    # redraws update the heatmap in place: a click still runs one drill-down, not one per redraw
    assert [len(t._click_callbacks) for t in explorer.figure.data] == [1]


def test_click_drills_into_heads_at_that_cell(explorer, model):
    explorer.run()
    click(explorer.figure, 1, 14)  # layer 1, last position
    assert explorer.status_text.startswith("Done"), explorer.status_text
    heads = explorer.heads
    assert heads.sites == ("z", "pattern") and heads.layers == (1,) and heads.positions == ((14,),)
    assert len(explorer.heads_figure.data) == 2 and list(explorer.heads_figure.data[0].x) == [
        "H0",
        "H1",
        "H2",
        "H3",
    ]
    assert "layer 1, 14:to" in explorer.heads_figure.layout.title.text
    assert explorer.heads_box.layout.display == ""
    expected = sweep(
        model, CLEAN, CORRUPT, ANSWERS, site=["z", "pattern"], layers=[1], positions=[14], progress=False
    )
    torch.testing.assert_close(heads.raw, expected.raw)
    # metric switches redraw the drill-down too
    explorer.metric_box.value = "prob"
    shown = torch.tensor(explorer.heads_figure.data[0].z)[0]
    torch.testing.assert_close(shown.float(), expected.values("prob")[0, 0, 0], atol=1e-6, rtol=0)
    code = explorer.code()
    assert "heads = sweep(" in code and "site=['z', 'pattern']," in code
    assert "layers=[1]," in code and "positions=[[14]]," in code
    # the drill-down shares the main map's colour scale, and says how strong its own largest effect is
    main, drill = explorer.figure.data[0], explorer.heads_figure.data[0]
    assert drill.zmax - drill.zmid == pytest.approx(main.zmax - main.zmid)
    assert "largest effect here" in explorer.heads_figure.layout.title.text


def test_per_head_view_and_its_drill_down(explorer):
    explorer.site_box.value = "z"
    explorer.direction_box.value = "noising"
    explorer.run()
    grid = explorer.grid
    assert grid.direction == "noising" and grid.position_labels == ("all",)
    trace = explorer.figure.data[0]
    assert list(trace.x) == ["H0", "H1", "H2", "H3"] and trace.zmid == 1.0
    click(explorer.figure, 0, 3)  # layer 0, head 3
    assert (
        explorer.heads.heads == (3,) and explorer.heads.layers == (0,) and len(explorer.heads.positions) == 15
    )
    assert "noising" in explorer.direction_help.value.lower()


def test_errors_show_in_the_status_line_and_keep_the_picture(explorer):
    explorer.run()
    before = explorer.grid
    z_before = explorer.figure.data[0].z
    explorer.corrupt_box.value = CORRUPT[0] + "\n" + CORRUPT[1].replace("Tom gave", "Tom Tom gave")
    explorer.run()
    assert "Pair 1: the clean prompt has 15 tokens and the corrupt prompt 16" in explorer.status_text
    assert explorer.grid is before and (explorer.figure.data[0].z == z_before).all()
    explorer.corrupt_box.value = "\n".join(CORRUPT)
    explorer.answers_box.value = "Mary John"
    explorer.run()
    assert "Answers line 1" in explorer.status_text and explorer.grid is before
    explorer.answers_box.value = "' Mary', ' Mary John'"
    explorer.run()
    assert "single token" in explorer.status_text
    # a view that cannot be drawn (equal baselines: normalisation undefined) says why, in the status line and
    # in place of the figure: no older heatmap stays under the message
    explorer.grid = dataclasses.replace(before, corrupt=before.clean.clone())
    explorer.redraw()
    assert "Cannot normalise logit_diff" in explorer.status_text
    assert not explorer.figure.data and "Cannot normalise" in explorer.figure.layout.annotations[0].text
    explorer.normalize_box.value = False
    assert explorer.status_text.startswith("Showing") and explorer.figure.data[0].type == "heatmap"


def test_a_run_that_cannot_be_drawn_does_not_report_done(explorer, monkeypatch):
    explorer.run()
    good = explorer.grid
    same = dataclasses.replace(good, corrupt=good.clean.clone())  # a metric that does not move
    monkeypatch.setattr(panel_module, "sweep", lambda *a, **k: same)
    explorer.run()
    assert explorer.grid is same and "Cannot normalise" in explorer.status_text
    assert not explorer.status_text.startswith("Done") and not explorer.figure.data


def run_code(code: str, model, monkeypatch) -> dict:
    monkeypatch.setattr("workbench.models.load_model", lambda name: model)
    namespace = {}
    exec(code, namespace)
    return namespace


def test_code_follows_the_last_successful_run(explorer, model, monkeypatch):
    assert explorer.code().startswith("# not run yet")
    explorer.direction_box.value = "noising"
    explorer.metric_box.value = "logprob"
    explorer.run()
    code = explorer.code()
    torch.testing.assert_close(run_code(code, model, monkeypatch)["result"].raw, explorer.grid.raw)
    assert "direction='noising'," in code and "result.plot(metric='logprob', normalize=True)" in code
    # a drill-down shows in the code; a new run drops it; a failed run changes nothing
    click(explorer.figure, 1, 14)
    assert "heads = sweep(" in explorer.code()
    explorer.corrupt_box.value = "\n".join(reversed(CORRUPT))
    explorer.code_button.value = True  # shown: reprinted after each run
    explorer.run()
    shown = explorer.code_view.value
    assert (
        "heads = sweep(" not in explorer.code() and "Tom gave a book to" in shown.split("corrupt = ")[1][:200]
    )
    explorer.clean_box.value = "one two"
    explorer.run()
    assert "corrupt prompt" in explorer.status_text and explorer.code_view.value == shown
    explorer.clean_box.value = "\n".join(CLEAN)
    explorer.direction_box.value = "denoising"  # takes effect on Run: the panel says so
    assert explorer.status_text.startswith("Press Run")


def test_pair_view_labels_positions_with_that_pairs_tokens(explorer):
    explorer.run()
    explorer.pair_box.value = 1
    x = list(explorer.figure.data[0].x)
    assert x[2] == "2:Tom" and x[4] == "4:Anna" and x[10] == "10:Anna/Tom", x
    explorer.pair_box.value = -1
    assert list(explorer.figure.data[0].x)[2] == "2:Mary"


def test_constructor_checks_like_the_engine(model):
    from workbench.errors import InputError, SiteError

    with pytest.raises(SiteError, match="Cannot patch site 'resid'. Patchable sites: resid_pre"):
        PatchingExplorer(model, CLEAN, CORRUPT, ANSWERS, site="resid")
    with pytest.raises(InputError, match="direction='sideways'"):
        PatchingExplorer(model, CLEAN, CORRUPT, ANSWERS, direction="sideways")
    with pytest.raises(
        InputError, match="metric='accuracy' is not available here; choose one of 'logit_diff'"
    ):
        PatchingExplorer(model, CLEAN, CORRUPT, ANSWERS, metric="accuracy")
    panel = PatchingExplorer(model, CLEAN, CORRUPT, ANSWERS, site="block", direction="noise")
    assert panel.site_box.value == "block" and panel.direction_box.value == "noising"
    # every line of the text boxes shows; labels start with the site name
    assert panel.clean_box.rows == 2 and panel.answers_box.rows == 2
    panel.answers_box.value = "\n".join(["' Mary', ' John'"] * 4)
    assert panel.answers_box.rows == 4
    assert all(label.startswith(value) for label, value in panel.site_box.options)


def test_user_metric_in_the_dropdown(model):
    top = Metric("answer_logit", lambda logits, answers: logits.gather(-1, answers[:, :1])[:, 0])
    panel = PatchingExplorer(model, CLEAN[0], CORRUPT[0], ANSWERS[0], metric=top)
    panel.background = False
    assert panel.answers_box.value == "' Mary', ' John'"
    panel.run()
    assert panel.grid.metric == "answer_logit" and panel.metric_box.value == "answer_logit"
    assert "# answer_logit: the Metric" in panel.code() and "metric=answer_logit," in panel.code()


def test_parse_answers():
    assert parse_answers("' Mary', ' John'\n\n' Tom', \" Anna\"") == [(" Mary", " John"), (" Tom", " Anna")]
    with pytest.raises(Exception, match="Give the answers"):
        parse_answers("   ")


def test_remote_models_get_a_job_status_line(model, tmp_path):
    from workbench.models import load_model
    from workbench.widgets.remote import RemoteStatus

    model.module.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    remote = load_model(str(tmp_path), remote=True)  # nothing runs here: only the panel is built
    panel = PatchingExplorer(remote, CLEAN[0], CORRUPT[0], ANSWERS[0])
    assert isinstance(panel.remote_status, RemoteStatus) and panel.remote_status in panel.children
    local = PatchingExplorer(model, CLEAN[0], CORRUPT[0], ANSWERS[0])
    assert local.remote_status is None


def test_the_heatmap_fills_in_layer_by_layer_and_stop_keeps_the_finished_layers(explorer, monkeypatch):
    drawn = []
    show = explorer._show_grid

    def spy(result):
        drawn.append(result)
        show(result)
        if len(drawn) == 1:
            explorer.cancel()  # Stop once the first layer is on the page

    monkeypatch.setattr(explorer, "_show_grid", spy)
    explorer.run()
    assert len(drawn) == 2 and explorer.result is drawn[-1]  # the partial picture, then the kept result
    assert explorer.status_text.startswith("Stopped: Partial: 1 of 2 (site, layer) rows"), (
        explorer.status_text
    )
    values = explorer.result.values()
    assert torch.isfinite(values[:, 0]).all() and torch.isnan(values[:, 1]).all()  # [site, layer, position]
    z = explorer.figure.data[0].z
    empty = [v is None or v != v for row in z for v in row]  # None or NaN: a blank cell
    assert not any(empty[: len(z[0])]) and all(empty[len(z[0]) :])


def test_a_finished_sweep_replaces_its_partial_picture(explorer, model, monkeypatch):
    drawn = []
    show = explorer._show_grid
    monkeypatch.setattr(explorer, "_show_grid", lambda r: (drawn.append(r), show(r)))
    explorer.run()
    assert len(drawn) == 2 and drawn[0].warnings[0].startswith("Partial: 1 of 2")
    assert explorer.status_text.startswith("Done"), explorer.status_text
    assert not any(w.startswith("Partial") for w in explorer.result.warnings)
    expected = sweep(model, CLEAN, CORRUPT, answers=ANSWERS, progress=False, warn=False)
    torch.testing.assert_close(explorer.result.values(), expected.values(), equal_nan=True)


def test_the_status_line_states_the_cost_before_the_run(explorer, model):
    n_pos = model.to_tokens(CLEAN[0]).shape[-1]
    kwargs = explorer._sweep_kwargs()
    assert (
        explorer._cost(kwargs) == f"(2 pair(s) x {n_pos} position(s) x 2 layers = {4 * n_pos:,} patched runs)"
    )
    kwargs.update(site="z", positions="together")
    heads = model.cfg.n_heads
    assert (
        explorer._cost(kwargs)
        == f"(2 pair(s) x 1 position(s) x 2 layers x {heads} heads = {4 * heads:,} patched runs)"
    )
