"""The panels of the newer engines redraw in place exactly as they would draw fresh: CircuitExplorer (threshold,
method, direction, edge clicks), HeadViews (one head after another), SyntheticActivationProbe (test, view,
metric, threshold, sample clicks) and InteractionGraph (weight shown, nodes per layer, constant node,
communities, node and edge clicks, basis). As in test_redraw_equivalence.py: after any sequence of control
changes drawn by hypothesis, every figure (in Python, in a page that watched the deltas, in a page that connects
afterwards), the text lines and the printed code equal those of a panel brought straight to the final state.

Engine calls are cached by their arguments, so a sequence costs its redraws and few model runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from frontend_mirror import assert_same_figure, watched
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from plotly.callbacks import InputDeviceState, Points

import workbench.remote
import workbench.widgets.sae as sae_panel_module
from workbench.models.toy import random_model
from workbench.widgets.circuits import CircuitExplorer, HeadViews
from workbench.widgets.sae import VIEWS, SyntheticActivationProbe

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]
SETTINGS = settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

CLEAN = ["Mary and John went , John gave it to", "Tom and Anna ran , Anna gave it to"]
CORRUPT = ["Mary and John went , Mary gave it to", "Tom and Anna ran , Tom gave it to"]
ANSWERS = [(" Mary", " John"), (" Tom", " Anna")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _key(value):
    """A cache key for an engine argument: values by their text, results (scores, models) by identity (the
    cache keeps them alive)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _key(v)) for k, v in sorted(value.items()))
    return ("id", id(value))


def cached(fn, cache: dict):
    def run(*args, progress=None, cancel=None, **kwargs):
        key = (getattr(fn, "__name__", repr(fn)), _key(args), _key(kwargs))
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[key] = fn(*args, progress=False, cancel=cancel, **kwargs)
        return cache[key]

    return run


@pytest.fixture(scope="module", autouse=True)
def cached_engines():
    """`remote.call` (how panels call engines) and the SAE panel's engine answered from a cache."""
    cache = {}
    real = workbench.remote.call

    def call(fn, *args, progress=None, cancel=None, **kwargs):
        return cached(lambda *a, **k: real(fn, *a, **k), cache)(*args, cancel=cancel, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workbench.remote, "call", call)
        mp.setattr(
            sae_panel_module,
            "synthetic_activation_test",
            cached(sae_panel_module.synthetic_activation_test, cache),
        )
        yield cache


@pytest.fixture(scope="module")
def model():
    return random_model("gpt2", "tiny", seed=1)


def quiet(panel):
    panel.background = False
    return panel


def points(i: int) -> Points:
    return Points(point_inds=[i], xs=[None], ys=[None], trace_name="", trace_index=0)


# -- CircuitExplorer -----------------------------------------------------------------------------------------------
CIRCUIT_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("threshold"), st.sampled_from([0.001, 0.02, 0.1, 0.5])),
        st.tuples(st.just("method"), st.sampled_from(["eap", "eap-ig"])),
        st.tuples(st.just("direction"), st.sampled_from(["noising", "denoising"])),
        st.tuples(st.just("click"), st.floats(0, 0.999)),
    ),
    min_size=1,
    max_size=6,
)


def circuit_panel(model, **kwargs) -> CircuitExplorer:
    return quiet(CircuitExplorer(model, CLEAN, CORRUPT, ANSWERS, steps=2, **kwargs))


@SETTINGS
@given(CIRCUIT_ACTIONS)
@example([("click", 0.0), ("threshold", 0.5), ("method", "eap-ig"), ("click", 0.5), ("threshold", 0.001)])
def test_circuit_explorer_redraws_equal_a_fresh_panel(model, actions):
    panel = circuit_panel(model)
    panel.run()
    pages = watched(panel.graph_figure, panel.curve_figure)
    for action, value in actions:
        if action == "threshold":
            panel.threshold.value = value
        elif action == "method":
            panel.method_box.value = value
            panel.run()
        elif action == "direction":
            panel.direction_box.value = value
            panel.run()
        else:
            edges = next(t for t in panel.graph_figure.data if t.name == "edges")
            if len(edges.x):
                panel._on_click(edges, points(int(value * len(edges.x))))
    run = panel._last
    fresh = circuit_panel(model, method=run["method"], direction=run["direction"])
    fresh.run()
    fresh.threshold.value = panel.threshold.value
    if panel._edge_label is not None:
        fresh.patch_edge(*panel._edge_label)
    assert_same_figure(panel.graph_figure, pages[0], fresh.graph_figure)
    assert_same_figure(panel.curve_figure, pages[1], fresh.curve_figure)
    assert (panel.edge_line.value, panel.summary.value) == (fresh.edge_line.value, fresh.summary.value)
    assert panel.code() == fresh.code()


# -- HeadViews -----------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3)), min_size=1, max_size=4))
def test_head_views_redraw_equal_a_fresh_panel(model, heads):
    panel = quiet(HeadViews(model, CLEAN, CORRUPT, ANSWERS))
    panel.show_head(*heads[0])
    pages = watched(panel.pattern_figure, panel.dla_figure, panel.paths_figure)
    for head in heads[1:]:
        panel.show_head(*head)
    fresh = quiet(HeadViews(model, CLEAN, CORRUPT, ANSWERS))
    fresh.show_head(*heads[-1])
    for mine, page, theirs in zip(
        (panel.pattern_figure, panel.dla_figure, panel.paths_figure),
        pages,
        (fresh.pattern_figure, fresh.dla_figure, fresh.paths_figure),
    ):
        assert_same_figure(mine, page, theirs)
    assert panel.title.value == fresh.title.value
    assert panel.code() == fresh.code()


# -- SyntheticActivationProbe --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_setup(tmp_path_factory):
    from workbench.sae import activations as acts
    from workbench.sae import load_sae, save_sae, train_sae

    sae_model = random_model("gpt2", "tiny", seed=3)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(1, sae_model.cfg.d_vocab, (40, 10), generator=gen)
    rows[:, 0] = 0
    sae = train_sae(sae_model, rows, steps=30, batch_size=128, buffer_tokens=2048, expansion=4,
                    l1_coefficient=0.3, progress=False)  # fmt: skip
    freq = (sae.encode(acts.stream(sae_model, rows, "resid_pre", 1)) > 0).float().mean(0)
    path = tmp_path_factory.mktemp("sae")
    save_sae(sae.with_frequency(freq), path)
    return sae_model, load_sae(path), rows


def sae_panel(setup) -> SyntheticActivationProbe:
    sae_model, sae, rows = setup
    return quiet(SyntheticActivationProbe(sae_model, sae, rows[:8, :8], reference=rows, n_steps=6))


SAE_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("test"), st.sampled_from(["blowup", "plateau"])),
        st.tuples(st.just("view"), st.sampled_from(VIEWS)),
        st.tuples(st.just("metric"), st.sampled_from(["l2", "kl"])),
        st.tuples(st.just("threshold"), st.sampled_from([0.05, 0.3])),
        st.tuples(st.just("click"), st.floats(0, 0.999)),
    ),
    min_size=1,
    max_size=6,
)


@SETTINGS
@given(SAE_ACTIONS)
@example([("click", 0.3), ("test", "plateau"), ("view", "CDF"), ("threshold", 0.05), ("view", "Curves")])
def test_synthetic_activation_probe_redraws_equal_a_fresh_panel(sae_setup, actions):
    panel = sae_panel(sae_setup)
    panel.run()
    pages = watched(panel.figure, panel.sample_figure)
    for action, value in actions:
        if action == "test":
            panel.test_box.value = value
            panel.run()
        elif action == "view":
            panel.view_box.value = value
        elif action == "metric":
            panel.metric_box.value = value
        elif action == "threshold":
            panel.threshold_box.value = value
        else:
            curves = [
                t for t in panel.figure.data if isinstance(t.meta, dict) and t.meta.get("role") == "curve"
            ]
            if curves:
                trace = curves[int(value * len(curves))]
                trace._dispatch_on_click(points(0), InputDeviceState())
    _, run = panel._last
    fresh = sae_panel(sae_setup)
    fresh.test_box.value = run["test"]
    fresh.threshold_box.value = run["threshold"]
    fresh.run()
    fresh.view_box.value = panel.view_box.value
    fresh.metric_box.value = panel.metric_box.value
    fresh.threshold_box.value = panel.threshold_box.value
    if panel._sample is not None:
        fresh.show_sample(*panel._sample)
    assert_same_figure(panel.figure, pages[0], fresh.figure)
    assert panel.sample_box.layout.display == fresh.sample_box.layout.display
    if panel._sample is not None:
        assert_same_figure(panel.sample_figure, pages[1], fresh.sample_figure)
    assert (panel.notes.value, panel.threshold_note.value) == (fresh.notes.value, fresh.threshold_note.value)
    assert panel.code() == fresh.code()


# -- InteractionGraph ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lib_graphs(lib_dir):
    """The mod-add model, its data and its LIB and PCA graphs (built once)."""
    from workbench.lib import build_graph, load_modadd, modadd_data

    lib_model = load_modadd(0, data_dir=lib_dir)
    train, profile = modadd_data("train").subset(200), modadd_data("all")
    graphs = [build_graph(lib_model, train, basis=b, progress=False) for b in ("lib", "pca")]
    return lib_model, train, profile, graphs


def graph_panel(lib_graphs):
    from workbench.widgets import InteractionGraph

    lib_model, train, profile, graphs = lib_graphs
    return quiet(InteractionGraph(lib_model, train, profile_data=profile, graphs=graphs))


GRAPH_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("threshold"), st.sampled_from([0.6, 0.9, 0.99])),
        st.tuples(st.just("nodes"), st.sampled_from([3, 10, 30])),
        st.tuples(st.just("const"), st.booleans()),
        st.tuples(st.just("clusters"), st.booleans()),
        st.tuples(st.just("basis"), st.sampled_from(["lib", "pca"])),
        st.tuples(st.just("click"), st.tuples(st.sampled_from(["node", "edge"]), st.floats(0, 0.999))),
    ),
    min_size=1,
    max_size=6,
)


@SETTINGS
@given(GRAPH_ACTIONS)
@example([("click", ("node", 0.2)), ("threshold", 0.6), ("nodes", 3), ("basis", "pca"), ("clusters", True)])
# communities found among 30 nodes per layer, then 3 shown: they are found again among those 3
@example([("clusters", True), ("nodes", 3)])
def test_interaction_graph_redraws_equal_a_fresh_panel(lib_graphs, actions):
    panel = graph_panel(lib_graphs)
    pages = watched(panel.figure, panel.profile_figure)
    for action, value in actions:
        if action == "threshold":
            panel.threshold_box.value = value
        elif action == "nodes":
            panel.nodes_box.value = value
        elif action == "const":
            panel.const_box.value = value
        elif action == "clusters":
            panel.clusters_box.value = value
        elif action == "basis":
            panel.basis_box.value = value
        else:
            kind, where = value
            hits = [
                (trace, i)
                for trace in panel.figure.data
                if trace.customdata is not None
                for i, data in enumerate(trace.customdata)
                if data[0] == kind
            ]
            if hits:
                trace, i = hits[int(where * len(hits))]
                trace._dispatch_on_click(points(i), InputDeviceState())
    fresh = graph_panel(lib_graphs)
    fresh.basis_box.value = panel.basis_box.value
    fresh.threshold_box.value = panel.threshold_box.value
    fresh.nodes_box.value = panel.nodes_box.value
    fresh.const_box.value = panel.const_box.value
    fresh.clusters_box.value = panel.clusters_box.value
    if panel.selection is not None and panel.selection[0] == "node":
        fresh.select_node(*panel.selection[1:])
    elif panel.selection is not None:
        fresh.select_edge(*panel.selection[1:])
    assert_same_figure(panel.figure, pages[0], fresh.figure)
    assert_same_figure(panel.profile_figure, pages[1], fresh.profile_figure)
    assert panel.counts.value == fresh.counts.value
    assert panel.code() == fresh.code()
