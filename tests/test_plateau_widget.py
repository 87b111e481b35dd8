"""PlateauProbe panel and the plateau figures, driven in Python (no browser)."""

from __future__ import annotations

import warnings

import pytest
import torch
from plotly.callbacks import InputDeviceState, Points

from workbench.errors import InputError
from workbench.models.toy import random_model
from workbench.plateau import interpolate, probe, reference_stats, slice_2d
from workbench.viz import plateau as viz
from workbench.widgets.plateau import PlateauProbe

PROMPTS = ["When Mary and John went to the store , John gave a drink to", "The capital of France is Paris"]
CORPUS = [
    "Then Tom and Anna had fun at the park after lunch while Kate ran to school",
    "The big red dog sat on the mat while the cat ran quickly to the house",
    "Paul gave a book to Kate at school . Lisa gave a key to Bob at the office",
    "one two three four five six seven eight nine ten . The capital of France is Paris",
]


@pytest.fixture(scope="module")
def model():
    return random_model("gpt2", "tiny", seed=1)


@pytest.fixture(scope="module")
def result(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return probe(model, PROMPTS, n_directions=3, sizes=torch.linspace(0, 3, 7), progress=False)


def panel_for(model, **kwargs) -> PlateauProbe:
    panel = PlateauProbe(model, PROMPTS, **kwargs)
    panel.background = False
    panel.n_directions_box.value = 3
    panel.n_sizes_box.value = 6
    panel.max_size_box.value = 3.0
    return panel


def roles(fig) -> list[str]:
    return [t.meta.get("role") for t in fig.data if isinstance(t.meta, dict)]


# -- figures ------------------------------------------------------------------------------------------------


def test_curves_figure(result):
    fig = viz.curves(result, threshold=0.01)
    medians = [t for t in fig.data if t.meta["role"] == "median"]
    assert [t.meta["group"] for t in medians] == result.family_names
    assert "median ‖resid_pre 1‖" in fig.layout.xaxis.title.text  # the unit of sizes is on the axis
    assert "KL" in fig.layout.yaxis.title.text
    # the median line is the per-size median over every curve of the family
    fam = result.family_names[0]
    cols = [i for i, f in enumerate(result.families) if f == fam]
    expected = result.kl[:, cols].flatten(0, 1).quantile(0.5, dim=0)
    assert torch.allclose(torch.tensor(medians[0].y, dtype=torch.float32), expected, atol=1e-6)
    single = [t for t in fig.data if t.meta["role"] == "curves"][0]
    assert list(single.customdata[0]) == [0, cols[0]]
    assert any(s.y0 == 0.01 for s in fig.layout.shapes)  # threshold line
    log = viz.curves(result, log_y=True, metric="l2")
    assert log.layout.yaxis.type == "log" and "L2 distance at resid_post 1" in log.layout.yaxis.title.text


def test_plateau_length_histogram(result):
    fig = viz.plateau_lengths(result, threshold=0.01)
    hists = [t for t in fig.data if t.meta["role"] == "lengths"]
    assert len(hists) == len(result.family_names)
    baseline = [t for t in hists if t.meta["group"] == "cov_mixture"][0]
    assert "p=" not in baseline.name and any("p=" in t.name for t in hists if t is not baseline)
    lengths = result.plateau_length(threshold=0.01)
    n_never = int(torch.isinf(lengths).sum())
    beyond = [x for t in hists for x in t.x if x > float(result.sizes[-1])]
    assert len(beyond) == n_never
    assert "plateau length (×" in fig.layout.xaxis2.title.text
    cdfs = [t for t in fig.data if t.meta["role"] == "cdf"]
    assert len(cdfs) == len(hists) and all(t.y[-1] == 1 for t in cdfs)


def test_tokens_along_figure(result):
    fig = viz.tokens_along(result, base=1, direction=2)
    heat = fig.data[0]
    assert heat.customdata[0][0] == result.token_strings[int(result.ref_top_ids[1, 0])]  # size 0: unperturbed
    assert heat.customdata[0][-1] == result.token_strings[int(result.top_ids[1, 2, -1, 0])]
    # each run of one token is labelled at most once, and the labels leave room for each other
    cell = viz.RIBBON_PX / len(heat.customdata[0])
    for tokens, labels in zip(heat.customdata, heat.text):
        shown = [j for j, label in enumerate(labels) if label]
        assert all(viz._short(tokens[j]) == labels[j] for j in shown)
        for a, b in zip(shown, shown[1:]):  # another label only after the token changed
            assert any(tokens[j] != tokens[a] for j in range(a, b + 1))
        spans = [
            (j - len(labels[j]) * viz.CHAR_PX / cell / 2, j + len(labels[j]) * viz.CHAR_PX / cell / 2)
            for j in shown
        ]
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert all(-0.5 <= a and b <= len(tokens) - 0.5 for a, b in spans)
    row = viz.ribbon_labels([["Mary"] * 3 + ["neighbourhood"] + ["to"] * 29])[0]
    assert row[1] == "Mary" and not any(row[2:5]) and row.count("to") == 1
    family = result.families[2]
    n = result.families.count(family)
    assert f"{family} direction {2 - result.families.index(family) + 1} of {n}" in fig.layout.title.text
    with pytest.raises(InputError, match="No curve"):
        viz.tokens_along(result, base=9, direction=0)


def test_interpolation_and_slice_figures(model):
    res = interpolate(model, PROMPTS[0], [PROMPTS[1], "The cat sat on the mat"], n_steps=5, progress=False)
    fig = res.plot(pair=1)
    pairs = [t for t in fig.data if (t.meta or {}).get("role") == "pair"]
    assert len(pairs) == 2 and pairs[1].line.width == 3
    assert "median" in roles(fig) and "tokens" in roles(fig)
    sl = slice_2d(model, PROMPTS[0], PROMPTS[1], "The cat sat on the mat", n=4, progress=False)
    fig = sl.plot()
    image = fig.data[0]
    assert image.z.shape == (4, 4, 3)
    assert roles(fig) == ["slice", "hover", "endpoints"]


# -- the panel ------------------------------------------------------------------------------------------------


def test_panel_runs_and_code_reproduces(model):
    panel = panel_for(model)
    panel.families_box.value = ("isotropic", "toward_real")
    panel.run_button.click()
    assert panel.plateau is not None, panel.status_text
    assert "Done" in panel.status_text
    medians = [t.meta["group"] for t in panel.figure.data if t.meta["role"] == "median"]
    assert medians == ["isotropic", "toward_real"]
    # no reference given: the prompts' own activations, with a warning
    assert "covariance" in panel.notes.value
    code = panel.code()
    assert "result = probe(" in code and "families=('isotropic', 'toward_real')," in code
    # the printed call gives the same numbers
    torch.testing.assert_close(run_code(code, model)["result"].kl, panel.plateau.kl)


def run_code(code: str, model) -> dict:
    import workbench.models

    namespace = {}
    real = workbench.models.load_model
    workbench.models.load_model = lambda name: model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(code, namespace)
    finally:
        workbench.models.load_model = real
    return namespace


def test_panel_views_metric_and_threshold(model):
    panel = panel_for(model)
    panel.run()
    panel.view_box.value = "Plateau lengths"
    assert "lengths" in roles(panel.figure)
    assert "plateau_lengths(result" in panel.code()
    panel.view_box.value = "Curves"
    panel.metric_box.value = "l2"
    assert panel.threshold_box.value == pytest.approx(panel.plateau.default_threshold("l2"), rel=1e-4)
    assert "L2" in panel.figure.layout.yaxis.title.text
    panel.threshold_box.value = 0.5
    assert any(s.y0 == 0.5 for s in panel.figure.layout.shapes)
    panel.log_box.value = True
    assert panel.figure.layout.yaxis.type == "log"


def test_click_a_curve_shows_its_tokens(model):
    panel = panel_for(model)
    panel.run()
    trace = next(t for t in panel.figure.data if t.meta["role"] == "curves")
    i = 2 * (len(panel.plateau.sizes) + 1) + 3  # a point on the third curve of this trace
    base, direction = (int(v) for v in trace.customdata[i])
    trace._dispatch_on_click(Points(point_inds=[i], xs=[trace.x[i]], ys=[trace.y[i]]), InputDeviceState())
    assert panel.token_box.layout.display == ""
    expected = viz.tokens_along(panel.plateau, base, direction)
    assert panel.token_figure.data[0].text == expected.data[0].text
    assert viz.direction_label(panel.plateau, direction) in panel.status_text


def test_panel_interpolation_view(model):
    panel = panel_for(model, prompt_b="The cat sat on the mat")
    panel.view_box.value = "Interpolation"
    panel.run()
    assert panel.interpolation is not None and "pair" in roles(panel.figure)
    assert "result = interpolate(" in panel.code() and "'When Mary" in panel.code()
    torch.testing.assert_close(run_code(panel.code(), model)["result"].distance, panel.interpolation.distance)
    trace = next(t for t in panel.figure.data if (t.meta or {}).get("role") == "pair")
    trace._dispatch_on_click(Points(point_inds=[1], xs=[trace.x[1]], ys=[trace.y[1]]), InputDeviceState())
    assert panel.token_box.layout.display == ""


def test_panel_errors_keep_the_last_result(model):
    panel = panel_for(model)
    panel.run()
    good = panel.plateau
    panel.max_size_box.value = -1.0
    panel.run()
    assert "Max size must be positive" in panel.status_text and panel.plateau is good
    panel.max_size_box.value = 3.0
    panel.prompts_box.value = ""
    panel.run()
    assert "Type at least one prompt" in panel.status_text
    panel.prompts_box.value = PROMPTS[0]
    panel.families_box.value = ()
    panel.run()
    assert "direction family" in panel.status_text
    panel.families_box.value = ("isotropic",)
    panel.layer_box.value = 0
    panel.site_box.value = "resid_post"
    panel.position_box.value = 0
    panel.run()  # position 0 runs, with the warning in the notes
    assert "position 0" in panel.notes.value
    panel.view_box.value = "Interpolation"
    panel.run()
    assert "Type prompt B" in panel.status_text
    assert panel.plateau is not None


def test_positions_follow_the_first_prompt(model):
    panel = panel_for(model)
    values = [v for _, v in panel.position_box.options]
    n = model.to_tokens(PROMPTS[0]).shape[1]
    assert values[:2] == [-1, "all-but-first"] and values[2:] == list(range(n))
    panel.prompts_box.value = "The cat sat"
    assert len(panel.position_box.options) == 2 + 4


def test_panel_with_reference_data_and_user_directions(model):
    directions = {"sae": torch.randn(4, model.cfg.d_model)}
    panel = panel_for(model, reference_data=CORPUS, directions=directions)
    assert "sae" in panel.families_box.value
    panel.families_box.value = ("cov_mixture", "sae")
    panel.run()
    assert panel.plateau.families.count("sae") == 4
    code = panel.code()
    assert "reference_stats(model, corpus, layer=1, site='resid_pre')" in code
    assert "directions=directions" in code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_stats(model, CORPUS, layer=1, progress=False)
    assert panel._references[("resid_pre", 1)].median_norm == pytest.approx(ref.median_norm)


def test_constructor_checks_like_the_engine(model):
    from workbench.errors import SiteError

    with pytest.raises(SiteError, match="site='attn' is not available here; choose one of 'resid_pre'"):
        PlateauProbe(model, PROMPTS, site="attn")
    with pytest.raises(SiteError, match="Layer 7 is out of range"):
        PlateauProbe(model, PROMPTS, layer=7)
    with pytest.raises(InputError, match=r"directions\['mine'\] is \(3, 5\): give a tensor \[k, d_model\]"):
        PlateauProbe(model, PROMPTS, directions={"mine": torch.zeros(3, 5)})


def test_views_without_a_result_say_that_run_computes_them(model):
    panel = panel_for(model)
    panel.view_box.value = "Interpolation"
    assert "press Run" in panel.figure.layout.annotations[0].text and "prompt B" in panel.status_text
    panel.view_box.value = "Curves"
    assert "press Run" in panel.figure.layout.annotations[0].text
    panel.run()
    assert panel.figure.data and not panel.figure.layout.annotations[0].text.startswith("Curves")
