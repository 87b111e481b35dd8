"""SyntheticActivationProbe and the SAE figures, driven in Python on a tiny model (no browser)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from plotly.callbacks import InputDeviceState, Points

from workbench.errors import InputError
from workbench.models.toy import random_model
from workbench.sae import load_sae, save_sae, train_sae
from workbench.viz import sae as viz
from workbench.widgets.sae import SyntheticActivationProbe


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = random_model("gpt2", "tiny", seed=3)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, model.cfg.d_vocab, (40, 10), generator=gen)
    rows[:, 0] = 0
    sae = train_sae(model, rows, steps=30, batch_size=128, buffer_tokens=2048, expansion=4, l1_coefficient=0.3,
                    progress=False)  # fmt: skip
    from workbench.sae import activations as acts

    freq = (sae.encode(acts.stream(model, rows, "resid_pre", 1)) > 0).float().mean(0)
    path = tmp_path_factory.mktemp("sae")
    save_sae(sae.with_frequency(freq), path)
    return model, load_sae(path), rows


def panel_for(setup, **kw) -> SyntheticActivationProbe:
    model, sae, rows = setup
    panel = SyntheticActivationProbe(model, sae, rows[:10, :8], reference=rows, n_steps=6, **kw)
    panel.background = False
    return panel


def test_panel_runs_redraws_and_clicks(setup):
    panel = panel_for(setup)
    with pytest.raises(InputError, match="Run first"):
        panel.code()
    panel.run()
    assert panel.status_text.startswith("Done"), panel.status_text
    res = panel.synthetic
    assert res.test == "blowup" and res.l2.shape == (4, 10, 6)
    curves = [t for t in panel.figure.data if (t.meta or {}).get("role") == "curve"]
    assert len(curves) == 4 * 10
    # click the third curve of the structured family: its latents beside its twin's
    trace = next(t for t in curves if t.meta["family"] == "synthetic_structured" and t.meta["sample"] == 2)
    panel._on_click(trace, Points(point_inds=[1], xs=[1], ys=[0], trace_name=trace.name, trace_index=0),
                    InputDeviceState(False, False, False, False, 0, 0))  # fmt: skip
    assert panel.sample_box.layout.display == "" and "sample 2" in panel.status_text
    bars = [t for t in panel.sample_figure.data if t.type == "bar"]
    real_acts = bars[0].y
    assert np.allclose(sorted(real_acts, reverse=True), real_acts)  # largest first
    # views redraw from the stored result
    for view, role in (("Histogram", "hist"), ("CDF", "cdf")):
        panel.view_box.value = view
        assert any((t.meta or {}).get("role") == role for t in panel.figure.data)
    panel.view_box.value = "Dataset"
    assert "Real codes" in panel.figure.layout.title.text
    assert panel.synthetic is res  # nothing reran
    code = panel.code()
    assert "synthetic_activation_test(" in code and "prompts[:10]" in code and "test='blowup'" in code
    assert "load_sae(" in code and "reference = reference_stats(" in code and "torch.tensor(" in code
    compile(code, "<code>", "exec")


def test_panel_plateau_threshold_and_errors(setup):
    panel = panel_for(setup)
    panel.test_box.value = "plateau"
    panel.run()
    res = panel.synthetic
    assert res.test == "plateau"
    assert f"{res.typical_distance:.3g}" in panel.threshold_note.value

    def line():
        return [t for t in panel.figure.data if (t.meta or {}).get("role") == "threshold"][0]

    assert line().y[0] == pytest.approx(res.threshold) and "typical distance" in line().name
    panel.threshold_box.value = 0.5  # redraw with a new threshold, no rerun
    assert line().y[0] == pytest.approx(0.5 * res.typical_distance)
    assert panel.synthetic is res
    for box in panel.family_boxes.values():
        box.value = False
    panel.run()
    assert "at least one family" in panel.status_text and panel.synthetic is res  # last good result kept


def test_panel_stable_regions_tab(setup):
    panel = panel_for(setup)
    panel.tabs.selected_index = 1
    panel.pairs_box.value = 3
    panel.stable_steps_box.value = 5
    panel.run()
    assert panel.status_text.startswith("Done"), panel.status_text
    assert panel.stable.distance.shape == (2, 3, 5) and panel.stable.models == ("trained", "re-initialised")
    assert panel.stable_box.layout.display == "" and panel.figure_box.layout.display == "none"
    code = panel.code()
    assert "'re-initialised': reinitialised(model, seed=0)" in code and "stable_regions(" in code
    compile(code, "<code>", "exec")


def test_figures(setup):
    model, sae, rows = setup
    from workbench.sae import synthetic_activation_test

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = synthetic_activation_test(model, sae, rows[:8, :8], test="plateau", reference=rows, n_steps=6,
                                        progress=False)  # fmt: skip
    fig = viz.curves(res, max_per_family=3)
    markers = [t for t in fig.data if t.meta["role"] == "marker"]
    stat = res.statistic()
    for t in markers:
        f = res.families.index(t.meta["family"])
        assert t.x[0] == int(stat[f, t.meta["sample"]])
    assert "typical distance" in [t for t in fig.data if t.meta["role"] == "threshold"][0].name
    hist = viz.histograms(res)
    table = [t for t in hist.data if t.type == "table"][0]
    assert list(table.cells.values[0]) == [res.label(f) for f in res.families]
    side = viz.sample_latents(res, "random", 0)
    twin = [t for t in side.data if t.meta["side"] != "real code"][0]
    on = res.twin_latents[1, 0] >= 0
    assert list(twin.x) == [str(int(i)) for i in res.twin_latents[1, 0][on]]
    with pytest.raises(InputError):
        viz.sample_latents(res, "nope", 0)
