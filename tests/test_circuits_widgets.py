"""Circuit panels and figures: they draw what the engines computed, redraw without running a model, keep their last
good result on error, and their code() reproduces the last run in a fresh namespace."""

from __future__ import annotations

import pytest
import torch

from workbench.circuits import (
    atp_star,
    attention_patterns,
    direct_logit_attribution,
    edge_attribution,
    faithfulness,
    logit_lens,
    path_patch,
    verify,
)
from workbench.models.toy import random_model
from workbench.widgets.circuits import CircuitExplorer, HeadViews

pytestmark = [
    pytest.mark.filterwarnings("ignore:The clean and corrupt logit differences:UserWarning"),
    pytest.mark.filterwarnings("ignore:For pair.*opposite sign:UserWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two, and far faster on a busy machine (no waiting for a second)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CLEAN = ["Mary and John went , John gave it to", "Tom and Anna ran , Anna gave it to"]
CORRUPT = ["Mary and John went , Mary gave it to", "Tom and Anna ran , Tom gave it to"]
ANSWERS = [(" Mary", " John"), (" Tom", " Anna")]


@pytest.fixture(scope="module")
def model():
    return random_model("gpt2", seed=1)


class _Points:
    def __init__(self, inds):
        self.point_inds = inds


def _run_code(panel, model) -> dict:
    """Execute panel.code() with load_model answering the panel's model (no hub in tests)."""
    import workbench.models as models

    code = panel.code()
    namespace = {}
    original = models.load_model
    models.load_model = lambda name, *a, **k: model
    try:
        exec(compile(code, "<panel code>", "exec"), namespace)
    finally:
        models.load_model = original
    return namespace


def test_circuit_explorer_runs_redraws_and_patches_a_clicked_edge(model):
    panel = CircuitExplorer(model, CLEAN, CORRUPT, ANSWERS)
    panel.background = False
    panel.run()
    assert panel.status_text.startswith("Done"), panel.status_text
    assert panel.scores.n_edges == 12 + 5 + 12 * 6 + 10 + 11  # tiny GPT-2, 2 layers x 4 heads, by receiver
    edges_trace = next(t for t in panel.graph_figure.data if t.name == "edges")
    shown = len(edges_trace.x)
    panel.threshold.value = panel.threshold.value * 10  # fewer edges, no model run
    assert len(next(t for t in panel.graph_figure.data if t.name == "edges").x) <= shown
    assert len(panel.curve_figure.data) >= 1
    # a click on an edge's midpoint patches that edge exactly
    edges_trace = next(t for t in panel.graph_figure.data if t.name == "edges")
    r, s = (int(v) for v in edges_trace.customdata[0])
    panel._on_click(edges_trace, _Points([0]))
    sender, receiver = panel.scores.senders[s], panel.scores.receivers[r]
    want = path_patch(
        model,
        CLEAN,
        CORRUPT,
        ANSWERS,
        senders=sender,
        receivers=receiver,
        direction="noising",
        progress=False,
        warn=False,
    )
    torch.testing.assert_close(panel.edge.raw, want.raw)
    assert f"{sender} -&gt; {receiver}" in panel.edge_line.value
    # the code reproduces the run, in a fresh namespace
    ns = _run_code(panel, model)
    torch.testing.assert_close(ns["scores"].scores, panel.scores.scores)
    torch.testing.assert_close(ns["curve"].circuit_values, panel.curve.circuit_values)
    torch.testing.assert_close(ns["edge"].raw, panel.edge.raw)


def test_every_drawn_edge_has_its_own_marker_on_its_line(model):
    """A head's q, k and v edges from one sender share both ends: their markers still sit apart, each on the
    line drawn for it, so a click can reach each edge."""
    from workbench.viz import circuits as viz

    scores = edge_attribution(model, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False)
    fig = viz.edge_graph(scores, top_k=scores.n_edges)
    edges = next(t for t in fig.data if t.name == "edges")
    points = list(zip(edges.x, edges.y))
    assert len(points) == scores.n_edges and len(set(points)) == len(points)
    pos = viz.node_positions(model.cfg.n_layers, model.cfg.n_heads)
    for (x, y), (r, s) in zip(points, edges.customdata):
        node, _ = viz._drawn_receiver(scores.receivers[r])
        (x0, y0), (x1, y1) = pos[scores.senders[s]], pos[node]
        t = (x - x0) / (x1 - x0)
        assert 0 < t < 1
        if y0 != y1:
            assert y == pytest.approx(y0 + t * (y1 - y0))


def test_circuit_explorer_keeps_its_last_result_on_bad_input(model):
    panel = CircuitExplorer(model, CLEAN, CORRUPT, ANSWERS, method="eap-ig", steps=2)
    panel.background = False
    panel.run()
    good = panel.scores
    assert good.method == "eap-ig" and good.steps == 2
    panel.answers_box.value = "Mary, John"
    panel.run()
    assert "two quoted tokens" in panel.status_text and panel.scores is good
    panel.answers_box.value = "' Mary', ' John'\n' Tom', ' Anna'"
    panel.corrupt_box.value = "Mary and John went , Mary gave it to the"
    panel.run()
    assert "same number" in panel.status_text or "corrupt prompt" in panel.status_text
    assert panel.scores is good
    assert "scores = edge_attribution(" in panel.code() and "steps=2" in panel.code()


def test_head_views_show_pattern_dla_and_paths(model):
    panel = HeadViews(model, CLEAN, CORRUPT, ANSWERS)
    panel.background = False
    panel.show_head(0, 2)
    assert panel.status_text.startswith("Done"), panel.status_text
    assert panel.pattern.heads == ("L0H2",) and len(panel.pattern_figure.data) == 1
    assert panel.paths.senders == ("L0H2",)
    assert panel.paths.receivers[0] == "logits" and all(r.startswith("L1") for r in panel.paths.receivers[1:])
    assert not panel.paths.raw.isnan().any()
    ns = _run_code(panel, model)
    torch.testing.assert_close(ns["paths"].raw, panel.paths.raw)
    torch.testing.assert_close(ns["dla"].contributions, panel.dla.contributions)
    panel.show_head(7, 0)
    assert "does not exist" in panel.status_text and panel.head == (0, 2)


def test_every_result_plots_and_round_trips(model, tmp_path):
    from workbench.results import load_result

    results = {
        "paths": path_patch(
            model,
            CLEAN,
            CORRUPT,
            ANSWERS,
            senders="heads",
            receivers=["logits", "MLP1"],
            progress=False,
            warn=False,
        ),
        "scores": edge_attribution(model, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False),
        "lens": logit_lens(model, CLEAN, ANSWERS, progress=False),
        "dla": direct_logit_attribution(model, CLEAN, ANSWERS, progress=False),
        "attention": attention_patterns(model, CLEAN[0], heads=[0]),
    }
    results["curve"] = faithfulness(model, results["scores"], verify=3, progress=False)
    results["atp"] = verify(
        model, atp_star(model, CLEAN, CORRUPT, ANSWERS, progress=False, warn=False), n=4, progress=False
    )
    for name, result in results.items():
        fig = result.plot()
        assert fig.layout.title.text and len(fig.data) >= 1, name
        frame = result.to_frame()
        assert len(frame) > 0, name
        path = result.save(tmp_path / f"{name}.wbr")
        again = load_result(path)
        assert type(again) is type(result), name
        for field in ("raw", "scores", "top_ids", "contributions", "pattern", "circuit_values", "atp"):
            if hasattr(result, field):
                torch.testing.assert_close(getattr(again, field), getattr(result, field), equal_nan=True)
    # figures carry the engine's labels
    paths_fig = results["paths"].plot()
    assert list(paths_fig.data[0].y) == list(results["paths"].senders)
    lens_fig = results["lens"].plot()
    assert lens_fig.data[0].text[-1][-1] == results["lens"].top_tokens[0][-1][-1][0]


def test_patching_explorer_drill_down_opens_head_views(model):
    """cell -> heads (the explorer's drill-down) -> click a head -> its pattern, DLA and paths."""
    from workbench.widgets.patching import PatchingExplorer

    panel = PatchingExplorer(model, CLEAN, CORRUPT, ANSWERS)
    panel.background = panel.head_views.background = False
    panel.run()
    panel.drill(1, len(panel.grid.positions) - 1)  # layer 1, last position: every head there
    trace = panel.heads_figure.data[0]
    row, col = 0, 2
    layer, _, head = (int(v) for v in trace.customdata[row][col][:3])
    panel._on_head_click(trace, type("P", (), {"point_inds": [(row, col)]})())
    views = panel.head_views
    assert views.head == (layer, head) and views.status_text.startswith("Done"), views.status_text
    want = path_patch(
        model,
        CLEAN,
        CORRUPT,
        ANSWERS,
        senders=f"L{layer}H{head}",
        receivers=["logits"],
        progress=False,
        warn=False,
    )
    torch.testing.assert_close(views.paths.raw[:, :, :, :1], want.raw)
