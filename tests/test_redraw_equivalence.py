"""A panel redrawn in place shows exactly what a panel built fresh for the same state shows.

For each panel, hypothesis drives sequences of control changes (site, direction, metric, normalisation, pair,
view, threshold, log scale, preset, norm choice, clicks, runs). Afterwards every figure of the panel must equal
the figure of a new panel brought straight to the final state: in Python, and in the page, as `Frontend`
replays the messages the figure sent (deltas merge into what the page holds, so a stale title, axis or range
shows there even when the Python figure is right). A page that connects afterwards gets the same figure.

Engine calls are cached by their arguments (the model runs once per distinct call), so a sequence costs its
redraws only.
"""

from __future__ import annotations

import html
import warnings

import pytest
import torch
from frontend_mirror import assert_same_figure, watched
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from plotly.callbacks import InputDeviceState, Points

import workbench.remote
from workbench.models.toy import random_model
from workbench.widgets.lnfree import ESTIMATORS, LNRemovalPreview
from workbench.widgets.patching import PatchingExplorer
from workbench.widgets.plateau import PlateauProbe

pytestmark = [
    pytest.mark.filterwarnings("ignore:The clean and corrupt logit differences:UserWarning"),
    pytest.mark.filterwarnings("ignore:For pair.*opposite sign:UserWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
SETTINGS = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

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
    return random_model("gpt2", "tiny", seed=1)


@pytest.fixture(scope="module", autouse=True)
def cached_engines():
    """`remote.call` (how panels call engines) answered from a cache keyed by the call's arguments."""
    cache = {}
    real = workbench.remote.call

    def call(fn, *args, progress=None, cancel=None, **kwargs):
        key = (fn.__name__, repr(args[1:]), repr(sorted(kwargs.items())))
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[key] = real(fn, *args, progress=False, cancel=cancel, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workbench.remote, "call", call)
        yield cache


def click_heatmap(figure, row: int, col: int) -> None:
    trace = figure.data[0]
    trace._click_callbacks[-1](
        trace, Points(point_inds=[[row, col]], xs=[None], ys=[None], trace_name="", trace_index=0), None
    )


# -- PatchingExplorer ----------------------------------------------------------------------------------------------
PATCHING_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("site"), st.sampled_from(["resid_pre", "attn_out", "block", "z"])),
        st.tuples(st.just("direction"), st.sampled_from(["denoising", "noising"])),
        st.tuples(st.just("metric"), st.sampled_from(["logit_diff", "logprob", "prob", "kl"])),
        st.tuples(st.just("normalize"), st.booleans()),
        st.tuples(st.just("pair"), st.sampled_from([-1, 0, 1])),
        st.tuples(st.just("click"), st.tuples(st.floats(0, 0.999), st.floats(0, 0.999))),
    ),
    min_size=1,
    max_size=8,
)


def patching_panel(model, **kwargs) -> PatchingExplorer:
    panel = PatchingExplorer(model, CLEAN, CORRUPT, ANSWERS, **kwargs)
    panel.background = False
    return panel


@SETTINGS
@given(PATCHING_ACTIONS)
# the transitions the issue saw, always tried besides hypothesis' own sequences
@example([("site", "block"), ("site", "resid_pre")])
@example([("site", "z"), ("click", (0.5, 0.5)), ("site", "block"), ("click", (0.9, 0.9))])
@example([("click", (0.1, 0.95)), ("click", (0.9, 0.5)), ("pair", 1), ("normalize", False)])
def test_patching_explorer_redraws_equal_a_fresh_panel(model, actions):
    panel = patching_panel(model)
    panel.run()
    pages = watched(panel.figure, panel.heads_figure)
    for action, value in actions:
        if action == "site":
            panel.site_box.value = value
            panel.run()
        elif action == "direction":
            panel.direction_box.value = value
            panel.run()
        elif action == "metric":
            panel.metric_box.value = value
        elif action == "normalize":
            panel.normalize_box.value = value
        elif action == "pair":
            panel.pair_box.value = value
        elif panel.figure.data and panel.figure.data[0].type == "heatmap":  # a click on a drawn cell
            cells = panel.figure.data[0].customdata
            click_heatmap(panel.figure, int(value[0] * len(cells)), int(value[1] * len(cells[0])))
    run = panel._grid_kwargs  # the last run's settings, then the view
    fresh = patching_panel(
        model,
        site=panel.site_box.value,
        direction=run["direction"],
        metric=run["metric"],
        normalize=panel.normalize_box.value,
    )
    fresh.run()
    fresh.metric_box.value = panel.metric_box.value
    fresh.pair_box.value = panel.pair_box.value
    if panel._drill_cell is not None:
        fresh.drill(*panel._drill_cell)
    assert_same_figure(panel.figure, pages[0], fresh.figure)
    assert panel.heads_box.layout.display == fresh.heads_box.layout.display
    if fresh.heads_box.layout.display != "none":
        assert_same_figure(panel.heads_figure, pages[1], fresh.heads_figure)
    assert panel.code() == fresh.code()


# -- LNRemovalPreview ----------------------------------------------------------------------------------------------
LN_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("preset"), st.integers(0, 7)),
        st.tuples(st.just("kind"), st.sampled_from(["mlp", "qk", "v", "final"])),
        st.tuples(st.just("clear"), st.none()),
        st.tuples(
            st.just("select"), st.lists(st.sampled_from(["mlp.0", "qk.1", "v.0", "final"]), unique=True)
        ),
        st.tuples(st.just("estimator"), st.sampled_from(list(ESTIMATORS)[:2])),
    ),
    min_size=1,
    max_size=8,
)


@pytest.fixture(scope="module")
def ln_tokens(model):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, model.cfg.d_vocab, (3, 10), generator=gen)
    tokens[:, 0] = 0
    return tokens


def ln_panel(model, tokens) -> LNRemovalPreview:
    panel = LNRemovalPreview(model, tokens, n_rows=None)
    panel.background = False
    return panel


@SETTINGS
@given(LN_ACTIONS)
@example([("preset", 7), ("preset", 2), ("kind", "final"), ("clear", None)])
# the browser test's path: restyling bars of the second subplot made plotly.js forget the first one's axis type
@example([("preset", 3), ("preset", 6), ("clear", None), ("kind", "final"), ("kind", "mlp")])
def test_layernorm_preview_redraws_equal_a_fresh_panel(model, ln_tokens, actions):
    panel = ln_panel(model, ln_tokens)
    panel.run()
    (page,) = watched(panel.figure)
    for action, value in actions:
        if action == "preset":
            panel.preset.value = value
        elif action == "kind":
            panel.toggle_kind(value)
        elif action == "clear":
            panel.select([])
        elif action == "select":
            panel.select(value)
        else:
            panel.estimator.value = value
            panel.run()
    fresh = ln_panel(model, ln_tokens)
    fresh.estimator.value = panel.estimator.value
    fresh.run()
    fresh.select(panel.selected)
    if panel.preset.value != fresh.preset.value:  # "paper order up to step k" chosen after the same sites
        fresh.preset.value = panel.preset.value
    assert_same_figure(panel.figure, page, fresh.figure)
    assert panel.code() == fresh.code()


# -- PlateauProbe --------------------------------------------------------------------------------------------------
PLATEAU_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("view"), st.sampled_from(["Curves", "Plateau lengths", "Interpolation"])),
        st.tuples(st.just("metric"), st.sampled_from(["kl", "l2"])),
        st.tuples(st.just("threshold"), st.sampled_from([0.01, 0.5])),
        st.tuples(st.just("log"), st.booleans()),
        st.tuples(st.just("layer"), st.sampled_from([0, 1])),
        st.tuples(st.just("run"), st.none()),
        st.tuples(st.just("click"), st.floats(0, 0.999)),
    ),
    min_size=1,
    max_size=8,
)
PROMPTS = ["When Mary and John went to the store , John gave a drink to", "The capital of France is Paris"]


def plateau_panel(model) -> PlateauProbe:
    panel = PlateauProbe(model, PROMPTS, prompt_b="The cat sat on the mat")
    panel.background = False
    panel.n_directions_box.value = 2
    panel.n_sizes_box.value = 5
    panel.max_size_box.value = 3.0
    return panel


def click_curve(panel: PlateauProbe, where: float) -> tuple | None:
    traces = [
        t for t in panel.figure.data if isinstance(t.meta, dict) and t.meta.get("role") in ("curves", "pair")
    ]
    if not traces:
        return None
    trace = traces[int(where * len(traces))]
    points = [i for i, y in enumerate(trace.y) if y == y]  # not the gaps between curves
    i = points[int(where * len(points))]
    trace._dispatch_on_click(Points(point_inds=[i], xs=[trace.x[i]], ys=[trace.y[i]]), InputDeviceState())
    if trace.meta["role"] == "pair":
        return ("pair", int(trace.meta["pair"]))
    return ("curve", *(int(v) for v in trace.customdata[i]))


@SETTINGS
@given(PLATEAU_ACTIONS)
@example([("view", "Plateau lengths"), ("view", "Interpolation"), ("run", None), ("view", "Curves")])
@example([("click", 0.5), ("view", "Interpolation"), ("run", None), ("click", 0.3), ("view", "Curves")])
def test_plateau_probe_redraws_equal_a_fresh_panel(model, actions):
    panel = plateau_panel(model)
    panel.run()
    pages = watched(panel.figure, panel.token_figure)
    clicked = None
    for action, value in actions:
        if action == "view":
            panel.view_box.value = value
        elif action == "metric":
            panel.metric_box.value = value
        elif action == "threshold":
            panel.threshold_box.value = value
        elif action == "log":
            panel.log_box.value = value
        elif action == "layer":
            panel.layer_box.value = value
            panel.run()
        elif action == "run":
            panel.run()
        else:
            clicked = click_curve(panel, value) or clicked
    fresh = plateau_panel(model)
    if panel._probe_run is not None:
        fresh.layer_box.value = panel._probe_run["layer"]
        fresh.run()
    if panel._interp_run is not None:
        fresh.layer_box.value = panel._interp_run["layer"]
        fresh.view_box.value = "Interpolation"
        fresh.run()
    fresh.layer_box.value = panel.layer_box.value
    fresh.view_box.value = panel.view_box.value
    fresh.metric_box.value = panel.metric_box.value
    fresh.threshold_box.value = panel.threshold_box.value
    fresh.log_box.value = panel.log_box.value
    assert_same_figure(panel.figure, pages[0], fresh.figure)
    shown = panel.token_box.layout.display != "none"
    if shown:
        if clicked[0] == "pair":
            fresh.show_pair_tokens(clicked[1])
        else:
            fresh.show_tokens(*clicked[1:])
        fresh.redraw()
        assert_same_figure(panel.token_figure, pages[1], fresh.token_figure)
    assert (fresh.token_box.layout.display != "none") == shown
    # the notes are those of the result the view draws
    result = panel.interpolation if panel.view_box.value == "Interpolation" else panel.plateau
    assert all(w in html.unescape(panel.notes.value) for w in getattr(result, "warnings", ()))
    assert panel.notes.value == fresh.notes.value
    assert panel.code() == fresh.code()
