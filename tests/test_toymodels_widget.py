"""`ToyModelExplorer` driven from Python: train with a live loss curve, baselines, the σ sweep with click-to-load,
the transplant, the mechanism views, errors in the status line, and `.code()` reproducing the last run."""

from __future__ import annotations

import torch
from plotly.callbacks import InputDeviceState, Points

from workbench.toymodels import ToyConfig, clear_cache
from workbench.widgets.toymodels import BASELINES, MECH_VIEWS, ToyModelExplorer

torch.set_num_threads(1)
SMALL = ToyConfig(n_features=20, d_mlp=10, p=0.05, mixing="symmetric", sigma=0.05, steps=150)


def panel_for(config: ToyConfig = SMALL) -> ToyModelExplorer:
    panel = ToyModelExplorer(config, eval_points=4, n_samples=4000, n_workers=1, sweep_sigmas=(0.0, 0.05))
    panel.background = False
    return panel


def click(trace, i: int) -> None:
    trace._dispatch_on_click(Points(point_inds=[i], xs=[trace.x[i]], ys=[trace.y[i]]), InputDeviceState())


def roles(fig) -> list[str]:
    return [t.meta.get("role") for t in fig.data if isinstance(t.meta, dict)]


def test_train_draws_live_curve_then_results():
    panel = panel_for()
    frames = []
    original = panel._on_partial

    def spy(part):
        original(part)
        frames.append(part.step)

    panel._on_partial = spy
    panel.run_button.click()
    assert panel.status_text.startswith("Done"), panel.status_text
    assert frames and frames[-1] == SMALL.steps  # the live curve saw the whole run
    assert panel.current is not None and panel.current.cfg == SMALL
    assert panel.config() == SMALL
    assert "curve" in roles(panel.p_figure) and "own" in roles(panel.p_figure)
    assert [r for r in roles(panel.figure) if r != "naive"] == ["training"]  # the finished model's curve
    assert "cos" in roles(panel.mech_figure)
    # every mechanism view draws
    for view in MECH_VIEWS:
        panel.mech_box.value = view
        assert len(panel.mech_figure.data) > 0
    # a click on a feature's curve highlights it
    panel.mech_box.value = "feature curves"
    trace = next(
        t for t in panel.mech_figure.data if t.meta.get("role") == "feature" and t.meta["feature"] == 3
    )
    click(trace, 0)
    assert panel.highlight == 3 and "Feature 3" in panel.status_text


def test_baselines_and_click_to_load():
    panel = panel_for()
    panel.run_button.click()
    for name in BASELINES:
        panel.baseline_box.value = name
        panel.baseline_button.click()
        assert panel.status_text.startswith("Done"), panel.status_text
    kinds = [m.kind for m in panel.models]
    assert kinds == ["trained", "naive", "naive+offset", "semi-NMF", "semi-NMF"]
    assert panel.curves.loss.shape == (5, 4)
    # clicking the naive curve loads it into the mechanism views
    trace = next(t for t in panel.p_figure.data if t.meta.get("role") == "curve" and t.meta["model"] == 1)
    click(trace, 0)
    assert panel.current.kind == "naive"
    # adding the same baseline again replaces it instead of duplicating it
    panel.baseline_box.value = "naive"
    panel.baseline_button.click()
    assert [m.kind for m in panel.models].count("naive") == 1


def test_sweep_click_loads_that_model_and_transplant():
    panel = panel_for()
    panel.sweep_kinds.value = ("symmetric",)
    panel.sweep_button.click()
    assert panel.status_text.startswith("Done"), panel.status_text
    assert panel.sweep.loss.shape == (1, 2)
    trace = next(t for t in panel.sigma_figure.data if t.meta.get("role") == "sweep")
    click(trace, 1)
    assert panel.current.cfg.sigma == 0.05 and panel.current.cfg.mixing == "symmetric"
    assert torch.equal(panel.current.W_in, panel.sweep.W_in[0, 1])
    assert "selected" in roles(panel.sigma_figure)
    panel.transplant_button.click()
    assert panel.status_text.startswith("Done"), panel.status_text
    assert panel.transplanted is not None
    assert {"phase1", "phase2", "evaluated"} <= set(roles(panel.figure))
    assert panel.models[-1].kind == "transplanted"


def test_errors_keep_the_last_result():
    panel = panel_for()
    panel.run_button.click()
    good = panel.current
    panel.transplant_button.click()  # fine: trained with mixing
    panel.mixing_box.value = "M = 0 (clean labels)"
    panel.load(panel.models[0])
    panel.sweep_box.value = "0, x"
    panel.sweep_button.click()
    assert "numbers separated by commas" in panel.status_text
    panel.n_box.value, panel.d_box.value = 5, 50
    panel.run_button.click()
    assert "far wider than n_features" in panel.status_text
    assert panel.current is good or panel.current.key == good.key
    fresh = panel_for(ToyConfig(n_features=20, d_mlp=10, steps=20))
    fresh.transplant_button.click()
    assert "Load a simplified model trained with mixing" in fresh.status_text


def test_code_reproduces_the_last_run_in_a_fresh_namespace():
    panel = panel_for()
    panel.run_button.click()
    panel.baseline_box.value = "naive + best offset"
    panel.baseline_button.click()
    text = panel.code()
    assert "offset_model(" in text and "train(ToyConfig(" in text
    clear_cache()  # nothing cached: the code trains again
    namespace: dict = {}
    exec(text, namespace)
    curves = namespace["curves"]
    assert torch.equal(curves.loss, panel.curves.loss)
    assert curves.labels == panel.curves.labels
    # the transplant's code too: the same fine-tuned weights and numbers
    panel.transplant_button.click()
    text = panel.code()
    assert "transplant(model, steps=150" in text and "finetune(" in text
    clear_cache()
    namespace = {}
    exec(text, namespace)
    assert namespace["tr"].clean_after == panel.transplanted.clean_after
    assert torch.equal(namespace["tr"].W_in_after, panel.transplanted.W_in_after)
    assert torch.equal(namespace["curves"].loss, panel.curves.loss)
    # the sweep's code too
    panel.sweep_kinds.value = ("asymmetric",)
    panel.sweep_button.click()
    text = panel.code()
    assert text.splitlines()[-1] == "sweep.plot()"
    clear_cache()
    namespace = {}
    exec(text, namespace)
    assert torch.equal(namespace["sweep"].loss, panel.sweep.loss)
