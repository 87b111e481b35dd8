"""InteractionGraph panel and the LIB figures, driven in Python (no browser)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from plotly.callbacks import InputDeviceState, Points

from workbench.errors import InputError
from workbench.lib import (
    build_graph,
    communities,
    edge_attributions,
    feature_activations,
    load_modadd,
    modadd_data,
)
from workbench.lib.ablations import node_ablation
from workbench.viz import lib as viz
from workbench.widgets import InteractionGraph

N_TRAIN = 200


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread (restored afterwards): these engines run many small operations, which gain little from a
    second thread and slow down badly when threads compete with other work for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(lib_dir):
    return load_modadd(0, data_dir=lib_dir)


@pytest.fixture(scope="module")
def panel(model):
    p = InteractionGraph(model, modadd_data("train").subset(N_TRAIN), profile_data=modadd_data("all"))
    p.background = False
    return p


def _click(panel, kind: str, *ids):
    """Click the trace point whose customdata is [kind, *ids], as the browser would."""
    for trace in panel.figure.data:
        if trace.customdata is None:
            continue
        for i, data in enumerate(trace.customdata):
            if list(data) == [kind, *ids]:
                trace._dispatch_on_click(
                    Points(point_inds=[i], xs=[trace.x[i]], ys=[trace.y[i]]), InputDeviceState()
                )
                return
    raise AssertionError(f"no {kind} {ids} in the figure")


def test_run_counts_and_basis_toggle(panel):
    panel.run()
    assert "Done" in panel.status_text and panel.graph.basis == "lib"
    g = panel.graph
    counts = panel.edge_counts()["lib"]
    assert list(counts.values()) == [g.edges_holding(s, 0.9) for s in range(3)]
    assert (
        "Edges holding 90.0%" in panel.counts.value
        and f"{counts['ln1.0 → ln2.0']} of {g.edges[0].numel()}" in panel.counts.value
    )
    panel.threshold_box.value = 0.99
    assert panel.edge_counts()["lib"]["ln2.0 → unembed"] == g.edges_holding(1, 0.99)
    panel.basis_box.value = "pca"  # builds the PCA graph; both bases are counted now
    assert panel.graph.basis == "pca" and set(panel.edge_counts()) == {"lib", "pca"}
    assert "PCA" in panel.counts.value and "LIB" in panel.counts.value
    panel.basis_box.value = "lib"  # built before: shown at once
    assert panel.graph is g and "built before" in panel.status_text
    panel.threshold_box.value = 0.9


def test_click_node_and_edge(panel):
    panel.run()
    _click(panel, "node", 1, 3)
    assert panel.selection == ("node", 1, 3)
    assert panel.features is not None and panel.features.layers == panel.graph.node_layers
    titles = [a.text for a in panel.profile_figure.layout.annotations]
    assert titles[0].startswith("ln2.0[3]") and "Fourier" in titles[1]
    heat = panel.profile_figure.data[0]
    assert heat.type == "heatmap" and len(heat.z) == 113
    s, o, n = next((s, o, n) for s, o, n, _ in _edges(panel.graph))
    _click(panel, "edge", s, o, n)
    assert panel.selection == ("edge", s, o, n)
    assert panel.attribution.edge_weight == pytest.approx(float(panel.graph.edges[s][o, n]))
    assert panel.profile_figure.data[0].type == "scattergl"


def _edges(graph):
    for s in range(len(graph.sections)):
        for o, n, w in viz.shown_edges(graph, s, 0.9, False, 30):
            yield s, o, n, w


def test_bad_input_keeps_the_last_graph(panel):
    panel.run()
    g = panel.graph
    panel.intervals_box.value = 3  # gradient integration takes no intervals
    panel.run()
    assert "Intervals to 0" in panel.status_text and panel.graph is g
    panel.intervals_box.value = 0
    panel.truncation_box.value = -1.0
    panel.run()
    assert "Truncation" in panel.status_text and panel.graph is g
    panel.truncation_box.value = 1e-15
    panel.select_node(1, 10_000)
    assert "nodes 0.." in panel.status_text
    with pytest.raises(InputError, match="data"):
        InteractionGraph(panel.experiment.model)  # a model without the data to build on


def test_show_code_reproduces_the_run_in_a_fresh_interpreter(panel, tmp_path):
    panel.run()
    panel.clusters_box.value = True
    panel.select_node(2, 1)
    code = panel.code()
    assert "build_graph(model, data)" in code and f".subset({N_TRAIN}, seed=0)" in code
    assert "communities(graph" in code and "features.plot(layer='unembed', node=1)" in code
    out = tmp_path / "edges.pt"
    script = (
        "import torch\ntorch.set_num_threads(1)\n"
        + code
        + f"\ntorch.save([list(graph.edges), list(graph.eigenvalues)], {str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=600)
    edges, eigenvalues = torch.load(out)
    # same numbers to floating-point reproducibility: directions with Lambda ~ 1e-9 amplify rounding, so edges agree
    # to 1e-6 of the section's largest edge (measured: 1e-6 between one and two torch threads), not bit for bit
    for ours, theirs in zip(panel.graph.edges, edges):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(ours.max()))
    for ours, theirs in zip(panel.graph.eigenvalues, eigenvalues):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-12)
    panel.clusters_box.value = False


def test_panel_from_a_setup_name(lib_dir, monkeypatch):
    monkeypatch.setenv("WORKBENCH_LIB_DIR", str(lib_dir))
    p = InteractionGraph(setup="modadd-2")
    assert p.experiment.model.code == "load_modadd(seed=2)" and p.setup_box.value == "modadd-2"
    with pytest.raises(InputError, match="setup"):
        InteractionGraph(setup="cifar")


# -- figures --------------------------------------------------------------------------------------------------


def test_figures(model):
    data = modadd_data("train").subset(N_TRAIN)
    lib = build_graph(model, data, progress=False)
    pca = build_graph(model, data, basis="pca", progress=False)
    fig = viz.graph_figure(lib, threshold=0.9, nodes_per_layer=10)
    nodes = [t for t in fig.data if t.customdata is not None and t.customdata[0][0] == "node"]
    assert [len(t.x) for t in nodes] == [11, 11, 11, 10]  # 10 nodes + the constant one; the logits have none
    mids = [t for t in fig.data if t.customdata is not None and t.customdata[0][0] == "edge"]
    shown = sum(len(viz.shown_edges(lib, s, 0.9, False, 10)) for s in range(3))
    assert len(mids[0].x) == shown
    # every edge's dot is its own point, on its edge: a click reaches each edge, n -> o and o -> n alike
    dots = {(x, y) for x, y in zip(mids[0].x, mids[0].y)}
    assert len(dots) == shown
    for x, y, (_, s, o, n) in zip(mids[0].x, mids[0].y, mids[0].customdata):
        t = x - s
        assert 0 < t < 1 and y == pytest.approx(-(n + t * (o - n)))
    # the constant node's edges are hidden unless asked for
    for _, s, o, n in mids[0].customdata:
        assert n != 0 and (o != 0 or not lib.has_const(s + 1))
    assert any(0 in (o, n) for s in range(3) for o, n, _ in viz.shown_edges(lib, s, 0.99, True, 10))
    fig = viz.graph_figure(lib, communities=communities(lib, nodes_per_layer=10))
    spectra = viz.spectra([lib, pca])
    assert len(spectra.data) == 6 and spectra.layout.yaxis.type == "log"
    abl = node_ablation(model, lib, modadd_data("test").subset(500), schedule=[2, 6, 10], progress=False)
    curves = viz.ablation_curves([abl], reference={"lib": {"ln2.0": {6: 0.118}}})
    assert any(t.name == "LIB (authors)" for t in curves.data)
    feats = feature_activations(model, lib, modadd_data("all"), layers=["ln1.0"])
    prof = viz.node_profile(feats, "ln1.0", 2)
    bars = prof.data[1]  # Fourier terms, largest last
    assert bars.type == "bar" and bars.y[-1].startswith("cos(") and bars.x[-1] > 0.4
    edge = viz.edge_scatter(edge_attributions(model, lib, data, 1, 1, 2))
    assert edge.data[0].type == "scattergl" and edge.data[1].type == "histogram"
    with pytest.raises(InputError):
        viz.graph_figure(lib, threshold=0)
    with pytest.raises(InputError):
        viz.node_profile(feats, "ln1.0", 999)
